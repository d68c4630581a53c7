//! Reading and writing memory cgroup files, on cgroup v1 and v2 behind one interface:
//! limits, usage, `memory.stat`, kernel OOM kills, reclaim, tasks, ids.
//!
//! What differs between the two hierarchies (`memory.limit_in_bytes` vs `memory.max`,
//! `memory.usage_in_bytes` vs `memory.current`, `force_empty` vs `memory.reclaim`,
//! `memory.oom_control` vs `memory.events`, `total_*` vs hierarchical stat keys) is decided
//! here, by the [`Version`] each [`MemCgroup`] carries, never by callers. [`layout`] finds
//! the hierarchies from mountinfo. The kernel's files are the truth: everything here
//! re-reads them, nothing caches.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub mod layout;
pub mod v2;

pub use layout::{Layout, LayoutKind};

/// Where the cgroup v1 memory hierarchy is mounted on a standard node.
pub const DEFAULT_MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";

/// `statfs` magic of a cgroup2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Which memory cgroup hierarchy a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The hierarchy of `path` (or of its nearest existing ancestor, for a directory not
    /// made yet), from the file system's magic number. V1 when nothing can be told.
    pub fn of(path: &Path) -> Version {
        let mut p = Some(path);
        while let Some(dir) = p {
            if let Ok(st) = rustix::fs::statfs(dir) {
                // f_type's integer type differs between architectures.
                #[allow(clippy::unnecessary_cast)]
                let magic = st.f_type as i64;
                return if magic == CGROUP2_SUPER_MAGIC {
                    Version::V2
                } else {
                    Version::V1
                };
            }
            p = dir.parent();
        }
        Version::V1
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// The page counter a cgroup is guarded on: the one whose limit the kernel's memcg OOM
/// comes from (see [`binding_counter`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Counter {
    /// Memory: `memory.usage_in_bytes` against `memory.limit_in_bytes` (v2 `memory.current`
    /// against `memory.max`).
    #[default]
    Memory,
    /// Memory and swap together (v1 with swap accounting): `memory.memsw.usage_in_bytes`
    /// against `memory.memsw.limit_in_bytes`.
    Memsw,
}

impl Counter {
    pub fn as_str(self) -> &'static str {
        match self {
            Counter::Memory => "memory",
            Counter::Memsw => "memsw",
        }
    }
}

/// Which counter the kernel's memcg OOM of a v1 cgroup comes from, and its limit, given the
/// memory limit `limit` (L), the memsw limit `memsw_limit` (M ≥ L, the kernel refuses less;
/// `None`: no swap accounting, or unlimited), the node's swap (`swap_total`, bytes) and the
/// cgroup's `memory.swappiness` (`None`: unknown).
///
/// Memsw binds when the cgroup can swap (the node has swap, swappiness is not 0) and
/// M < L + swap: at L the kernel swaps anonymous memory out instead of killing, which
/// leaves memsw usage (memory + swap, never below memory usage) unchanged, so usage grows
/// on until memsw reaches M; reclaim at M may not swap (only page cache counts), and the
/// OOM comes from there, with memory usage anywhere at or below L. Without swap memsw usage
/// equals memory usage and M ≥ L: the memory limit is reached first, or both at once. At
/// swappiness 0 the cgroup's reclaim never swaps: memsw usage grows only with memory usage
/// (over what was swapped before), so the memory limit binds too. With M ≥ L + swap the memsw limit cannot be reached: the memory
/// limit binds once swap is full, as without a memsw limit.
pub fn binding_counter(
    limit: u64,
    memsw_limit: Option<u64>,
    swap_total: u64,
    swappiness: Option<u64>,
) -> (Counter, u64) {
    match memsw_limit {
        Some(m)
            if m < UNLIMITED
                && swap_total > 0
                && swappiness != Some(0)
                && m < limit.saturating_add(swap_total) =>
        {
            (Counter::Memsw, m)
        }
        _ => (Counter::Memory, limit),
    }
}

/// `SwapTotal` of `/proc/meminfo`, in bytes (0 when the line is missing).
pub fn swap_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

/// The node's swap in bytes, from `/proc/meminfo` (0 when it cannot be read).
pub fn node_swap_total() -> u64 {
    fs::read_to_string("/proc/meminfo").map_or(0, |t| swap_total(&t))
}

