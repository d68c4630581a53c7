//! What the running agent knows, kept for the debug views (`oomguard cgroups`,
//! `oomguard events`) that the control socket serves (`control` reads this module, never the
//! other way round).
//!
//! The guard thread updates it; the control socket's threads read it. Every update takes one
//! mutex for a few pointer moves (no I/O, no serialisation, no allocation beyond the record
//! itself), so the guard thread never waits on a reader: readers copy what they need under the
//! lock and do their I/O (reading usage, writing to the socket) after releasing it.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::report::{Action, Decision};
use crate::threshold::Thresholds;

/// How many recent events the agent keeps for `oomguard events` (and for followers that fall
/// behind).
pub const RECENT_EVENTS: usize = 512;

/// Where a guarded cgroup is in the guard's cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CgroupState {
    /// Thresholds armed; usage below the kill threshold (or the kill was skipped for cache).
    #[serde(rename = "armed")]
    Armed,
    /// Background `memory.force_empty` (v2: `memory.reclaim`) is running.
    #[serde(rename = "reclaiming")]
    Reclaiming,
    /// Above the kill threshold: the policy is choosing or killing a victim.
    #[serde(rename = "acting")]
    Acting,
    /// Acted; waiting for the memory to be freed before acting again.
    #[serde(rename = "cooling down")]
    CoolingDown,
    /// `memory.oom_kill_disable=1`: a user-space OOM handler owns the cgroup; the agent
    /// never acts on it.
    #[serde(rename = "left alone (oom_kill_disable)")]
    LeftAlone,
}

impl CgroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupState::Armed => "armed",
            CgroupState::Reclaiming => "reclaiming",
            CgroupState::Acting => "acting",
            CgroupState::CoolingDown => "cooling down",
            CgroupState::LeftAlone => "left alone (oom_kill_disable)",
        }
    }
}

/// The last decision of the policy on one cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastAction {
    /// As in the decision record: `kill`, `would-kill`, `skip-cache`, `no-candidate`,
    /// `kill-failed`, `reclaim`, `kernel-oom`.
    pub action: String,
    pub timestamp: String,
    /// The first victim's pid, when there was one.
    pub pid: Option<i32>,
    pub comm: Option<String>,
}

/// One guarded cgroup as the guard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedCgroup {
    pub path: PathBuf,
    pub thresholds: Thresholds,
    pub state: CgroupState,
    pub since: String,
    pub last_action: Option<LastAction>,
}

/// A pressure signal: something woke the guard for a cgroup (an eBPF record, an eventfd).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Signal {
    /// `ebpf` or `eventfd`.
    pub source: &'static str,
    /// `reclaim-crossed`, `kill-crossed`, `at-limit`, ...
    pub what: &'static str,
    pub usage: u64,
    pub threshold: u64,
}

/// What an [`Event`] carries.
#[derive(Debug, Clone)]
pub enum EventBody {
    Decision(Box<Decision>),
    Signal(Signal),
}

/// One entry of the recent-events ring.
#[derive(Debug, Clone)]
pub struct Event {
    /// Increases by one per event, from 1: a follower that sees a gap has missed events.
    pub seq: u64,
    pub timestamp: String,
    pub cgroup: String,
    pub body: EventBody,
}

impl Event {
    /// The stable JSON form (see README, "Debug CLI"):
    /// `{"seq", "timestamp", "cgroup", "kind": "decision"|"signal", "decision"|"signal": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let (kind, body) = match &self.body {
            EventBody::Decision(d) => ("decision", serde_json::to_value(d)),
            EventBody::Signal(s) => ("signal", serde_json::to_value(s)),
        };
        serde_json::json!({
            "seq": self.seq,
            "timestamp": self.timestamp,
            "cgroup": self.cgroup,
            "kind": kind,
            kind: body.unwrap_or(serde_json::Value::Null),
        })
    }
}

#[derive(Default)]
struct Inner {
    cgroups: BTreeMap<PathBuf, GuardedCgroup>,
    recent: VecDeque<Arc<Event>>,
    next_seq: u64,
}

