//! Which cgroup hierarchies a node has, from `/proc/self/mountinfo`: cgroup v1 (the memory
//! controller on a `cgroup` mount, no cgroup2), v2 (a `cgroup2` mount only) or hybrid (v1
//! controller mounts beside a `cgroup2` mount, as systemd's hybrid mode and this project's
//! CI hosts have).

use std::path::{Path, PathBuf};

use super::{Version, unescape_mount_field};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutKind {
    V1,
    V2,
    Hybrid,
    /// No cgroup file system mounted at all.
    None,
}

impl LayoutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LayoutKind::V1 => "v1",
            LayoutKind::V2 => "v2",
            LayoutKind::Hybrid => "hybrid",
            LayoutKind::None => "none",
        }
    }
}

/// The cgroup mounts of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Mount points of v1 hierarchies holding the memory controller.
    pub memory_v1: Vec<PathBuf>,
    /// Mount points of cgroup2.
    pub cgroup2: Vec<PathBuf>,
    /// How many v1 hierarchies are mounted (any controller).
    pub v1_mounts: usize,
}

impl Layout {
    /// Parses mountinfo (mount point is field 5; after the ` - ` come fstype, source and
    /// the super options, which name a v1 hierarchy's controllers).
    pub fn parse(mountinfo: &str) -> Layout {
        let mut layout = Layout::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let (Some(fstype), Some(_source), opts) = (r.next(), r.next(), r.next()) else {
                continue;
            };
            match fstype {
                "cgroup" => {
                    layout.v1_mounts += 1;
                    if opts.is_some_and(|o| o.split(',').any(|c| c == "memory")) {
                        layout.memory_v1.push(unescape_mount_field(mount_point));
                    }
                }
                "cgroup2" => layout.cgroup2.push(unescape_mount_field(mount_point)),
                _ => {}
            }
        }
        layout
    }

    /// This process's view of the mounts.
    pub fn read() -> std::io::Result<Layout> {
        std::fs::read_to_string("/proc/self/mountinfo").map(|t| Layout::parse(&t))
    }

    pub fn kind(&self) -> LayoutKind {
        match (self.v1_mounts > 0, !self.cgroup2.is_empty()) {
            (true, true) => LayoutKind::Hybrid,
            (true, false) => LayoutKind::V1,
            (false, true) => LayoutKind::V2,
            (false, false) => LayoutKind::None,
        }
    }

    /// Which hierarchy holds the memory controller: v1 when a v1 hierarchy has it (also on
    /// hybrid nodes), else v2 when cgroup2 is mounted.
    pub fn memory_version(&self) -> Option<Version> {
        if !self.memory_v1.is_empty() {
            Some(Version::V1)
        } else if !self.cgroup2.is_empty() {
            Some(Version::V2)
        } else {
            None
        }
    }

    /// `--root`'s default: the v1 memory mount if there is one, else the cgroup2 mount.
    pub fn default_root(&self) -> Option<&Path> {
        self.memory_v1
            .first()
            .or_else(|| self.cgroup2.first())
            .map(PathBuf::as_path)
    }

    /// The mount (and its hierarchy) that holds `dir`: the longest mount point above it.
    pub fn hierarchy_of(&self, dir: &Path) -> Option<(PathBuf, Version)> {
        let v1 = self.memory_v1.iter().map(|m| (m, Version::V1));
        let v2 = self.cgroup2.iter().map(|m| (m, Version::V2));
        v1.chain(v2)
            .filter(|(m, _)| dir.starts_with(m))
            .max_by_key(|(m, _)| m.as_os_str().len())
            .map(|(m, v)| (m.clone(), v))
    }

    /// One line for logs and errors, e.g. `hybrid (memory v1 at /sys/fs/cgroup/memory,
    /// cgroup2 at /sys/fs/cgroup/unified)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.memory_v1.first() {
            parts.push(format!("memory v1 at {}", m.display()));
        } else if self.v1_mounts > 0 {
            parts.push(format!(
                "{} v1 hierarchies, none with memory",
                self.v1_mounts
            ));
        }
        if let Some(m) = self.cgroup2.first() {
            parts.push(format!("cgroup2 at {}", m.display()));
        }
        if parts.is_empty() {
            self.kind().as_str().to_string()
        } else {
            format!("{} ({})", self.kind().as_str(), parts.join(", "))
        }
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `major.minor` of a kernel release string (`6.12.57+deb12-amd64` → `(6, 12)`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// `layout <describe>, kernel <release>`: how `run`'s start-up errors and `doctor` name
/// the node.
pub fn node_summary(layout: &Layout) -> String {
    format!(
        "cgroup layout {}, kernel {}",
        layout.describe(),
        kernel_release()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
22 1 0:20 / /sys rw - sysfs sysfs rw\n";
    const HYBRID: &str = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n";
    const V2: &str = "22 1 0:20 / /sys rw - sysfs sysfs rw\n\
35 22 0:30 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";

    #[test]
    fn v1_layout() {
        let l = Layout::parse(V1);
        assert_eq!(l.kind(), LayoutKind::V1);
        assert_eq!(l.memory_version(), Some(Version::V1));
        assert_eq!(l.default_root(), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(
            l.hierarchy_of(Path::new("/sys/fs/cgroup/memory/kubepods/x")),
            Some((PathBuf::from("/sys/fs/cgroup/memory"), Version::V1))
        );
        assert_eq!(l.hierarchy_of(Path::new("/sys/fs/cgroup/unified")), None);
    }

    #[test]
    fn hybrid_layout_keeps_memory_on_v1() {
        let l = Layout::parse(HYBRID);
        assert_eq!(l.kind(), LayoutKind::Hybrid);
        assert_eq!(l.memory_version(), Some(Version::V1));
        assert_eq!(l.default_root(), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(
            l.hierarchy_of(Path::new("/sys/fs/cgroup/unified/a")),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), Version::V2))
        );
        assert_eq!(
            l.describe(),
            "hybrid (memory v1 at /sys/fs/cgroup/memory, cgroup2 at /sys/fs/cgroup/unified)"
        );
    }

    #[test]
    fn v2_layout_roots_at_the_cgroup2_mount() {
        let l = Layout::parse(V2);
        assert_eq!(l.kind(), LayoutKind::V2);
        assert_eq!(l.memory_version(), Some(Version::V2));
        assert_eq!(l.default_root(), Some(Path::new("/sys/fs/cgroup")));
        // The longest mount point wins, and a sibling path with the same prefix is not inside.
        assert_eq!(
            l.hierarchy_of(Path::new("/sys/fs/cgroup/kubepods.slice")),
            Some((PathBuf::from("/sys/fs/cgroup"), Version::V2))
        );
        assert_eq!(l.hierarchy_of(Path::new("/sys/fs/cgroupx")), None);
        assert_eq!(l.describe(), "v2 (cgroup2 at /sys/fs/cgroup)");
    }

    #[test]
    fn no_cgroups_and_malformed_lines() {
        let l = Layout::parse("garbage\n1 2 3\n22 1 0:20 / /sys rw - sysfs sysfs rw\n");
        assert_eq!(l.kind(), LayoutKind::None);
        assert_eq!(l.default_root(), None);
        assert_eq!(l.memory_version(), None);
    }

    #[test]
    fn v1_without_memory_controller_is_not_a_memory_root() {
        let l = Layout::parse(
            "31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
             32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(l.kind(), LayoutKind::Hybrid);
        assert_eq!(l.memory_version(), Some(Version::V2));
        assert_eq!(l.default_root(), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.12.57+deb12-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("3.10.0-1160.el7.x86_64"), Some((3, 10)));
        assert_eq!(kernel_version("x"), None);
    }
}