/// `memory.limit_in_bytes` at or above this means "no limit" (the kernel reports
/// `PAGE_COUNTER_MAX` pages rounded down, 9223372036854771712 on 4 KiB pages).
pub const UNLIMITED: u64 = 1 << 62;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} does not hold a number: {text:?}")]
    Parse { path: PathBuf, text: String },
    #[error("no memory line in {0}")]
    NoMemoryLine(String),
    #[error("{path}: {what} is not available on this kernel")]
    Unsupported { path: PathBuf, what: &'static str },
}

impl CgroupError {
    /// True when the error means the cgroup (or the process) is gone.
    pub fn is_gone(&self) -> bool {
        match self {
            CgroupError::Read { source, .. } | CgroupError::Write { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ENODEV)
                ) || source.kind() == io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, CgroupError>;

pub fn read_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether a v1 cgroup's `memory.use_hierarchy` (its text; `None`: no such file, as on
/// v2) says its limit covers only its own tasks, not its children's. Only kernels before
/// 5.11 let it be 0: since then it reads 1 and refuses 0, so on this project's kernels the
/// flat case exists only in this function's unit test.
pub fn hierarchy_off(use_hierarchy: Option<&str>) -> bool {
    use_hierarchy.is_some_and(|t| t.trim() == "0")
}

pub fn read_u64(path: &Path) -> Result<u64> {
    let text = read_string(path)?;
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        text,
    })
}

/// Writes `value` in a single `write(2)`, as cgroupfs expects.
pub fn write_str(path: &Path, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(value.as_bytes())
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// One memory cgroup directory, of a v1 or a v2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemCgroup {
    pub path: PathBuf,
    pub version: Version,
}

