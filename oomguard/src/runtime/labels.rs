//! What a container is, from its labels: CRI labels on containerd's containers (namespace
//! `k8s.io`), docker's labels from `<docker-root>/containers/<id>/config.v2.json` (namespace
//! `moby`: docker's containerd containers carry no Kubernetes labels).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::RuntimeError;

pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// containerd's CRI plugin: `sandbox` or `container`.
pub const CRI_KIND: &str = "io.cri-containerd.kind";
/// dockershim / cri-dockerd: `podsandbox` or `container`.
pub const DOCKER_TYPE: &str = "io.kubernetes.docker.type";

/// Where docker keeps its state on a standard node.
pub const DEFAULT_DOCKER_ROOT: &str = "/var/lib/docker";

/// Sandbox (the pod's pause container), an application container, or not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    Sandbox,
    Container,
    Unknown,
}

/// The pod a container belongs to: what an Event's involvedObject needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The container's name in the pod spec (`spec.containers{name}`), when known.
    pub container: Option<String>,
}

/// A container as the agent knows it: id, kind, pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContainerInfo {
    pub id: String,
    /// The containerd namespace it was found in (`k8s.io`, `moby`).
    pub namespace: String,
    pub kind: ContainerKind,
    pub pod: Option<PodRef>,
}

impl ContainerInfo {
    /// From a label map (CRI or docker labels; both carry the `io.kubernetes.*` names).
    ///
    /// The kind comes only from the label the runtime of `namespace` sets itself: containerd's
    /// CRI plugin copies the image's labels into the container's (its own labels override
    /// them), and so does docker, so an image could carry the other runtime's kind label.
    pub fn from_labels(id: &str, namespace: &str, labels: &HashMap<String, String>) -> Self {
        let (key, sandbox) = if namespace == super::MOBY {
            (DOCKER_TYPE, "podsandbox")
        } else {
            (CRI_KIND, "sandbox")
        };
        let kind = match labels.get(key).map(String::as_str) {
            Some(k) if k == sandbox => ContainerKind::Sandbox,
            Some("container") => ContainerKind::Container,
            _ => ContainerKind::Unknown,
        };
        let pod = match (
            labels.get(POD_NAMESPACE),
            labels.get(POD_NAME),
            labels.get(POD_UID),
        ) {
            (Some(ns), Some(name), Some(uid)) => Some(PodRef {
                namespace: ns.clone(),
                name: name.clone(),
                uid: uid.clone(),
                container: labels
                    .get(CONTAINER_NAME)
                    .filter(|_| kind != ContainerKind::Sandbox)
                    .cloned(),
            }),
            _ => None,
        };
        ContainerInfo {
            id: id.to_string(),
            namespace: namespace.to_string(),
            kind,
            pod,
        }
    }
}

/// `<docker_root>/containers/<id>/config.v2.json`.
pub fn docker_config_path(docker_root: &Path, id: &str) -> PathBuf {
    docker_root
        .join("containers")
        .join(id)
        .join("config.v2.json")
}

/// `Config.Labels` of docker's `config.v2.json` for container `id`.
pub fn read_docker_labels(
    docker_root: &Path,
    id: &str,
) -> Result<HashMap<String, String>, RuntimeError> {
    let path = docker_config_path(docker_root, id);
    let text = std::fs::read_to_string(&path).map_err(|source| RuntimeError::DockerConfig {
        path: path.clone(),
        source: source.into(),
    })?;
    parse_docker_labels(&text).map_err(|source| RuntimeError::DockerConfig {
        path,
        source: source.into(),
    })
}

/// `Config.Labels` of the text of a `config.v2.json`; none when the file has no labels.
pub fn parse_docker_labels(text: &str) -> Result<HashMap<String, String>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct V2 {
        #[serde(rename = "Config")]
        config: Option<Cfg>,
    }
    #[derive(serde::Deserialize)]
    struct Cfg {
        #[serde(rename = "Labels")]
        labels: Option<HashMap<String, String>>,
    }
    let v2: V2 = serde_json::from_str(text)?;
    Ok(v2.config.and_then(|c| c.labels).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_labels_name_the_pod_and_the_container() {
        let l = labels(&[
            (POD_NAME, "web-0"),
            (POD_NAMESPACE, "shop"),
            (POD_UID, "u-1"),
            (CONTAINER_NAME, "app"),
            (CRI_KIND, "container"),
        ]);
        let c = ContainerInfo::from_labels("abc", "k8s.io", &l);
        assert_eq!(c.kind, ContainerKind::Container);
        assert_eq!(
            c.pod,
            Some(PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u-1".into(),
                container: Some("app".into()),
            })
        );
    }

    #[test]
    fn sandboxes_are_recognised_in_both_runtimes() {
        let cri = labels(&[(CRI_KIND, "sandbox"), (CONTAINER_NAME, "POD")]);
        assert_eq!(
            ContainerInfo::from_labels("a", "k8s.io", &cri).kind,
            ContainerKind::Sandbox
        );
        let docker = labels(&[
            (DOCKER_TYPE, "podsandbox"),
            (POD_NAME, "p"),
            (POD_NAMESPACE, "n"),
            (POD_UID, "u"),
            (CONTAINER_NAME, "POD"),
        ]);
        let c = ContainerInfo::from_labels("a", "moby", &docker);
        assert_eq!(c.kind, ContainerKind::Sandbox);
        assert_eq!(c.pod.and_then(|p| p.container), None);
        assert_eq!(
            ContainerInfo::from_labels("a", "moby", &labels(&[])).kind,
            ContainerKind::Unknown
        );
    }

    #[test]
    fn an_image_cannot_pass_for_a_sandbox_with_the_other_runtimes_label() {
        // CRI: the image's labels come first, the plugin's own kind label last.
        let cri = labels(&[(CRI_KIND, "container"), (DOCKER_TYPE, "podsandbox")]);
        assert_eq!(
            ContainerInfo::from_labels("a", "k8s.io", &cri).kind,
            ContainerKind::Container
        );
        let docker = labels(&[(DOCKER_TYPE, "container"), (CRI_KIND, "sandbox")]);
        assert_eq!(
            ContainerInfo::from_labels("a", "moby", &docker).kind,
            ContainerKind::Container
        );
        assert_eq!(
            ContainerInfo::from_labels("a", "k8s.io", &labels(&[(DOCKER_TYPE, "podsandbox")])).kind,
            ContainerKind::Unknown
        );
    }

    #[test]
    fn docker_config_v2_labels_are_read() {
        let dir = std::env::temp_dir().join(format!("oomguard-labels-{}", std::process::id()));
        let id = "f".repeat(64);
        let file = docker_config_path(&dir, &id);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(
            &file,
            r#"{"ID":"x","Config":{"Hostname":"h","Labels":{"io.kubernetes.docker.type":"container","io.kubernetes.pod.name":"p"}}}"#,
        )
        .unwrap();
        let got = read_docker_labels(&dir, &id);
        let missing = read_docker_labels(&dir, "nope");
        std::fs::remove_dir_all(&dir).unwrap();
        let got = got.unwrap();
        assert_eq!(got[DOCKER_TYPE], "container");
        assert_eq!(got[POD_NAME], "p");
        assert!(matches!(missing, Err(RuntimeError::DockerConfig { .. })));
    }
}
