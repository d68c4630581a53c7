//! The container policy's runtime side: from the cgroup whose threshold fired to one
//! container, and killing that whole container through containerd.
//!
//! - [`layout`]: cgroup path → pod or container (both kubelet cgroup drivers), pure.
//! - [`labels`]: CRI labels and docker's `config.v2.json` → pod, container name, sandbox or not.
//! - [`choose`]: which container of a pod to kill (the rule is documented there), pure.
//! - [`RuntimeClient`]: a blocking facade over containerd (two endpoints: docker's, namespace
//!   `moby`, and containerd's, namespace `k8s.io`) for the guard's kill workers, which are
//!   not tokio threads. It owns a small current-thread tokio runtime on its own thread; every blocking
//!   call returns within its timeout whatever the socket does (missing, refusing, hung).
//! - [`fallback`]: killing a container cgroup's tasks directly when containerd cannot do it.
//! - [`health`]: an endpoint that hung or refused is marked unhealthy for a back-off and
//!   not asked again until a background probe gets an answer, so only the first kill of an
//!   outage pays the runtime's budgets; the transitions are logged once each (`endpoints`:
//!   the client's side of it, the notes and the probe).
//! - `plan`: from the cgroup whose threshold fired to the container to kill
//!   ([`RuntimeClient::plan_blocking`]).
//!
//! A kill worker's worst case per kill (the guard thread never waits on the runtime; the
//! cgroup is "acting" meanwhile): when an endpoint starts to hang, one kill waits
//! at most the plan budget (250 ms) plus the kill RPC budget (500 ms), each with a 20 ms
//! backstop; every kill after it, until a probe gets an answer, waits on no runtime at all
//! (one mutex lookup), and goes to the fallback.

pub mod choose;
mod containerd;
mod endpoints;
pub mod fallback;
pub mod health;
pub mod labels;
pub mod layout;
mod plan;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tonic::transport::Channel;

pub use self::choose::{ChildContainer, choose_container, looks_like_sandbox};
pub use self::containerd::{Endpoint, K8S_IO, KillAck, MOBY};
use self::endpoints::{EndpointState, Seen};
pub use self::fallback::{FallbackKill, FallbackReport, fallback_kill_cgroup_tasks};
use self::health::MIN_JUDGED;
pub use self::health::{Backoff, Health};
pub use self::labels::{ContainerInfo, ContainerKind, DEFAULT_DOCKER_ROOT, PodRef};
pub use self::layout::{CgroupRole, Qos, RuntimeHint, parse_cgroup};
use self::plan::container_children;
use crate::cgroup::MemCgroup;

/// The longest any single containerd call may take.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Resolved containers remembered (labels never change during a container's life).
const CACHE_LIMIT: usize = 4096;

/// Each endpoint's own call gives up this much before the caller's deadline, so that its
/// timeout (which marks the endpoint unhealthy), not the caller's, is the one that fires.
const RESOLVE_MARGIN: Duration = Duration::from_millis(10);

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("no containerd socket is present (looked for {0})")]
    NoRuntime(String),
    #[error("cannot reach containerd at {socket}")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("containerd ({what}) did not answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("containerd at {socket} refused the call")]
    Rpc {
        socket: PathBuf,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error(
        "containerd at {socket} is marked unhealthy ({why}); not asked until a background probe gets an answer"
    )]
    Unhealthy { socket: PathBuf, why: String },
    #[error("container {id} is not known to any containerd endpoint")]
    NotFound { id: String },
    #[error("invalid containerd namespace {0:?}")]
    Namespace(String),
    #[error("{cgroup} holds no container that may be killed: {why}")]
    NoContainer { cgroup: PathBuf, why: String },
    #[error("container {id} still has {tasks} task(s) {after:?} after the kill")]
    NotStopped {
        id: String,
        tasks: usize,
        after: Duration,
    },
    #[error("cannot read docker's container config {path}")]
    DockerConfig {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the runtime client thread")]
    Setup(#[source] std::io::Error),
    #[error("the runtime client thread is gone")]
    Gone,
}

impl RuntimeError {
    /// The runtime could not be asked in time (missing, unreachable, hung): the caller
    /// should fall back to killing the cgroup's tasks itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            RuntimeError::NoRuntime(_)
                | RuntimeError::Unreachable { .. }
                | RuntimeError::Timeout { .. }
                | RuntimeError::Unhealthy { .. }
                | RuntimeError::Gone
        )
    }
}

