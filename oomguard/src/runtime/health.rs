//! "Unhealthy until": what the client remembers about an endpoint that hung or refused, so
//! that the kills after the first one go straight to the fallback instead of paying the
//! plan and kill budgets again. Pure state; the client does the I/O and the logging.
//!
//! - Healthy → unhealthy on a call that timed out (having had at least [`MIN_JUDGED`]) or
//!   could not connect. Reported once, by the transition.
//! - While unhealthy the endpoint is not asked at all; a background probe asks it when the
//!   back-off ends (30 s, doubling up to 5 min by default).
//! - Any answer (the probe's or a late one) makes it healthy again, resetting the back-off.
//!   Reported once, by the transition.

use std::time::{Duration, Instant};

/// A call must have been given at least this long for its timeout to count against the
/// endpoint: a caller whose own budget was nearly spent proves nothing about containerd.
pub const MIN_JUDGED: Duration = Duration::from_millis(50);

/// How long an unhealthy endpoint is left alone before the next probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(300),
        }
    }
}

/// What one endpoint is known to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy {
        since: Instant,
        /// The next probe is due then.
        until: Instant,
        backoff: Duration,
        /// Failed calls and probes since it became unhealthy.
        failures: u32,
        why: String,
    },
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// It was healthy; the next probe is due after `backoff`.
    BecameUnhealthy { backoff: Duration },
    /// It answered again after being unhealthy for `after`.
    Recovered { after: Duration, failures: u32 },
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }

    /// A call failed for `why` (timeout or no connection).
    pub fn failed(&mut self, now: Instant, why: String, b: Backoff) -> Option<Transition> {
        match self {
            Health::Healthy => {
                *self = Health::Unhealthy {
                    since: now,
                    until: now + b.initial,
                    backoff: b.initial,
                    failures: 1,
                    why,
                };
                Some(Transition::BecameUnhealthy { backoff: b.initial })
            }
            // A call that started before the endpoint was marked: already reported, and
            // the probe, not stale calls, sets the pace.
            Health::Unhealthy { failures, .. } => {
                *failures += 1;
                None
            }
        }
    }

    /// A probe failed: wait twice as long (up to the maximum) before the next. Returns the
    /// wait.
    pub fn probe_failed(&mut self, now: Instant, why: String, b: Backoff) -> Duration {
        match self {
            Health::Healthy => Duration::ZERO,
            Health::Unhealthy {
                until,
                backoff,
                failures,
                why: w,
                ..
            } => {
                *backoff = (*backoff * 2).min(b.max);
                *until = now + *backoff;
                *failures += 1;
                *w = why;
                *backoff
            }
        }
    }

    /// The endpoint answered (even with an error status: it is alive).
    pub fn answered(&mut self, now: Instant) -> Option<Transition> {
        match std::mem::replace(self, Health::Healthy) {
            Health::Healthy => None,
            Health::Unhealthy {
                since, failures, ..
            } => Some(Transition::Recovered {
                after: now.saturating_duration_since(since),
                failures,
            }),
        }
    }

    /// When the next probe is due (`None`: healthy, nothing to probe).
    pub fn probe_due(&self) -> Option<Instant> {
        match self {
            Health::Healthy => None,
            Health::Unhealthy { until, .. } => Some(*until),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(120),
        }
    }

    #[test]
    fn the_first_failure_is_reported_and_later_ones_are_not() {
        let t0 = Instant::now();
        let mut h = Health::Healthy;
        assert_eq!(
            h.failed(t0, "hung".into(), b()),
            Some(Transition::BecameUnhealthy {
                backoff: Duration::from_secs(30)
            })
        );
        assert!(!h.is_healthy());
        assert_eq!(h.probe_due(), Some(t0 + Duration::from_secs(30)));
        assert_eq!(
            h.failed(t0 + Duration::from_secs(1), "hung".into(), b()),
            None
        );
        // A stale failure does not push the probe back.
        assert_eq!(h.probe_due(), Some(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn failed_probes_double_the_wait_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut h = Health::Healthy;
        h.failed(t0, "refused".into(), b());
        let waits: Vec<u64> = (0..4)
            .map(|_| h.probe_failed(t0, "refused".into(), b()).as_secs())
            .collect();
        assert_eq!(waits, [60, 120, 120, 120]);
        assert_eq!(h.probe_due(), Some(t0 + Duration::from_secs(120)));
    }

    #[test]
    fn an_answer_recovers_once_and_resets_the_backoff() {
        let t0 = Instant::now();
        let mut h = Health::Healthy;
        h.failed(t0, "hung".into(), b());
        h.probe_failed(t0, "hung".into(), b());
        assert_eq!(
            h.answered(t0 + Duration::from_secs(90)),
            Some(Transition::Recovered {
                after: Duration::from_secs(90),
                failures: 2
            })
        );
        assert!(h.is_healthy());
        assert_eq!(h.answered(t0 + Duration::from_secs(91)), None);
        assert_eq!(h.probe_due(), None);
        // Unhealthy again: the back-off starts over.
        h.failed(t0 + Duration::from_secs(100), "hung".into(), b());
        assert_eq!(
            h.probe_due(),
            Some(t0 + Duration::from_secs(130)),
            "reset to the initial back-off"
        );
    }
}
