//! The per-fault overhead: a fault-heavy process with no agent, the eventfd agent and the
//! eBPF agent, and each eBPF program's run time with BPF stats on.

use std::path::Path;
use std::time::{Duration, Instant};

use oomguard::cgroup::MemCgroup;
use oomguard_dev::sandbox::{Agent, Sandbox};
use serde::Serialize;

use crate::footprint::StateDir;
use crate::{M, progress};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct OverheadRow {
    /// `none`, `eventfd` or `ebpf`.
    pub(crate) agent: String,
    /// Whether the hog's cgroup is guarded (has a limit under the agent's root).
    pub(crate) guarded: bool,
    pub(crate) runs: usize,
    pub(crate) wall_median_ms: f64,
    /// Median over blocks of (this block's median / the same block's no-agent median).
    pub(crate) ratio_median: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProgramCost {
    pub(crate) program: String,
    pub(crate) runs: u64,
    pub(crate) mean_ns: f64,
    /// Runs per 4 KiB page faulted in.
    pub(crate) runs_per_page: f64,
}

/// Runs of each (agent, placement) per block.
pub(crate) const OVERHEAD_RUNS: usize = 3;

/// The per-fault overhead: `blocks` rounds, each running the hog with no agent, then each
/// agent mode (rotating the order every block so drift spreads evenly), in a guarded and an
/// unguarded cgroup. Then one more eBPF block with `kernel.bpf_stats_enabled=1` for the
/// programs' mean run time (the stats cost time of their own, so the timed blocks run without).
pub(crate) fn overhead_rows(
    modes: &[String],
    blocks: usize,
    bytes: u64,
    agent_exe: &Path,
) -> Result<(Vec<OverheadRow>, Vec<ProgramCost>), String> {
    let sb = Sandbox::new("bench-overhead").map_err(|e| e.to_string())?;
    let guarded = sb.child("guarded").map_err(|e| e.to_string())?;
    // Room for the hog: no threshold is ever crossed, the cost measured is the steady one.
    guarded
        .set_limit(bytes + 512 * M)
        .map_err(|e| e.to_string())?;
    let unguarded = sb.child("unguarded").map_err(|e| e.to_string())?;
    let mut agents: Vec<&str> = vec!["none"];
    agents.extend(
        modes
            .iter()
            .map(String::as_str)
            .filter(|m| *m != "kernel-only"),
    );
    let run_once = |cg: &MemCgroup| fault_in(cg, bytes as usize);
    let root = sb.path().display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-overhead-{}", std::process::id());
    let state = StateDir::new("overhead")?;
    let start_agent = |mode: &str| -> Result<Agent, String> {
        let mut flags = vec!["--root", &root, "--mode", mode, "--bpf-pin-dir", &pins];
        flags.extend(["--state-dir", state.path(), "--policy", "noop"]);
        let agent = Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?;
        agent
            .wait_armed(&guarded.path, Duration::from_secs(60))
            .ok_or("the guarded cgroup was not armed within 60 s")?;
        Ok(agent)
    };
    // (agent, guarded) → per-block medians.
    let mut medians: std::collections::BTreeMap<(String, bool), Vec<f64>> = Default::default();
    let mut all: std::collections::BTreeMap<(String, bool), Vec<f64>> = Default::default();
    for block in 0..blocks {
        let mut order = agents.clone();
        order.rotate_left(block % agents.len());
        for mode in order {
            let agent = match mode {
                "none" => None,
                m => Some(start_agent(m)?),
            };
            for (cg, is_guarded) in [(&guarded, true), (&unguarded, false)] {
                let mut times = Vec::new();
                for _ in 0..OVERHEAD_RUNS {
                    times.push(run_once(cg)?);
                }
                all.entry((mode.to_string(), is_guarded))
                    .or_default()
                    .extend(&times);
                medians
                    .entry((mode.to_string(), is_guarded))
                    .or_default()
                    .push(median(&mut times));
            }
            drop(agent);
            progress(&format!("    block {}/{blocks}: {mode} done", block + 1));
        }
    }
    let mut rows = Vec::new();
    for ((mode, is_guarded), per_block) in &medians {
        let base = &medians[&("none".to_string(), *is_guarded)];
        let mut ratios: Vec<f64> = per_block.iter().zip(base).map(|(m, b)| m / b).collect();
        let mut times = all[&(mode.clone(), *is_guarded)].clone();
        rows.push(OverheadRow {
            agent: mode.clone(),
            guarded: *is_guarded,
            runs: times.len(),
            wall_median_ms: median(&mut times),
            ratio_median: median(&mut ratios),
        });
    }
    let mut costs = Vec::new();
    if agents.contains(&"ebpf") {
        let agent = start_agent("ebpf")?;
        let stats = BpfStats::enable()?;
        let before = oomguard::cli::bpf::prog::programs(Path::new(&pins))
            .map_err(|e| oomguard::error_line(&e))?;
        for cg in [&guarded, &unguarded] {
            for _ in 0..OVERHEAD_RUNS {
                run_once(cg)?;
            }
        }
        let after = oomguard::cli::bpf::prog::programs(Path::new(&pins))
            .map_err(|e| oomguard::error_line(&e))?;
        drop(stats);
        drop(agent);
        let pages = (bytes / 4096) as f64 * 2.0 * OVERHEAD_RUNS as f64;
        for p in &after {
            let b = before.iter().find(|b| b.id == p.id);
            let runs = p.run_count.unwrap_or(0) - b.and_then(|b| b.run_count).unwrap_or(0);
            let ns = p.run_time_ns.unwrap_or(0) - b.and_then(|b| b.run_time_ns).unwrap_or(0);
            costs.push(ProgramCost {
                program: p.name.clone(),
                runs,
                mean_ns: if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                },
                runs_per_page: runs as f64 / pages,
            });
        }
    }
    Ok((rows, costs))
}

/// Forks a process into `cg` that faults in `bytes` of anonymous memory one 4 KiB page at a
/// time and exits; returns the whole process's wall time in ms. A forked child rather than
/// the memhog: the memhog fills every byte, which in a debug build costs more than the faults.
pub(crate) fn fault_in(cg: &MemCgroup, bytes: usize) -> Result<f64, String> {
    use std::os::unix::ffi::OsStrExt;
    let procs = std::ffi::CString::new(cg.file("cgroup.procs").as_os_str().as_bytes())
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    // SAFETY: the child only calls async-signal-safe functions (open, write, close, mmap,
    // _exit) and writes to memory it mapped itself; nothing is allocated after the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(2);
            }
            libc::close(fd);
            let p = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                libc::_exit(3);
            }
            let p = p.cast::<u8>();
            let mut off = 0;
            while off < bytes {
                std::ptr::write_volatile(p.add(off), 1);
                off += 4096;
            }
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("the faulting child failed (status {status:#x})"));
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `kernel.bpf_stats_enabled=1` while it lives; the previous value after.
pub(crate) struct BpfStats(pub(crate) String);

pub(crate) const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self, String> {
        let before = std::fs::read_to_string(BPF_STATS).map_err(|e| format!("{BPF_STATS}: {e}"))?;
        std::fs::write(BPF_STATS, "1").map_err(|e| format!("{BPF_STATS}: {e}"))?;
        Ok(Self(before.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}
