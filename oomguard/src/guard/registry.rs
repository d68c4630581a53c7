//! The guarded cgroups as the guard thread holds them: one [`Entry`] per cgroup, the epoll
//! tokens that name them, their ids (as eBPF records name cgroups) and the victims still
//! exiting. Plain data: arming (eventfds, eBPF thresholds, the runtime's prefetch) is done
//! by the guard around it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::kernel_oom::HeldReport;
use super::{Armed, Guard, Kind};
use crate::cgroup::Counter;
use crate::policy::State;
use crate::report::Killed;
use crate::threshold::Thresholds;
use crate::victim::Candidate;

/// A kill in progress ("acting"): no other victim in its subtree until it is over. A
/// signalled task is over when it exits, when `process_mrelease` reaped it (its worker
/// says), or after `cooldown` (the longest wait, like the kernel's OOM reaper giving up on
/// a task); a container kill when its worker answers.
pub(super) struct Pending {
    /// The signalled task (0: a container kill, whose tasks the worker signals).
    pub pid: i32,
    /// The victim's pidfd, in the epoll set: readable once it has exited.
    pub fd: Option<OwnedFd>,
    pub token: Option<u64>,
    pub since: Instant,
    /// Names this kill in its worker's answer (a later kill of the cgroup has another).
    pub seq: u64,
}

impl Pending {
    pub fn is_container(&self) -> bool {
        self.pid == 0
    }
}

/// A victim ranked and pinned ahead of the crossing (at the reclaim threshold, or while a
/// cgroup sits near its limit), so the crossing costs a usage read and a signal.
pub(super) struct Ready {
    pub at: Instant,
    pub victim: Candidate,
    pub fd: crate::kill::Pinned,
}

pub(super) struct Entry {
    pub armed: Armed,
    /// The cgroup id (directory inode), as eBPF records name it.
    pub id: u64,
    pub state: State,
    pub last_reclaim: Option<Instant>,
    pub reclaiming: Arc<AtomicBool>,
    pub tokens: Vec<u64>,
    pub oom_kills_seen: u64,
    /// The OOM eventfd fired before the kernel counted its kill: look again until then.
    pub oom_pending_until: Option<Instant>,
    /// Kernel kills counted but not reported yet: the kernel counts a kill before its
    /// `mark_victim` tracepoint fires, so the report waits a little for the victim's record.
    pub oom_report: Option<HeldReport>,
    /// The kernel's victims in this subtree as the eBPF `mark_victim` program saw them, not
    /// yet in a report.
    pub kernel_victims: Vec<Killed>,
    /// Reading usage failed last time (logged once).
    pub usage_unreadable: bool,
    /// Re-check until then even below the threshold: a kill-eventfd wake-up that read
    /// usage below the threshold may have met a momentary dip (per-CPU charge stock
    /// drained, reclaim), and the kernel will not signal the same crossing again.
    pub watch_until: Option<Instant>,
    /// When to evaluate again without a signal (`None`: only on a signal).
    pub next_check: Option<Instant>,
    /// The last evaluation an eBPF at-limit record asked for (they come with every reclaim
    /// of a cgroup that lives at its limit: rate-limited to one per `AT_LIMIT_EVERY`).
    pub last_at_limit: Option<Instant>,
    /// This cgroup's kill in progress: its victim not yet gone, or its worker not yet done.
    pub victim: Option<Pending>,
    /// The unreclaimable bytes a container kill was decided on: the level further growth
    /// must pass if it kills nothing.
    pub acting_unreclaimable: u64,
    /// The container policy found no container here (why, for the record): the process
    /// policy acts on the next decision.
    pub no_container: Option<String>,
    /// The process policy's next victim, ready (trusted for `READY_FRESH`).
    pub ready: Option<Ready>,
    /// The band below the kill threshold that ends an episode.
    pub hysteresis: u64,
    /// `memory.oom_kill_disable=1` when armed: a user-space OOM handler owns the cgroup
    /// (the kernel freezes its tasks at the limit instead of killing); never acted on.
    pub left_alone: bool,
    /// `memory.use_hierarchy=0` (kernels before 5.11): the limit covers only the cgroup's
    /// own tasks, so only they are candidates.
    pub flat: bool,
    /// Its usage file and `memory.stat`, kept open for the crossing.
    pub files: super::files::CgroupFiles,
}

impl Entry {
    pub fn new(armed: Armed, id: u64, hysteresis: u64) -> Entry {
        Entry {
            armed,
            id,
            state: State::default(),
            last_reclaim: None,
            reclaiming: Arc::new(AtomicBool::new(false)),
            tokens: Vec::new(),
            oom_kills_seen: 0,
            oom_pending_until: None,
            oom_report: None,
            kernel_victims: Vec::new(),
            usage_unreadable: false,
            watch_until: None,
            next_check: None,
            last_at_limit: None,
            victim: None,
            acting_unreclaimable: 0,
            no_container: None,
            ready: None,
            hysteresis,
            left_alone: false,
            flat: false,
            files: Default::default(),
        }
    }
}

