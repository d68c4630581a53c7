//! Kubernetes Events for what the agent did: core/v1 `Event`s posted through `Api<Event>`
//! the way client-go's recorder does it (the `events.k8s.io` API that kube's `Recorder`
//! uses is outside our ClusterRole).
//!
//! - The first event for an (object, reason) is created as `<object name>.<hex nanos>` with
//!   `count: 1` and `firstTimestamp = lastTimestamp`; `eventTime` stays unset.
//! - Repeats PATCH (strategic merge) `count`, `lastTimestamp` and `message` of that event;
//!   a 404 (expired or deleted) creates a new one.
//! - [`EventSink::submit`] never blocks: requests go to a bounded queue; when it is full the
//!   oldest request is dropped and counted. A tokio task drains the queue, retrying
//!   connection failures, timeouts, 429 and 5xx with exponential backoff. A retried create
//!   keeps its name, so a create that landed but whose answer was lost (a slow server)
//!   comes back as 409 and counts as done instead of making a second event.
//! - 401/403 (RBAC): the event is dropped and counted, the next one waits the back-off,
//!   and the refusal is logged once (verb, resource, namespace) until an event goes
//!   through again. An outage (down, slow, 5xx) is logged once when it starts and once
//!   when events flow again; the attempts in between log at debug level only.
//! - Without a Kubernetes configuration (`Config::infer()`: `KUBECONFIG`, `~/.kube/config`
//!   or in-cluster) the sink logs once that events are disabled and drops requests.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::Notify;

use crate::runtime::PodRef;

/// Unless `RUST_LOG` says otherwise about kube's client, silences its HTTP layer, which
/// logs every failed request at ERROR: while the API server is down that is one line per
/// retry. The sink says what happened itself, once when it starts and once when it ends.
pub fn quiet_kube_http_errors(
    filter: tracing_subscriber::EnvFilter,
) -> tracing_subscriber::EnvFilter {
    let chosen = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("kube_client"));
    match "kube_client::client::builder=off".parse() {
        Ok(d) if !chosen => filter.add_directive(d),
        _ => filter,
    }
}

/// `source.component` and `reportingComponent` of every event.
pub const COMPONENT: &str = "oom-guard";
/// Events about the node go to this namespace, as client-go does for cluster-scoped objects.
pub const NODE_EVENT_NAMESPACE: &str = "default";

/// The event reasons the agent posts (the upstream agent's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The container policy killed a container.
    KillContainer,
    /// The process policy killed a task.
    KillProcess,
    /// The kernel's memcg OOM killer ran in a guarded cgroup.
    CgroupOom,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::KillContainer => "OomGuardKillContainer",
            Reason::KillProcess => "OomGuardKillProcess",
            Reason::CgroupOom => "CgroupOOM",
        }
    }
}

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Involved {
    Pod {
        namespace: String,
        name: String,
        uid: String,
        container: Option<String>,
    },
    /// No pod is known (the cgroup is not a pod's, or the runtime could not say).
    Node { name: String },
}

impl Involved {
    pub fn from_pod(pod: &PodRef) -> Self {
        Involved::Pod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            container: pod.container.clone(),
        }
    }

    /// The namespace the event lives in (must equal `involvedObject.namespace`).
    pub fn event_namespace(&self) -> &str {
        match self {
            Involved::Pod { namespace, .. } => namespace,
            Involved::Node { .. } => NODE_EVENT_NAMESPACE,
        }
    }

    fn name(&self) -> &str {
        match self {
            Involved::Pod { name, .. } | Involved::Node { name } => name,
        }
    }

    /// The `involvedObject`, as kubelet writes it (a node's uid is its name).
    pub fn reference(&self) -> ObjectReference {
        match self {
            Involved::Pod {
                namespace,
                name,
                uid,
                container,
            } => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(namespace.clone()),
                name: Some(name.clone()),
                uid: Some(uid.clone()),
                field_path: container
                    .as_ref()
                    .map(|c| format!("spec.containers{{{c}}}")),
                ..Default::default()
            },
            Involved::Node { name } => ObjectReference {
                kind: Some("Node".into()),
                name: Some(name.clone()),
                uid: Some(name.clone()),
                ..Default::default()
            },
        }
    }
}

