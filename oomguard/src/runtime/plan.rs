//! From the cgroup whose threshold fired to the container to kill: the pod's children,
//! the rule in [`super::choose`], and what the runtime (or docker's config file, or the
//! `pause` rule when the runtime cannot answer) says each container is.

use std::path::Path;
use std::time::{Duration, Instant};

use super::*;
use crate::cgroup::MemCgroup;

impl RuntimeClient {
    /// Chooses the container to kill for a threshold signal on `fired` (see [`choose`] for
    /// the rule) and asks the runtime what it is, all within `timeout`. When the runtime
    /// cannot answer, the target is still chosen from the cgroup tree (docker's config file
    /// and the `pause` rule stand in for the labels) with `info: None`.
    pub fn plan_blocking(&self, fired: &Path, timeout: Duration) -> Result<Target, RuntimeError> {
        let start = Instant::now();
        match parse_cgroup(&fired.to_string_lossy()) {
            CgroupRole::Container { id, hint, .. } => {
                let cg = MemCgroup::new(fired);
                let usage = cg.usage().unwrap_or(0);
                let (info, runtime_error) = self.identify(&cg, &id, hint, timeout);
                if info
                    .as_ref()
                    .is_some_and(|i| i.kind == ContainerKind::Sandbox)
                {
                    return Err(RuntimeError::NoContainer {
                        cgroup: fired.to_path_buf(),
                        why: "it is the pod's sandbox (pause) container".into(),
                    });
                }
                Ok(Target {
                    fired: fired.to_path_buf(),
                    cgroup: fired.to_path_buf(),
                    id,
                    hint,
                    info,
                    usage,
                    reason: "the threshold fired on this container's own cgroup".into(),
                    runtime_error,
                })
            }
            CgroupRole::Pod { .. } => {
                let kids = container_children(fired);
                // What is known without a call (see `resolve_blocking`); only the rest is
                // asked, on the client thread.
                let mut known = HashMap::new();
                let mut first_known_err = None;
                let mut ids: Vec<(String, RuntimeHint)> = Vec::new();
                for (_, id, hint) in &kids {
                    match self.inner.known(id, *hint) {
                        Ok(Some(info)) => {
                            known.insert(id.clone(), info);
                        }
                        Ok(None) => ids.push((id.clone(), *hint)),
                        Err(e) => {
                            first_known_err.get_or_insert(e);
                        }
                    }
                }
                let inner = self.inner.clone();
                let left = timeout.saturating_sub(start.elapsed());
                let resolved = if ids.is_empty() {
                    Ok((HashMap::new(), None))
                } else {
                    self.inner
                        .stats
                        .uncached_lookups
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    self.block("resolve the pod's containers", left, async move {
                        let mut set = tokio::task::JoinSet::new();
                        for (id, hint) in ids {
                            let inner = inner.clone();
                            set.spawn(async move { inner.resolve(&id, hint, left).await });
                        }
                        let mut out = HashMap::new();
                        let mut first_err = None;
                        while let Some(r) = set.join_next().await {
                            match r {
                                Ok(Ok(info)) => {
                                    out.insert(info.id.clone(), info);
                                }
                                Ok(Err(e)) => {
                                    first_err.get_or_insert(e);
                                }
                                Err(_) => {}
                            }
                        }
                        Ok((out, first_err))
                    })
                };
                // Keep why the runtime could not say (a hung socket's timeout): the record
                // and the Event must name it, not a later "not known" from the kill.
                let (mut resolved, runtime_error) = match resolved {
                    Ok((m, e)) => (m, e.or(first_known_err).map(|e| e.to_string())),
                    Err(e) => (HashMap::new(), Some(e.to_string())),
                };
                resolved.extend(known);
                let mut infos = HashMap::new();
                let children: Vec<ChildContainer> = kids
                    .into_iter()
                    .map(|(cg, id, hint)| {
                        let info = resolved
                            .get(&id)
                            .cloned()
                            .or_else(|| self.offline_info(&id, hint));
                        let kind = match &info {
                            Some(i) if i.kind != ContainerKind::Unknown => i.kind,
                            _ if looks_like_sandbox(&comms(&cg)) => ContainerKind::Sandbox,
                            _ => ContainerKind::Unknown,
                        };
                        if let Some(i) = info {
                            infos.insert(id.clone(), i);
                        }
                        ChildContainer {
                            usage: cg.usage().unwrap_or(0),
                            tasks: cg.subtree_procs().len(),
                            cgroup: cg.path,
                            id,
                            kind,
                        }
                    })
                    .collect();
                let Some(victim) = choose_container(&children) else {
                    return Err(RuntimeError::NoContainer {
                        cgroup: fired.to_path_buf(),
                        why: format!(
                            "none of its {} container cgroup(s) is a running non-sandbox container",
                            children.len()
                        ),
                    });
                };
                let hint = parse_cgroup(&victim.cgroup.to_string_lossy());
                let hint = match hint {
                    CgroupRole::Container { hint, .. } => hint,
                    _ => RuntimeHint::Unknown,
                };
                let info = infos.remove(&victim.id);
                let runtime_error = match &info {
                    Some(i) if !i.namespace.is_empty() => None,
                    _ => runtime_error,
                };
                Ok(Target {
                    fired: fired.to_path_buf(),
                    cgroup: victim.cgroup.clone(),
                    id: victim.id.clone(),
                    hint,
                    info,
                    usage: victim.usage,
                    reason: format!(
                        "the pod's container using the most memory ({} bytes) of {} non-sandbox container(s){}",
                        victim.usage,
                        children
                            .iter()
                            .filter(|c| c.kind != ContainerKind::Sandbox)
                            .count(),
                        runtime_error
                            .as_ref()
                            .map(|e| format!(" (chosen from the cgroup tree: {e})"))
                            .unwrap_or_default()
                    ),
                    runtime_error,
                })
            }
            CgroupRole::Other => Err(RuntimeError::NoContainer {
                cgroup: fired.to_path_buf(),
                why: "its path is neither a pod's nor a container's cgroup".into(),
            }),
        }
    }