/// Every guarded cgroup, by path, with what names them in wake-ups.
pub(super) struct Registry {
    /// Ordered by path (component-wise): a cgroup's descendants follow it in one run.
    pub entries: BTreeMap<PathBuf, Entry>,
    /// epoll tokens: what woke the guard.
    pub tokens: HashMap<u64, (PathBuf, Kind)>,
    next_token: u64,
    /// eBPF records name cgroups by id.
    pub by_id: HashMap<u64, PathBuf>,
    /// Entries with a pending victim (most of the time none: no subtree scan then).
    pending_victims: usize,
    next_seq: u64,
}

impl Registry {
    /// Token 0 is the guard's command eventfd.
    pub fn new() -> Registry {
        Registry {
            entries: BTreeMap::new(),
            tokens: HashMap::from([(0, (PathBuf::new(), Kind::Wake))]),
            next_token: 1,
            by_id: HashMap::new(),
            pending_victims: 0,
            next_seq: 1,
        }
    }

    pub fn next_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    pub fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Adds (or replaces) a cgroup's entry; it is named by its id from now on.
    pub fn insert(&mut self, entry: Entry) {
        let path = entry.armed.cgroup.path.clone();
        self.by_id.insert(entry.id, path.clone());
        if let Some(old) = self.entries.insert(path, entry) {
            self.forget_tokens(&old);
        }
    }

    fn forget_tokens(&mut self, entry: &Entry) {
        for t in &entry.tokens {
            self.tokens.remove(t);
        }
        if let Some(v) = &entry.victim {
            self.pending_victims = self.pending_victims.saturating_sub(1);
            if let Some(t) = v.token {
                self.tokens.remove(&t);
            }
        }
    }

    /// Removes a cgroup; the bool says its id no longer names a guarded cgroup (the eBPF
    /// maps may forget it). Closing its eventfds (when the entry drops) unregisters them in
    /// the kernel and removes them from the epoll set.
    pub fn remove(&mut self, path: &Path) -> Option<(Entry, bool)> {
        let entry = self.entries.remove(path)?;
        self.forget_tokens(&entry);
        let forget_id = self.by_id.get(&entry.id).is_some_and(|p| p == path);
        if forget_id {
            self.by_id.remove(&entry.id);
        }
        Some((entry, forget_id))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a cgroup's victim (its pidfd's token, if any, already registered).
    pub fn set_victim(&mut self, path: &Path, v: Pending) {
        let Some(e) = self.entries.get_mut(path) else {
            return;
        };
        if let Some(t) = v.token {
            self.tokens.insert(t, (path.to_path_buf(), Kind::Victim));
        }
        if let Some(old) = e.victim.replace(v) {
            if let Some(t) = old.token {
                self.tokens.remove(&t);
            }
        } else {
            self.pending_victims += 1;
        }
    }

    /// Forgets a cgroup's victim: it exited, or waited for longer than the cooldown.
    pub fn victim_gone(&mut self, path: &Path) -> Option<Pending> {
        let v = self.entries.get_mut(path)?.victim.take()?;
        self.pending_victims = self.pending_victims.saturating_sub(1);
        if let Some(t) = v.token {
            self.tokens.remove(&t);
        }
        Some(v)
    }

    /// Whether a victim of this cgroup's subtree, or of a guarded cgroup around it, has not
    /// exited yet: one episode per subtree, as the kernel never picks a second victim
    /// while the first is still exiting.
    pub fn subtree_busy(&self, path: &Path) -> bool {
        self.pending_victims > 0
            && self
                .entries
                .iter()
                .any(|(p, e)| e.victim.is_some() && (p.starts_with(path) || path.starts_with(p)))
    }

    /// The guarded cgroups strictly beneath `path` (innermost first is the rule: they are
    /// evaluated before `path` acts).
    pub fn descendants(&self, path: &Path) -> Vec<PathBuf> {
        use std::ops::Bound;
        self.entries
            .range::<Path, _>((Bound::Excluded(path), Bound::Unbounded))
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(path))
            .cloned()
            .collect()
    }

    /// The guarded cgroups at or above `cgroup` (whose limits cover it).
    pub fn at_or_above(&self, cgroup: &Path) -> Vec<PathBuf> {
        self.entries
            .keys()
            .filter(|p| cgroup.starts_with(p))
            .cloned()
            .collect()
    }

    /// The cgroups whose own re-check time has come.
    pub fn due(&self, now: Instant) -> Vec<PathBuf> {
        self.entries
            .iter()
            .filter(|(_, e)| e.next_check.is_some_and(|t| t <= now))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The earliest re-check time of any cgroup.
    pub fn next_check(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.next_check).min()
    }
}