impl MemCgroup {
    /// A cgroup whose hierarchy is told by the file system it lives on (one `statfs`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let version = Version::of(&path);
        Self { path, version }
    }

    /// A cgroup of a known hierarchy (no system call).
    pub fn with_version(path: impl Into<PathBuf>, version: Version) -> Self {
        Self {
            path: path.into(),
            version,
        }
    }

    pub fn is_v2(&self) -> bool {
        self.version == Version::V2
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The file holding the limit (`memory.limit_in_bytes` or `memory.max`).
    pub fn limit_file(&self) -> &'static str {
        match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// The file holding the usage (`memory.usage_in_bytes` or `memory.current`).
    pub fn usage_file(&self) -> &'static str {
        match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }

    /// The file holding the usage of `counter`.
    pub fn counter_file(&self, counter: Counter) -> &'static str {
        match counter {
            Counter::Memory => self.usage_file(),
            Counter::Memsw => "memory.memsw.usage_in_bytes",
        }
    }

    /// The usage of `counter` in bytes.
    pub fn counter_usage(&self, counter: Counter) -> Result<u64> {
        read_u64(&self.file(self.counter_file(counter)))
    }

    /// The counter the kernel's OOM of this cgroup comes from and its finite limit (see
    /// [`binding_counter`]); `None` when the cgroup has no memory limit. `swap_total`: the
    /// node's swap ([`node_swap_total`]). v2 has no memsw counter (its swap has a limit of
    /// its own, `memory.swap.max`): always [`Counter::Memory`].
    pub fn guarded_limit(&self, swap_total: u64) -> Result<Option<(Counter, u64)>> {
        let Some(limit) = self.finite_limit()? else {
            return Ok(None);
        };
        if self.is_v2() || swap_total == 0 {
            return Ok(Some((Counter::Memory, limit)));
        }
        // Without swap accounting (no file) there is no memsw limit.
        let memsw = read_u64(&self.file("memory.memsw.limit_in_bytes")).ok();
        let swappiness = read_u64(&self.file("memory.swappiness")).ok();
        Ok(Some(binding_counter(limit, memsw, swap_total, swappiness)))
    }

    pub fn exists(&self) -> bool {
        self.file(self.usage_file()).exists()
    }

    /// The cgroup id: the directory's inode number, which memcg tracepoints call `id`.
    pub fn id(&self) -> Result<u64> {
        fs::metadata(&self.path)
            .map(|m| m.ino())
            .map_err(|source| CgroupError::Read {
                path: self.path.clone(),
                source,
            })
    }

    /// The limit in bytes; v2's `max` (none) reads as [`UNLIMITED`].
    pub fn limit(&self) -> Result<u64> {
        let path = self.file(self.limit_file());
        match self.version {
            Version::V1 => read_u64(&path),
            Version::V2 => {
                let text = read_string(&path)?;
                parse_v2_limit(&text).ok_or(CgroupError::Parse { path, text })
            }
        }
    }

    /// The limit, or `None` when the cgroup has none.
    pub fn finite_limit(&self) -> Result<Option<u64>> {
        Ok(Some(self.limit()?).filter(|l| *l < UNLIMITED))
    }

    pub fn set_limit(&self, bytes: u64) -> Result<()> {
        write_str(&self.file(self.limit_file()), &bytes.to_string())
    }

    pub fn usage(&self) -> Result<u64> {
        read_u64(&self.file(self.usage_file()))
    }

    /// Peak usage (`memory.max_usage_in_bytes`; v2: `memory.peak`, kernel 5.19+).
    pub fn max_usage(&self) -> Result<u64> {
        match self.version {
            Version::V1 => read_u64(&self.file("memory.max_usage_in_bytes")),
            Version::V2 => read_u64(&self.file("memory.peak")),
        }
    }

    /// Times a charge hit the limit (`memory.failcnt`; v2: `max` in `memory.events`).
    pub fn failcnt(&self) -> Result<u64> {
        match self.version {
            Version::V1 => read_u64(&self.file("memory.failcnt")),
            Version::V2 => self.events().map(|e| e.max),
        }
    }

    /// v2 `memory.events` (hierarchical counters). On v1 an error: there is no such file.
    pub fn events(&self) -> Result<v2::MemoryEvents> {
        read_string(&self.file("memory.events")).map(|t| v2::MemoryEvents::parse(&t))
    }

    pub fn stat(&self) -> Result<MemStat> {
        read_string(&self.file("memory.stat")).map(|t| MemStat::parse(&t))
    }

    pub fn oom_control(&self) -> Result<OomControl> {
        read_string(&self.file("memory.oom_control")).map(|t| OomControl::parse(&t))
    }

    /// Asks the kernel to reclaim everything it can from this cgroup. Synchronous: the
    /// kernel loops in the writer until usage is 0 or reclaim stops making progress, and
    /// returns `EINTR` when the writer gets a signal (see [`crate::reclaim`]).
    pub fn force_empty(&self) -> Result<()> {
        write_str(&self.file("memory.force_empty"), "0")
    }

    /// Reclaims what the kernel can from this cgroup: v1 `memory.force_empty`; v2
    /// `memory.reclaim` (5.19+) asked for the whole usage, where `EAGAIN` means "less than
    /// asked could be reclaimed" and counts as done. [`CgroupError::Unsupported`] on a v2
    /// kernel without `memory.reclaim`.
    pub fn reclaim_all(&self) -> Result<()> {
        match self.version {
            Version::V1 => self.force_empty(),
            Version::V2 => {
                let path = self.file("memory.reclaim");
                if !path.exists() {
                    return Err(CgroupError::Unsupported {
                        path,
                        what: "memory.reclaim (kernel 5.19+)",
                    });
                }
                let want = self.usage()?.max(4096);
                match write_str(&path, &want.to_string()) {
                    Err(CgroupError::Write { source, .. })
                        if source.raw_os_error() == Some(libc::EAGAIN) =>
                    {
                        Ok(())
                    }
                    r => r,
                }
            }
        }
    }

    /// Kills every task of this cgroup and its descendants in one write of `cgroup.kill`
    /// (v2, kernel 5.14+). [`CgroupError::Unsupported`] on v1 or an older kernel.
    pub fn kill_all(&self) -> Result<()> {
        let path = self.file("cgroup.kill");
        if self.version == Version::V1 || !path.exists() {
            return Err(CgroupError::Unsupported {
                path,
                what: "cgroup.kill (cgroup v2, kernel 5.14+)",
            });
        }
        write_str(&path, "1")
    }

    /// Kernel OOM kills in this cgroup and its descendants: cgroup v1 counts a kill only in
    /// the victim's own cgroup, not in the ancestor whose limit was hit, so the subtree is
    /// summed; v2's `memory.events` `oom_kill` is hierarchical already.
    pub fn subtree_oom_kills(&self) -> u64 {
        match self.version {
            Version::V1 => self
                .subtree()
                .iter()
                .filter_map(|c| c.oom_control().ok())
                .map(|o| o.oom_kill)
                .sum(),
            Version::V2 => self.events().map(|e| e.oom_kill).unwrap_or(0),
        }
    }

    /// Process ids directly in this cgroup.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let text = read_string(&self.file("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Moves a process into this cgroup.
    pub fn add_proc(&self, pid: i32) -> Result<()> {
        write_str(&self.file("cgroup.procs"), &pid.to_string())
    }

    /// Child cgroups (directories), not recursive.
    pub fn children(&self) -> Result<Vec<MemCgroup>> {
        let rd = fs::read_dir(&self.path).map_err(|source| CgroupError::Read {
            path: self.path.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in rd.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(MemCgroup::with_version(entry.path(), self.version));
            }
        }
        out.sort();
        Ok(out)
    }

    /// This cgroup and every descendant, parents before children. Cgroups that vanish
    /// during the walk are skipped, and so is whatever lies beneath a directory that
    /// could not be listed (see [`MemCgroup::walk`]).
    pub fn subtree(&self) -> Vec<MemCgroup> {
        self.walk().0
    }

    /// [`MemCgroup::subtree`], plus the directories whose listing failed for another
    /// reason than being gone (EACCES, EMFILE...): what lies beneath those is unknown, not
    /// absent, so a caller comparing walks must not take it as removed.
    pub fn walk(&self) -> (Vec<MemCgroup>, Vec<(PathBuf, CgroupError)>) {
        let mut out = vec![self.clone()];
        let mut unlisted = Vec::new();
        let mut i = 0;
        while i < out.len() {
            match out[i].children() {
                Ok(kids) => out.extend(kids),
                Err(e) if e.is_gone() => {}
                Err(e) => unlisted.push((out[i].path.clone(), e)),
            }
            i += 1;
        }
        (out, unlisted)
    }

    /// Process ids in this cgroup and all its descendants (the kernel's memcg OOM candidates).
    pub fn subtree_procs(&self) -> Vec<(MemCgroup, i32)> {
        let mut out = Vec::new();
        for cg in self.subtree() {
            if let Ok(pids) = cg.procs() {
                out.extend(pids.into_iter().map(|p| (cg.clone(), p)));
            }
        }
        out
    }
}

