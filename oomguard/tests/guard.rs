//! The guard against the real kernel OOM killer, on real cgroups beneath our own.
//!
//! Margins here are chosen so a correct agent wins every time (see README "Tests"); the
//! razor's-edge cases (1 MiB margins, unthrottled 32 MiB cgroups) belong to the benchmark.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oomguard::cgroup::DEFAULT_MEMORY_ROOT;
use oomguard::config::RunArgs;
use oomguard::guard::{Armed, Cmd, Deps};
use oomguard::report::Action;
use oomguard_dev::fixture::*;

/// Whether crossings come from the memcg charge path itself (`count_memcg_events`), not from
/// the rss counters.
fn charge_path_crossings() -> bool {
    oomguard::bpf::capabilities()
        .programs
        .iter()
        .any(|p| p.program == "memcg_pressure" && p.wanted())
}

/// Allocates past `limit` at `rate` and checks the agent, not the kernel, killed it.
fn kills_before_the_kernel(rate: &str, mode: &str) {
    if !kernel_ready() || (mode == "ebpf" && !ebpf_ready()) {
        return;
    }
    let _serial = serial();
    let sb = sandbox("guard-race", 256 * M);
    let agent = launch(&sb.cg.path)
        .args(WINNABLE)
        .args(&["--mode", mode])
        .start();
    let mut hog = hog(&sb.cg, &["--rate", rate, "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    let decision = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_agent_won(&sb.cg, st, &decision);
    let k = killed(&decision);
    assert_eq!(
        k[0]["pid"].as_u64(),
        Some(u64::from(hog.id())),
        "{decision:#}"
    );
    assert_eq!(k[0]["outcome"], "exited");
    let t = oomguard::threshold::Margins {
        ratio: 0.1,
        min: M,
        max: 50 * M,
    }
    .thresholds(256 * M)
    .unwrap();
    assert_eq!(decision["threshold"].as_u64(), Some(t.kill));
    if mode == "ebpf" && charge_path_crossings() {
        // The eBPF crossing record is emitted at the charge that crosses; the eventfd
        // notifier trails it (rate-limited per CPU): the record must be what woke the guard.
        // The charge program is attached on demand, when the cgroup came within 64 MiB (at
        // most half) of its reclaim threshold: that attach came first.
        let attached = agent
            .records()
            .into_iter()
            .find(|r| {
                r["message"] == "a guarded cgroup is near its thresholds: charge program attached"
            })
            .unwrap_or_else(|| panic!("no attach record: {:#?}", agent.records()));
        eprintln!(
            "{mode} rate {rate}: charge program attached in {} us, {} us after the approach record",
            attached["attach_us"], attached["since_record_us"]
        );
        // Where only rss_stat carries crossings (kernels without count_memcg_events), the
        // record follows the mm's rss counters, which pre-6.2 kernels fold in only every 64
        // page events per thread: either signal may come first there.
        assert_eq!(decision["signal"], "ebpf", "{decision:#}");
        assert_eq!(sb.cg.failcnt().unwrap(), 0, "the limit was hit");
    }
    assert!(decision["usage"].as_u64().unwrap() >= t.kill);
    eprintln!(
        "{mode} rate {rate}: signal {}, usage at decision {} (threshold {}), peak {}, failcnt {}, wake-to-kill {} us",
        decision["signal"],
        decision["usage"],
        t.kill,
        sb.cg.max_usage().unwrap(),
        sb.cg.failcnt().unwrap(),
        decision["wake_to_kill_us"]
    );
}

#[test]
fn kills_before_the_kernel_at_50_mb_per_s() {
    kills_before_the_kernel("50M", "eventfd");
}

#[test]
fn kills_before_the_kernel_at_50_mb_per_s_ebpf_mode() {
    kills_before_the_kernel("50M", "ebpf");
}

#[test]
fn kills_before_the_kernel_at_200_mb_per_s() {
    kills_before_the_kernel("200M", "eventfd");
}

#[test]
fn kills_before_the_kernel_at_200_mb_per_s_ebpf_mode() {
    kills_before_the_kernel("200M", "ebpf");
}

#[test]
fn kills_before_the_kernel_unthrottled() {
    kills_before_the_kernel("0", "eventfd");
}

#[test]
fn kills_before_the_kernel_unthrottled_ebpf_mode() {
    kills_before_the_kernel("0", "ebpf");
}

#[test]
fn noop_leaves_the_job_to_the_kernel() {
    noop(&["--mode", "eventfd"]);
}

/// In eBPF mode the `mark_victim` record names the kernel's victim in the report.
#[test]
fn noop_leaves_the_job_to_the_kernel_ebpf_mode_names_the_victim() {
    // The victim's name comes from the mark_victim program (per-program checks: its
    // prototype differs on some kernels).
    if !programs_ready(&["mark_victim"]) {
        return;
    }
    let kernel = noop(&["--mode", "ebpf"]);
    if kernel.is_null() {
        return;
    }
    let v = killed(&kernel);
    assert_eq!(v.len(), 1, "{kernel:#}");
    assert_eq!(v[0]["comm"], "oomguard-memhog", "{kernel:#}");
    assert!(v[0]["rss_bytes"].as_u64().unwrap() > 64 * M, "{kernel:#}");
}

fn noop(mode: &[&str]) -> serde_json::Value {
    if !kernel_ready() {
        return serde_json::Value::Null;
    }
    let _serial = serial();
    let sb = sandbox("guard-noop", 128 * M);
    let mut args = vec!["--policy", "noop", "--margin-ratio", "0.1"];
    args.extend_from_slice(mode);
    let agent = start_agent(&sb.cg, &args);
    let mut hog = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    let would = agent
        .wait_for(Duration::from_secs(5), |v| v["action"] == "would-kill")
        .unwrap_or_else(|| panic!("no would-kill decision; log: {:#?}", agent.records()));
    assert_eq!(killed(&would)[0]["pid"].as_u64(), Some(u64::from(hog.id())));
    assert!(
        sb.cg.subtree_oom_kills() >= 1,
        "the kernel should have killed it"
    );
    let kernel = agent
        .wait_for(Duration::from_secs(5), |v| v["action"] == "kernel-oom")
        .unwrap_or_else(|| {
            panic!(
                "the kernel OOM was not reported; log: {:#?}",
                agent.records()
            )
        });
    assert!(agent.decisions("kill").is_empty());
    let v = killed(&kernel);
    if let Some(v) = v.first() {
        assert_eq!(v["pid"].as_u64(), Some(u64::from(hog.id())), "{kernel:#}");
    }
    kernel
}

/// Three tasks; the one crossing the threshold is not the biggest: the biggest is killed.
#[test]
fn the_biggest_of_several_tasks_is_chosen() {
    let Some(sb) = setup(kernel_ready, "guard-biggest", 128 * M) else {
        return;
    };
    let a = sb.child("a").unwrap();
    let b = sb.child("b").unwrap();
    let agent = start_agent(&sb.cg, WINNABLE);
    let mut small = hog(&a, &["--total", "10M"]);
    let mut big = hog(&b, &["--total", "70M"]);
    wait_rss(&small, 10 * M, Duration::from_secs(10));
    wait_rss(&big, 70 * M, Duration::from_secs(10));
    let mut grower = hog(&sb.cg, &["--rate", "20M", "--total", "50M"]);
    let decision = agent
        .wait_for(Duration::from_secs(20), |v| v["action"] == "kill")
        .unwrap_or_else(|| {
            panic!(
                "no kill; usage {:?}, grower {:?}, log: {:#?}",
                sb.cg.usage(),
                grower.try_wait(),
                agent.records()
            )
        });
    let k = killed(&decision);
    assert_eq!(
        k[0]["pid"].as_u64(),
        Some(u64::from(big.id())),
        "{decision:#}"
    );
    assert_eq!(k[0]["proccgroup"].as_str(), Some(b.path.to_str().unwrap()));
    assert!(killed_by_sigkill(wait_exit(
        &mut big,
        Duration::from_secs(5)
    )));
    // The others keep running and the grower finishes below the threshold.
    assert!(wait_exit(&mut grower, Duration::from_secs(5)).is_none());
    assert!(small.try_wait().unwrap().is_none());
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
}

/// oom_score_adj shifts the choice like the kernel's rule; adj -1000 is never chosen.
#[test]
fn oom_score_adj_is_honoured() {
    let Some(sb) = setup(kernel_ready, "guard-adj", 128 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, WINNABLE);
    // 60 MiB at adj -1000 if this machine lets us set it (needs CAP_SYS_RESOURCE), else at
    // adj 0; 10 MiB at adj +1000 beats it either way.
    let can_protect = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("CapEff:") && cap_sys_resource(l))
        })
        .unwrap_or(false);
    let protected_adj = if can_protect { "-1000" } else { "0" };
    if !can_protect {
        eprintln!(
            "note: no CAP_SYS_RESOURCE here, so no task can get oom_score_adj -1000; \
             that rule is pinned by victim::tests::never_adj_min_exiting_or_self"
        );
    }
    let mut big = hog(&sb.cg, &["--total", "60M", "--adj", protected_adj]);
    let mut favoured = hog(&sb.cg, &["--total", "10M", "--adj", "1000"]);
    wait_rss(&big, 60 * M, Duration::from_secs(10));
    wait_rss(&favoured, 10 * M, Duration::from_secs(10));
    let mut grower = hog(&sb.cg, &["--rate", "20M", "--total", "60M"]);
    let decision = agent
        .wait_for(Duration::from_secs(20), |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    let k = killed(&decision);
    assert_eq!(
        k[0]["pid"].as_u64(),
        Some(u64::from(favoured.id())),
        "{decision:#}"
    );
    assert_eq!(k[0]["oom_score_adj"].as_i64(), Some(1000));
    assert!(killed_by_sigkill(wait_exit(
        &mut favoured,
        Duration::from_secs(5)
    )));
    assert!(
        big.try_wait().unwrap().is_none(),
        "the big task must survive"
    );
    if can_protect {
        // Still above the threshold: the next victim must be the grower, never `big`.
        let second = agent
            .wait_for(Duration::from_secs(20), |v| v["action"] == "kill")
            .unwrap_or_else(|| panic!("no second kill; log: {:#?}", agent.records()));
        assert_eq!(
            killed(&second)[0]["pid"].as_u64(),
            Some(u64::from(grower.id()))
        );
        assert!(
            big.try_wait().unwrap().is_none(),
            "adj -1000 must never be killed"
        );
    }
    let _ = grower.kill();
    let _ = grower.wait();
}

