//! Faults in the world outside the agent (issue 7): containerd absent, refusing or hung,
//! and the API server down, slow, refusing (403) or failing (500). In each case the agent
//! keeps guarding, kills before the kernel, and says what happened once, not in a loop.
//!
//! - containerd (`--policy container`, pods laid out like kubelet's cgroupfs driver, no
//!   runtime behind their containers): the first kill finds the runtime faulty (a hung
//!   socket costs it the 250 ms plan budget), the kill in a second pod does not wait on it
//!   at all, both go through the direct fallback, and the endpoint's WARN is logged once.
//! - An endpoint marked unhealthy is probed in the background and comes back when a real
//!   containerd answers on its socket.
//! - The API server (the loopback stand-in with its fault modes): kills go on while it is
//!   down, slow, 403 or 500; the outage or the RBAC refusal is logged once; the Event
//!   arrives once it heals. The sink itself: a create whose answer is late is not made
//!   twice, 500s are retried with a growing back-off, 403s are dropped and counted, and
//!   the queue stays bounded with every request accounted for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fixture::M;
use fixture::apiserver::{FakeApiServer, Fault};
use fixture::containerd::container_id;
use fixture::{TempDir, message, wait_for};
use oomguard::cgroup::MemCgroup;
use oomguard::events::{EventRequest, Reason};
use oomguard::runtime::{
    Backoff, Endpoint, RuntimeClient, RuntimeConfig, RuntimeError, RuntimeHint,
};
use oomguard_dev::sandbox::{Agent, Sandbox};
use serde_json::Value;

const NODE: &str = "fault-node";
const POD_LIMIT: u64 = 256 * M;
/// Long enough for any allocation below to reach its pod's kill threshold.
const DECISION_WAIT: Duration = Duration::from_secs(30);
/// Long enough for the sink's back-off (250 ms doubling) to try again after a heal.
const EVENT_WAIT: Duration = Duration::from_secs(20);

const ENDPOINT_UNHEALTHY: &str = "containerd endpoint unhealthy: not asked until a background probe gets an answer; container kills go straight to the direct fallback";
const NO_RUNTIME: &str = "no containerd socket is present: containers are killed by killing their cgroup's tasks directly";
const API_FAILING: &str = "cannot post events: retrying with back-off until the API server answers (kills do not wait on it)";
const API_FORBIDDEN: &str = "the API server forbids posting events: the ClusterRole system:oomguard must allow create, patch and update on events in the core group; events are dropped until it does";
const API_BACK: &str = "the API server takes events again";

/// Waits until the agent has logged `message` (consumed or not by `wait_for`).
fn logged(agent: &Agent, m: &str) -> bool {
    wait_for(Duration::from_secs(10), || {
        (agent.count(message(m)) > 0).then_some(())
    })
    .is_some()
}