/// Parsed `memory.stat`: its well-formed `key value` lines, in file order, kept as one
/// string. Every decision carries one and the agent keeps its last 512 decisions for the
/// debug views: as one string a copy takes about 1.5 KiB, as a map of about 70 owned keys it
/// took about 5 KiB (2.7 MiB of RSS for a full ring).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStat(Box<str>);

/// Page cache on the LRU lists of a v1 cgroup and its descendants, in pages, from
/// `memory.numa_stat`'s `hierarchical_file` line: the same counters as `memory.stat`'s
/// `total_inactive_file + total_active_file`, in a file the kernel writes in half the time
/// (8 lines instead of about 70), which matters on the crossing's path.
pub fn numa_file_pages(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("hierarchical_file="))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl MemStat {
    /// Nothing was read into it.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn parse(text: &str) -> Self {
        let mut kept = String::with_capacity(text.len());
        for line in text.lines() {
            let mut it = line.split_whitespace();
            if let (Some(k), Some(v), None) = (it.next(), it.next(), it.next())
                && v.parse::<u64>().is_ok()
            {
                kept.push_str(k);
                kept.push(' ');
                kept.push_str(v);
                kept.push('\n');
            }
        }
        MemStat(kept.into_boxed_str())
    }

    /// Every `(key, value)`, in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.lines().filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k, v.parse().ok()?))
        })
    }

    pub fn get(&self, key: &str) -> u64 {
        self.iter().find(|(k, _)| *k == key).map_or(0, |(_, v)| v)
    }

    /// Page cache the kernel can reclaim without swap: file pages on the LRU lists of this
    /// cgroup and its descendants: v1 `total_inactive_file + total_active_file`, v2
    /// `inactive_file + active_file` (v2 keys have no `total_` prefix: they are
    /// hierarchical). Unlike `total_cache`/`file` this leaves out shmem/tmpfs, which needs
    /// swap to be reclaimed. Which hierarchy wrote the file is told by its keys: v1 always
    /// has the `total_` ones, v2 never.
    pub fn reclaimable_cache(&self) -> u64 {
        let prefix = self.hierarchical_prefix();
        self.get(&format!("{prefix}inactive_file"))
            .saturating_add(self.get(&format!("{prefix}active_file")))
    }

    /// Anonymous memory of this cgroup and its descendants (what killing every task in it
    /// gives back, besides page tables): v1 `total_rss`, v2 `anon`.
    pub fn anon(&self) -> u64 {
        if self.hierarchical_prefix().is_empty() {
            self.get("anon")
        } else {
            self.get("total_rss")
        }
    }

    /// The prefix of the hierarchical keys: `total_` in v1's file, none in v2's (whose
    /// keys are all hierarchical).
    fn hierarchical_prefix(&self) -> &'static str {
        if self.iter().any(|(k, _)| k.starts_with("total_")) {
            "total_"
        } else {
            ""
        }
    }
}

