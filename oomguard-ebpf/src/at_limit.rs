//! `tracepoint/vmscan/mm_vmscan_memcg_reclaim_begin`: a task entered memcg reclaim.
//!
//! The kernel reclaims from a memcg when a charge does not fit under the limit of that memcg or
//! of one of its ancestors; the tracepoint fires in the charging task and carries no memcg. So
//! the program attributes the task to its v1 memory cgroup through
//! `task->cgroups->subsys[memory_cgrp_id]` (`bpf_get_current_cgroup_id` is the cgroup v2 id)
//! and walks up to the guarded cgroups whose usage is within `at_limit_slack_bytes` of their
//! limit: those are at the limit right now. At most one record per cgroup per
//! `at_limit_interval_ns`, claimed with a compare-and-swap on the last record's time.

use aya_ebpf::{helpers::bpf_get_current_task, macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use oomguard_common::{Event, MAX_CGROUP_DEPTH, Thresholds, kind};

use crate::{
    THRESHOLDS, atomic,
    kernel::{self, Result, offset},
};

#[tracepoint(category = "vmscan", name = "mm_vmscan_memcg_reclaim_begin")]
pub fn at_limit(ctx: TracePointContext) -> u32 {
    let _: Result<()> = try_at_limit(&ctx);
    0
}

fn try_at_limit(ctx: &TracePointContext) -> Result<()> {
    let page = kernel::page_size()?;
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let mut memcg = kernel::task_memcg(task)?;
    for _ in 0..MAX_CGROUP_DEPTH {
        if memcg == 0 {
            break;
        }
        let id = kernel::memcg_id(memcg)?;
        if let Some(thresholds) = THRESHOLDS.get_ptr_mut(id) {
            let (usage, max) = kernel::memcg_usage_and_max(memcg)?;
            let (usage, limit) = (usage * page, kernel::pages_to_bytes(max, page));
            if usage.saturating_add(offset!(at_limit_slack_bytes)) >= limit
                && let Some(claimed) = claim(thresholds)
            {
                kernel::emit(&Event {
                    kind: kind::AT_LIMIT,
                    pid: kernel::task_tgid(task)?,
                    cgroup_id: id,
                    // The claimed time, so records are as far apart as the rate limit says.
                    ktime_ns: claimed,
                    usage_bytes: usage,
                    threshold_bytes: limit,
                    ..Event::default()
                })
                .inspect_err(|_| {
                    warn!(
                        ctx,
                        "ring buffer full: at-limit record of memcg {} dropped", id
                    );
                })?;
            }
        }
        memcg = kernel::memcg_parent(memcg)?;
    }
    Ok(())
}

/// Whether this CPU may send the cgroup's next at-limit record (rate limit): the time it
/// claimed, if so.
fn claim(thresholds: *mut Thresholds) -> Option<u64> {
    let now = kernel::now_ns();
    // SAFETY (all three): an aligned u64 of the live map value, shared with other CPUs only
    // through atomic operations.
    let last = unsafe { core::ptr::addr_of_mut!((*thresholds).last_at_limit_ns) };
    let before = unsafe { atomic::load_u64(last) };
    if before != 0 && now.saturating_sub(before) < offset!(at_limit_interval_ns) {
        return None;
    }
    unsafe { atomic::compare_exchange(last, before, now) }.then_some(now)
}