/// One thing to report.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRequest {
    pub reason: Reason,
    pub object: Involved,
    /// The upstream JSON (hostname, timestamp, oomcgroup, proccgroup, threshold, usage,
    /// killed, stats, policy), as the decision record serialises.
    pub message: String,
    pub at: jiff::Timestamp,
}

/// Settings of the sink.
#[derive(Debug, Clone)]
pub struct EventsOptions {
    /// `source.host` and `reportingInstance`.
    pub node_name: String,
    /// A kubeconfig to use instead of `Config::infer()`.
    pub kubeconfig: Option<PathBuf>,
    /// Requests waiting at most; beyond it the oldest is dropped.
    pub capacity: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Bound on one API request.
    pub request_timeout: Duration,
}

impl EventsOptions {
    pub fn new(node_name: impl Into<String>) -> Self {
        EventsOptions {
            node_name: node_name.into(),
            kubeconfig: None,
            capacity: 256,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of the sink, for logs and metrics.
#[derive(Debug, Default)]
pub struct EventStats {
    pub created: AtomicU64,
    pub patched: AtomicU64,
    /// Dropped because the queue was full (the oldest goes).
    pub dropped: AtomicU64,
    /// Refused by the API server for good (4xx other than 404/409/429), `forbidden`
    /// included.
    pub rejected: AtomicU64,
    /// Of `rejected`: refused with 401/403 (RBAC).
    pub forbidden: AtomicU64,
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
}

/// The sink's counters at one moment, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCounts {
    pub created: u64,
    pub patched: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub forbidden: u64,
    pub retries: u64,
    /// Requests waiting in the queue.
    pub queued: u64,
}

impl EventCounts {
    /// Events the API server took (created or patched).
    pub fn sent(&self) -> u64 {
        self.created + self.patched
    }
}

struct Shared {
    queue: Mutex<VecDeque<EventRequest>>,
    notify: Notify,
    capacity: usize,
    disabled: AtomicBool,
    stats: EventStats,
}

/// The submitting side; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EventSink {
    shared: Arc<Shared>,
}

impl EventSink {
    /// Spawns the posting task on `rt`. Never fails: without a configuration the sink
    /// logs once and drops what it is given.
    pub fn spawn(rt: &tokio::runtime::Handle, opts: EventsOptions) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::with_capacity(opts.capacity)),
            notify: Notify::new(),
            capacity: opts.capacity.max(1),
            disabled: AtomicBool::new(false),
            stats: EventStats::default(),
        });
        rt.spawn(run(shared.clone(), opts));
        EventSink { shared }
    }

    /// Queues `ev`; never blocks, never waits on the network.
    pub fn submit(&self, ev: EventRequest) {
        if self.shared.disabled.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut q) = self.shared.queue.lock() {
            if q.len() >= self.shared.capacity {
                q.pop_front();
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(ev);
        }
        self.shared.notify.notify_one();
    }

    pub fn stats(&self) -> &EventStats {
        &self.shared.stats
    }

    /// Every counter and the queue depth, read now.
    pub fn snapshot(&self) -> EventCounts {
        let st = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EventCounts {
            created: get(&st.created),
            patched: get(&st.patched),
            dropped: get(&st.dropped),
            rejected: get(&st.rejected),
            forbidden: get(&st.forbidden),
            retries: get(&st.retries),
            queued: self.queued() as u64,
        }
    }

    /// Requests waiting to be posted.
    pub fn queued(&self) -> usize {
        self.shared.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// True once the sink found no Kubernetes configuration.
    pub fn disabled(&self) -> bool {
        self.shared.disabled.load(Ordering::Relaxed)
    }
}

async fn client(opts: &EventsOptions) -> Result<kube::Client, String> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| e.to_string())?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

