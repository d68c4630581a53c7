//! Kernel-OOM avoidance: each scenario's trials with the kernel alone and with the agent in
//! each mode, and the wake-up → SIGKILL latency they give.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oomguard::cgroup::MemCgroup;
use oomguard::threshold::Margins;
use oomguard_dev::sandbox::{Agent, Sandbox, in_cgroup};
use serde::Serialize;

use crate::M;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct AvoidanceRow {
    pub(crate) scenario: String,
    pub(crate) mode: String,
    pub(crate) trials: u32,
    /// Killed by the agent with the kernel's oom_kill count unchanged.
    pub(crate) guarded: u32,
    /// memory.failcnt stayed 0.
    pub(crate) limit_untouched: u32,
    pub(crate) kernel_kills: u64,
    /// Peak usage past the kill threshold (0 when the peak stayed below it).
    pub(crate) overshoot_p50_kib: u64,
    pub(crate) overshoot_p99_kib: u64,
    /// Agent kills needed per trial (the many-process scenario), mean.
    pub(crate) kills_per_trial: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyRow {
    pub(crate) mode: String,
    pub(crate) samples: usize,
    pub(crate) signal_to_sigkill_p50_us: u64,
    pub(crate) signal_to_sigkill_p99_us: u64,
    pub(crate) signal_to_sigkill_max_us: u64,
    pub(crate) signal_to_gone_p50_us: u64,
    pub(crate) signal_to_gone_p99_us: u64,
    pub(crate) signal_to_gone_max_us: u64,
}

pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) limit: u64,
    /// Bytes per second per workload; 0 = unthrottled.
    pub(crate) rate: u64,
    pub(crate) margin_ratio: f64,
    pub(crate) min_margin: &'static str,
    pub(crate) burners: bool,
    /// Cgroups going over at once.
    pub(crate) cgroups: usize,
    /// Processes per cgroup growing together.
    pub(crate) procs: usize,
}

impl Scenario {
    /// One cgroup, one hog, the agent's default margins (2% of the limit, at least 1 MiB).
    pub(crate) fn single(name: &'static str, limit: u64, rate: u64) -> Scenario {
        Scenario {
            name,
            limit,
            rate,
            margin_ratio: 0.02,
            min_margin: "1M",
            burners: false,
            cgroups: 1,
            procs: 1,
        }
    }
}

pub(crate) fn scenarios(quick: bool) -> Vec<Scenario> {
    let base = Scenario::single;
    let mut v = vec![
        base("128MiB @64MB/s", 128 * M, 64_000_000),
        base("128MiB @256MB/s", 128 * M, 256_000_000),
        base("128MiB unthrottled", 128 * M, 0),
        base("32MiB 1MiB-margin unthrottled", 32 * M, 0),
    ];
    if !quick {
        v.push(Scenario {
            burners: true,
            ..base("128MiB @256MB/s + CPU burners", 128 * M, 256_000_000)
        });
        v.push(Scenario {
            burners: true,
            ..base("32MiB unthrottled + CPU burners", 32 * M, 0)
        });
        v.push(Scenario {
            cgroups: 10,
            ..base("10 cgroups x 128MiB @64MB/s", 128 * M, 64_000_000)
        });
        v.push(Scenario {
            procs: 50,
            ..base("50 procs x 4MB/s in 256MiB", 256 * M, 4_000_000)
        });
    }
    v
}

/// Busy loops on every core, killed on drop.
pub(crate) struct Burners(pub(crate) Vec<Child>);

