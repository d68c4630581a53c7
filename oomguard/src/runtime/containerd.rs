//! The containerd calls the agent makes, over a unix socket with tonic: get a container
//! (labels) and kill its task. Every call is bounded by the caller's deadline; channels are
//! lazy, so a missing socket costs one failed `connect(2)`, never a wait.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{GetContainerRequest, KillRequest};
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tonic::{Code, Request};

use super::RuntimeError;

/// The gRPC metadata key containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// A lazy channel to `socket`: connecting happens on the first call, and again after the
/// connection breaks.
pub(super) fn channel(socket: &Path) -> Result<Channel, RuntimeError> {
    let path = socket.to_path_buf();
    let endpoint = TonicEndpoint::try_from("http://[::]")
        .map_err(|e| RuntimeError::Unreachable {
            socket: path.clone(),
            source: e.into(),
        })?
        .connect_timeout(Duration::from_millis(500));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        })),
    )
}

fn request<T>(msg: T, namespace: &str) -> Result<Request<T>, RuntimeError> {
    let mut req = Request::new(msg);
    let value = namespace
        .parse()
        .map_err(|_| RuntimeError::Namespace(namespace.to_string()))?;
    req.metadata_mut().insert(NAMESPACE_HEADER, value);
    Ok(req)
}

fn rpc_error(socket: &Path, status: tonic::Status) -> RuntimeError {
    // Transport failures (no socket, refused, reset) come back as Unavailable/Unknown.
    if matches!(status.code(), Code::Unavailable) {
        RuntimeError::Unreachable {
            socket: socket.to_path_buf(),
            source: Box::new(status),
        }
    } else {
        RuntimeError::Rpc {
            socket: socket.to_path_buf(),
            status: Box::new(status),
        }
    }
}

/// `Containers.Get`: the container's labels, or `None` when this namespace does not have it.
pub(super) async fn container_labels(
    channel: Channel,
    socket: &Path,
    namespace: &str,
    id: &str,
) -> Result<Option<HashMap<String, String>>, RuntimeError> {
    let mut client = ContainersClient::new(channel);
    let req = request(GetContainerRequest { id: id.to_string() }, namespace)?;
    match client.get(req).await {
        Ok(resp) => Ok(Some(
            resp.into_inner()
                .container
                .map(|c| c.labels)
                .unwrap_or_default(),
        )),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(rpc_error(socket, s)),
    }
}

/// `Version.Version`: the cheapest call there is, to probe an endpoint marked unhealthy.
/// Any answer, even an error status, means containerd is there and serving.
pub(super) async fn version(channel: Channel, socket: &Path) -> Result<(), RuntimeError> {
    match VersionClient::new(channel).version(Request::new(())).await {
        Ok(_) => Ok(()),
        Err(s) => Err(rpc_error(socket, s)),
    }
}

/// What containerd said to the kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KillAck {
    /// SIGKILL was delivered to every process of the task.
    Signalled,
    /// The task had already exited (or was never started): nothing left to kill.
    AlreadyStopped,
}

/// `Tasks.Kill{container_id, exec_id: "", signal: SIGKILL, all: true}`.
pub(super) async fn kill_task(
    channel: Channel,
    socket: &Path,
    namespace: &str,
    id: &str,
) -> Result<KillAck, RuntimeError> {
    let mut client = TasksClient::new(channel);
    let req = request(
        KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: libc::SIGKILL as u32,
            all: true,
        },
        namespace,
    )?;
    match client.kill(req).await {
        Ok(_) => Ok(KillAck::Signalled),
        // containerd answers NotFound for "no running task" and "process already finished".
        Err(s) if s.code() == Code::NotFound => Ok(KillAck::AlreadyStopped),
        Err(s) => Err(rpc_error(socket, s)),
    }
}

/// One containerd endpoint: a socket and the namespace the agent looks in there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub socket: PathBuf,
    pub namespace: String,
}

impl Endpoint {
    /// docker's containerd (`--docker-containerd-sock`): namespace `moby`.
    pub fn docker(socket: impl Into<PathBuf>) -> Self {
        Endpoint {
            socket: socket.into(),
            namespace: MOBY.into(),
        }
    }

    /// containerd with its CRI plugin (`--containerd-sock`): namespace `k8s.io`.
    pub fn containerd(socket: impl Into<PathBuf>) -> Self {
        Endpoint {
            socket: socket.into(),
            namespace: K8S_IO.into(),
        }
    }

    pub fn is_docker(&self) -> bool {
        self.namespace == MOBY
    }
}

pub const MOBY: &str = "moby";
pub const K8S_IO: &str = "k8s.io";
