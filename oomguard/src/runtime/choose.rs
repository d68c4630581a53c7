//! Which container to kill when the threshold fires on a pod's cgroup.
//!
//! The rule: among the pod's container cgroups, never the sandbox (pause) container, only
//! containers that still hold a task, the one with the highest `memory.usage_in_bytes`
//! (what the pod's limit is charged with); ties go to the smaller id so the choice is
//! stable. A threshold on a container's own cgroup needs no choice: that container.

use std::path::PathBuf;

use super::labels::ContainerKind;

/// One container cgroup beneath a pod cgroup, as the chooser sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChildContainer {
    pub cgroup: PathBuf,
    pub id: String,
    /// `memory.usage_in_bytes` of the container cgroup (its subtree included).
    pub usage: u64,
    /// Tasks in the container cgroup's subtree.
    pub tasks: usize,
    pub kind: ContainerKind,
}

/// The victim among `children` by the rule above, if any container may be killed.
pub fn choose_container(children: &[ChildContainer]) -> Option<&ChildContainer> {
    children
        .iter()
        .filter(|c| c.kind != ContainerKind::Sandbox && c.tasks > 0)
        .max_by(|a, b| a.usage.cmp(&b.usage).then(b.id.cmp(&a.id)))
}

/// Without the runtime's labels: a container whose every task is named `pause` and small
/// (`(comm, rss bytes)` per task) is the pod's sandbox (kubelet's pause image runs a single
/// `/pause`); see [`crate::victim::is_sandbox`].
pub fn looks_like_sandbox<S: AsRef<str>>(tasks: &[(S, u64)]) -> bool {
    !tasks.is_empty()
        && tasks
            .iter()
            .all(|(comm, rss)| crate::victim::is_sandbox(comm.as_ref(), *rss))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(id: &str, usage: u64, tasks: usize, kind: ContainerKind) -> ChildContainer {
        ChildContainer {
            cgroup: PathBuf::from(format!("/pod/{id}")),
            id: id.into(),
            usage,
            tasks,
            kind,
        }
    }

    #[test]
    fn the_biggest_container_is_chosen() {
        let kids = [
            child("a", 10, 1, ContainerKind::Container),
            child("b", 300, 2, ContainerKind::Container),
            child("c", 200, 1, ContainerKind::Unknown),
        ];
        assert_eq!(choose_container(&kids).map(|c| c.id.as_str()), Some("b"));
    }

    #[test]
    fn never_the_sandbox_even_when_it_is_the_biggest() {
        let kids = [
            child("pause", 900, 1, ContainerKind::Sandbox),
            child("app", 1, 1, ContainerKind::Container),
        ];
        assert_eq!(choose_container(&kids).map(|c| c.id.as_str()), Some("app"));
        assert_eq!(choose_container(&kids[..1]), None);
    }

    #[test]
    fn empty_containers_are_skipped_and_ties_are_stable() {
        let kids = [
            child("dead", 900, 0, ContainerKind::Container),
            child("y", 5, 1, ContainerKind::Container),
            child("x", 5, 1, ContainerKind::Container),
        ];
        assert_eq!(choose_container(&kids).map(|c| c.id.as_str()), Some("x"));
        assert_eq!(choose_container(&[]), None);
    }

    #[test]
    fn pause_only_cgroups_look_like_sandboxes() {
        assert!(looks_like_sandbox(&[("pause", 700 << 10)]));
        assert!(!looks_like_sandbox(&[
            ("pause", 700 << 10),
            ("sh", 1 << 20)
        ]));
        // A hog that renamed itself: not a sandbox.
        assert!(!looks_like_sandbox(&[("pause", 900 << 20)]));
        assert!(!looks_like_sandbox::<&str>(&[]));
    }
}