/// Where the runtimes are and how long a call may take.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Asked in this order when a cgroup's layout does not say which runtime owns it.
    pub endpoints: Vec<Endpoint>,
    /// docker's data root (`--docker-root`), for `containers/<id>/config.v2.json`.
    pub docker_root: PathBuf,
    /// Bound on each containerd call (at most 1 s is sensible: the kill waits on it).
    pub call_timeout: Duration,
    /// How long an endpoint that hung or refused is left alone before it is probed again.
    pub unhealthy: Backoff,
}

impl RuntimeConfig {
    /// The agent's two endpoints: docker's containerd (`moby`) and containerd (`k8s.io`).
    pub fn new(
        docker_containerd_sock: impl Into<PathBuf>,
        containerd_sock: impl Into<PathBuf>,
        docker_root: impl Into<PathBuf>,
    ) -> Self {
        RuntimeConfig {
            endpoints: vec![
                Endpoint::docker(docker_containerd_sock),
                Endpoint::containerd(containerd_sock),
            ],
            docker_root: docker_root.into(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            unhealthy: Backoff::default(),
        }
    }
}

/// The container chosen for a threshold signal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// The cgroup whose threshold fired (a pod's or a container's).
    pub fired: PathBuf,
    /// The victim container's cgroup.
    pub cgroup: PathBuf,
    pub id: String,
    pub hint: RuntimeHint,
    /// What the runtime (or docker's config file) says about it; `None` when it could not
    /// be asked in time: then only the fallback can kill it.
    pub info: Option<ContainerInfo>,
    /// `memory.usage_in_bytes` of the victim's cgroup when it was chosen.
    pub usage: u64,
    /// Why this container (for the log and the Event).
    pub reason: String,
    /// Why the runtime could not say what the container is, when it could not.
    pub runtime_error: Option<String>,
}

impl Target {
    pub fn pod(&self) -> Option<&PodRef> {
        self.info.as_ref().and_then(|i| i.pod.as_ref())
    }
}

/// A container killed through containerd.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KillReport {
    pub id: String,
    pub namespace: String,
    pub socket: PathBuf,
    pub cgroup: PathBuf,
    pub ack: KillAck,
    /// From the kill request to containerd's answer, in microseconds.
    pub rpc_us: u64,
    /// From the kill request to the container cgroup holding no task, in microseconds.
    pub gone_us: u64,
}

/// Counters of the client, for logs and metrics.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Calls that did not answer within their bound.
    pub timeouts: AtomicU64,
    /// Calls that could not connect (no socket, refused, reset).
    pub unreachable: AtomicU64,
    /// Calls not made because their endpoint was marked unhealthy.
    pub skipped_unhealthy: AtomicU64,
    /// Background probes of unhealthy endpoints.
    pub probes: AtomicU64,
    /// Containers a kill (or a report) had to ask the runtime about because no prefetch (at
    /// arm, at mkdir) had cached them: each is a round trip the caller waited for.
    pub uncached_lookups: AtomicU64,
}

/// One endpoint as the client sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    pub endpoint: Endpoint,
    pub healthy: bool,
    /// How long it has been unhealthy.
    pub unhealthy_for: Option<Duration>,
    /// The last failure, while unhealthy.
    pub why: Option<String>,
}

struct Inner {
    cfg: RuntimeConfig,
    channels: Mutex<Vec<Option<Channel>>>,
    cache: Mutex<HashMap<String, ContainerInfo>>,
    endpoints: Mutex<Vec<EndpointState>>,
    /// Logged that no endpoint's socket is present (until one is).
    none_present: AtomicBool,
    stats: RuntimeStats,
    /// The client thread's runtime, for probes started from the guard's threads.
    handle: tokio::runtime::Handle,
}

