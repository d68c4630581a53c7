//! Transition shim for test files written before the fixtures moved: use
//! `oomguard_dev::fixture` directly (this file goes once no test says `mod common;`).
#![allow(dead_code, unused_imports)]

pub use oomguard_dev::fixture::record_skip as skipped;
pub use oomguard_dev::fixture::*;

pub fn memhog_exe() -> std::path::PathBuf {
    memhog()
}
