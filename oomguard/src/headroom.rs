//! The cgroup v2 fallback signals: v2 has no threshold eventfd, so where eBPF gives no
//! crossing records (and beside them, as the safety net) this thread watches each guarded
//! v2 cgroup's headroom and tells the guard thread when usage crossed its reclaim or kill
//! threshold, or when the kernel OOM killer ran there.
//!
//! Three sources, one thread:
//! - **Polling `memory.current`** at an interval that adapts to the headroom left (see
//!   [`next_poll`]): a cgroup far from its kill threshold is read rarely, one near it often.
//!   Each cgroup keeps its `memory.current` open and is read with one `pread`.
//! - **`memory.events` changes** (inotify `IN_MODIFY` on the file): `max` (a charge hit the
//!   limit), `high` (usage went over `memory.high`, see `--v2-throttle`) and `oom` make the
//!   cgroup be read at once; an `oom_kill` increase is reported as a kernel OOM kill.
//! - **A PSI trigger on `memory.pressure`** ([`crate::cgroup::v2::PSI_TRIGGER`]), armed
//!   while the cgroup is at or above its reclaim threshold only: every trigger costs the
//!   kernel a `psimon` thread per cgroup, and far from the limit there is no stall to see.
//!
//! The guard re-reads usage on every signal (the policy state de-duplicates), so this
//! thread only has to be early, never exact.
//!
//! **Quiet subtrees are read less often.** Each watched cgroup belongs to a *tripwire*: its
//! top-level ancestor (the directory right below the cgroup2 mount, e.g. `kubepods.slice`),
//! whose `memory.current` (hierarchical: the sum of everything beneath it) is read at most
//! every [`WIRE_INTERVAL`] and at least [`WIRE_INTERVAL`] − [`WIRE_EARLY`] apart: on a
//! wake-up the watcher has anyway when one comes in that window, else on its own. The wire
//! *trips* when that sum has moved by [`WIRE_TRIP`] or more, in either direction, since it
//! last tripped (or was first read), however slowly it got there. Once it has not tripped
//! for [`WIRE_QUIET`], the cgroups under it with at least [`QUIET_MIN_HEADROOM`] left below
//! their kill threshold are read on the quiet schedule ([`QUIET_FLOOR_RATE`], at most every
//! [`QUIET_MAX_POLL`]); a trip puts every cgroup under it back on the normal schedule
//! ([`FLOOR_RATE`], [`MAX_POLL`]) at once, counted from each cgroup's last read, exactly as
//! if it had never left it. A quiet cgroup that starts growing, at any rate up to 128 MiB/s,
//! trips its wire within [`WIRE_TRIP`] of growth plus one [`WIRE_INTERVAL`] (at most 72 MiB),
//! before the normal schedule's read falls due, because a quiet cgroup has at least
//! [`QUIET_MIN_HEADROOM`] left: so it is still read before its kill threshold, unless its
//! growth is hidden in the sum by siblings freeing as much at the same time; it is then still
//! read before the threshold at up to [`QUIET_FLOOR_RATE`] (and `memory.events` `max` and PSI
//! remain). Because the trip counts the drift since the last trip, not the move per read,
//! slow growth trips the wire too, and the quiet floor only has that masked case to cover.
//! Quiet cgroups' reads come early enough (an eighth of their interval) to share the
//! tripwire's wake-ups, so on a quiet node the watcher wakes about twice a second. On a node
//! whose pods keep changing the tripwire keeps tripping and the cost is that of the normal
//! schedule plus one read per tripwire per [`WIRE_INTERVAL`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchDescriptor, WatchMask};
use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::event::{EventfdFlags, Timespec, eventfd};

use crate::bpf::Threshold;
use crate::cgroup::v2::{self, MemoryEvents, PSI_TRIGGER};
use crate::cgroup::{MemCgroup, UNLIMITED};
use crate::guard::{Cmd, GuardSender, Signal};
use crate::threshold::Thresholds;