impl Guard {
    pub(super) fn arm(&mut self, armed: Armed) {
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
        let flat = crate::cgroup::hierarchy_off(
            crate::cgroup::read_string(&armed.cgroup.file("memory.use_hierarchy"))
                .ok()
                .as_deref(),
        );
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
        // The eBPF programs read the memory page counter, not memsw: a cgroup guarded on
        // memsw is left to its eventfds.
        if let Some(bpf) = &self.deps.ebpf
            && armed.thresholds.counter == Counter::Memory
            && let Err(e) = bpf.set_thresholds(id, armed.thresholds.reclaim, armed.thresholds.kill)
        {
            tracing::warn!(cgroup = %path.display(), error = %e, "cannot set the eBPF thresholds; the eventfds still guard it");
        }
        if let Some(rt) = &self.deps.runtime {
            rt.prefetch(&path);
        }
        if let Some(s) = &self.deps.state {
            s.cgroup_armed(&path, armed.thresholds);
        }
        let hysteresis =
            crate::decide::hysteresis(armed_limit.saturating_sub(armed_kill), self.cpus);
        let mut entry = Entry::new(armed, id, hysteresis);
        entry.tokens = tokens;
        entry.oom_kills_seen = oom_kills_seen;
        entry.left_alone = left_alone;
        entry.flat = flat;
        if let Some(p) = previous {
            entry.state = p.state;
            entry.last_reclaim = p.last_reclaim;
            entry.reclaiming = p.reclaiming;
        }
        self.reg.insert(entry);
        if let Some(v) = victim {
            // Still waited for under the new thresholds.
            self.reg.set_victim(&path, v);
        }
        self.stats
            .guarded
            .store(self.reg.len() as u64, Ordering::Relaxed);
        if left_alone && let Some(s) = &self.deps.state {
            s.cgroup_state(&path, crate::state::CgroupState::LeftAlone);
        }
        // Usage may already be above the new threshold: the notifier only reports crossings.
        self.evaluate(&path, Instant::now(), "arm");
    }

    pub(super) fn add_reclaim(&mut self, path: &Path, thresholds: Thresholds, fd: OwnedFd) {
        let wanted = self
            .reg
            .entries
            .get(path)
            .is_some_and(|e| e.armed.thresholds == thresholds && e.armed.reclaim_fd.is_none());
        if !wanted {
            return;
        }
        let token = self.register(&fd, path, Kind::Reclaim);
        if let Some(e) = self.reg.entries.get_mut(path) {
            e.tokens.extend(token);
            e.armed.reclaim_fd = Some(fd);
        }
    }

    pub(super) fn remove(&mut self, path: &Path) -> Option<Entry> {
        let (entry, forget_id) = self.reg.remove(path)?;
        if forget_id && let Some(bpf) = &self.deps.ebpf {
            let _ = bpf.remove_cgroup(entry.id);
        }
        self.stats
            .guarded
            .store(self.reg.len() as u64, Ordering::Relaxed);
        Some(entry)
    }

    pub(super) fn disarm(&mut self, path: &Path) {
        if let Some(s) = &self.deps.state {
            s.cgroup_removed(path);
        }
        if self.remove(path).is_some() {
            tracing::debug!(cgroup = %path.display(), "disarmed");
        }
    }