/// A JSON object, keys in file order.
impl serde::Serialize for MemStat {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// Parsed `memory.oom_control`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomControl {
    pub oom_kill_disable: bool,
    pub under_oom: bool,
    /// Tasks the kernel OOM killer killed in this cgroup (kernel 4.13+).
    pub oom_kill: u64,
}

impl OomControl {
    pub fn parse(text: &str) -> Self {
        let st = MemStat::parse(text);
        OomControl {
            oom_kill_disable: st.get("oom_kill_disable") != 0,
            under_oom: st.get("under_oom") != 0,
            oom_kill: st.get("oom_kill"),
        }
    }
}

/// The memory cgroup of a process, as the path relative to the hierarchy's root
/// (`/proc/PID/cgroup`'s `N:memory:/path` line, or `N:...,memory,...:/path`). Without a
/// v1 memory line the memory controller is on v2: the `0::/path` line.
pub fn memory_cgroup_of(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .filter_map(split_proc_cgroup_line)
        .find_map(|(ctrls, path)| ctrls.split(',').any(|c| c == "memory").then_some(path))
        .or_else(|| {
            proc_cgroup
                .lines()
                .filter_map(split_proc_cgroup_line)
                .find_map(|(ctrls, path)| ctrls.is_empty().then_some(path))
        })
}

/// A v2 `memory.max`/`memory.high` value: bytes, or `max` for none ([`UNLIMITED`]).
pub fn parse_v2_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(UNLIMITED),
        t => t.parse().ok(),
    }
}

/// `(controllers, path)` of one `/proc/PID/cgroup` line (`id:controllers:path`).
fn split_proc_cgroup_line(line: &str) -> Option<(&str, &str)> {
    let mut parts = line.splitn(3, ':');
    let _id = parts.next()?;
    let ctrls = parts.next()?;
    let path = parts.next()?;
    Some((ctrls, path))
}