/// The growth rate every poll interval assumes at least: a cgroup read now cannot pass its
/// kill threshold unseen before the next read unless it grows faster than this. Twice the
/// 64 MB/s the fallback must beat.
pub const FLOOR_RATE: u64 = 128 << 20;
/// The shortest interval between two reads of one cgroup.
pub const MIN_POLL: Duration = Duration::from_millis(2);
/// The longest interval between two reads of one cgroup (an idle cgroup far from its limit).
pub const MAX_POLL: Duration = Duration::from_secs(2);
/// The floor rate while the cgroup's tripwire is quiet: growth up to this is seen before
/// the kill threshold even when siblings' frees hide it from the tripwire (any growth the
/// sum shows trips the wire, however slow).
pub const QUIET_FLOOR_RATE: u64 = 12 << 20;
/// The longest interval between two reads while the tripwire is quiet.
pub const QUIET_MAX_POLL: Duration = Duration::from_secs(30);
/// The longest time between two reads of each tripwire (a top-level ancestor's
/// `memory.current`): it has its own wake-up then, if no other came first...
pub const WIRE_INTERVAL: Duration = Duration::from_millis(500);
/// ...and it is read on any wake-up this much before that: two reads of a tripwire are at
/// least [`WIRE_INTERVAL`] − [`WIRE_EARLY`] (375 ms) apart.
pub const WIRE_EARLY: Duration = Duration::from_millis(125);
/// A move of the tripwire's sum by this much since it last tripped trips it again.
pub const WIRE_TRIP: u64 = 8 << 20;
/// Only cgroups with at least this much headroom go on the quiet schedule: growth at
/// [`FLOOR_RATE`] trips the wire within [`WIRE_TRIP`] + [`FLOOR_RATE`] × [`WIRE_INTERVAL`]
/// (72 MiB; the rest is for a late wake-up), before the normal schedule's read is due. A
/// cgroup nearer its threshold stays on the normal schedule.
pub const QUIET_MIN_HEADROOM: u64 = 96 << 20;
/// How long a tripwire must stay still before its cgroups go on the quiet schedule.
pub const WIRE_QUIET: Duration = Duration::from_secs(1);
/// Reads due within this much of each other are done in one wake-up...
const SLACK: Duration = Duration::from_millis(2);
/// ...and a read may come this fraction of its interval early, so that idle cgroups (long
/// intervals) are read in batches: a wake-up costs more than a read. Reading early is
/// always safe.
const EARLY_DIVISOR: u32 = 8;
/// How often the watcher's work is summed up in a debug line.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The polling policy: the time until the next read of a cgroup at `usage`, growing at
/// `rate` bytes/s (0 when not growing), with kill threshold `kill`.
///
/// `headroom / max(FLOOR_RATE, 2 × rate)`, clamped to [`MIN_POLL`, `MAX_POLL`]: at any
/// growth up to the floor rate, or up to twice the rate seen between the last two reads,
/// the next read comes before usage reaches the kill threshold, and the margin above it
/// (to the limit) is the slack for a faster burst. At or above the threshold the guard
/// re-checks on its own; the watcher reads every `above` to see it fall back and cross
/// again.
pub fn next_poll(usage: u64, kill: u64, rate: u64, above: Duration) -> Duration {
    poll_interval(usage, kill, rate, above, false)
}

/// [`next_poll`], or with `quiet` the quiet schedule ([`QUIET_FLOOR_RATE`],
/// [`QUIET_MAX_POLL`]) when at least [`QUIET_MIN_HEADROOM`] is left (else the normal one).
pub fn poll_interval(usage: u64, kill: u64, rate: u64, above: Duration, quiet: bool) -> Duration {
    let (floor, max) = if quiet {
        (QUIET_FLOOR_RATE, QUIET_MAX_POLL)
    } else {
        (FLOOR_RATE, MAX_POLL)
    };
    if usage >= kill {
        return above.clamp(MIN_POLL, MAX_POLL);
    }
    let (floor, max) = if quiet && kill - usage < QUIET_MIN_HEADROOM {
        (FLOOR_RATE, MAX_POLL)
    } else {
        (floor, max)
    };
    let assumed = floor.max(rate.saturating_mul(2)) as f64;
    let secs = (kill - usage) as f64 / assumed;
    Duration::from_secs_f64(secs.min(max.as_secs_f64())).clamp(MIN_POLL, max)
}

/// Options of the watcher.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often a cgroup at or above its kill threshold is read (`--guard-ms`).
    pub above_interval: Duration,
    /// `--v2-throttle`: set `memory.high` at the kill threshold while guarding.
    pub throttle: bool,
    /// The cgroup2 mount: each cgroup's tripwire is its ancestor right below it. `None`:
    /// no tripwires, every cgroup on the normal schedule.
    pub mount: Option<PathBuf>,
}

enum Msg {
    Watch(MemCgroup, Thresholds),
    Unwatch(PathBuf),
    Shutdown,
}

