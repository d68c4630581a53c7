//! Decision records and their rendering. A decision is a plain record that every reporter
//! renders as it is; no reporter re-derives anything. The guard thread hands records to a
//! bounded queue and never waits for a reporter: when the queue is full the record is dropped
//! and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use crate::cgroup::{Counter, MemStat};
use crate::config::Policy;
use crate::events::{EventRequest, EventSink, Involved, Reason};
use crate::kill::Outcome;
use crate::runtime::{PodRef, RuntimeClient};
use crate::victim::Candidate;

/// What the guard did with one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// The policy killed a task (see `killed`).
    Kill,
    /// The noop policy: what would have been killed.
    WouldKill,
    /// At the threshold, but the kernel can still reclaim enough page cache to stay below
    /// the limit: left to the kernel.
    SkipCache,
    /// Pressing, but no candidate frees more than the overshoot (the memory is held by
    /// tmpfs/shmem or the kernel): a kill could not help, so none is made.
    NoHelp,
    /// Above the threshold but nothing may be killed (only protected tasks).
    NoCandidate,
    /// Every kill attempt failed or did not take effect before its deadline.
    KillFailed,
    /// Background `memory.force_empty` at the reclaim threshold.
    Reclaim,
    /// The kernel's own OOM killer ran in this cgroup.
    KernelOom,
}

/// One killed (or would-be killed) task.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Killed {
    pub pid: i32,
    pub comm: String,
    pub score: i64,
    pub rss_bytes: u64,
    pub oom_score_adj: i32,
    pub proccgroup: String,
    #[serde(flatten)]
    pub outcome: Option<Outcome>,
}

impl Killed {
    pub fn new(c: &Candidate, outcome: Option<Outcome>) -> Self {
        Killed {
            pid: c.task.pid,
            comm: c.task.comm.clone(),
            score: c.score,
            rss_bytes: c.task.rss_bytes,
            oom_score_adj: c.task.oom_score_adj,
            proccgroup: c.task.cgroup.display().to_string(),
            outcome,
        }
    }
}

/// The upstream message fields (hostname, timestamp, oomcgroup, proccgroup, threshold,
/// usage, killed, stats, policy) plus what an operator needs to trust the decision.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub hostname: String,
    pub timestamp: String,
    pub action: Action,
    pub policy: Policy,
    /// The cgroup whose threshold fired.
    pub oomcgroup: String,
    /// The cgroup of the (first) victim, if any.
    pub proccgroup: String,
    /// The counter `limit`, `threshold` and `usage` are of: `memory`, or `memsw` (memory
    /// and swap, where a v1 memsw limit binds).
    pub counter: Counter,
    pub limit: u64,
    pub threshold: u64,
    pub usage: u64,
    pub reclaimable_cache: u64,
    pub killed: Vec<Killed>,
    pub stats: MemStat,
    /// From the eventfd wake-up to the first SIGKILL sent, in microseconds.
    pub wake_to_kill_us: Option<u64>,
    /// Free text for what the fields do not say (errors, reclaim results).
    pub detail: String,
    /// The pod the victim belongs to, when the runtime said.
    pub pod: Option<PodRef>,
    /// The container policy's kill: through containerd, or the direct fallback.
    pub container: Option<ContainerKill>,
    /// What raised the signal: `eventfd` (threshold notification), `ebpf` (a pressure or
    /// at-limit record), `recheck` (still above after a skip or cooldown), or `arm`.
    pub signal: &'static str,
}

/// How the container policy killed (or failed to kill) a container.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContainerKill {
    pub id: String,
    /// `containerd` or `fallback` (the cgroup's tasks killed directly).
    pub via: &'static str,
    pub namespace: Option<String>,
    /// From the kill request to the container's cgroup holding no task, in microseconds.
    pub gone_us: Option<u64>,
    /// Why the fallback was used.
    pub error: Option<String>,
}

