//! oomguard: kill a memory cgroup's offender from user space, just before the kernel's
//! memcg OOM killer would have to.
//!
//! The crate is the agent's library and holds only what ships; `main.rs` only parses the
//! command line and wires these modules together. What does not ship (the benchmark, the
//! soak, sandboxes, memhog, the demo, the test fixtures) lives in the dev-only crate
//! `oomguard-dev`. Rooms, by domain:
//! - [`config`]: flags, validation and defaults (the upstream names).
//! - [`size`]: size strings (`30`, `512K`, `1Gi`).
//! - [`cgroup`]: memory cgroup files, v1 and v2 behind one interface; the node's layout.
//! - [`threshold`]: margin and threshold math; arming through `cgroup.event_control`.
//! - [`discovery`]: the walk, inotify and periodic rescan that feed the guard.
//! - [`guard`]: the real-time loop that wakes on threshold eventfds, decides and signals;
//!   its kill workers do the rest of each kill.
//! - [`counters`]: the guard's counters, shared with [`metrics`].
//! - [`headroom`]: the cgroup v2 fallback signals (`memory.events`, PSI, adaptive polling).
//! - [`reclaim`]: background `memory.force_empty` (v2: `memory.reclaim`), bounded in time.
//! - [`victim`]: scoring tasks with the kernel's `oom_badness` rule.
//! - [`policy`]: the per-cgroup episode state (crossed, acting, held, cooling down).
//! - [`decide`]: the decision rule, pure: whether the kernel would have to act, and
//!   whether a kill can help.
//! - [`kill`]: pidfd, `process_mrelease`, confirmation, fallback to `kill(2)`.
//! - [`report`]: decision records and their rendering.
//! - [`events`]: Kubernetes Events for kills (`OomGuardKillContainer`), retried and bounded.
//! - [`metrics`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`runtime`]: the container runtime (containerd over CRI labels) for the container
//!   policy, its health and the fallback kill of a container's tasks.
//! - [`sys`]: process-wide setup (real-time priority, `mlockall`, `oom_score_adj`).
//! - [`bpf`]: loading and attaching the eBPF programs.
//! - [`state`]: the running agent's view (guarded cgroups, recent events) for the debug CLI.
//! - [`control`]: the control socket that serves [`state`], and its client.
//! - [`cli`]: the command line (one clap tree, [`cli::args`]) and the debug subcommands
//!   (`doctor`, `bpf`, `cgroups`, `events`) with their one table renderer.
//! - [`telemetry`]: log setup; colour only on a terminal.

/// `error` and its sources (`#[source]` chain) as one line: "a: b: c".
pub fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod counters;
pub mod decide;
pub mod discovery;
pub mod events;
pub mod guard;
pub mod headroom;
pub mod kill;
pub mod metrics;
pub mod policy;
pub mod reclaim;
pub mod report;
pub mod runtime;
pub mod size;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod threshold;
pub mod victim;