async fn run(shared: Arc<Shared>, opts: EventsOptions) {
    let client = match client(&opts).await {
        Ok(c) => c,
        Err(error) => {
            shared.disabled.store(true, Ordering::Relaxed);
            if let Ok(mut q) = shared.queue.lock() {
                q.clear();
            }
            tracing::warn!(%error, "no Kubernetes configuration: events are disabled");
            return;
        }
    };
    let mut poster = Poster {
        client,
        opts,
        series: HashMap::new(),
        pending: None,
    };
    let mut backoff = poster.opts.initial_backoff;
    let mut trouble = Trouble::default();
    loop {
        let next = shared.queue.lock().ok().and_then(|q| q.front().cloned());
        let Some(ev) = next else {
            shared.notify.notified().await;
            continue;
        };
        match poster.post(&ev).await {
            Ok(created) => {
                let counter = if created {
                    &shared.stats.created
                } else {
                    &shared.stats.patched
                };
                counter.fetch_add(1, Ordering::Relaxed);
                pop_if_front(&shared, &ev);
                backoff = poster.opts.initial_backoff;
                trouble.resolved(&shared);
            }
            Err(Failure::Forbidden {
                code,
                verb,
                namespace,
                error,
            }) => {
                shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                shared.stats.forbidden.fetch_add(1, Ordering::Relaxed);
                pop_if_front(&shared, &ev);
                if !trouble.forbidden {
                    trouble.forbidden = true;
                    if code == 401 {
                        tracing::warn!(
                            code,
                            verb,
                            resource = "events",
                            namespace = %namespace,
                            %error,
                            "the API server does not accept this agent's credentials; events are dropped until it does"
                        );
                    } else {
                        tracing::warn!(
                            code,
                            verb,
                            resource = "events",
                            group = "",
                            namespace = %namespace,
                            %error,
                            "the API server forbids posting events: the ClusterRole system:oomguard must allow create, patch and update on events in the core group; events are dropped until it does"
                        );
                    }
                } else {
                    tracing::debug!(code, verb, namespace = %namespace, %error, "event refused (forbidden)");
                }
                // Do not hammer the server with the rest of the queue while RBAC is wrong.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(poster.opts.max_backoff);
            }
            Err(Failure::Permanent(error)) => {
                shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = ev.reason.as_str(), %error, "event refused by the API server");
                pop_if_front(&shared, &ev);
            }
            Err(Failure::Retry(error)) => {
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                if trouble.failing_since.is_none() {
                    trouble.failing_since = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        %error,
                        queued = shared.queue.lock().map(|q| q.len()).unwrap_or(0),
                        "cannot post events: retrying with back-off until the API server answers (kills do not wait on it)"
                    );
                } else {
                    tracing::debug!(%error, ?backoff, "posting the event failed; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(poster.opts.max_backoff);
            }
        }
    }
}

/// What has been logged about the API server refusing or failing, so that each trouble
/// is logged once when it starts and once when it ends.
#[derive(Default)]
struct Trouble {
    failing_since: Option<tokio::time::Instant>,
    forbidden: bool,
}

impl Trouble {
    /// An event went through.
    fn resolved(&mut self, shared: &Shared) {
        let since = self.failing_since.take();
        let forbidden = std::mem::take(&mut self.forbidden);
        if since.is_some() || forbidden {
            let st = &shared.stats;
            tracing::info!(
                failing_ms = since.map(|s| s.elapsed().as_millis() as u64),
                was_forbidden = forbidden,
                retries = st.retries.load(Ordering::Relaxed),
                dropped = st.dropped.load(Ordering::Relaxed),
                forbidden = st.forbidden.load(Ordering::Relaxed),
                "the API server takes events again"
            );
        }
    }
}

/// Removes `ev` from the queue's front unless it was already dropped for room.
fn pop_if_front(shared: &Shared, ev: &EventRequest) {
    if let Ok(mut q) = shared.queue.lock()
        && q.front() == Some(ev)
    {
        q.pop_front();
    }
}

enum Failure {
    Retry(String),
    /// 401/403: this agent may not `verb` events in `namespace`.
    Forbidden {
        code: u16,
        verb: &'static str,
        namespace: String,
        error: String,
    },
    Permanent(String),
}

fn classify(e: kube::Error, verb: &'static str, namespace: &str) -> Failure {
    match &e {
        kube::Error::Api(s) => {
            // The server's own words, not kube's debug rendering of the whole Status.
            let error = format!("HTTP {} {}: {}", s.code, s.reason, s.message);
            match s.code {
                429 | 500.. => Failure::Retry(error),
                401 | 403 => Failure::Forbidden {
                    code: s.code,
                    verb,
                    namespace: namespace.to_string(),
                    error,
                },
                _ => Failure::Permanent(error),
            }
        }
        _ => Failure::Retry(crate::error_line(&e)),
    }
}

/// What was posted for one (object, reason): the series a repeat extends.
struct Series {
    name: String,
    count: i32,
}

