//! From a memory cgroup path to what kubelet made it for: a pod, one of its containers, or
//! something else. Pure string work over both cgroup drivers' layouts:
//!
//! - cgroupfs: `kubepods[/burstable|/besteffort]/pod<uid>[/<64-hex id>]`
//! - systemd: `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid>.slice`
//!   `[/docker-<id>.scope | /cri-containerd-<id>.scope]`, where the uid's `-` are written `_`.
//!
//! `kubepods` may sit anywhere in the path (nodes nest it, and the tests build it beneath
//! their own cgroup); the first `kubepods` component anchors the parse.

use std::fmt;

/// The pod's QoS class, from the level between `kubepods` and the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Which containerd endpoint a container id belongs to, when the layout says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeHint {
    /// `docker-<id>.scope`: docker's containerd (namespace `moby`).
    Docker,
    /// `cri-containerd-<id>.scope`: containerd's CRI plugin (namespace `k8s.io`).
    Containerd,
    /// cgroupfs driver: the path does not say; ask every endpoint.
    Unknown,
}

/// What a memory cgroup is, as far as its path tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupRole {
    Pod {
        uid: String,
        qos: Qos,
    },
    Container {
        pod_uid: String,
        id: String,
        hint: RuntimeHint,
    },
    Other,
}

impl fmt::Display for CgroupRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupRole::Pod { uid, .. } => write!(f, "pod {uid}"),
            CgroupRole::Container { pod_uid, id, .. } => {
                write!(f, "container {id} of pod {pod_uid}")
            }
            CgroupRole::Other => f.write_str("not a pod or container cgroup"),
        }
    }
}

/// Parses a cgroup path (absolute or relative to the hierarchy's root; only the components
/// from `kubepods` on matter).
pub fn parse_cgroup(path: &str) -> CgroupRole {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(i) = parts.iter().position(|p| *p == "kubepods") {
        parse_cgroupfs(&parts[i + 1..])
    } else if let Some(i) = parts.iter().position(|p| *p == "kubepods.slice") {
        parse_systemd(&parts[i + 1..])
    } else {
        CgroupRole::Other
    }
}

fn parse_cgroupfs(rest: &[&str]) -> CgroupRole {
    let (qos, rest) = match rest.first() {
        Some(&"burstable") => (Qos::Burstable, &rest[1..]),
        Some(&"besteffort") => (Qos::BestEffort, &rest[1..]),
        _ => (Qos::Guaranteed, rest),
    };
    let Some(uid) = rest
        .first()
        .and_then(|p| p.strip_prefix("pod"))
        .filter(|u| is_uid(u))
    else {
        return CgroupRole::Other;
    };
    match rest.get(1..) {
        Some([]) => CgroupRole::Pod {
            uid: uid.to_string(),
            qos,
        },
        Some([id]) if is_container_id(id) => CgroupRole::Container {
            pod_uid: uid.to_string(),
            id: id.to_string(),
            hint: RuntimeHint::Unknown,
        },
        _ => CgroupRole::Other,
    }
}

fn parse_systemd(rest: &[&str]) -> CgroupRole {
    let (qos, rest, prefix) = match rest.first() {
        Some(&"kubepods-burstable.slice") => (Qos::Burstable, &rest[1..], "kubepods-burstable-pod"),
        Some(&"kubepods-besteffort.slice") => {
            (Qos::BestEffort, &rest[1..], "kubepods-besteffort-pod")
        }
        _ => (Qos::Guaranteed, rest, "kubepods-pod"),
    };
    let Some(uid) = rest
        .first()
        .and_then(|p| p.strip_prefix(prefix))
        .and_then(|p| p.strip_suffix(".slice"))
        .map(|u| u.replace('_', "-"))
        .filter(|u| is_uid(u))
    else {
        return CgroupRole::Other;
    };
    match rest.get(1..) {
        Some([]) => CgroupRole::Pod { uid, qos },
        Some([scope]) => {
            let Some(unit) = scope.strip_suffix(".scope") else {
                return CgroupRole::Other;
            };
            let (hint, id) = if let Some(id) = unit.strip_prefix("docker-") {
                (RuntimeHint::Docker, id)
            } else if let Some(id) = unit.strip_prefix("cri-containerd-") {
                (RuntimeHint::Containerd, id)
            } else {
                return CgroupRole::Other;
            };
            if !is_container_id(id) {
                return CgroupRole::Other;
            }
            CgroupRole::Container {
                pod_uid: uid,
                id: id.to_string(),
                hint,
            }
        }
        _ => CgroupRole::Other,
    }
}

