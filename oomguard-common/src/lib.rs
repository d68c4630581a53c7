//! `#[repr(C)]` types and constants shared between the oomguard agent and its eBPF programs.
#![no_std]

/// Capacity of the `MEMCG_EVENTS` map (memcg id → event count). It is an LRU map, so beyond this
/// many cgroups the least recently active ones (typically deleted cgroups) are evicted.
pub const MEMCG_EVENTS_MAX_ENTRIES: u32 = 16_384;