/// Nothing logged at ERROR (kube's HTTP layer would log every failed attempt so).
fn assert_no_errors(agent: &Agent) {
    let errors: Vec<Value> = agent
        .records()
        .into_iter()
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

/// The `container` object of a decision record (logged as a JSON string).
fn container_of(d: &Value) -> Value {
    d["container"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

/// Waits for the next kill decision; a failed kill first is a failure.
fn wait_kill(agent: &Agent) -> Value {
    let d = agent
        .wait_for(DECISION_WAIT, |v| {
            v["message"] == "decision" && (v["action"] == "kill" || v["action"] == "kill-failed")
        })
        .unwrap_or_else(|| {
            panic!(
                "no kill decision within {DECISION_WAIT:?}; the agent's log: {:#?}",
                agent.records()
            )
        });
    assert_eq!(d["action"], "kill", "{d:#}");
    d
}

fn reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    let st = fixture::wait_exit(child, Duration::from_secs(5));
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    st
}

// ---------------------------------------------------------------------------------------
// containerd absent, refusing, hung

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuntimeFault {
    /// Neither socket exists.
    Absent,
    /// The socket file is there, nobody listens: connect is refused.
    Refusing,
    /// Accepts connections and never answers.
    Hung,
}

/// Two pods (`kubepods/burstable/pod<uid>`, 256 MiB each) with one container cgroup each,
/// beneath the test's own memory cgroup. Fields drop in order: agent and runtime stand-in
/// first, the API server, the directory, the cgroups last.
struct Pods {
    api: FakeApiServer,
    dir: TempDir,
    kubepods: PathBuf,
    pods: [PathBuf; 2],
    apps: [MemCgroup; 2],
    _sb: Sandbox,
}

impl Pods {
    fn new(name: &str) -> Pods {
        let sb = Sandbox::new(name).expect("sandbox cgroup");
        let kubepods = sb.path().join("kubepods");
        let mk = |uid: &str| {
            let pod = kubepods.join("burstable").join(format!("pod{uid}"));
            let app = pod.join(container_id());
            std::fs::create_dir_all(&app).unwrap();
            MemCgroup::new(&pod).set_limit(POD_LIMIT).unwrap();
            (pod, MemCgroup::new(app))
        };
        let (pod_a, app_a) = mk("0d6c6a8e-1f0e-4c55-9a3e-6b8f2b1d7c01");
        let (pod_b, app_b) = mk("0d6c6a8e-1f0e-4c55-9a3e-6b8f2b1d7c02");
        let dir = TempDir::new(name);
        let api = FakeApiServer::start();
        api.write_kubeconfig(&dir.path().join("kubeconfig"));
        Pods {
            api,
            dir,
            kubepods,
            pods: [pod_a, pod_b],
            apps: [app_a, app_b],
            _sb: sb,
        }
    }

    /// Starts the agent (container policy, 10% margin) on `kubepods` and waits until both
    /// pods are armed.
    fn start_agent(&self, docker_sock: &Path, containerd_sock: &Path) -> Agent {
        let (d, c) = (
            docker_sock.display().to_string(),
            containerd_sock.display().to_string(),
        );
        let args = [
            "--policy",
            "container",
            "--margin-ratio",
            "0.1",
            "--docker-containerd-sock",
            d.as_str(),
            "--containerd-sock",
            c.as_str(),
        ];
        let [a, b] = &self.pods;
        fixture::launch(&self.kubepods)
            .args(&args)
            .kube(&self.dir.path().join("kubeconfig"), NODE)
            .armed(&[a, b])
            .start()
    }
}

fn runtime_fault(fault: RuntimeFault) {
    let _g = fixture::serial();
    if !fixture::kernel_ready() {
        return;
    }
    let name = format!("fo-{fault:?}").to_lowercase();
    let w = Pods::new(&name);
    let sock = w.dir.path().join("containerd.sock");
    let docker = w.dir.path().join("docker-containerd.sock");
    let hung = match fault {
        RuntimeFault::Absent => None,
        RuntimeFault::Refusing => {
            fixture::stale_socket(&sock);
            None
        }
        RuntimeFault::Hung => Some(fixture::hung_socket(&sock)),
    };

    // Pod A's app already sits above its kill threshold (230.4 MiB) when the agent starts:
    // the kill happens as the pod is armed, while nothing is known about the runtime yet.
    let mut first = fixture::hog(
        &w.apps[0],
        &["--rate", "0", "--total", "240M", "--hold", "3600"],
    );
    fixture::wait_rss(&first, 240 * M, Duration::from_secs(10));
    let started = Instant::now();
    let agent = w.start_agent(&docker, &sock);
    let d1 = wait_kill(&agent);
    assert!(fixture::killed_by_sigkill(reap(&mut first)));

    // Pod B's app grows through its threshold towards its limit at 64 MiB/s.
    let mut second = fixture::hog(
        &w.apps[1],
        &["--rate", "64M", "--total", "512M", "--hold", "3600"],
    );
    let d2 = wait_kill(&agent);
    assert!(fixture::killed_by_sigkill(reap(&mut second)));

    for (d, pod, app) in [(&d1, &w.pods[0], &w.apps[0]), (&d2, &w.pods[1], &w.apps[1])] {
        let c = container_of(d);
        assert_eq!(d["policy"], "container", "{d:#}");
        assert_eq!(d["oomcgroup"], pod.display().to_string(), "{d:#}");
        assert_eq!(d["proccgroup"], app.path.display().to_string(), "{d:#}");
        assert_eq!(c["via"], "fallback", "{d:#}");
        assert!(c["gone_us"].as_u64().is_some(), "{d:#}");
        assert_eq!(
            MemCgroup::new(pod).subtree_oom_kills(),
            0,
            "the kernel OOM killer acted in {}",
            pod.display()
        );
    }
    let wake = |d: &Value| d["wake_to_kill_us"].as_u64().expect("wake_to_kill_us");
    let (w1, w2) = (wake(&d1), wake(&d2));
    let (e1, e2) = (
        container_of(&d1)["error"].clone(),
        container_of(&d2)["error"].clone(),
    );
    eprintln!(
        "containerd {fault:?}: 1st kill: wake-up -> kill {w1} us, gone {} us, error {e1}; \
         2nd kill: wake-up -> kill {w2} us, gone {} us, error {e2}",
        container_of(&d1)["gone_us"],
        container_of(&d2)["gone_us"],
    );
    // The second kill waits on no runtime at all (it used to pay the 250 ms plan budget
    // again when the runtime hung).
    assert!(w2 < 50_000, "2nd kill: wake-up to kill {w2} us");
    match fault {
        RuntimeFault::Hung => {
            // The first kill paid the plan budget (the runtime's own call gives up 10 ms
            // before it), and no more: the kill RPC was not tried on an unknown container.
            assert!(
                (200_000..1_000_000).contains(&w1),
                "1st kill: wake-up to kill {w1} us"
            );
            assert!(e1.as_str().unwrap().contains("did not answer"), "{e1}");
            assert!(e2.as_str().unwrap().contains("marked unhealthy"), "{e2}");
        }
        RuntimeFault::Refusing => {
            assert!(w1 < 250_000, "1st kill: wake-up to kill {w1} us");
            assert!(e1.as_str().unwrap().contains("cannot reach"), "{e1}");
            assert!(e2.as_str().unwrap().contains("marked unhealthy"), "{e2}");
        }
        RuntimeFault::Absent => {
            assert!(w1 < 250_000, "1st kill: wake-up to kill {w1} us");
            assert!(
                e2.as_str().unwrap().contains("no containerd socket"),
                "{e2}"
            );
        }
    }

    // Calls in flight when the endpoint was marked (the arm-time prefetch, 1 s bound) end
    // by now; their failures must not be reported again.
    let settle = Duration::from_millis(1500).saturating_sub(started.elapsed());
    std::thread::sleep(settle);
    let (warn, other) = match fault {
        RuntimeFault::Absent => (NO_RUNTIME, ENDPOINT_UNHEALTHY),
        _ => (ENDPOINT_UNHEALTHY, NO_RUNTIME),
    };
    let warns: Vec<Value> = agent
        .records()
        .into_iter()
        .filter(|v| v["message"] == warn)
        .collect();
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert_eq!(warns[0]["level"], "WARN");
    if fault != RuntimeFault::Absent {
        assert_eq!(warns[0]["socket"], sock.display().to_string());
        assert_eq!(warns[0]["namespace"], "k8s.io");
    }
    assert_eq!(agent.count(message(other)), 0);
    eprintln!("logged once: {}", warns[0]);

    // Both kills reach the API server as Events (about the node: no labels without the
    // runtime); the agent is still running.
    let evs = wait_for(EVENT_WAIT, || {
        let evs = w.api.events();
        (evs.len() == 1 && evs[0]["count"] == 2).then_some(evs)
    })
    .unwrap_or_else(|| panic!("events: {:#?}", w.api.requests()));
    assert_eq!(evs[0]["reason"], "OomGuardKillContainer");
    let mut agent = agent;
    assert!(agent.running());
    drop(agent);
    drop(hung);
}

#[test]
fn containerd_absent_kills_go_to_the_fallback_and_it_is_said_once() {
    runtime_fault(RuntimeFault::Absent);
}

#[test]
fn containerd_refusing_kills_go_to_the_fallback_and_it_is_said_once() {
    runtime_fault(RuntimeFault::Refusing);
}

#[test]
fn containerd_hung_only_the_first_kill_waits_and_it_is_said_once() {
    runtime_fault(RuntimeFault::Hung);
}

/// An endpoint marked unhealthy is probed after its back-off and is asked again once a
/// real containerd answers on its socket.
#[test]
fn an_unhealthy_endpoint_comes_back_when_containerd_answers() {
    if !fixture::require(fixture::containerd::probe()) {
        return;
    }
    let ctrd = fixture::containerd::Containerd::start("fo-probe");
    let dir = TempDir::new("fo-probe");
    let sock = dir.path().join("containerd.sock");
    fixture::stale_socket(&sock);
    let rt = RuntimeClient::new(RuntimeConfig {
        endpoints: vec![Endpoint::containerd(&sock)],
        docker_root: dir.path().to_path_buf(),
        call_timeout: Duration::from_secs(1),
        unhealthy: Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_millis(400),
        },
    })
    .unwrap();
    let id = container_id();
    let err = rt
        .resolve_blocking(&id, RuntimeHint::Unknown, Duration::from_millis(250))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Unreachable { .. }), "{err:?}");
    let err = rt
        .resolve_blocking(&id, RuntimeHint::Unknown, Duration::from_millis(250))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Unhealthy { .. }), "{err:?}");
    let status = &rt.endpoints()[0];
    assert!(!status.healthy);
    assert!(
        status.why.as_deref().unwrap().contains("cannot reach"),
        "{status:?}"
    );

    // containerd comes back on the same path.
    std::fs::remove_file(&sock).unwrap();
    std::os::unix::fs::symlink(&ctrd.socket, &sock).unwrap();
    let back = wait_for(Duration::from_secs(10), || {
        rt.endpoints()[0].healthy.then_some(())
    });
    assert!(back.is_some(), "not probed back: {:?}", rt.endpoints());
    let probes = rt.stats().probes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(probes >= 1);
    // Asked again: containerd says it does not know the container.
    let err = rt
        .resolve_blocking(&id, RuntimeHint::Unknown, Duration::from_millis(250))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err:?}");
    eprintln!("endpoint back after {probes} probe(s)");
}