/// A pod uid: a UUID in practice; static pods use a 32-hex config hash.
fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// docker and containerd's CRI both name containers with 64 lowercase hex digits.
pub fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4b1e3c7f9a2d5e8b0c6f1a4d7e9b2c5f8a1d4e7b0c3f6a9d2e5b8c1f4a7d0e3b";
    const UID: &str = "8a6c2f0e-51b4-4c3e-9d7a-2b1f0e9c8d7a";

    fn container(uid: &str, hint: RuntimeHint) -> CgroupRole {
        CgroupRole::Container {
            pod_uid: uid.into(),
            id: ID.into(),
            hint,
        }
    }

    #[test]
    fn cgroupfs_pods_of_every_qos_class() {
        assert_eq!(
            parse_cgroup(&format!("/kubepods/pod{UID}")),
            CgroupRole::Pod {
                uid: UID.into(),
                qos: Qos::Guaranteed
            }
        );
        assert_eq!(
            parse_cgroup(&format!("/kubepods/burstable/pod{UID}/")),
            CgroupRole::Pod {
                uid: UID.into(),
                qos: Qos::Burstable
            }
        );
        assert_eq!(
            parse_cgroup(&format!("kubepods/besteffort/pod{UID}")),
            CgroupRole::Pod {
                uid: UID.into(),
                qos: Qos::BestEffort
            }
        );
    }

    #[test]
    fn cgroupfs_containers_anywhere_below_the_mount() {
        assert_eq!(
            parse_cgroup(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            container(UID, RuntimeHint::Unknown)
        );
        assert_eq!(
            parse_cgroup(&format!(
                "/sys/fs/cgroup/memory/process_api/x/kubepods/pod{UID}/{ID}"
            )),
            container(UID, RuntimeHint::Unknown)
        );
    }

    #[test]
    fn systemd_pods_and_scopes_with_underscored_uids() {
        let u = UID.replace('-', "_");
        assert_eq!(
            parse_cgroup(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
            )),
            CgroupRole::Pod {
                uid: UID.into(),
                qos: Qos::Burstable
            }
        );
        assert_eq!(
            parse_cgroup(&format!("/kubepods.slice/kubepods-pod{u}.slice")),
            CgroupRole::Pod {
                uid: UID.into(),
                qos: Qos::Guaranteed
            }
        );
        assert_eq!(
            parse_cgroup(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{ID}.scope"
            )),
            container(UID, RuntimeHint::Docker)
        );
        assert_eq!(
            parse_cgroup(&format!(
                "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"
            )),
            container(UID, RuntimeHint::Containerd)
        );
    }

    /// cgroup v2: the same kubelet layouts, at the cgroup2 mount instead of `memory/`.
    #[test]
    fn cgroup_v2_paths_of_both_drivers() {
        let u = UID.replace('-', "_");
        assert_eq!(
            parse_cgroup(&format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
            )),
            container(UID, RuntimeHint::Containerd)
        );
        assert_eq!(
            parse_cgroup(&format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID}/{ID}")),
            container(UID, RuntimeHint::Unknown)
        );
        assert_eq!(
            parse_cgroup(&format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}")),
            CgroupRole::Pod {
                uid: UID.into(),
                qos: Qos::Burstable
            }
        );
    }

    #[test]
    fn everything_else_is_other() {
        for p in [
            "/",
            "/system.slice/docker.service",
            "/kubepods",
            "/kubepods/burstable",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/podnot-a-uid!",
            &format!("/kubepods/pod{UID}/short-id"),
            &format!("/kubepods/pod{UID}/{ID}/nested"),
            &format!("/kubepods/pod{UID}/{}", ID.to_uppercase()),
            &format!("/kubepods.slice/kubepods-pod{UID}.slice/crio-{ID}.scope"),
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-pod{UID}.slice"),
        ] {
            assert_eq!(parse_cgroup(p), CgroupRole::Other, "{p}");
        }
    }
}
