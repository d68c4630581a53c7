//! What happens at the kill threshold, on the guard thread: the policy applied to a
//! pressing cgroup (at most one victim, and only one whose death frees enough), the
//! process policy's ranking and its SIGKILL. The rest of the kill (reaping, waiting for the
//! exit, the container policy's runtime calls, the report) is a worker's job
//! ([`super::workers`]); the cgroup is "acting" until the worker answers.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::registry::{Pending, Ready};
use super::workers::{Done, Job, Result as WorkResult};
use super::{Guard, Kind};
use crate::cgroup::{MemCgroup, MemStat};
use crate::config::Policy;
use crate::decide;
use crate::kill::{Outcome, Signalled, pin, signal_pinned, signal_task};
use crate::report::{Action, Decision, Killed};
use crate::victim;

/// How many candidates one decision may try before giving up.
pub(super) const MAX_KILL_ATTEMPTS: usize = 8;
/// How long a victim made ready is trusted at the crossing: a task that started growing
/// since may rank higher, so an older choice is ranked afresh there.
const READY_FRESH: Duration = Duration::from_millis(250);
/// Near the limit, the ready victim is chosen again this often (before it goes stale).
const READY_REFRESH: Duration = Duration::from_millis(100);

impl Guard {
    /// Applies the policy to a pressing cgroup whose unreclaimable memory is `overshoot`
    /// bytes above its kill threshold (`cache`: its reclaimable cache as read): at most one
    /// victim, and only one whose death frees more than that. The record's `memory.stat` is
    /// read after the signal (by the kill's worker), off the crossing's path.
    pub(super) fn act(
        &mut self,
        path: &Path,
        usage: u64,
        overshoot: u64,
        cache: u64,
        woke: Instant,
        signal: &'static str,
    ) {
        let cfg = self.deps.config.clone();
        // The innermost guarded cgroup acts: a guarded descendant at its own threshold is
        // evaluated first, and if it made a kill this cgroup waits for that victim.
        let inner: Vec<PathBuf> = self
            .reg
            .descendants(path)
            .into_iter()
            .filter(|p| {
                self.reg.entries.get(p).is_some_and(|e| {
                    e.armed
                        .cgroup
                        .counter_usage(e.armed.thresholds.counter)
                        .is_ok_and(|u| u >= e.armed.thresholds.kill)
                })
            })
            .collect();
        let kills = self.stats.kills.load(Ordering::Relaxed);
        for p in inner {
            self.evaluate(&p, woke, "innermost");
        }
        // A descendant's kill changed the numbers this decision was made on: read again.
        if self.stats.kills.load(Ordering::Relaxed) != kills || self.reg.subtree_busy(path) {
            if let Some(e) = self.reg.entries.get_mut(path) {
                e.next_check = Some(Instant::now() + cfg.guard_interval);
            }
            return;
        }
        let Some(e) = self.reg.entries.get_mut(path) else {
            return;
        };
        let cg = e.armed.cgroup.clone();
        let limit = e.armed.thresholds.limit;
        let margin = e.armed.thresholds.margin;
        let counter = e.armed.thresholds.counter;
        let hard = decide::unreclaimable(usage, cache);
        let container_detail = e.no_container.take();
        let by_runtime = cfg.policy == Policy::Container
            && container_detail.is_none()
            && self.deps.runtime.is_some();
        // The victim made ready before the crossing is signalled first: the record (its
        // timestamp, its strings) is written after.
        let mut early = None;
        if cfg.policy != Policy::Noop
            && !by_runtime
            && let Some(r) = self.take_ready(path, overshoot, margin)
        {
            let start = Instant::now();
            let mount = &self.deps.memory_mount;
            if let Ok(sent) = signal_pinned(&r.victim.task, r.fd, &cg.path, mount) {
                early = Some((start, sent, r.victim, start.saturating_duration_since(r.at)));
            }
            // Not signalled (it died, left, or became unkillable): ranked afresh below.
        }
        let Some(e) = self.reg.entries.get(path) else {
            return;
        };
        let mut d = self.decision(e, Action::NoCandidate, usage, MemStat::default());
        d.reclaimable_cache = cache;
        d.signal = signal;
        if by_runtime {
            // Identifying the container and the runtime's kill may take hundreds of ms: a
            // worker does both, the cgroup acting until it answers.
            let seq = self.reg.next_seq();
            self.reg.set_victim(
                path,
                Pending {
                    pid: 0,
                    fd: None,
                    token: None,
                    since: Instant::now(),
                    seq,
                },
            );
            if let Some(e) = self.reg.entries.get_mut(path) {
                e.acting_unreclaimable = hard;
                e.next_check = Some(Instant::now() + cfg.guard_interval);
            }
            d.stats = self.record_stat(path);
            if let Some(s) = &self.deps.state {
                s.cgroup_state(path, crate::state::CgroupState::Acting);
            }
            self.pool.submit(Job::Container {
                path: path.to_path_buf(),
                seq,
                woke,
                overshoot,
                margin,
                decision: Box::new(d),
                timeout: cfg.kill_timeout,
            });
            return;
        }
        if let Some(detail) = container_detail {
            d.detail = detail;
        }
        // The signalled victim, for the worker that follows it up.
        let mut job: Option<(u64, Signalled, victim::Candidate)> = None;
        let mut ready_for = None;
        if let Some((start, sent, victim, age)) = early {
            ready_for = Some(age);
            job = Some(self.signalled(path, &mut d, &victim, sent, start, woke));
        }
        let ranked = if job.is_some() {
            Vec::new()
        } else {
            self.rank(&cg, limit)
        };
        let any = !ranked.is_empty();
        let helping: Vec<&victim::Candidate> = ranked
            .iter()
            .filter(|c| decide::can_help(c.task.freeable_bytes(counter), overshoot, margin))
            .collect();
        if job.is_some() {
            // Signalled from the victim made ready before the crossing.
        } else if any && helping.is_empty() {
            d.action = Action::NoHelp;
            let best = ranked
                .iter()
                .map(|c| c.task.freeable_bytes(counter))
                .max()
                .unwrap_or(0);
            d.detail = format!(
                "unreclaimable memory is {overshoot} bytes above the threshold and no \
                 task frees more (the most any would free: {best}): a kill could not help"
            );
        } else if cfg.policy == Policy::Noop {
            if let Some(top) = helping.first() {
                d.action = Action::WouldKill;
                d.proccgroup = top.task.cgroup.display().to_string();
                d.killed.push(Killed::new(top, None));
            }
        } else {
            // One victim: the next candidate only when this one was never signalled
            // (refused as recycled or moved, or the kernel refused the signal). Only the
            // signal is sent here; a worker reaps, waits for the exit and reports.
            for c in helping.into_iter().take(MAX_KILL_ATTEMPTS) {
                let start = Instant::now();
                let sent = signal_task(&c.task, &cg.path, &self.deps.memory_mount);
                if d.proccgroup.is_empty() {
                    d.proccgroup = c.task.cgroup.display().to_string();
                }
                match sent {
                    Ok(sent) => {
                        job = Some(self.signalled(path, &mut d, c, sent, start, woke));
                        break;
                    }
                    Err(outcome) => {
                        let gone = outcome == Outcome::Gone;
                        if !gone {
                            d.action = Action::KillFailed;
                        }
                        d.killed.push(Killed::new(c, Some(outcome)));
                        if gone {
                            break;
                        }
                    }
                }
            }
        }
        let exited = d.killed.iter().any(|k| k.outcome == Some(Outcome::Gone));
        if d.action == Action::NoCandidate && exited {
            // Like the kernel, which picks no new victim while one is exiting.
            d.detail = "the chosen task exited before the signal: its memory is coming back, \
                        so no other task is chosen"
                .into();
        } else if d.action == Action::NoCandidate {
            if let Some(m) = &self.deps.metrics {
                m.skip_protected.inc();
            }
            d.detail = "no task may be killed (only protected or exiting tasks)".into();
        }
        if let Some(e) = self.reg.entries.get_mut(path) {
            if job.is_some() {
                e.state.acted();
            } else {
                // Nothing was killed: act again only on further growth.
                e.state.held(hard);
            }
            e.next_check = Some(Instant::now() + cfg.guard_interval);
        }
        if let Some(s) = &self.deps.state {
            use crate::state::CgroupState;
            let now = if job.is_some() {
                CgroupState::CoolingDown
            } else {
                CgroupState::Armed
            };
            s.cgroup_state(path, now);
        }
        match job {
            Some((seq, sent, victim)) => self.pool.submit(Job::Confirm {
                path: path.to_path_buf(),
                seq,
                sent,
                victim,
                cgroup: cg,
                decision: Box::new(d),
                timeout: cfg.kill_timeout,
                ready_for,
            }),
            None => {
                d.stats = self.record_stat(path);
                self.deps.reporter.send(d)
            }
        }
    }