fn cap_sys_resource(capeff_line: &str) -> bool {
    let hex = capeff_line.trim_start_matches("CapEff:").trim();
    u64::from_str_radix(hex, 16).is_ok_and(|c| c & (1 << 24) != 0)
}

/// A writer that fills the cgroup with page cache is not killed: the kernel reclaims it.
#[test]
fn page_cache_is_left_to_the_kernel() {
    let Some(sb) = setup(kernel_ready, "guard-cache", 128 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, WINNABLE);
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("oomguard-cache-{}", std::process::id()));
    let mut writer = hog(
        &sb.cg,
        &[
            "--file",
            file.to_str().unwrap(),
            "--rate",
            "200M",
            "--total",
            "400M",
            "--hold",
            "0",
        ],
    );
    let st = wait_exit(&mut writer, Duration::from_secs(60));
    let _ = std::fs::remove_file(&file);
    assert!(
        st.is_some_and(|s| s.success()),
        "the writer ended with {st:?}; log: {:#?}",
        agent.records()
    );
    assert!(
        agent.decisions("kill").is_empty(),
        "{:#?}",
        agent.decisions("kill")
    );
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    assert!(
        sb.cg.max_usage().unwrap() >= 100 * M,
        "the writer never got near the limit: the test proved nothing"
    );
}