    /// Forgets a cgroup's victim: it exited, or waited for longer than the cooldown.
    pub(super) fn victim_gone(&mut self, path: &Path) {
        if let Some(v) = self.reg.victim_gone(path) {
            tracing::debug!(cgroup = %path.display(), pid = v.pid, waited_ms = v.since.elapsed().as_millis() as u64, "victim gone");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cgroup::MemCgroup;

    fn entry(path: &str, id: u64) -> Entry {
        let armed = Armed {
            cgroup: MemCgroup::new(Path::new(path)),
            thresholds: Thresholds {
                counter: Counter::Memory,
                limit: 100,
                margin: 10,
                kill: 90,
                reclaim: 80,
            },
            kill_fd: None,
            reclaim_fd: None,
            oom_fd: None,
        };
        Entry::new(armed, id, 1)
    }

    fn pending(pid: i32, token: Option<u64>) -> Pending {
        Pending {
            pid,
            fd: None,
            token,
            since: Instant::now(),
            seq: 1,
        }
    }

    /// A registry of cgroups at `paths` (ids 10, 11, ...), without eventfds.
    pub(in crate::guard) fn registry(paths: &[&str]) -> Registry {
        let mut r = Registry::new();
        for (i, p) in paths.iter().enumerate() {
            r.insert(entry(p, i as u64 + 10));
        }
        r
    }

    #[test]
    fn a_kill_holds_its_subtree_and_the_cgroups_around_it_only() {
        let mut r = registry(&["/m/pod", "/m/pod/a", "/m/pod/b", "/m/other"]);
        assert!(!r.subtree_busy(Path::new("/m/pod/a")));
        r.set_victim(Path::new("/m/pod/a"), pending(42, None));
        assert!(r.subtree_busy(Path::new("/m/pod/a")));
        assert!(r.subtree_busy(Path::new("/m/pod")), "the cgroup around it");
        assert!(
            !r.subtree_busy(Path::new("/m/pod/b")),
            "a sibling acts alone"
        );
        assert!(!r.subtree_busy(Path::new("/m/other")));
        assert_eq!(
            r.victim_gone(Path::new("/m/pod/a")).map(|v| v.pid),
            Some(42)
        );
        assert!(!r.subtree_busy(Path::new("/m/pod")));
        assert!(
            r.victim_gone(Path::new("/m/pod/a")).is_none(),
            "forgotten once"
        );
    }

    #[test]
    fn a_victims_token_names_it_until_it_is_gone() {
        let mut r = registry(&["/m/a"]);
        let t = r.next_token();
        r.set_victim(Path::new("/m/a"), pending(7, Some(t)));
        assert_eq!(r.tokens.get(&t).map(|(_, k)| *k), Some(Kind::Victim));
        r.victim_gone(Path::new("/m/a"));
        assert!(!r.tokens.contains_key(&t));
    }

    #[test]
    fn removing_a_cgroup_forgets_its_tokens_victim_and_id() {
        let mut r = registry(&["/m/a", "/m/b"]);
        let t = r.next_token();
        r.entries.get_mut(Path::new("/m/a")).unwrap().tokens.push(t);
        r.tokens.insert(t, (PathBuf::from("/m/a"), Kind::Kill));
        r.set_victim(Path::new("/m/a"), pending(7, None));
        let (e, forget_id) = r.remove(Path::new("/m/a")).unwrap();
        assert_eq!(e.id, 10);
        assert!(forget_id);
        assert!(!r.tokens.contains_key(&t));
        assert!(!r.by_id.contains_key(&10));
        assert!(
            !r.subtree_busy(Path::new("/m")),
            "its victim no longer holds anything"
        );
        assert_eq!(r.len(), 1);
        assert!(r.remove(Path::new("/m/a")).is_none());
    }

    #[test]
    fn an_id_taken_over_by_another_path_is_kept() {
        let mut r = registry(&["/m/a"]);
        r.insert(entry("/m/b", 10));
        let (_, forget_id) = r.remove(Path::new("/m/a")).unwrap();
        assert!(!forget_id, "id 10 names /m/b now");
        assert_eq!(r.by_id.get(&10), Some(&PathBuf::from("/m/b")));
    }

    #[test]
    fn descendants_and_ancestors_by_path_components() {
        let r = registry(&[
            "/m/pod",
            "/m/pod/a",
            "/m/pod/a/x",
            "/m/pod-2",
            "/m",
            "/m/pod.x",
            "/m/pod/a-b",
            "/m/poc",
        ]);
        let mut d = r.descendants(Path::new("/m/pod"));
        d.sort();
        assert_eq!(
            d,
            ["/m/pod/a", "/m/pod/a/x", "/m/pod/a-b"].map(PathBuf::from),
            "'.' and '-' sort before '/' byte-wise, not component-wise"
        );
        assert_eq!(
            r.descendants(Path::new("/m/pod/a/x")),
            Vec::<PathBuf>::new()
        );
        assert_eq!(r.descendants(Path::new("/m")).len(), 7);
        let mut a = r.at_or_above(Path::new("/m/pod/a/x/unguarded"));
        a.sort();
        assert_eq!(
            a,
            ["/m", "/m/pod", "/m/pod/a", "/m/pod/a/x"].map(PathBuf::from),
            "/m/pod-2 is no ancestor"
        );
    }

    #[test]
    fn due_and_next_check() {
        let mut r = registry(&["/m/a", "/m/b"]);
        let now = Instant::now();
        assert!(r.next_check().is_none());
        r.entries.get_mut(Path::new("/m/a")).unwrap().next_check = Some(now);
        r.entries.get_mut(Path::new("/m/b")).unwrap().next_check =
            Some(now + std::time::Duration::from_secs(1));
        assert_eq!(r.next_check(), Some(now));
        assert_eq!(r.due(now), [PathBuf::from("/m/a")]);
    }
}
