//! Issue 13's rows: an OOM storm (40 cgroups at once) and a stuck neighbour (a victim that
//! never exits while other cgroups are guarded).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oomguard_dev::sandbox::{Agent, Sandbox};
use serde::Serialize;

use crate::avoid::{Scenario, avoid, percentile, wait_children};
use crate::differential::{Kids, spawn_in, wait_rss};
use crate::md::{Table, cells};
use crate::report::{Machine, write_rows};
use crate::{M, progress};

/// The OOM storm (issue 13): cgroups of 64 MiB hitting their limits at once, a hog each at
/// 256 MB/s, process policy; storms per mode, the kernel alone beside each agent mode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StormRow {
    pub(crate) mode: String,
    pub(crate) cgroups: usize,
    /// Per storm: killed by the agent with the kernel's count unchanged.
    pub(crate) guarded: Vec<u32>,
    /// Per storm: the kernel's own OOM kills.
    pub(crate) kernel_kills: Vec<u64>,
    pub(crate) wake_to_sigkill_p50_us: u64,
    pub(crate) wake_to_sigkill_p99_us: u64,
    pub(crate) wake_to_sigkill_max_us: u64,
}

pub(crate) const STORM_CGROUPS: usize = 40;
pub(crate) const STORMS: u32 = 3;

/// `--only storm`: the storm rows, written to their own report.
pub(crate) fn storm(
    machine: &Machine,
    agent: &Path,
    memhog: &Path,
    out: Option<PathBuf>,
) -> Result<(), String> {
    let sc = Scenario {
        cgroups: STORM_CGROUPS,
        ..Scenario::single("storm", 64 * M, 256_000_000)
    };
    let mut rows = Vec::new();
    for mode in &machine.modes {
        let mut row = StormRow {
            mode: mode.clone(),
            cgroups: STORM_CGROUPS,
            guarded: Vec::new(),
            kernel_kills: Vec::new(),
            wake_to_sigkill_p50_us: 0,
            wake_to_sigkill_p99_us: 0,
            wake_to_sigkill_max_us: 0,
        };
        let mut kills = Vec::new();
        for s in 1..=STORMS {
            progress(&format!(
                "OOM storm {s}/{STORMS} ({mode}): {STORM_CGROUPS} cgroups of 64 MiB at 256 MB/s"
            ));
            let (r, lat) = avoid(&sc, mode, 1, agent, memhog)?;
            progress(&format!(
                "    guarded {}/{}, kernel kills {}",
                r.guarded, r.trials, r.kernel_kills
            ));
            row.guarded.push(r.guarded);
            row.kernel_kills.push(r.kernel_kills);
            kills.extend(lat.iter().map(|l| l.0));
        }
        kills.sort_unstable();
        row.wake_to_sigkill_p50_us = percentile(&kills, 0.5);
        row.wake_to_sigkill_p99_us = percentile(&kills, 0.99);
        row.wake_to_sigkill_max_us = kills.last().copied().unwrap_or(0);
        rows.push(row);
    }
    let mut table = Table::new(&[
        "mode",
        "guarded per storm",
        "kernel kills per storm",
        "wake→SIGKILL p50",
        "p99",
        "max",
    ]);
    for r in &rows {
        let list = |v: Vec<String>| v.join(", ");
        table.row(cells![
            r.mode,
            format!(
                "{} of {}",
                list(r.guarded.iter().map(u32::to_string).collect()),
                r.cgroups
            ),
            list(r.kernel_kills.iter().map(u64::to_string).collect()),
            format!("{} µs", r.wake_to_sigkill_p50_us),
            format!("{} µs", r.wake_to_sigkill_p99_us),
            format!("{} µs", r.wake_to_sigkill_max_us)
        ]);
    }
    write_rows(
        &rows,
        machine,
        &table.to_string(),
        out,
        "bench-results/storm.json",
    )
}

/// A "stuck neighbour": one cgroup's victim frozen (SIGKILL pending, never exiting, its
/// wait held for a minute) while hogs in other cgroups cross one after another.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NeighbourRow {
    pub(crate) mode: String,
    pub(crate) trials: u32,
    pub(crate) guarded: u32,
    pub(crate) kernel_kills: u64,
    /// The frozen victim was still there (signalled, not gone) after the last trial.
    pub(crate) victim_still_stuck: bool,
    pub(crate) wake_to_sigkill_p50_us: u64,
    pub(crate) wake_to_sigkill_p99_us: u64,
    pub(crate) wake_to_sigkill_max_us: u64,
}

pub(crate) const NEIGHBOUR_TRIALS: u32 = 10;

/// A cgroup v1 freezer cgroup for the bench's stuck victim; thawed and removed on drop.
pub(crate) struct FreezerCg(pub(crate) PathBuf);

impl FreezerCg {
    fn make() -> Result<FreezerCg, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let rel = own
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':').skip(1);
                f.next().zip(f.next())
            })
            .find(|(c, _)| c.split(',').any(|c| c == "freezer"))
            .map(|(_, p)| p.trim_start_matches('/').to_string())
            .ok_or("no cgroup v1 freezer hierarchy")?;
        let dir = Path::new("/sys/fs/cgroup/freezer")
            .join(rel)
            .join(format!("oomguard-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(FreezerCg(dir))
    }

    fn freeze(&self, pid: u32) -> Result<(), String> {
        let w =
            |f: &str, v: &str| std::fs::write(self.0.join(f), v).map_err(|e| format!("{f}: {e}"));
        w("cgroup.procs", &pid.to_string())?;
        w("freezer.state", "FROZEN")?;
        for _ in 0..500 {
            let s = std::fs::read_to_string(self.0.join("freezer.state")).unwrap_or_default();
            if s.trim() == "FROZEN" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("the freezer never froze the victim".into())
    }
}

impl Drop for FreezerCg {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) fn sigkill_pending(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("ShdPnd:"))
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .any(|mask| mask & (1 << (libc::SIGKILL - 1)) != 0)
}

