//! Memsw limits (cgroup v1 with swap accounting) against the real kernel OOM killer: with
//! swap, a cgroup over its memory limit swaps instead of being killed, and the kernel's OOM
//! comes when memory + swap reach `memory.memsw.limit_in_bytes`. The agent guards such a
//! cgroup on `memory.memsw.usage_in_bytes` and kills before that.
//!
//! Each test switches on a swap file of its own (node-wide, for the test's duration only;
//! root tests run one at a time). The sandbox: memory limit 64 MiB, memsw limit 128 MiB, a
//! hog at 64 MB/s: past 64 MiB its memory is swapped out, memory usage stays at the memory
//! limit, memsw grows to its limit. Margins as in the guard tests, so a correct agent wins
//! every time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use oomguard::cgroup::{Counter, MemCgroup};
use oomguard::threshold::Margins;
use oomguard_dev::fixture::swap::SwapFile;
use oomguard_dev::fixture::*;

const LIMIT: u64 = 64 * M;
const MEMSW: u64 = 128 * M;
/// Enough for the memsw limit to bind (memsw limit < memory limit + swap).
const SWAP: u64 = 128 * M;

/// Where the swap file goes: the target's scratch directory (on disk), else `$TMPDIR` (a
/// kernel-matrix guest's ext4 disk).
fn swap_dirs() -> [PathBuf; 2] {
    [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ]
}

/// Swap on, this binary's tests serialised, and a sandbox with the memory and memsw limits.
fn setup(name: &str) -> Option<(SwapFile, std::sync::MutexGuard<'static, ()>, Sandbox)> {
    let _serial = serial();
    let dirs = swap_dirs();
    let swap = swap_ready(&[&dirs[0], &dirs[1]], SWAP)?;
    let sb = sandbox(name, LIMIT);
    oomguard::cgroup::write_str(
        &sb.cg.file("memory.memsw.limit_in_bytes"),
        &MEMSW.to_string(),
    )
    .expect("set the memsw limit");
    // Our own cgroup's swappiness is inherited; this one must swap.
    oomguard::cgroup::write_str(&sb.cg.file("memory.swappiness"), "60").expect("swappiness");
    Some((swap, _serial, sb))
}

fn winnable() -> Margins {
    Margins {
        ratio: 0.1,
        min: M,
        max: 50 * M,
    }
}

/// `total_swap` of the `memory.stat` a decision carries (a JSON string in the log).
fn swapped(decision: &serde_json::Value) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(decision["stats"].as_str().unwrap_or("{}")).unwrap();
    stats["total_swap"].as_u64().unwrap_or(0)
}

/// `memory.memsw.max_usage_in_bytes`. (`memory.memsw.failcnt` says nothing: on 6.18 it
/// read 0 after a memsw OOM, checked by hand; newer kernels track failures of the v1 memory
/// counter only.)
fn memsw_peak(cg: &MemCgroup) -> u64 {
    oomguard::cgroup::read_u64(&cg.file("memory.memsw.max_usage_in_bytes")).unwrap()
}