/// The memory cgroup (absolute directory) of process `pid` (`"self"` for us).
pub fn cgroup_of_pid(memory_root: &Path, pid: &str) -> Result<MemCgroup> {
    let file = format!("/proc/{pid}/cgroup");
    let text = read_string(Path::new(&file))?;
    let rel = memory_cgroup_of(&text).ok_or(CgroupError::NoMemoryLine(file))?;
    Ok(MemCgroup::new(
        memory_root.join(rel.trim_start_matches('/')),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cache 1048576\nrss 8388608\nrss_huge 0\nshmem 4096\nmapped_file 0\n\
dirty 0\nwriteback 0\ninactive_anon 0\nactive_anon 8388608\ninactive_file 524288\n\
active_file 520192\nhierarchical_memory_limit 33554432\ntotal_cache 2097152\n\
total_rss 8388608\ntotal_shmem 4096\ntotal_inactive_file 1048576\ntotal_active_file 1040384\n";

    #[test]
    fn memory_stat_parses_and_reclaimable_excludes_shmem() {
        let s = MemStat::parse(STAT);
        assert_eq!(s.get("rss"), 8 << 20);
        assert_eq!(s.get("hierarchical_memory_limit"), 32 << 20);
        assert_eq!(s.get("nonexistent"), 0);
        assert_eq!(s.reclaimable_cache(), 1048576 + 1040384);
        assert!(s.reclaimable_cache() < s.get("total_cache"));
        assert_eq!(s.anon(), 8 << 20, "v1: total_rss");
        assert_eq!(s.iter().count(), 17);
    }

    #[test]
    fn v2_memory_stat_reclaimable_is_the_file_lru() {
        let s = MemStat::parse(
            "anon 8388608\nfile 2101248\nshmem 4096\nactive_file 1048576\n\
             inactive_file 1048576\nunevictable 0\n",
        );
        assert_eq!(s.reclaimable_cache(), 2 << 20);
        assert_eq!(s.anon(), 8 << 20, "v2: anon (there is no total_rss)");
    }

    #[test]
    fn v2_limits_parse() {
        assert_eq!(parse_v2_limit("max\n"), Some(UNLIMITED));
        assert_eq!(parse_v2_limit("134217728\n"), Some(128 << 20));
        assert_eq!(parse_v2_limit("lots"), None);
    }

    #[test]
    fn memory_stat_serializes_as_an_object_in_file_order() {
        let s = MemStat::parse("rss 5\ncache 7\n");
        assert_eq!(
            serde_json::to_string(&s).unwrap_or_default(),
            r#"{"rss":5,"cache":7}"#
        );
        assert_eq!(
            serde_json::to_string(&MemStat::default()).unwrap_or_default(),
            "{}"
        );
    }

    #[test]
    fn memory_stat_ignores_malformed_lines() {
        let s = MemStat::parse("cache x\nrss 5\nbad\nthree a b\n");
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![("rss", 5)]);
        assert_eq!(s.get("rss"), 5);
    }

    #[test]
    fn numa_stat_gives_the_hierarchical_file_pages() {
        let text = "total=1199376 N0=1199376\nfile=1115385 N0=1115385\nanon=83928 N0=83928\n\
                    unevictable=63 N0=63\nhierarchical_total=1200352 N0=1200352\n\
                    hierarchical_file=1116361 N0=1116361\nhierarchical_anon=83928 N0=83928\n";
        assert_eq!(numa_file_pages(text), Some(1116361));
        assert_eq!(
            numa_file_pages("file=3 N0=3\n"),
            None,
            "not hierarchical: no answer"
        );
        assert_eq!(numa_file_pages("hierarchical_file=x N0=1\n"), None);
    }

    #[test]
    fn reclaimable_cache_of_absurd_numbers_saturates() {
        let s = MemStat::parse("total_inactive_file 18446744073709551615\ntotal_active_file 1\n");
        assert_eq!(s.reclaimable_cache(), u64::MAX);
    }

    #[test]
    fn use_hierarchy_zero_means_own_tasks_only() {
        // Kernels before 5.11 (a 4.19 or 5.4 node): the limit covers only the cgroup's own
        // tasks. Nothing newer lets the file be 0 and no older kernel is at hand, so this
        // is tested on the parsed value alone.
        assert!(hierarchy_off(Some("0\n")));
        assert!(!hierarchy_off(Some("1\n")));
        assert!(
            !hierarchy_off(None),
            "v2 has no such file: always hierarchical"
        );
        assert!(
            !hierarchy_off(Some("")),
            "unreadable: the kernel's default, hierarchical"
        );
    }

    #[test]
    fn memsw_binds_only_where_the_cgroup_can_swap_up_to_it() {
        const M: u64 = 1 << 20;
        let l = 256 * M;
        let swap = 1024 * M;
        assert_eq!(
            binding_counter(l, Some(512 * M), swap, Some(60)),
            (Counter::Memsw, 512 * M),
            "docker's default, memsw = 2 × memory, on a node with swap"
        );
        assert_eq!(
            binding_counter(l, Some(l), swap, Some(60)),
            (Counter::Memsw, l),
            "M = L: memsw usage ≥ memory usage reaches it first"
        );
        assert_eq!(
            binding_counter(l, Some(512 * M), swap, None),
            (Counter::Memsw, 512 * M),
            "swappiness unknown: the kernel's default swaps"
        );
        assert_eq!(
            binding_counter(l, Some(512 * M), 0, Some(60)),
            (Counter::Memory, l),
            "no swap: memsw usage = memory usage, M ≥ L"
        );
        assert_eq!(
            binding_counter(l, Some(512 * M), swap, Some(0)),
            (Counter::Memory, l),
            "swappiness 0: the cgroup's memory is never swapped out"
        );
        assert_eq!(
            binding_counter(l, Some(l + swap), swap, Some(60)),
            (Counter::Memory, l),
            "M ≥ L + swap cannot be reached"
        );
        assert_eq!(
            binding_counter(l, Some(l + swap - 4096), swap, Some(60)),
            (Counter::Memsw, l + swap - 4096)
        );
        assert_eq!(
            binding_counter(l, Some(9223372036854771712), swap, Some(60)),
            (Counter::Memory, l),
            "unlimited memsw"
        );
        assert_eq!(
            binding_counter(l, None, swap, Some(60)),
            (Counter::Memory, l)
        );
        assert_eq!(
            binding_counter(u64::MAX - 1, Some(u64::MAX), swap, Some(60)),
            (Counter::Memory, u64::MAX - 1),
            "no overflow"
        );
    }

    #[test]
    fn swap_total_of_meminfo() {
        let meminfo = "MemTotal:       24568424 kB\nSwapCached:            0 kB\n\
                       SwapTotal:        131068 kB\nSwapFree:         131068 kB\n";
        assert_eq!(swap_total(meminfo), 131068 * 1024);
        assert_eq!(swap_total("SwapTotal:       0 kB\n"), 0);
        assert_eq!(swap_total("MemTotal: 1 kB\n"), 0, "no such line");
        assert_eq!(swap_total("SwapTotal: lots kB\n"), 0);
    }

    #[test]
    fn oom_control_parses() {
        let o = OomControl::parse("oom_kill_disable 0\nunder_oom 1\noom_kill 3\n");
        assert!(!o.oom_kill_disable);
        assert!(o.under_oom);
        assert_eq!(o.oom_kill, 3);
    }

    #[test]
    fn memory_line_of_proc_cgroup() {
        let text = "12:pids:/a\n4:memory:/process_api/abc\n3:cpu,cpuacct:/x\n0::/unified\n";
        assert_eq!(memory_cgroup_of(text), Some("/process_api/abc"));
        assert_eq!(memory_cgroup_of("5:cpu,memory:/k\n"), Some("/k"));
        assert_eq!(memory_cgroup_of("0::/only-v2\n"), Some("/only-v2"));
        assert_eq!(memory_cgroup_of("7:memoryx:/no\n"), None);
        // Hybrid: the v1 memory line wins over the unified one.
        assert_eq!(memory_cgroup_of("0::/u\n4:memory:/m\n"), Some("/m"));
    }
}

/// Mount points of cgroup v1 hierarchies with the memory controller in `mountinfo`
/// (mount point is field 5; after the `-` come fstype, source and the super options,
/// which name the controllers).
pub fn memory_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
            (fstype == "cgroup" && opts.split(',').any(|o| o == "memory"))
                .then(|| unescape_mount_field(mount_point))
        })
        .collect()
}

