//! The runtime client never waits longer than its bound: missing sockets are normal and
//! answered at once, a dead socket (connection refused) fails fast, and a socket that
//! accepts and never answers (a hung containerd) times out within the call timeout. An
//! endpoint that hung or refused is then marked unhealthy and not asked again: the next
//! calls answer at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fixture::TempDir;
use oomguard::runtime::{
    ContainerInfo, ContainerKind, Endpoint, K8S_IO, RuntimeClient, RuntimeConfig, RuntimeError,
    RuntimeHint, Target,
};

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The bound this test holds the client to. Calls are given a 5 s deadline and the client
/// a 1 s call timeout: a client that waits out the caller's deadline fails, and a loaded
/// machine (CI) has 2 s of slack over the call timeout.
const BOUND: Duration = Duration::from_secs(3);
/// For answers that need no call at all: well below the 1 s call timeout, so one dial
/// that had to time out fails the test, with ample slack for a loaded machine.
const NO_CALL: Duration = Duration::from_millis(800);

fn client(endpoints: Vec<Endpoint>) -> RuntimeClient {
    RuntimeClient::new(RuntimeConfig {
        endpoints,
        docker_root: PathBuf::from("/nonexistent"),
        call_timeout: Duration::from_secs(1),
        unhealthy: Default::default(),
    })
    .unwrap()
}

fn target() -> Target {
    Target {
        fired: PathBuf::from("/nonexistent"),
        cgroup: PathBuf::from("/nonexistent"),
        id: ID.into(),
        hint: RuntimeHint::Containerd,
        info: Some(ContainerInfo {
            id: ID.into(),
            namespace: K8S_IO.into(),
            kind: ContainerKind::Container,
            pod: None,
        }),
        usage: 0,
        reason: String::new(),
        runtime_error: None,
    }
}

#[test]
fn missing_sockets_answer_at_once() {
    let dir = TempDir::new("sockets");
    let rt = client(vec![
        Endpoint::docker(dir.path().join("a.sock")),
        Endpoint::containerd(dir.path().join("b.sock")),
    ]);
    let t = Instant::now();
    let err = rt
        .resolve_blocking(ID, RuntimeHint::Unknown, Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NoRuntime(_)), "{err}");
    assert!(err.is_unavailable());
    assert!(t.elapsed() < NO_CALL, "{:?}", t.elapsed());
}

#[test]
fn a_refusing_socket_fails_fast() {
    let dir = TempDir::new("sockets");
    let sock = dir.path().join("dead.sock");
    fixture::stale_socket(&sock);
    let rt = client(vec![Endpoint::containerd(&sock)]);
    let t = Instant::now();
    let err = rt
        .resolve_blocking(ID, RuntimeHint::Unknown, Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Unreachable { .. }), "{err:?}");
    assert!(t.elapsed() < BOUND, "{:?}", t.elapsed());
    assert!(!rt.endpoints()[0].healthy);
    // Marked: not dialled again.
    let err = rt
        .kill_container_blocking(&target(), Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Unhealthy { .. }), "{err:?}");
    let st = rt.stats();
    assert_eq!(st.unreachable.load(Ordering::Relaxed), 1);
    assert_eq!(st.skipped_unhealthy.load(Ordering::Relaxed), 1);
    // The kill RPC alone fails fast too.
    let rt = client(vec![Endpoint::containerd(&sock)]);
    let t = Instant::now();
    let err = rt
        .kill_container_blocking(&target(), Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Unreachable { .. }), "{err:?}");
    assert!(t.elapsed() < BOUND, "{:?}", t.elapsed());
}

#[test]
fn a_hung_socket_times_out_within_the_bound_and_is_then_not_asked() {
    let dir = TempDir::new("sockets");
    let hung = fixture::hung_socket(&dir.path().join("hung.sock"));
    let rt = client(vec![Endpoint::containerd(&hung.path)]);
    let t = Instant::now();
    let err = rt
        .resolve_blocking(ID, RuntimeHint::Unknown, Duration::from_secs(5))
        .unwrap_err();
    let took = t.elapsed();
    eprintln!("hung socket: resolve gave up after {took:?}: {err}");
    assert!(matches!(err, RuntimeError::Timeout { .. }), "{err:?}");
    assert!(took < BOUND, "{took:?}");
    assert!(!rt.endpoints()[0].healthy);

    // Marked unhealthy: the next calls are not made, and say why.
    for _ in 0..2 {
        let t = Instant::now();
        let err = rt
            .resolve_blocking(ID, RuntimeHint::Unknown, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Unhealthy { .. }), "{err:?}");
        assert!(err.is_unavailable());
        let err = rt
            .kill_container_blocking(&target(), Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Unhealthy { .. }), "{err:?}");
        let took = t.elapsed();
        eprintln!("unhealthy endpoint: resolve + kill answered in {took:?}: {err}");
        assert!(took < NO_CALL, "{took:?}");
    }
    let st = rt.stats();
    assert_eq!(st.timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(st.skipped_unhealthy.load(Ordering::Relaxed), 4);

    // The kill RPC on its own: bounded, and it marks the endpoint too.
    let rt = client(vec![Endpoint::containerd(&hung.path)]);
    let t = Instant::now();
    let err = rt
        .kill_container_blocking(&target(), Duration::from_secs(5))
        .unwrap_err();
    let took = t.elapsed();
    eprintln!("hung socket: kill gave up after {took:?}: {err}");
    assert!(matches!(err, RuntimeError::Timeout { .. }), "{err:?}");
    assert!(took < BOUND, "{took:?}");
    // Recorded on the client's thread, off the caller's.
    let marked = fixture::wait_for(Duration::from_secs(1), || {
        (!rt.endpoints()[0].healthy).then_some(())
    });
    assert!(marked.is_some());
}

#[test]
fn a_shorter_caller_deadline_wins_and_too_short_a_one_does_not_mark_the_endpoint() {
    let dir = TempDir::new("sockets");
    let hung = fixture::hung_socket(&dir.path().join("hung.sock"));
    let rt = client(vec![Endpoint::containerd(&hung.path)]);
    // 40 ms is below what judges an endpoint (50 ms): twice a timeout, never "unhealthy".
    for _ in 0..2 {
        let t = Instant::now();
        let err = rt
            .resolve_blocking(ID, RuntimeHint::Unknown, Duration::from_millis(40))
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Timeout { .. }), "{err:?}");
        // The caller's 40 ms, not the client's 1 s call timeout.
        assert!(t.elapsed() < NO_CALL, "{:?}", t.elapsed());
    }
    assert!(rt.endpoints()[0].healthy);
    let t = Instant::now();
    let err = rt
        .resolve_blocking(ID, RuntimeHint::Unknown, Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Timeout { .. }), "{err:?}");
    // The caller's 200 ms, not the client's 1 s call timeout.
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(!rt.endpoints()[0].healthy);
}
