//! Reading kernel structs through the offsets user space computed from BTF.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use oomguard_common::{CGROUP_PATH_MAX, CgroupEvent, Event, TaskScore};

use crate::EVENTS;

/// Ring-buffer flag: wake the reader now rather than at the kernel's discretion.
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// A failed kernel read, map update or ring-buffer reservation; the event is dropped.
pub struct Error;

pub type Result<T> = core::result::Result<T, Error>;

/// Reads one field of [`OFFSETS`]. Volatile: the global is patched into the object after
/// compilation, so the compiler must not fold its initializer.
macro_rules! offset {
    ($field:ident) => {{
        let field = core::ptr::addr_of!($crate::OFFSETS.$field);
        // SAFETY: a plain read of a field of a static.
        unsafe { core::ptr::read_volatile(field) }
    }};
}
pub(crate) use offset;

/// The page size, or an error when user space did not fill [`OFFSETS`].
#[inline(always)]
pub fn page_size() -> Result<u64> {
    match offset!(page_size) {
        0 => Err(Error),
        page => Ok(page),
    }
}

/// Reads a `T` at kernel address `base + off`.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T> {
    if base == 0 {
        return Err(Error);
    }
    // SAFETY: bpf_probe_read_kernel checks the access; a bad address yields an error.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.map_err(|_| Error)
}

/// The cgroup id of a `struct mem_cgroup`: `memcg->css.cgroup->kn->id`, the inode number of the
/// cgroup's directory in the v1 memory hierarchy.
#[inline(always)]
pub fn memcg_id(memcg: u64) -> Result<u64> {
    let cgroup: u64 = read(memcg, offset!(memcg_css) + offset!(css_cgroup))?;
    let kn: u64 = read(cgroup, offset!(cgroup_kn))?;
    read(kn, offset!(kn_id))
}

/// `memcg->memory.usage` and `memcg->memory.max`, in pages.
#[inline(always)]
pub fn memcg_usage_and_max(memcg: u64) -> Result<(u64, u64)> {
    let counter = offset!(memcg_memory);
    let usage: i64 = read(memcg, counter + offset!(counter_usage))?;
    let max: u64 = read(memcg, counter + offset!(counter_max))?;
    Ok((usage.max(0) as u64, max))
}

/// `memcg->memory.usage`, in pages.
#[inline(always)]
pub fn memcg_usage(memcg: u64) -> Result<u64> {
    let usage: i64 = read(memcg, offset!(memcg_memory) + offset!(counter_usage))?;
    Ok(usage.max(0) as u64)
}

/// `memcg->css.serial_nr`: never reused during a boot, unlike the struct's address.
#[inline(always)]
pub fn memcg_serial(memcg: u64) -> Result<u64> {
    read(memcg, offset!(memcg_css) + offset!(css_serial_nr))
}

/// The parent `struct mem_cgroup`, or 0 at the root.
#[inline(always)]
pub fn memcg_parent(memcg: u64) -> Result<u64> {
    let css = offset!(memcg_css);
    let parent_css: u64 = read(memcg, css + offset!(css_parent))?;
    Ok(if parent_css == 0 {
        0
    } else {
        parent_css - u64::from(css)
    })
}

/// The v1 memory cgroup of a task: `task->cgroups->subsys[memory_cgrp_id]`, as a
/// `struct mem_cgroup *`.
#[inline(always)]
pub fn task_memcg(task: u64) -> Result<u64> {
    let css_set: u64 = read(task, offset!(task_cgroups))?;
    let css: u64 = read(css_set, offset!(css_set_memory))?;
    if css == 0 {
        return Err(Error);
    }
    Ok(css - u64::from(offset!(memcg_css)))
}

#[inline(always)]
pub fn task_tgid(task: u64) -> Result<u32> {
    read(task, offset!(task_tgid))
}

#[inline(always)]
pub fn task_pid(task: u64) -> Result<u32> {
    read(task, offset!(task_pid))
}