impl Burners {
    fn start(n: usize) -> Result<Self, String> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(Burners(v))
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn wait_children(children: &mut [Child], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for c in children.iter_mut() {
        loop {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One avoidance row: `trials` trials of scenario `sc` in `mode`.
pub(crate) fn avoid(
    sc: &Scenario,
    mode: &str,
    trials: u32,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<(AvoidanceRow, Vec<(u64, u64)>), String> {
    let sb = Sandbox::new("bench").map_err(|e| e.to_string())?;
    let root = sb.path().display().to_string();
    let margins = Margins {
        ratio: sc.margin_ratio,
        min: sc
            .min_margin
            .parse::<oomguard::size::Size>()
            .map_or(M, |s| s.bytes()),
        max: 50 * M,
    };
    let th = margins.thresholds(sc.limit).ok_or("limit too small")?;
    let pins = format!("/sys/fs/bpf/oomguard-bench-{}", std::process::id());
    // `MODE+throttle`: the agent in MODE with `--v2-throttle` (v2 only).
    let (agent_mode, throttle) = match mode.split_once('+') {
        Some((m, "throttle")) => (m, true),
        _ => (mode, false),
    };
    let agent = if mode != "kernel-only" {
        let ratio = sc.margin_ratio.to_string();
        let mut flags = vec![
            "--root",
            &root,
            "--policy",
            "process",
            "--margin-ratio",
            &ratio,
            "--min-margin",
            sc.min_margin,
            "--walk-interval",
            "3600",
            "--mode",
            agent_mode,
            "--bpf-pin-dir",
            &pins,
        ];
        if throttle {
            flags.push("--v2-throttle");
        }
        Some(Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let _burners = if sc.burners {
        Some(Burners::start(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )?)
    } else {
        None
    };
    let mut row = AvoidanceRow {
        scenario: sc.name.to_string(),
        mode: mode.to_string(),
        trials: 0,
        guarded: 0,
        limit_untouched: 0,
        kernel_kills: 0,
        overshoot_p50_kib: 0,
        overshoot_p99_kib: 0,
        kills_per_trial: 0.0,
    };
    let mut overshoots = Vec::new();
    let mut lat = Vec::new();
    let mut total_kills = 0u64;
    for t in 0..trials {
        let mut cgs: Vec<MemCgroup> = Vec::new();
        for c in 0..sc.cgroups {
            let cg = sb.child(&format!("t{t}-{c}")).map_err(|e| e.to_string())?;
            cg.set_limit(sc.limit).map_err(|e| e.to_string())?;
            if let Some(a) = &agent
                && a.wait_armed(&cg.path, Duration::from_secs(10)).is_none()
            {
                return Err(format!("{} was not armed", cg.path.display()));
            }
            cgs.push(cg);
        }
        let per_proc_total = sc.limit * 2 / sc.procs as u64;
        let mut children = Vec::new();
        for cg in &cgs {
            for _ in 0..sc.procs {
                let mut cmd = Command::new(memhog);
                cmd.args([
                    "--rate",
                    &format!("{}B", sc.rate),
                    "--total",
                    &format!("{per_proc_total}B"),
                    "--hold",
                    "0",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
                let child = in_cgroup(&mut cmd, cg)
                    .and_then(|c| c.spawn())
                    .map_err(|e| e.to_string())?;
                children.push(child);
            }
        }
        wait_children(&mut children, Duration::from_secs(60));
        // Let the agent's decision records arrive.
        std::thread::sleep(Duration::from_millis(100));
        for cg in &cgs {
            row.trials += 1;
            let kernel = cg.subtree_oom_kills();
            row.kernel_kills += kernel;
            let path = cg.path.display().to_string();
            let kills: Vec<serde_json::Value> = agent
                .as_ref()
                .map(|a| {
                    a.decisions("kill")
                        .into_iter()
                        .filter(|d| d["oomcgroup"] == path.as_str())
                        .collect()
                })
                .unwrap_or_default();
            total_kills += kills.len() as u64;
            for d in &kills {
                let killed: Vec<serde_json::Value> =
                    serde_json::from_str(d["killed"].as_str().unwrap_or("[]")).unwrap_or_default();
                let gone = killed
                    .iter()
                    .find(|k| k["outcome"] == "exited")
                    .and_then(|k| k["exit_us"].as_u64());
                if let (Some(w), Some(g)) = (d["wake_to_kill_us"].as_u64(), gone) {
                    lat.push((w, w + g.saturating_sub(k_signal(&killed))));
                }
            }
            if kernel == 0 && !kills.is_empty() {
                row.guarded += 1;
            }
            if cg.failcnt().unwrap_or(1) == 0 {
                row.limit_untouched += 1;
            }
            let peak = cg.max_usage().unwrap_or(0);
            overshoots.push(peak.saturating_sub(th.kill) / 1024);
        }
        for cg in cgs.iter().rev() {
            let _ = std::fs::remove_dir(&cg.path);
        }
    }
    overshoots.sort_unstable();
    row.overshoot_p50_kib = percentile(&overshoots, 0.5);
    row.overshoot_p99_kib = percentile(&overshoots, 0.99);
    row.kills_per_trial = total_kills as f64 / f64::from(row.trials.max(1));
    Ok((row, lat))
}

/// Microseconds from the start of the first kill attempt to its signal.
pub(crate) fn k_signal(killed: &[serde_json::Value]) -> u64 {
    killed
        .iter()
        .find(|k| k["outcome"] == "exited")
        .and_then(|k| k["signal_us"].as_u64())
        .unwrap_or(0)
}

pub(crate) fn latency_row(mode: &str, samples: &[(u64, u64)]) -> LatencyRow {
    let mut kill: Vec<u64> = samples.iter().map(|s| s.0).collect();
    let mut gone: Vec<u64> = samples.iter().map(|s| s.1).collect();
    kill.sort_unstable();
    gone.sort_unstable();
    LatencyRow {
        mode: mode.to_string(),
        samples: samples.len(),
        signal_to_sigkill_p50_us: percentile(&kill, 0.5),
        signal_to_sigkill_p99_us: percentile(&kill, 0.99),
        signal_to_sigkill_max_us: kill.last().copied().unwrap_or(0),
        signal_to_gone_p50_us: percentile(&gone, 0.5),
        signal_to_gone_p99_us: percentile(&gone, 0.99),
        signal_to_gone_max_us: gone.last().copied().unwrap_or(0),
    }
}
