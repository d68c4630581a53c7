//! The charge program (`memcg_pressure` on `count_memcg_events`), attached on demand.
//!
//! On a v1 memory hierarchy the charge program's crossing record comes before the v1
//! threshold eventfd, but its tracepoint fires about 2.7 times per faulted page on every
//! memcg of the node: about 360 ns a page, 13–15% of a fault-heavy process's wall time
//! (BENCHMARKS.md, issue 15). `rss_stat` gives the crossings at a fifth of that, a few
//! microseconds after the eventfd. So `rss_stat` carries the crossings all the time, and the
//! charge program is attached only while some guarded cgroup is near its thresholds:
//!
//! - `rss_stat` sees a guarded cgroup's usage come within [`APPROACH_BYTES`] (at most half the
//!   threshold) of its lowest threshold, sets the cgroup's `NEAR` bit and sends one `APPROACH`
//!   record; [`super::EbpfGuard::drain`] hands it to [`ChargeHook::approach`], which attaches
//!   the program at once, in the draining (guard) thread.
//! - The charge program, while attached, clears the bit once usage is `APPROACH_BYTES +
//!   rearm_bytes` below; a thread of this module looks at the bits of the cgroups that
//!   approached every [`CHECK_EVERY`] and detaches the program when none is left (and no
//!   approach came for [`HOLD`]). Detaching closes the link in that thread, so a grace period
//!   the kernel may wait for there does not hold up the guard.
//!
//! The approach distance is what buys the attach its time: a hog faulting at 1.3 GB/s (this
//! machine, one core) covers 64 MiB in about 50 ms; attaching takes well under a
//! millisecond (logged per attach).

use std::{
    collections::HashSet,
    ffi::CStr,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use oomguard_common::{Thresholds, state};

use super::sys;

/// A guarded cgroup this close to its lowest threshold (at most half the threshold) gets the
/// charge program attached.
pub const APPROACH_BYTES: u64 = 64 * 1024 * 1024;
/// The program stays attached at least this long after the last approach record.
const HOLD: Duration = Duration::from_secs(2);
/// How often the detaching thread looks at the `NEAR` bits while the program is attached.
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Shared {
    /// The attachment: closing it detaches.
    link: Option<OwnedFd>,
    attached_at: Option<Instant>,
    /// Cgroups that sent an approach record since the program was attached.
    near: HashSet<u64>,
    last_approach: Option<Instant>,
    attaches: u64,
    stop: bool,
}

type State = Arc<(Mutex<Shared>, Condvar)>;

fn lock(state: &State) -> MutexGuard<'_, Shared> {
    state.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The loaded charge program and its on-demand attachment.
pub struct ChargeHook {
    program: OwnedFd,
    hook: &'static CStr,
    state: State,
    thread: Option<JoinHandle<()>>,
}

impl ChargeHook {
    /// `program`: the loaded (not attached) raw tracepoint program for `hook`; `thresholds`:
    /// the `THRESHOLDS` map, whose `NEAR` bits say when to detach.
    pub fn new(program: OwnedFd, hook: &'static CStr, thresholds: OwnedFd) -> ChargeHook {
        let state: State = Arc::default();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("oomguard-hook".into())
            .spawn(move || detacher(&shared, &thresholds))
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot start the charge program's detaching thread: once attached, it stays");
            })
            .ok();
        ChargeHook {
            program,
            hook,
            state,
            thread,
        }
    }

    /// An approach record of `cgroup_id`, sent at `ktime_ns`: attaches the program unless it
    /// is attached.
    pub fn approach(&self, cgroup_id: u64, ktime_ns: u64) {
        let mut s = lock(&self.state);
        s.near.insert(cgroup_id);
        s.last_approach = Some(Instant::now());
        if s.link.is_some() {
            return;
        }
        let start = Instant::now();
        match sys::raw_tracepoint_open(self.program.as_fd(), self.hook) {
            Ok(link) => {
                s.link = Some(link);
                s.attached_at = Some(Instant::now());
                s.attaches += 1;
                tracing::info!(
                    cgroup_id,
                    hook = %self.hook.to_string_lossy(),
                    attach_us = start.elapsed().as_micros() as u64,
                    since_record_us = super::monotonic_ns().saturating_sub(ktime_ns) / 1000,
                    attaches = s.attaches,
                    "a guarded cgroup is near its thresholds: charge program attached"
                );
            }
            Err(e) => tracing::warn!(
                cgroup_id,
                hook = %self.hook.to_string_lossy(),
                error = %e,
                "cannot attach the charge program: crossings come from rss_stat"
            ),
        }
    }

    /// Whether the program is attached now.
    pub fn attached(&self) -> bool {
        lock(&self.state).link.is_some()
    }

    /// How many times it was attached.
    pub fn attaches(&self) -> u64 {
        lock(&self.state).attaches
    }
}

impl Drop for ChargeHook {
    fn drop(&mut self) {
        lock(&self.state).stop = true;
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Detaches the program once no cgroup that approached is still near.
fn detacher(state: &State, thresholds: &OwnedFd) {
    let mut s = lock(state);
    loop {
        s = state
            .1
            .wait_timeout(s, CHECK_EVERY)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if s.stop {
            return;
        }
        if s.link.is_none() || s.last_approach.is_some_and(|t| t.elapsed() < HOLD) {
            continue;
        }
        // Gone from the map (disarmed, removed) or bit cleared: no longer near.
        s.near.retain(|id| {
            sys::lookup::<u64, Thresholds>(thresholds.as_fd(), id)
                .ok()
                .flatten()
                .is_some_and(|t| t.state & state::NEAR != 0)
        });
        if !s.near.is_empty() {
            continue;
        }
        let link = s.link.take();
        let held = s.attached_at.take().map(|t| t.elapsed());
        drop(s);
        let start = Instant::now();
        drop(link);
        tracing::info!(
            held_ms = held.map_or(0, |h| h.as_millis() as u64),
            detach_us = start.elapsed().as_micros() as u64,
            "no guarded cgroup is near its thresholds: charge program detached"
        );
        s = lock(state);
    }
}
