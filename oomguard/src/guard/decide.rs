//! The guard's side of the decision rule: one fresh reading of a cgroup through the episode
//! state ([`crate::policy`], itself built on the pure rule of [`crate::decide`]), then when
//! to look again and what to show. [`next_check`] and [`shown_state`] are pure.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Guard;
use crate::kill::pidfd_exited;
use crate::policy::Step;
use crate::report::Action;
use crate::state::CgroupState;

/// Growth assumed for a cgroup at its limit with reclaimable cache when none was measured:
/// sets how often its `memory.stat` is read (20 MiB of headroom: every 156 ms).
const ASSUMED_GROWTH: u64 = 64 << 20;
/// The shortest re-check of a pressing cgroup whose victim has not made usage grow.
pub(super) const RECHECK_MIN: Duration = Duration::from_millis(10);
/// The fast pace: a cgroup whose episode just opened with cache in it, or whose
/// unreclaimable part was seen growing (a task allocating at 1 GB/s uses a few MiB of cache
/// in a few ms, and nothing signals it while usage sits at the limit).
pub(super) const RECHECK_FAST: Duration = Duration::from_millis(1);
/// The longest a cgroup with reclaimable cache goes without a re-check.
const RECHECK_MAX: Duration = Duration::from_secs(1);
/// What a container kill's worker may take besides the fallback's kill timeout.
const CONTAINER_KILL_BOUND: Duration =
    super::workers::PLAN_TIMEOUT.saturating_add(super::workers::RUNTIME_TIMEOUT);

/// When to evaluate a cgroup again without a signal, after a reading that gave `step`
/// (`None`: only on a signal). `watching`: a crossing was signalled lately; `victim`: when
/// its pending victim was signalled and whether its pidfd (in the epoll set) will tell its
/// exit.
pub(super) fn next_check(
    step: Step,
    now: Instant,
    watching: bool,
    victim: Option<(Instant, bool)>,
    growth_per_s: u64,
    guard_interval: Duration,
    cooldown: Duration,
) -> Option<Instant> {
    match step {
        Step::Idle if watching => Some(now + guard_interval),
        Step::Idle => None,
        Step::Watch => Some(now + guard_interval),
        // Above the threshold without a signal to come (the notifier saw the crossing):
        // growth past the floor must be seen before the kernel's limit (usage only,
        // unless usage is past the floor).
        Step::Held => Some(now + guard_interval.min(RECHECK_MIN)),
        Step::Waiting => Some(
            match victim {
                // Its exit wakes the guard through the pidfd; only the bound is polled.
                Some((since, true)) => since + cooldown,
                _ => now + guard_interval,
            }
            .min(now + RECHECK_MAX),
        ),
        // An episode's opening: the fast pace, whatever the headroom.
        Step::Reclaimable { soon: true, .. } => Some(now + RECHECK_FAST),
        Step::Reclaimable { headroom, .. } => Some(
            now + crate::decide::recheck_after(
                headroom,
                growth_per_s,
                ASSUMED_GROWTH,
                // Measured growth sets the pace itself (at least half the projection's
                // horizon: closer than that, the cgroup is acted on).
                if growth_per_s > 0 {
                    RECHECK_FAST
                } else {
                    guard_interval.min(RECHECK_MIN)
                },
                RECHECK_MAX,
            ),
        ),
        // `act` settles the next step.
        Step::Act { .. } => None,
    }
}

/// What the debug view shows for a step (`None`: leave what it shows). `act` shows its own
/// outcome, after the signal: the view's lock and timestamp stay off the crossing's path.
pub(super) fn shown_state(step: Step) -> Option<CgroupState> {
    match step {
        Step::Idle => Some(CgroupState::Armed),
        Step::Waiting => Some(CgroupState::CoolingDown),
        Step::Act { .. } | Step::Watch | Step::Held | Step::Reclaimable { .. } => None,
    }
}

