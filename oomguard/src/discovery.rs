//! Discovery: the initial walk of `--root`, inotify on every cgroup directory (new cgroups,
//! removed cgroups, changed limits), and a periodic full rescan as the safety net. It keeps
//! the registry of guarded cgroups and tells the guard thread what to arm and disarm.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::cgroup::MemCgroup;
use crate::config::Config;
use crate::guard::{Armed, Cmd, GuardHandle};
use crate::threshold::{Notifier, Thresholds, arm};

/// What the registry knows of one guarded cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub limit: u64,
    pub thresholds: Thresholds,
    /// The directory's inode when it was armed: a cgroup removed and made again at the
    /// same path (same limit) is a new cgroup with nothing armed on it.
    pub id: u64,
}

pub struct Discovery {
    config: Arc<Config>,
    guard: Arc<GuardHandle>,
    /// Guarded cgroups by path.
    known: HashMap<PathBuf, Known>,
    /// Cgroups that failed to arm, so the failure is logged once, not on every rescan.
    failed: HashMap<PathBuf, String>,
    inotify: AsyncFd<Inotify>,
    watches: HashMap<WatchDescriptor, PathBuf>,
    watched: HashMap<PathBuf, WatchDescriptor>,
    ready: watch::Sender<bool>,
    /// Cgroups the eBPF mkdir program reported without a limit yet, with --no-inotify:
    /// looked at again after each of [`LIMIT_RECHECKS`] (the runtime sets the limit just
    /// after mkdir, and nothing else would tell us before the next rescan).
    recheck: Vec<(tokio::time::Instant, usize, PathBuf)>,
    /// Asked in the background about each container cgroup made after start, so a kill
    /// finds its labels cached (armed cgroups are prefetched by the guard).
    runtime: Option<Arc<crate::runtime::RuntimeClient>>,
    /// The cgroup v2 fallback signals (v2 has no threshold eventfd): told what to watch.
    watcher: Option<Arc<crate::headroom::Watcher>>,
    /// Directories inotify could not watch for want of watches (ENOSPC); said once.
    unwatched: std::collections::HashSet<PathBuf>,
    enospc_said: bool,
    /// The node's swap (`SwapTotal`), read at each rescan: whether a memsw limit can bind
    /// ([`crate::cgroup::binding_counter`]). Swap switched on or off between rescans is
    /// seen by the next one.
    swap_total: u64,
}

/// Delays after mkdir at which a cgroup without a limit is looked at again (--no-inotify).
const LIMIT_RECHECKS: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(10),
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(1),
];

/// Files whose change moves a cgroup's thresholds or the counter it is guarded on.
const LIMIT_FILES: [&str; 4] = [
    "memory.limit_in_bytes",
    "memory.max",
    "memory.memsw.limit_in_bytes",
    "memory.swappiness",
];

const DIR_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ONLYDIR);

