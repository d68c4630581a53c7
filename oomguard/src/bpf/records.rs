//! Ring-buffer records, decoded from the bytes the programs send.

use std::{os::unix::ffi::OsStrExt as _, path::PathBuf};

use oomguard_common::{CgroupEvent, Event, kind};

/// Which threshold a crossing record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// The reclaim threshold (`limit - 2 × margin`): start `force_empty` in the background.
    Reclaim,
    /// The kill threshold (`limit - margin`): check the cache and apply the policy.
    Kill,
}

/// A cgroup made or removed in the memory hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// The memcg id: the inode number of the cgroup's directory.
    pub cgroup_id: u64,
    /// Depth below the hierarchy's root (the root is 0).
    pub level: u32,
    /// Path relative to the hierarchy's mount point (`/a/b`), as the kernel gives it.
    pub path: PathBuf,
    /// The kernel's path was longer than the record holds; `path` is its start.
    pub truncated: bool,
    pub ktime_ns: u64,
}

/// One record from the eBPF programs. `ktime_ns` is `CLOCK_MONOTONIC` (see
/// [`super::monotonic_ns`]); `pid` is a process id (tgid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Usage of a guarded cgroup crossed one of its thresholds upwards, seen at the charge
    /// that did it (one record per crossing).
    Crossing {
        threshold: Threshold,
        cgroup_id: u64,
        usage_bytes: u64,
        threshold_bytes: u64,
        /// The charging process.
        pid: u32,
        ktime_ns: u64,
    },
    /// A process of a guarded cgroup entered memcg reclaim with the cgroup within a huge page
    /// of its limit: the kernel is reclaiming, its OOM killer may be next.
    AtLimit {
        cgroup_id: u64,
        usage_bytes: u64,
        limit_bytes: u64,
        pid: u32,
        ktime_ns: u64,
    },
    /// The kernel's OOM killer chose `pid`, a process of the memory cgroup `cgroup_id` (0 when
    /// it could not be read). Whether it was a cgroup or a system OOM is not in the record:
    /// compare `cgroup_usage_bytes` with `cgroup_limit_bytes`, or the cgroup's `oom_kill`.
    KernelOomVictim {
        pid: u32,
        cgroup_id: u64,
        cgroup_usage_bytes: u64,
        cgroup_limit_bytes: u64,
        rss_anon: u64,
        rss_file: u64,
        rss_shmem: u64,
        oom_score_adj: i32,
        ktime_ns: u64,
    },
    CgroupMkdir(CgroupDir),
    CgroupRmdir(CgroupDir),
}

/// An approach record (`kind::APPROACH`): only the loader reads these ([`super::on_demand`]).
pub(crate) fn approach(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    (kind == kind::APPROACH)
        .then(|| read::<Event>(bytes))
        .flatten()
}

impl Record {
    /// Decodes one ring-buffer item; `None` for an unknown kind or a short item.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
        match kind {
            kind::RECLAIM_CROSSED
            | kind::KILL_CROSSED
            | kind::AT_LIMIT
            | kind::KERNEL_OOM_VICTIM => {
                let e: Event = read(bytes)?;
                Some(match kind {
                    kind::RECLAIM_CROSSED | kind::KILL_CROSSED => Record::Crossing {
                        threshold: if kind == kind::KILL_CROSSED {
                            Threshold::Kill
                        } else {
                            Threshold::Reclaim
                        },
                        cgroup_id: e.cgroup_id,
                        usage_bytes: e.usage_bytes,
                        threshold_bytes: e.threshold_bytes,
                        pid: e.pid,
                        ktime_ns: e.ktime_ns,
                    },
                    kind::AT_LIMIT => Record::AtLimit {
                        cgroup_id: e.cgroup_id,
                        usage_bytes: e.usage_bytes,
                        limit_bytes: e.threshold_bytes,
                        pid: e.pid,
                        ktime_ns: e.ktime_ns,
                    },
                    _ => Record::KernelOomVictim {
                        pid: e.pid,
                        cgroup_id: e.cgroup_id,
                        cgroup_usage_bytes: e.usage_bytes,
                        cgroup_limit_bytes: e.threshold_bytes,
                        rss_anon: e.rss_anon,
                        rss_file: e.rss_file,
                        rss_shmem: e.rss_shmem,
                        oom_score_adj: e.oom_score_adj,
                        ktime_ns: e.ktime_ns,
                    },
                })
            }
            kind::CGROUP_MKDIR | kind::CGROUP_RMDIR => {
                let e: CgroupEvent = read(bytes)?;
                let len = (e.path_len as usize).min(e.path.len());
                let path = &e.path[..len];
                // bpf_probe_read_kernel_str counts the NUL.
                let path = path.strip_suffix(&[0]).unwrap_or(path);
                let dir = CgroupDir {
                    cgroup_id: e.cgroup_id,
                    level: e.level,
                    path: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
                    truncated: e.truncated != 0,
                    ktime_ns: e.ktime_ns,
                };
                Some(if kind == kind::CGROUP_MKDIR {
                    Record::CgroupMkdir(dir)
                } else {
                    Record::CgroupRmdir(dir)
                })
            }
            _ => None,
        }
    }

    /// The record's `bpf_ktime_get_ns` time stamp.
    pub fn ktime_ns(&self) -> u64 {
        match self {
            Record::Crossing { ktime_ns, .. }
            | Record::AtLimit { ktime_ns, .. }
            | Record::KernelOomVictim { ktime_ns, .. } => *ktime_ns,
            Record::CgroupMkdir(dir) | Record::CgroupRmdir(dir) => dir.ktime_ns,
        }
    }
}

/// Copies a `T` out of the start of `bytes` (ring-buffer items are only 8-byte aligned).
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes; `T` is one of the plain-integer
    // `#[repr(C)]` records, valid for any bit pattern; the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use oomguard_common::CGROUP_PATH_MAX;

    use super::*;

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain `#[repr(C)]` value without padding holes.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_kill_crossing() {
        let event = Event {
            kind: kind::KILL_CROSSED,
            pid: 42,
            cgroup_id: 7,
            ktime_ns: 99,
            usage_bytes: 1 << 20,
            threshold_bytes: 1000,
            ..Event::default()
        };
        assert_eq!(
            Record::decode(&bytes_of(&event)),
            Some(Record::Crossing {
                threshold: Threshold::Kill,
                cgroup_id: 7,
                usage_bytes: 1 << 20,
                threshold_bytes: 1000,
                pid: 42,
                ktime_ns: 99,
            })
        );
    }

    #[test]
    fn decodes_a_cgroup_path() {
        let mut event = CgroupEvent {
            kind: kind::CGROUP_RMDIR,
            level: 2,
            cgroup_id: 5,
            ktime_ns: 1,
            path_len: 5,
            truncated: 0,
            path: [0; CGROUP_PATH_MAX],
        };
        event.path[..5].copy_from_slice(b"/a/b\0");
        let Some(Record::CgroupRmdir(dir)) = Record::decode(&bytes_of(&event)) else {
            panic!("not an rmdir record");
        };
        assert_eq!(dir.path, PathBuf::from("/a/b"));
        assert_eq!((dir.cgroup_id, dir.level, dir.truncated), (5, 2, false));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(Record::decode(&[]), None);
        assert_eq!(Record::decode(&kind::AT_LIMIT.to_ne_bytes()), None);
        let unknown = Event {
            kind: 77,
            ..Event::default()
        };
        assert_eq!(Record::decode(&bytes_of(&unknown)), None);
    }
}
