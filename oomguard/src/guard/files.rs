//! The cgroup files a crossing reads, kept open: a `pread` each instead of a path walk,
//! `open`, `statx`, `read` and `close` (system calls are what the crossing's time goes to).
//! cgroupfs regenerates a file's text on every read at offset 0. Any failure closes the
//! kept file and reads by path, so errors (a removed cgroup) read as before.

use std::fs::File;
use std::path::PathBuf;

use crate::cgroup::{Counter, MemCgroup, MemStat, Result, numa_file_pages};

/// A guarded cgroup's usage file (of the counter it is guarded on; opened on the first
/// reading) and `memory.stat` (opened when its kill threshold comes near, or on the first
/// reading of it). A re-armed cgroup gets a new entry, so a change of counter opens the
/// other file.
#[derive(Default)]
pub(super) struct CgroupFiles {
    usage: Option<File>,
    stat: Option<File>,
    /// v1 `memory.numa_stat`: the reclaimable cache at half the cost of `memory.stat`.
    numa: Option<File>,
}

impl CgroupFiles {
    pub fn usage(&mut self, cg: &MemCgroup, counter: Counter) -> Result<u64> {
        let mut buf = [0u8; 32];
        let path = || cg.file(cg.counter_file(counter));
        match kept(&mut self.usage, path, &mut buf).and_then(|t| t.trim().parse().ok()) {
            Some(v) => Ok(v),
            None => cg.counter_usage(counter),
        }
    }

    pub fn stat(&mut self, cg: &MemCgroup) -> Result<MemStat> {
        let mut buf = [0u8; 8192];
        match kept(&mut self.stat, || cg.file("memory.stat"), &mut buf) {
            Some(t) => Ok(MemStat::parse(t)),
            None => cg.stat(),
        }
    }

    /// Reclaimable page cache ([`MemStat::reclaimable_cache`]): on v1 from
    /// `memory.numa_stat` ([`numa_file_pages`]), else (v2, or a kernel without NUMA) from
    /// `memory.stat`.
    pub fn reclaimable_cache(&mut self, cg: &MemCgroup) -> Result<u64> {
        if !cg.is_v2() {
            let mut buf = [0u8; 2048];
            let text = kept(&mut self.numa, || cg.file("memory.numa_stat"), &mut buf);
            if let Some(pages) = text.and_then(numa_file_pages) {
                return Ok(pages.saturating_mul(crate::decide::PAGE_SIZE));
            }
        }
        self.stat(cg).map(|s| s.reclaimable_cache())
    }

    /// Opens what the crossing reads ahead of it.
    pub fn keep_stat(&mut self, cg: &MemCgroup) {
        let (slot, name) = if cg.is_v2() {
            (&mut self.stat, "memory.stat")
        } else {
            (&mut self.numa, "memory.numa_stat")
        };
        if slot.is_none() {
            *slot = File::open(cg.file(name)).ok();
        }
    }
}

/// The whole text of a kept file (opened now if not yet); `None`: it cannot be opened or
/// read (closed again), or it is larger than `buf`.
fn kept<'a>(
    slot: &mut Option<File>,
    path: impl FnOnce() -> PathBuf,
    buf: &'a mut [u8],
) -> Option<&'a str> {
    if slot.is_none() {
        *slot = Some(File::open(path()).ok()?);
    }
    match crate::sys::pread_whole(slot.as_ref()?, buf) {
        Ok(text) => text,
        Err(_) => {
            *slot = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_file_is_read_afresh_and_closed_when_it_fails() {
        let dir = std::env::temp_dir().join(format!("oomguard-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("memory.usage_in_bytes");
        std::fs::write(&f, "4096\n").unwrap();
        let mut slot = None;
        let mut buf = [0u8; 32];
        assert_eq!(kept(&mut slot, || f.clone(), &mut buf), Some("4096\n"));
        assert!(slot.is_some(), "kept open");
        std::fs::write(&f, "8192\n").unwrap();
        assert_eq!(kept(&mut slot, || f.clone(), &mut buf), Some("8192\n"));
        let mut small = [0u8; 5];
        assert_eq!(kept(&mut slot, || f.clone(), &mut small), None, "too large");
        std::fs::remove_dir_all(&dir).unwrap();
        let mut slot = None;
        assert_eq!(kept(&mut slot, || f.clone(), &mut buf), None);
        assert!(slot.is_none());
    }
}
