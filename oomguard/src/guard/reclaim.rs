//! The reclaim threshold: background `force_empty` (v2: `memory.reclaim`) on the reclaim
//! worker, at most one per cgroup at a time and one per `--reclaim-interval`, and never on
//! a cgroup whose page cache is large (the kernel reclaims that by itself).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Guard, drain};
use crate::cgroup::MemStat;
use crate::policy::cache_is_large;
use crate::reclaim::{ReclaimResult, Request};
use crate::report::Action;

impl Guard {
    pub(super) fn reclaim_signal(&mut self, path: &Path, signal: &'static str) {
        let interval = self.deps.config.reclaim_interval;
        let Some(e) = self.reg.entries.get_mut(path) else {
            return;
        };
        if let Some(fd) = &e.armed.reclaim_fd {
            drain(fd);
        }
        let usage = match e.files.usage(&e.armed.cgroup, e.armed.thresholds.counter) {
            Ok(u) => u,
            Err(_) => return,
        };
        if usage < e.armed.thresholds.reclaim {
            return;
        }
        // The kill threshold may be next: its victim is chosen and pinned now.
        self.prepare(path);
        let Some(e) = self.reg.entries.get_mut(path) else {
            return;
        };
        // Where the unreclaimable part stands now gives the kill threshold's first reading
        // a growth rate (a fast task can use up the cache in its cgroup before a re-check).
        let cache = e.files.reclaimable_cache(&e.armed.cgroup).unwrap_or(0);
        e.state
            .approach(Instant::now(), crate::decide::unreclaimable(usage, cache));
        let Some(reclaimer) = &self.deps.reclaimer else {
            return;
        };
        if e.reclaiming.load(Ordering::Acquire)
            || e.last_reclaim.is_some_and(|t| t.elapsed() < interval)
        {
            return;
        }
        // Large cache: the kernel reclaims it by itself and the kill threshold would skip
        // anyway. Dropping an I/O-heavy container's cache every interval would only hurt.
        if cache_is_large(
            cache,
            e.armed.thresholds.limit,
            self.deps.config.cache_skip_ratio,
        ) {
            return;
        }
        e.last_reclaim = Some(Instant::now());
        e.reclaiming.store(true, Ordering::Release);
        let flag = e.reclaiming.clone();
        let reporter = self.deps.reporter.clone();
        let counters = self.deps.metrics.clone();
        let mut d = self.decision(
            &self.reg.entries[path],
            Action::Reclaim,
            usage,
            MemStat::default(),
        );
        d.threshold = self.reg.entries[path].armed.thresholds.reclaim;
        d.signal = signal;
        let cgroup = self.reg.entries[path].armed.cgroup.clone();
        let reclaim_file = if cgroup.is_v2() {
            "memory.reclaim"
        } else {
            "force_empty"
        };
        let queued = reclaimer.request(Request {
            cgroup,
            done: Box::new(move |res: ReclaimResult| {
                flag.store(false, Ordering::Release);
                if res == ReclaimResult::Unsupported {
                    return;
                }
                if let Some(m) = &counters {
                    m.reclaimed(&res);
                }
                d.detail = format!("{}: {res:?}", reclaim_file);
                reporter.send(d);
            }),
        });
        if !queued && let Some(e) = self.reg.entries.get(path) {
            e.reclaiming.store(false, Ordering::Release);
        } else if queued && let Some(s) = &self.deps.state {
            s.cgroup_state(path, crate::state::CgroupState::Reclaiming);
        }
    }
}
