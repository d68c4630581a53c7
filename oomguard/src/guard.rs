//! The guard thread: real-time priority, waits on every threshold eventfd, and on a signal
//! re-reads usage, checks cache, picks the victim and sends the kill. Nothing on it waits on
//! the network, on a runtime, or on `force_empty` (that runs on the reclaim worker).
//!
//! Three eventfds per guarded cgroup: the kill threshold, the lower reclaim threshold, and
//! `memory.oom_control` (the kernel OOM killer ran). Threshold eventfds fire on upward and
//! downward crossings and when the cgroup is removed, so every wake-up re-reads usage. While
//! a cgroup's episode is open it is re-checked on its own schedule (the notifier does not
//! fire again until usage first falls back below): usage every `guard_interval`, and
//! `memory.stat` of a cgroup whose cache the kernel can still reclaim only as often as its
//! headroom asks ([`crate::decide::recheck_after`]). A victim that has not exited is
//! waited for through its pidfd in the same epoll set.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::event::{EventfdFlags, Timespec, eventfd};
use thiserror::Error;

use crate::bpf::{EbpfGuard, Record, Threshold};
use crate::cgroup::{MemCgroup, MemStat};
use crate::config::{Config, Policy};
use crate::decide;
use crate::kill::{kill_task_pinned, pidfd_exited};
use crate::policy::{State, Step, cache_is_large};
use crate::reclaim::{ReclaimResult, Reclaimer, Request};
use crate::report::{Action, ContainerKill, Decision, Killed, Reporter};
use crate::runtime::{RuntimeClient, fallback_kill_cgroup_tasks};
use crate::threshold::Thresholds;
use crate::victim;

/// How many candidates one decision may try before giving up.
const MAX_KILL_ATTEMPTS: usize = 8;

/// A cgroup ready to be guarded: its thresholds and the eventfds armed for them (cgroup v2
/// has none: its crossings come as [`Signal`]s from eBPF or [`crate::headroom`]).
pub struct Armed {
    pub cgroup: MemCgroup,
    pub thresholds: Thresholds,
    pub kill_fd: Option<OwnedFd>,
    pub reclaim_fd: Option<OwnedFd>,
    pub oom_fd: Option<OwnedFd>,
}

pub enum Cmd {
    /// Guard (or re-guard with new thresholds) a cgroup; replaces its old eventfds.
    Arm(Box<Armed>),
    /// The reclaim threshold of a cgroup armed before without one (a walk arms every kill
    /// threshold first). Dropped (and so unregistered) when the cgroup was disarmed or
    /// re-armed with other thresholds meanwhile.
    AddReclaim {
        path: PathBuf,
        thresholds: Thresholds,
        fd: OwnedFd,
    },
    /// Stop guarding a cgroup and close its eventfds.
    Disarm(PathBuf),
    /// New flags (SIGHUP): policy, cooldown, timeouts take effect from the next signal.
    Reload(Arc<Config>),
    /// A wake source on another thread saw something (the cgroup v2 fallback watcher).
    Signal(Signal),
    Shutdown,
}

/// What a wake source other than the guard's own eventfds and ring buffer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Usage was read at or above a threshold, having been below it.
    Crossed {
        path: PathBuf,
        threshold: Threshold,
        /// When it was read: the decision's wake time.
        at: Instant,
        /// The source, for the decision record (`poll`, `psi`, `memory.events`...).
        via: &'static str,
    },
    /// The kernel OOM path ran in this cgroup's subtree (`memory.events` `oom`/`oom_kill`).
    KernelOom(PathBuf),
}

#[derive(Debug, Error)]
pub enum GuardError {
    #[error("cannot set up the guard's epoll/eventfd")]
    Setup(#[source] std::io::Error),
    #[error("cannot start the guard thread")]
    Spawn(#[source] std::io::Error),
}

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

/// Marks the guard stopped however its thread ends.
struct StoppedOnDrop(Arc<GuardStats>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        self.0.stopped_notify.notify_one();
    }
}

/// The other threads' handle on the guard thread.
pub struct GuardHandle {
    tx: Sender<Cmd>,
    wake: Arc<OwnedFd>,
    pub stats: Arc<GuardStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A cloneable sender of commands to the guard thread, for wake sources on other threads.
#[derive(Clone)]
pub struct GuardSender {
    tx: Sender<Cmd>,
    wake: Arc<OwnedFd>,
}

impl GuardSender {
    pub fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            // An eventfd write only fails when the counter would overflow: then it is
            // already readable, which is all the wake-up needs.
            let _ = rustix::io::write(self.wake.as_fd(), &1u64.to_ne_bytes());
        }
    }
}

impl GuardHandle {
    pub fn send(&self, cmd: Cmd) {
        self.sender().send(cmd);
    }

