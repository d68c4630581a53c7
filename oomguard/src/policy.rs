//! From a threshold signal to a decision: the per-cgroup state machine of one episode
//! (the rule of [`crate::decide`], hysteresis, waiting for a victim, acting again only on
//! growth, once-per-episode reporting), testable without a kernel.

use std::time::Instant;

use crate::decide::{Pressure, pressure, unreclaimable};

/// What the guard should do after observing a cgroup's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Below the kill threshold, no episode open: nothing to do, stop re-checking.
    Idle,
    /// An episode is open but usage sits in the hysteresis band under the threshold: keep
    /// watching (cheaply: usage only).
    Watch,
    /// Above the threshold, but a victim in this subtree is still exiting.
    Waiting,
    /// Above the threshold, but the kernel can still reclaim enough file cache to stay
    /// below the limit. `report` is true for the first such reading of an episode only.
    Reclaimable { report: bool, headroom: u64 },
    /// Pressing, but the unreclaimable part has not grown since the last action of this
    /// episode (a kill that did not bring it under, or no kill that could help).
    Held,
    /// Apply the policy: the unreclaimable part is `overshoot` bytes above the threshold.
    Act { overshoot: u64 },
}

/// Per-cgroup memory of one episode (from the first reading at the kill threshold until
/// usage falls a hysteresis band below it), driving [`State::observe`].
#[derive(Debug, Clone, Default)]
pub struct State {
    /// An episode is open: usage reached the kill threshold and has not yet fallen a
    /// hysteresis band below it.
    pub above: bool,
    skip_reported: bool,
    /// The unreclaimable bytes when the last action resolved: act again only above this
    /// (plus the hysteresis), on further growth toward the limit.
    floor: Option<u64>,
    /// A kill was made: the next pressing reading (once the victim is gone) sets the floor.
    settle: bool,
    /// The last unreclaimable reading, for the growth rate.
    last: Option<(Instant, u64)>,
    /// How fast the unreclaimable part grew between the last two readings (bytes/s).
    pub growth_per_s: u64,
}

impl State {
    /// Decides the next step from one fresh reading of `usage`. `busy`: a victim in this
    /// subtree has not exited (or been reaped) yet. `reclaimable_cache` is read only at
    /// or above the threshold (it costs a `memory.stat` read); `stat_lag` is how far its
    /// counters may trail ([`crate::decide::stat_lag`]).
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        now: Instant,
        usage: u64,
        kill_threshold: u64,
        hysteresis: u64,
        stat_lag: u64,
        busy: bool,
        reclaimable_cache: impl FnOnce() -> u64,
    ) -> Step {
        if usage < kill_threshold {
            if !self.above {
                return Step::Idle;
            }
            if usage < kill_threshold.saturating_sub(hysteresis) {
                *self = State::default();
                return Step::Idle;
            }
            // The kill brought usage under the threshold: the next crossing is acted on at
            // once, not taken as the level after the kill.
            self.settle = false;
            return Step::Watch;
        }
        self.above = true;
        if busy {
            return Step::Waiting;
        }
        // The unreclaimable part is at most usage: under the floor's band, no need to read
        // memory.stat to know it has not grown (a cgroup held up by tmpfs costs one read).
        if !self.settle
            && self
                .floor
                .is_some_and(|f| usage < f.saturating_add(hysteresis))
        {
            return Step::Held;
        }
        let cache = reclaimable_cache();
        let hard = unreclaimable(usage, cache);
        if let Some((t, before)) = self.last {
            self.growth_per_s =
                crate::decide::growth_rate(before, hard, now.saturating_duration_since(t));
        }
        self.last = Some((now, hard));
        match pressure(usage, cache, kill_threshold, stat_lag) {
            Pressure::Below => Step::Watch,
            Pressure::Reclaimable { headroom } => {
                self.settle = false;
                let report = !self.skip_reported;
                self.skip_reported = true;
                Step::Reclaimable { report, headroom }
            }
            Pressure::Pressing { overshoot } => {
                if std::mem::take(&mut self.settle) {
                    self.floor = Some(hard);
                    return Step::Held;
                }
                if self
                    .floor
                    .is_some_and(|f| hard < f.saturating_add(hysteresis))
                {
                    return Step::Held;
                }
                Step::Act { overshoot }
            }
        }
    }

    /// A crossing was signalled: the episode opens even if the reading that follows finds
    /// usage just under the threshold (per-CPU stock drained, a moment of reclaim). The
    /// notifier may not have seen that dip and will not signal the same crossing again, so
    /// the cgroup is watched until usage falls a hysteresis band below.
    pub fn crossed(&mut self) {
        self.above = true;
    }

    /// A kill was made: once its victim is gone, the next pressing reading becomes the
    /// floor, so a kill that did not bring usage down is followed by another only on
    /// further growth.
    pub fn acted(&mut self) {
        self.settle = true;
        self.floor = None;
        self.skip_reported = false;
    }

    /// No kill was made (none could help, or no candidate): act again only once the
    /// unreclaimable part has grown past `unreclaimable` (plus the hysteresis).
    pub fn held(&mut self, unreclaimable: u64) {
        self.floor = Some(unreclaimable);
    }
}

