//! From a threshold signal to a decision: pure functions and the per-cgroup state machine
//! (cooldown, once-per-episode reporting), all testable without a kernel.

use std::time::{Duration, Instant};

/// What the guard should do after observing a cgroup's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Usage is below the kill threshold: nothing to do, stop re-checking.
    Idle,
    /// Above the threshold, but a kill on this cgroup is still taking effect.
    Cooling,
    /// Above the threshold, but the kernel can still reclaim page cache: skip.
    /// `report` is true for the first skip of an episode only.
    SkipCache { report: bool },
    /// Apply the policy now.
    Act,
}

/// Per-cgroup memory of what the guard did, driving [`State::observe`].
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Usage was at or above the kill threshold at the last observation.
    pub above: bool,
    last_action: Option<Instant>,
    /// Usage fell below the threshold since the last action: the action took effect.
    dropped_since_action: bool,
    skip_reported: bool,
}

impl State {
    /// Decides the next step from one fresh reading. `cache_large` is only consulted when
    /// the cgroup is above its threshold.
    pub fn observe(
        &mut self,
        now: Instant,
        above: bool,
        cache_large: impl FnOnce() -> bool,
        cooldown: Duration,
    ) -> Step {
        if !above {
            self.above = false;
            self.dropped_since_action = true;
            self.skip_reported = false;
            return Step::Idle;
        }
        self.above = true;
        if let Some(t) = self.last_action
            && !self.dropped_since_action
            && now.saturating_duration_since(t) < cooldown
        {
            return Step::Cooling;
        }
        if cache_large() {
            let report = !self.skip_reported;
            self.skip_reported = true;
            return Step::SkipCache { report };
        }
        Step::Act
    }

    /// Records that the policy acted at `now`. `below_after`: a reading taken once the
    /// action was done already found usage under the threshold, so the action took effect
    /// and the next crossing is a new episode, acted on at once. Otherwise the cooldown holds
    /// until a later observation sees usage below (or it runs out): the signal of the next
    /// crossing can come before any signal of the dip (an eBPF crossing record is sent at
    /// the charge itself, the eventfd's downward notification is rate-limited), and without
    /// this it would be cooled down while usage ran on to the limit.
    pub fn acted(&mut self, now: Instant, below_after: bool) {
        self.last_action = Some(now);
        self.dropped_since_action = below_after;
        self.skip_reported = false;
    }

    pub fn in_cooldown(&self, now: Instant, cooldown: Duration) -> bool {
        self.last_action.is_some_and(|t| {
            !self.dropped_since_action && now.saturating_duration_since(t) < cooldown
        })
    }
}

/// "Large" page cache: reclaimable file cache of at least `ratio * limit` bytes.
pub fn cache_is_large(reclaimable_cache: u64, limit: u64, ratio: f64) -> bool {
    ratio > 0.0 && reclaimable_cache as f64 >= ratio * limit as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const CD: Duration = Duration::from_millis(1000);

    #[test]
    fn below_threshold_is_idle() {
        let mut s = State::default();
        assert_eq!(s.observe(Instant::now(), false, || true, CD), Step::Idle);
        assert!(!s.above);
    }

    #[test]
    fn acts_then_cools_down_then_acts_again() {
        let t0 = Instant::now();
        let mut s = State::default();
        assert_eq!(s.observe(t0, true, || false, CD), Step::Act);
        s.acted(t0, false);
        assert_eq!(
            s.observe(t0 + Duration::from_millis(10), true, || false, CD),
            Step::Cooling
        );
        assert_eq!(
            s.observe(t0 + Duration::from_millis(1001), true, || false, CD),
            Step::Act
        );
    }

    #[test]
    fn a_new_crossing_ends_the_cooldown() {
        let t0 = Instant::now();
        let mut s = State::default();
        s.acted(t0, false);
        assert_eq!(s.observe(t0, false, || false, CD), Step::Idle);
        assert_eq!(
            s.observe(t0 + Duration::from_millis(5), true, || false, CD),
            Step::Act
        );
    }

    #[test]
    fn usage_seen_below_right_after_acting_ends_the_cooldown() {
        let t0 = Instant::now();
        let mut s = State::default();
        assert_eq!(s.observe(t0, true, || false, CD), Step::Act);
        s.acted(t0, true);
        assert!(!s.in_cooldown(t0, CD));
        assert_eq!(
            s.observe(t0 + Duration::from_millis(10), true, || false, CD),
            Step::Act,
            "the next crossing is a new episode"
        );
    }

    #[test]
    fn cache_skip_is_reported_once_per_episode() {
        let t0 = Instant::now();
        let mut s = State::default();
        assert_eq!(
            s.observe(t0, true, || true, CD),
            Step::SkipCache { report: true }
        );
        assert_eq!(
            s.observe(t0, true, || true, CD),
            Step::SkipCache { report: false }
        );
        assert_eq!(
            s.observe(t0, true, || false, CD),
            Step::Act,
            "cache reclaimed: act"
        );
        assert_eq!(s.observe(t0, false, || true, CD), Step::Idle);
        assert_eq!(
            s.observe(t0, true, || true, CD),
            Step::SkipCache { report: true }
        );
    }

    #[test]
    fn cache_rule() {
        const M: u64 = 1 << 20;
        assert!(cache_is_large(100 * M, 1000 * M, 0.1));
        assert!(!cache_is_large(99 * M, 1000 * M, 0.1));
        assert!(
            !cache_is_large(1000 * M, 1000 * M, 0.0),
            "ratio 0 disables the skip"
        );
    }
}