/// containerd, callable from a plain thread. See the module docs.
pub struct RuntimeClient {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeClient {
    /// Starts the client thread. Connects to nothing yet: sockets are dialled on first use,
    /// and a missing socket is normal (a node runs one runtime).
    pub fn new(cfg: RuntimeConfig) -> Result<Self, RuntimeError> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (htx, hrx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("oomguard-runtime".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = htx.send(Err(e));
                        return;
                    }
                };
                let _ = htx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(RuntimeError::Setup)?;
        let handle = hrx
            .recv()
            .map_err(|_| RuntimeError::Gone)?
            .map_err(RuntimeError::Setup)?;
        let n = cfg.endpoints.len();
        Ok(RuntimeClient {
            inner: Arc::new(Inner {
                cfg,
                channels: Mutex::new(vec![None; n]),
                cache: Mutex::new(HashMap::new()),
                endpoints: Mutex::new(
                    (0..n)
                        .map(|_| EndpointState {
                            health: Health::Healthy,
                            probing: false,
                        })
                        .collect(),
                ),
                none_present: AtomicBool::new(false),
                stats: RuntimeStats::default(),
                handle: handle.clone(),
            }),
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> &RuntimeStats {
        &self.inner.stats
    }

    /// Each endpoint's health, in configuration order.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        let Ok(eps) = self.inner.endpoints.lock() else {
            return Vec::new();
        };
        self.inner
            .cfg
            .endpoints
            .iter()
            .zip(eps.iter())
            .map(|(e, s)| match &s.health {
                Health::Healthy => EndpointStatus {
                    endpoint: e.clone(),
                    healthy: true,
                    unhealthy_for: None,
                    why: None,
                },
                Health::Unhealthy { since, why, .. } => EndpointStatus {
                    endpoint: e.clone(),
                    healthy: false,
                    unhealthy_for: Some(now.saturating_duration_since(*since)),
                    why: Some(why.clone()),
                },
            })
            .collect()
    }