impl Guard {
    /// Re-reads the cgroup and applies the decision rule ([`crate::decide`]) to it.
    pub(super) fn evaluate(&mut self, path: &Path, woke: Instant, signal: &'static str) {
        let cfg = self.deps.config.clone();
        // A victim that has exited (its pidfd readable, or its pid gone) or was waited for
        // long enough no longer holds the subtree. A container kill holds it until its
        // worker answers, within the worker's own bounds.
        if let Some(v) = self.reg.entries.get(path).and_then(|e| e.victim.as_ref()) {
            let (exited, bound) = if v.is_container() {
                (
                    false,
                    cfg.cooldown + CONTAINER_KILL_BOUND + cfg.kill_timeout,
                )
            } else {
                let exited = match &v.fd {
                    Some(fd) => pidfd_exited(fd),
                    None => {
                        crate::victim::read_task(v.pid, Path::new("")).is_none_or(|t| t.exiting)
                    }
                };
                (exited, cfg.cooldown)
            };
            if exited || v.since.elapsed() >= bound {
                self.victim_gone(path);
            }
        }
        let busy = self.reg.subtree_busy(path);
        let Some(e) = self.reg.entries.get_mut(path) else {
            return;
        };
        if e.left_alone {
            return;
        }
        let cg = e.armed.cgroup.clone();
        let th = e.armed.thresholds;
        let usage = match e.files.usage(&cg, th.counter) {
            Ok(u) => u,
            Err(err) if err.is_gone() => {
                // Removal also signals the eventfd: forget the cgroup.
                if let Some(s) = &self.deps.state {
                    s.cgroup_removed(path);
                }
                self.remove(path);
                return;
            }
            Err(err) => {
                // Said once per failure streak, not on every re-check.
                if !e.usage_unreadable {
                    e.usage_unreadable = true;
                    tracing::warn!(cgroup = %path.display(), error = %err, "cannot read usage");
                }
                e.next_check = Some(Instant::now() + cfg.guard_interval);
                return;
            }
        };
        if e.usage_unreadable {
            e.usage_unreadable = false;
            tracing::info!(cgroup = %path.display(), "usage readable again");
        }
        let mut cache = 0;
        let now = Instant::now();
        let stat_lag = crate::decide::stat_lag(self.cpus);
        let step = e
            .state
            .observe(now, usage, th.kill, e.hysteresis, stat_lag, busy, || {
                cache = e.files.reclaimable_cache(&cg).unwrap_or(0);
                cache
            });
        let watching = e.watch_until.is_some_and(|t| t > now);
        let victim = e.victim.as_ref().map(|v| (v.since, v.fd.is_some()));
        e.next_check = next_check(
            step,
            now,
            watching,
            victim,
            e.state.growth_per_s,
            cfg.guard_interval,
            cfg.cooldown,
        );
        if let Some(s) = &self.deps.state
            && let Some(shown) = shown_state(step)
        {
            s.cgroup_state(path, shown);
        }
        if let Some(m) = &self.deps.metrics {
            match step {
                // A re-check while waiting is not a new signal being skipped.
                Step::Waiting if signal != "recheck" => {
                    m.skip_cooldown.inc();
                }
                Step::Reclaimable { .. } if signal != "recheck" => {
                    m.skip_cache.inc();
                }
                _ => {}
            }
        }
        if matches!(step, Step::Watch | Step::Held | Step::Reclaimable { .. }) {
            // Near the limit without a kill yet: keep the victim of the next crossing ready.
            self.prepare(path);
        }
        match step {
            Step::Idle
            | Step::Watch
            | Step::Waiting
            | Step::Held
            | Step::Reclaimable { report: false, .. } => {}
            Step::Reclaimable {
                report: true,
                headroom,
                ..
            } => {
                let stats = self.record_stat(path);
                let e = &self.reg.entries[path];
                let mut d = self.decision(e, Action::SkipCache, usage, stats);
                d.reclaimable_cache = cache;
                d.signal = signal;
                d.detail = format!(
                    "the kernel can still reclaim page cache: {} reclaimable, {headroom} more \
                     bytes of unreclaimable memory before the threshold; left to the kernel",
                    d.reclaimable_cache
                );
                self.deps.reporter.send(d);
            }
            Step::Act { overshoot } => self.act(path, usage, overshoot, cache, woke, signal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn next(
        step: Step,
        watching: bool,
        victim: Option<(Instant, bool)>,
        now: Instant,
    ) -> Option<Duration> {
        next_check(step, now, watching, victim, 0, 50 * MS, 1000 * MS).map(|t| t - now)
    }

    #[test]
    fn idle_is_left_to_signals_unless_a_crossing_is_watched() {
        let now = Instant::now();
        assert_eq!(next(Step::Idle, false, None, now), None);
        assert_eq!(next(Step::Idle, true, None, now), Some(50 * MS));
        assert_eq!(next(Step::Act { overshoot: 0 }, true, None, now), None);
    }

    #[test]
    fn held_is_rechecked_fast() {
        let now = Instant::now();
        assert_eq!(next(Step::Held, false, None, now), Some(RECHECK_MIN));
    }

    #[test]
    fn a_victim_with_a_pidfd_is_waited_for_until_the_cooldown_only() {
        let now = Instant::now();
        let since = now - 200 * MS;
        assert_eq!(
            next(Step::Waiting, false, Some((since, true)), now),
            Some(800 * MS),
            "the pidfd tells the exit; the cooldown bounds the wait"
        );
        assert_eq!(
            next(Step::Waiting, false, Some((since, false)), now),
            Some(50 * MS),
            "without a pidfd the exit is polled"
        );
        assert_eq!(next(Step::Waiting, false, None, now), Some(50 * MS));
    }

    #[test]
    fn reclaimable_cache_is_rechecked_as_the_headroom_asks() {
        let now = Instant::now();
        let slow = next(
            Step::Reclaimable {
                report: false,
                headroom: 1 << 30,
                soon: false,
            },
            false,
            None,
            now,
        );
        assert_eq!(slow, Some(RECHECK_MAX));
        let tight = next(
            Step::Reclaimable {
                report: false,
                headroom: 1 << 20,
                soon: false,
            },
            false,
            None,
            now,
        );
        assert_eq!(tight, Some(RECHECK_MIN));
        let opening = next(
            Step::Reclaimable {
                report: true,
                headroom: 1 << 30,
                soon: true,
            },
            false,
            None,
            now,
        );
        assert_eq!(opening, Some(RECHECK_FAST), "an episode's opening");
        // Growth measured: the pace it sets, down to the fast one.
        let growing = next_check(
            Step::Reclaimable {
                report: false,
                headroom: 8 << 20,
                soon: false,
            },
            now,
            false,
            None,
            1 << 30,
            50 * MS,
            1000 * MS,
        );
        assert_eq!(
            growing.map(|t| t - now),
            Some(Duration::from_nanos(3_906_250))
        );
    }

    #[test]
    fn the_debug_view_follows_the_episode() {
        assert_eq!(shown_state(Step::Idle), Some(CgroupState::Armed));
        assert_eq!(
            shown_state(Step::Act { overshoot: 1 }),
            None,
            "act shows its outcome after the signal"
        );
        assert_eq!(shown_state(Step::Waiting), Some(CgroupState::CoolingDown));
        assert_eq!(shown_state(Step::Held), None);
    }
}