/// The task's `mm`; 0 for kernel threads and tasks past `exit_mm`.
#[inline(always)]
pub fn task_mm(task: u64) -> Result<u64> {
    read(task, offset!(task_mm))
}

/// One of the mm's rss counters, in pages, as `get_mm_counter` reads it: on 6.2+ the shared
/// `count` of a `percpu_counter`, which trails the exact sum by at most a per-CPU batch on each
/// CPU; before, an `atomic_long_t` that trails by the tasks' unsynced split counts.
#[inline(always)]
fn mm_counter_raw(mm: u64, member: u32) -> Result<i64> {
    read(
        mm,
        offset!(mm_rss_stat) + member * offset!(mm_counter_stride) + offset!(mm_counter_value),
    )
}

#[inline(always)]
fn mm_counter(mm: u64, member: u32) -> Result<u64> {
    Ok(mm_counter_raw(mm, member)?.max(0) as u64)
}

/// The rss counters of one mm as a program last saw them on this CPU.
#[repr(C)]
pub struct MmSlot {
    mm: u64,
    counters: [i64; MM_SLOT_COUNTERS],
    /// Nonzero when the last crossing check for this mm found a guarded cgroup near its
    /// thresholds: then every event is checked, not only those that move the counter.
    pub near: u64,
}

/// `NR_MM_COUNTERS` on every kernel so far; a higher member is always treated as moved.
const MM_SLOT_COUNTERS: usize = 4;

/// Whether counter `member` of `mm` differs from what this CPU's `slots` entry saw last
/// (remembering the new value), and that entry for the caller. Most `rss_stat` events leave
/// the shared counter where it was: on 6.2+ it moves once per per-CPU batch.
#[inline(always)]
pub fn mm_counter_moved(
    slots: &PerCpuArray<MmSlot>,
    mm: u64,
    member: u32,
) -> Result<(bool, &mut MmSlot)> {
    let value = mm_counter_raw(mm, member)?;
    let slot = slots.get_ptr_mut(0).ok_or(Error)?;
    // SAFETY: this CPU's value of the per-CPU map, valid for the whole run; programs on one
    // CPU do not interleave.
    let slot = unsafe { &mut *slot };
    if slot.mm != mm {
        slot.mm = mm;
        slot.counters = [i64::MIN; MM_SLOT_COUNTERS];
        slot.near = 0;
    }
    let member = member as usize;
    if member >= MM_SLOT_COUNTERS {
        return Ok((true, slot));
    }
    if slot.counters[member] == value {
        return Ok((false, slot));
    }
    slot.counters[member] = value;
    Ok((true, slot))
}

/// Whether the task's thread group has no live thread left (`signal->live == 0`): at
/// `sched_process_exit`, true in the last thread to exit.
#[inline(always)]
pub fn group_dead(task: u64) -> Result<bool> {
    let signal: u64 = read(task, offset!(task_signal))?;
    let live: i32 = read(signal, offset!(signal_live))?;
    Ok(live == 0)
}

/// What `oom_badness` needs of a task with this `mm`.
#[inline(always)]
pub fn task_score(task: u64, mm: u64) -> Result<TaskScore> {
    let page = page_size()?;
    let pgtables: i64 = read(mm, offset!(mm_pgtables_bytes))?;
    let signal: u64 = read(task, offset!(task_signal))?;
    let adj: i16 = read(signal, offset!(signal_oom_score_adj))?;
    Ok(TaskScore {
        rss_file: mm_counter(mm, offset!(mm_filepages))? * page,
        rss_anon: mm_counter(mm, offset!(mm_anonpages))? * page,
        swap: mm_counter(mm, offset!(mm_swapents))? * page,
        rss_shmem: mm_counter(mm, offset!(mm_shmempages))? * page,
        pgtables: pgtables.max(0) as u64,
        oom_score_adj: i32::from(adj),
        _pad: 0,
        // SAFETY: a helper without arguments.
        updated_ns: unsafe { bpf_ktime_get_ns() },
    })
}

