//! End to end: the agent (`oomguard run --policy container`) against a real containerd, a
//! pod laid out like kubelet's cgroupfs driver beneath the test's own memory cgroup, and a
//! loopback stand-in for the API server reached through a kubeconfig.
//!
//! The pod (`kubepods/burstable/pod<uid>`, limit 256 MiB) holds a sandbox container (its
//! process is named `pause`, as kubelet's pause image runs), a sibling that sleeps and an
//! app container whose `oomguard-memhog` outgrows the pod's limit at a set rate. With a 10%
//! margin a correct agent wins every time; the kernel's OOM killer must never act.
//!
//! - CRI (`k8s.io`): the app is killed through containerd, the sandbox and the sibling keep
//!   running, the Event reaches the API server and `kubectl` reads it back; a restarted app
//!   killed again raises the Event's `count` to 2 through a PATCH.
//! - Runtime hung: the fallback kills the app's tasks directly, still before the kernel.
//! - docker (`moby`, labels from `config.v2.json`): killed through containerd, sandbox spared.
//! - `--policy noop`: the kernel kills, and the agent reports it (`kernel-oom`, `CgroupOOM`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fixture::M;
use fixture::apiserver::FakeApiServer;
use fixture::containerd::{Containerd, container_id};
use fixture::{TempDir, wait_for};
use oomguard::cgroup::MemCgroup;
use oomguard::runtime::labels;
use oomguard_dev::sandbox::{Agent, Sandbox};
use serde_json::Value;

const UID: &str = "6b0f3c2e-9d4a-4f1b-8e7c-2a5d1c9e0b37";
const POD_NS: &str = "shop";
const POD_NAME: &str = "web-0";
const NODE: &str = "test-node";
const POD_LIMIT: u64 = 256 * M;
/// Long enough for any allocation below to reach the pod's kill threshold.
const DECISION_WAIT: Duration = Duration::from_secs(30);

/// Root, cgroup v1 memory with thresholds, containerd + runc + busybox, kubectl.
fn ready(need_containerd: bool) -> bool {
    if !fixture::kernel_ready() {
        return false;
    }
    if need_containerd && !fixture::require(fixture::containerd::probe()) {
        return false;
    }
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    fixture::require((!kubectl).then(|| "kubectl is not installed".into()))
}

/// How the pod's containers are labelled and which containerd namespace runs them.
#[derive(Clone, Copy)]
enum Flavor<'a> {
    /// CRI labels on the containers, namespace `k8s.io`.
    Cri,
    /// docker: no labels in containerd, `config.v2.json` under this docker root, `moby`.
    Docker(&'a Path),
}

impl Flavor<'_> {
    fn namespace(self) -> &'static str {
        match self {
            Flavor::Cri => "k8s.io",
            Flavor::Docker(_) => "moby",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sandbox,
    Container,
}

/// One test's world. Fields drop in order: containers and containerd first, then the API
/// server, the temporary directory, and last the cgroups (after every process is gone).
struct World {
    ctrd: Option<Containerd>,
    api: FakeApiServer,
    dir: TempDir,
    kubepods: PathBuf,
    pod: PathBuf,
    _sb: Sandbox,
}

impl World {
    fn new(name: &str, with_containerd: bool) -> World {
        let sb = Sandbox::new(name).expect("sandbox cgroup");
        let kubepods = sb.path().join("kubepods");
        let pod = kubepods.join("burstable").join(format!("pod{UID}"));
        std::fs::create_dir_all(&pod).unwrap();
        MemCgroup::new(&pod).set_limit(POD_LIMIT).unwrap();
        let dir = TempDir::new(name);
        let api = FakeApiServer::start();
        api.write_kubeconfig(&dir.path().join("kubeconfig"));
        let ctrd = with_containerd.then(|| Containerd::start(name));
        World {
            ctrd,
            api,
            dir,
            kubepods,
            pod,
            _sb: sb,
        }
    }

