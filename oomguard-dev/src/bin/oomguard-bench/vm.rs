//! `--vm`: what `cargo xtask bench --vm` runs in each kernel-matrix guest. The avoidance
//! scenarios of issues 15 and 16 (the unthrottled 32 MiB one, and 256 MiB at 64 MB/s and
//! 200 MB/s) with the kernel alone, eBPF, and the agent without eBPF (v1: threshold
//! eventfds; v2: the fallback watcher alone), through the host bench's own [`avoid`]; and on
//! v2 the fallback watcher's idle CPU with many guarded cgroups. TCG guests are 10–50×
//! slower than a node: compare counts, not times.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use oomguard_dev::sandbox::{Agent, Sandbox};
use serde::Serialize;

use crate::avoid::{AvoidanceRow, Scenario, avoid};
use crate::{M, progress};

/// The guests' scenarios (default margins: 2% of the limit, at least 1 MiB).
pub(crate) fn scenarios() -> Vec<Scenario> {
    let base = Scenario::single;
    vec![
        base("32MiB 1MiB-margin unthrottled", 32 * M, 0),
        base("256MiB @64MB/s", 256 * M, 64_000_000),
        base("256MiB @200MB/s", 256 * M, 200_000_000),
    ]
}

/// The fallback watcher (or any agent) guarding idle cgroups: its CPU over a window, and
/// how often it read.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleRow {
    pub(crate) mode: String,
    /// The v2 watcher's tripwires on (off: `OOMGUARD_TEST_NO_TRIPWIRE`, the same-run baseline).
    pub(crate) tripwire: bool,
    pub(crate) cgroups: usize,
    pub(crate) limit_mib: u64,
    pub(crate) rss_kib: u64,
    pub(crate) cpu_percent_of_core: f64,
    pub(crate) window_s: f64,
    /// Reads of `memory.current` per second (the watcher's debug summaries in the window).
    pub(crate) reads_per_s: Option<f64>,
    pub(crate) wakeups_per_s: Option<f64>,
    /// The same agent's threads, CPU % of a core each (name → %).
    pub(crate) threads: std::collections::BTreeMap<String, f64>,
}

fn thread_cpu_ns(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return m;
    };
    for t in rd.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        *m.entry(name.trim().to_string()).or_default() += ns;
    }
    m
}

/// `n` idle cgroups of `limit` bytes each under one sandbox, an agent in `mode` (process
/// policy never acts: nothing grows) guarding them; after arming and `settle`, its CPU over
/// `window`.
pub(crate) fn idle_row(
    n: usize,
    limit: u64,
    agent_exe: &Path,
    mode: &str,
    tripwire: bool,
    settle: Duration,
    window: Duration,
) -> Result<IdleRow, String> {
    let sb = Sandbox::new("bench-vm-idle").map_err(|e| e.to_string())?;
    let mut last = std::path::PathBuf::new();
    for i in 0..n {
        let cg = sb.child(&format!("c{i}")).map_err(|e| e.to_string())?;
        cg.set_limit(limit).map_err(|e| e.to_string())?;
        last = cg.path;
        if (i + 1) % 250 == 0 {
            progress(&format!("    {} cgroups made", i + 1));
        }
    }
    let root = sb.path().display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-vm-idle-{}", std::process::id());
    // `env` sets the log filter for the agent (Agent::spawn sets RUST_LOG=info for what it
    // runs): the watcher's 10 s summaries count its reads.
    let mut cmd = Command::new("env");
    cmd.arg("RUST_LOG=info,oomguard::headroom=debug");
    if !tripwire {
        cmd.arg("OOMGUARD_TEST_NO_TRIPWIRE=1");
    }
    cmd.arg(agent_exe)
        .args([
            "run",
            "--log-format",
            "json",
            "--root",
            &root,
            "--mode",
            mode,
        ])
        .args([
            "--policy",
            "noop",
            "--walk-interval",
            "3600",
            "--bpf-pin-dir",
            &pins,
        ]);
    let agent = Agent::spawn(cmd, None).map_err(|e| e.to_string())?;
    agent
        .wait_armed(&last, Duration::from_secs(600))
        .ok_or("not every cgroup was armed within 600 s")?;
    std::thread::sleep(settle);
    let is_summary = |r: &serde_json::Value| r["message"] == "v2 fallback watcher";
    let before = agent.count(is_summary);
    let c0 = thread_cpu_ns(agent.pid());
    let t0 = Instant::now();
    std::thread::sleep(window);
    let c1 = thread_cpu_ns(agent.pid());
    let elapsed = t0.elapsed().as_secs_f64();
    let delta = |k: &String, v: &u64| v.saturating_sub(c0.get(k).copied().unwrap_or(0));
    let total: u64 = c1.iter().map(|(k, v)| delta(k, v)).sum();
    let threads = c1
        .iter()
        .map(|(k, v)| (k.clone(), delta(k, v) as f64 / 1e9 / elapsed * 100.0))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    // The watcher's 10 s summaries logged during the window.
    let (mut polls, mut wakeups, mut secs) = (0.0, 0.0, 0.0);
    for r in agent
        .records()
        .into_iter()
        .filter(|r| is_summary(r))
        .skip(before)
    {
        polls += r["polls"].as_f64().unwrap_or(0.0);
        wakeups += r["wakeups"].as_f64().unwrap_or(0.0);
        secs += r["secs"].as_f64().unwrap_or(0.0);
    }
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(IdleRow {
        mode: mode.to_string(),
        tripwire,
        cgroups: n,
        limit_mib: limit / M,
        rss_kib,
        cpu_percent_of_core: total as f64 / 1e9 / elapsed * 100.0,
        window_s: elapsed,
        reads_per_s: (secs > 0.0).then(|| polls / secs),
        wakeups_per_s: (secs > 0.0).then(|| wakeups / secs),
        threads,
    })
}

/// Every guest scenario ([`scenarios`], or those whose name contains `only`) in every mode
/// of `modes`, `trials` trials each, in that order (all modes of a scenario side by side).
pub(crate) fn avoidance(
    modes: &[String],
    trials: u32,
    only: Option<&str>,
    agent: &Path,
    memhog: &Path,
) -> Result<Vec<AvoidanceRow>, String> {
    let list: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| only.is_none_or(|o| s.name.contains(o)))
        .collect();
    let mut rows = Vec::new();
    for (i, sc) in list.iter().enumerate() {
        for mode in modes {
            progress(&format!(
                "[{}/{}] {} — {mode}, {trials} trials",
                i + 1,
                list.len(),
                sc.name
            ));
            let t0 = Instant::now();
            let (row, _) = avoid(sc, mode, trials, agent, memhog)?;
            progress(&format!(
                "    guarded {}/{}, limit untouched {}/{}, kernel kills {} ({:.0} s)",
                row.guarded,
                row.trials,
                row.limit_untouched,
                row.trials,
                row.kernel_kills,
                t0.elapsed().as_secs_f64()
            ));
            rows.push(row);
        }
    }
    Ok(rows)
}
