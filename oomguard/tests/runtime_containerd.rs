//! The container policy's runtime side against a real containerd: a pod laid out like
//! kubelet's cgroupfs driver beneath the test's own memory cgroup, with a sandbox container,
//! an app container and a sibling; labels resolve, the sandbox is never chosen, and the
//! kill stops the app container while the sandbox and the sibling keep running. Once with
//! CRI labels (namespace `k8s.io`), once as docker would (namespace `moby`, labels from a
//! `config.v2.json` fixture), and once with the runtime hung (the fallback kills).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fixture::TempDir;
use fixture::containerd::{Containerd, container_id, probe};
use oomguard::cgroup::MemCgroup;
use oomguard::runtime::{
    ContainerKind, Endpoint, KillAck, RuntimeClient, RuntimeConfig, RuntimeError, RuntimeHint,
    fallback_kill_cgroup_tasks, labels,
};
use oomguard_dev::sandbox::Sandbox;

const M: u64 = 1 << 20;
static SERIAL: Mutex<()> = Mutex::new(());

fn ready() -> bool {
    fixture::require(probe())
}

/// A pod: `<sandbox>/kubepods/burstable/pod<uid>` with three containers.
struct Pod {
    _sb: Sandbox,
    uid: String,
    cgroup: PathBuf,
    sandbox: String,
    app: String,
    side: String,
}

impl Pod {
    fn cg(&self, id: &str) -> MemCgroup {
        MemCgroup::new(self.cgroup.join(id))
    }
}

fn cri_labels<'a>(
    uid: &'a str,
    kind: &'a str,
    name: &'a str,
    docker: bool,
) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![
        (labels::POD_NAME, "web-0"),
        (labels::POD_NAMESPACE, "shop"),
        (labels::POD_UID, uid),
        (labels::CONTAINER_NAME, name),
    ];
    if docker {
        l.push((
            labels::DOCKER_TYPE,
            if kind == "sandbox" {
                "podsandbox"
            } else {
                "container"
            },
        ));
    } else {
        l.push((labels::CRI_KIND, kind));
    }
    l
}

/// Starts the pod. With `docker_root`, labels go to config.v2.json files instead of
/// containerd (docker's way) and namespace `moby` is used.
fn start_pod(ctrd: &Containerd, ns: &str, docker_root: Option<&Path>) -> Pod {
    let sb = Sandbox::new("rt-pod").expect("sandbox cgroup");
    let uid = "2f9c0e4a-7b1d-4e8f-a3c6-5d0b9e1f7a24".to_string();
    let pod = sb
        .path()
        .join("kubepods/burstable")
        .join(format!("pod{uid}"));
    std::fs::create_dir_all(&pod).unwrap();
    MemCgroup::new(&pod).set_limit(256 * M).unwrap();
    let (sandbox, app, side) = (container_id(), container_id(), container_id());
    // The sandbox holds the most memory (page cache of a 32 MiB file): only its kind
    // keeps it from being chosen.
    let spec: [(&str, &str, &str, &str); 3] = [
        (
            &sandbox,
            "sandbox",
            "POD",
            "dd if=/dev/zero of=/tmp/fill bs=1M count=32 2>/dev/null; exec sleep 1000",
        ),
        (
            &app,
            "container",
            "app",
            "dd if=/dev/zero of=/tmp/fill bs=1M count=16 2>/dev/null; sleep 1000 & sleep 1000 & wait",
        ),
        (&side, "container", "side", "exec sleep 1000"),
    ];
    for (id, kind, name, script) in spec {
        let l = cri_labels(&uid, kind, name, docker_root.is_some());
        let on_container: Vec<(&str, &str)> = match docker_root {
            Some(root) => {
                let file = labels::docker_config_path(root, id);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                let map: serde_json::Map<String, serde_json::Value> = l
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
            None => l,
        };
        ctrd.run(
            ns,
            id,
            &pod.join(id),
            128 * M,
            &on_container,
            &["/bin/sh", "-c", script],
        );
    }
    let p = Pod {
        _sb: sb,
        uid,
        cgroup: pod,
        sandbox,
        app,
        side,
    };
    // Wait until the fillers are done (usage settled). Setup, not behaviour: generous, as
    // containerd and runc start slowly on a loaded machine (10 s was once too short).
    let settled = fixture::wait_for(Duration::from_secs(60), || {
        (p.cg(&p.sandbox).usage().unwrap_or(0) >= 32 * M
            && p.cg(&p.app).usage().unwrap_or(0) >= 16 * M
            && p.cg(&p.app).procs().unwrap_or_default().len() >= 3)
            .then_some(())
    });
    assert!(settled.is_some(), "the pod's containers did not start");
    p
}

fn client(endpoints: Vec<Endpoint>, docker_root: &Path) -> RuntimeClient {
    RuntimeClient::new(RuntimeConfig {
        endpoints,
        docker_root: docker_root.to_path_buf(),
        call_timeout: Duration::from_secs(1),
        unhealthy: Default::default(),
    })
    .unwrap()
}

fn check_kill(ctrd: &Containerd, ns: &str, rt: &RuntimeClient, pod: &Pod, expect_ns: &str) {
    let t = Duration::from_secs(2);
    let app = rt
        .resolve_blocking(&pod.app, RuntimeHint::Unknown, t)
        .unwrap();
    assert_eq!(app.kind, ContainerKind::Container);
    assert_eq!(app.namespace, expect_ns);
    let p = app.pod.clone().expect("pod labels");
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "web-0"));
    assert_eq!(p.uid, pod.uid);
    assert_eq!(p.container.as_deref(), Some("app"));
    let sandbox = rt
        .resolve_blocking(&pod.sandbox, RuntimeHint::Unknown, t)
        .unwrap();
    assert_eq!(sandbox.kind, ContainerKind::Sandbox);

    // The threshold fires on the pod: the app is chosen, never the bigger sandbox.
    assert!(
        pod.cg(&pod.sandbox).usage().unwrap() > pod.cg(&pod.app).usage().unwrap(),
        "the fixture must make the sandbox the biggest"
    );
    let target = rt.plan_blocking(&pod.cgroup, t).unwrap();
    assert_eq!(target.id, pod.app, "{target:#?}");
    assert_eq!(target.cgroup, pod.cgroup.join(&pod.app));
    assert_eq!(target.pod().map(|p| p.name.as_str()), Some("web-0"));

    // A threshold on the sandbox's own cgroup never kills it.
    assert!(matches!(
        rt.plan_blocking(&pod.cgroup.join(&pod.sandbox), t),
        Err(RuntimeError::NoContainer { .. })
    ));
    // On a container's own cgroup: that container.
    assert_eq!(
        rt.plan_blocking(&pod.cgroup.join(&pod.side), t).unwrap().id,
        pod.side
    );

    let report = rt.kill_container_blocking(&target, t).unwrap();
    eprintln!(
        "containerd kill ({ns}): rpc answered after {} us, last process gone after {} us",
        report.rpc_us, report.gone_us
    );
    assert_eq!(report.ack, KillAck::Signalled);
    assert!(pod.cg(&pod.app).procs().unwrap().is_empty());
    let stopped = fixture::wait_for(Duration::from_secs(5), || {
        (ctrd.task_status(ns, &pod.app).as_deref() == Some("STOPPED")).then_some(())
    });
    assert!(stopped.is_some(), "containerd does not see the app stopped");
    assert_eq!(
        ctrd.task_status(ns, &pod.sandbox).as_deref(),
        Some("RUNNING")
    );
    assert_eq!(ctrd.task_status(ns, &pod.side).as_deref(), Some("RUNNING"));
    assert!(!pod.cg(&pod.sandbox).procs().unwrap().is_empty());
    assert!(!pod.cg(&pod.side).procs().unwrap().is_empty());

    // Killing a stopped container again is done at once.
    let again = rt.kill_container_blocking(&target, t).unwrap();
    assert!(matches!(
        again.ack,
        KillAck::AlreadyStopped | KillAck::Signalled
    ));
}

