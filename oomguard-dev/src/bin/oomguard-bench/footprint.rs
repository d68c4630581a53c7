//! Footprint (RSS, CPU, time to arm at 10/100/1,000 idle cgroups), the soak, and the cost of
//! choosing a victim.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oomguard_dev::sandbox::{Agent, Sandbox, in_cgroup};
use oomguard_dev::soak;
use serde::Serialize;

use crate::{M, progress};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct FootprintRow {
    pub(crate) mode: String,
    pub(crate) cgroups: usize,
    /// The agent's first walk: list the cgroups, read their limits, register every
    /// threshold (from its "first walk done" record).
    pub(crate) arm_all_ms: f64,
    /// The first walk until every kill threshold was armed (every cgroup guarded); the
    /// reclaim thresholds are armed after them.
    pub(crate) guarded_ms: f64,
    /// From starting the agent's process to the last cgroup armed (includes loading eBPF).
    pub(crate) start_to_armed_ms: f64,
    pub(crate) rss_kib: u64,
    pub(crate) cpu_percent_of_core: f64,
    pub(crate) window_s: f64,
    /// RSS after this agent then killed 1,000 hogs (the full run's largest row only).
    pub(crate) rss_after_1000_kills_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakRow {
    pub(crate) mode: String,
    #[serde(flatten)]
    pub(crate) outcome: soak::Outcome,
    /// Entries of each pinned eBPF map after the soak (eBPF mode).
    pub(crate) bpf_map_entries: std::collections::BTreeMap<String, u64>,
    /// Cgroups with a limit (guarded) at the end: the kill cgroups.
    pub(crate) guarded_cgroups: usize,
    pub(crate) duration_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SelectionRow {
    pub(crate) tasks: usize,
    pub(crate) source: String,
    pub(crate) per_selection_us: f64,
    pub(crate) same_victim: Option<bool>,
}

/// CPU time of every thread of `pid` in nanoseconds (the first field of each thread's
/// `schedstat`): utime/stime count 10 ms ticks, too coarse for an idle agent.
pub(crate) fn proc_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Left to the agent after its first walk before the idle window starts (the guard
/// registers the reclaim eventfds, the state thread records the arming).
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

pub(crate) fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An agent guarding `n` idle cgroups: time to arm them all, then RSS and CPU over
/// `window_s`; with `kills`, then the RSS after it killed that many hogs.
pub(crate) fn footprint_row(
    n: usize,
    agent_exe: &Path,
    mode: &str,
    window_s: f64,
    kills: Option<(&Path, u64)>,
) -> Result<FootprintRow, String> {
    let sb = Sandbox::new("bench-idle").map_err(|e| e.to_string())?;
    let mut last = PathBuf::new();
    for i in 0..n {
        let cg = sb.child(&format!("c{i}")).map_err(|e| e.to_string())?;
        cg.set_limit(64 * M).map_err(|e| e.to_string())?;
        last = cg.path;
    }
    let root = sb.path().display().to_string();
    let t0 = Instant::now();
    let pins = format!("/sys/fs/bpf/oomguard-bench-idle-{}", std::process::id());
    let state = StateDir::new("idle")?;
    let mut flags = vec!["--root", &root, "--mode", mode, "--bpf-pin-dir", &pins];
    flags.extend(["--state-dir", state.path()]);
    // The soak's flags (process policy): nothing crosses a threshold while idle, and the
    // same agent can then kill.
    flags.extend_from_slice(soak::AGENT_ARGS);
    let agent = Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?;
    // Children are armed after the root, in walk order: the last one ends the arming.
    agent
        .wait_armed(&last, Duration::from_secs(60))
        .ok_or("not every cgroup was armed within 60 s")?;
    let start_to_armed_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let walk = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["message"] == "first walk done"
        })
        .ok_or("the agent did not log its first walk")?;
    let (Some(arm_all_ms), Some(guarded_ms)) =
        (walk["elapsed_ms"].as_f64(), walk["guarded_ms"].as_f64())
    else {
        return Err(format!("the first walk's record lacks its times: {walk}"));
    };
    std::thread::sleep(SETTLE);
    let c0 = proc_cpu_ns(agent.pid());
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(window_s));
    let cpu_ns = proc_cpu_ns(agent.pid()).saturating_sub(c0);
    let elapsed = w0.elapsed().as_secs_f64();
    let rss_kib = proc_rss_kib(agent.pid());
    let rss_after_1000_kills_kib = match kills {
        None => None,
        Some((memhog, n)) => {
            progress(&format!("footprint ({mode}): {n} kills"));
            let cgs =
                soak::kill_cgroups(&agent, &sb.cg, SOAK_CGROUPS).map_err(|e| e.to_string())?;
            let done = soak::kills(memhog, &cgs, n, SOAK_TIMEOUT, &mut |d| {
                progress(&format!("    {d}/{n} kills"))
            })
            .map_err(|e| oomguard::error_line(&e))?;
            progress(&format!(
                "    the agent killed {} hogs, the kernel {}",
                done.agent, done.kernel
            ));
            Some(proc_rss_kib(agent.pid()))
        }
    };
    Ok(FootprintRow {
        mode: mode.to_string(),
        cgroups: n,
        arm_all_ms,
        guarded_ms,
        start_to_armed_ms,
        rss_kib,
        cpu_percent_of_core: cpu_ns as f64 / 1e9 / elapsed * 100.0,
        window_s: elapsed,
        rss_after_1000_kills_kib,
    })
}