// ---------------------------------------------------------------------------------------
// The API server down, slow, 403, 500: the agent

/// One sandbox (256 MiB) guarded with the process policy, Events to the stand-in.
struct Guarded {
    api: FakeApiServer,
    dir: TempDir,
    sb: Sandbox,
}

impl Guarded {
    fn new(name: &str) -> Guarded {
        let sb = fixture::sandbox(name, POD_LIMIT);
        let dir = TempDir::new(name);
        let api = FakeApiServer::start();
        api.write_kubeconfig(&dir.path().join("kubeconfig"));
        Guarded { api, dir, sb }
    }

    fn start_agent(&self) -> Agent {
        let missing = self.dir.path().join("none.sock").display().to_string();
        fixture::launch(&self.sb.cg.path)
            .args(fixture::WINNABLE)
            .kube(&self.dir.path().join("kubeconfig"), NODE)
            .args(&[
                "--docker-containerd-sock",
                &missing,
                "--containerd-sock",
                &missing,
            ])
            .start()
    }

    /// Runs a hog through the threshold at `rate` and returns the agent's kill decision.
    fn kill_once(&self, agent: &Agent, rate: &str) -> Value {
        let mut hog = fixture::hog(&self.sb.cg, &["--rate", rate, "--total", "512M"]);
        let d = wait_kill(agent);
        assert!(fixture::killed_by_sigkill(reap(&mut hog)), "{d:#}");
        assert_eq!(
            self.sb.cg.subtree_oom_kills(),
            0,
            "the kernel OOM killer acted"
        );
        let k = fixture::killed(&d);
        assert_eq!(k[0]["pid"].as_u64(), Some(u64::from(hog.id())), "{d:#}");
        d
    }