/// Sends `event` to user space and wakes it at once.
#[inline(always)]
pub fn emit(event: &Event) -> Result<()> {
    EVENTS
        .output::<Event>(event, BPF_RB_FORCE_WAKEUP)
        .map_err(|_| Error)
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Sends a `CgroupEvent` for a `cgroup:cgroup_mkdir`/`cgroup_rmdir` record (both have the same
/// layout) when the cgroup belongs to the memory hierarchy.
#[inline(always)]
pub fn emit_cgroup_event(ctx: &TracePointContext, kind: u32) -> Result<()> {
    let root: i32 = read_record(ctx, offset!(tp_cgroup_root))?;
    if page_size().is_err() || root as u32 != offset!(memory_hierarchy_id) {
        return Ok(());
    }
    let level: i32 = read_record(ctx, offset!(tp_cgroup_level))?;
    let cgroup_id: u64 = read_record(ctx, offset!(tp_cgroup_id))?;
    // `__data_loc`: the low 16 bits are the string's offset in the record, the high 16 its
    // length including the NUL.
    let loc: u32 = read_record(ctx, offset!(tp_cgroup_path))?;
    let (path_off, path_len) = (loc & 0xffff, loc >> 16);

    let mut entry = EVENTS.reserve::<CgroupEvent>(0).ok_or(Error)?;
    let record = entry.as_mut_ptr();
    let src = (ctx.as_ptr() as u64 + u64::from(path_off)) as *const u8;
    // SAFETY: `record` points at the reserved, writable entry; the string read is checked by
    // the helper and bounded by the destination.
    let copied = unsafe {
        let path = &mut *core::ptr::addr_of_mut!((*record).path);
        bpf_probe_read_kernel_str_bytes(src, path).map(|s| s.len())
    };
    let Ok(copied) = copied else {
        entry.discard(0);
        return Err(Error);
    };
    // SAFETY: as above, plain writes into the reserved entry.
    unsafe {
        (*record).kind = kind;
        (*record).level = level as u32;
        (*record).cgroup_id = cgroup_id;
        (*record).ktime_ns = now_ns();
        (*record).path_len = copied as u32;
        (*record).truncated = u32::from(path_len as usize > CGROUP_PATH_MAX);
    }
    entry.submit(BPF_RB_FORCE_WAKEUP);
    Ok(())
}

/// Reads a field of a tracepoint record.
#[inline(always)]
fn read_record<T>(ctx: &TracePointContext, offset: u32) -> Result<T> {
    // SAFETY: bpf_probe_read_kernel checks the access.
    unsafe { ctx.read_at(offset as usize) }.map_err(|_| Error)
}

/// `pages × page`, where the "unlimited" limit (`PAGE_COUNTER_MAX`, about 2^51 pages) and
/// anything above 2^40 pages (4 PiB of 4 KiB pages) become `u64::MAX`. No overflow check by
/// multiplication: the BPF target lacks the widening multiply it compiles to.
#[inline(always)]
pub fn pages_to_bytes(pages: u64, page: u64) -> u64 {
    if pages >= 1 << 40 {
        u64::MAX
    } else {
        pages * page
    }
}

/// Stores the score of process `tgid`: in place when it has an entry (no allocation, as a map
/// update would), else as a new entry.
#[inline(always)]
pub fn store_score(tgid: u32, score: &TaskScore) -> Result<()> {
    match crate::TASKS.get_ptr_mut(tgid) {
        Some(entry) => {
            // SAFETY: the entry stays valid for this program run; user space only reads it.
            unsafe { core::ptr::write(entry, *score) };
            Ok(())
        }
        None => crate::TASKS.insert(tgid, *score, 0).map_err(|_| Error),
    }
}