    /// What container `id` is, and why the runtime could not say when it could not.
    pub(super) fn identify(
        &self,
        cg: &MemCgroup,
        id: &str,
        hint: RuntimeHint,
        timeout: Duration,
    ) -> (Option<ContainerInfo>, Option<String>) {
        let (info, error) = match self.resolve_blocking(id, hint, timeout) {
            Ok(i) => (Some(i), None),
            Err(e) => (self.offline_info(id, hint), Some(e.to_string())),
        };
        let info = match info {
            Some(i) if i.kind != ContainerKind::Unknown => Some(i),
            other if looks_like_sandbox(&comms(cg)) => Some(ContainerInfo {
                id: id.to_string(),
                namespace: other.map(|i| i.namespace).unwrap_or_default(),
                kind: ContainerKind::Sandbox,
                pod: None,
            }),
            other => other,
        };
        (info, error)
    }

    /// Labels without the runtime: docker's config file, when the layout allows docker.
    pub(super) fn offline_info(&self, id: &str, hint: RuntimeHint) -> Option<ContainerInfo> {
        if hint == RuntimeHint::Containerd {
            return None;
        }
        let labels = labels::read_docker_labels(&self.inner.cfg.docker_root, id).ok()?;
        let mut info = ContainerInfo::from_labels(id, MOBY, &labels);
        // Not confirmed by containerd: no namespace to kill through.
        info.namespace = String::new();
        Some(info)
    }
}

/// The container cgroups directly beneath a pod cgroup: (cgroup, id, hint).
pub(super) fn container_children(pod: &Path) -> Vec<(MemCgroup, String, RuntimeHint)> {
    MemCgroup::new(pod)
        .children()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|cg| match parse_cgroup(&cg.path.to_string_lossy()) {
            CgroupRole::Container { id, hint, .. } => Some((cg, id, hint)),
            _ => None,
        })
        .collect()
}

/// The name and resident bytes of every task in `cg`'s subtree.
fn comms(cg: &MemCgroup) -> Vec<(String, u64)> {
    cg.subtree_procs()
        .into_iter()
        .filter_map(|(_, pid)| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|text| {
            let s = crate::victim::parse_status(&text);
            (s.name, s.rss_bytes)
        })
        .collect()
}
