#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The "no growth" soak, short (`oomguard-bench --soak` is the long one): after a warm-up,
//! 100 kills and 100 cgroup create/delete cycles must leave the agent with the same number
//! of open files (no eventfd, `cgroup.event_control` or pidfd leaked) and less than 2 MiB
//! more RSS.

use oomguard_dev::fixture;
use std::path::PathBuf;
use std::time::Duration;

use oomguard_dev::soak::{self, Footprint, Plan};

/// RSS the agent may gain over 100 kills and 100 cycles after its warm-up.
const RSS_GROWTH_KIB: u64 = 2048;

/// A state directory of this test's own (the agent's control socket), removed on drop.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn soak(mode: &str) {
    let _serial = fixture::serial();
    // Room for every child's limit: the root is guarded too, but never crosses.
    let sb = fixture::sandbox(&format!("soak-{mode}"), 1 << 30);
    let state = StateDir(
        std::env::temp_dir().join(format!("oomguard-test-soak-{mode}-{}", std::process::id())),
    );
    let state_arg = state.0.display().to_string();
    let mut flags = vec!["--mode", mode, "--state-dir", &state_arg];
    flags.extend_from_slice(soak::AGENT_ARGS);
    let agent = fixture::start_agent(&sb.cg, &flags);
    let plan = Plan {
        kill_cgroups: 4,
        // Enough to fault in the kill and arm paths. The agent's recent-events ring (512
        // decisions) is not full yet, so part of the RSS allowance goes to the 100
        // decisions it gains; the bench's soak fills it first.
        warmup_kills: 50,
        warmup_cycles: 20,
        kills: 100,
        cycles: 100,
        cycle_batch: 10,
    };
    let out = soak::run(
        &agent,
        &sb.cg,
        &fixture::memhog(),
        &plan,
        Duration::from_secs(120),
        &mut |line| eprintln!("soak ({mode}): {line}"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "soak ({mode}): {}; the agent's last records: {:#?}",
            oomguard::error_line(&e),
            agent.records().iter().rev().take(20).collect::<Vec<_>>()
        )
    });
    let show = |f: &Footprint| {
        format!(
            "{} fds, RSS {} KiB (anon {} KiB), {} threads",
            f.fds, f.rss_kib, f.rss_anon_kib, f.threads
        )
    };
    eprintln!(
        "soak ({mode}): warm-up {:.1} s, kills {:.1} s (kernel kills {}), cycles {:.1} s\n  \
         before:       {}\n  after kills:  {}\n  after cycles: {}",
        out.warmup_s,
        out.kills_s,
        out.kills.kernel,
        out.cycles_s,
        show(&out.before),
        show(&out.after_kills),
        show(&out.after_cycles)
    );
    assert_eq!(out.kills.agent, plan.kills);
    for (phase, after) in [("kills", &out.after_kills), ("cycles", &out.after_cycles)] {
        assert_eq!(
            after.fds, out.before.fds,
            "the agent holds {} files after the {phase}, {} before: a leak",
            after.fds, out.before.fds
        );
        assert!(
            after.rss_kib < out.before.rss_kib + RSS_GROWTH_KIB,
            "the agent's RSS grew from {} KiB to {} KiB over the {phase}",
            out.before.rss_kib,
            after.rss_kib
        );
    }
}

#[test]
fn no_growth_eventfd_mode() {
    if !fixture::kernel_ready() {
        return;
    }
    soak("eventfd");
}

#[test]
fn no_growth_ebpf_mode() {
    if !fixture::kernel_ready() || !fixture::ebpf_ready() {
        return;
    }
    soak("ebpf");
}