/// A create that has been sent at least once without a definite answer.
struct Pending {
    request: EventRequest,
    name: String,
}

struct Poster {
    client: kube::Client,
    opts: EventsOptions,
    series: HashMap<(Involved, Reason), Series>,
    pending: Option<Pending>,
}

/// Bound on the remembered series (the oldest are simply forgotten: a repeat then
/// creates a new event, as after a restart).
const SERIES_LIMIT: usize = 4096;

impl Poster {
    /// Posts one request: Ok(true) when an event was created, Ok(false) when patched.
    async fn post(&mut self, ev: &EventRequest) -> Result<bool, Failure> {
        let ns = ev.object.event_namespace();
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let key = (ev.object.clone(), ev.reason);
        let t = self.opts.request_timeout;
        if let Some(series) = self.series.get(&key) {
            let patch = serde_json::json!({
                "count": series.count + 1,
                "lastTimestamp": Time(ev.at),
                "message": ev.message,
            });
            let res = tokio::time::timeout(
                t,
                api.patch(
                    &series.name,
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                ),
            )
            .await
            .map_err(|_| Failure::Retry(format!("no answer within {t:?}")))?;
            match res {
                Ok(_) => {
                    if let Some(s) = self.series.get_mut(&key) {
                        s.count += 1;
                    }
                    return Ok(false);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.series.remove(&key);
                }
                Err(e) => return Err(classify(e, "patch", ns)),
            }
        }
        // A retry of the same request keeps the name of its first attempt.
        let retried = self
            .pending
            .as_ref()
            .filter(|p| p.request == *ev)
            .map(|p| p.name.clone());
        let is_retry = retried.is_some();
        let name = retried.unwrap_or_else(|| {
            format!(
                "{}.{:x}",
                ev.object.name(),
                jiff::Timestamp::now().as_nanosecond()
            )
        });
        self.pending = Some(Pending {
            request: ev.clone(),
            name: name.clone(),
        });
        let event = self.event(ev, &name);
        let res = tokio::time::timeout(t, api.create(&PostParams::default(), &event))
            .await
            .map_err(|_| Failure::Retry(format!("no answer within {t:?}")))?;
        match res {
            Ok(_) => {}
            // Our earlier attempt landed; its answer was lost.
            Err(kube::Error::Api(s)) if s.code == 409 && is_retry => {}
            // A name collision: the next attempt takes a new name (new nanos).
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.pending = None;
                return Err(Failure::Retry(format!("event {name} already exists")));
            }
            Err(e) => {
                let f = classify(e, "create", ns);
                if !matches!(f, Failure::Retry(_)) {
                    self.pending = None;
                }
                return Err(f);
            }
        }
        self.pending = None;
        if self.series.len() >= SERIES_LIMIT {
            self.series.clear();
        }
        self.series.insert(key, Series { name, count: 1 });
        Ok(true)
    }

    fn event(&self, ev: &EventRequest, name: &str) -> Event {
        Event {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(ev.object.event_namespace().to_string()),
                ..Default::default()
            },
            involved_object: ev.object.reference(),
            reason: Some(ev.reason.as_str().into()),
            message: Some(ev.message.clone()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: Some(self.opts.node_name.clone()),
            }),
            first_timestamp: Some(Time(ev.at)),
            last_timestamp: Some(Time(ev.at)),
            count: Some(1),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.opts.node_name.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_upstream_names() {
        assert_eq!(Reason::KillContainer.as_str(), "OomGuardKillContainer");
        assert_eq!(Reason::KillProcess.as_str(), "OomGuardKillProcess");
        assert_eq!(Reason::CgroupOom.as_str(), "CgroupOOM");
    }

    #[test]
    fn pod_references_carry_the_container_field_path() {
        let pod = PodRef {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "u1".into(),
            container: Some("app".into()),
        };
        let r = Involved::from_pod(&pod).reference();
        assert_eq!(r.kind.as_deref(), Some("Pod"));
        assert_eq!(r.namespace.as_deref(), Some("shop"));
        assert_eq!(r.field_path.as_deref(), Some("spec.containers{app}"));
        let node = Involved::Node { name: "n1".into() };
        assert_eq!(node.event_namespace(), "default");
        assert_eq!(node.reference().namespace, None);
        assert_eq!(node.reference().kind.as_deref(), Some("Node"));
    }
}
