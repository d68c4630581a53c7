//! The "no growth" soak, for `oomguard-bench --soak` and `tests/soak.rs`: many kills and
//! many cgroup create/delete cycles driven against a running agent, and the agent's
//! footprint (open fds, RSS, threads) read from /proc before and after. A leak of an
//! eventfd, a `cgroup.event_control` fd or a per-cgroup record shows up here as growth.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::sandbox::{Agent, in_cgroup};
use oomguard::cgroup::{CgroupError, MemCgroup};

/// Flags for the agent under soak (besides `--root`, `--mode` and where it keeps state):
/// the process policy, a short cooldown so one cgroup can see many kills per second, a
/// margin wide enough that the agent, not the kernel, wins every race, and no periodic
/// rescan, so that only inotify drives discovery.
pub const AGENT_ARGS: &[&str] = &[
    "--policy",
    "process",
    "--cooldown-ms",
    "50",
    "--min-margin",
    "4M",
    "--walk-interval",
    "3600",
];

/// The limit of every soak cgroup: small, so that a hog crosses the threshold in a few
/// milliseconds.
pub const LIMIT: u64 = 16 << 20;

/// How fast a hog grows: its margin (4 MiB) lasts 20 ms, time enough for the agent to win
/// the race on a busy machine, and the threshold (12 MiB) is reached in 60 ms.
const HOG_RATE: &str = "200M";

/// How many kills and create/delete cycles, and in how many cgroups at once.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Cgroups with a hog each, killed and restarted over and over.
    pub kill_cgroups: usize,
    /// Kills and cycles before the baseline is read: they fault in the kill and arm paths
    /// and grow the agent's maps to their working size; more kills than the agent's
    /// recent-events ring holds ([`oomguard::state::RECENT_EVENTS`]) also fill that ring.
    pub warmup_kills: u64,
    pub warmup_cycles: u64,
    pub kills: u64,
    pub cycles: u64,
    /// Cgroups made (and armed) together in one cycle step, then removed together.
    pub cycle_batch: usize,
}

/// The agent's footprint at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Entries of /proc/PID/fd.
    pub fds: usize,
    /// VmRSS.
    pub rss_kib: u64,
    /// RssAnon: heap and stacks, where a leak would grow.
    pub rss_anon_kib: u64,
    pub threads: u64,
}

#[derive(Debug, Error)]
pub enum SoakError {
    #[error("cannot read the agent's footprint in /proc/{pid}")]
    Proc {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot start {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("the agent killed {agent} of {hogs} hogs; the kernel killed {kernel}")]
    AgentLost { agent: u64, hogs: u64, kernel: u64 },
}

/// How long the fd count must hold still to count as the baseline.
const QUIET: Duration = Duration::from_millis(500);

impl Footprint {
    /// Reads /proc/PID/status and /proc/PID/fd.
    pub fn of(pid: u32) -> Result<Footprint, SoakError> {
        let err = |source| SoakError::Proc { pid, source };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(err)?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map_err(err)?
            .count();
        Ok(Footprint {
            fds,
            rss_kib: field("VmRSS"),
            rss_anon_kib: field("RssAnon"),
            threads: field("Threads"),
        })
    }

    /// Reads the footprint once the fd count has held still for half a second (bounded by
    /// `timeout`): the baseline, after the last warm-up cycle's eventfds are closed.
    pub fn quiet(pid: u32, timeout: Duration) -> Result<Footprint, SoakError> {
        let deadline = Instant::now() + timeout;
        let mut last = Footprint::of(pid)?;
        let mut since = Instant::now();
        while Instant::now() < deadline && since.elapsed() < QUIET {
            std::thread::sleep(Duration::from_millis(20));
            let f = Footprint::of(pid)?;
            if f.fds != last.fds {
                since = Instant::now();
            }
            last = f;
        }
        Ok(last)
    }

