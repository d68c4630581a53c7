//! Everything after the signal, off the real-time thread: `process_mrelease`, waiting for
//! the victim's exit, the container policy's runtime calls and their fallback, reading
//! `/proc` for the record, reporting. Each job answers the guard thread (a channel and its
//! command eventfd) so the cgroup's "acting" state ends; a job that blocks (a victim in D
//! state, a hung runtime, a `process_mrelease` waiting on `mmap_lock`) holds one worker,
//! never the guard thread nor another cgroup's job: the pool grows while every worker is
//! busy.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::GuardStats;
use crate::cgroup::MemCgroup;
use crate::kill::{Outcome, Signalled, confirm};
use crate::report::{Action, ContainerKill, Decision, Killed, Reporter};
use crate::runtime::{RuntimeClient, fallback_kill_cgroup_tasks};
use crate::victim::Candidate;

/// Bound on identifying the container on the kill path: labels are normally cached when the
/// cgroup is armed (prefetch), so a runtime that does not answer this fast is treated as
/// hung and the container's tasks are killed directly.
pub(super) const PLAN_TIMEOUT: Duration = Duration::from_millis(250);
/// Bound on containerd's kill (measured here: 35-76 ms to the last process gone).
pub(super) const RUNTIME_TIMEOUT: Duration = Duration::from_millis(500);
/// Workers kept while idle: enough for a few cgroups acting at once without a spawn.
const MIN_WORKERS: usize = 2;
/// At most this many (each stuck job holds one); further jobs queue.
const MAX_WORKERS: usize = 32;
/// An extra worker idle this long ends.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// Workers read /proc, cgroupfs and talk to the runtime client thread: no deep stacks.
const STACK: usize = 256 << 10;

pub(super) enum Job {
    /// A task the guard thread signalled: reap, wait for the exit, report.
    Confirm {
        path: PathBuf,
        seq: u64,
        sent: Signalled,
        victim: Candidate,
        cgroup: MemCgroup,
        decision: Box<Decision>,
        timeout: Duration,
        /// How long before the crossing the victim was made ready (`None`: ranked at it).
        ready_for: Option<Duration>,
    },
    /// The container policy for a pressing cgroup: choose the container, kill it through
    /// the runtime or directly, report.
    Container {
        path: PathBuf,
        seq: u64,
        woke: Instant,
        overshoot: u64,
        margin: u64,
        decision: Box<Decision>,
        timeout: Duration,
    },
}

/// A job's answer to the guard thread.
pub(super) struct Done {
    pub path: PathBuf,
    pub seq: u64,
    pub result: Result,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Result {
    /// The victim exited, or `process_mrelease` gave its memory back: the cgroup may act
    /// again (its next reading sets the level further growth must pass).
    Gone,
    /// Signalled but not gone by the timeout: waited for through its pidfd (or until the
    /// cooldown).
    Stuck,
    /// The container policy killed (or tried and failed: `killed` false).
    Container { killed: bool },
    /// No container to kill here (why, for the record): the process policy acts.
    NotContainer(String),
}

/// What every job needs besides its own data.
pub(super) struct Context {
    pub reporter: Reporter,
    pub memory_mount: PathBuf,
    pub runtime: Option<Arc<RuntimeClient>>,
    pub self_cgroup: Option<PathBuf>,
    pub stats: Arc<GuardStats>,
    pub answer: Sender<Done>,
    /// The guard's command eventfd: written after each answer.
    pub wake: Arc<OwnedFd>,
}

struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    ctx: Context,
}