    /// Records a signalled victim: the cgroup acts (waits) until it is gone; its pidfd, in
    /// the epoll set, wakes the guard when it exits.
    fn signalled(
        &mut self,
        path: &Path,
        d: &mut Decision,
        c: &victim::Candidate,
        sent: Signalled,
        start: Instant,
        woke: Instant,
    ) -> (u64, Signalled, victim::Candidate) {
        let t = start + Duration::from_micros(sent.signal_us()) - woke;
        d.wake_to_kill_us = Some(t.as_micros() as u64);
        d.action = Action::Kill;
        if d.proccgroup.is_empty() {
            d.proccgroup = c.task.cgroup.display().to_string();
        }
        self.stats.kills.fetch_add(1, Ordering::Relaxed);
        let fd = sent.pidfd().and_then(|fd| fd.try_clone().ok());
        let token = fd
            .as_ref()
            .and_then(|fd| self.register(fd, path, Kind::Victim));
        let seq = self.reg.next_seq();
        self.reg.set_victim(
            path,
            Pending {
                pid: c.task.pid,
                fd,
                token,
                since: start,
                seq,
            },
        );
        (seq, sent, c.clone())
    }

    /// The victim made ready before the crossing, if it is fresh and its death can help.
    fn take_ready(&mut self, path: &Path, overshoot: u64, margin: u64) -> Option<Ready> {
        let e = self.reg.entries.get_mut(path)?;
        let counter = e.armed.thresholds.counter;
        let r = e.ready.take()?;
        (r.at.elapsed() < READY_FRESH
            && decide::can_help(r.victim.task.freeable_bytes(counter), overshoot, margin))
        .then_some(r)
    }

