//! Threshold crossings, checked at a charge: shared by the crossing programs
//! (`rss_stat`, and `memcg_pressure` on `count_memcg_events`).
//!
//! A charge counts against the charged memcg and each of its ancestors, so the guarded ones
//! among them are checked. Finding them means a walk up the hierarchy with a map lookup per
//! level; that walk is cached per CPU (`WALK_CACHE`) for the last memcg seen, keyed by its
//! address and `css.serial_nr` (unique for the boot, so a freed and reused `struct mem_cgroup`
//! is not mistaken for the cached one) and by `GENERATION`, which user space bumps after every
//! change to `THRESHOLDS`. With the cache warm, an unguarded memcg costs two reads, and a
//! guarded one a usage read per guarded ancestor; the thresholds (a hash lookup) are looked at
//! only while usage is within `near_bytes` of the lowest.
//!
//! Crossings are edge-triggered: the first CPU to see usage at or above a threshold sets the
//! cgroup's "above" bit with an atomic `fetch_or` and sends the one record; the bit is cleared
//! once usage falls `rearm_bytes` below.
//!
//! Approach (where user space sets `approach_bytes`: the charge program is attached on
//! demand): usage within `approach_bytes` of the lowest threshold sets the cgroup's `NEAR` bit
//! the same way and sends one `APPROACH` record, on which user space attaches the charge
//! program. The charge program (`on_charge`), which sees every charge and uncharge while it is
//! attached, clears the bit once usage is `approach_bytes + rearm_bytes` below; user space
//! detaches it when no guarded cgroup has the bit.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::warn;
use oomguard_common::{Event, MAX_CGROUP_DEPTH, MAX_GUARDED_ANCESTORS, Thresholds, kind, state};

use crate::{
    GENERATION, THRESHOLDS, WALK_CACHE, atomic,
    kernel::{self, Error, Result, offset},
};

