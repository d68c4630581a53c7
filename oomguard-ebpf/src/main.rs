//! eBPF programs of the oomguard agent, one module per hook.
//!
//! Built by `oomguard/build.rs` through aya-build (`cargo +nightly build --release
//! -Z build-std=core --target bpfel-unknown-none`); the agent embeds the resulting object.
//!
//! Rust eBPF has no CO-RE: every kernel struct offset, enum value and tracepoint record offset
//! comes from user space in the [`OFFSETS`] global (see `oomguard::bpf::offsets`), computed from
//! `/sys/kernel/btf/vmlinux` and tracefs. Kernel memory is only read with
//! `bpf_probe_read_kernel`, so a wrong offset yields an error, never a fault.
#![no_std]
#![no_main]
// The atomic intrinsics: see `atomic.rs`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod at_limit;
mod atomic;
mod cgroup_mkdir;
mod cgroup_rmdir;
mod crossing;
mod kernel;
mod mark_victim;
mod memcg_pressure;
mod oom_score_adj_update;
mod rss_stat;
mod sched_process_exit;
mod sched_process_fork;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use oomguard_common::{
    EVENTS_BYTE_SIZE, Offsets, TASKS_MAX_ENTRIES, THRESHOLDS_MAX_ENTRIES, TaskScore, Thresholds,
};

/// Kernel layout, written by user space before loading. All zero (`page_size == 0`) means it
/// was not set, and every program then returns at once.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets {
    page_size: 0,
    rearm_bytes: 0,
    at_limit_interval_ns: 0,
    at_limit_slack_bytes: 0,
    near_bytes: 0,
    approach_bytes: 0,
    memcg_css: 0,
    memcg_memory: 0,
    counter_usage: 0,
    counter_max: 0,
    css_cgroup: 0,
    css_parent: 0,
    css_serial_nr: 0,
    cgroup_kn: 0,
    kn_id: 0,
    task_pid: 0,
    task_tgid: 0,
    task_mm: 0,
    task_signal: 0,
    task_cgroups: 0,
    css_set_memory: 0,
    signal_oom_score_adj: 0,
    signal_live: 0,
    mm_owner: 0,
    mm_rss_stat: 0,
    mm_pgtables_bytes: 0,
    mm_counter_stride: 0,
    mm_counter_value: 0,
    mm_filepages: 0,
    mm_anonpages: 0,
    mm_swapents: 0,
    mm_shmempages: 0,
    pgpgin: 0,
    pgpgout: 0,
    memory_hierarchy_id: 0,
    tp_cgroup_root: 0,
    tp_cgroup_level: 0,
    tp_cgroup_id: 0,
    tp_cgroup_path: 0,
    _pad: 0,
};

/// Guarded cgroups: memcg id → thresholds and edge state. Filled by user space.
#[map]
static THRESHOLDS: HashMap<u64, Thresholds> = HashMap::with_max_entries(THRESHOLDS_MAX_ENTRIES, 0);

/// Per-process scores: tgid → rss, swap, page tables, oom_score_adj.
#[map]
static TASKS: LruHashMap<u32, TaskScore> = LruHashMap::with_max_entries(TASKS_MAX_ENTRIES, 0);

/// Bumped by user space after every change to `THRESHOLDS`: invalidates `WALK_CACHE`.
#[map]
static GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU: the guarded ancestors of the last memcg a crossing program saw.
#[map]
static WALK_CACHE: PerCpuArray<crossing::WalkCache> = PerCpuArray::with_max_entries(1, 0);

/// What `rss_stat` does (`oomguard_common::rss_roles`); 0 until user space has attached.
#[map]
static RSS_ROLES: Array<u32> = Array::with_max_entries(1, 0);

/// Per CPU: the rss counters `rss_stat` last saw.
#[map]
static RSS_MM: PerCpuArray<kernel::MmSlot> = PerCpuArray::with_max_entries(1, 0);

/// Records for user space (`oomguard_common::Event` and `CgroupEvent`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTE_SIZE, 0);

// Every fallible step returns a `Result` that the hook entry points discard, so no panic is
// reachable; the verifier would reject the object if one were.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