/// `--only neighbour`: per agent mode, a frozen victim and then hogs in other cgroups.
pub(crate) fn neighbour(
    machine: &Machine,
    agent_exe: &Path,
    memhog: &Path,
    out: Option<PathBuf>,
) -> Result<(), String> {
    let mut rows = Vec::new();
    for mode in machine.modes.iter().filter(|m| m.as_str() != "kernel-only") {
        progress(&format!(
            "stuck neighbour ({mode}): a frozen victim, then {NEIGHBOUR_TRIALS} hogs in other cgroups"
        ));
        let freezer = FreezerCg::make()?;
        let sb = Sandbox::new("bench-neighbour").map_err(|e| e.to_string())?;
        let root = sb.path().display().to_string();
        let pins = format!("/sys/fs/bpf/oomguard-bench-{}", std::process::id());
        let a = Agent::start(
            agent_exe,
            &[
                "--root",
                &root,
                "--policy",
                "process",
                "--margin-ratio",
                "0.1",
                "--kill-timeout-ms",
                "60000",
                "--walk-interval",
                "3600",
                "--mode",
                mode,
                "--bpf-pin-dir",
                &pins,
            ],
            None,
        )
        .map_err(|e| e.to_string())?;
        let stuck = sb.child("stuck").map_err(|e| e.to_string())?;
        stuck.set_limit(128 * M).map_err(|e| e.to_string())?;
        if a.wait_armed(&stuck.path, Duration::from_secs(10)).is_none() {
            return Err("the stuck cgroup was not armed".into());
        }
        let mut kids = Kids(Vec::new());
        kids.0.push(spawn_in(&stuck, memhog, &["--total", "70M"])?);
        let victim = kids.0[0].id();
        wait_rss(&kids.0[0], 70 * M, Duration::from_secs(10));
        freezer.freeze(victim)?;
        kids.0.push(spawn_in(
            &stuck,
            memhog,
            &["--rate", "20M", "--total", "52M"],
        )?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sigkill_pending(victim) {
            if Instant::now() > deadline {
                return Err("the frozen victim was never signalled".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut row = NeighbourRow {
            mode: mode.clone(),
            trials: 0,
            guarded: 0,
            kernel_kills: 0,
            victim_still_stuck: false,
            wake_to_sigkill_p50_us: 0,
            wake_to_sigkill_p99_us: 0,
            wake_to_sigkill_max_us: 0,
        };
        let mut lat = Vec::new();
        for t in 0..NEIGHBOUR_TRIALS {
            let cg = sb.child(&format!("n{t}")).map_err(|e| e.to_string())?;
            cg.set_limit(128 * M).map_err(|e| e.to_string())?;
            if a.wait_armed(&cg.path, Duration::from_secs(10)).is_none() {
                return Err(format!("{} was not armed", cg.path.display()));
            }
            let mut hog = [spawn_in(
                &cg,
                memhog,
                &["--rate", "256M", "--total", "256M", "--hold", "0"],
            )?];
            wait_children(&mut hog, Duration::from_secs(30));
            let path = cg.path.display().to_string();
            let d = a.wait_for(Duration::from_secs(5), |v| {
                v["message"] == "decision"
                    && v["action"] == "kill"
                    && v["oomcgroup"] == path.as_str()
            });
            row.trials += 1;
            let kernel = cg.subtree_oom_kills();
            row.kernel_kills += kernel;
            if let Some(d) = d {
                if kernel == 0 {
                    row.guarded += 1;
                }
                lat.extend(d["wake_to_kill_us"].as_u64());
            }
            let _ = std::fs::remove_dir(&cg.path);
        }
        row.victim_still_stuck = sigkill_pending(victim);
        lat.sort_unstable();
        row.wake_to_sigkill_p50_us = percentile(&lat, 0.5);
        row.wake_to_sigkill_p99_us = percentile(&lat, 0.99);
        row.wake_to_sigkill_max_us = lat.last().copied().unwrap_or(0);
        progress(&format!(
            "    guarded {}/{}, kernel kills {}, wake→SIGKILL p50 {} µs p99 {} µs",
            row.guarded,
            row.trials,
            row.kernel_kills,
            row.wake_to_sigkill_p50_us,
            row.wake_to_sigkill_p99_us
        ));
        drop(freezer);
        drop(kids);
        rows.push(row);
    }
    let mut table = Table::new(&[
        "mode",
        "neighbours guarded",
        "kernel kills",
        "victim still stuck",
        "wake→SIGKILL p50",
        "p99",
        "max",
    ]);
    for r in &rows {
        table.row(cells![
            r.mode,
            format!("{}/{}", r.guarded, r.trials),
            r.kernel_kills,
            r.victim_still_stuck,
            format!("{} µs", r.wake_to_sigkill_p50_us),
            format!("{} µs", r.wake_to_sigkill_p99_us),
            format!("{} µs", r.wake_to_sigkill_max_us)
        ]);
    }
    write_rows(
        &rows,
        machine,
        &table.to_string(),
        out,
        "bench-results/neighbour.json",
    )
}
