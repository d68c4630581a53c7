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

mod act;
mod decide;
mod files;
mod kernel_oom;
mod reclaim;
mod registry;
mod workers;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::event::{EventfdFlags, Timespec, eventfd};
use thiserror::Error;

use crate::bpf::{EbpfGuard, Record, Threshold};
use crate::cgroup::{MemCgroup, MemStat};
use crate::config::Config;
use crate::counters::GuardCounters;
pub use crate::counters::GuardStats;
use crate::reclaim::Reclaimer;
use crate::report::{Action, Decision, Reporter};
use crate::runtime::RuntimeClient;
use crate::threshold::Thresholds;
use registry::Registry;
use workers::{Done, Pool};

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
    pub metrics: Option<GuardCounters>,
}

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

impl Kind {
    /// The order a batch of wake-ups is handled in (lowest first).
    fn urgency(self) -> u8 {
        match self {
            Kind::Kill | Kind::Ring => 0,
            Kind::Victim => 1,
            Kind::Oom => 2,
            Kind::Wake => 3,
            Kind::Reclaim => 4,
            Kind::BpfLog => 5,
        }
    }
}

/// How long a kill-eventfd wake-up keeps a cgroup under watch.
const WATCH_WINDOW: Duration = Duration::from_secs(1);
/// At most one evaluation per cgroup per this from eBPF at-limit records.
const AT_LIMIT_EVERY: Duration = Duration::from_millis(100);

struct Guard {
    deps: Deps,
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    rx: Receiver<Cmd>,
    reg: Registry,
    /// Where everything after a signal runs.
    pool: Pool,
    /// The workers' answers (each also written to `wake`).
    done: Receiver<Done>,
    stats: Arc<GuardStats>,
    self_pid: i32,
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
    let self_cgroup = crate::cgroup::cgroup_of_pid(&deps.memory_mount, "self")
        .ok()
        .map(|c| c.path);
    let (answer, done) = channel();
    let pool = Pool::new(workers::Context {
        reporter: deps.reporter.clone(),
        memory_mount: deps.memory_mount.clone(),
        runtime: deps.runtime.clone(),
        self_cgroup: self_cgroup.clone(),
        stats: stats.clone(),
        answer,
        wake: wake.clone(),
    });
    let mut guard = Guard {
        deps,
        epoll,
        wake: wake.clone(),
        rx,
        reg: Registry::new(),
        pool,
        done,
        stats: stats.clone(),
        self_pid: std::process::id() as i32,
        backlog: Vec::new(),
        stashed: std::collections::HashSet::new(),
        self_cgroup,
        cpus: 1,
    };
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
            .reg
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
                .reg
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
            let next_check = self.reg.next_check();
            let oom_pending = self.reg.entries.values().any(Guard::oom_waiting);
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
            let mut ready: Vec<u64> = events.iter().map(|e| e.data.u64()).collect();
            // Kill thresholds first: the v1 notifier often reports a cgroup's reclaim and
            // kill crossings in one batch, and the reclaim signal would rank and pin a
            // victim (or anything else would take its time) before the kill is sent.
            ready.sort_by_key(|t| self.reg.tokens.get(t).map_or(u8::MAX, |(_, k)| k.urgency()));
            for token in ready {
                let Some((path, kind)) = self.reg.tokens.get(&token).cloned() else {
                    continue;
                };
                match kind {
                    Kind::Wake => {
                        drain(&self.wake);
                        while let Ok(done) = self.done.try_recv() {
                            self.worker_done(done);
                        }
                        if !self.commands() {
                            return;
                        }
                    }
                    Kind::Kill => {
                        if let Some(e) = self.reg.entries.get_mut(&path) {
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
                    .reg
                    .entries
                    .iter()
                    .filter(|(_, e)| Guard::oom_waiting(e))
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in pending {
                    self.oom_signal(&p);
                }
            }
            let now = Instant::now();
            for p in self.reg.due(now) {
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
                if let Some(e) = self.reg.entries.get_mut(&path) {
                    e.watch_until = Some(at + WATCH_WINDOW);
                    // A crossing, as from an eventfd or an eBPF record: the episode opens.
                    e.state.crossed();
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
        let token = self.reg.next_token();
        match epoll::add(
            &self.epoll,
            fd.as_fd(),
            EventData::new_u64(token),
            EventFlags::IN,
        ) {
            Ok(()) => {
                self.reg.tokens.insert(token, (path.to_path_buf(), kind));
                Some(token)
            }
            Err(e) => {
                tracing::warn!(cgroup = %path.display(), error = %e, "cannot watch eventfd");
                None
            }
        }
    }

    /// The record's `memory.stat`, read through the entry's kept file: after the signal,
    /// never on the crossing's path (empty when the cgroup is gone or unreadable).
    fn record_stat(&mut self, path: &Path) -> MemStat {
        self.reg
            .entries
            .get_mut(path)
            .and_then(|e| e.files.stat(&e.armed.cgroup).ok())
            .unwrap_or_default()
    }

    fn decision(
        &self,
        e: &registry::Entry,
        action: Action,
        usage: u64,
        stats: MemStat,
    ) -> Decision {
        let cfg = &self.deps.config;
        let mut d = Decision::new(
            cfg.node_name.clone(),
            cfg.policy,
            action,
            e.armed.cgroup.path.display().to_string(),
        );
        d.counter = e.armed.thresholds.counter;
        d.limit = e.armed.thresholds.limit;
        d.threshold = e.armed.thresholds.kill;
        d.usage = usage;
        d.reclaimable_cache = stats.reclaimable_cache();
        d.stats = stats;
        d
    }

    /// eBPF records: crossings and at-limit go straight to the evaluation (the policy
    /// state de-duplicates them with the eventfd signals), kernel OOM victims to the OOM
    /// report.
    fn ring(&mut self, woke: Instant) {
        let mut records = std::mem::take(&mut self.backlog);
        if let Some(bpf) = &mut self.deps.ebpf {
            bpf.drain(|r| records.push(r));
        }
        // Kill crossings first, as with the eventfds (a stable sort: each kind in order).
        records.sort_by_key(|r| {
            !matches!(
                r,
                Record::Crossing {
                    threshold: Threshold::Kill,
                    ..
                } | Record::AtLimit { .. }
            )
        });
        for r in records {
            match r {
                Record::Crossing {
                    threshold: Threshold::Kill,
                    cgroup_id,
                    ..
                }
                | Record::AtLimit { cgroup_id, .. } => {
                    let at_limit = matches!(r, Record::AtLimit { .. });
                    if let Some(path) = self.reg.by_id.get(&cgroup_id).cloned() {
                        // A cgroup living at its limit (file I/O) reports every reclaim:
                        // evaluating each would read memory.stat a thousand times a second.
                        if at_limit && let Some(e) = self.reg.entries.get_mut(&path) {
                            if e.last_at_limit.is_some_and(|t| woke - t < AT_LIMIT_EVERY) {
                                continue;
                            }
                            e.last_at_limit = Some(woke);
                        }
                        self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
                        if let Some(m) = &self.deps.metrics {
                            m.kill_signal_ebpf.inc();
                        }
                        if let Some(e) = self.reg.entries.get_mut(&path) {
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
                    if let Some(path) = self.reg.by_id.get(&cgroup_id).cloned() {
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
}