impl Decision {
    /// A record stamped now with nothing measured yet: the caller fills in the rest.
    pub fn new(
        hostname: impl Into<String>,
        policy: Policy,
        action: Action,
        oomcgroup: impl Into<String>,
    ) -> Decision {
        Decision {
            hostname: hostname.into(),
            timestamp: now_rfc3339(),
            action,
            policy,
            oomcgroup: oomcgroup.into(),
            proccgroup: String::new(),
            counter: Counter::Memory,
            limit: 0,
            threshold: 0,
            usage: 0,
            reclaimable_cache: 0,
            killed: Vec::new(),
            stats: MemStat::default(),
            wake_to_kill_us: None,
            detail: String::new(),
            pod: None,
            container: None,
            signal: "eventfd",
        }
    }
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// The sending half, owned by the guard thread (and the reclaim worker).
#[derive(Clone)]
pub struct Reporter {
    tx: SyncSender<Decision>,
    dropped: Arc<AtomicU64>,
}

impl Reporter {
    /// Never blocks: a full queue drops the record and counts it.
    pub fn send(&self, d: Decision) {
        match self.tx.try_send(d) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The drop counter itself, for metrics read elsewhere.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

pub fn channel(capacity: usize) -> (Reporter, Receiver<Decision>) {
    let (tx, rx) = sync_channel(capacity);
    (
        Reporter {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        rx,
    )
}

/// Logs one decision as one structured record. JSON-valued fields (`killed`, `stats`) are
/// rendered as JSON strings so text and JSON logs carry the same content.
pub fn log_decision(d: &Decision) {
    let killed = serde_json::to_string(&d.killed).unwrap_or_default();
    let stats = serde_json::to_string(&d.stats).unwrap_or_default();
    let action = serde_json::to_value(d.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    tracing::warn!(
        target: "oomguard::decision",
        action = %action,
        policy = d.policy.as_str(),
        hostname = %d.hostname,
        timestamp = %d.timestamp,
        oomcgroup = %d.oomcgroup,
        proccgroup = %d.proccgroup,
        counter = d.counter.as_str(),
        limit = d.limit,
        threshold = d.threshold,
        usage = d.usage,
        reclaimable_cache = d.reclaimable_cache,
        wake_to_kill_us = d.wake_to_kill_us,
        killed = %killed,
        stats = %stats,
        detail = %d.detail,
        signal = d.signal,
        pod = %d.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)).unwrap_or_default(),
        container = %d.container.as_ref().and_then(|c| serde_json::to_string(c).ok()).unwrap_or_default(),
        "decision"
    );
}

/// The Kubernetes Event reason for a decision, if it gets one.
pub fn event_reason(d: &Decision) -> Option<Reason> {
    match d.action {
        Action::Kill if d.container.is_some() => Some(Reason::KillContainer),
        Action::Kill => Some(Reason::KillProcess),
        Action::KernelOom => Some(Reason::CgroupOom),
        _ => None,
    }
}

// Here rather than in `events`: the sink posts requests and knows nothing of decisions.
impl EventRequest {
    /// An event for `decision` (its upstream JSON is the message), about `pod` when one is known, else about node `node`.
    pub fn from_decision(
        decision: &Decision,
        reason: Reason,
        pod: Option<&PodRef>,
        node: &str,
    ) -> Self {
        EventRequest {
            reason,
            object: pod.map(Involved::from_pod).unwrap_or(Involved::Node {
                name: node.to_string(),
            }),
            message: serde_json::to_string(decision).unwrap_or_default(),
            at: decision
                .timestamp
                .parse()
                .unwrap_or_else(|_| jiff::Timestamp::now()),
        }
    }
}

/// How long the reporter may ask the runtime which pod a decision's cgroup belongs to
/// (labels are normally cached when the cgroup is armed).
const POD_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs the reporters (log, then Kubernetes Events when a sink is given) until every
/// sender is gone. Decisions that do not name their pod yet (process kills, kernel OOMs)
/// get it from the runtime here, off the guard thread.
pub fn spawn_reporter(
    rx: Receiver<Decision>,
    sink: Option<EventSink>,
    runtime: Option<Arc<RuntimeClient>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("oomguard-report".into())
        .spawn(move || {
            for mut d in rx {
                let reason = event_reason(&d);
                if reason.is_some()
                    && d.pod.is_none()
                    && let Some(rt) = &runtime
                {
                    let cgroup = if d.proccgroup.is_empty() {
                        &d.oomcgroup
                    } else {
                        &d.proccgroup
                    };
                    if let Ok(t) =
                        rt.plan_blocking(std::path::Path::new(cgroup), POD_LOOKUP_TIMEOUT)
                    {
                        d.pod = t.pod().cloned();
                    }
                }
                log_decision(&d);
                if let (Some(sink), Some(reason)) = (&sink, reason) {
                    sink.submit(EventRequest::from_decision(
                        &d,
                        reason,
                        d.pod.as_ref(),
                        &d.hostname,
                    ));
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> Decision {
        Decision::new("h", Policy::Process, Action::SkipCache, "/a")
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (rep, rx) = channel(2);
        for _ in 0..5 {
            rep.send(decision());
        }
        assert_eq!(rep.dropped(), 3);
        assert_eq!(rx.try_iter().count(), 2);
    }

    #[test]
    fn decision_json_has_the_upstream_fields() {
        let v = serde_json::to_value(decision()).unwrap();
        for k in [
            "hostname",
            "timestamp",
            "oomcgroup",
            "proccgroup",
            "threshold",
            "usage",
            "killed",
            "stats",
            "policy",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["action"], "skip-cache");
        assert_eq!(v["policy"], "process");
    }
}
