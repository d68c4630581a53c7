//! `--metrics-addr`: /metrics counts what the agent really did, /readyz follows the first
//! walk, /healthz follows the guard loop (stopped for real with ptrace).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use oomguard_dev::fixture::*;

/// Polls `f` every 50 ms for up to `timeout`.
fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn metrics_count_a_real_kill_and_readyz_follows_the_first_walk() {
    let Some(sb) = setup(kernel_ready, "metrics", 128 * M) else {
        return;
    };
    let addr = free_port();
    let a = addr.to_string();
    let agent = launch(&sb.cg.path)
        .args(WINNABLE)
        .args(&["--metrics-addr", &a])
        .start();
    assert!(
        until(Duration::from_secs(5), || get(addr, "/readyz").0 == 200),
        "/readyz never became ready: {:?}",
        get(addr, "/readyz")
    );
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_string()));
    let (status, before) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(value(&before, "oomguard_guarded_cgroups"), Some(1.0));
    assert_eq!(
        value(&before, r#"oomguard_mode{mode="eventfd"}"#),
        Some(1.0)
    );
    assert_eq!(value(&before, "oomguard_ready"), Some(1.0));
    assert_eq!(value(&before, "oomguard_kernel_ooms_total"), Some(0.0));

    let mut hog = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    expect_decision(&agent, "kill", Duration::from_secs(5));
    let kills = r#"oomguard_kills_total{policy="process",outcome="killed"}"#;
    let mut text = String::new();
    assert!(
        until(Duration::from_secs(5), || {
            text = get(addr, "/metrics").1;
            value(&text, kills) == Some(1.0)
        }),
        "{kills} is not 1:\n{text}"
    );
    let signals = value(
        &text,
        r#"oomguard_threshold_signals_total{source="eventfd",threshold="kill"}"#,
    )
    .unwrap();
    assert!(signals >= 1.0, "{text}");
    assert_eq!(
        value(&text, "oomguard_signal_to_kill_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "oomguard_kernel_ooms_total"), Some(0.0));
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    assert_eq!(get(addr, "/nope").0, 404);
}

/// The guard thread's tid, by its name.
fn guard_tid(pid: u32) -> i32 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "oomguard-guard" {
            return t.file_name().to_str().unwrap().parse().unwrap();
        }
    }
    panic!("agent {pid} has no oomguard-guard thread");
}

/// Detaches from a ptrace-stopped thread even when the test fails.
struct Traced(nix::unistd::Pid);

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = nix::sys::ptrace::detach(self.0, None);
    }
}

#[test]
fn healthz_fails_while_the_guard_loop_is_stopped_and_recovers() {
    let Some(sb) = setup(kernel_ready, "healthz", 128 * M) else {
        return;
    };
    let addr = free_port();
    let a = addr.to_string();
    let mut agent = start_agent(&sb.cg, &["--metrics-addr", &a, "--watchdog-ms", "1500"]);
    assert!(until(Duration::from_secs(5), || get(addr, "/healthz").0 == 200));
    // Stop only the guard thread (ptrace stops one thread, a signal would stop them all):
    // the HTTP server keeps answering while the watchdog sees the loop stand still.
    let tid = nix::unistd::Pid::from_raw(guard_tid(agent.pid()));
    nix::sys::ptrace::seize(tid, nix::sys::ptrace::Options::empty()).unwrap();
    let traced = Traced(tid);
    nix::sys::ptrace::interrupt(tid).unwrap();
    nix::sys::wait::waitpid(tid, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    let stopped = Instant::now();
    let mut last = (0, String::new());
    assert!(
        until(Duration::from_secs(6), || {
            last = get(addr, "/healthz");
            last.0 == 503
        }),
        "/healthz stayed {last:?} with the guard loop stopped"
    );
    assert!(
        stopped.elapsed() >= Duration::from_millis(1000),
        "/healthz failed after only {:?}",
        stopped.elapsed()
    );
    assert!(last.1.contains("has not turned"), "{last:?}");
    drop(traced);
    assert!(
        until(Duration::from_secs(5), || {
            last = get(addr, "/healthz");
            last.0 == 200
        }),
        "/healthz did not recover: {last:?}"
    );
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_taken_metrics_port_stops_the_agent_at_start_with_one_clear_line() {
    let Some(sb) = setup(kernel_ready, "metrics-taken", 128 * M) else {
        return;
    };
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(agent_exe())
        .args(["run", "--mode", "eventfd", "--root"])
        .arg(&sb.cg.path)
        .args(["--metrics-addr", &a])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot serve --metrics-addr {a}")) && err.contains("in use"),
        "{err}"
    );
    // It stopped before guarding anything: nothing was armed.
    assert!(!err.contains("armed"), "{err}");
}

#[test]
fn a_malformed_metrics_addr_is_bad_input() {
    let out = std::process::Command::new(agent_exe())
        .args(["run", "--metrics-addr", "localhost"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--metrics-addr"), "{err}");
}