/// The guarded ancestors (the memcg itself included) of one memcg, as last walked on this CPU.
#[repr(C)]
pub struct WalkCache {
    memcg: u64,
    serial: u64,
    generation: u64,
    count: u64,
    guarded: [Guarded; MAX_GUARDED_ANCESTORS],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Guarded {
    memcg: u64,
    id: u64,
    /// The lowest nonzero threshold, in bytes.
    lowest: u64,
}

/// Checks the guarded ancestors of `memcg` (a `struct mem_cgroup *`) for crossings; true when
/// one of them is within `near_bytes` of (or above) its lowest threshold. `on_charge`: the
/// caller is the charge program, which also clears the `NEAR` bits of cgroups gone far.
#[inline(always)]
pub fn check_memcg<C: EbpfContext>(ctx: &C, memcg: u64, on_charge: bool) -> Result<bool> {
    let page = kernel::page_size()?;
    let serial = kernel::memcg_serial(memcg)?;
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    let cache = WALK_CACHE.get_ptr_mut(0).ok_or(Error)?;
    // SAFETY: this CPU's value of the per-CPU map, valid for the whole run; programs on one
    // CPU do not interleave.
    let cache = unsafe { &mut *cache };
    if cache.memcg != memcg || cache.serial != serial || cache.generation != generation {
        walk(cache, memcg)?;
        cache.memcg = memcg;
        cache.serial = serial;
        cache.generation = generation;
    }
    let near = offset!(near_bytes);
    let mut any_near = false;
    for i in 0..MAX_GUARDED_ANCESTORS {
        if i as u64 >= cache.count {
            break;
        }
        let guarded = cache.guarded[i];
        // At most half the threshold: a small cgroup is not near from its first page on.
        let approach = offset!(approach_bytes).min(guarded.lowest / 2);
        let watch = if approach > near { approach } else { near };
        let usage = kernel::memcg_usage(guarded.memcg)? * page;
        if usage.saturating_add(watch) < guarded.lowest {
            if on_charge && approach != 0 {
                leave(guarded, usage, approach);
            }
            continue;
        }
        any_near |= usage.saturating_add(near) >= guarded.lowest;
        if let Some(thresholds) = THRESHOLDS.get_ptr_mut(guarded.id) {
            check(ctx, thresholds, guarded, usage, approach)?;
        }
    }
    Ok(any_near)
}

/// Clears the `NEAR` bit of a guarded cgroup whose usage is `approach + rearm_bytes` below its
/// lowest threshold (the charge program only: it runs while some cgroup is near, and sees
/// the uncharges that take usage down).
#[inline(always)]
fn leave(guarded: Guarded, usage: u64, approach: u64) {
    if usage.saturating_add(approach + offset!(rearm_bytes)) >= guarded.lowest {
        return;
    }
    let Some(thresholds) = THRESHOLDS.get_ptr_mut(guarded.id) else {
        return;
    };
    // SAFETY: a field of the live map value, shared only through atomic operations.
    let bits = unsafe { core::ptr::addr_of_mut!((*thresholds).state) };
    // SAFETY: `bits` points into the live map value.
    if unsafe { atomic::load_u64(bits) } & state::NEAR != 0 {
        unsafe { atomic::fetch_and(bits, !state::NEAR) };
    }
}

/// Fills `cache` with the guarded memcgs from `memcg` up.
#[inline(always)]
fn walk(cache: &mut WalkCache, mut memcg: u64) -> Result<()> {
    cache.count = 0;
    // A failed read leaves a stale key: reset it so the next run walks again.
    cache.memcg = 0;
    for _ in 0..MAX_CGROUP_DEPTH {
        if memcg == 0 {
            break;
        }
        let id = kernel::memcg_id(memcg)?;
        if let Some(thresholds) = THRESHOLDS.get_ptr(id) {
            // SAFETY: the map value stays valid for this program run; user space replaces
            // whole values.
            let (reclaim, kill) =
                unsafe { ((*thresholds).reclaim_bytes, (*thresholds).kill_bytes) };
            let lowest = match (reclaim, kill) {
                (0, kill) => kill,
                (reclaim, 0) => reclaim,
                (reclaim, kill) => reclaim.min(kill),
            };
            let n = cache.count as usize;
            if lowest != 0 && n < MAX_GUARDED_ANCESTORS {
                cache.guarded[n] = Guarded { memcg, id, lowest };
                cache.count += 1;
            }
        }
        memcg = kernel::memcg_parent(memcg)?;
    }
    Ok(())
}

fn check<C: EbpfContext>(
    ctx: &C,
    thresholds: *mut Thresholds,
    guarded: Guarded,
    usage: u64,
    approach: u64,
) -> Result<()> {
    let cgroup_id = guarded.id;
    // SAFETY: the map value stays valid for this program run; the thresholds are only written
    // by user space, which replaces the whole value.
    let (reclaim, kill) = unsafe { ((*thresholds).reclaim_bytes, (*thresholds).kill_bytes) };
    // `state` is an aligned u64 in the map value, shared with other CPUs only through atomic
    // operations.
    // SAFETY: a field of the live map value.
    let bits = unsafe { core::ptr::addr_of_mut!((*thresholds).state) };
    let rearm = offset!(rearm_bytes);

    if approach != 0 && usage.saturating_add(approach) >= guarded.lowest {
        // SAFETY: `bits` points into the live map value.
        let before = unsafe { atomic::fetch_or(bits, state::NEAR) };
        if before & state::NEAR == 0 {
            let sent = kernel::emit(&Event {
                kind: kind::APPROACH,
                pid: (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32,
                cgroup_id,
                ktime_ns: kernel::now_ns(),
                usage_bytes: usage,
                threshold_bytes: guarded.lowest,
                ..Event::default()
            });
            if sent.is_err() {
                // Not sent: the next charge tries again.
                // SAFETY: as above.
                unsafe { atomic::fetch_and(bits, !state::NEAR) };
            }
        }
    }

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