    pub fn sender(&self) -> GuardSender {
        GuardSender {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// False once the guard thread has stopped (an epoll failure or a panic): the agent
    /// must then exit rather than run on without guarding anything.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the guard thread and waits for it.
    pub fn shutdown(mut self) {
        self.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything the guard needs besides its commands.
pub struct Deps {
    pub config: Arc<Config>,
    pub reporter: Reporter,
    pub reclaimer: Option<Reclaimer>,
    /// Where the memory hierarchy is mounted (to map `/proc/PID/cgroup` paths).
    pub memory_mount: PathBuf,
    /// containerd, for the container policy (`None`: the policy falls back to `process`).
    pub runtime: Option<Arc<RuntimeClient>>,
    /// The eBPF programs (`None`: pure eventfd mode).
    pub ebpf: Option<EbpfGuard>,
    /// Where cgroups the eBPF `cgroup_mkdir` program saw made go (discovery arms them).
    pub created: Option<tokio::sync::mpsc::UnboundedSender<PathBuf>>,
    /// The debug view served on the control socket.
    pub state: Option<Arc<crate::state::AgentState>>,
    /// Counters for `/metrics` (`None`: not counted).
    pub metrics: Option<crate::metrics::GuardCounters>,
}

/// Bound on identifying the container on the kill path: labels are normally cached when the
/// cgroup is armed (prefetch), so a runtime that does not answer this fast is treated as
/// hung and the container's tasks are killed directly.
const PLAN_TIMEOUT: Duration = Duration::from_millis(250);
/// Bound on containerd's kill (measured here: 35-76 ms to the last process gone).
const RUNTIME_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wake,
    Kill,
    Reclaim,
    Oom,
    Ring,
    BpfLog,
    /// A victim's pidfd: readable when it has exited.
    Victim,
}

/// A victim signalled but not yet gone: no other victim in its subtree until it exits, or
/// until `cooldown` (the longest wait, like the kernel's OOM reaper giving up on a task).
struct Pending {
    pid: i32,
    fd: Option<OwnedFd>,
    token: Option<u64>,
    since: Instant,
}

struct Entry {
    armed: Armed,
    /// The cgroup id (directory inode), as eBPF records name it.
    id: u64,
    state: State,
    last_reclaim: Option<Instant>,
    reclaiming: Arc<AtomicBool>,
    tokens: Vec<u64>,
    oom_kills_seen: u64,
    /// The OOM eventfd fired before the kernel counted its kill: look again until then.
    oom_pending_until: Option<Instant>,
    /// The kernel's victims in this subtree as the eBPF `mark_victim` program saw them, not
    /// yet in a report.
    kernel_victims: Vec<Killed>,
    /// Reading usage failed last time (logged once).
    usage_unreadable: bool,
    /// Re-check until then even below the threshold: a kill-eventfd wake-up that read
    /// usage below the threshold may have met a momentary dip (per-CPU charge stock
    /// drained, reclaim), and the kernel will not signal the same crossing again.
    watch_until: Option<Instant>,
    /// When to evaluate again without a signal (`None`: only on a signal).
    next_check: Option<Instant>,
    /// The last evaluation an eBPF at-limit record asked for (they come with every reclaim
    /// of a cgroup that lives at its limit: rate-limited to one per [`AT_LIMIT_EVERY`]).
    last_at_limit: Option<Instant>,
    /// The victim of this cgroup's last kill, while it has not exited.
    victim: Option<Pending>,
    /// The band below the kill threshold that ends an episode.
    hysteresis: u64,
    /// `memory.oom_kill_disable=1` when armed: a user-space OOM handler owns the cgroup
    /// (the kernel freezes its tasks at the limit instead of killing); never acted on.
    left_alone: bool,
    /// `memory.use_hierarchy=0` (kernels before 5.11): the limit covers only the cgroup's
    /// own tasks, so only they are candidates.
    flat: bool,
}

/// How long a kill-eventfd wake-up keeps a cgroup under watch.
const WATCH_WINDOW: Duration = Duration::from_secs(1);
/// How long to wait for the kernel to count a kill after its OOM notification.
const OOM_COUNT_WAIT: Duration = Duration::from_secs(3);
/// At most one evaluation per cgroup per this from eBPF at-limit records.
const AT_LIMIT_EVERY: Duration = Duration::from_millis(100);
/// Growth assumed for a cgroup at its limit with reclaimable cache when none was measured:
/// sets how often its `memory.stat` is read (20 MiB of headroom: every 156 ms).
const ASSUMED_GROWTH: u64 = 64 << 20;
/// The shortest: a fast task that crossed with a few MiB of cache in its cgroup (its own
/// binary's pages) must be seen growing before the kernel runs out of that cache.
const RECHECK_MIN: Duration = Duration::from_millis(10);
/// The longest a cgroup with reclaimable cache goes without a re-check.
const RECHECK_MAX: Duration = Duration::from_secs(1);

struct Guard {
    deps: Deps,
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    rx: Receiver<Cmd>,
    entries: HashMap<PathBuf, Entry>,
    tokens: HashMap<u64, (PathBuf, Kind)>,
    next_token: u64,
    stats: Arc<GuardStats>,
    self_pid: i32,
    /// eBPF records name cgroups by id.
    by_id: HashMap<u64, PathBuf>,
    /// Ring records drained early (to find a kernel OOM's victim before reporting it), not
    /// yet handled.
    backlog: Vec<Record>,
    /// Victims (by record time) of the backlog already stashed by [`Guard::collect_victims`].
    stashed: std::collections::HashSet<u64>,
    /// The agent's own memory cgroup: its tasks and the container holding it are never
    /// chosen, whatever the policy.
    self_cgroup: Option<PathBuf>,
    /// CPUs the kernel may batch charges on (the hysteresis covers one batch each).
    cpus: u64,
    /// Entries with a pending victim (most of the time none: no subtree scan then).
    pending_victims: usize,
}

const RING_TOKEN: u64 = u64::MAX;
const BPF_LOG_TOKEN: u64 = u64::MAX - 1;

/// Starts the guard thread.
pub fn spawn(deps: Deps) -> Result<GuardHandle, GuardError> {
    let epoll = epoll::create(CreateFlags::CLOEXEC).map_err(|e| GuardError::Setup(e.into()))?;
    let wake = Arc::new(
        eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| GuardError::Setup(e.into()))?,
    );
    epoll::add(&epoll, wake.as_fd(), EventData::new_u64(0), EventFlags::IN)
        .map_err(|e| GuardError::Setup(e.into()))?;
    let (tx, rx) = channel();
    let stats = Arc::new(GuardStats::default());
    let mut guard = Guard {
        deps,
        epoll,
        wake: wake.clone(),
        rx,
        entries: HashMap::new(),
        tokens: HashMap::from([(0, (PathBuf::new(), Kind::Wake))]),
        next_token: 1,
        stats: stats.clone(),
        self_pid: std::process::id() as i32,
        by_id: HashMap::new(),
        backlog: Vec::new(),
        stashed: std::collections::HashSet::new(),
        self_cgroup: None,
        cpus: 1,
        pending_victims: 0,
    };
    guard.self_cgroup = crate::cgroup::cgroup_of_pid(&guard.deps.memory_mount, "self")
        .ok()
        .map(|c| c.path);
    // SAFETY: sysconf reads a constant; no memory is passed.
    let conf = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    guard.cpus = u64::try_from(conf).unwrap_or(1).max(1);
    if let Some(bpf) = &guard.deps.ebpf {
        epoll::add(
            &guard.epoll,
            bpf.ring_fd(),
            EventData::new_u64(RING_TOKEN),
            EventFlags::IN,
        )
        .map_err(|e| GuardError::Setup(e.into()))?;
        guard
            .tokens
            .insert(RING_TOKEN, (PathBuf::new(), Kind::Ring));
        if let Some(fd) = bpf.log_fd() {
            epoll::add(
                &guard.epoll,
                fd,
                EventData::new_u64(BPF_LOG_TOKEN),
                EventFlags::IN,
            )
            .map_err(|e| GuardError::Setup(e.into()))?;
            guard
                .tokens
                .insert(BPF_LOG_TOKEN, (PathBuf::new(), Kind::BpfLog));
        }
    }
    let thread = std::thread::Builder::new()
        .name("oomguard-guard".into())
        .spawn(move || {
            let _stopped = StoppedOnDrop(guard.stats.clone());
            guard.run()
        })
        .map_err(GuardError::Spawn)?;
    Ok(GuardHandle {
        tx,
        wake,
        stats,
        thread: Some(thread),
    })
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd.as_fd(), &mut buf);
}

impl Guard {
    fn run(&mut self) {
        let prio = self.deps.config.rt_priority;
        if prio > 0 {
            match crate::sys::set_realtime(prio) {
                Ok(()) => tracing::info!(priority = prio, "guard thread runs SCHED_FIFO"),
                Err(e) => tracing::warn!(
                    priority = prio,
                    error = %e,
                    "cannot set SCHED_FIFO on the guard thread; it runs at normal priority"
                ),
            }
        }
        let mut events: Vec<Event> = Vec::with_capacity(64);
        let mut last_recheck = Instant::now();
        loop {
            self.stats.ticks.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let next_check = self.entries.values().filter_map(|e| e.next_check).min();
            let oom_pending = self.entries.values().any(|e| e.oom_pending_until.is_some());
            let interval = self.deps.config.guard_interval;
            // The tick also feeds the health watchdog: turn four times per --watchdog-ms when
            // idle (every 2.5 s by default), so an idle agent barely wakes up.
            let idle = (self.deps.config.watchdog / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            let mut wait = if oom_pending {
                interval.saturating_sub(last_recheck.elapsed())
            } else {
                idle
            };
            if let Some(t) = next_check {
                wait = wait.min(t.saturating_duration_since(now));
            }
            let ts = Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            events.clear();
            match epoll::wait(&self.epoll, spare_capacity(&mut events), Some(&ts)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; guard thread stops");
                    return;
                }
            }
            let woke = Instant::now();
            let ready: Vec<u64> = events.iter().map(|e| e.data.u64()).collect();
            for token in ready {
                let Some((path, kind)) = self.tokens.get(&token).cloned() else {
                    continue;
                };
                match kind {
                    Kind::Wake => {
                        drain(&self.wake);
                        if !self.commands() {
                            return;
                        }
                    }
                    Kind::Kill => {
                        if let Some(e) = self.entries.get_mut(&path) {
                            if let Some(fd) = &e.armed.kill_fd {
                                drain(fd);
                            }
                            e.watch_until = Some(woke + WATCH_WINDOW);
                            e.state.crossed();
                        }
                        self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                        if let Some(m) = &self.deps.metrics {
                            m.kill_signal_eventfd.inc();
                        }
                        self.evaluate(&path, woke, "eventfd");
                    }
                    Kind::Reclaim => {
                        if let Some(m) = &self.deps.metrics {
                            m.reclaim_signal_eventfd.inc();
                        }
                        self.reclaim_signal(&path, "eventfd")
                    }
                    Kind::Oom => self.oom_signal(&path),
                    Kind::Ring => self.ring(woke),
                    Kind::BpfLog => {
                        if let Some(bpf) = &mut self.deps.ebpf {
                            bpf.flush_logs();
                        }
                    }
                    Kind::Victim => {
                        self.victim_gone(&path);
                        self.evaluate(&path, woke, "victim-exit");
                    }
                }
            }
            if !self.backlog.is_empty() {
                self.ring(woke);
            }
            if oom_pending && last_recheck.elapsed() >= interval {
                last_recheck = Instant::now();
                let pending: Vec<PathBuf> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| e.oom_pending_until.is_some())
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in pending {
                    self.oom_signal(&p);
                }
            }
            let now = Instant::now();
            let due: Vec<PathBuf> = self
                .entries
                .iter()
                .filter(|(_, e)| e.next_check.is_some_and(|t| t <= now))
                .map(|(p, _)| p.clone())
                .collect();
            for p in due {
                self.evaluate(&p, Instant::now(), "recheck");
            }
        }
    }