impl Discovery {
    pub fn new(
        config: Arc<Config>,
        guard: Arc<GuardHandle>,
        ready: watch::Sender<bool>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            config,
            guard,
            known: HashMap::new(),
            failed: HashMap::new(),
            // SAFETY: the AsyncFd owns the Inotify, so its fd stays open for as long as it
            // is registered.
            inotify: unsafe { AsyncFd::register(Inotify::init()?)? },
            watches: HashMap::new(),
            watched: HashMap::new(),
            ready,
            recheck: Vec::new(),
            runtime: None,
            watcher: None,
            unwatched: std::collections::HashSet::new(),
            enospc_said: false,
            swap_total: crate::cgroup::node_swap_total(),
        })
    }

    /// Prefetches what the runtime says about containers made after start (see
    /// [`crate::runtime::RuntimeClient::prefetch`]).
    pub fn with_runtime(mut self, runtime: Option<Arc<crate::runtime::RuntimeClient>>) -> Self {
        self.runtime = runtime;
        self
    }

    /// Where v2 cgroups go to be watched for crossings (see [`crate::headroom`]).
    pub fn with_watcher(mut self, watcher: Option<Arc<crate::headroom::Watcher>>) -> Self {
        self.watcher = watcher;
        self
    }

    /// Walks, then follows inotify and rescans every `walk_interval` until `stop` is true.
    /// `created` carries cgroups the eBPF `cgroup_mkdir` program saw made: they are armed
    /// at once, without waiting for inotify.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut created: tokio::sync::mpsc::UnboundedReceiver<PathBuf>,
        mut reload: tokio::sync::mpsc::UnboundedReceiver<Arc<Config>>,
    ) {
        if !self.config.inotify {
            tracing::info!(
                "--no-inotify: new cgroups are found by the eBPF cgroup_mkdir program and the rescan every {} s",
                self.config.walk_interval.as_secs()
            );
        }
        let t0 = std::time::Instant::now();
        let guarded_ms = self.rescan();
        // The arming workers' allocations (per-thread arenas) are freed now; give them back.
        crate::sys::trim_heap();
        tracing::info!(
            guarded = self.known.len(),
            guarded_ms,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "first walk done"
        );
        let _ = self.ready.send(true);
        let mut tick = tokio::time::interval(self.config.walk_interval);
        tick.tick().await;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {
                    self.rescan();
                }
                Some(dir) = created.recv() => self.on_created(&dir, "ebpf"),
                Some(config) = reload.recv() => {
                    // New margins move every threshold: the rescan re-arms what changed.
                    self.config = config;
                    tick = tokio::time::interval(self.config.walk_interval);
                    tick.tick().await;
                    self.rescan();
                }
                _ = tokio::time::sleep_until(self.next_recheck()), if !self.recheck.is_empty() => {
                    self.limit_recheck();
                }
                readable = self.inotify.readable_mut() => {
                    let mut guard = match readable {
                        Ok(g) => g,
                        Err(e) => {
                            tracing::error!(error = %e, "inotify failed; relying on the periodic rescan");
                            let _ = stop.changed().await;
                            return;
                        }
                    };
                    let mut changed: Vec<(PathBuf, EventMask, Option<PathBuf>)> = Vec::new();
                    match guard.get_inner_mut().read_events(&mut buf) {
                        Ok(events) => {
                            for ev in events {
                                let dir = self.watches.get(&ev.wd).cloned();
                                if ev.mask.contains(EventMask::IGNORED) {
                                    // The directory is gone and so is its watch: forget it by
                                    // descriptor (a re-created path has a new one).
                                    if let Some(p) = self.watches.remove(&ev.wd)
                                        && self.watched.get(&p) == Some(&ev.wd)
                                    {
                                        self.watched.remove(&p);
                                    }
                                } else if let Some(dir) = dir {
                                    changed.push((dir.clone(), ev.mask, ev.name.map(|n| dir.join(n))));
                                }
                                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                                    changed.push((PathBuf::new(), ev.mask, None));
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
                        Err(e) => {
                            tracing::warn!(error = %e, "reading inotify events; rescanning");
                            guard.clear_ready();
                            changed.push((PathBuf::new(), EventMask::Q_OVERFLOW, None));
                        }
                    }
                    drop(guard);
                    for (dir, mask, child) in changed {
                        self.on_event(&dir, mask, child.as_deref());
                    }
                }
            }
        }
    }

    fn on_event(&mut self, dir: &Path, mask: EventMask, child: Option<&Path>) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!("inotify queue overflowed; rescanning");
            self.rescan();
            return;
        }
        let Some(child) = child else { return };
        if mask.contains(EventMask::ISDIR) && mask.contains(EventMask::CREATE) {
            self.on_created(child, "inotify");
        } else if mask.contains(EventMask::ISDIR) && mask.contains(EventMask::DELETE) {
            self.forget_subtree(child);
        } else if mask.contains(EventMask::MODIFY)
            && child
                .file_name()
                .is_some_and(|f| LIMIT_FILES.iter().any(|l| f == OsStr::new(l)))
        {
            self.reconcile(&MemCgroup::new(dir));
        }
    }

    /// A cgroup directory was made (`via` says who saw it): watch and arm it and anything
    /// already made beneath it.
    fn on_created(&mut self, dir: &Path, via: &'static str) {
        if !dir.starts_with(&self.config.root.path) || self.watched.contains_key(dir) {
            return;
        }
        if !self.config.inotify
            && self
                .known
                .get(dir)
                .is_some_and(|k| MemCgroup::new(dir).id().ok() == Some(k.id))
        {
            return;
        }
        tracing::info!(cgroup = %dir.display(), via, "cgroup created");
        // Watch each directory before listing it: a child made in between is then either
        // listed or reported by inotify, never neither.
        let mut todo = vec![MemCgroup::new(dir)];
        while let Some(cg) = todo.pop() {
            self.watch(&cg.path);
            test_pause(&cg.path, "watched, not yet listed");
            todo.extend(cg.children().unwrap_or_default());
            self.reconcile(&cg);
            let guarded = self.known.contains_key(&cg.path);
            if let Some(rt) = &self.runtime
                && !guarded
            {
                rt.prefetch(&cg.path);
            }
            if !self.config.inotify && !guarded {
                self.recheck.retain(|(_, _, p)| p != &cg.path);
                self.recheck.push((
                    tokio::time::Instant::now() + LIMIT_RECHECKS[0],
                    0,
                    cg.path.clone(),
                ));
            }
        }
    }

    fn next_recheck(&self) -> tokio::time::Instant {
        self.recheck
            .iter()
            .map(|(t, _, _)| *t)
            .min()
            .unwrap_or_else(tokio::time::Instant::now)
    }

    /// --no-inotify: looks again at cgroups made without a limit whose re-check is due.
    fn limit_recheck(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.recheck)
            .into_iter()
            .partition(|(t, _, _)| *t <= now);
        self.recheck = rest;
        for (_, n, path) in due {
            let cg = MemCgroup::new(&path);
            self.reconcile(&cg);
            if !self.known.contains_key(&path)
                && cg.path.exists()
                && let (Some(prev), Some(next)) = (LIMIT_RECHECKS.get(n), LIMIT_RECHECKS.get(n + 1))
            {
                self.recheck.push((now + (*next - *prev), n + 1, path));
            }
        }
    }

    /// Watches `dir`; true when it was not watched before.
    fn watch(&mut self, dir: &Path) -> bool {
        if !self.config.inotify || self.watched.contains_key(dir) {
            return false;
        }
        match self.inotify.get_mut().watches().add(dir, DIR_EVENTS) {
            Ok(wd) => {
                self.watches.insert(wd.clone(), dir.to_path_buf());
                self.watched.insert(dir.to_path_buf(), wd);
                self.unwatched.remove(dir);
                return true;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            // Out of watches: said once, with the count, after the walk (not per directory).
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                self.unwatched.insert(dir.to_path_buf());
            }
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot watch with inotify; the periodic rescan covers it")
            }
        }
        false
    }

    /// Says once that inotify ran out of watches, and for how many directories.
    fn say_enospc(&mut self) {
        if self.unwatched.is_empty() || self.enospc_said {
            return;
        }
        self.enospc_said = true;
        let max = max_inotify_watches();
        tracing::warn!(
            unwatched = self.unwatched.len(),
            max_user_watches = %max,
            "inotify is out of watches (raise fs.inotify.max_user_watches, or user.max_inotify_watches in a user namespace): cgroups made beneath the unwatched directories are found by the rescan every {} s",
            self.config.walk_interval.as_secs()
        );
    }

    /// A full walk: arm what is new or changed, disarm what is gone. Returns the
    /// milliseconds until every kill threshold was armed (the reclaim thresholds follow).
    pub fn rescan(&mut self) -> u64 {
        let t0 = std::time::Instant::now();
        self.swap_total = crate::cgroup::node_swap_total();
        let (all, unlisted) = self.config.root.walk();
        let walked_ms = t0.elapsed().as_millis() as u64;
        test_pause(&self.config.root.path, "listed, not yet watched");
        for (dir, e) in &unlisted {
            self.fail_once(
                dir,
                format!(
                    "cannot list this directory: {e}; cgroups beneath it keep their thresholds"
                ),
            );
        }
        let present: std::collections::HashSet<&PathBuf> = all.iter().map(|c| &c.path).collect();
        // Beneath a directory the walk could not list, absent means unknown, not removed.
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !present.contains(p) && !unlisted.iter().any(|(d, _)| p.starts_with(d)))
            .cloned()
            .collect();
        for p in gone {
            self.forget(&p);
        }
        let kept =
            |p: &PathBuf| present.contains(p) || unlisted.iter().any(|(d, _)| p.starts_with(d));
        self.failed.retain(|p, _| kept(p));
        // Watches of directories that are gone (their IN_IGNORED may have been lost in an
        // overflow) must not block watching a re-created path.
        self.watched.retain(|p, _| kept(p));
        let watched = &self.watched;
        self.watches.retain(|wd, p| watched.get(p) == Some(wd));
        self.unwatched.retain(|p| present.contains(p));
        let mut todo = Vec::new();
        let mut newly_watched = Vec::new();
        for cg in &all {
            if self.watch(&cg.path) {
                newly_watched.push(cg.path.clone());
            }
            if let Some(t) = self.plan(cg) {
                todo.push((cg.clone(), t));
            }
        }
        // The walk listed these before they were watched: a child made in between is in
        // neither. List them again now that inotify covers them.
        let mut missed = Vec::new();
        for dir in &newly_watched {
            for child in MemCgroup::new(dir).children().unwrap_or_default() {
                if !present.contains(&child.path) {
                    missed.push(child.path);
                }
            }
        }
        self.say_enospc();
        let planned_ms = t0.elapsed().as_millis() as u64;
        let to_arm = todo.len();
        // Kill thresholds (and OOM notifiers) of every cgroup first: each cgroup is guarded
        // after one grace period of its own instead of two. Reclaim thresholds follow.
        let results = arm_parallel(todo, arm_guard);
        let registered_ms = t0.elapsed().as_millis() as u64;
        let mut reclaim = Vec::new();
        for ((cg, t), armed) in results {
            // v2 has no reclaim eventfd: the watcher signals that threshold too.
            let ok = armed.is_ok() && !cg.is_v2();
            self.apply(&cg, t, armed);
            if ok {
                reclaim.push((cg, t));
            }
        }
        let guarded_ms = t0.elapsed().as_millis() as u64;
        for ((cg, t), fd) in arm_parallel(reclaim, arm_reclaim) {
            match fd {
                Ok(fd) => self.guard.send(Cmd::AddReclaim {
                    path: cg.path,
                    thresholds: t,
                    fd,
                }),
                Err(_) if !cg.exists() => {}
                Err(e) => tracing::warn!(
                    cgroup = %cg.path.display(),
                    error = %e,
                    "cannot arm the reclaim threshold; the kill threshold guards it"
                ),
            }
        }
        for dir in missed {
            self.on_created(&dir, "rescan");
        }
        tracing::debug!(
            guarded = self.known.len(),
            walked = all.len(),
            armed = to_arm,
            walked_ms,
            planned_ms,
            registered_ms,
            guarded_ms,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "rescan done"
        );
        guarded_ms
    }

    fn forget_subtree(&mut self, top: &Path) {
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| p.starts_with(top))
            .cloned()
            .collect();
        for p in gone {
            self.forget(&p);
        }
        self.failed.retain(|p, _| !p.starts_with(top));
        self.watches.retain(|_, p| !p.starts_with(top));
        self.watched.retain(|p, _| !p.starts_with(top));
    }

    fn forget(&mut self, path: &Path) {
        if self.known.remove(path).is_some() {
            self.guard.send(Cmd::Disarm(path.to_path_buf()));
            if let Some(w) = &self.watcher {
                w.unwatch(path);
            }
            tracing::info!(cgroup = %path.display(), "cgroup removed; disarmed");
        }
    }

    /// Arms, re-arms (limit changed) or disarms (limit removed) one cgroup.
    pub fn reconcile(&mut self, cg: &MemCgroup) {
        if let Some(t) = self.plan(cg) {
            let armed = arm_all(cg, t);
            self.apply(cg, t, armed);
        }
    }

    /// What `cg` needs: `Some(thresholds)` to (re-)arm; disarming and failures are
    /// handled here.
    fn plan(&mut self, cg: &MemCgroup) -> Option<Thresholds> {
        let limit = match cg.guarded_limit(self.swap_total) {
            Ok(l) => l,
            Err(e) if e.is_gone() => {
                self.forget(&cg.path);
                return None;
            }
            Err(e) => {
                self.fail_once(&cg.path, e.to_string());
                return None;
            }
        };
        let Some(thresholds) =
            limit.and_then(|(counter, l)| self.config.margins.thresholds_on(counter, l))
        else {
            self.forget(&cg.path);
            return None;
        };
        if self
            .known
            .get(&cg.path)
            .is_some_and(|k| k.thresholds == thresholds && cg.id().ok() == Some(k.id))
        {
            return None;
        }
        Some(thresholds)
    }

    fn apply(&mut self, cg: &MemCgroup, thresholds: Thresholds, armed: ArmResult) {
        match armed {
            Ok((armed, oom_error)) => {
                if let Some(e) = oom_error {
                    // Guarded all the same; only a kernel OOM kill here goes unreported.
                    tracing::warn!(
                        cgroup = %cg.path.display(),
                        error = %e,
                        "cannot arm the OOM notifier: a kernel OOM kill in this cgroup will not be reported"
                    );
                }
                let rearm = self.known.contains_key(&cg.path);
                self.known.insert(
                    cg.path.clone(),
                    Known {
                        limit: thresholds.limit,
                        thresholds,
                        id: cg.id().unwrap_or(0),
                    },
                );
                self.failed.remove(&cg.path);
                self.guard.send(Cmd::Arm(Box::new(armed)));
                if let (true, Some(w)) = (cg.is_v2(), &self.watcher) {
                    w.watch(cg, thresholds);
                }
                tracing::info!(
                    cgroup = %cg.path.display(),
                    counter = thresholds.counter.as_str(),
                    limit = thresholds.limit,
                    margin = thresholds.margin,
                    threshold = thresholds.kill,
                    reclaim_threshold = thresholds.reclaim,
                    rearm,
                    "armed"
                );
            }
            Err(e) if !cg.exists() => {
                tracing::debug!(cgroup = %cg.path.display(), error = %e, "cgroup vanished while arming");
            }
            Err(e) => self.fail_once(&cg.path, e),
        }
    }

    fn fail_once(&mut self, path: &Path, why: String) {
        if self.failed.get(path) != Some(&why) {
            tracing::warn!(cgroup = %path.display(), error = %why, "cannot guard cgroup");
            self.failed.insert(path.to_path_buf(), why);
        }
    }

    pub fn guarded(&self) -> &HashMap<PathBuf, Known> {
        &self.known
    }
}

