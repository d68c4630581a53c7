//! `#[repr(C)]` types and constants shared between the oomguard agent and its eBPF programs.
//!
//! Every type here crosses the user/kernel boundary byte for byte (map keys and values, ring
//! buffer records, the offsets global), so each has a size assertion; with the `user` feature
//! they implement `aya::Pod`.
#![no_std]

/// Capacity of the `THRESHOLDS` map (memcg id → [`Thresholds`]): the guarded cgroups (10,000
/// with room). A cgroup that does not fit is guarded by its eventfd (or the v2 fallback) alone.
pub const THRESHOLDS_MAX_ENTRIES: u32 = 16_384;

/// Capacity of the `TASKS` map (tgid → [`TaskScore`]) as compiled; user space sizes it at load
/// time from the node's process count (see `oomguard::bpf`), at most this. It is an LRU map: when
/// full, the least recently updated entry goes, and a process the map does not know is scored
/// from /proc.
pub const TASKS_MAX_ENTRIES: u32 = 131_072;

/// How many guarded ancestors of one memcg the crossing programs check at each charge; a
/// cgroup deeper in a chain of more guarded cgroups is left to its eventfd.
pub const MAX_GUARDED_ANCESTORS: usize = 4;

/// Size of the `EVENTS` ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTE_SIZE: u32 = 256 * 1024;

/// Bytes of a cgroup path kept in a [`CgroupEvent`]; longer paths are cut and flagged.
pub const CGROUP_PATH_MAX: usize = 480;

/// How deep the pressure program walks up from a charged memcg to its guarded ancestors.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Kinds of ring-buffer records: the first `u32` of every record.
pub mod kind {
    /// Usage crossed a cgroup's reclaim threshold upwards ([`super::Event`]).
    pub const RECLAIM_CROSSED: u32 = 1;
    /// Usage crossed a cgroup's kill threshold upwards ([`super::Event`]).
    pub const KILL_CROSSED: u32 = 2;
    /// A task of a guarded cgroup entered memcg reclaim: the cgroup is at its limit
    /// ([`super::Event`]).
    pub const AT_LIMIT: u32 = 3;
    /// The kernel OOM killer chose a victim (`oom:mark_victim`, [`super::Event`]).
    pub const KERNEL_OOM_VICTIM: u32 = 4;
    /// A cgroup was made in the memory hierarchy ([`super::CgroupEvent`]).
    pub const CGROUP_MKDIR: u32 = 5;
    /// A cgroup was removed from the memory hierarchy ([`super::CgroupEvent`]).
    pub const CGROUP_RMDIR: u32 = 6;
    /// A guarded cgroup's usage came within `approach_bytes` of its lowest threshold
    /// ([`super::Event`], `threshold_bytes`: that threshold): user space attaches the charge
    /// program (see [`super::state::NEAR`]).
    pub const APPROACH: u32 = 7;
}

/// Bits of [`Thresholds::state`].
pub mod state {
    /// Usage is above the reclaim threshold (a record was sent; no other until it falls back).
    pub const ABOVE_RECLAIM: u64 = 1;
    /// Usage is above the kill threshold.
    pub const ABOVE_KILL: u64 = 2;
    /// Usage came within `approach_bytes` of the lowest threshold (an
    /// [`super::kind::APPROACH`] record was sent); cleared by the charge program once usage
    /// is `approach_bytes + rearm_bytes` below it. User space keeps the charge program
    /// attached while any guarded cgroup has this bit.
    pub const NEAR: u64 = 4;
}

/// Kernel layout the programs need, computed by user space from BTF and tracefs and written
/// into the `OFFSETS` global before loading. A zero `page_size` means "not set": the programs
/// then do nothing.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offsets {
    pub page_size: u64,
    /// Hysteresis: a crossed threshold is re-armed once usage is this far below it.
    pub rearm_bytes: u64,
    /// Minimum gap between two at-limit records of one cgroup.
    pub at_limit_interval_ns: u64,
    /// A memcg in reclaim counts as at its limit when `usage + at_limit_slack_bytes >= max`:
    /// the charge that failed may be as large as a huge page.
    pub at_limit_slack_bytes: u64,
    /// The crossing programs look at a guarded cgroup's thresholds (a map lookup) only while
    /// its usage is within this many bytes of the lowest one: more than one charge can move
    /// usage (a huge page plus a charge batch), so no crossing or re-arm is skipped.
    pub near_bytes: u64,
    /// Usage this close to a guarded cgroup's lowest threshold sets its [`state::NEAR`] bit
    /// and sends a [`kind::APPROACH`] record; 0: no approach records (the charge program, if
    /// any, is attached all the time).
    pub approach_bytes: u64,
    /// `struct mem_cgroup`: `css` (a `struct cgroup_subsys_state`) and `memory` (a
    /// `struct page_counter`).
    pub memcg_css: u32,
    pub memcg_memory: u32,
    /// `struct page_counter`: `usage` and `max` (pages).
    pub counter_usage: u32,
    pub counter_max: u32,
    /// `struct cgroup_subsys_state`: `cgroup`, `parent`, `serial_nr` (unique for the boot:
    /// tells a reused `struct mem_cgroup` from the one cached).
    pub css_cgroup: u32,
    pub css_parent: u32,
    pub css_serial_nr: u32,
    /// `struct cgroup`: `kn`; `struct kernfs_node`: `id`.
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `struct task_struct`: `pid`, `tgid`, `mm`, `signal`, `cgroups`.
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_mm: u32,
    pub task_signal: u32,
    pub task_cgroups: u32,
    /// `struct css_set`: offset of `subsys[memory_cgrp_id]`.
    pub css_set_memory: u32,
    /// `struct signal_struct`: `oom_score_adj` (a `short`), `live` (threads not yet exited).
    pub signal_oom_score_adj: u32,
    pub signal_live: u32,
    /// `struct mm_struct`: `owner`, the first rss counter, `pgtables_bytes`.
    pub mm_owner: u32,
    pub mm_rss_stat: u32,
    pub mm_pgtables_bytes: u32,
    /// Distance between two rss counters and offset of the counter's value (an s64) in one:
    /// 6.2+ `struct percpu_counter rss_stat[]` (its size, `count`), before that
    /// `struct mm_rss_stat { atomic_long_t count[]; }` (8, 0).
    pub mm_counter_stride: u32,
    pub mm_counter_value: u32,
    /// Values of `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SWAPENTS`, `MM_SHMEMPAGES`.
    pub mm_filepages: u32,
    pub mm_anonpages: u32,
    pub mm_swapents: u32,
    pub mm_shmempages: u32,
    /// `enum vm_event_item`: `PGPGIN`, `PGPGOUT` (the v1 charge/uncharge events).
    pub pgpgin: u32,
    pub pgpgout: u32,
    /// Memory hierarchy id (`/proc/cgroups`), compared with `cgroup_mkdir`'s `root`.
    pub memory_hierarchy_id: u32,
    /// Tracepoint record offsets of `cgroup:cgroup_mkdir`/`cgroup_rmdir` (same layout):
    /// `root` (int), `level` (int), `id` (u64), `path` (`__data_loc char[]`).
    pub tp_cgroup_root: u32,
    pub tp_cgroup_level: u32,
    pub tp_cgroup_id: u32,
    pub tp_cgroup_path: u32,
    pub _pad: u32,
}