    /// Runs `fut` on the client thread and waits for it at most `timeout`.
    fn block<T: Send + 'static>(
        &self,
        what: &str,
        timeout: Duration,
        fut: impl Future<Output = Result<T, RuntimeError>> + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let what2 = what.to_string();
        self.handle.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(RuntimeError::Timeout {
                    what: what2,
                    after: timeout,
                }),
            };
            let _ = tx.send(r);
        });
        // The task above gives up at `timeout`; this is the backstop should the client
        // thread itself be stuck.
        match rx.recv_timeout(timeout + Duration::from_millis(20)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(RuntimeError::Timeout {
                what: what.to_string(),
                after: timeout,
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(RuntimeError::Gone),
        }
    }

    /// What the runtime says about container `id` (cached once known).
    pub fn resolve_blocking(
        &self,
        id: &str,
        hint: RuntimeHint,
        timeout: Duration,
    ) -> Result<ContainerInfo, RuntimeError> {
        // Cached, or nobody to ask: answered here, without a round trip to the client
        // thread, which can cost 100 ms on a busy node.
        if let Some(known) = self.inner.known(id, hint).transpose() {
            return known;
        }
        self.inner
            .stats
            .uncached_lookups
            .fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let id = id.to_string();
        self.block(&format!("resolve {id}"), timeout, async move {
            inner.resolve(&id, hint, timeout).await
        })
    }

    /// Resolves, in the background, the containers a cgroup's path names (itself or, for a
    /// pod, its children), so a later kill finds them cached. Never blocks.
    pub fn prefetch(&self, cgroup: &Path) {
        let ids: Vec<(String, RuntimeHint)> = match parse_cgroup(&cgroup.to_string_lossy()) {
            CgroupRole::Container { id, hint, .. } => vec![(id, hint)],
            CgroupRole::Pod { .. } => container_children(cgroup)
                .into_iter()
                .map(|(_, id, hint)| (id, hint))
                .collect(),
            CgroupRole::Other => return,
        };
        for (id, hint) in ids {
            let inner = self.inner.clone();
            let t = inner.cfg.call_timeout;
            self.handle.spawn(async move {
                let _ = tokio::time::timeout(t, inner.resolve(&id, hint, t)).await;
            });
        }
    }

    /// Kills `target`'s whole container through containerd (`Tasks.Kill`, SIGKILL, all
    /// processes) and waits until its cgroup holds no task, all within `timeout`.
    /// An already-stopped task counts as done. On any error the caller falls back to
    /// [`fallback_kill_cgroup_tasks`] on `target.cgroup`.
    pub fn kill_container_blocking(
        &self,
        target: &Target,
        timeout: Duration,
    ) -> Result<KillReport, RuntimeError> {
        let start = Instant::now();
        let Some(info) = target.info.as_ref().filter(|i| !i.namespace.is_empty()) else {
            return Err(RuntimeError::NotFound {
                id: target.id.clone(),
            });
        };
        if info.kind == ContainerKind::Sandbox {
            return Err(RuntimeError::NoContainer {
                cgroup: target.cgroup.clone(),
                why: "it is the pod's sandbox (pause) container".into(),
            });
        }
        let Some(idx) = self
            .inner
            .cfg
            .endpoints
            .iter()
            .position(|e| e.namespace == info.namespace)
        else {
            return Err(RuntimeError::NotFound {
                id: target.id.clone(),
            });
        };
        let socket = self.inner.cfg.endpoints[idx].socket.clone();
        if let Some(e) = self.inner.unhealthy(idx) {
            self.inner
                .stats
                .skipped_unhealthy
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let inner = self.inner.clone();
        let (id, ns) = (info.id.clone(), info.namespace.clone());
        let rpc_timeout = self.inner.cfg.call_timeout.min(timeout);
        let ack = self.block(&format!("kill {id}"), rpc_timeout, async move {
            let ch = inner.channel(idx)?;
            let r = containerd::kill_task(ch, &inner.cfg.endpoints[idx].socket, &ns, &id).await;
            if r.as_ref().is_err_and(RuntimeError::is_unavailable) {
                inner.forget_channel(idx);
            }
            r
        });
        if matches!(ack, Err(RuntimeError::Timeout { .. })) {
            self.inner.forget_channel(idx);
        }
        // Recorded (and, on a change, logged) on the client thread, not this one.
        let (inner, seen) = (
            self.inner.clone(),
            Seen::of(&ack, rpc_timeout >= MIN_JUDGED),
        );
        self.handle.spawn(async move { inner.note(idx, seen) });
        let ack = ack?;
        let rpc_us = start.elapsed().as_micros() as u64;
        let cg = MemCgroup::new(&target.cgroup);
        let deadline = start + timeout;
        loop {
            let tasks = if cg.exists() {
                cg.subtree_procs().len()
            } else {
                0
            };
            if tasks == 0 {
                return Ok(KillReport {
                    id: info.id.clone(),
                    namespace: info.namespace.clone(),
                    socket,
                    cgroup: target.cgroup.clone(),
                    ack,
                    rpc_us,
                    gone_us: start.elapsed().as_micros() as u64,
                });
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::NotStopped {
                    id: info.id.clone(),
                    tasks,
                    after: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for RuntimeClient {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// The (lazy) channel to endpoint `idx`. Must run on the client's runtime.
    fn channel(&self, idx: usize) -> Result<Channel, RuntimeError> {
        let mut chans = self.channels.lock().map_err(|_| RuntimeError::Gone)?;
        if let Some(Some(ch)) = chans.get(idx) {
            return Ok(ch.clone());
        }
        let ch = containerd::channel(&self.cfg.endpoints[idx].socket)?;
        if let Some(slot) = chans.get_mut(idx) {
            *slot = Some(ch.clone());
        }
        Ok(ch)
    }

    /// Drops a channel that broke or hung, so the next call dials afresh.
    fn forget_channel(&self, idx: usize) {
        if let Ok(mut chans) = self.channels.lock()
            && let Some(slot) = chans.get_mut(idx)
        {
            *slot = None;
        }
    }

    /// Asks every endpoint the hint allows (at once) for container `id`; the first that has
    /// it answers. Each call is bounded by `call_timeout` and by `budget` (less a margin, so
    /// that a hung endpoint's own timeout fires and marks it). Endpoints marked unhealthy
    /// are not asked.
    async fn resolve(
        self: &Arc<Self>,
        id: &str,
        hint: RuntimeHint,
        budget: Duration,
    ) -> Result<ContainerInfo, RuntimeError> {
        if let Some(info) = self.cached(id) {
            return Ok(info);
        }
        let (asked, skipped) = self.calls_for(hint)?;
        let per_call = self
            .cfg
            .call_timeout
            .min(budget.saturating_sub(RESOLVE_MARGIN));
        let mut set = tokio::task::JoinSet::new();
        for idx in asked {
            let me = self.clone();
            let id = id.to_string();
            set.spawn(async move {
                let ep = &me.cfg.endpoints[idx];
                let ch = me.channel(idx)?;
                let got = match tokio::time::timeout(
                    per_call,
                    containerd::container_labels(ch, &ep.socket, &ep.namespace, &id),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(RuntimeError::Timeout {
                        what: format!("resolve at {}", ep.socket.display()),
                        after: per_call,
                    }),
                };
                if got.as_ref().is_err_and(RuntimeError::is_unavailable) {
                    me.forget_channel(idx);
                }
                me.note(idx, Seen::of(&got, per_call >= MIN_JUDGED));
                let Some(mut labels) = got? else {
                    return Ok(None);
                };
                if ep.is_docker()
                    && let Ok(docker) = labels::read_docker_labels(&me.cfg.docker_root, &id)
                {
                    labels.extend(docker);
                }
                Ok(Some(ContainerInfo::from_labels(
                    &id,
                    &ep.namespace,
                    &labels,
                )))
            });
        }
        let mut first_err = None;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(Some(info))) => {
                    if let Ok(mut c) = self.cache.lock() {
                        if c.len() >= CACHE_LIMIT {
                            c.clear();
                        }
                        c.insert(id.to_string(), info.clone());
                    }
                    return Ok(info);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(RuntimeError::Gone);
                }
            }
        }
        // An endpoint that was not asked may have it: say so rather than "not known".
        Err(first_err
            .or(skipped)
            .unwrap_or(RuntimeError::NotFound { id: id.to_string() }))
    }

    fn cached(&self, id: &str) -> Option<ContainerInfo> {
        self.cache.lock().ok().and_then(|c| c.get(id).cloned())
    }

    /// What can be said about container `id` without a call: cached (`Ok(Some)`), or no
    /// endpoint may be asked (`Err`: none present, or all marked unhealthy). `Ok(None)`: a
    /// call is needed. Cheap (a map lookup and a `stat` per socket); any thread.
    fn known(
        self: &Arc<Self>,
        id: &str,
        hint: RuntimeHint,
    ) -> Result<Option<ContainerInfo>, RuntimeError> {
        if let Some(info) = self.cached(id) {
            return Ok(Some(info));
        }
        self.calls_for(hint).map(|_| None)
    }

    /// The endpoints to ask for a container with this hint (present and healthy), and why
    /// one that may have it is not asked; `Err` when there is none to ask.
    fn calls_for(
        self: &Arc<Self>,
        hint: RuntimeHint,
    ) -> Result<(Vec<usize>, Option<RuntimeError>), RuntimeError> {
        let present: Vec<bool> = self
            .cfg
            .endpoints
            .iter()
            .map(|e| e.socket.exists())
            .collect();
        self.note_presence(present.iter().any(|p| *p));
        let candidates = self
            .cfg
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| match hint {
                RuntimeHint::Docker => e.is_docker(),
                RuntimeHint::Containerd => !e.is_docker(),
                RuntimeHint::Unknown => true,
            })
            .filter(|(i, _)| present[*i])
            .map(|(i, _)| i);
        let mut skipped = None;
        let mut asked = Vec::new();
        for idx in candidates {
            match self.unhealthy(idx) {
                Some(e) => {
                    skipped.get_or_insert(e);
                }
                None => asked.push(idx),
            }
        }
        match (asked.is_empty(), skipped) {
            (true, Some(e)) => {
                self.stats.skipped_unhealthy.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            (true, None) => Err(RuntimeError::NoRuntime(self.looked_for())),
            (false, skipped) => Ok((asked, skipped)),
        }
    }

    fn looked_for(&self) -> String {
        self.cfg
            .endpoints
            .iter()
            .map(|e| e.socket.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Logs (on the client thread) once when no endpoint's socket is present, and once when
    /// one is again. One missing socket is normal (a node runs one runtime); all of them
    /// missing is not.
    fn note_presence(&self, any: bool) {
        let looked_for = self.looked_for();
        if !any && !self.none_present.swap(true, Ordering::Relaxed) {
            self.handle.spawn(async move {
                tracing::warn!(
                    %looked_for,
                    "no containerd socket is present: containers are killed by killing their cgroup's tasks directly"
                );
            });
        } else if any && self.none_present.swap(false, Ordering::Relaxed) {
            self.handle.spawn(async move {
                tracing::info!(%looked_for, "a containerd socket is present again");
            });
        }
    }
}