/// Counters for tests, `/metrics` and the CPU measurement.
#[derive(Debug, Default)]
pub struct WatcherStats {
    pub watched: AtomicU64,
    pub polls: AtomicU64,
    /// Reads of tripwires (top-level ancestors' `memory.current`).
    pub wire_reads: AtomicU64,
    /// Times a tripwire tripped (its subtree went back on the normal schedule).
    pub wire_trips: AtomicU64,
    pub wakeups: AtomicU64,
    pub crossings: AtomicU64,
}

/// Handle on the watcher thread.
pub struct Watcher {
    tx: Sender<Msg>,
    wake: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<WatcherStats>,
}

impl Watcher {
    /// Starts the thread; its signals go to `guard`.
    pub fn spawn(guard: GuardSender, options: Options) -> std::io::Result<Watcher> {
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            wake.as_fd(),
            EventData::new_u64(WAKE_TOKEN),
            EventFlags::IN,
        )?;
        let inotify = Inotify::init()?;
        epoll::add(
            &epoll,
            inotify.as_fd(),
            EventData::new_u64(INOTIFY_TOKEN),
            EventFlags::IN,
        )?;
        let (tx, rx) = channel();
        let stats = Arc::new(WatcherStats::default());
        let mut state = State {
            guard,
            options,
            epoll,
            wake: wake.clone(),
            rx,
            inotify,
            entries: HashMap::new(),
            by_path: HashMap::new(),
            by_wd: HashMap::new(),
            due: BinaryHeap::new(),
            next_key: FIRST_KEY,
            stats: stats.clone(),
            throttle_failed: false,
            wires: HashMap::new(),
            wire_ids: HashMap::new(),
            next_wire_id: 0,
            wire_read: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("oomguard-v2watch".into())
            .stack_size(256 * 1024)
            .spawn(move || state.run())?;
        Ok(Watcher {
            tx,
            wake,
            thread: Some(thread),
            stats,
        })
    }

    fn send(&self, msg: Msg) {
        if self.tx.send(msg).is_ok() {
            let _ = rustix::io::write(self.wake.as_fd(), &1u64.to_ne_bytes());
        }
    }

    /// Watches (or re-watches with new thresholds) a v2 cgroup.
    pub fn watch(&self, cg: &MemCgroup, thresholds: Thresholds) {
        self.send(Msg::Watch(cg.clone(), thresholds));
    }

    pub fn unwatch(&self, path: &Path) {
        self.send(Msg::Unwatch(path.to_path_buf()));
    }
}