    /// Event writes the server saw: (method, status).
    fn writes(&self) -> Vec<(String, u16)> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .map(|r| (r.method, r.status))
            .collect()
    }

    fn wait_events(&self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        wait_for(EVENT_WAIT, || {
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

    fn kubectl_events(&self) -> Value {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
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
}

fn api_ready() -> bool {
    if !fixture::kernel_ready() {
        return false;
    }
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    fixture::require((!kubectl).then(|| "kubectl is not installed".into()))
}

#[test]
fn api_server_down_kills_go_on_and_the_events_arrive_when_it_is_back() {
    let _g = fixture::serial();
    if !api_ready() {
        return;
    }
    let mut g = Guarded::new("fo-api-down");
    g.api.stop();
    let mut agent = g.start_agent();
    let d1 = g.kill_once(&agent, "64M");
    let d2 = g.kill_once(&agent, "64M");
    assert!(
        logged(&agent, API_FAILING),
        "the outage was not reported: {:#?}",
        agent.records()
    );
    // The sink keeps trying (250 ms, 500 ms, 1 s, ...) for 2 s more: still said once.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.count(message(API_FAILING)), 1);
    assert_no_errors(&agent);
    assert!(agent.running());

    let back = Instant::now();
    g.api.start_again();
    let evs = g.wait_events(|e| e.len() == 1 && e[0]["count"] == 2);
    eprintln!(
        "API server down: kills at wake-to-kill {} us and {} us; both Events in {:?} after it came back",
        d1["wake_to_kill_us"],
        d2["wake_to_kill_us"],
        back.elapsed()
    );
    assert_eq!(evs[0]["reason"], "OomGuardKillProcess");
    assert_eq!(evs[0]["involvedObject"]["name"], NODE);
    assert_eq!(g.writes(), [("POST".into(), 201), ("PATCH".into(), 200)]);
    assert!(logged(&agent, API_BACK), "{:#?}", agent.records());
    assert_eq!(agent.count(message(API_BACK)), 1);
    let list = g.kubectl_events();
    assert_eq!(list["items"][0]["count"], 2, "{list:#}");
    assert!(agent.running());
}

#[test]
fn api_server_500_kills_go_on_and_the_event_arrives_after_it_heals() {
    let _g = fixture::serial();
    if !api_ready() {
        return;
    }
    let g = Guarded::new("fo-api-500");
    g.api.set_fault(Fault::Internal);
    let mut agent = g.start_agent();
    g.kill_once(&agent, "64M");
    // Retried with back-off: at least three 500s, then said once.
    let tried = wait_for(Duration::from_secs(10), || {
        (g.writes().len() >= 3).then_some(())
    });
    assert!(tried.is_some(), "{:#?}", g.api.requests());
    assert!(g.writes().iter().all(|w| *w == ("POST".to_string(), 500)));
    assert_eq!(
        agent.count(message(API_FAILING)),
        1,
        "{:#?}",
        agent.records()
    );
    assert_no_errors(&agent);
    assert!(agent.running());

    g.api.set_fault(Fault::None);
    let evs = g.wait_events(|e| e.len() == 1);
    assert_eq!(evs[0]["reason"], "OomGuardKillProcess");
    assert_eq!(evs[0]["count"], 1);
    assert_eq!(g.writes().last(), Some(&("POST".to_string(), 201)));
    let attempts = g.writes().len();
    assert!(logged(&agent, API_BACK));
    eprintln!("API server 500: the Event arrived on attempt {attempts}");
    assert_eq!(agent.count(message(API_FAILING)), 1);
    assert!(agent.running());
}

#[test]
fn api_server_403_is_said_once_kills_go_on_and_events_flow_once_allowed() {
    let _g = fixture::serial();
    if !api_ready() {
        return;
    }
    let g = Guarded::new("fo-api-403");
    g.api.set_fault(Fault::Forbidden);
    let mut agent = g.start_agent();
    g.kill_once(&agent, "64M");
    g.kill_once(&agent, "64M");
    // Both Events were tried (and refused), the second after the back-off.
    let tried = wait_for(Duration::from_secs(10), || {
        (g.writes().len() >= 2).then_some(())
    });
    assert!(tried.is_some(), "{:#?}", g.api.requests());
    assert_eq!(
        g.writes(),
        [("POST".to_string(), 403), ("POST".to_string(), 403)]
    );
    let warns: Vec<Value> = agent
        .records()
        .into_iter()
        .filter(|v| v["message"] == API_FORBIDDEN)
        .collect();
    assert_eq!(warns.len(), 1, "{:#?}", agent.records());
    let w = &warns[0];
    assert_eq!(w["level"], "WARN");
    assert_eq!(w["verb"], "create");
    assert_eq!(w["resource"], "events");
    assert_eq!(w["namespace"], "default");
    assert_eq!(w["code"], 403);
    assert!(
        w["error"]
            .as_str()
            .unwrap()
            .contains("cannot create resource"),
        "{w}"
    );
    eprintln!("403 said once: {w}");
    assert_eq!(
        agent.count(message(API_FAILING)),
        0,
        "a 403 is not an outage"
    );
    assert!(agent.running());

    // RBAC fixed: the next kill's Event goes through (the refused ones were dropped).
    g.api.set_fault(Fault::None);
    g.kill_once(&agent, "64M");
    let evs = g.wait_events(|e| e.len() == 1);
    assert_eq!(evs[0]["count"], 1);
    assert!(logged(&agent, API_BACK));
    assert_eq!(agent.count(message(API_FORBIDDEN)), 1);
    assert!(agent.running());
}

/// How late the slow server answers: within the sink's 10 s request bound.
const SLOW: Duration = Duration::from_secs(8);

#[test]
fn api_server_slow_kills_do_not_wait_and_the_events_arrive_once() {
    let _g = fixture::serial();
    if !api_ready() {
        return;
    }
    let g = Guarded::new("fo-api-slow");
    g.api.set_fault(Fault::Slow(SLOW));
    let mut agent = g.start_agent();
    let d1 = g.kill_once(&agent, "200M");
    // The first Event's create is still waiting for its answer: the next kill happens
    // regardless.
    let posted = wait_for(Duration::from_secs(5), || {
        (!g.writes().is_empty()).then_some(Instant::now())
    })
    .expect("the first create");
    let d2 = g.kill_once(&agent, "200M");
    let during = posted.elapsed();
    eprintln!(
        "API server slow ({SLOW:?}): 2nd kill {during:?} after the 1st create was sent; wake-to-kill {} us and {} us",
        d1["wake_to_kill_us"], d2["wake_to_kill_us"]
    );
    // 230 MiB at 200 MiB/s takes about 1.2 s: well before the create's answer.
    assert!(during < SLOW, "{during:?}");
    let evs = g.wait_events(|e| e.len() == 1 && e[0]["count"] == 2);
    assert_eq!(evs[0]["reason"], "OomGuardKillProcess");
    // Answers within the sink's 10 s request bound: no retry, no duplicate, nothing to say.
    assert_eq!(g.writes(), [("POST".into(), 201), ("PATCH".into(), 200)]);
    g.api.set_fault(Fault::None);
    assert_eq!(g.kubectl_events()["items"].as_array().unwrap().len(), 1);
    assert_eq!(agent.count(message(API_FAILING)), 0);
    assert!(agent.running());
}

// ---------------------------------------------------------------------------------------
// The API server's faults: the sink on its own

fn sink(capacity: usize, request_timeout: Duration) -> fixture::SinkRig {
    fixture::sink_rig("fo-sink", |opts| {
        opts.capacity = capacity;
        opts.initial_backoff = Duration::from_millis(50);
        opts.max_backoff = Duration::from_millis(400);
        opts.request_timeout = request_timeout;
    })
}

fn node_event(n: u32) -> EventRequest {
    let mut ev = EventRequest::from_decision(
        &fixture::decision("/x"),
        Reason::KillProcess,
        None,
        "node-1",
    );
    ev.message = format!("{{\"n\":{n}}}");
    ev
}

fn posts(s: &fixture::SinkRig) -> Vec<u16> {
    s.server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.status)
        .collect()
}

#[test]
fn a_create_whose_answer_is_late_is_retried_under_its_name_and_not_duplicated() {
    let s = sink(8, Duration::from_millis(300));
    s.server.set_fault(Fault::Slow(Duration::from_secs(1)));
    s.sink.submit(node_event(1));
    // The server did the work at once and answers after 1 s; the sink gave up at 300 ms.
    let stored = wait_for(Duration::from_secs(5), || {
        (s.server.events().len() == 1).then_some(())
    });
    assert!(stored.is_some());
    s.server.set_fault(Fault::None);
    let done = wait_for(Duration::from_secs(10), || {
        (s.sink.snapshot().created == 1).then_some(())
    });
    assert!(
        done.is_some(),
        "{:?} {:#?}",
        s.sink.snapshot(),
        s.server.requests()
    );
    let p = posts(&s);
    assert_eq!(p[0], 201);
    assert!(p.len() >= 2 && p[1..].iter().all(|c| *c == 409), "{p:?}");
    assert_eq!(s.server.events().len(), 1, "a duplicate was made");
    let names: Vec<String> = s
        .server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["metadata"]["name"].to_string())
        .collect();
    assert!(names.iter().all(|n| *n == names[0]), "{names:?}");
    let snap = s.sink.snapshot();
    assert!(snap.retries >= 1, "{snap:?}");
    // The series is known: a repeat patches the same event.
    s.sink.submit(node_event(2));
    let evs = wait_for(Duration::from_secs(5), || {
        let e = s.server.events();
        (e.len() == 1 && e[0]["count"] == 2).then_some(e)
    });
    assert!(evs.is_some(), "{:#?}", s.server.requests());
    eprintln!(
        "late answer: POSTs {p:?}, then a PATCH; {:?}",
        s.sink.snapshot()
    );
}

#[test]
fn a_500_is_retried_with_a_growing_backoff_and_delivered_once_healed() {
    let s = sink(8, Duration::from_secs(5));
    s.server.set_fault(Fault::Internal);
    s.sink.submit(node_event(1));
    let tried = wait_for(Duration::from_secs(10), || {
        (posts(&s).len() >= 4).then_some(())
    });
    assert!(tried.is_some());
    s.server.set_fault(Fault::None);
    let reqs: Vec<_> = s
        .server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    // The back-off: at least 50, 100, 200 ms between attempts (the lower bounds are sure,
    // a sleep never ends early).
    let gaps: Vec<Duration> = reqs.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (gap, min) in gaps.iter().zip([50u64, 100, 200]) {
        assert!(*gap >= Duration::from_millis(min), "{gaps:?}");
    }
    let delivered = wait_for(Duration::from_secs(5), || {
        (s.sink.snapshot().created == 1).then_some(())
    });
    assert!(delivered.is_some(), "{:?}", s.sink.snapshot());
    assert_eq!(s.server.events().len(), 1);
    let snap = s.sink.snapshot();
    assert!(snap.retries >= 4, "{snap:?}");
    assert_eq!((snap.queued, snap.rejected, snap.dropped), (0, 0, 0));
    eprintln!("500: attempts {gaps:?} apart; {snap:?}");
}

#[test]
fn forbidden_events_are_dropped_and_counted_and_the_queue_stays_bounded() {
    let s = sink(4, Duration::from_secs(5));
    s.server.set_fault(Fault::Forbidden);
    let t = Instant::now();
    for n in 0..12 {
        s.sink.submit(node_event(n));
        assert!(s.sink.queued() <= 4);
    }
    // Submitting never waits for the API server (a 5 s request timeout here): 12 submits
    // that waited for it would take seconds; 2 s is slack for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Every request is accounted for: refused, dropped for room, or still queued; the
    // refused ones were each sent once, no more.
    let settled = wait_for(Duration::from_secs(20), || {
        let c = s.sink.snapshot();
        (c.queued == 0).then_some(c)
    })
    .unwrap_or_else(|| panic!("{:?}", s.sink.snapshot()));
    assert_eq!(settled.forbidden + settled.dropped, 12, "{settled:?}");
    assert_eq!(settled.rejected, settled.forbidden);
    assert!(
        settled.dropped >= 1 && settled.forbidden >= 1,
        "{settled:?}"
    );
    assert_eq!(settled.sent(), 0);
    let p = posts(&s);
    assert_eq!(p.len() as u64, settled.forbidden, "{p:?}");
    assert!(p.iter().all(|c| *c == 403));
    // Allowed again: the next one goes through.
    s.server.set_fault(Fault::None);
    s.sink.submit(node_event(99));
    let sent = wait_for(Duration::from_secs(5), || {
        (s.sink.snapshot().created == 1).then_some(())
    });
    assert!(sent.is_some(), "{:?}", s.sink.snapshot());
    eprintln!("403: {:?}", s.sink.snapshot());
}