    /// Ranks a cgroup's candidates and pins the best one that can still be killed, ahead of
    /// its crossing, unless what is ready is fresh. Costs what the crossing then saves: the
    /// task listing, `/proc` (or the score map) and `pidfd_open`.
    pub(super) fn prepare(&mut self, path: &Path) {
        let Some(e) = self.reg.entries.get(path) else {
            return;
        };
        let policy = self.deps.config.policy;
        // The container policy kills through the runtime (a worker identifies the
        // container); the process policy's victim is ranked at the crossing there.
        if policy == Policy::Noop
            || (policy == Policy::Container && self.deps.runtime.is_some())
            || e.left_alone
            || e.victim.is_some()
            || e.ready
                .as_ref()
                .is_some_and(|r| r.at.elapsed() < READY_REFRESH)
        {
            return;
        }
        let cg = e.armed.cgroup.clone();
        let limit = e.armed.thresholds.limit;
        if let Some(e) = self.reg.entries.get_mut(path) {
            // The crossing reads it next.
            e.files.keep_stat(&cg);
        }
        let ranked = self.rank(&cg, limit);
        let at = Instant::now();
        let ready = ranked.into_iter().take(MAX_KILL_ATTEMPTS).find_map(|c| {
            let fd = pin(&c.task, &cg.path, &self.deps.memory_mount)?;
            Some(Ready { at, victim: c, fd })
        });
        if let Some(e) = self.reg.entries.get_mut(path) {
            e.ready = ready;
        }
    }

    /// A worker's answer: the cgroup's kill is over (or its victim stuck, then waited for
    /// through its pidfd), or its container policy found no container.
    pub(super) fn worker_done(&mut self, done: Done) {
        let path = done.path.as_path();
        let current = self
            .reg
            .entries
            .get(path)
            .and_then(|e| e.victim.as_ref())
            .is_some_and(|v| v.seq == done.seq);
        if !current {
            // Its wait ended meanwhile (exit, cooldown, the cgroup re-armed or removed).
            return;
        }
        let now = Instant::now();
        match done.result {
            WorkResult::Stuck => return,
            WorkResult::Gone => {}
            WorkResult::Container { killed } => {
                if let Some(e) = self.reg.entries.get_mut(path) {
                    if killed {
                        e.state.acted();
                    } else {
                        e.state.held(e.acting_unreclaimable);
                    }
                }
            }
            WorkResult::NotContainer(why) => {
                if let Some(e) = self.reg.entries.get_mut(path) {
                    e.no_container = Some(why);
                }
            }
        }
        self.victim_gone(path);
        // The victim is gone: the reading now ends the episode (usage fell below the band)
        // or sets the level further growth must pass. No container: the process policy.
        self.evaluate(path, now, "after-kill");
    }

    /// The process policy's candidates, best first: from the eBPF score map when its
    /// programs run, else from /proc.
    pub(super) fn rank(&self, cg: &MemCgroup, limit: u64) -> Vec<victim::Candidate> {
        let mut ranked = match &self.deps.ebpf {
            Some(bpf) if bpf.has_scores() => {
                victim::candidates_from_map(cg, limit, self.self_pid, MAX_KILL_ATTEMPTS, |pids| {
                    bpf.task_scores(pids)
                        .iter()
                        .map(|(p, s)| (*p, victim::MapScore::from(s)))
                        .collect()
                })
            }
            _ => victim::candidates(cg, limit, self.self_pid),
        };
        // The agent's own cgroup (its container, with a shell exec'd into it) is never a
        // victim: the agent would kill itself or its helpers.
        if let Some(own) = &self.self_cgroup {
            ranked.retain(|c| &c.task.cgroup != own);
        }
        if self.reg.entries.get(&cg.path).is_some_and(|e| e.flat) {
            ranked.retain(|c| c.task.cgroup == cg.path);
        }
        ranked
    }
}
