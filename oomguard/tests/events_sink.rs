//! Kubernetes Events through a loopback stand-in for the API server (core/v1 events with
//! the real validation, 403 for events.k8s.io), reached through a kubeconfig file: the
//! fields of the Warning event, aggregation (a repeat PATCHes count to 2; 404 creates anew),
//! the real `kubectl get events` reading it back, and a sink that never blocks while the
//! API server is down and delivers once it is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::process::Command;
use std::time::{Duration, Instant};

use fixture::apiserver::FakeApiServer;
use fixture::{SinkRig, TempDir, decision, sink_rig, wait_for};
use oomguard::events::{EventRequest, EventSink, EventsOptions, Involved, Reason};
use oomguard::runtime::PodRef;
use serde_json::Value;

fn setup(capacity: usize) -> SinkRig {
    sink_rig("events", |opts| {
        opts.capacity = capacity;
        opts.initial_backoff = Duration::from_millis(50);
        opts.max_backoff = Duration::from_millis(400);
    })
}

fn pod() -> PodRef {
    PodRef {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "2f9c0e4a-7b1d-4e8f-a3c6-5d0b9e1f7a24".into(),
        container: Some("app".into()),
    }
}

fn kill_event() -> EventRequest {
    EventRequest::from_decision(
        &decision("/kubepods/burstable/pod2f9c"),
        Reason::KillContainer,
        Some(&pod()),
        "node-1",
    )
}

/// Submits `evs` from a plain thread; false if that thread did not get through them within
/// 10 s (a bound on "returns at all" for a submit that must never wait for the API server
/// or for room in the queue, not a latency figure: those are in the benchmark).
fn submits_return(sink: &EventSink, evs: Vec<EventRequest>) -> bool {
    let sink = sink.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in evs {
            sink.submit(ev);
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10)).is_ok()
}

fn wait_events(server: &FakeApiServer, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    wait_for(Duration::from_secs(10), || {
        let evs = server.events();
        pred(&evs).then_some(evs)
    })
    .unwrap_or_else(|| {
        panic!(
            "events never matched; stored: {:#?}; requests: {:#?}",
            server.events(),
            server.requests()
        )
    })
}

#[test]
fn a_kill_becomes_a_warning_event_on_the_pod_and_a_repeat_patches_count_2() {
    let s = setup(16);
    assert!(submits_return(&s.sink, vec![kill_event()]));
    let evs = wait_events(&s.server, |e| e.len() == 1);
    let ev = &evs[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "OomGuardKillContainer");
    assert_eq!(ev["metadata"]["namespace"], "shop");
    let name = ev["metadata"]["name"].as_str().unwrap();
    let hex = name
        .strip_prefix("web-0.")
        .expect("name is <pod>.<hex nanos>");
    assert!(u64::from_str_radix(hex, 16).is_ok(), "{name}");
    let obj = &ev["involvedObject"];
    assert_eq!(obj["kind"], "Pod");
    assert_eq!(obj["apiVersion"], "v1");
    assert_eq!(obj["namespace"], "shop");
    assert_eq!(obj["name"], "web-0");
    assert_eq!(obj["uid"], "2f9c0e4a-7b1d-4e8f-a3c6-5d0b9e1f7a24");
    assert_eq!(obj["fieldPath"], "spec.containers{app}");
    assert_eq!(ev["source"]["component"], "oom-guard");
    assert_eq!(ev["source"]["host"], "node-1");
    assert_eq!(ev["count"], 1);
    assert_eq!(ev["firstTimestamp"], ev["lastTimestamp"]);
    assert!(ev.get("eventTime").is_none_or(Value::is_null));
    let msg: Value = serde_json::from_str(ev["message"].as_str().unwrap()).unwrap();
    for k in [
        "hostname",
        "timestamp",
        "oomcgroup",
        "proccgroup",
        "threshold",
        "usage",
        "killed",
        "stats",
        "policy",
    ] {
        assert!(msg.get(k).is_some(), "message lacks {k}: {msg}");
    }
    assert_eq!(msg["policy"], "container");

    std::thread::sleep(Duration::from_millis(1100));
    s.sink.submit(kill_event());
    let evs = wait_events(&s.server, |e| e.len() == 1 && e[0]["count"] == 2);
    assert_eq!(evs[0]["metadata"]["name"], name);
    assert_ne!(evs[0]["lastTimestamp"], evs[0]["firstTimestamp"]);
    let reqs = s.server.requests();
    let writes: Vec<(&str, &str)> = reqs
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method.as_str(), r.content_type.as_str()))
        .collect();
    assert_eq!(
        writes,
        [
            ("POST", "application/json"),
            ("PATCH", "application/strategic-merge-patch+json")
        ]
    );
    assert!(reqs.iter().all(|r| r.status < 300), "{reqs:#?}");
    assert!(
        reqs.iter()
            .all(|r| !r.path.starts_with("/apis/events.k8s.io"))
    );
    // The server records a request before the sink has read the answer and counted it.
    let counted = || {
        let st = s.sink.stats();
        (
            st.created.load(std::sync::atomic::Ordering::Relaxed),
            st.patched.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted() != (1, 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(counted(), (1, 1), "created, patched");

    // The real kubectl reads it back.
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(s.dir.path().join("kubeconfig"))
        .arg("--cache-dir")
        .arg(s.dir.path().join("kubectl-cache"))
        .args(["get", "events", "-A", "-o", "json"])
        .output()
        .expect("kubectl is installed");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["reason"], "OomGuardKillContainer");
    assert_eq!(items[0]["count"], 2);
    assert_eq!(items[0]["involvedObject"]["name"], "web-0");
    drop(s.rt);
}

#[test]
fn without_a_pod_the_event_is_about_the_node() {
    let s = setup(16);
    s.sink.submit(EventRequest::from_decision(
        &decision("/system.slice/x"),
        Reason::KillProcess,
        None,
        "node-1",
    ));
    let evs = wait_events(&s.server, |e| e.len() == 1);
    let ev = &evs[0];
    assert_eq!(ev["reason"], "OomGuardKillProcess");
    assert_eq!(ev["metadata"]["namespace"], "default");
    assert_eq!(ev["involvedObject"]["kind"], "Node");
    assert_eq!(ev["involvedObject"]["name"], "node-1");
    assert!(
        ev["involvedObject"]
            .get("namespace")
            .is_none_or(Value::is_null)
    );
    assert!(
        ev["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("node-1.")
    );
}

#[test]
fn an_expired_event_is_created_anew_after_the_patch_gets_404() {
    let s = setup(16);
    let ev = EventRequest {
        reason: Reason::CgroupOom,
        object: Involved::from_pod(&pod()),
        message: "{}".into(),
        at: jiff::Timestamp::now(),
    };
    s.sink.submit(ev.clone());
    let first = wait_events(&s.server, |e| e.len() == 1)[0]["metadata"]["name"].clone();
    s.server.expire_events();
    s.sink.submit(ev);
    let evs = wait_events(&s.server, |e| e.len() == 1);
    assert_ne!(evs[0]["metadata"]["name"], first);
    assert_eq!(evs[0]["count"], 1);
    assert_eq!(evs[0]["reason"], "CgroupOOM");
    let tail: Vec<(String, u16)> = s
        .server
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method.clone(), r.status))
        .collect();
    assert_eq!(
        tail,
        [
            ("POST".to_string(), 201),
            ("PATCH".to_string(), 404),
            ("POST".to_string(), 201)
        ]
    );
}