#[test]
fn cri_pod_the_app_container_is_killed_through_containerd_and_the_sandbox_lives() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let ctrd = Containerd::start("cri");
    let pod = start_pod(&ctrd, "k8s.io", None);
    let none = TempDir::new("no-docker");
    let rt = client(
        vec![
            Endpoint::docker(none.path().join("missing.sock")),
            Endpoint::containerd(&ctrd.socket),
        ],
        none.path(),
    );
    check_kill(&ctrd, "k8s.io", &rt, &pod, "k8s.io");
}

#[test]
fn docker_pod_labels_come_from_config_v2_json_in_namespace_moby() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let ctrd = Containerd::start("moby");
    let docker_root = TempDir::new("docker-root");
    let pod = start_pod(&ctrd, "moby", Some(docker_root.path()));
    let rt = client(
        vec![
            Endpoint::docker(&ctrd.socket),
            Endpoint::containerd(docker_root.path().join("missing.sock")),
        ],
        docker_root.path(),
    );
    check_kill(&ctrd, "moby", &rt, &pod, "moby");
}

#[test]
fn a_hung_runtime_falls_back_to_killing_the_container_cgroup() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let ctrd = Containerd::start("hung");
    let docker_root = TempDir::new("docker-root");
    let pod = start_pod(&ctrd, "moby", Some(docker_root.path()));
    // A socket that accepts and never answers stands in for docker's containerd.
    let hung = fixture::hung_socket(&docker_root.path().join("hung.sock"));
    let rt = client(vec![Endpoint::docker(&hung.path)], docker_root.path());
    let t0 = Instant::now();
    let target = rt
        .plan_blocking(&pod.cgroup, Duration::from_secs(1))
        .unwrap();
    let planned = t0.elapsed();
    assert_eq!(target.id, pod.app, "config.v2.json still names the sandbox");
    let err = rt
        .kill_container_blocking(&target, Duration::from_secs(1))
        .unwrap_err();
    assert!(
        err.is_unavailable() || matches!(err, RuntimeError::NotFound { .. }),
        "{err}"
    );
    let t1 = Instant::now();
    let fb = fallback_kill_cgroup_tasks(
        &target.cgroup,
        Path::new("/sys/fs/cgroup/memory"),
        Duration::from_secs(2),
    );
    eprintln!(
        "hung runtime: planned in {} ms (bounded by the 1 s call timeout), fallback: last process gone after {:?} us, {} task(s) signalled",
        planned.as_millis(),
        fb.gone_us,
        fb.killed.len()
    );
    // Bounded by the 1 s deadline (a hung socket would otherwise block forever), with
    // slack for a loaded machine.
    assert!(planned < Duration::from_secs(3), "{planned:?}");
    assert!(fb.took_effect(), "{fb:#?}");
    assert!(t1.elapsed() < Duration::from_secs(4), "{:?}", t1.elapsed());
    assert!(pod.cg(&pod.app).procs().unwrap().is_empty());
    assert!(!pod.cg(&pod.sandbox).procs().unwrap().is_empty());
    assert!(!pod.cg(&pod.side).procs().unwrap().is_empty());
}