    /// Waits up to `timeout` until the agent holds at most `fds` open files (closing the
    /// eventfds of a removed cgroup takes the guard one wake-up), then reads the footprint.
    /// With a leak it returns the higher count once `timeout` has passed.
    pub fn settled(pid: u32, fds: usize, timeout: Duration) -> Result<Footprint, SoakError> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = Footprint::of(pid)?;
            if f.fds <= fds || Instant::now() >= deadline {
                return Ok(f);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a run of kills did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Kills {
    /// Hogs the agent killed (SIGKILL while the kernel's oom_kill count stayed the same).
    pub agent: u64,
    /// Hogs the kernel's OOM killer killed instead.
    pub kernel: u64,
    pub hogs: u64,
}

/// Hogs running in cgroups, killed and reaped when dropped.
struct Running(Vec<Option<(Child, u64)>>);

impl Drop for Running {
    fn drop(&mut self) {
        for (c, _) in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `oomguard-memhog` hogs that outgrow [`LIMIT`], one at a time in each of `cgroups`
/// and all cgroups at once, until the agent has killed `n` of them. Gives up after
/// `timeout`, or when the kernel rather than the agent killed too many.
pub fn kills(
    memhog: &Path,
    cgroups: &[MemCgroup],
    n: u64,
    timeout: Duration,
    progress: &mut dyn FnMut(u64),
) -> Result<Kills, SoakError> {
    let deadline = Instant::now() + timeout;
    let mut done = Kills::default();
    let mut running = Running(cgroups.iter().map(|_| None).collect());
    let total = format!("{}B", 2 * LIMIT);
    let mut in_flight = 0u64;
    while done.agent < n {
        for (slot, cg) in running.0.iter_mut().zip(cgroups) {
            if let Some((child, kernel_before)) = slot {
                let Ok(Some(status)) = child.try_wait() else {
                    continue;
                };
                done.hogs += 1;
                in_flight -= 1;
                if cg.subtree_oom_kills() > *kernel_before {
                    done.kernel += 1;
                } else if std::os::unix::process::ExitStatusExt::signal(&status)
                    == Some(libc::SIGKILL)
                {
                    done.agent += 1;
                    if done.agent % 100 == 0 {
                        progress(done.agent);
                    }
                }
                *slot = None;
            } else if done.agent + in_flight < n {
                let mut cmd = Command::new(memhog);
                cmd.args(["--total", &total, "--rate", HOG_RATE, "--hold", "0"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let kernel_before = cg.subtree_oom_kills();
                let child = in_cgroup(&mut cmd, cg)
                    .and_then(|c| c.spawn())
                    .map_err(|source| SoakError::Spawn {
                        exe: memhog.to_path_buf(),
                        source,
                    })?;
                *slot = Some((child, kernel_before));
                in_flight += 1;
            }
        }
        // The agent must win nearly every race: a few kernel kills are the notifier's lag,
        // many mean the agent is not guarding.
        if done.hogs >= 20 && done.agent * 10 < done.hogs * 9 {
            return Err(SoakError::AgentLost {
                agent: done.agent,
                hogs: done.hogs,
                kernel: done.kernel,
            });
        }
        if Instant::now() >= deadline {
            return Err(SoakError::Timeout {
                what: format!("the agent killed only {} of {n} hogs", done.agent),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(done)
}

/// `n` times: makes a cgroup beneath `parent` with a limit, waits until the agent has armed
/// it, removes it and waits until the agent has disarmed it; `batch` cgroups at a time.
/// Each wait is bounded by `step_timeout`.
pub fn cycles(
    agent: &Agent,
    parent: &MemCgroup,
    n: u64,
    batch: usize,
    step_timeout: Duration,
    progress: &mut dyn FnMut(u64),
) -> Result<(), SoakError> {
    let mut done = 0u64;
    let mut serial = 0u64;
    while done < n {
        let size = (batch.max(1) as u64).min(n - done);
        let mut made = Vec::new();
        for _ in 0..size {
            serial += 1;
            let path = parent
                .path
                .join(format!("cycle-{}-{serial}", std::process::id()));
            std::fs::create_dir(&path).map_err(|source| CgroupError::Write {
                path: path.clone(),
                source,
            })?;
            let cg = MemCgroup::new(path);
            made.push(cg.clone());
            cg.set_limit(LIMIT)?;
        }
        let result = wait_all(agent, &made, "armed", step_timeout);
        for cg in &made {
            remove(cg);
        }
        result?;
        wait_all(agent, &made, "cgroup removed; disarmed", step_timeout)?;
        let before = done;
        done += size;
        if done / 100 > before / 100 {
            progress(done);
        }
    }
    Ok(())
}

/// Waits until the agent has logged `message` for every one of `cgroups`.
fn wait_all(
    agent: &Agent,
    cgroups: &[MemCgroup],
    message: &str,
    timeout: Duration,
) -> Result<(), SoakError> {
    let left: RefCell<HashSet<String>> = RefCell::new(
        cgroups
            .iter()
            .map(|c| c.path.display().to_string())
            .collect(),
    );
    let seen = agent.wait_for(timeout, |v| {
        if v["message"] == message
            && let Some(p) = v["cgroup"].as_str()
        {
            left.borrow_mut().remove(p);
        }
        left.borrow().is_empty()
    });
    match seen {
        Some(_) => Ok(()),
        None => Err(SoakError::Timeout {
            what: format!(
                "the agent did not log {message:?} for {}",
                left.borrow()
                    .iter()
                    .next()
                    .map_or("a cgroup", String::as_str)
            ),
            secs: timeout.as_secs(),
        }),
    }
}

/// Removes an empty cgroup, retrying briefly while the kernel still holds it busy.
fn remove(cg: &MemCgroup) {
    for _ in 0..50 {
        match std::fs::remove_dir(&cg.path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The soak's result: footprint after the warm-up, after the kills and after the cycles.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub plan: Plan,
    pub kills: Kills,
    pub cycles: u64,
    pub before: Footprint,
    pub after_kills: Footprint,
    pub after_cycles: Footprint,
    pub warmup_s: f64,
    pub kills_s: f64,
    pub cycles_s: f64,
}

/// How long the agent may take to close what a finished phase left open.
const SETTLE: Duration = Duration::from_secs(10);

/// Makes the cgroups whose hogs [`kills`] runs: `kill-0`... beneath `root`, with [`LIMIT`],
/// and waits until the agent has armed them.
pub fn kill_cgroups(
    agent: &Agent,
    root: &MemCgroup,
    n: usize,
) -> Result<Vec<MemCgroup>, SoakError> {
    let mut cgroups = Vec::new();
    for i in 0..n {
        let path = root.path.join(format!("kill-{i}"));
        std::fs::create_dir(&path).map_err(|source| CgroupError::Write {
            path: path.clone(),
            source,
        })?;
        let cg = MemCgroup::new(path);
        cgroups.push(cg.clone());
        cg.set_limit(LIMIT)?;
    }
    wait_all(agent, &cgroups, "armed", SETTLE)?;
    Ok(cgroups)
}

/// Runs `plan` against `agent`, which guards `root` with [`AGENT_ARGS`]: makes the kill
/// cgroups beneath `root`, warms up, reads the baseline, then kills and cycles, reading the
/// footprint after each phase. Each kill phase is bounded by `timeout`; `progress` gets a
/// line per 100 kills or cycles.
pub fn run(
    agent: &Agent,
    root: &MemCgroup,
    memhog: &Path,
    plan: &Plan,
    timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<Outcome, SoakError> {
    let started = Instant::now();
    let cgroups = kill_cgroups(agent, root, plan.kill_cgroups)?;
    let pid = agent.pid();
    kills(memhog, &cgroups, plan.warmup_kills, timeout, &mut |d| {
        progress(&format!("warm-up kills {d}/{}", plan.warmup_kills))
    })?;
    cycles(
        agent,
        root,
        plan.warmup_cycles,
        plan.cycle_batch,
        SETTLE,
        &mut |d| progress(&format!("warm-up cycles {d}/{}", plan.warmup_cycles)),
    )?;
    let warmup_s = started.elapsed().as_secs_f64();
    let before = Footprint::quiet(pid, SETTLE)?;
    let t = Instant::now();
    let kills = kills(memhog, &cgroups, plan.kills, timeout, &mut |d| {
        progress(&format!("kills {d}/{}", plan.kills))
    })?;
    let kills_s = t.elapsed().as_secs_f64();
    let after_kills = Footprint::settled(pid, before.fds, SETTLE)?;
    let t = Instant::now();
    cycles(
        agent,
        root,
        plan.cycles,
        plan.cycle_batch,
        SETTLE,
        &mut |d| progress(&format!("cycles {d}/{}", plan.cycles)),
    )?;
    let cycles_s = t.elapsed().as_secs_f64();
    let after_cycles = Footprint::settled(pid, before.fds, SETTLE)?;
    Ok(Outcome {
        plan: plan.clone(),
        kills,
        cycles: plan.cycles,
        before,
        after_kills,
        after_cycles,
        warmup_s,
        kills_s,
        cycles_s,
    })
}
