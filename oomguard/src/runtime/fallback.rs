//! Killing a container without its runtime: SIGKILL every task of the container's cgroup
//! subtree directly (pidfd, start-time check, `process_mrelease`, as the process policy
//! does), in rounds until the cgroup is empty or the deadline passes. Used when containerd
//! is missing, unreachable or hung, or does not know the cgroup's container.
//!
//! On cgroup v2 (kernel 5.14+) one write of `cgroup.kill` kills the whole subtree, with no
//! pid to race, when nothing in it may be spared; the rounds then only confirm.
//!
//! Never the agent itself, never a task with `oom_score_adj = -1000`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup::MemCgroup;
use crate::kill::{Outcome, kill_task};
use crate::victim::{OOM_SCORE_ADJ_MIN, Task, read_task};

/// One task the fallback signalled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FallbackKill {
    pub pid: i32,
    pub comm: String,
    pub rss_bytes: u64,
    pub proccgroup: PathBuf,
    /// `Stuck` only means "signalled, not yet exited" here: the fallback does not wait per
    /// task; `gone_us` on the report is the confirmation for the whole cgroup.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What the fallback did to one container cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FallbackReport {
    pub cgroup: PathBuf,
    pub killed: Vec<FallbackKill>,
    /// Tasks left alone because their `oom_score_adj` is -1000.
    pub protected: Vec<i32>,
    /// Tasks (other than protected ones) still in the cgroup at the end.
    pub remaining: usize,
    /// From the call to the cgroup holding no killable task, when that happened in time.
    pub gone_us: Option<u64>,
    /// The tasks were killed by one write of `cgroup.kill` (v2).
    pub cgroup_kill: bool,
}

impl FallbackReport {
    pub fn took_effect(&self) -> bool {
        self.gone_us.is_some() && !self.killed.is_empty()
    }
}

/// SIGKILLs every task of `cgroup`'s subtree and waits (up to `timeout`) until none is left.
/// `memory_mount` maps `/proc/PID/cgroup` paths (to check each task is still inside).
pub fn fallback_kill_cgroup_tasks(
    cgroup: &Path,
    memory_mount: &Path,
    timeout: Duration,
) -> FallbackReport {
    let start = Instant::now();
    let deadline = start + timeout;
    let me = std::process::id() as i32;
    let cg = MemCgroup::new(cgroup);
    let mut report = FallbackReport {
        cgroup: cgroup.to_path_buf(),
        killed: Vec::new(),
        protected: Vec::new(),
        remaining: 0,
        gone_us: None,
        cgroup_kill: false,
    };
    let mut signalled: Vec<(i32, u64)> = Vec::new();
    let mut first = true;
    loop {
        let procs = cg.subtree_procs();
        let spares_us = procs.iter().any(|(_, pid)| *pid == me);
        let tasks: Vec<Task> = procs
            .into_iter()
            .filter(|(_, pid)| *pid != me)
            .filter_map(|(c, pid)| read_task(pid, &c.path))
            .filter(|t| {
                if t.oom_score_adj == OOM_SCORE_ADJ_MIN {
                    if !report.protected.contains(&t.pid) {
                        report.protected.push(t.pid);
                    }
                    return false;
                }
                true
            })
            .collect();
        // Done when no task but protected ones is left in the cgroup (the same measure as
        // the containerd path: the container's last process gone).
        if tasks.is_empty() {
            report.remaining = 0;
            report.gone_us = Some(start.elapsed().as_micros() as u64);
            return report;
        }
        if Instant::now() >= deadline {
            report.remaining = tasks.len();
            return report;
        }
        if std::mem::take(&mut first)
            && !spares_us
            && report.protected.is_empty()
            && cg.kill_all().is_ok()
        {
            report.cgroup_kill = true;
            let signal_us = start.elapsed().as_micros() as u64;
            for t in &tasks {
                signalled.push((t.pid, t.start_time));
                report.killed.push(FallbackKill {
                    pid: t.pid,
                    comm: t.comm.clone(),
                    rss_bytes: t.rss_bytes,
                    proccgroup: t.cgroup.clone(),
                    outcome: Outcome::Stuck {
                        mreleased: false,
                        pidfd: false,
                        signal_us,
                    },
                });
            }
        }
        // Exiting tasks (no mm any more) have already let go of their memory.
        for t in tasks.iter().filter(|t| !t.exiting) {
            if signalled.contains(&(t.pid, t.start_time)) {
                continue;
            }
            let outcome = kill_task(t, cgroup, memory_mount, Duration::ZERO);
            signalled.push((t.pid, t.start_time));
            report.killed.push(FallbackKill {
                pid: t.pid,
                comm: t.comm.clone(),
                rss_bytes: t.rss_bytes,
                proccgroup: t.cgroup.clone(),
                outcome,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