/// Lowering the limit re-arms the threshold: a workload that fits the old limit but not
/// the new one is killed at the new threshold.
#[test]
fn a_limit_change_re_arms() {
    let Some(sb) = setup(kernel_ready, "guard-rearm", 512 * M) else {
        return;
    };
    let agent = launch(&sb.cg.path)
        .args(WINNABLE)
        .args(&["--walk-interval", "3600"])
        .start();
    sb.cg.set_limit(256 * M).unwrap();
    let margins = oomguard::threshold::Margins {
        ratio: 0.1,
        min: M,
        max: 50 * M,
    };
    let new = margins.thresholds(256 * M).unwrap();
    let rearmed = agent
        .wait_for(Duration::from_secs(5), |v| {
            v["message"] == "armed" && v["rearm"] == true
        })
        .unwrap_or_else(|| panic!("no re-arm; log: {:#?}", agent.records()));
    assert_eq!(rearmed["threshold"].as_u64(), Some(new.kill));
    let mut hog = hog(&sb.cg, &["--rate", "200M", "--total", "400M"]);
    let decision = agent
        .wait_for(Duration::from_secs(10), |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    assert_eq!(decision["threshold"].as_u64(), Some(new.kill));
    assert!(killed_by_sigkill(wait_exit(
        &mut hog,
        Duration::from_secs(5)
    )));
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
}

/// New cgroups are armed through inotify (the rescan is an hour away), removed ones
/// release their eventfds: 100 cycles leave the agent's fd count where it was.
#[test]
fn cgroup_churn_leaves_fds_flat() {
    let Some(sb) = setup(kernel_ready, "guard-churn", 512 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, &["--policy", "process", "--walk-interval", "3600"]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    for i in 0..100 {
        let child = sb.child(&format!("c{i}")).unwrap();
        child.set_limit(64 * M).unwrap();
        assert!(
            agent
                .wait_armed(&child.path, Duration::from_secs(5))
                .is_some(),
            "cycle {i}: not armed"
        );
        std::fs::remove_dir(&child.path).unwrap();
        let gone = child.path.display().to_string();
        assert!(
            agent
                .wait_for(Duration::from_secs(5), |v| v["message"]
                    == "cgroup removed; disarmed"
                    && v["cgroup"] == gone.as_str())
                .is_some(),
            "cycle {i}: not disarmed"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fds() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fds(),
        before,
        "the agent's fd count grew over 100 create/delete cycles"
    );
}

/// The guard thread runs SCHED_FIFO (field 41 of /proc/PID/task/TID/stat is the policy), the
/// agent's memory is locked, and it shields itself from the OOM killer where allowed.
#[test]
fn the_agent_protects_itself() {
    let Some(sb) = setup(kernel_ready, "guard-rt", 64 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, &["--policy", "noop", "--rt-priority", "7"]);
    let mut found = false;
    for t in std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "oomguard-guard" {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields counted from 3 (state): priority 40 is index 37, policy 41 index 38.
            assert_eq!(
                f[41 - 3],
                "1",
                "policy of the guard thread (1 = SCHED_FIFO)"
            );
            assert_eq!(f[40 - 3], "7", "rt priority of the guard thread");
            found = true;
        }
    }
    assert!(found, "no thread named oomguard-guard");
    // mlockall: the agent's pages are locked.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(locked_kib > 0, "VmLck is 0: mlockall did not take effect");
    // oom_score_adj -1000 needs CAP_SYS_RESOURCE, which not every test machine grants.
    let caps = std::fs::read_to_string("/proc/self/status").unwrap();
    if caps
        .lines()
        .any(|l| l.starts_with("CapEff:") && cap_sys_resource(l))
    {
        let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", agent.pid())).unwrap();
        assert_eq!(adj.trim(), "-1000");
    } else {
        eprintln!("note: no CAP_SYS_RESOURCE here: the agent cannot set oom_score_adj -1000");
    }
}

/// SIGTERM: a clean exit, status 0, within 5 s; in eBPF mode our pins are removed, and
/// what another tool keeps in the pin directory is not.
#[test]
fn sigterm_stops_the_agent_cleanly() {
    let Some(sb) = setup(kernel_ready, "guard-term", 64 * M) else {
        return;
    };
    let mode = if ebpf_ready() { "ebpf" } else { "eventfd" };
    let mut agent = start_agent(&sb.cg, &["--policy", "noop", "--mode", mode]);
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/oomguard-test-{}-{}",
        std::process::id(),
        sb.path().file_name().unwrap().to_str().unwrap()
    ));
    if mode == "ebpf" {
        assert!(
            pins.join("THRESHOLDS").exists(),
            "no pins at {}",
            pins.display()
        );
        // Not ours (bpffs holds only pins and directories): must survive our exit.
        std::fs::create_dir(pins.join("other-tool")).unwrap();
    }
    let st = agent.stop(Duration::from_secs(5));
    assert!(st.is_some_and(|s| s.success()), "exit: {st:?}");
    if mode == "ebpf" {
        let left: Vec<String> = std::fs::read_dir(&pins)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let _ = std::fs::remove_dir(pins.join("other-tool"));
        let _ = std::fs::remove_dir(&pins);
        assert_eq!(left, ["other-tool"], "in {}", pins.display());
    } else {
        assert!(!pins.exists(), "pins left behind at {}", pins.display());
    }
}

