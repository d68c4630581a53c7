//! What happens at the kill threshold: the policy applied to a pressing cgroup (at most
//! one victim, and only one whose death frees enough), the process policy's ranking, and
//! the container policy's runtime kill with its fallback.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Guard;
use super::Kind;
use super::registry::Pending;
use crate::cgroup::{MemCgroup, MemStat};
use crate::config::Policy;
use crate::decide;
use crate::kill::kill_task_pinned;
use crate::report::{Action, ContainerKill, Decision, Killed};
use crate::runtime::fallback_kill_cgroup_tasks;
use crate::victim;

/// How many candidates one decision may try before giving up.
pub(super) const MAX_KILL_ATTEMPTS: usize = 8;
/// Bound on identifying the container on the kill path: labels are normally cached when the
/// cgroup is armed (prefetch), so a runtime that does not answer this fast is treated as
/// hung and the container's tasks are killed directly.
const PLAN_TIMEOUT: Duration = Duration::from_millis(250);
/// Bound on containerd's kill (measured here: 35-76 ms to the last process gone).
const RUNTIME_TIMEOUT: Duration = Duration::from_millis(500);

impl Guard {
    /// Applies the policy to a pressing cgroup whose unreclaimable memory is `overshoot`
    /// bytes above its kill threshold: at most one victim, and only one whose death frees
    /// more than that.
    pub(super) fn act(
        &mut self,
        path: &Path,
        usage: u64,
        overshoot: u64,
        stats: MemStat,
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
                        .usage()
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
        let Some(e) = self.reg.entries.get(path) else {
            return;
        };
        let cg = e.armed.cgroup.clone();
        let limit = e.armed.thresholds.limit;
        let margin = e.armed.thresholds.margin;
        let hard = decide::unreclaimable(usage, stats.reclaimable_cache());
        let mut d = self.decision(e, Action::NoCandidate, usage, stats);
        d.signal = signal;
        let mut pending: Option<Pending> = None;
        let mut killed_any = false;
        if cfg.policy == Policy::Container
            && self.act_container(&cg, &mut d, woke, overshoot, margin)
        {
            killed_any = d.action == Action::Kill;
        } else {
            let ranked = self.rank(&cg, limit);
            let any = !ranked.is_empty();
            let helping: Vec<&victim::Candidate> = ranked
                .iter()
                .filter(|c| decide::can_help(c.task.freeable_bytes(), overshoot, margin))
                .collect();
            if any && helping.is_empty() {
                d.action = Action::NoHelp;
                let best = ranked
                    .iter()
                    .map(|c| c.task.freeable_bytes())
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
                // (refused as recycled or moved, or the kernel refused the signal).
                for c in helping.into_iter().take(MAX_KILL_ATTEMPTS) {
                    let sent = Instant::now();
                    let (outcome, fd) = kill_task_pinned(
                        &c.task,
                        &cg.path,
                        &self.deps.memory_mount,
                        cfg.kill_timeout,
                    );
                    if let Some(us) = outcome.signal_us() {
                        let t = sent + Duration::from_micros(us) - woke;
                        d.wake_to_kill_us = Some(t.as_micros() as u64);
                    }
                    if d.proccgroup.is_empty() {
                        d.proccgroup = c.task.cgroup.display().to_string();
                    }
                    let signalled = outcome.signalled();
                    let gone = outcome == crate::kill::Outcome::Gone;
                    // Reaped by process_mrelease: its memory is back even before it exits.
                    let reaped = matches!(
                        outcome,
                        crate::kill::Outcome::Stuck {
                            mreleased: true,
                            ..
                        }
                    );
                    if signalled {
                        killed_any = true;
                        self.stats.kills.fetch_add(1, Ordering::Relaxed);
                        d.action = Action::Kill;
                        if matches!(outcome, crate::kill::Outcome::Stuck { .. }) && !reaped {
                            pending = Some(Pending {
                                pid: c.task.pid,
                                fd,
                                token: None,
                                since: sent,
                            });
                        }
                    } else if !gone {
                        d.action = Action::KillFailed;
                    }
                    d.killed.push(Killed::new(c, Some(outcome)));
                    if signalled || gone {
                        break;
                    }
                }
                if d.action == Action::Kill
                    && let Ok(after) = cg.usage()
                {
                    d.detail = format!("usage after the kill: {after}");
                }
            }
        }
        if d.action == Action::NoCandidate {
            if let Some(m) = &self.deps.metrics {
                m.skip_protected.inc();
            }
            d.detail = "no task may be killed (only protected or exiting tasks)".into();
        }
        let waiting = pending.is_some();
        if let Some(mut v) = pending {
            if let Some(fd) = &v.fd {
                // Its exit wakes the guard: the pidfd becomes readable.
                v.token = self.register(fd, path, Kind::Victim);
            }
            self.reg.set_victim(path, v);
        }
        if let Some(e) = self.reg.entries.get_mut(path) {
            if killed_any {
                e.state.acted();
            } else {
                // Nothing was killed: act again only on further growth.
                e.state.held(hard);
            }
            e.next_check = Some(Instant::now() + cfg.guard_interval);
        }
        if let Some(s) = &self.deps.state {
            use crate::state::CgroupState;
            let now = if waiting {
                CgroupState::CoolingDown
            } else {
                CgroupState::Armed
            };
            s.cgroup_state(path, now);
        }
        self.deps.reporter.send(d);
        if killed_any && !waiting {
            // The victim is gone: the reading now ends the episode (usage fell below the
            // band) or sets the level further growth must pass.
            self.evaluate(path, Instant::now(), "after-kill");
        }
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

    /// The container policy: choose the container (never the sandbox), kill it through
    /// containerd, and fall back to killing its cgroup's tasks directly when the runtime
    /// cannot do it in time. False when the cgroup holds no identifiable container: then
    /// the process policy acts.
    pub(super) fn act_container(
        &self,
        cg: &MemCgroup,
        d: &mut Decision,
        woke: Instant,
        overshoot: u64,
        margin: u64,
    ) -> bool {
        let Some(rt) = &self.deps.runtime else {
            return false;
        };
        let target = match rt.plan_blocking(&cg.path, PLAN_TIMEOUT) {
            Ok(t) => t,
            Err(e) => {
                d.detail = format!("no container to kill ({e}); process policy instead");
                return false;
            }
        };
        // Never the container the agent runs in (a DaemonSet with a memory limit): the
        // process policy, which leaves the agent's cgroup out, acts instead.
        if self
            .self_cgroup
            .as_ref()
            .is_some_and(|own| own.starts_with(&target.cgroup))
        {
            d.detail = format!(
                "container {} holds the agent itself; process policy instead",
                target.id
            );
            return false;
        }
        // What the container's death gives back: its anonymous memory (page cache and
        // tmpfs stay charged to the pod).
        let freeable = MemCgroup::new(&target.cgroup)
            .stat()
            .map(|s| s.get("total_rss"))
            .unwrap_or(u64::MAX);
        if !decide::can_help(freeable, overshoot, margin) {
            d.action = Action::NoHelp;
            d.proccgroup = target.cgroup.display().to_string();
            d.detail = format!(
                "unreclaimable memory is {overshoot} bytes above the threshold and container                  {} frees only {freeable}: a kill could not help",
                target.id
            );
            return true;
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
                let fb = fallback_kill_cgroup_tasks(
                    &target.cgroup,
                    &self.deps.memory_mount,
                    self.deps.config.kill_timeout,
                );
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
        if d.action == Action::Kill {
            self.stats.kills.fetch_add(1, Ordering::Relaxed);
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
        true
    }
}