    /// Applies queued commands; false on shutdown.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Arm(armed) => self.arm(*armed),
                Cmd::AddReclaim {
                    path,
                    thresholds,
                    fd,
                } => self.add_reclaim(&path, thresholds, fd),
                Cmd::Disarm(path) => self.disarm(&path),
                Cmd::Reload(config) => self.deps.config = config,
                Cmd::Signal(signal) => self.signal(signal),
                Cmd::Shutdown => return false,
            }
        }
        true
    }

    /// A signal from another thread's wake source, handled like the eventfd of its kind.
    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::Crossed {
                path,
                threshold: Threshold::Kill,
                at,
                via,
            } => {
                if let Some(e) = self.entries.get_mut(&path) {
                    e.watch_until = Some(at + WATCH_WINDOW);
                }
                self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.deps.metrics {
                    m.kill_signal_fallback.inc();
                }
                self.evaluate(&path, at, via);
            }
            Signal::Crossed {
                path,
                threshold: Threshold::Reclaim,
                via,
                ..
            } => {
                if let Some(m) = &self.deps.metrics {
                    m.reclaim_signal_fallback.inc();
                }
                self.reclaim_signal(&path, via);
            }
            Signal::KernelOom(path) => self.oom_signal(&path),
        }
    }

    fn register(&mut self, fd: &OwnedFd, path: &Path, kind: Kind) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        match epoll::add(
            &self.epoll,
            fd.as_fd(),
            EventData::new_u64(token),
            EventFlags::IN,
        ) {
            Ok(()) => {
                self.tokens.insert(token, (path.to_path_buf(), kind));
                Some(token)
            }
            Err(e) => {
                tracing::warn!(cgroup = %path.display(), error = %e, "cannot watch eventfd");
                None
            }
        }
    }

    fn arm(&mut self, armed: Armed) {
        let path = armed.cgroup.path.clone();
        let id = armed.cgroup.id().unwrap_or(0);
        // A cgroup made again at the same path is a new one: nothing of the old carries over.
        let mut previous = self.remove(&path).filter(|p| p.id == id);
        let victim = previous.as_mut().and_then(|p| p.victim.take());
        let (armed_limit, armed_kill) = (armed.thresholds.limit, armed.thresholds.kill);
        let left_alone = armed.cgroup.oom_control().is_ok_and(|o| o.oom_kill_disable);
        if left_alone && previous.as_ref().is_none_or(|p| !p.left_alone) {
            tracing::info!(
                cgroup = %path.display(),
                "memory.oom_kill_disable=1: a user-space OOM handler owns this cgroup; the agent leaves it alone"
            );
        }
        let flat = crate::cgroup::read_u64(&armed.cgroup.file("memory.use_hierarchy"))
            .is_ok_and(|v| v == 0);
        let mut tokens = Vec::new();
        if let Some(fd) = &armed.kill_fd {
            tokens.extend(self.register(fd, &path, Kind::Kill));
        }
        if let Some(fd) = &armed.reclaim_fd {
            tokens.extend(self.register(fd, &path, Kind::Reclaim));
        }
        if let Some(fd) = &armed.oom_fd {
            tokens.extend(self.register(fd, &path, Kind::Oom));
        }
        let oom_kills_seen = armed.cgroup.subtree_oom_kills();
        if let Some(bpf) = &self.deps.ebpf
            && let Err(e) = bpf.set_thresholds(id, armed.thresholds.reclaim, armed.thresholds.kill)
        {
            tracing::warn!(cgroup = %path.display(), error = %e, "cannot set the eBPF thresholds; the eventfds still guard it");
        }
        if let Some(rt) = &self.deps.runtime {
            rt.prefetch(&path);
        }
        self.by_id.insert(id, path.clone());
        if let Some(s) = &self.deps.state {
            s.cgroup_armed(&path, armed.thresholds);
        }
        let entry = Entry {
            armed,
            id,
            state: previous
                .as_ref()
                .map(|p| p.state.clone())
                .unwrap_or_default(),
            last_reclaim: previous.as_ref().and_then(|p| p.last_reclaim),
            reclaiming: previous
                .map(|p| p.reclaiming)
                .unwrap_or_else(|| Arc::new(AtomicBool::new(false))),
            tokens,
            oom_kills_seen,
            oom_pending_until: None,
            kernel_victims: Vec::new(),
            usage_unreadable: false,
            watch_until: None,
            next_check: None,
            last_at_limit: None,
            victim: None,
            hysteresis: decide::hysteresis(armed_limit.saturating_sub(armed_kill), self.cpus),
            left_alone,
            flat,
        };
        self.entries.insert(path.clone(), entry);
        if let Some(v) = victim {
            // Still waited for under the new thresholds.
            if let Some(t) = v.token {
                self.tokens.insert(t, (path.clone(), Kind::Victim));
            }
            self.pending_victims += 1;
            if let Some(e) = self.entries.get_mut(&path) {
                e.victim = Some(v);
            }
        }
        self.stats
            .guarded
            .store(self.entries.len() as u64, Ordering::Relaxed);
        if left_alone && let Some(s) = &self.deps.state {
            s.cgroup_state(&path, crate::state::CgroupState::LeftAlone);
        }
        // Usage may already be above the new threshold: the notifier only reports crossings.
        self.evaluate(&path, Instant::now(), "arm");
    }

    fn add_reclaim(&mut self, path: &Path, thresholds: Thresholds, fd: OwnedFd) {
        let wanted = self
            .entries
            .get(path)
            .is_some_and(|e| e.armed.thresholds == thresholds && e.armed.reclaim_fd.is_none());
        if !wanted {
            return;
        }
        let token = self.register(&fd, path, Kind::Reclaim);
        if let Some(e) = self.entries.get_mut(path) {
            e.tokens.extend(token);
            e.armed.reclaim_fd = Some(fd);
        }
    }

    fn remove(&mut self, path: &Path) -> Option<Entry> {
        let entry = self.entries.remove(path)?;
        for t in &entry.tokens {
            self.tokens.remove(t);
        }
        if let Some(v) = &entry.victim {
            self.pending_victims = self.pending_victims.saturating_sub(1);
            if let Some(t) = v.token {
                self.tokens.remove(&t);
            }
        }
        if self.by_id.get(&entry.id).is_some_and(|p| p == path) {
            self.by_id.remove(&entry.id);
            if let Some(bpf) = &self.deps.ebpf {
                let _ = bpf.remove_cgroup(entry.id);
            }
        }
        // Closing the eventfds (when `entry` drops) unregisters them in the kernel and
        // removes them from the epoll set.
        self.stats
            .guarded
            .store(self.entries.len() as u64, Ordering::Relaxed);
        Some(entry)
    }

    fn disarm(&mut self, path: &Path) {
        if let Some(s) = &self.deps.state {
            s.cgroup_removed(path);
        }
        if self.remove(path).is_some() {
            tracing::debug!(cgroup = %path.display(), "disarmed");
        }
    }

    fn decision(&self, e: &Entry, action: Action, usage: u64, stats: MemStat) -> Decision {
        let cfg = &self.deps.config;
        let mut d = Decision::new(
            cfg.node_name.clone(),
            cfg.policy,
            action,
            e.armed.cgroup.path.display().to_string(),
        );
        d.limit = e.armed.thresholds.limit;
        d.threshold = e.armed.thresholds.kill;
        d.usage = usage;
        d.reclaimable_cache = stats.reclaimable_cache();
        d.stats = stats;
        d
    }

    /// Whether a victim of this cgroup's subtree, or of a guarded cgroup around it, has not
    /// exited yet: one episode per subtree, as the kernel never picks a second victim while
    /// the first is still exiting.
    fn subtree_busy(&self, path: &Path) -> bool {
        self.pending_victims > 0
            && self
                .entries
                .iter()
                .any(|(p, e)| e.victim.is_some() && (p.starts_with(path) || path.starts_with(p)))
    }

    /// Forgets a cgroup's victim: it exited, or waited for longer than the cooldown.
    fn victim_gone(&mut self, path: &Path) {
        let Some(e) = self.entries.get_mut(path) else {
            return;
        };
        if let Some(v) = e.victim.take() {
            self.pending_victims = self.pending_victims.saturating_sub(1);
            if let Some(t) = v.token {
                self.tokens.remove(&t);
            }
            tracing::debug!(cgroup = %path.display(), pid = v.pid, waited_ms = v.since.elapsed().as_millis() as u64, "victim gone");
        }
    }

    /// Re-reads the cgroup and applies the decision rule ([`crate::decide`]) to it.
    fn evaluate(&mut self, path: &Path, woke: Instant, signal: &'static str) {
        let cfg = self.deps.config.clone();
        // A victim that has exited (its pidfd readable, or its pid gone) or was waited for
        // long enough no longer holds the subtree.
        if let Some(v) = self.entries.get(path).and_then(|e| e.victim.as_ref()) {
            let exited = match &v.fd {
                Some(fd) => pidfd_exited(fd),
                None => crate::victim::read_task(v.pid, Path::new("")).is_none_or(|t| t.exiting),
            };
            if exited || v.since.elapsed() >= cfg.cooldown {
                self.victim_gone(path);
            }
        }
        let busy = self.subtree_busy(path);
        let Some(e) = self.entries.get_mut(path) else {
            return;
        };
        if e.left_alone {
            return;
        }
        let cg = e.armed.cgroup.clone();
        let th = e.armed.thresholds;
        let usage = match cg.usage() {
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
        let mut stats = None;
        let now = Instant::now();
        let step = e
            .state
            .observe(now, usage, th.kill, e.hysteresis, busy, || {
                let st = cg.stat().unwrap_or_default();
                let cache = st.reclaimable_cache();
                stats = Some(st);
                cache
            });
        // When to look again without a signal.
        let watching = e.watch_until.is_some_and(|t| t > now);
        e.next_check = match step {
            Step::Idle if watching => Some(now + cfg.guard_interval),
            Step::Idle => None,
            Step::Watch => Some(now + cfg.guard_interval),
            // Above the threshold without a signal to come (the notifier saw the crossing):
            // growth past the floor must be seen before the kernel's limit (usage only,
            // unless usage is past the floor).
            Step::Held => Some(now + cfg.guard_interval.min(RECHECK_MIN)),
            Step::Waiting => Some(
                match e.victim.as_ref() {
                    // Its exit wakes the guard through the pidfd; only the bound is polled.
                    Some(v) if v.fd.is_some() => v.since + cfg.cooldown,
                    _ => now + cfg.guard_interval,
                }
                .min(now + RECHECK_MAX),
            ),
            Step::Reclaimable { headroom, .. } => Some(
                now + decide::recheck_after(
                    headroom,
                    e.state.growth_per_s,
                    ASSUMED_GROWTH,
                    cfg.guard_interval.min(RECHECK_MIN),
                    RECHECK_MAX,
                ),
            ),
            // `act` settles the next step.
            Step::Act { .. } => None,
        };
        if let Some(s) = &self.deps.state {
            use crate::state::CgroupState;
            match step {
                Step::Idle => s.cgroup_state(path, CgroupState::Armed),
                Step::Act { .. } => s.cgroup_state(path, CgroupState::Acting),
                Step::Waiting => s.cgroup_state(path, CgroupState::CoolingDown),
                Step::Watch | Step::Held | Step::Reclaimable { .. } => {}
            }
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
        match step {
            Step::Idle
            | Step::Watch
            | Step::Waiting
            | Step::Held
            | Step::Reclaimable { report: false, .. } => {}
            Step::Reclaimable {
                report: true,
                headroom,
            } => {
                let e = &self.entries[path];
                let mut d = self.decision(e, Action::SkipCache, usage, stats.unwrap_or_default());
                d.signal = signal;
                d.detail = format!(
                    "the kernel can still reclaim page cache: {} reclaimable, {headroom} more \
                     bytes of unreclaimable memory before the threshold; left to the kernel",
                    d.reclaimable_cache
                );
                self.deps.reporter.send(d);
            }
            Step::Act { overshoot } => self.act(
                path,
                usage,
                overshoot,
                stats.unwrap_or_default(),
                woke,
                signal,
            ),
        }
    }

    /// Applies the policy to a pressing cgroup whose unreclaimable memory is `overshoot`
    /// bytes above its kill threshold: at most one victim, and only one whose death frees
    /// more than that.
    fn act(
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
            .entries
            .iter()
            .filter(|(p, e)| {
                p.as_path() != path
                    && p.starts_with(path)
                    && e.armed
                        .cgroup
                        .usage()
                        .is_ok_and(|u| u >= e.armed.thresholds.kill)
            })
            .map(|(p, _)| p.clone())
            .collect();
        let kills = self.stats.kills.load(Ordering::Relaxed);
        for p in inner {
            self.evaluate(&p, woke, "innermost");
        }
        // A descendant's kill changed the numbers this decision was made on: read again.
        if self.stats.kills.load(Ordering::Relaxed) != kills || self.subtree_busy(path) {
            if let Some(e) = self.entries.get_mut(path) {
                e.next_check = Some(Instant::now() + cfg.guard_interval);
            }
            return;
        }
        let Some(e) = self.entries.get(path) else {
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
            self.pending_victims += 1;
            if let Some(e) = self.entries.get_mut(path) {
                e.victim = Some(v);
            }
        }
        if let Some(e) = self.entries.get_mut(path) {
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
    fn rank(&self, cg: &MemCgroup, limit: u64) -> Vec<victim::Candidate> {
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
        if self.entries.get(&cg.path).is_some_and(|e| e.flat) {
            ranked.retain(|c| c.task.cgroup == cg.path);
        }
        ranked
    }

    /// The container policy: choose the container (never the sandbox), kill it through
    /// containerd, and fall back to killing its cgroup's tasks directly when the runtime
    /// cannot do it in time. False when the cgroup holds no identifiable container: then
    /// the process policy acts.
    fn act_container(
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

    /// eBPF records: crossings and at-limit go straight to the evaluation (the policy
    /// state de-duplicates them with the eventfd signals), kernel OOM victims to the OOM
    /// report.
    fn ring(&mut self, woke: Instant) {
        let mut records = std::mem::take(&mut self.backlog);
        if let Some(bpf) = &mut self.deps.ebpf {
            bpf.drain(|r| records.push(r));
        }
        for r in records {
            match r {
                Record::Crossing {
                    threshold: Threshold::Kill,
                    cgroup_id,
                    ..
                }
                | Record::AtLimit { cgroup_id, .. } => {
                    let at_limit = matches!(r, Record::AtLimit { .. });
                    if let Some(path) = self.by_id.get(&cgroup_id).cloned() {
                        // A cgroup living at its limit (file I/O) reports every reclaim:
                        // evaluating each would read memory.stat a thousand times a second.
                        if at_limit && let Some(e) = self.entries.get_mut(&path) {
                            if e.last_at_limit.is_some_and(|t| woke - t < AT_LIMIT_EVERY) {
                                continue;
                            }
                            e.last_at_limit = Some(woke);
                        }
                        self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                        if let Some(m) = &self.deps.metrics {
                            m.kill_signal_ebpf.inc();
                        }
                        if let Some(e) = self.entries.get_mut(&path) {
                            e.watch_until = Some(woke + WATCH_WINDOW);
                            e.state.crossed();
                        }
                        self.evaluate(&path, woke, "ebpf");
                    }
                }
                Record::Crossing {
                    threshold: Threshold::Reclaim,
                    cgroup_id,
                    ..
                } => {
                    if let Some(path) = self.by_id.get(&cgroup_id).cloned() {
                        if let Some(m) = &self.deps.metrics {
                            m.reclaim_signal_ebpf.inc();
                        }
                        self.reclaim_signal(&path, "ebpf");
                    }
                }
                Record::KernelOomVictim { ktime_ns, .. } => {
                    let paths = if self.stashed.remove(&ktime_ns) {
                        self.victim_paths(&r).0
                    } else {
                        self.stash_victim(&r)
                    };
                    for p in paths {
                        self.oom_signal(&p);
                    }
                }
                Record::CgroupMkdir(dir) if !dir.truncated => {
                    if let Some(tx) = &self.deps.created {
                        let rel = dir.path.strip_prefix("/").unwrap_or(&dir.path);
                        let _ = tx.send(self.deps.memory_mount.join(rel));
                    }
                }
                // Removal also fires the cgroup's eventfds; the walk and inotify clean up.
                Record::CgroupMkdir(_) | Record::CgroupRmdir(_) => {}
            }
        }
    }

    fn reclaim_signal(&mut self, path: &Path, signal: &'static str) {
        let interval = self.deps.config.reclaim_interval;
        let Some(e) = self.entries.get_mut(path) else {
            return;
        };
        if let Some(fd) = &e.armed.reclaim_fd {
            drain(fd);
        }
        let Some(reclaimer) = &self.deps.reclaimer else {
            return;
        };
        let usage = match e.armed.cgroup.usage() {
            Ok(u) => u,
            Err(_) => return,
        };
        if usage < e.armed.thresholds.reclaim
            || e.reclaiming.load(Ordering::Acquire)
            || e.last_reclaim.is_some_and(|t| t.elapsed() < interval)
        {
            return;
        }
        // Large cache: the kernel reclaims it by itself and the kill threshold would skip
        // anyway. Dropping an I/O-heavy container's cache every interval would only hurt.
        let cache = e
            .armed
            .cgroup
            .stat()
            .map(|s| s.reclaimable_cache())
            .unwrap_or(0);
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
            &self.entries[path],
            Action::Reclaim,
            usage,
            MemStat::default(),
        );
        d.threshold = self.entries[path].armed.thresholds.reclaim;
        d.signal = signal;
        let cgroup = self.entries[path].armed.cgroup.clone();
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
        if !queued && let Some(e) = self.entries.get(path) {
            e.reclaiming.store(false, Ordering::Release);
        } else if queued && let Some(s) = &self.deps.state {
            s.cgroup_state(path, crate::state::CgroupState::Reclaiming);
        }
    }

    /// Keeps a kernel OOM victim (a `mark_victim` record) for the report of every guarded
    /// cgroup at or above its cgroup; returns those cgroups. Which limit was hit is not in
    /// the record: their subtree counters tell, as on the eventfd path.
    fn stash_victim(&mut self, r: &Record) -> Vec<PathBuf> {
        let Record::KernelOomVictim {
            pid,
            rss_anon,
            rss_file,
            rss_shmem,
            oom_score_adj,
            ..
        } = *r
        else {
            return Vec::new();
        };
        let (paths, victim_cg) = self.victim_paths(r);
        let victim = Killed {
            pid: pid as i32,
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default(),
            score: 0,
            rss_bytes: rss_anon + rss_file + rss_shmem,
            oom_score_adj,
            proccgroup: victim_cg
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            outcome: None,
        };
        for p in &paths {
            if let Some(e) = self.entries.get_mut(p)
                && e.kernel_victims.len() < 16
            {
                e.kernel_victims.push(victim.clone());
            }
        }
        paths
    }

    /// The guarded cgroups at or above a victim record's cgroup, and its cgroup when known.
    /// A victim in a cgroup that is not guarded itself is placed by its `/proc/PID/cgroup`
    /// (it has not been reaped yet when the record is read, as a rule); when that is gone
    /// too, no cgroup: the OOM eventfd of the cgroup it happened in still reports it, and
    /// no guarded cgroup elsewhere walks its subtree for it.
    fn victim_paths(&self, r: &Record) -> (Vec<PathBuf>, Option<PathBuf>) {
        let Record::KernelOomVictim { cgroup_id, pid, .. } = *r else {
            return (Vec::new(), None);
        };
        let victim_cg = self.by_id.get(&cgroup_id).cloned().or_else(|| {
            let pid = pid.to_string();
            crate::cgroup::cgroup_of_pid(&self.deps.memory_mount, &pid)
                .ok()
                .map(|c| c.path)
        });
        let Some(v) = &victim_cg else {
            return (Vec::new(), None);
        };
        let paths = self
            .entries
            .keys()
            .filter(|p| v.starts_with(p))
            .cloned()
            .collect();
        (paths, victim_cg)
    }

    /// Drains the ring now, keeping victims and putting every other record in the backlog:
    /// `mark_victim` runs before the kernel counts the kill, so after a count was read this
    /// finds its victim.
    fn collect_victims(&mut self) {
        let mut records = Vec::new();
        if let Some(bpf) = &mut self.deps.ebpf {
            bpf.drain(|r| records.push(r));
        }
        for r in records {
            if let Record::KernelOomVictim { ktime_ns, .. } = r {
                self.stash_victim(&r);
                self.stashed.insert(ktime_ns);
            }
            self.backlog.push(r);
        }
    }

    fn oom_signal(&mut self, path: &Path) {
        let Some(e) = self.entries.get_mut(path) else {
            return;
        };
        if let Some(fd) = &e.armed.oom_fd {
            drain(fd);
        }
        let total = e.armed.cgroup.subtree_oom_kills();
        let now = Instant::now();
        if total <= e.oom_kills_seen {
            // The notification comes when the cgroup enters OOM, before the kill is counted.
            match e.oom_pending_until {
                None => e.oom_pending_until = Some(now + OOM_COUNT_WAIT),
                Some(t) if t <= now => e.oom_pending_until = None,
                Some(_) => {}
            }
            return;
        }
        e.oom_pending_until = None;
        let new = total - e.oom_kills_seen;
        e.oom_kills_seen = total;
        self.collect_victims();
        let Some(e) = self.entries.get_mut(path) else {
            return;
        };
        let usage = e.armed.cgroup.usage().unwrap_or(0);
        let stats = e.armed.cgroup.stat().unwrap_or_default();
        let victims = std::mem::take(&mut e.kernel_victims);
        // Reported here: not again by a guarded cgroup around it.
        for other in self.entries.values_mut() {
            other
                .kernel_victims
                .retain(|k| !victims.iter().any(|v| v.pid == k.pid));
        }
        let mut d = self.decision(&self.entries[path], Action::KernelOom, usage, stats);
        if let Some(v) = victims.first() {
            d.proccgroup = v.proccgroup.clone();
        }
        d.killed = victims;
        d.detail = format!(
            "the kernel OOM killer killed {new} task(s) in this cgroup's subtree \
             (oom_kill total {total})"
        );
        self.deps.reporter.send(d);
    }
}
