//! From a threshold signal to a decision: the per-cgroup state machine of one episode
//! (the rule of [`crate::decide`], hysteresis, waiting for a victim, acting again only on
//! growth, once-per-episode reporting), testable without a kernel.

use std::time::{Duration, Instant};

use crate::decide::{
    ACT_HORIZON, Pressure, growth_noise, growth_rate, pressure, runs_out_within, unreclaimable,
};

/// Readings kept for the growth rate.
const HISTORY: usize = 4;
/// Readings older than this say nothing about the growth now.
const HISTORY_WINDOW: Duration = Duration::from_secs(1);
/// Re-checks at [`Step::Reclaimable`]'s fast pace after an episode opens, before any growth
/// was measured: a task crossing with a few MiB of cache in its cgroup (its own binary's
/// pages) can use them up in a few ms, and nothing signals it while usage sits at the limit.
pub const FAST_CHECKS: u8 = 8;

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
    /// below the limit. `report` is true for the first such reading of an episode only;
    /// `soon`: look again at the fast pace, the episode having just opened
    /// ([`FAST_CHECKS`]).
    Reclaimable {
        report: bool,
        headroom: u64,
        soon: bool,
    },
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
    /// Recent unreclaimable readings, the newest last (the reclaim threshold's crossing
    /// among them), for the growth rate.
    history: [Option<(Instant, u64)>; HISTORY],
    /// How fast the unreclaimable part grew, beyond the counters' noise: the fastest over
    /// the recent readings (bytes/s).
    pub growth_per_s: u64,
    /// Fast re-checks left in this episode's opening ([`FAST_CHECKS`]).
    fast: u8,
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
        self.open();
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
        self.growth_per_s = self.growth(now, hard, growth_noise(cache, stat_lag));
        self.remember(now, hard);
        let p = match pressure(usage, cache, kill_threshold, stat_lag) {
            // The cache is there, but the measured growth uses it up before the next
            // re-check could see it: the kernel would have to act by then.
            Pressure::Reclaimable { headroom }
                if runs_out_within(headroom, self.growth_per_s, ACT_HORIZON) =>
            {
                Pressure::Pressing { overshoot: 0 }
            }
            p => p,
        };
        match p {
            Pressure::Below => Step::Watch,
            Pressure::Reclaimable { headroom } => {
                self.settle = false;
                let report = !self.skip_reported;
                self.skip_reported = true;
                let soon = self.fast > 0;
                self.fast = self.fast.saturating_sub(1);
                Step::Reclaimable {
                    report,
                    headroom,
                    soon,
                }
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
        self.open();
    }

    /// The episode is open; opening it grants its fast re-checks.
    fn open(&mut self) {
        if !self.above {
            self.fast = FAST_CHECKS;
        }
        self.above = true;
    }

    /// A reading of the unreclaimable part before the kill threshold (at the reclaim
    /// threshold's crossing): the first reading at the kill threshold has a growth rate.
    pub fn approach(&mut self, now: Instant, unreclaimable: u64) {
        if !self.above {
            self.remember(now, unreclaimable);
        }
    }

    fn remember(&mut self, now: Instant, unreclaimable: u64) {
        self.history.rotate_left(1);
        self.history[HISTORY - 1] = Some((now, unreclaimable));
    }

    /// The fastest growth from any recent reading to `hard` now, beyond `noise`.
    fn growth(&self, now: Instant, hard: u64, noise: u64) -> u64 {
        self.history
            .iter()
            .flatten()
            .filter_map(|&(t, before)| {
                let dt = now.saturating_duration_since(t);
                (dt <= HISTORY_WINDOW).then(|| growth_rate(before, hard, dt, noise))
            })
            .max()
            .unwrap_or(0)
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
                headroom: 10 * M,
                soon: true,
            }
        );
        assert_eq!(
            obs(&mut s, KILL, 10 * M),
            Step::Reclaimable {
                report: false,
                headroom: 10 * M,
                soon: true,
            },
            "said once per episode"
        );
        assert_eq!(obs(&mut s, KILL + 2 * M, M), Step::Act { overshoot: M });
    }

    const MS: Duration = Duration::from_millis(1);
    const LAG: u64 = 512 << 10;

    fn at(s: &mut State, t: Instant, usage: u64, cache: u64, kill: u64) -> Step {
        s.observe(t, usage, kill, HYST, LAG, false, || cache)
    }

    #[test]
    fn a_fast_task_crossing_with_its_cache_is_acted_on_before_the_cache_runs_out() {
        // 256 MiB, default margins: reclaim threshold 245.76 MiB, kill 250.88 MiB. The task
        // allocates at 1 GB/s with 3.4 MiB of its own binary's and libraries' pages in the
        // cgroup: 5 ms from one threshold to the next, then 3.4 MiB of cache the kernel
        // reclaims in 3 more before it has to kill.
        let (kill, reclaim, cache) = (263_065_600, 257_698_038, 3565 << 10);
        let t0 = Instant::now();
        let mut s = State::default();
        s.approach(t0, reclaim - cache);
        assert!(matches!(
            at(&mut s, t0 + 5 * MS, kill + 4096, cache, kill),
            Step::Reclaimable { soon: true, .. }
        ));
        assert_eq!(
            at(&mut s, t0 + 6 * MS, kill + M, cache, kill),
            Step::Act { overshoot: 0 },
            "its growth since the reclaim threshold uses the cache up within the horizon"
        );
        // 32 MiB with a 1 MiB margin: one MiB between the thresholds is within the noise;
        // the fast re-checks see the growth go on.
        let (kill, reclaim) = (31 * M, 30 * M);
        let mut s = State::default();
        s.approach(t0, reclaim - cache);
        assert!(matches!(
            at(&mut s, t0 + MS, kill, cache, kill),
            Step::Reclaimable { soon: true, .. }
        ));
        assert_eq!(
            at(&mut s, t0 + 2 * MS, 32 * M, cache - 2 * M, kill),
            Step::Act { overshoot: 0 }
        );
    }

    #[test]
    fn counters_jittering_at_a_steady_level_never_project_a_kill() {
        // 96% of 256 MiB anonymous and a writer at the limit: the unreclaimable part reads
        // a lag high now and then, on readings 1-10 ms apart.
        let kill = 263_065_600;
        let level = kill - LAG - 200 * 1024;
        let t0 = Instant::now();
        let mut s = State::default();
        s.crossed();
        let (mut soon, mut t) = (0, t0);
        for i in 0..100u32 {
            // Up to twice the lag: each of two readings may be off by it.
            let jitter = if i % 3 == 1 { 2 * LAG } else { 0 };
            let cache = 3 * M;
            t += MS * (1 + i % 10);
            let step = at(&mut s, t, level + cache + jitter, cache, kill);
            assert!(
                matches!(step, Step::Reclaimable { .. }),
                "reading {i}: {step:?}"
            );
            soon += u32::from(matches!(step, Step::Reclaimable { soon: true, .. }));
        }
        assert_eq!(
            soon,
            u32::from(FAST_CHECKS),
            "only the opening's fast re-checks"
        );
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