/// The limit on inotify watches that applies to this process: its user namespace's
/// `user.max_inotify_watches` (a pod with its own user namespace can have a lower one than
/// the node's `fs.inotify.max_user_watches`, which shows the initial namespace's value
/// everywhere), else the node's.
fn max_inotify_watches() -> String {
    [
        "/proc/sys/user/max_inotify_watches",
        "/proc/sys/fs/inotify/max_user_watches",
    ]
    .iter()
    .find_map(|f| std::fs::read_to_string(f).ok())
    .map_or_else(|| "?".into(), |s| s.trim().to_string())
}

/// Tests only: `OOMGUARD_TEST_LIST_PAUSE_MS` holds discovery this long between listing a
/// directory and watching it (a walk), or between watching and listing it (a new cgroup),
/// so a test can make a cgroup inside that window and check it is still armed at once.
pub const LIST_PAUSE_ENV: &str = "OOMGUARD_TEST_LIST_PAUSE_MS";

fn test_pause(dir: &Path, what: &str) {
    let Some(ms) = std::env::var(LIST_PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    tracing::info!(cgroup = %dir.display(), ms, what, "test pause");
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

/// Registering a threshold costs the kernel an RCU grace period in the writer (8 ms alone,
/// 15 ms under load, measured here), and a cgroup's two registrations wait on each other
/// (its thresholds mutex). Concurrent writers share grace periods, so a walk arms many
/// cgroups at once: 1,000 cgroups took 630 ms with 64 workers and 230–270 ms with 256;
/// 512 gained little more. The workers exit when the walk is done.
const ARM_THREADS: usize = 256;
/// Small stacks: the agent's memory is locked (mlockall), stacks included.
const ARM_STACK: usize = 128 * 1024;

type ArmJob = (MemCgroup, Thresholds);
/// Armed, with why the OOM notifier (optional) could not be; or why the cgroup could not be.
type ArmResult = Result<(Armed, Option<String>), String>;

/// Runs `arm` on every job, on up to [`ARM_THREADS`] workers; results in path order.
fn arm_parallel<R: Send>(
    todo: Vec<ArmJob>,
    arm: impl Fn(&MemCgroup, Thresholds) -> R + Sync,
) -> Vec<(ArmJob, R)> {
    if todo.len() <= 1 {
        return todo
            .into_iter()
            .map(|(cg, t)| {
                let r = arm(&cg, t);
                ((cg, t), r)
            })
            .collect();
    }
    let queue = std::sync::Mutex::new(todo.into_iter());
    let done = std::sync::Mutex::new(Vec::new());
    let threads = ARM_THREADS.min(queue.lock().map(|q| q.len()).unwrap_or(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let worker = std::thread::Builder::new()
                .name("oomguard-arm".into())
                .stack_size(ARM_STACK);
            let spawned = worker.spawn_scoped(s, || {
                loop {
                    let job = match queue.lock() {
                        Ok(mut q) => q.next(),
                        Err(_) => None,
                    };
                    let Some((cg, t)) = job else { break };
                    let r = arm(&cg, t);
                    if let Ok(mut d) = done.lock() {
                        d.push(((cg, t), r));
                    }
                }
                crate::sys::unlock_own_stack();
            });
            if spawned.is_err() {
                // Fewer workers only means a slower walk; the ones running drain the queue.
                break;
            }
        }
    });
    let mut out = done.into_inner().unwrap_or_default();
    // Parents before children, as the walk found them.
    out.sort_by(|a, b| a.0.0.path.cmp(&b.0.0.path));
    out
}

/// Arms the kill threshold (required), the reclaim threshold and the OOM notifier.
fn arm_all(cg: &MemCgroup, t: Thresholds) -> ArmResult {
    let (mut armed, oom_error) = arm_guard(cg, t)?;
    if !cg.is_v2() {
        armed.reclaim_fd = Some(arm_reclaim(cg, t)?);
    }
    Ok((armed, oom_error))
}

/// Arms the reclaim threshold alone (a walk arms it after [`arm_guard`]).
fn arm_reclaim(cg: &MemCgroup, t: Thresholds) -> Result<std::os::fd::OwnedFd, String> {
    arm(&cg.path, Notifier::Usage(t.counter, t.reclaim)).map_err(|e| crate::error_line(&e))
}

/// Arms the kill threshold (required) and the OOM notifier: what guards the cgroup. A v2
/// cgroup has no eventfds to arm: eBPF and [`crate::headroom`] signal it.
fn arm_guard(cg: &MemCgroup, t: Thresholds) -> ArmResult {
    if cg.is_v2() {
        let armed = Armed {
            cgroup: cg.clone(),
            thresholds: t,
            kill_fd: None,
            reclaim_fd: None,
            oom_fd: None,
        };
        return Ok((armed, None));
    }
    let err = |e: crate::threshold::ArmError| crate::error_line(&e);
    let kill_fd = Some(arm(&cg.path, Notifier::Usage(t.counter, t.kill)).map_err(err)?);
    let (oom_fd, oom_error) = match arm(&cg.path, Notifier::Oom) {
        Ok(fd) => (Some(fd), None),
        Err(e) => (None, Some(err(e))),
    };
    let armed = Armed {
        cgroup: cg.clone(),
        thresholds: t,
        kill_fd,
        reclaim_fd: None,
        oom_fd,
    };
    Ok((armed, oom_error))
}