/// The agent arms the memsw counter, says so in its log and in `oomguard cgroups`, follows
/// changes of the memsw limit, and kills the hog before the kernel's memsw OOM.
#[test]
fn kills_before_the_memsw_oom() {
    let Some((swap, _serial, sb)) = setup("memsw-race") else {
        return;
    };
    let state = TempDir::new("memsw-state");
    let state_arg = state.path().display().to_string();
    let agent = launch(&sb.cg.path)
        .args(WINNABLE)
        .args(&["--state-dir", &state_arg])
        .start();
    let want = winnable().thresholds_on(Counter::Memsw, MEMSW).unwrap();
    // `start` waited for this record (and took it from the queue).
    let want_path = sb.cg.path.display().to_string();
    let armed = agent
        .records()
        .into_iter()
        .find(|v| v["message"] == "armed" && v["cgroup"] == want_path.as_str())
        .unwrap();
    assert_eq!(armed["counter"], "memsw", "{armed:#}");
    assert_eq!(armed["limit"], MEMSW);
    assert_eq!(armed["threshold"], want.kill);

    let (code, out, err) = oomguard(&["cgroups", "--json", "--state-dir", &state_arg]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = v
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"].as_str().map(Path::new) == Some(sb.cg.path.as_path()))
        .unwrap_or_else(|| panic!("{} not in {out}", sb.cg.path.display()))
        .clone();
    assert_eq!(ours["counter"], "memsw", "{ours:#}");
    assert_eq!(ours["limit"], MEMSW);
    let (code, table, err) = oomguard(&["cgroups", "--state-dir", &state_arg]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains(" memsw "), "{table}");

    // A write to the memsw limit re-arms at once (inotify): without one the memory limit
    // binds, and with it back, memsw.
    let memsw_file = sb.cg.file("memory.memsw.limit_in_bytes");
    oomguard::cgroup::write_str(&memsw_file, "-1").unwrap();
    let rearmed = agent.expect_armed(&sb.cg.path, Duration::from_secs(5));
    assert_eq!(rearmed["counter"], "memory", "{rearmed:#}");
    assert_eq!(rearmed["limit"], LIMIT);
    oomguard::cgroup::write_str(&memsw_file, &MEMSW.to_string()).unwrap();
    let rearmed = agent.expect_armed(&sb.cg.path, Duration::from_secs(5));
    assert_eq!(rearmed["counter"], "memsw", "{rearmed:#}");
    assert_eq!(rearmed["threshold"], want.kill);

    let mut hog = hog(&sb.cg, &["--rate", "64M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    let decision = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_agent_won(&sb.cg, st, &decision);
    let peak = memsw_peak(&sb.cg);
    assert!(peak < MEMSW, "the memsw limit was reached: peak {peak}");
    assert_eq!(decision["counter"], "memsw", "{decision:#}");
    assert_eq!(decision["threshold"], want.kill);
    assert_eq!(decision["limit"], MEMSW);
    let usage = decision["usage"].as_u64().unwrap();
    assert!(usage >= want.kill, "{decision:#}");
    let k = killed(&decision);
    assert_eq!(k[0]["pid"].as_u64(), Some(u64::from(hog.id())));
    assert!(swapped(&decision) > 0, "nothing swapped: {decision:#}");
    // The memory limit was reached long before: had the agent watched memory usage, it
    // would have killed there, where the kernel swapped instead.
    let memory_failcnt = sb.cg.failcnt().unwrap();
    assert!(memory_failcnt > 0, "the hog never reached the memory limit");
    eprintln!(
        "memsw: usage at decision {usage} (threshold {}), memsw peak {}, memory peak {}, \
         memory failcnt {memory_failcnt}, signal {}, wake-to-kill {} us, swap file {}",
        want.kill,
        peak,
        sb.cg.max_usage().unwrap(),
        decision["signal"],
        decision["wake_to_kill_us"],
        swap.path().display()
    );
}

/// The oracle: without the agent's kill (policy noop) the kernel lets the hog swap past
/// its memory limit and kills it at the memsw limit.
#[test]
fn the_kernel_kills_at_the_memsw_limit_not_the_memory_limit() {
    let Some((_swap, _serial, sb)) = setup("memsw-noop") else {
        return;
    };
    let agent = launch(&sb.cg.path)
        .args(&["--policy", "noop", "--margin-ratio", "0.1"])
        .start();
    let mut hog = hog(&sb.cg, &["--rate", "64M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    // The agent's would-kill came first, at its memsw threshold, then the kernel's kill.
    let would = expect_decision(&agent, "would-kill", Duration::from_secs(5));
    assert_eq!(would["counter"], "memsw", "{would:#}");
    assert!(swapped(&would) > 0, "nothing swapped: {would:#}");
    let kernel = expect_decision(&agent, "kernel-oom", Duration::from_secs(10));
    assert_eq!(kernel["counter"], "memsw", "{kernel:#}");
    assert!(sb.cg.subtree_oom_kills() >= 1);
    // Charges fall back to single pages at the limit: the peak is the limit itself. A kill
    // at the memory limit (swap out too slow) would leave it lower.
    let peak = memsw_peak(&sb.cg);
    assert!(
        peak >= MEMSW - M,
        "killed at memsw {peak}, not at its limit"
    );
    assert!(sb.cg.max_usage().unwrap() <= LIMIT);
    eprintln!(
        "memsw noop: memsw peak {peak}, memory peak {}, memory failcnt {}",
        sb.cg.max_usage().unwrap(),
        sb.cg.failcnt().unwrap()
    );
}
