//! Transition shim for test files written before the fixtures moved: use
//! `oomguard_dev::fixture` directly (this file goes once no test says `mod support;`).
#![allow(dead_code, unused_imports)]

pub use oomguard_dev::fixture::{
    HungSocket, REQUIRE_ENV, TempDir, apiserver, containerd, decision, hung_socket,
    stale_socket, wait_for,
};

/// Skips (true) or, under CI's switch, fails; [`oomguard_dev::fixture::require`] is the rule.
pub fn feature_missing(why: &str) -> bool {
    !oomguard_dev::fixture::require(Some(why.to_string()))
}
