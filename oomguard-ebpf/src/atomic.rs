//! Atomic read-modify-write on map values.
//!
//! `core::sync::atomic` on the BPF target offers only loads and stores; the instructions exist
//! (BPF_ATOMIC with BPF_FETCH and BPF_CMPXCHG, kernel 5.12+), so the intrinsics are used
//! directly. 64-bit only: without ALU32 (bpf-linker runs with CPU "generic") LLVM has no
//! 32-bit atomic fetch operations.

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_cxchg, atomic_or};

/// `*dst |= bits`, returning the previous value.
///
/// # Safety
/// `dst` must be valid and aligned for the whole program run (a map value is).
pub unsafe fn fetch_or(dst: *mut u64, bits: u64) -> u64 {
    // SAFETY: upheld by the caller.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(dst, bits) }
}

/// `*dst &= bits`, returning the previous value.
///
/// # Safety
/// As [`fetch_or`].
pub unsafe fn fetch_and(dst: *mut u64, bits: u64) -> u64 {
    // SAFETY: upheld by the caller.
    unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(dst, bits) }
}

/// Load of a `u64` shared with other CPUs. An aligned BPF load is single-copy atomic; LLVM's
/// BPF backend (CPU "generic", as bpf-linker is invoked) cannot select an atomic-load node, so
/// this is a volatile read.
///
/// # Safety
/// As [`fetch_or`].
pub unsafe fn load_u64(src: *const u64) -> u64 {
    // SAFETY: upheld by the caller.
    unsafe { core::ptr::read_volatile(src) }
}

/// Stores `new` if `*dst == old`; true when it did.
///
/// # Safety
/// As [`fetch_or`].
pub unsafe fn compare_exchange(dst: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: upheld by the caller.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(dst, old, new)
    }
    .1
}
