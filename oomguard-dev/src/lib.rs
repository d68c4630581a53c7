//! What does not ship with the agent: the pieces the demo, the tests and the benchmarks
//! share. The agent crate (`oomguard`) holds only what runs on a node.
//! - [`sandbox`]: throw-away cgroups beneath our own and a running agent; the private
//!   containerd harness.
//! - [`soak`]: the "no growth" soak (kills and cgroup cycles against a running agent).
//! - [`demo`]: the guard at work on a sandbox (`cargo xtask run`).
//! - [`fixture`]: the integration tests' fixtures (require-or-skip, starting an agent,
//!   workloads, a loopback API server, the private containerd with failures as panics).
//!
//! Binaries: `oomguard-memhog` (a memory hog at a controlled rate), `oomguard-bench`
//! (`cargo xtask bench`) and `oomguard-demo`.

pub mod demo;
pub mod fixture;
pub mod sandbox;
pub mod soak;
