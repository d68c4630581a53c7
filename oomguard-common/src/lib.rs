//! `#[repr(C)]` types shared between the oomguard agent and its eBPF programs.
#![no_std]