/// Bits of the `RSS_ROLES` map's one value, written by user space once it knows which
/// programs attached: one program on `rss_stat` does both jobs, so the tracepoint costs one
/// run and one counter read per event, not two.
pub mod rss_roles {
    /// Keep the `TASKS` scores.
    pub const SCORES: u32 = 1;
    /// Check the current task's memory cgroup for threshold crossings.
    pub const CROSSING: u32 = 2;
}

/// Value of the `THRESHOLDS` map, keyed by memcg id (the v1 directory's inode number).
/// User space writes the thresholds with `state = 0`; the pressure program keeps `state`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Thresholds {
    pub reclaim_bytes: u64,
    pub kill_bytes: u64,
    /// [`state`] bits, updated with atomic read-modify-write so that racing CPUs send one
    /// record per crossing. 64 bits: the BPF target's atomic fetch operations without ALU32
    /// are 64-bit only.
    pub state: u64,
    /// `bpf_ktime_get_ns` of the last at-limit record.
    pub last_at_limit_ns: u64,
}

/// Value of the `TASKS` map, keyed by tgid: what `oom_badness` needs, in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskScore {
    pub rss_file: u64,
    pub rss_anon: u64,
    /// Swap entries, as bytes (entries × page size).
    pub swap: u64,
    pub rss_shmem: u64,
    pub pgtables: u64,
    pub oom_score_adj: i32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last update (0 when seeded from /proc).
    pub updated_ns: u64,
}

/// A ring-buffer record of kinds [`kind::RECLAIM_CROSSED`], [`kind::KILL_CROSSED`],
/// [`kind::AT_LIMIT`] and [`kind::KERNEL_OOM_VICTIM`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Event {
    pub kind: u32,
    /// Crossings and at-limit: the charging task (tgid). Kernel OOM: the victim.
    pub pid: u32,
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    pub usage_bytes: u64,
    /// Crossings: the threshold crossed; at-limit: the limit (`page_counter.max`).
    pub threshold_bytes: u64,
    /// Kernel OOM victim only.
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
    pub oom_score_adj: i32,
    pub _pad: u32,
}

/// A ring-buffer record of kinds [`kind::CGROUP_MKDIR`] and [`kind::CGROUP_RMDIR`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupEvent {
    pub kind: u32,
    pub level: u32,
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    /// Bytes of `path` used (without a NUL).
    pub path_len: u32,
    /// Nonzero when the kernel's path was longer than [`CGROUP_PATH_MAX`] − 1 bytes.
    pub truncated: u32,
    /// Path relative to the hierarchy's root, as the tracepoint gives it (`/a/b`).
    pub path: [u8; CGROUP_PATH_MAX],
}

const _: () = {
    assert!(core::mem::size_of::<Offsets>() == 6 * 8 + 34 * 4);
    assert!(core::mem::size_of::<Thresholds>() == 32);
    assert!(core::mem::size_of::<TaskScore>() == 56);
    assert!(core::mem::size_of::<Event>() == 72);
    assert!(core::mem::size_of::<CgroupEvent>() == 32 + CGROUP_PATH_MAX);
    assert!(core::mem::offset_of!(Thresholds, state) == 16);
    assert!(core::mem::offset_of!(Event, kind) == 0);
    assert!(core::mem::offset_of!(CgroupEvent, kind) == 0);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these are `#[repr(C)]`, made of integers only, with explicit padding fields,
    // so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::Thresholds {}
    unsafe impl aya::Pod for super::TaskScore {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::CgroupEvent {}
}