pub(super) struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Starts the pool's first workers (before the guard thread goes real-time: threads
    /// inherit the scheduling policy of the thread that makes them).
    pub fn new(ctx: Context) -> Pool {
        let pool = Pool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                }),
                ready: Condvar::new(),
                ctx,
            }),
        };
        for _ in 0..MIN_WORKERS {
            start(&pool.shared);
        }
        pool
    }

    /// Queues a job; never blocks on a worker and never spawns one (a worker does that).
    pub fn submit(&self, job: Job) {
        let mut q = lock(&self.shared.queue);
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
    }
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    // A worker that panicked left the queue consistent (it is only pushed and popped).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts and starts one worker (false when the pool is full or the thread cannot start).
fn start(shared: &Arc<Shared>) -> bool {
    {
        let mut q = lock(&shared.queue);
        if q.threads >= MAX_WORKERS {
            return false;
        }
        q.threads += 1;
    }
    let s = shared.clone();
    let started = std::thread::Builder::new()
        .name("oomguard-act".into())
        .stack_size(STACK)
        .spawn(move || work(&s));
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start a kill worker");
        lock(&shared.queue).threads -= 1;
        return false;
    }
    true
}

fn work(shared: &Arc<Shared>) {
    // Made by the guard thread or by another worker: normal priority, whatever they run at.
    let _ = crate::sys::set_normal();
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break Some((job, q.idle == 0));
                }
                q.idle += 1;
                let (g, timeout) = shared
                    .ready
                    .wait_timeout(q, IDLE_EXIT)
                    .unwrap_or_else(|e| e.into_inner());
                q = g;
                q.idle -= 1;
                if timeout.timed_out() && q.jobs.is_empty() && q.threads > MIN_WORKERS {
                    q.threads -= 1;
                    break None;
                }
            }
        };
        let Some((job, more)) = job else {
            crate::sys::unlock_own_stack();
            return;
        };
        // No other worker idle: one more stands by for the next job while this one may
        // block (the guard thread never waits for a thread to start).
        if more {
            start(shared);
        }
        let done = run(&shared.ctx, job);
        if shared.ctx.answer.send(done).is_ok() {
            let _ = rustix::io::write(shared.ctx.wake.as_fd(), &1u64.to_ne_bytes());
        }
    }
}

fn run(ctx: &Context, job: Job) -> Done {
    match job {
        Job::Confirm {
            path,
            seq,
            sent,
            victim,
            cgroup,
            mut decision,
            timeout,
            ready_for,
        } => {
            if decision.stats.is_empty() {
                // Read just after the signal, as near the decision as the guard thread
                // could have without delaying it.
                decision.stats = cgroup.stat().unwrap_or_default();
            }
            let (outcome, _fd) = confirm(sent, timeout);
            // Reaped by process_mrelease: its memory is back even before it exits.
            let gone = matches!(
                outcome,
                Outcome::Exited { .. }
                    | Outcome::Stuck {
                        mreleased: true,
                        ..
                    }
            );
            decision.killed.push(Killed::new(&victim, Some(outcome)));
            if let Ok(after) = cgroup.counter_usage(decision.counter) {
                // Kept: why the process policy acted (e.g. no container was found).
                if !decision.detail.is_empty() {
                    decision.detail += "; ";
                }
                decision.detail += &format!("usage after the kill: {after}");
            }
            if let Some(t) = ready_for {
                let ms = t.as_millis();
                decision.detail += &format!("; victim ready {ms} ms before the crossing");
            }
            ctx.reporter.send(*decision);
            let result = if gone { Result::Gone } else { Result::Stuck };
            Done { path, seq, result }
        }
        Job::Container {
            path,
            seq,
            woke,
            overshoot,
            margin,
            mut decision,
            timeout,
        } => {
            let result = container(ctx, &path, &mut decision, woke, overshoot, margin, timeout);
            if !matches!(result, Result::NotContainer(_)) {
                ctx.reporter.send(*decision);
            }
            Done { path, seq, result }
        }
    }
}

