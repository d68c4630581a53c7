//! `tracepoint/memcg/count_memcg_events`: counts memcg events per memory cgroup.
//!
//! The kernel fires this tracepoint from `__count_memcg_events()` on every page fault
//! (PGFAULT/PGMAJFAULT) and, on cgroup v1, on every charge and uncharge batch
//! (PGPGIN/PGPGOUT), so a cgroup that faults in anonymous memory shows up here (checked on
//! Linux 6.18). The event's `id` field is the memcg's cgroup id, which on v1 is the inode number
//! of the cgroup's directory in the memory hierarchy.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{map, tracepoint},
    maps::LruPerCpuHashMap,
    programs::TracePointContext,
};
use oomguard_common::MEMCG_EVENTS_MAX_ENTRIES;

/// Offset of the `u64 id` field in the tracepoint record. User space reads it from
/// `events/memcg/count_memcg_events/format` in tracefs and sets it before loading; the record
/// layout is not a stable kernel ABI.
#[unsafe(no_mangle)]
static ID_OFFSET: u32 = 0;

/// Number of times the tracepoint fired, keyed by memcg id; user space sums the CPUs' counters.
/// Per-CPU because the BPF target has no atomic read-modify-write in `core`, and a plain
/// increment on a shared value would lose counts when CPUs race.
#[map]
static MEMCG_EVENTS: LruPerCpuHashMap<u64, u64> =
    LruPerCpuHashMap::with_max_entries(MEMCG_EVENTS_MAX_ENTRIES, 0);

/// Why an event went uncounted.
enum Error {
    /// User space did not set `ID_OFFSET` (offset 0 holds `common_type`, never `id`).
    OffsetUnset,
    /// Reading the record or updating the map failed.
    Helper,
}

#[tracepoint(category = "memcg", name = "count_memcg_events")]
pub fn count_memcg_events(ctx: TracePointContext) -> u32 {
    // Nothing to report a failure to: the event simply goes uncounted.
    let _: Result<(), Error> = try_count_memcg_events(&ctx);
    0
}

fn try_count_memcg_events(ctx: &TracePointContext) -> Result<(), Error> {
    // Volatile: the value is patched into the object after compilation, so the compiler must not
    // fold the initializer.
    let offset = unsafe { core::ptr::read_volatile(&ID_OFFSET) };
    if offset == 0 {
        return Err(Error::OffsetUnset);
    }
    // SAFETY: bpf_probe_read_kernel checks the access; a bad offset yields an error, not a fault.
    let id: u64 = unsafe { ctx.read_at(offset as usize) }.map_err(|_| Error::Helper)?;
    increment(id)
}

fn increment(id: u64) -> Result<(), Error> {
    if add_one(id) {
        return Ok(());
    }
    match MEMCG_EVENTS.insert(id, 1, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(()),
        // Another CPU created the entry between our lookup and insert: count in our slot of it.
        Err(_) if add_one(id) => Ok(()),
        Err(_) => Err(Error::Helper),
    }
}

/// Adds one to this CPU's counter of `id`; false when `id` has no entry.
fn add_one(id: u64) -> bool {
    match MEMCG_EVENTS.get_ptr_mut(id) {
        Some(counter) => {
            // SAFETY: the pointer is this CPU's aligned u64 slot of a live entry (the kernel keeps
            // it alive for the rest of this program run), and programs do not migrate between
            // CPUs, so nothing else writes it concurrently.
            unsafe { *counter += 1 };
            true
        }
        None => false,
    }
}
