//! `raw_tp/count_memcg_events`: threshold crossings, seen at the charge that makes them.
//!
//! On cgroup v1 the kernel counts `PGPGIN` for every charge committed to a memcg (and `PGPGOUT`
//! for every uncharge) through `count_memcg_events(struct mem_cgroup *, item, val)`, after the
//! page counter moved. So at each of these events the program reads the usage of the charged
//! memcg and of its ancestors (a charge counts against each of them), and for every guarded one
//! compares it with the thresholds in `THRESHOLDS`. Crossings are edge-triggered: the first CPU
//! to see usage at or above a threshold sets the cgroup's "above" bit with an atomic `fetch_or`
//! and sends the one record; the bit is cleared once usage falls `rearm_bytes` below.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use aya_log_ebpf::warn;
use oomguard_common::{Event, MAX_CGROUP_DEPTH, Thresholds, kind, state};

use crate::{
    THRESHOLDS, atomic,
    kernel::{self, Result, offset},
};

#[raw_tracepoint(tracepoint = "count_memcg_events")]
pub fn memcg_pressure(ctx: RawTracePointContext) -> i32 {
    let _: Result<()> = try_memcg_pressure(&ctx);
    0
}

fn try_memcg_pressure(ctx: &RawTracePointContext) -> Result<()> {
    let page = kernel::page_size()?;
    let item = ctx.arg::<u64>(1) as u32;
    if item != offset!(pgpgin) && item != offset!(pgpgout) {
        return Ok(());
    }
    let mut memcg = ctx.arg::<u64>(0);
    for _ in 0..MAX_CGROUP_DEPTH {
        if memcg == 0 {
            break;
        }
        let id = kernel::memcg_id(memcg)?;
        if let Some(thresholds) = THRESHOLDS.get_ptr_mut(id) {
            let (usage, _max) = kernel::memcg_usage_and_max(memcg)?;
            check(ctx, thresholds, id, usage * page)?;
        }
        memcg = kernel::memcg_parent(memcg)?;
    }
    Ok(())
}

fn check(
    ctx: &RawTracePointContext,
    thresholds: *mut Thresholds,
    cgroup_id: u64,
    usage: u64,
) -> Result<()> {
    // SAFETY: the map value stays valid for this program run; the thresholds are only written
    // by user space, which replaces the whole value.
    let (reclaim, kill) = unsafe { ((*thresholds).reclaim_bytes, (*thresholds).kill_bytes) };
    // `state` is an aligned u32 in the map value, shared with other CPUs only through atomic
    // operations.
    // SAFETY: a field of the live map value.
    let bits = unsafe { core::ptr::addr_of_mut!((*thresholds).state) };
    let rearm = offset!(rearm_bytes);

    let crossed = if kill != 0 && usage >= kill {
        // SAFETY (all atomics below): `bits` points into the live map value.
        let before = unsafe { atomic::fetch_or(bits, state::ABOVE_KILL | state::ABOVE_RECLAIM) };
        (before & state::ABOVE_KILL == 0).then_some((kind::KILL_CROSSED, kill))
    } else if reclaim != 0 && usage >= reclaim {
        let before = unsafe { atomic::fetch_or(bits, state::ABOVE_RECLAIM) };
        (before & state::ABOVE_RECLAIM == 0).then_some((kind::RECLAIM_CROSSED, reclaim))
    } else {
        None
    };

    // Re-arm only after a real fall, so the per-CPU charge batches that make usage jitter
    // around a threshold do not produce a record each.
    let current = unsafe { atomic::load_u64(bits) };
    if current & state::ABOVE_KILL != 0 && usage.saturating_add(rearm) < kill {
        unsafe { atomic::fetch_and(bits, !state::ABOVE_KILL) };
    }
    if current & state::ABOVE_RECLAIM != 0 && usage.saturating_add(rearm) < reclaim {
        unsafe { atomic::fetch_and(bits, !state::ABOVE_RECLAIM) };
    }

    let Some((kind, threshold)) = crossed else {
        return Ok(());
    };
    kernel::emit(&Event {
        kind,
        pid: (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32,
        cgroup_id,
        ktime_ns: kernel::now_ns(),
        usage_bytes: usage,
        threshold_bytes: threshold,
        ..Event::default()
    })
    .inspect_err(|_| {
        // The edge bit is set, so no record comes for this crossing: say so.
        warn!(
            ctx,
            "ring buffer full: crossing record (kind {}) of memcg {} dropped; its eventfd still reports it",
            kind,
            cgroup_id
        );
    })
}