/// The container policy: choose the container (never the sandbox), kill it through
/// containerd, and fall back to killing its cgroup's tasks directly when the runtime cannot
/// do it in time.
fn container(
    ctx: &Context,
    path: &Path,
    d: &mut Decision,
    woke: Instant,
    overshoot: u64,
    margin: u64,
    kill_timeout: Duration,
) -> Result {
    let Some(rt) = &ctx.runtime else {
        return Result::NotContainer("no container runtime".into());
    };
    let target = match rt.plan_blocking(path, PLAN_TIMEOUT) {
        Ok(t) => t,
        Err(e) => {
            return Result::NotContainer(format!(
                "no container to kill ({e}); process policy instead"
            ));
        }
    };
    // Never the container the agent runs in (a DaemonSet with a memory limit): the
    // process policy, which leaves the agent's cgroup out, acts instead.
    if ctx
        .self_cgroup
        .as_ref()
        .is_some_and(|own| own.starts_with(&target.cgroup))
    {
        return Result::NotContainer(format!(
            "container {} holds the agent itself; process policy instead",
            target.id
        ));
    }
    // What the container's death gives back: its anonymous memory (page cache and tmpfs
    // stay charged to the pod).
    let freeable = MemCgroup::new(&target.cgroup)
        .stat()
        .map(|s| s.anon())
        .unwrap_or(u64::MAX);
    if !crate::decide::can_help(freeable, overshoot, margin) {
        d.action = Action::NoHelp;
        d.proccgroup = target.cgroup.display().to_string();
        d.detail = format!(
            "unreclaimable memory is {overshoot} bytes above the threshold and container \
             {} frees only {freeable}: a kill could not help",
            target.id
        );
        return Result::Container { killed: false };
    }
    // What the container ran, for the record: read before the kill (after it the tasks
    // are gone), but only the cheap pid list; /proc details are read after the request.
    let victim_cg = MemCgroup::new(&target.cgroup);
    let pids: Vec<(MemCgroup, i32)> = victim_cg.subtree_procs();
    d.proccgroup = target.cgroup.display().to_string();
    d.pod = target.pod().cloned();
    let sent = Instant::now();
    d.wake_to_kill_us = Some(sent.duration_since(woke).as_micros() as u64);
    let killed = match &target.info {
        // Not identified (hung or unhealthy runtime, labels unknown): no RPC to wait on.
        None => Err(target.runtime_error.clone().unwrap_or_else(|| {
            format!(
                "the runtime did not identify container {} within {} ms",
                target.id,
                PLAN_TIMEOUT.as_millis()
            )
        })),
        Some(_) => rt
            .kill_container_blocking(&target, RUNTIME_TIMEOUT)
            .map_err(|e| e.to_string()),
    };
    match killed {
        Ok(rep) => {
            d.action = Action::Kill;
            d.container = Some(ContainerKill {
                id: rep.id,
                via: "containerd",
                namespace: Some(rep.namespace),
                gone_us: Some(rep.gone_us),
                error: None,
            });
            d.detail = target.reason;
        }
        Err(e) => {
            let fb = fallback_kill_cgroup_tasks(&target.cgroup, &ctx.memory_mount, kill_timeout);
            d.action = if fb.took_effect() {
                Action::Kill
            } else {
                Action::KillFailed
            };
            tracing::warn!(
                container = %target.id,
                error = %e,
                "the runtime could not kill the container; killed its tasks directly"
            );
            d.container = Some(ContainerKill {
                id: target.id.clone(),
                via: if fb.cgroup_kill {
                    "cgroup.kill"
                } else {
                    "fallback"
                },
                namespace: target.info.as_ref().map(|i| i.namespace.clone()),
                gone_us: fb.gone_us,
                error: Some(e.clone()),
            });
            d.detail = format!(
                "{}; runtime failed ({e}): killed {} task(s) of the container directly",
                target.reason,
                fb.killed.len()
            );
        }
    }
    let killed = d.action == Action::Kill;
    if killed {
        ctx.stats.kills.fetch_add(1, Ordering::Relaxed);
    }
    d.killed = pids
        .into_iter()
        .map(|(cg, pid)| Killed {
            pid,
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default(),
            score: 0,
            rss_bytes: 0,
            oom_score_adj: 0,
            proccgroup: cg.path.display().to_string(),
            outcome: None,
        })
        .collect();
    Result::Container { killed }
}