    fn ctrd(&self) -> &Containerd {
        self.ctrd.as_ref().unwrap()
    }

    fn cg(&self, id: &str) -> MemCgroup {
        MemCgroup::new(self.pod.join(id))
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Starts the agent on the `kubepods` directory (discovery finds the pod) and waits
    /// until it has armed the pod's cgroup.
    fn start_agent(&self, extra: &[&str]) -> Agent {
        fixture::launch(&self.kubepods)
            .args(&["--margin-ratio", "0.1"])
            .kube(&self.kubeconfig(), NODE)
            .args(extra)
            .armed(&[&self.pod])
            .start()
    }

    /// Runs a container of the pod in `pod/<id>` (no limit of its own: the pod's limit is
    /// the one that fires), labelled as `flavor` says.
    fn container(&self, flavor: Flavor, id: &str, kind: Kind, name: &str, cmd: &[&str]) {
        let ctrd = self.ctrd();
        let mut l = vec![
            (labels::POD_NAME, POD_NAME),
            (labels::POD_NAMESPACE, POD_NS),
            (labels::POD_UID, UID),
            (labels::CONTAINER_NAME, name),
        ];
        let on_container = match flavor {
            Flavor::Cri => {
                l.push((
                    labels::CRI_KIND,
                    if kind == Kind::Sandbox {
                        "sandbox"
                    } else {
                        "container"
                    },
                ));
                l
            }
            Flavor::Docker(root) => {
                l.push((
                    labels::DOCKER_TYPE,
                    if kind == Kind::Sandbox {
                        "podsandbox"
                    } else {
                        "container"
                    },
                ));
                let file = labels::docker_config_path(root, id);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                let map: serde_json::Map<String, Value> = l
                    .iter()
                    .map(|(k, v)| (k.to_string(), (*v).into()))
                    .collect();
                std::fs::write(
                    &file,
                    serde_json::json!({"ID": id, "Config": {"Labels": map}}).to_string(),
                )
                .unwrap();
                vec![]
            }
        };
        ctrd.run(
            flavor.namespace(),
            id,
            &self.pod.join(id),
            0,
            &on_container,
            cmd,
        );
    }

    /// The pod's sandbox (a process named `pause`) and a sibling; returns their ids.
    fn sandbox_and_sibling(&self, flavor: Flavor) -> (String, String) {
        let (sandbox, side) = (container_id(), container_id());
        self.ctrd().install(&sandbox, &fixture::memhog(), "pause");
        self.container(
            flavor,
            &sandbox,
            Kind::Sandbox,
            "POD",
            &["/bin/pause", "--total", "0", "--hold", "100000"],
        );
        self.container(
            flavor,
            &side,
            Kind::Container,
            "side",
            &["/bin/sleep", "100000"],
        );
        // Setup, not behaviour: containerd and runc start slowly on a loaded machine.
        let up = wait_for(Duration::from_secs(60), || {
            (self.procs(&sandbox) == 1 && self.procs(&side) == 1).then_some(())
        });
        assert!(up.is_some(), "the sandbox and the sibling did not start");
        (sandbox, side)
    }

    /// An app container running `cmd` with `oomguard-memhog` in its rootfs.
    fn app(&self, flavor: Flavor, cmd: &[&str]) -> String {
        let id = container_id();
        self.ctrd()
            .install(&id, &fixture::memhog(), "oomguard-memhog");
        self.container(flavor, &id, Kind::Container, "app", cmd);
        id
    }

    fn procs(&self, id: &str) -> usize {
        self.cg(id).procs().map(|p| p.len()).unwrap_or(0)
    }

    fn oom_kills(&self) -> u64 {
        MemCgroup::new(&self.pod).subtree_oom_kills()
    }

    /// Waits until the stored events satisfy `pred`.
    fn wait_events(&self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        wait_for(Duration::from_secs(10), || {
            let evs = self.api.events();
            pred(&evs).then_some(evs)
        })
        .unwrap_or_else(|| {
            panic!(
                "the events never matched; stored: {:#?}; requests: {:#?}",
                self.api.events(),
                self.api.requests()
            )
        })
    }
}

/// The app allocating anonymous memory at `rate` until the pod's limit stops it.
fn hog_cmd(rate: &str) -> Vec<String> {
    [
        "/bin/oomguard-memhog",
        "--rate",
        rate,
        "--total",
        "512M",
        "--hold",
        "3600",
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The `container` object of a decision record (logged as a JSON string).
fn container_of(d: &Value) -> Value {
    d["container"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

/// Waits for the kill decision about container `id`; any other kill or a failed kill first
/// is a failure.
fn wait_kill(agent: &Agent, id: &str) -> Value {
    let d = agent.wait_for(DECISION_WAIT, |v| {
        v["message"] == "decision" && (v["action"] == "kill" || v["action"] == "kill-failed")
    });
    let d = d.unwrap_or_else(|| {
        panic!(
            "no kill decision within {DECISION_WAIT:?}; the agent's log: {:#?}",
            agent.records()
        )
    });
    assert_eq!(d["action"], "kill", "{d:#}");
    assert_eq!(container_of(&d)["id"], id, "{d:#}");
    d
}

/// (wake-up → kill request, kill request → last process gone), in microseconds.
fn timings(d: &Value) -> (u64, u64) {
    let wake = d["wake_to_kill_us"].as_u64().expect("wake_to_kill_us");
    let gone = container_of(d)["gone_us"]
        .as_u64()
        .expect("container.gone_us");
    (wake, gone)
}

fn kubectl_events(w: &World) -> Value {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(w.kubeconfig())
        .arg("--cache-dir")
        .arg(w.dir.path().join("kubectl-cache"))
        .args(["get", "events", "-A", "-o", "json"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The Event for a container kill through the pod: Warning, about the Pod's container.
fn assert_pod_event(ev: &Value, container: &str) {
    assert_eq!(ev["type"], "Warning", "{ev:#}");
    assert_eq!(ev["reason"], "OomGuardKillContainer", "{ev:#}");
    assert_eq!(ev["metadata"]["namespace"], POD_NS);
    let obj = &ev["involvedObject"];
    assert_eq!(obj["kind"], "Pod", "{ev:#}");
    assert_eq!(obj["apiVersion"], "v1");
    assert_eq!(obj["namespace"], POD_NS);
    assert_eq!(obj["name"], POD_NAME);
    assert_eq!(obj["uid"], UID);
    assert_eq!(obj["fieldPath"], format!("spec.containers{{{container}}}"));
    assert_eq!(ev["source"]["component"], "oom-guard");
    assert_eq!(ev["source"]["host"], NODE);
}

#[test]
fn cri_pod_the_app_is_killed_through_containerd_before_the_kernel_and_reported() {
    let _g = fixture::serial();
    if !ready(true) {
        return;
    }
    let w = World::new("cp-cri", true);
    let flavor = Flavor::Cri;
    let ns = flavor.namespace();
    let (sandbox, side) = w.sandbox_and_sibling(flavor);
    let missing = w.dir.path().join("no-docker.sock").display().to_string();
    let sock = w.ctrd().socket.display().to_string();
    let metrics = fixture::free_port();
    let metrics_flag = metrics.to_string();
    let mut agent = w.start_agent(&[
        "--policy",
        "container",
        "--containerd-sock",
        &sock,
        "--docker-containerd-sock",
        &missing,
        "--metrics-addr",
        &metrics_flag,
    ]);

    // Made after the pod was armed: the agent learns its labels when its cgroup appears,
    // so the kill does not wait for a lookup (checked in /metrics below).
    let app = w.app(flavor, &strs(&hog_cmd("64M")));
    let d = wait_kill(&agent, &app);
    let c = container_of(&d);
    assert_eq!(c["via"], "containerd", "{d:#}");
    assert_eq!(c["namespace"], ns);
    assert!(c["error"].is_null(), "{d:#}");
    assert_eq!(d["policy"], "container");
    assert_eq!(d["pod"], format!("{POD_NS}/{POD_NAME}"));
    assert_eq!(d["oomcgroup"], w.pod.display().to_string());
    assert_eq!(d["proccgroup"], w.pod.join(&app).display().to_string());
    let (wake, gone) = timings(&d);
    eprintln!(
        "containerd: wake-up -> kill request {wake} us, kill request -> last process gone {gone} us, \
         total {} us (usage {} of limit {}, peak {})",
        wake + gone,
        d["usage"],
        POD_LIMIT,
        MemCgroup::new(&w.pod).max_usage().unwrap()
    );

    // The app's task is stopped; the sandbox and the sibling run on; the kernel did nothing.
    assert_eq!(w.procs(&app), 0);
    let stopped = wait_for(Duration::from_secs(5), || {
        (w.ctrd().task_status(ns, &app).as_deref() == Some("STOPPED")).then_some(())
    });
    assert!(stopped.is_some(), "containerd does not see the app stopped");
    assert_eq!(
        w.ctrd().task_status(ns, &sandbox).as_deref(),
        Some("RUNNING")
    );
    assert_eq!(w.ctrd().task_status(ns, &side).as_deref(), Some("RUNNING"));
    assert_eq!((w.procs(&sandbox), w.procs(&side)), (1, 1));
    assert_eq!(w.oom_kills(), 0, "the kernel OOM killer acted");
    assert!(agent.running());

    let evs = w.wait_events(|e| e.len() == 1);
    let ev = &evs[0];
    assert_pod_event(ev, "app");
    assert_eq!(ev["count"], 1);
    let name = ev["metadata"]["name"].as_str().unwrap().to_string();
    let msg: Value = serde_json::from_str(ev["message"].as_str().unwrap()).unwrap();
    assert_eq!(msg["container"]["via"], "containerd");
    assert_eq!(msg["container"]["id"], app.as_str());
    assert_eq!(msg["oomcgroup"], d["oomcgroup"]);

    // kubelet restarts the container (same pod, same name, new id); it outgrows the pod
    // again, and the Event's count goes to 2 through a PATCH.
    let app2 = w.app(flavor, &strs(&hog_cmd("64M")));
    let d2 = wait_kill(&agent, &app2);
    assert_eq!(container_of(&d2)["via"], "containerd", "{d2:#}");
    let (wake2, gone2) = timings(&d2);
    eprintln!(
        "containerd (2nd kill): wake-up -> kill request {wake2} us, kill request -> last process gone {gone2} us, total {} us",
        wake2 + gone2
    );
    assert_eq!(w.procs(&app2), 0);
    assert_eq!((w.procs(&sandbox), w.procs(&side)), (1, 1));
    assert_eq!(w.oom_kills(), 0, "the kernel OOM killer acted");

    let evs = w.wait_events(|e| e.len() == 1 && e[0]["count"] == 2);
    assert_pod_event(&evs[0], "app");
    assert_eq!(evs[0]["metadata"]["name"], name.as_str());
    let writes: Vec<(String, u16, String)> = w
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.status, r.path))
        .collect();
    let path = format!("/api/v1/namespaces/{POD_NS}/events");
    assert_eq!(
        writes,
        [
            ("POST".to_string(), 201, path.clone()),
            ("PATCH".to_string(), 200, format!("{path}/{name}")),
        ]
    );

    let list = kubectl_events(&w);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list:#}");
    assert_pod_event(&items[0], "app");
    assert_eq!(items[0]["count"], 2);

    // One kill per episode, nothing failed.
    assert_eq!(agent.decisions("kill").len(), 2, "{:#?}", agent.records());
    assert!(agent.decisions("kill-failed").is_empty());

    // Both apps were prefetched at mkdir: no kill waited for a lookup; the endpoint is
    // healthy and no call failed.
    let (status, text) = fixture::get(metrics, "/metrics");
    assert_eq!(status, 200);
    let v = |series: &str| fixture::value(&text, series);
    assert_eq!(
        v("oomguard_runtime_uncached_lookups_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        v("oomguard_runtime_call_timeouts_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(v("oomguard_runtime_unreachable_total"), Some(0.0), "{text}");
    assert_eq!(
        v(&format!(
            "oomguard_runtime_endpoint_healthy{{socket=\"{sock}\",namespace=\"k8s.io\"}}"
        )),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn a_hung_runtime_the_fallback_kills_the_app_before_the_kernel() {
    let _g = fixture::serial();
    if !ready(true) {
        return;
    }
    let w = World::new("cp-hung", true);
    let flavor = Flavor::Cri;
    let ns = flavor.namespace();
    let (sandbox, side) = w.sandbox_and_sibling(flavor);
    let hung = fixture::hung_socket(&w.dir.path().join("hung.sock"));
    let hung_path = hung.path.display().to_string();
    let missing = w.dir.path().join("no-docker.sock").display().to_string();
    let agent = w.start_agent(&[
        "--policy",
        "container",
        "--containerd-sock",
        &hung_path,
        "--docker-containerd-sock",
        &missing,
    ]);

    // The hung runtime costs the agent its 1 s call timeout before the fallback: the app
    // allocates fast to 160 MiB, then at 12 MiB/s, which leaves 25.6 MiB / 12 MiB/s = 2.1 s
    // between the kill threshold and the limit.
    let script = "oomguard-memhog --rate 200M --total 160M --hold 3600 & sleep 2; \
                  exec oomguard-memhog --rate 12M --total 512M --hold 3600";
    let app = w.app(flavor, &["/bin/sh", "-c", script]);
    let d = wait_kill(&agent, &app);
    let c = container_of(&d);
    assert_eq!(c["via"], "fallback", "{d:#}");
    assert!(c["error"].as_str().is_some_and(|e| !e.is_empty()), "{d:#}");
    assert_eq!(d["proccgroup"], w.pod.join(&app).display().to_string());
    let (wake, gone) = timings(&d);
    eprintln!(
        "fallback (runtime hung): wake-up -> kill {wake} us, kill -> last process gone {gone} us, total {} us; error: {}",
        wake + gone,
        c["error"]
    );
    // The bound: the 1 s runtime call timeout, plus scheduling slack; then the direct kill.
    assert!(wake < 1_500_000, "wake-up to kill {wake} us");
    assert!(gone < 500_000, "kill to last process gone {gone} us");

    assert_eq!(w.procs(&app), 0);
    assert_eq!((w.procs(&sandbox), w.procs(&side)), (1, 1));
    assert_eq!(
        w.ctrd().task_status(ns, &sandbox).as_deref(),
        Some("RUNNING")
    );
    assert_eq!(w.oom_kills(), 0, "the kernel OOM killer acted");

    // The Event says so too (no pod is known without the runtime: it is about the node).
    let evs = w.wait_events(|e| e.len() == 1);
    let ev = &evs[0];
    assert_eq!(ev["reason"], "OomGuardKillContainer", "{ev:#}");
    assert_eq!(ev["type"], "Warning");
    let msg: Value = serde_json::from_str(ev["message"].as_str().unwrap()).unwrap();
    assert_eq!(msg["container"]["via"], "fallback", "{msg:#}");
    assert_eq!(msg["container"]["id"], app.as_str());
    eprintln!("fallback event: involvedObject {}", ev["involvedObject"]);
    drop(agent);
    drop(hung);
}

#[test]
fn docker_pod_the_app_is_killed_through_docker_containerd_and_the_sandbox_lives() {
    let _g = fixture::serial();
    if !ready(true) {
        return;
    }
    let w = World::new("cp-moby", true);
    let docker_root = w.dir.path().join("docker");
    let flavor = Flavor::Docker(&docker_root);
    let ns = flavor.namespace();
    let (sandbox, side) = w.sandbox_and_sibling(flavor);
    let sock = w.ctrd().socket.display().to_string();
    let missing = w
        .dir
        .path()
        .join("no-containerd.sock")
        .display()
        .to_string();
    let root = docker_root.display().to_string();
    let agent = w.start_agent(&[
        "--policy",
        "container",
        "--docker-containerd-sock",
        &sock,
        "--containerd-sock",
        &missing,
        "--docker-root",
        &root,
    ]);

    let app = w.app(flavor, &strs(&hog_cmd("64M")));
    let d = wait_kill(&agent, &app);
    let c = container_of(&d);
    assert_eq!(c["via"], "containerd", "{d:#}");
    assert_eq!(c["namespace"], ns);
    assert_eq!(d["pod"], format!("{POD_NS}/{POD_NAME}"));
    let (wake, gone) = timings(&d);
    eprintln!(
        "containerd (moby): wake-up -> kill request {wake} us, kill request -> last process gone {gone} us, total {} us",
        wake + gone
    );

    assert_eq!(w.procs(&app), 0);
    let stopped = wait_for(Duration::from_secs(5), || {
        (w.ctrd().task_status(ns, &app).as_deref() == Some("STOPPED")).then_some(())
    });
    assert!(stopped.is_some(), "containerd does not see the app stopped");
    assert_eq!(
        w.ctrd().task_status(ns, &sandbox).as_deref(),
        Some("RUNNING")
    );
    assert_eq!(w.ctrd().task_status(ns, &side).as_deref(), Some("RUNNING"));
    assert_eq!(w.oom_kills(), 0, "the kernel OOM killer acted");

    let evs = w.wait_events(|e| e.len() == 1);
    assert_pod_event(&evs[0], "app");
}

#[test]
fn noop_a_kernel_oom_in_a_pod_is_reported_as_cgroup_oom() {
    let _g = fixture::serial();
    if !ready(false) {
        return;
    }
    let w = World::new("cp-noop", false);
    let id = container_id();
    std::fs::create_dir(w.pod.join(&id)).unwrap();
    let agent = w.start_agent(&["--policy", "noop"]);
    let mut hog = fixture::hog(&w.cg(&id), &["--rate", "0", "--total", "512M"]);
    let st = fixture::wait_exit(&mut hog, Duration::from_secs(20));
    if st.is_none() {
        let _ = hog.kill();
        let _ = hog.wait();
    }
    assert!(
        fixture::killed_by_sigkill(st),
        "the hog was not OOM-killed: {st:?}"
    );
    assert!(w.oom_kills() >= 1, "the kernel did not count a kill");

    let d = fixture::expect_decision(&agent, "kernel-oom", Duration::from_secs(10));
    assert_eq!(d["oomcgroup"], w.pod.display().to_string());
    assert_eq!(d["policy"], "noop");

    let evs = w.wait_events(|e| e.iter().any(|e| e["reason"] == "CgroupOOM"));
    let ev = evs.iter().find(|e| e["reason"] == "CgroupOOM").unwrap();
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["source"]["component"], "oom-guard");
    assert_eq!(ev["source"]["host"], NODE);
    let msg: Value = serde_json::from_str(ev["message"].as_str().unwrap()).unwrap();
    assert_eq!(msg["oomcgroup"], d["oomcgroup"]);
    assert_eq!(msg["action"], "kernel-oom");
    eprintln!(
        "CgroupOOM event: involvedObject {}, {} event(s) in all",
        ev["involvedObject"],
        evs.len()
    );
}