/// Cgroups the soak's hogs run in, one hog each at a time.
pub(crate) const SOAK_CGROUPS: usize = 4;
/// Bound on one phase of 1,000 kills.
pub(crate) const SOAK_TIMEOUT: Duration = Duration::from_secs(600);

/// A `--state-dir` of our own for an agent (so it never replaces the control socket of a
/// real agent), removed on drop.
pub(crate) struct StateDir(pub(crate) String);

impl StateDir {
    pub(crate) fn new(what: &str) -> Result<Self, String> {
        let dir =
            std::env::temp_dir().join(format!("oomguard-bench-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(StateDir(dir.display().to_string()))
    }

    pub(crate) fn path(&self) -> &str {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The soak in one mode: a warm-up, then `kills` kills and `cycles` cgroup create/delete
/// cycles against one agent, its footprint read before and after each phase.
pub(crate) fn soak_row(
    mode: &str,
    agent_exe: &Path,
    memhog: &Path,
    kills: u64,
    cycles: u64,
) -> Result<SoakRow, String> {
    let started = Instant::now();
    let sb = Sandbox::new("bench-soak").map_err(|e| e.to_string())?;
    let root = sb.path().display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-soak-{}", std::process::id());
    let state = StateDir::new("soak")?;
    let mut flags = vec!["--root", &root, "--mode", mode, "--bpf-pin-dir", &pins];
    flags.extend(["--state-dir", state.path()]);
    flags.extend_from_slice(soak::AGENT_ARGS);
    let agent = Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?;
    let plan = soak::Plan {
        kill_cgroups: SOAK_CGROUPS,
        warmup_kills: SOAK_WARMUP_KILLS,
        warmup_cycles: 100,
        kills,
        cycles,
        cycle_batch: 10,
    };
    progress(&format!(
        "soak ({mode}): warm-up {} kills and {} cycles, then {kills} kills and {cycles} cycles",
        plan.warmup_kills, plan.warmup_cycles
    ));
    let outcome = soak::run(&agent, &sb.cg, memhog, &plan, SOAK_TIMEOUT, &mut |line| {
        progress(&format!("    {line}"))
    })
    .map_err(|e| oomguard::error_line(&e))?;
    let bpf_map_entries = if mode == "ebpf" {
        bpf_map_entries(agent_exe, &pins)
    } else {
        Default::default()
    };
    let guarded_cgroups = sb
        .cg
        .subtree()
        .iter()
        .filter(|c| c.finite_limit().is_ok_and(|l| l.is_some()))
        .count();
    let f = |x: &soak::Footprint| {
        format!(
            "{} fds, RSS {} KiB (anon {} KiB), {} threads",
            x.fds, x.rss_kib, x.rss_anon_kib, x.threads
        )
    };
    progress(&format!("    after warm-up: {}", f(&outcome.before)));
    progress(&format!("    after kills:   {}", f(&outcome.after_kills)));
    progress(&format!("    after cycles:  {}", f(&outcome.after_cycles)));
    Ok(SoakRow {
        mode: mode.to_string(),
        outcome,
        bpf_map_entries,
        guarded_cgroups,
        duration_s: started.elapsed().as_secs_f64(),
    })
}

/// Warm-up kills: more decisions than the agent's recent-events ring holds, so the ring is
/// full before the baseline.
pub(crate) const SOAK_WARMUP_KILLS: u64 = oomguard::state::RECENT_EVENTS as u64 + 88;

/// `oomguard bpf map show --json`: entries per pinned map.
pub(crate) fn bpf_map_entries(
    agent_exe: &Path,
    pins: &str,
) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new(agent_exe)
        .args(["bpf", "map", "show", "--json", "--bpf-pin-dir", pins])
        .output();
    let maps: Vec<serde_json::Value> = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    maps.iter()
        .filter_map(|m| Some((m["name"].as_str()?.to_string(), m["entries"].as_u64()?)))
        .collect()
}

pub(crate) fn selection_rows(n: usize, memhog: &Path) -> Result<Vec<SelectionRow>, String> {
    let sb = Sandbox::new("bench-select").map_err(|e| e.to_string())?;
    // The score map must see the tasks start (fork tracepoint), so load it first.
    let pins = format!("/sys/fs/bpf/oomguard-bench-select-{}", std::process::id());
    let bpf = match oomguard::bpf::capabilities().reason() {
        None => Some(oomguard::bpf::EbpfGuard::load(Path::new(&pins)).map_err(|e| e.to_string())?),
        Some(_) => None,
    };
    let mut children = Vec::new();
    for i in 0..n {
        let mut cmd = Command::new(memhog);
        // One task clearly biggest, so "the same victim" has one right answer.
        let kib = if i == n / 2 { 8192 } else { 64 + (i % 97) * 4 };
        cmd.args(["--total", &format!("{kib}K"), "--chunk", "4K"])
            .stdout(Stdio::null());
        children.push(
            in_cgroup(&mut cmd, &sb.cg)
                .and_then(|c| c.spawn())
                .map_err(|e| e.to_string())?,
        );
    }
    // Let every task fault in its memory.
    std::thread::sleep(Duration::from_millis(500 + n as u64));
    let rounds = (2000 / n).clamp(3, 200);
    let limit = 1u64 << 30;
    let t0 = Instant::now();
    let mut proc_top = None;
    for _ in 0..rounds {
        let c = oomguard::victim::candidates(&sb.cg, limit, -1);
        proc_top = c.first().map(|c| c.task.pid);
    }
    let per_proc = t0.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let mut rows = vec![SelectionRow {
        tasks: n,
        source: "/proc".into(),
        per_selection_us: per_proc,
        same_victim: None,
    }];
    if let Some(bpf) = &bpf {
        let t0 = Instant::now();
        let mut map_top = None;
        for _ in 0..rounds {
            let c = oomguard::victim::candidates_from_map(&sb.cg, limit, -1, 8, |pids| {
                bpf.task_scores(pids)
                    .iter()
                    .map(|(p, s)| (*p, oomguard::victim::MapScore::from(s)))
                    .collect()
            });
            map_top = c.first().map(|c| c.task.pid);
        }
        rows.push(SelectionRow {
            tasks: n,
            source: "score map".into(),
            per_selection_us: t0.elapsed().as_secs_f64() * 1e6 / rounds as f64,
            same_victim: Some(map_top == proc_top),
        });
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(bpf) = bpf {
        let _ = bpf.unpin();
    }
    Ok(rows)
}
