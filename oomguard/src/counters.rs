//! The guard's counters, shared by the guard thread (which bumps them) and [`crate::metrics`]
//! (which exports them): here so neither imports the other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::reclaim::ReclaimResult;

/// Counters the rest of the agent can read without talking to the guard thread.
#[derive(Debug, Default)]
pub struct GuardStats {
    pub guarded: AtomicU64,
    pub wakeups: AtomicU64,
    pub kills: AtomicU64,
    /// Incremented on every loop turn: a watchdog for health checks.
    pub ticks: AtomicU64,
    /// Set when the guard thread ends (returns or panics).
    pub stopped: AtomicBool,
    /// Notified (one stored permit) when the guard thread ends.
    pub stopped_notify: tokio::sync::Notify,
}

impl GuardStats {
    pub fn alive(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }
}

/// The counters the guard thread bumps, resolved once: no lock on the real-time path.
#[derive(Clone, Debug)]
pub struct GuardCounters {
    pub kill_signal_eventfd: Counter,
    pub kill_signal_ebpf: Counter,
    /// The cgroup v2 fallback watcher (polling, `memory.events`, PSI).
    pub kill_signal_fallback: Counter,
    pub reclaim_signal_eventfd: Counter,
    pub reclaim_signal_ebpf: Counter,
    pub reclaim_signal_fallback: Counter,
    pub skip_cache: Counter,
    pub skip_cooldown: Counter,
    pub skip_protected: Counter,
    pub(crate) reclaim_done: Counter,
    pub(crate) reclaim_timed_out: Counter,
    pub(crate) reclaim_failed: Counter,
    pub(crate) reclaim_seconds: Histogram,
}

impl GuardCounters {
    /// A `force_empty` run ended (called on the reclaim worker).
    pub fn reclaimed(&self, res: &ReclaimResult) {
        let took = match res {
            ReclaimResult::Done { took, .. } => {
                self.reclaim_done.inc();
                took
            }
            ReclaimResult::TimedOut { took, .. } => {
                self.reclaim_timed_out.inc();
                took
            }
            ReclaimResult::Failed { took, .. } => {
                self.reclaim_failed.inc();
                took
            }
            ReclaimResult::Unsupported => return,
        };
        self.reclaim_seconds.observe(took.as_secs_f64());
    }
}