/// "Large" page cache: reclaimable file cache of at least `ratio * limit` bytes. Only the
/// reclaim worker asks: `force_empty` on such a cgroup would throw away hot cache the
/// kernel reclaims by itself when it needs to.
pub fn cache_is_large(reclaimable_cache: u64, limit: u64, ratio: f64) -> bool {
    ratio > 0.0 && reclaimable_cache as f64 >= ratio * limit as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const KILL: u64 = 100 * M;
    const HYST: u64 = M;

    fn obs(s: &mut State, usage: u64, cache: u64) -> Step {
        s.observe(Instant::now(), usage, KILL, HYST, 0, false, || cache)
    }

    #[test]
    fn below_threshold_is_idle() {
        let mut s = State::default();
        assert_eq!(obs(&mut s, KILL - 1, 0), Step::Idle);
        assert!(!s.above);
    }

    #[test]
    fn pressing_acts_cache_waits() {
        let mut s = State::default();
        assert_eq!(
            obs(&mut s, KILL, 10 * M),
            Step::Reclaimable {
                report: true,
                headroom: 10 * M
            }
        );
        assert_eq!(
            obs(&mut s, KILL, 10 * M),
            Step::Reclaimable {
                report: false,
                headroom: 10 * M
            },
            "said once per episode"
        );
        assert_eq!(obs(&mut s, KILL + 2 * M, M), Step::Act { overshoot: M });
    }

    #[test]
    fn one_page_below_does_not_end_the_episode() {
        let mut s = State::default();
        assert_eq!(obs(&mut s, KILL, 0), Step::Act { overshoot: 0 });
        s.acted();
        assert_eq!(
            obs(&mut s, KILL + M, 0),
            Step::Held,
            "no growth since the kill"
        );
        assert_eq!(obs(&mut s, KILL - 4096, 0), Step::Watch);
        assert_eq!(obs(&mut s, KILL + M, 0), Step::Held, "still no growth");
        assert_eq!(obs(&mut s, KILL - HYST - 1, 0), Step::Idle);
        assert!(!s.above);
        assert_eq!(
            obs(&mut s, KILL, 0),
            Step::Act { overshoot: 0 },
            "a new episode"
        );
    }

    #[test]
    fn a_crossing_after_a_kill_that_brought_usage_under_is_acted_on() {
        let mut s = State::default();
        assert_eq!(obs(&mut s, KILL + M, 0), Step::Act { overshoot: M });
        s.acted();
        assert_eq!(obs(&mut s, KILL - 4096, 0), Step::Watch);
        assert_eq!(
            obs(&mut s, KILL + 4096, 0),
            Step::Act { overshoot: 4096 },
            "many tasks growing together cross again right after a kill"
        );
    }

    #[test]
    fn after_a_kill_that_did_not_bring_usage_down_only_growth_acts() {
        let mut s = State::default();
        assert_eq!(obs(&mut s, KILL + 5 * M, 0), Step::Act { overshoot: 5 * M });
        s.acted();
        assert_eq!(
            s.observe(Instant::now(), KILL + 5 * M, KILL, HYST, 0, true, || 0),
            Step::Waiting,
            "the victim is still exiting"
        );
        assert_eq!(obs(&mut s, KILL + 3 * M, 0), Step::Held);
        assert_eq!(obs(&mut s, KILL + 3 * M + HYST / 2, 0), Step::Held);
        assert_eq!(
            obs(&mut s, KILL + 3 * M + HYST, 0),
            Step::Act {
                overshoot: 3 * M + HYST
            }
        );
    }

    #[test]
    fn a_signalled_crossing_read_just_below_is_watched() {
        let mut s = State::default();
        s.crossed();
        assert_eq!(obs(&mut s, KILL - 4096, 0), Step::Watch);
        assert_eq!(
            obs(&mut s, KILL + 4096, 0),
            Step::Act { overshoot: 4096 },
            "the growth after the dip is acted on"
        );
        let mut s = State::default();
        s.crossed();
        assert_eq!(obs(&mut s, KILL - HYST - 1, 0), Step::Idle);
    }

    #[test]
    fn held_without_a_kill_waits_for_growth() {
        let mut s = State::default();
        assert_eq!(obs(&mut s, KILL + M, 0), Step::Act { overshoot: M });
        s.held(KILL + M);
        let unread = s.observe(
            Instant::now(),
            KILL + M + 4096,
            KILL,
            HYST,
            0,
            false,
            || panic!("memory.stat read although usage cannot have grown past the floor"),
        );
        assert_eq!(unread, Step::Held);
        assert_eq!(obs(&mut s, KILL + 2 * M, 0), Step::Act { overshoot: 2 * M });
    }

    #[test]
    fn growth_rate_is_measured_on_the_unreclaimable_part() {
        let t0 = Instant::now();
        let mut s = State::default();
        s.observe(t0, KILL, KILL, HYST, 0, false, || 50 * M);
        s.observe(
            t0 + std::time::Duration::from_millis(500),
            KILL,
            KILL,
            HYST,
            0,
            false,
            || 40 * M,
        );
        assert_eq!(s.growth_per_s, 20 * M);
    }

    #[test]
    fn cache_rule() {
        assert!(cache_is_large(100 * M, 1000 * M, 0.1));
        assert!(!cache_is_large(99 * M, 1000 * M, 0.1));
        assert!(
            !cache_is_large(1000 * M, 1000 * M, 0.0),
            "ratio 0 disables the skip"
        );
    }
}