/// Whether the agent armed `cg` within `within`, and with which discovery path it saw it.
fn armed_after_mkdir(mode: &str, within: Duration) -> (bool, Vec<serde_json::Value>) {
    let sb = sandbox("mkdir-arm", 512 * M);
    // No inotify and a rescan an hour away: only the eBPF cgroup_mkdir program can tell the
    // agent about a cgroup made after start.
    let agent = start_agent(
        &sb.cg,
        &[
            "--policy",
            "process",
            "--mode",
            mode,
            "--no-inotify",
            "--walk-interval",
            "3600",
        ],
    );
    let child = sb.child("made-after-start").unwrap();
    child.set_limit(64 * M).unwrap();
    let armed = agent.wait_armed(&child.path, within).is_some();
    let path = child.path.display().to_string();
    let created = agent
        .records()
        .into_iter()
        .filter(|r| r["message"] == "cgroup created" && r["cgroup"] == path.as_str())
        .collect();
    if armed {
        // Guarded for real: a hog in it dies by the agent's hand, not the kernel's.
        let mut h = hog(&child, &["--rate", "200M", "--total", "1G"]);
        let st = wait_exit(&mut h, Duration::from_secs(30));
        assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
        assert_eq!(child.subtree_oom_kills(), 0, "the kernel had to act");
        agent
            .wait_for(Duration::from_secs(5), |v| {
                v["message"] == "decision"
                    && v["action"] == "kill"
                    && v["oomcgroup"] == path.as_str()
            })
            .unwrap_or_else(|| panic!("no kill decision; log: {:#?}", agent.records()));
    }
    (armed, created)
}