#[test]
fn while_the_api_server_is_down_submit_returns_and_the_event_arrives_later() {
    let mut s = setup(16);
    s.server.stop();
    assert!(submits_return(&s.sink, vec![kill_event()]));
    std::thread::sleep(Duration::from_millis(800));
    assert!(s.server.events().is_empty());
    assert!(
        s.sink
            .stats()
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    let back = Instant::now();
    s.server.start_again();
    let evs = wait_events(&s.server, |e| e.len() == 1);
    eprintln!(
        "event delivered {:?} after the API server came back",
        back.elapsed()
    );
    assert_eq!(evs[0]["reason"], "OomGuardKillContainer");
    // The server stores the event before the sink has its answer: the queue empties next.
    assert!(
        wait_for(Duration::from_secs(5), || (s.sink.queued() == 0)
            .then_some(()))
        .is_some()
    );
}

#[test]
fn a_full_queue_drops_the_oldest_and_counts_it() {
    let mut s = setup(2);
    s.server.stop();
    // The worker cannot drain (the API server is down): a submit that waited for room
    // would never return.
    let evs = (0..5)
        .map(|i| {
            let mut ev = kill_event();
            ev.message = format!("{{\"n\":{i}}}");
            ev
        })
        .collect();
    assert!(
        submits_return(&s.sink, evs),
        "submit blocked on a full queue"
    );
    assert_eq!(
        s.sink
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    s.server.start_again();
    // The two newest survive: the first creates, the second patches its message.
    let evs = wait_events(&s.server, |e| e.len() == 1 && e[0]["count"] == 2);
    assert_eq!(evs[0]["message"], "{\"n\":4}");
}

#[test]
fn without_any_configuration_events_are_disabled_and_submit_is_a_no_op() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new("events-none");
    let mut opts = EventsOptions::new("node-1");
    opts.kubeconfig = Some(dir.path().join("missing-kubeconfig"));
    let sink = EventSink::spawn(rt.handle(), opts);
    rt.block_on(async {
        for _ in 0..100 {
            if sink.disabled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(sink.disabled());
    sink.submit(kill_event());
    assert_eq!(sink.queued(), 0);
}

/// The stand-in refuses what the real API server refuses.
#[test]
fn the_stand_in_validates_like_the_api_server() {
    use k8s_openapi::api::core::v1::{Event, ObjectReference};
    use kube::api::{Api, PostParams};
    let s = setup(1);
    let client = s.rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(s.dir.path().join("kubeconfig")).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    });
    let post = |ns: &str, ev: Event| {
        let api: Api<Event> = Api::namespaced(client.clone(), ns);
        s.rt.block_on(api.create(&PostParams::default(), &ev))
    };
    let code = |r: Result<Event, kube::Error>| match r {
        Err(kube::Error::Api(st)) => st.code,
        Ok(_) => 201,
        Err(e) => panic!("{e}"),
    };
    let good = || Event {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("web-0.1".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            namespace: Some("shop".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut no_name = good();
    no_name.metadata.name = None;
    assert_eq!(code(post("shop", no_name)), 422);
    assert_eq!(code(post("other", good())), 422, "namespace mismatch");
    let mut bad_ns = good();
    bad_ns.involved_object.namespace = Some("Bad_NS".into());
    assert_eq!(code(post("Bad_NS", bad_ns)), 422);
    let mut strict = good();
    strict.event_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        jiff::Timestamp::now(),
    ));
    assert_eq!(
        code(post("shop", strict)),
        422,
        "eventTime needs action etc."
    );
    assert_eq!(code(post("shop", good())), 201);
    assert_eq!(code(post("shop", good())), 409);
    let forbidden = s.rt.block_on(async {
        let req = axum::http::Request::get("/apis/events.k8s.io/v1/events")
            .body(Vec::new())
            .unwrap();
        client.request::<Value>(req).await
    });
    assert!(matches!(forbidden, Err(kube::Error::Api(st)) if st.code == 403));
}
