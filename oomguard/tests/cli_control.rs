//! `oomguard cgroups` and `oomguard events` against a real agent, over its control socket, in
//! eventfd and eBPF modes: the numbers agree with the thresholds the test computes from the
//! limit and flags, and `events --follow` shows the kill the test causes. Without an agent:
//! one clear line and exit 1.
//!
//! NEEDS WIRING: these tests need the agent to start `control::ControlServer` on
//! `--state-dir` and to feed `state::AgentState` from the guard (see README, "Debug CLI").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use fixture::{M, hog, killed_by_sigkill, oomguard, sandbox, wait_exit};
use oomguard::threshold::Margins;
use oomguard_dev::sandbox::Agent;

/// A temporary state directory, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> StateDir {
        let dir =
            std::env::temp_dir().join(format!("oomguard-test-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        StateDir(dir)
    }
    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `oomguard events --follow` (with `--json` when asked), its lines on a channel; killed
/// on drop.
struct Follower {
    child: Child,
    lines: Receiver<String>,
}

impl Follower {
    fn start(state_dir: &str, json: bool) -> Follower {
        let mut args = vec!["events", "--follow", "--state-dir", state_dir];
        if json {
            args.push("--json");
        }
        let mut child = Command::new(fixture::agent_exe())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// The first line `pred` accepts within `timeout`.
    fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// The first JSON event `pred` accepts within `timeout`; every line must be JSON.
    fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let parse = |line: &str| -> serde_json::Value {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("events --json line {line:?}: {e}"))
        };
        self.wait_for_line(timeout, |line| pred(&parse(line)))
            .map(|line| parse(&line))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(dir: &Path, agent: &Agent) {
    let sock = dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no {} after 10 s (is the control server wired into the agent?); log: {:#?}",
            sock.display(),
            agent.records()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroups(state_dir: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = oomguard(&["cgroups", "--json", "--state-dir", state_dir]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}"))
        .as_array()
        .expect("cgroups --json is a list")
        .clone()
}

fn views_follow_a_kill(mode: &str) {
    let _serial = fixture::serial();
    if !fixture::kernel_ready() || (mode == "ebpf" && !fixture::ebpf_ready()) {
        return;
    }
    let limit = 256 * M;
    let sb = sandbox(&format!("oomguard-cli-{mode}"), limit);
    let state = StateDir::new(mode);
    let state_arg = state.arg();
    let pins = format!(
        "/sys/fs/bpf/oomguard-test-cli-{mode}-{}",
        std::process::id()
    );
    let root = sb.path().display().to_string();
    let agent = fixture::launch(sb.path())
        .args(&[
            "--mode",
            mode,
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
            "--max-margin",
            "40M",
            "--state-dir",
            &state_arg,
            "--bpf-pin-dir",
            &pins,
        ])
        .start();
    wait_socket(&state.0, &agent);
    let mode_bits = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.0.join("control.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode_bits & 0o777, 0o600);

    // cgroups: the thresholds the flags give for this limit (10% is 25.6M, under --max-margin).
    let want = Margins {
        ratio: 0.1,
        min: M,
        max: 40 * M,
    }
    .thresholds(limit)
    .unwrap();
    let all = cgroups(&state_arg);
    let ours = all
        .iter()
        .find(|c| c["path"].as_str() == Some(root.as_str()))
        .unwrap_or_else(|| panic!("{root} not in {all:#?}"));
    assert_eq!(ours["limit"], limit);
    assert_eq!(ours["margin"], want.margin);
    assert_eq!(ours["threshold"], want.kill);
    assert_eq!(ours["reclaim_threshold"], want.reclaim);
    assert_eq!(ours["state"], "armed");
    assert!(ours["usage"].as_u64().unwrap() < want.kill);
    assert!(ours["cache"].is_u64());
    assert!(ours["last_action"].is_null());

    // events --follow shows the kill of the hog this test starts.
    let follower = Follower::start(&state_arg, true);
    std::thread::sleep(Duration::from_millis(300));
    let mut memhog = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let pid = memhog.id();
    let status = wait_exit(&mut memhog, Duration::from_secs(30));
    assert!(killed_by_sigkill(status), "memhog: {status:?}");
    let kill = follower
        .wait_for(Duration::from_secs(10), |v| {
            v["kind"] == "decision" && v["decision"]["action"] == "kill"
        })
        .unwrap_or_else(|| panic!("no kill in events --follow; log: {:#?}", agent.records()));
    assert_eq!(kill["cgroup"], root.as_str());
    assert_eq!(kill["decision"]["policy"], "process");
    assert_eq!(kill["decision"]["threshold"], want.kill);
    assert_eq!(kill["decision"]["killed"][0]["pid"], pid);
    assert!(kill["decision"]["usage"].as_u64().unwrap() >= want.kill);
    assert!(kill["seq"].as_u64().unwrap() >= 1);

    // The kill is the cgroup's last action, and in the recent events.
    let all = cgroups(&state_arg);
    let ours = all.iter().find(|c| c["path"] == root.as_str()).unwrap();
    assert_eq!(ours["last_action"]["action"], "kill", "{ours:#}");
    assert_eq!(ours["last_action"]["pid"], pid);
    let (code, out, err) = oomguard(&["events", "--json", "--state-dir", &state_arg]);
    assert_eq!(code, 0, "{err}");
    let recent: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        recent
            .iter()
            .any(|e| e["decision"]["killed"][0]["pid"] == pid),
        "{out}"
    );

    // Human output to a pipe: aligned tables, nothing cut; the kill's time and the event
    // `kill` whole at the start of its row, in the table and in the stream.
    let kill_row = |l: &str| {
        let mut words = l.split_whitespace();
        words
            .next()
            .is_some_and(|t| t.len() == 8 && t.as_bytes()[2] == b':')
            && words.next() == Some("kill")
            && l.contains(&format!(" {pid} "))
    };
    for cmd in ["cgroups", "events"] {
        let (code, out, err) = oomguard(&[cmd, "--state-dir", &state_arg]);
        assert_eq!(code, 0, "{err}");
        assert!(out.lines().count() >= 2, "{out}");
        assert!(!out.contains('…'), "{out}");
        if cmd == "events" {
            assert!(out.lines().any(kill_row), "{out}");
        }
    }
    let follower = Follower::start(&state_arg, false);
    let row = follower.wait_for_line(Duration::from_secs(10), kill_row);
    assert!(
        row.is_some_and(|l| !l.contains('…')),
        "no whole kill row in events --follow"
    );
}

#[test]
fn cgroups_and_events_eventfd_mode() {
    views_follow_a_kill("eventfd");
}

#[test]
fn cgroups_and_events_ebpf_mode() {
    views_follow_a_kill("ebpf");
}

#[test]
fn no_agent_is_one_clear_line_and_exit_1() {
    let dir = "/nonexistent/oomguard-state";
    for args in [
        &["cgroups"][..],
        &["cgroups", "--json"],
        &["events"],
        &["events", "--json"],
        &["events", "--follow", "--json"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--state-dir", dir]);
        let (code, out, err) = oomguard(&args);
        assert_eq!(code, 1, "{args:?}");
        // With --json the one line is {"error": ...} on stdout.
        let (line, other) = if args.contains(&"--json") {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            (v["error"].as_str().unwrap().to_string(), err)
        } else {
            (err, out)
        };
        assert!(other.is_empty(), "{args:?}: {other}");
        assert_eq!(line.trim_end().lines().count(), 1, "{args:?}: {line}");
        assert!(
            line.contains("no agent at /nonexistent/oomguard-state/control.sock"),
            "{line}"
        );
    }
}