#[test]
fn a_cgroup_made_after_start_is_armed_via_the_mkdir_tracepoint() {
    if !kernel_ready() || !ebpf_ready() {
        return;
    }
    let _serial = serial();
    let (armed, created) = armed_after_mkdir("ebpf", Duration::from_secs(5));
    assert!(armed, "not armed within 5 s; created records: {created:#?}");
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!(created[0]["via"], "ebpf", "{created:#?}");
}

#[test]
fn without_ebpf_and_inotify_a_new_cgroup_waits_for_the_rescan() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    // The control for the test above: the same steps in eventfd mode arm nothing.
    let (armed, created) = armed_after_mkdir("eventfd", Duration::from_secs(2));
    assert!(!armed, "armed without eBPF or inotify: {created:#?}");
    assert!(created.is_empty(), "{created:#?}");
}

#[test]
fn a_hog_that_calls_itself_pause_is_still_killed() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    // The kernel names a task after the file it executed: a link named `pause` gives the
    // hog the sandbox's comm. Only small `pause` tasks are spared (kubelet's is < 1 MiB).
    let dir = std::env::temp_dir().join(format!("oomguard-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    let link = dir.join("pause");
    std::os::unix::fs::symlink(memhog(), &link).unwrap();
    let sb = sandbox("fake-pause", 256 * M);
    let agent = start_agent(&sb.cg, WINNABLE);
    let mut cmd = std::process::Command::new(&link);
    cmd.args(["--rate", "100M", "--total", "1G"])
        .stdout(std::process::Stdio::null());
    let mut h = oomguard_dev::sandbox::in_cgroup(&mut cmd, &sb.cg)
        .unwrap()
        .spawn()
        .unwrap();
    let st = wait_exit(&mut h, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "the fake pause ended with {st:?}");
    let d = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_eq!(killed(&d)[0]["comm"], "pause", "{d:#}");
    assert_eq!(sb.cg.subtree_oom_kills(), 0, "the kernel had to act: {d:#}");
}

/// The cooldown after a kill lasts until usage is seen below the threshold, and the reading
/// the guard takes right after its own kill counts. With many tasks growing together, one
/// kill brings usage under the threshold and the next crossing follows within milliseconds;
/// its signal (an eBPF crossing record is sent at the charge itself) can come before any
/// signal of the dip (the eventfd's downward notification is rate-limited), and a guard still
/// cooling down then let usage run on to the limit. The guard is driven here through an
/// eventfd the test writes instead of the kernel's notifier, so it reads usage only when
/// told to: nothing but the kill itself sees the dip, whatever the timing.
#[test]
fn a_crossing_right_after_a_kill_that_brought_usage_down_is_acted_on() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let limit = 256 * M;
    let sb = sandbox("guard-next-crossing", limit);
    let root = sb.cg.path.display().to_string();
    // An hour of cooldown and between re-checks: only the signals below make it look.
    let args: Vec<OsString> = [
        "--root",
        &root,
        "--policy",
        "process",
        "--margin-ratio",
        "0.1",
        "--cooldown-ms",
        "3600000",
        "--guard-ms",
        "3600000",
        "--rt-priority",
        "0",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let config = RunArgs::load(&args).unwrap().validate("test-node").unwrap();
    let thresholds = config.margins.thresholds(limit).unwrap();
    let (reporter, decisions) = oomguard::report::channel(16);
    let guard = oomguard::guard::spawn(Deps {
        config: Arc::new(config),
        reporter,
        reclaimer: None,
        memory_mount: PathBuf::from(DEFAULT_MEMORY_ROOT),
        runtime: None,
        ebpf: None,
        created: None,
        state: None,
        metrics: None,
    })
    .unwrap();
    // SAFETY: eventfd(2) with valid flags; the new fd is owned at once.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let signal = unsafe { OwnedFd::from_raw_fd(fd) };
    guard.send(Cmd::Arm(Box::new(Armed {
        cgroup: sb.cg.clone(),
        thresholds,
        kill_fd: Some(signal.try_clone().unwrap()),
        reclaim_fd: None,
        oom_fd: None,
    })));
    for round in 1..=2 {
        let mut h = hog(&sb.cg, &["--total", "236M"]);
        wait_rss(&h, 236 * M, Duration::from_secs(30));
        let usage = sb.cg.usage().unwrap();
        assert!(usage >= thresholds.kill, "round {round}: usage {usage}");
        assert!(usage < limit, "round {round}: usage {usage} at the limit");
        rustix::io::write(&signal, &1u64.to_ne_bytes()).unwrap();
        let d = decisions
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                panic!(
                    "round {round}: no decision for a cgroup at {usage} bytes (threshold {})",
                    thresholds.kill
                )
            });
        assert_eq!(d.action, Action::Kill, "round {round}: {d:#?}");
        assert_eq!(d.killed[0].pid, h.id() as i32, "round {round}: {d:#?}");
        assert!(
            killed_by_sigkill(wait_exit(&mut h, Duration::from_secs(10))),
            "round {round}: the hog was not killed"
        );
    }
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    guard.shutdown();
}