/// The agent's shared view: cheap to update from the guard thread, read by the control
/// socket. Make one with [`AgentState::new`] and hand clones of the `Arc` around.
#[derive(Default)]
pub struct AgentState {
    inner: Mutex<Inner>,
    /// Signalled on every new event, for followers.
    changed: Condvar,
}

impl AgentState {
    pub fn new() -> Arc<AgentState> {
        Arc::new(AgentState::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guard (re-)armed `path` with `thresholds`: it is `armed` now.
    pub fn cgroup_armed(&self, path: &Path, thresholds: Thresholds) {
        let since = crate::report::now_rfc3339();
        let mut inner = self.lock();
        let last_action = inner.cgroups.remove(path).and_then(|old| old.last_action);
        inner.cgroups.insert(
            path.to_path_buf(),
            GuardedCgroup {
                path: path.to_path_buf(),
                thresholds,
                state: CgroupState::Armed,
                since,
                last_action,
            },
        );
    }

    /// The guard stopped guarding `path`.
    pub fn cgroup_removed(&self, path: &Path) {
        self.lock().cgroups.remove(path);
    }

    /// `path` moved to `state`; unknown paths are ignored, an unchanged state keeps its `since`.
    pub fn cgroup_state(&self, path: &Path, state: CgroupState) {
        let mut inner = self.lock();
        if let Some(cg) = inner.cgroups.get_mut(path)
            && cg.state != state
        {
            cg.state = state;
            cg.since = crate::report::now_rfc3339();
        }
    }

    /// Records a decision: into the recent events, and as the `last_action` of its cgroup. A
    /// finished reclaim ends the `reclaiming` state.
    pub fn decision(&self, d: &Decision) {
        let path = PathBuf::from(&d.oomcgroup);
        let action = serde_json::to_value(d.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let first = d.killed.first();
        let last = LastAction {
            action,
            timestamp: d.timestamp.clone(),
            pid: first.map(|k| k.pid),
            comm: first.map(|k| k.comm.clone()),
        };
        let event = Event {
            seq: 0,
            timestamp: d.timestamp.clone(),
            cgroup: d.oomcgroup.clone(),
            body: EventBody::Decision(Box::new(d.clone())),
        };
        let mut inner = self.lock();
        if let Some(cg) = inner.cgroups.get_mut(&path) {
            if d.action == Action::Reclaim && cg.state == CgroupState::Reclaiming {
                cg.state = CgroupState::Armed;
                cg.since = d.timestamp.clone();
            }
            cg.last_action = Some(last);
        }
        push(&mut inner, event);
        drop(inner);
        self.changed.notify_all();
    }

    /// Records a pressure signal for `cgroup` in the recent events.
    pub fn signal(&self, cgroup: &Path, signal: Signal) {
        let event = Event {
            seq: 0,
            timestamp: crate::report::now_rfc3339(),
            cgroup: cgroup.display().to_string(),
            body: EventBody::Signal(signal),
        };
        push(&mut self.lock(), event);
        self.changed.notify_all();
    }

    /// Every guarded cgroup, by path.
    pub fn cgroups(&self) -> Vec<GuardedCgroup> {
        self.lock().cgroups.values().cloned().collect()
    }

    /// The recent events with `seq > after` (all of them for 0), oldest first, and how many
    /// such events were already dropped from the ring.
    pub fn events_after(&self, after: u64) -> (Vec<Arc<Event>>, u64) {
        let inner = self.lock();
        since(&inner, after)
    }

    /// Like [`AgentState::events_after`], but waits up to `timeout` for a first new event.
    pub fn wait_events_after(&self, after: u64, timeout: Duration) -> (Vec<Arc<Event>>, u64) {
        let inner = self.lock();
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |i| i.next_seq <= after)
            .unwrap_or_else(|e| e.into_inner());
        since(&inner, after)
    }

    /// The sequence number of the newest event (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq
    }
}

fn push(inner: &mut Inner, mut event: Event) {
    inner.next_seq += 1;
    event.seq = inner.next_seq;
    if inner.recent.len() == RECENT_EVENTS {
        inner.recent.pop_front();
    }
    inner.recent.push_back(Arc::new(event));
}

fn since(inner: &Inner, after: u64) -> (Vec<Arc<Event>>, u64) {
    let events: Vec<Arc<Event>> = inner
        .recent
        .iter()
        .filter(|e| e.seq > after)
        .cloned()
        .collect();
    let first = events.first().map_or(inner.next_seq + 1, |e| e.seq);
    (events, first.saturating_sub(after + 1))
}

/// Records every decision of `rx` in `state` (and counts it in `metrics`) on a thread of its
/// own, then passes it on: put it between [`crate::report::channel`] and
/// [`crate::report::spawn_reporter`]. The thread ends when every sender is gone.
pub fn tee(
    state: Arc<AgentState>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    rx: std::sync::mpsc::Receiver<Decision>,
) -> std::io::Result<std::sync::mpsc::Receiver<Decision>> {
    let (tx, out) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("oomguard-state".into())
        .spawn(move || {
            for d in rx {
                state.decision(&d);
                if let Some(m) = &metrics {
                    m.observe(&d);
                }
                if tx.send(d).is_err() {
                    return;
                }
            }
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;

    fn thresholds() -> Thresholds {
        crate::threshold::Margins::default()
            .thresholds(1000 << 20)
            .unwrap_or_else(|| panic!("1000M has thresholds"))
    }

    fn decision(cgroup: &str, action: Action) -> Decision {
        Decision::new("h", Policy::Process, action, cgroup)
    }

    #[test]
    fn cgroups_follow_the_guard() {
        let s = AgentState::new();
        s.cgroup_armed(Path::new("/a"), thresholds());
        s.cgroup_armed(Path::new("/b"), thresholds());
        s.cgroup_state(Path::new("/a"), CgroupState::Reclaiming);
        s.cgroup_state(Path::new("/nope"), CgroupState::Acting);
        let all = s.cgroups();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].state, CgroupState::Reclaiming);
        s.decision(&decision("/a", Action::Reclaim));
        assert_eq!(s.cgroups()[0].state, CgroupState::Armed);
        assert_eq!(
            s.cgroups()[0]
                .last_action
                .as_ref()
                .map(|a| a.action.as_str()),
            Some("reclaim")
        );
        // A re-arm (limit change) keeps the last action.
        s.cgroup_armed(Path::new("/a"), thresholds());
        assert!(s.cgroups()[0].last_action.is_some());
        s.cgroup_removed(Path::new("/b"));
        assert_eq!(s.cgroups().len(), 1);
    }

    #[test]
    fn the_ring_is_bounded_and_counts_what_a_reader_missed() {
        let s = AgentState::new();
        for _ in 0..RECENT_EVENTS + 10 {
            s.decision(&decision("/a", Action::SkipCache));
        }
        let (all, missed) = s.events_after(0);
        assert_eq!(all.len(), RECENT_EVENTS);
        assert_eq!(missed, 10);
        assert_eq!(all[0].seq, 11);
        let (tail, missed) = s.events_after(s.last_seq() - 2);
        assert_eq!((tail.len(), missed), (2, 0));
        let (none, missed) = s.wait_events_after(s.last_seq(), Duration::from_millis(10));
        assert_eq!((none.len(), missed), (0, 0));
    }

    #[test]
    fn a_waiting_follower_wakes_on_a_new_event() {
        let s = AgentState::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_events_after(0, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        s.signal(
            Path::new("/a"),
            Signal {
                source: "ebpf",
                what: "kill-crossed",
                usage: 2,
                threshold: 1,
            },
        );
        let (events, _) = t.join().unwrap_or_default();
        assert_eq!(events.len(), 1);
        let v = events[0].to_json();
        assert_eq!(v["kind"], "signal");
        assert_eq!(v["signal"]["what"], "kill-crossed");
        assert_eq!(v["seq"], 1);
    }
}