/// A mountinfo path field: the kernel writes space, tab, newline and backslash as `\ooo`
/// (three octal digits, `\040` for a space). Anything else is kept as it is.
pub fn unescape_mount_field(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mount point of the cgroup v1 memory hierarchy that holds `dir`, from
/// `/proc/self/mountinfo` (mount point is field 5; after the `-` come fstype, source and the
/// super options, which name the controllers).
pub fn memory_mount_for(mountinfo: &str, dir: &Path) -> Option<PathBuf> {
    memory_mounts(mountinfo)
        .into_iter()
        .filter(|m| dir.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}

#[cfg(test)]
mod mount_tests {
    use super::*;

    #[test]
    fn finds_the_memory_mount() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            memory_mount_for(mi, Path::new("/sys/fs/cgroup/memory/kubepods")),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            memory_mount_for(mi, Path::new("/sys/fs/cgroup/unified/x")),
            None
        );
    }

    #[test]
    fn mount_points_with_escaped_characters_are_decoded() {
        let mi = "30 25 0:26 / /run/my\\040cgroups/mem\\134ory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            memory_mounts(mi),
            [PathBuf::from("/run/my cgroups/mem\\ory")]
        );
        assert_eq!(
            unescape_mount_field("a\\011b\\012c"),
            PathBuf::from("a\tb\nc")
        );
        // Not an escape: kept as written (a lone backslash, too few or non-octal digits, > 0o377).
        for raw in ["a\\", "a\\04", "a\\089", "a\\777", "plain"] {
            assert_eq!(unescape_mount_field(raw), PathBuf::from(raw), "{raw}");
        }
    }
}