impl Drop for Watcher {
    /// Stops the thread, which gives back every `memory.high` it set.
    fn drop(&mut self) {
        self.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const WAKE_TOKEN: u64 = 0;
const INOTIFY_TOKEN: u64 = 1;
/// Keys of watched cgroups start here; a cgroup's PSI fd is registered under its key.
const FIRST_KEY: u64 = 2;

struct Entry {
    cg: MemCgroup,
    thresholds: Thresholds,
    current: File,
    wd: Option<WatchDescriptor>,
    psi: Option<OwnedFd>,
    events: MemoryEvents,
    last: Option<(Instant, u64)>,
    rate: u64,
    above_kill: bool,
    above_reclaim: bool,
    /// Bumped on every (re)schedule: stale heap entries are skipped.
    generation: u64,
    /// `memory.high` as it was before `--v2-throttle` set it (restored on unwatch).
    high_before: Option<u64>,
    /// Its tripwire (a key of `State::wires`), if it has one.
    wire: Option<u64>,
    /// Read on the quiet schedule: the next read may be brought forward when the wire trips.
    quiet: bool,
}

/// A tripwire: a top-level ancestor's `memory.current`, read every [`WIRE_INTERVAL`] at
/// most.
struct Wire {
    path: PathBuf,
    current: File,
    /// The sum when it last tripped (or was first read): a drift of [`WIRE_TRIP`] from
    /// here trips it.
    base: u64,
    /// Since when it has not tripped (None: it just tripped).
    still_since: Option<Instant>,
    members: Vec<u64>,
}

impl Wire {
    /// A new reading of the sum: whether it trips the wire (then the drift counts from it).
    fn read(&mut self, now: Instant, sum: u64) -> bool {
        if sum.abs_diff(self.base) >= WIRE_TRIP {
            self.base = sum;
            self.still_since = None;
            true
        } else {
            self.still_since.get_or_insert(now);
            false
        }
    }

    fn quiet(&self, now: Instant) -> bool {
        self.still_since
            .is_some_and(|t| now.duration_since(t) >= WIRE_QUIET)
    }
}

struct State {
    guard: GuardSender,
    options: Options,
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    rx: Receiver<Msg>,
    inotify: Inotify,
    entries: HashMap<u64, Entry>,
    by_path: HashMap<PathBuf, u64>,
    by_wd: HashMap<WatchDescriptor, u64>,
    /// (due, key, generation, how early it may be read).
    due: BinaryHeap<Reverse<(Instant, u64, u64, Duration)>>,
    next_key: u64,
    stats: Arc<WatcherStats>,
    throttle_failed: bool,
    /// Tripwires by id...
    wires: HashMap<u64, Wire>,
    /// ...and their ids by path.
    wire_ids: HashMap<PathBuf, u64>,
    next_wire_id: u64,
    /// When the tripwires were last read (all at once).
    wire_read: Instant,
}

impl State {
    fn run(&mut self) {
        let mut events: Vec<Event> = Vec::with_capacity(64);
        let mut buf = vec![0u8; 16 * 1024];
        let mut summary = (Instant::now(), 0u64, 0u64);
        loop {
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            if summary.0.elapsed() >= SUMMARY_EVERY {
                let polls = self.stats.polls.load(Ordering::Relaxed);
                let wakeups = self.stats.wakeups.load(Ordering::Relaxed);
                tracing::debug!(
                    watched = self.entries.len(),
                    tripwires = self.wires.len(),
                    quiet = self.entries.values().filter(|e| e.quiet).count(),
                    polls = polls - summary.1,
                    wakeups = wakeups - summary.2,
                    secs = summary.0.elapsed().as_secs_f64(),
                    "v2 fallback watcher"
                );
                summary = (Instant::now(), polls, wakeups);
            }
            let mut wait = self
                .due
                .peek()
                .map(|Reverse((t, _, _, _))| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(60));
            if !self.wires.is_empty() {
                let next_wire = self.wire_read + WIRE_INTERVAL;
                wait = wait.min(next_wire.saturating_duration_since(Instant::now()));
            }
            let ts = Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            events.clear();
            match epoll::wait(&self.epoll, spare_capacity(&mut events), Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; the v2 fallback watcher stops");
                    return;
                }
            }
            let ready: Vec<u64> = events.iter().map(|e| e.data.u64()).collect();
            for token in ready {
                match token {
                    WAKE_TOKEN => {
                        let mut b = [0u8; 8];
                        let _ = rustix::io::read(self.wake.as_fd(), &mut b);
                        if !self.commands() {
                            self.restore_all();
                            return;
                        }
                    }
                    INOTIFY_TOKEN => self.inotify_events(&mut buf),
                    key => {
                        // A PSI trigger fired: the cgroup stalls on memory now.
                        self.poll(key, "psi");
                    }
                }
            }
            let now = Instant::now();
            // On this wake-up if it is in the tripwires' window, whatever woke the thread.
            if !self.wires.is_empty() && now >= self.wire_read + (WIRE_INTERVAL - WIRE_EARLY) {
                self.wire_read = now;
                self.check_wires(now);
            }
            while let Some(Reverse((t, key, generation, early))) = self.due.peek().copied() {
                if t > now + early.max(SLACK) {
                    break;
                }
                self.due.pop();
                if self
                    .entries
                    .get(&key)
                    .is_some_and(|e| e.generation == generation)
                {
                    self.poll(key, "poll");
                }
            }
        }
    }

    fn commands(&mut self) -> bool {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Watch(cg, t) => self.watch(cg, t),
                Msg::Unwatch(path) => {
                    if let Some(key) = self.by_path.remove(&path) {
                        self.remove(key);
                    }
                }
                Msg::Shutdown => return false,
            }
        }
        true
    }

    fn watch(&mut self, cg: MemCgroup, thresholds: Thresholds) {
        if let Some(&key) = self.by_path.get(&cg.path) {
            let Some(e) = self.entries.get_mut(&key) else {
                return;
            };
            e.thresholds = thresholds;
            self.throttle(key);
            self.poll(key, "arm");
            return;
        }
        let current = match File::open(cg.file("memory.current")) {
            Ok(f) => f,
            Err(e) => {
                if cg.exists() {
                    tracing::warn!(cgroup = %cg.path.display(), error = %e, "cannot open memory.current: no fallback signal for this cgroup");
                }
                return;
            }
        };
        let wd = match self
            .inotify
            .watches()
            .add(cg.file("memory.events"), WatchMask::MODIFY)
        {
            Ok(wd) => Some(wd),
            Err(e) => {
                tracing::warn!(cgroup = %cg.path.display(), error = %e, "cannot watch memory.events: polling only");
                None
            }
        };
        let key = self.next_key;
        self.next_key += 1;
        if let Some(wd) = &wd {
            self.by_wd.insert(wd.clone(), key);
        }
        let events = cg.events().unwrap_or_default();
        let wire = self.join_wire(&cg.path, key);
        self.by_path.insert(cg.path.clone(), key);
        self.entries.insert(
            key,
            Entry {
                cg,
                thresholds,
                current,
                wd,
                psi: None,
                events,
                last: None,
                rate: 0,
                above_kill: false,
                above_reclaim: false,
                generation: 0,
                high_before: None,
                wire,
                quiet: false,
            },
        );
        self.stats
            .watched
            .store(self.entries.len() as u64, Ordering::Relaxed);
        self.throttle(key);
        self.poll(key, "arm");
    }

    /// The tripwire of the cgroup at `path` (its ancestor right below the mount), opened
    /// on first use; `key` joins it. None for a top-level cgroup or without a mount.
    fn join_wire(&mut self, path: &Path, key: u64) -> Option<u64> {
        let mount = self.options.mount.as_ref()?;
        let rel = path.strip_prefix(mount).ok()?;
        let mut parts = rel.components();
        let top = parts.next()?;
        parts.next()?;
        let wire_path = mount.join(top);
        if let Some(&id) = self.wire_ids.get(&wire_path)
            && let Some(w) = self.wires.get_mut(&id)
        {
            w.members.push(key);
            return Some(id);
        }
        let current = File::open(wire_path.join("memory.current")).ok()?;
        let last = read_u64_at(&current)?;
        let id = self.next_wire_id;
        self.next_wire_id += 1;
        self.wire_ids.insert(wire_path.clone(), id);
        self.wires.insert(
            id,
            Wire {
                path: wire_path,
                current,
                base: last,
                still_since: Some(Instant::now()),
                members: vec![key],
            },
        );
        Some(id)
    }

    /// Reads every tripwire; one that moved puts its quiet members back on the normal
    /// schedule, counted from their last read.
    fn check_wires(&mut self, now: Instant) {
        let above = self.options.above_interval;
        let mut tripped: Vec<u64> = Vec::new();
        let mut gone: Vec<u64> = Vec::new();
        for (&id, w) in &mut self.wires {
            self.stats.wire_reads.fetch_add(1, Ordering::Relaxed);
            let Some(v) = read_u64_at(&w.current) else {
                gone.push(id);
                continue;
            };
            if w.read(now, v) {
                tripped.push(id);
            }
        }
        for id in gone {
            if let Some(w) = self.wires.remove(&id) {
                self.wire_ids.remove(&w.path);
                for key in w.members {
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.wire = None;
                    }
                }
            }
        }
        for id in tripped {
            self.stats.wire_trips.fetch_add(1, Ordering::Relaxed);
            let Some(w) = self.wires.get(&id) else {
                continue;
            };
            let mut woke = 0usize;
            for &key in &w.members {
                let Some(e) = self.entries.get_mut(&key) else {
                    continue;
                };
                if !e.quiet {
                    continue;
                }
                e.quiet = false;
                woke += 1;
                let Some((at, usage)) = e.last else { continue };
                let interval = poll_interval(usage, e.thresholds.kill, e.rate, above, false);
                e.generation += 1;
                self.due.push(Reverse((
                    (at + interval).max(now),
                    key,
                    e.generation,
                    interval / EARLY_DIVISOR,
                )));
            }
            if woke > 0 {
                tracing::debug!(
                    tripwire = %w.path.display(),
                    woke,
                    "tripwire tripped: its quiet cgroups are back on the normal schedule"
                );
            }
        }
    }

    fn remove(&mut self, key: u64) {
        self.restore_high(key);
        if let Some(e) = self.entries.get(&key)
            && let Some(id) = e.wire
            && let Some(w) = self.wires.get_mut(&id)
        {
            w.members.retain(|&k| k != key);
            if w.members.is_empty()
                && let Some(w) = self.wires.remove(&id)
            {
                self.wire_ids.remove(&w.path);
            }
        }
        if let Some(e) = self.entries.remove(&key) {
            if let Some(wd) = e.wd {
                self.by_wd.remove(&wd);
                // Fails when the file is gone (the watch went with it).
                let _ = self.inotify.watches().remove(wd);
            }
            if self.by_path.get(&e.cg.path) == Some(&key) {
                self.by_path.remove(&e.cg.path);
            }
        }
        self.stats
            .watched
            .store(self.entries.len() as u64, Ordering::Relaxed);
    }

    /// `--v2-throttle`: `memory.high` at the kill threshold, remembering the old value.
    fn throttle(&mut self, key: u64) {
        if !self.options.throttle {
            return;
        }
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        if e.high_before.is_none() {
            e.high_before = v2::high(&e.cg.path).ok();
        }
        if let Err(err) = v2::set_high(&e.cg.path, Some(e.thresholds.kill))
            && !self.throttle_failed
        {
            self.throttle_failed = true;
            tracing::warn!(cgroup = %e.cg.path.display(), error = %err, "--v2-throttle: cannot set memory.high (said once)");
        }
    }

    /// Gives back the `memory.high` `--v2-throttle` replaced, unless someone (the kubelet's
    /// MemoryQoS) changed it meanwhile.
    fn restore_high(&mut self, key: u64) {
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        let Some(before) = e.high_before.take() else {
            return;
        };
        if v2::high(&e.cg.path).ok() == Some(e.thresholds.kill) {
            let value = (before < UNLIMITED).then_some(before);
            let _ = v2::set_high(&e.cg.path, value);
        }
    }

    fn restore_all(&mut self) {
        let keys: Vec<u64> = self.entries.keys().copied().collect();
        for key in keys {
            self.restore_high(key);
        }
    }

    fn inotify_events(&mut self, buf: &mut [u8]) {
        let mut keys = Vec::new();
        match self.inotify.read_events(buf) {
            Ok(events) => {
                for ev in events {
                    if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                        keys.extend(self.entries.keys().copied());
                    } else if let Some(&key) = self.by_wd.get(&ev.wd) {
                        if ev.mask.contains(inotify::EventMask::IGNORED) {
                            self.by_wd.remove(&ev.wd);
                            if let Some(e) = self.entries.get_mut(&key) {
                                e.wd = None;
                            }
                        } else {
                            keys.push(key);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(error = %e, "reading inotify events of memory.events"),
        }
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            self.on_events(key);
        }
    }

    /// `memory.events` changed: a kernel OOM kill is reported, and any other change makes
    /// the cgroup be read now.
    fn on_events(&mut self, key: u64) {
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        let Ok(now) = e.cg.events() else {
            return;
        };
        let before = std::mem::replace(&mut e.events, now);
        if now.oom_kill > before.oom_kill || now.oom > before.oom {
            self.guard
                .send(Cmd::Signal(Signal::KernelOom(e.cg.path.clone())));
        }
        if now != before {
            self.poll(key, "memory.events");
        }
    }

    /// Reads `memory.current`, signals crossings, and schedules the next read.
    fn poll(&mut self, key: u64, via: &'static str) {
        let above_interval = self.options.above_interval;
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        let Some(usage) = read_u64_at(&e.current) else {
            // Gone (ENODEV): discovery disarms it; stop reading.
            let path = e.cg.path.clone();
            self.by_path.remove(&path);
            self.remove(key);
            return;
        };
        let now = Instant::now();
        if let Some((t, u)) = e.last {
            let dt = now.duration_since(t).as_secs_f64();
            e.rate = if usage > u && dt > 0.0 {
                ((usage - u) as f64 / dt) as u64
            } else {
                0
            };
        }
        e.last = Some((now, usage));
        let t = e.thresholds;
        let mut signals = Vec::new();
        let kill_now = usage >= t.kill;
        if kill_now && !e.above_kill {
            signals.push(Threshold::Kill);
        }
        e.above_kill = kill_now;
        let reclaim_now = usage >= t.reclaim;
        if reclaim_now && !e.above_reclaim {
            signals.push(Threshold::Reclaim);
        }
        e.above_reclaim = reclaim_now;
        // PSI only near the limit: each trigger costs the kernel a thread.
        if reclaim_now && e.psi.is_none() {
            match v2::psi_trigger(&e.cg.path, PSI_TRIGGER) {
                Ok(fd) => {
                    if epoll::add(
                        &self.epoll,
                        fd.as_fd(),
                        EventData::new_u64(key),
                        EventFlags::PRI,
                    )
                    .is_ok()
                    {
                        e.psi = Some(fd);
                    }
                }
                Err(err) => {
                    tracing::debug!(cgroup = %e.cg.path.display(), error = %err, "no PSI trigger")
                }
            }
        } else if usage < t.reclaim.saturating_sub(t.margin) {
            // Closing the fd removes it from the epoll set and destroys the trigger.
            e.psi = None;
        }
        e.generation += 1;
        // Quiet only with the headroom the tripwire's lateness needs (see poll_interval).
        let now_quiet = t.kill.saturating_sub(usage) >= QUIET_MIN_HEADROOM
            && e.wire
                .and_then(|id| self.wires.get(&id))
                .is_some_and(|w| w.quiet(now));
        e.quiet = now_quiet;
        let interval = poll_interval(usage, t.kill, e.rate, above_interval, now_quiet);
        self.due.push(Reverse((
            now + interval,
            key,
            e.generation,
            interval / EARLY_DIVISOR,
        )));
        if signals.is_empty() {
            return;
        }
        let path = e.cg.path.clone();
        for threshold in signals {
            self.stats.crossings.fetch_add(1, Ordering::Relaxed);
            self.guard.send(Cmd::Signal(Signal::Crossed {
                path: path.clone(),
                threshold,
                at: now,
                via,
            }));
        }
    }
}

/// One `pread` of a cgroup counter file from its start.
fn read_u64_at(f: &File) -> Option<u64> {
    let mut buf = [0u8; 32];
    let n = rustix::io::pread(f, &mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const ABOVE: Duration = Duration::from_millis(50);

    #[test]
    fn far_from_the_threshold_is_read_rarely() {
        // 500 MiB of headroom at the 128 MiB/s floor: about 4 s, capped at 2 s.
        assert_eq!(next_poll(12 * M, 512 * M, 0, ABOVE), MAX_POLL);
        // 64 MiB of headroom: half a second.
        let d = next_poll(192 * M, 256 * M, 0, ABOVE);
        assert!(
            d > Duration::from_millis(490) && d < Duration::from_millis(510),
            "{d:?}"
        );
    }

    #[test]
    fn near_the_threshold_or_growing_fast_is_read_often() {
        // 1 MiB of headroom: under 10 ms.
        assert!(next_poll(255 * M, 256 * M, 0, ABOVE) < Duration::from_millis(10));
        // Growing at 1 GiB/s with 100 MiB left: read within 50 ms.
        let d = next_poll(156 * M, 256 * M, 1024 * M, ABOVE);
        assert!(d <= Duration::from_millis(50), "{d:?}");
        // Never below the floor interval.
        assert_eq!(next_poll(256 * M - 1, 256 * M, u64::MAX, ABOVE), MIN_POLL);
    }

    #[test]
    fn quiet_schedule_reads_a_quarter_as_often_and_still_covers_its_floor() {
        // 500 MiB of headroom: past the normal cap (2 s at 128 MiB/s) and the quiet one.
        let normal = poll_interval(12 * M, 512 * M, 0, ABOVE, false);
        let quiet = poll_interval(12 * M, 512 * M, 0, ABOVE, true);
        assert_eq!(normal, MAX_POLL);
        assert!(quiet >= 3 * normal, "{quiet:?} vs {normal:?}");
        assert!(quiet <= QUIET_MAX_POLL);
        let kill = 250 * M;
        for usage in (0..kill).step_by((3 * M) as usize) {
            let d = poll_interval(usage, kill, 0, ABOVE, true);
            let grown = usage + (QUIET_FLOOR_RATE as f64 * d.as_secs_f64()) as u64;
            assert!(
                grown <= kill + 4096 || d == MIN_POLL,
                "usage {usage}: {d:?}"
            );
        }
        // A growing cgroup is read by its own rate either way.
        assert_eq!(
            poll_interval(100 * M, 250 * M, 512 * M, ABOVE, true),
            poll_interval(100 * M, 250 * M, 512 * M, ABOVE, false)
        );
        // Too near the threshold for the tripwire's lateness: the normal schedule.
        let near = 250 * M - QUIET_MIN_HEADROOM + M;
        assert_eq!(
            poll_interval(near, 250 * M, 0, ABOVE, true),
            poll_interval(near, 250 * M, 0, ABOVE, false)
        );
        assert!(
            QUIET_MIN_HEADROOM as f64
                >= WIRE_TRIP as f64 + FLOOR_RATE as f64 * WIRE_INTERVAL.as_secs_f64()
        );
    }

    /// A quiet cgroup (read at 0 s) that starts growing at `g` at `rate`, its tripwire read
    /// every `spacing` from `phase`: the time of its next read, by the watcher's rules.
    fn quiet_then_grows(usage: u64, kill: u64, rate: f64, g: f64, phase: f64, spacing: f64) -> f64 {
        let quiet = poll_interval(usage, kill, 0, ABOVE, true).as_secs_f64();
        let normal = poll_interval(usage, kill, 0, ABOVE, false).as_secs_f64();
        let grown = |t: f64| rate * (t - g).max(0.0);
        // The wire was still (its drift counted) from before 0 s, when the cgroup was read.
        let mut r = phase;
        while r < quiet {
            if grown(r) >= WIRE_TRIP as f64 {
                return quiet.min(normal.max(r));
            }
            r += spacing;
        }
        quiet
    }

    #[test]
    fn a_quiet_cgroup_growing_at_up_to_the_floor_rate_is_read_before_its_threshold() {
        let kill = 250 * M;
        for usage in (0..kill).step_by((7 * M) as usize) {
            for rate_mib in [1u64, 2, 4, 8, 12, 16, 22, 24, 32, 64, 100, 128] {
                let rate = (rate_mib * M) as f64;
                let cross_after = (kill - usage) as f64 / rate;
                for spacing in [WIRE_INTERVAL - WIRE_EARLY, WIRE_INTERVAL] {
                    let spacing = spacing.as_secs_f64();
                    for phase_step in 0..5 {
                        let phase = spacing * f64::from(phase_step) / 5.0;
                        for g_step in 0..40 {
                            let g = 12.0 * f64::from(g_step) / 40.0;
                            let read = quiet_then_grows(usage, kill, rate, g, phase, spacing);
                            assert!(
                                read <= g + cross_after + 1e-6,
                                "usage {} MiB, {rate_mib} MiB/s from {g:.2} s, wire every \
                                 {spacing} s from {phase:.2} s: read at {read:.3} s, \
                                 crossed at {:.3} s",
                                usage / M,
                                g + cross_after
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_wire_trips_on_its_drift_since_the_last_trip_however_slow() {
        let t0 = Instant::now();
        let mut w = Wire {
            path: PathBuf::from("/dev/null"),
            current: File::open("/dev/null").unwrap(),
            base: 100 * M,
            still_since: Some(t0),
            members: Vec::new(),
        };
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 1 MiB per read, up: still for seven reads, tripped at the eighth MiB.
        for i in 1..8u64 {
            assert!(!w.read(at(500 * i), 100 * M + i * M), "read {i}");
        }
        assert!(w.quiet(at(3500)));
        assert!(w.read(at(4000), 108 * M));
        assert!(!w.quiet(at(4000)));
        // The drift counts from the trip: 7 MiB down does not trip, 8 does.
        assert!(!w.read(at(4500), 101 * M));
        assert!(!w.quiet(at(5000)), "still for half a second only");
        assert!(w.quiet(at(5500)));
        assert!(w.read(at(6000), 100 * M));
        // Jitter around the base never trips.
        for i in 0..100u64 {
            let sum = 100 * M + (i % 7) * M - 3 * M;
            assert!(!w.read(at(6500 + 500 * i), sum), "read {i}");
        }
    }

    #[test]
    fn above_the_threshold_reads_at_the_guard_interval() {
        assert_eq!(next_poll(300 * M, 256 * M, 0, ABOVE), ABOVE);
        assert_eq!(next_poll(300 * M, 256 * M, 0, Duration::ZERO), MIN_POLL);
    }

    #[test]
    fn the_floor_rate_is_never_outrun_unseen() {
        // Whatever the usage, growing at the floor rate for one interval stays below the
        // limit (kill threshold + margin) when the read comes.
        let kill = 240 * M;
        for usage in (0..kill).step_by((3 * M) as usize) {
            let d = next_poll(usage, kill, 0, ABOVE);
            let grown = usage + (FLOOR_RATE as f64 * d.as_secs_f64()) as u64;
            assert!(
                grown <= kill + 4096 || d == MIN_POLL,
                "usage {usage}: {d:?}"
            );
        }
    }
}
