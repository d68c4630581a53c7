//! SIGHUP: reload the flags file (all or nothing), or ignore the signal without one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use oomguard::threshold::Margins;
use oomguard_dev::fixture::*;

/// A flags file removed with its directory when the test ends, even on failure.
struct FlagsFile(PathBuf);

impl FlagsFile {
    fn new(tag: &str, text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("oomguard-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = FlagsFile(dir.join("flags"));
        f.write(text);
        f
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for FlagsFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn hup(agent: &oomguard_dev::sandbox::Agent) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

fn kill_threshold(ratio: f64) -> u64 {
    Margins {
        ratio,
        min: M,
        max: 50 * M,
    }
    .thresholds(256 * M)
    .unwrap()
    .kill
}

#[test]
fn sighup_reloads_the_flags_file_and_the_new_flags_guard() {
    let Some(sb) = setup(kernel_ready, "reload", 256 * M) else {
        return;
    };
    let flags = FlagsFile::new(
        "reload",
        "# node policy\n--policy=noop --margin-ratio=0.1\n",
    );
    let f = flags.arg();
    let mut agent = start_agent(&sb.cg, &["--flags-file", &f]);
    let armed = agent
        .records()
        .into_iter()
        .find(|r| r["message"] == "armed")
        .unwrap();
    assert_eq!(
        armed["threshold"].as_u64(),
        Some(kill_threshold(0.1)),
        "{armed}"
    );

    // Invalid: nothing changes, one warning.
    flags.write("--policy=reboot\n");
    hup(&agent);
    agent
        .wait_for(Duration::from_secs(5), |r| {
            r["message"] == "SIGHUP: nothing reloaded; the running flags stay"
        })
        .unwrap_or_else(|| panic!("no refusal; log: {:#?}", agent.records()));
    // A flag bound at start: nothing changes either, even the valid part.
    flags.write("--policy=process --state-dir=/nonexistent\n");
    hup(&agent);
    let refused = agent
        .wait_for(Duration::from_secs(5), |r| {
            r["message"] == "SIGHUP: nothing reloaded; these flags change only with a restart"
        })
        .unwrap_or_else(|| panic!("no refusal; log: {:#?}", agent.records()));
    assert_eq!(refused["flags"], "--state-dir", "{refused}");
    assert_eq!(agent.count(message("SIGHUP: flags reloaded")), 0);

    // Valid: the policy and the margins change; the cgroup is re-armed at the new threshold.
    flags.write("--policy=process\n--margin-ratio=0.2\n");
    hup(&agent);
    let reloaded = agent
        .wait_for(Duration::from_secs(5), |r| {
            r["message"] == "SIGHUP: flags reloaded"
        })
        .unwrap_or_else(|| panic!("no reload; log: {:#?}", agent.records()));
    let changes = reloaded["changes"].as_str().unwrap();
    assert!(
        changes.contains("--policy: noop -> process")
            && changes.contains("--margin-ratio: 0.1 -> 0.2"),
        "{reloaded}"
    );
    let t = kill_threshold(0.2);
    agent
        .wait_for(Duration::from_secs(5), |r| {
            r["message"] == "armed" && r["threshold"].as_u64() == Some(t)
        })
        .unwrap_or_else(|| panic!("not re-armed at {t}; log: {:#?}", agent.records()));

    let mut h = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut h, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    let d = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_eq!(d["policy"], "process", "{d}");
    assert_eq!(d["threshold"].as_u64(), Some(t), "{d}");
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn without_a_flags_file_sighup_is_ignored() {
    let Some(sb) = setup(kernel_ready, "reload-none", 256 * M) else {
        return;
    };
    let mut agent = start_agent(&sb.cg, WINNABLE);
    hup(&agent);
    agent
        .wait_for(Duration::from_secs(5), |r| {
            r["message"] == "SIGHUP ignored: no --flags-file to reload"
        })
        .unwrap_or_else(|| panic!("SIGHUP not acknowledged; log: {:#?}", agent.records()));
    assert!(agent.running(), "SIGHUP ended the agent");
    let mut h = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut h, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    assert_eq!(
        agent.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_bad_flags_file_at_start_is_bad_input() {
    let flags = FlagsFile::new("reload-bad", "--margin-ratio=2\n");
    let out = std::process::Command::new(agent_exe())
        .args(["run", "--flags-file", &flags.arg()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--margin-ratio must be in (0, 1), got 2"),
        "{err}"
    );
    let missing = std::process::Command::new(agent_exe())
        .args(["run", "--flags-file", "/nonexistent/oomguard-flags"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--flags-file /nonexistent/oomguard-flags:"),
        "{err}"
    );
}
