//! The guard on cgroup v2, against the real kernel OOM killer, on real cgroups beneath our
//! own: the fallback signals (no eBPF: `--mode eventfd`), `memory.reclaim`, `cgroup.kill`
//! and kernel OOM reporting from `memory.events`. Not applicable (skipped, saying why) on a
//! node whose memory controller is on v1; they run in the kernel matrix's v2 guests.
//!
//! Margins are generous (10% of 256 MiB) and timeouts long: the guests are TCG VMs, 10–50×
//! slower than a node; these tests check behaviour, never speed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use oomguard::cgroup::MemCgroup;
use oomguard_dev::fixture::*;

const LONG: Duration = Duration::from_secs(120);

/// Allocates past the limit at `rate` with eBPF off: the fallback watcher's signal, not
/// the kernel, ends it.
fn fallback_kills_before_the_kernel(rate: &str) {
    let Some(sb) = setup(v2_ready, "v2-race", 256 * M) else {
        return;
    };
    assert!(sb.cg.is_v2());
    let agent = start_agent(&sb.cg, WINNABLE);
    let mut hog = hog(&sb.cg, &["--rate", rate, "--total", "1G"]);
    let st = wait_exit(&mut hog, LONG);
    let decision = expect_decision(&agent, "kill", Duration::from_secs(30));
    assert_agent_won(&sb.cg, st, &decision);
    assert_eq!(
        killed(&decision)[0]["pid"].as_u64(),
        Some(u64::from(hog.id())),
        "{decision:#}"
    );
    let signal = decision["signal"].as_str().unwrap_or_default();
    assert!(
        ["poll", "memory.events", "psi", "arm", "recheck"].contains(&signal),
        "woken by {signal}: {decision:#}"
    );
    eprintln!(
        "v2 fallback at {rate}: signal {signal}, usage at decision {}, threshold {}, max events {}",
        decision["usage"],
        decision["threshold"],
        sb.cg.failcnt().unwrap_or(0)
    );
}

#[test]
fn v2_fallback_kills_before_the_kernel_at_64_mb_per_s() {
    fallback_kills_before_the_kernel("64M");
}

#[test]
fn v2_fallback_kills_before_the_kernel_at_200_mb_per_s() {
    fallback_kills_before_the_kernel("200M");
}

/// A cgroup idle long enough for the fallback to read it on the quiet schedule (its
/// tripwire, the sandbox's top-level ancestor, still for a second; reads up to 30 s apart),
/// then growing at 200 MB/s: the tripwire trips, puts it back on the normal schedule, and the
/// fallback still kills before the kernel. The hog runs in a child of the sandbox: a
/// top-level cgroup (the sandbox itself where the test runs in the root cgroup, as in the
/// guests) has no tripwire.
#[test]
fn v2_fallback_kills_before_the_kernel_after_a_quiet_spell() {
    let Some(sb) = setup(v2_ready, "v2-quiet", 512 * M) else {
        return;
    };
    let cg = sb.child("c").expect("make the child cgroup");
    cg.set_limit(256 * M).expect("set the child's limit");
    // The agent's debug records of the watcher (Agent::spawn sets RUST_LOG=info; `env`
    // overrides it for the agent).
    let agent_cmd = launch(&sb.cg.path).args(WINNABLE).command();
    let mut cmd = std::process::Command::new("env");
    cmd.arg("RUST_LOG=info,oomguard::headroom=debug")
        .arg(agent_cmd.get_program())
        .args(agent_cmd.get_args());
    let agent = Agent::spawn(cmd, None).expect("start the agent");
    agent.expect_armed(&cg.path, Duration::from_secs(60));
    // The hog's binary in the page cache first: in a TCG guest its first exec reads it from
    // disk for tens of seconds, growth too slow to trip the tripwire (the quiet schedule's
    // own reads see it then, and the cgroup leaves the quiet schedule before the hog grows).
    let mut warm = hog(&cg, &["--total", "1M", "--hold", "0"]);
    assert!(wait_exit(&mut warm, LONG).is_some_and(|s| s.success()));
    // Quiet after 1 s of a still tripwire, from the cgroup's next read (within 2 s).
    std::thread::sleep(Duration::from_secs(6));
    const TRIPPED: &str = "tripwire tripped: its quiet cgroups are back on the normal schedule";
    let trips_before = agent.count(message(TRIPPED));
    let mut hog = hog(&cg, &["--rate", "200M", "--total", "1G"]);
    let st = wait_exit(&mut hog, LONG);
    let decision = expect_decision(&agent, "kill", Duration::from_secs(30));
    assert_agent_won(&cg, st, &decision);
    assert_eq!(
        decision["oomcgroup"].as_str(),
        Some(cg.path.display().to_string().as_str()),
        "{decision:#}"
    );
    // Only trips that woke a quiet cgroup are logged.
    assert!(
        agent.count(message(TRIPPED)) > trips_before,
        "the hog's growth woke no quiet cgroup: {:#?}",
        agent.records()
    );
    eprintln!(
        "v2 fallback after a quiet spell: signal {}, usage at decision {}, threshold {}",
        decision["signal"], decision["usage"], decision["threshold"]
    );
}

/// noop: the agent says what it would kill, the kernel kills, and the kill is reported
/// from `memory.events` `oom_kill`.
#[test]
fn v2_noop_reports_the_kernel_oom_kill() {
    let Some(sb) = setup(v2_ready, "v2-noop", 128 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, &["--policy", "noop", "--margin-ratio", "0.1"]);
    let mut hog = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut hog, LONG);
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    let would = agent
        .wait_for(Duration::from_secs(30), |v| v["action"] == "would-kill")
        .unwrap_or_else(|| panic!("no would-kill decision; log: {:#?}", agent.records()));
    assert_eq!(killed(&would)[0]["pid"].as_u64(), Some(u64::from(hog.id())));
    assert!(
        sb.cg.subtree_oom_kills() >= 1,
        "the kernel should have killed it"
    );
    agent
        .wait_for(Duration::from_secs(30), |v| v["action"] == "kernel-oom")
        .unwrap_or_else(|| panic!("no kernel-oom report; log: {:#?}", agent.records()));
}

/// A task with oom_score_adj -1000 is never the victim: the favoured one goes first, then
/// the grower, never the protected one.
#[test]
fn v2_protected_task_is_spared() {
    let Some(sb) = setup(v2_ready, "v2-protect", 128 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, WINNABLE);
    let mut big = hog(&sb.cg, &["--total", "60M", "--adj", "-1000"]);
    let mut favoured = hog(&sb.cg, &["--total", "10M", "--adj", "1000"]);
    wait_rss(&big, 60 * M, LONG);
    wait_rss(&favoured, 10 * M, LONG);
    let mut grower = hog(&sb.cg, &["--rate", "20M", "--total", "60M"]);
    let decision = agent
        .wait_for(LONG, |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    assert_eq!(
        killed(&decision)[0]["pid"].as_u64(),
        Some(u64::from(favoured.id())),
        "{decision:#}"
    );
    assert!(killed_by_sigkill(wait_exit(&mut favoured, LONG)));
    let second = agent
        .wait_for(LONG, |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no second kill; log: {:#?}", agent.records()));
    assert_eq!(
        killed(&second)[0]["pid"].as_u64(),
        Some(u64::from(grower.id()))
    );
    assert!(killed_by_sigkill(wait_exit(&mut grower, LONG)));
    assert!(
        big.try_wait().unwrap().is_none(),
        "the protected task must survive"
    );
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    let _ = big.kill();
    let _ = big.wait();
}

/// Where page cache can live: a real file system (tmpfs/ramfs pages are shmem, which only
/// swap could reclaim). The guests mount one at /disk.
fn cache_dir() -> Option<PathBuf> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let dir = [
        PathBuf::from("/disk"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    ]
    .into_iter()
    .find(|d| d.is_dir())?;
    let st = rustix::fs::statfs(&dir).ok()?;
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    (magic != TMPFS_MAGIC && magic != RAMFS_MAGIC).then_some(dir)
}

/// A writer that fills the cgroup with page cache is not killed: the kernel reclaims it.
#[test]
fn v2_page_cache_is_left_to_the_kernel() {
    if !v2_ready() {
        return;
    }
    let Some(dir) = cache_dir() else {
        not_applicable("no disk-backed file system for page cache here");
        return;
    };
    let _serial = serial();
    let sb = sandbox("v2-cache", 128 * M);
    let agent = start_agent(&sb.cg, WINNABLE);
    let file = dir.join(format!("oomguard-v2-cache-{}", std::process::id()));
    let mut writer = hog(
        &sb.cg,
        &[
            "--file",
            file.to_str().unwrap(),
            "--total",
            "300M",
            "--hold",
            "0",
        ],
    );
    let st = wait_exit(&mut writer, LONG);
    let _ = std::fs::remove_file(&file);
    assert!(
        st.is_some_and(|s| s.success()),
        "the writer ended with {st:?}; log: {:#?}",
        agent.decisions("kill")
    );
    assert!(
        agent.decisions("kill").is_empty(),
        "{:#?}",
        agent.decisions("kill")
    );
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
}

/// A limit raised after arming re-arms with the new thresholds; a cgroup made after start
/// is guarded; its removal disarms it.
#[test]
fn v2_limit_change_new_cgroup_and_removal() {
    let Some(sb) = setup(v2_ready, "v2-discovery", 512 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, &["--policy", "noop"]);
    let child = sb.child("late").unwrap();
    child.set_limit(128 * M).unwrap();
    let armed = agent
        .wait_armed(&child.path, LONG)
        .unwrap_or_else(|| panic!("child not armed; log: {:#?}", agent.records()));
    assert_eq!(armed["limit"].as_u64(), Some(128 * M), "{armed:#}");
    child.set_limit(200 * M).unwrap();
    let rearmed = agent
        .wait_armed(&child.path, LONG)
        .unwrap_or_else(|| panic!("child not re-armed; log: {:#?}", agent.records()));
    assert_eq!(rearmed["limit"].as_u64(), Some(200 * M), "{rearmed:#}");
    std::fs::remove_dir(&child.path).unwrap();
    let want = child.path.display().to_string();
    agent
        .wait_for(LONG, |v| {
            v["message"] == "cgroup removed; disarmed" && v["cgroup"].as_str() == Some(&want)
        })
        .unwrap_or_else(|| panic!("removal not seen; log: {:#?}", agent.records()));
}

/// `memory.reclaim` on anonymous memory with no swap answers EAGAIN, which is a finished
/// run, not a failure; with page cache it frees some.
#[test]
fn v2_memory_reclaim() {
    let Some(sb) = setup(v2_ready, "v2-reclaim", 256 * M) else {
        return;
    };
    if !sb.cg.file("memory.reclaim").exists() {
        record_skip("no memory.reclaim (kernel before 5.19)");
        return;
    }
    let mut anon = hog(&sb.cg, &["--total", "32M"]);
    wait_rss(&anon, 32 * M, LONG);
    sb.cg.reclaim_all().expect("EAGAIN is understood");
    let _ = anon.kill();
    let _ = anon.wait();
    if let Some(dir) = cache_dir() {
        let file = dir.join(format!("oomguard-v2-reclaim-{}", std::process::id()));
        let mut writer = hog(
            &sb.cg,
            &[
                "--file",
                file.to_str().unwrap(),
                "--total",
                "64M",
                "--hold",
                "0",
            ],
        );
        let st = wait_exit(&mut writer, LONG);
        assert!(st.is_some_and(|s| s.success()), "{st:?}");
        let before = sb.cg.usage().unwrap();
        sb.cg.reclaim_all().unwrap();
        let after = sb.cg.usage().unwrap();
        let _ = std::fs::remove_file(&file);
        assert!(
            after < before,
            "memory.reclaim freed nothing: {before} -> {after}"
        );
    }
}

/// The container fallback kills a whole cgroup with one `cgroup.kill` when nothing in it
/// may be spared, and goes task by task (sparing -1000) when something may.
#[test]
fn v2_cgroup_kill_fallback() {
    let Some(sb) = setup(v2_ready, "v2-kill", 256 * M) else {
        return;
    };
    let ctr = sb.child("ctr").unwrap();
    if !ctr.file("cgroup.kill").exists() {
        record_skip("no cgroup.kill (kernel before 5.14)");
        return;
    }
    let mount = oomguard_dev::sandbox::memory_root();
    let mut a = hog(&ctr, &["--total", "8M"]);
    let mut b = hog(&ctr, &["--total", "8M"]);
    wait_rss(&a, 8 * M, LONG);
    wait_rss(&b, 8 * M, LONG);
    let report = oomguard::runtime::fallback_kill_cgroup_tasks(&ctr.path, &mount, LONG);
    assert!(report.cgroup_kill, "{report:#?}");
    assert!(report.took_effect(), "{report:#?}");
    assert!(killed_by_sigkill(wait_exit(&mut a, LONG)));
    assert!(killed_by_sigkill(wait_exit(&mut b, LONG)));

    let spared = sb.child("spared").unwrap();
    let mut protected = hog(&spared, &["--total", "8M", "--adj", "-1000"]);
    let mut other = hog(&spared, &["--total", "8M"]);
    wait_rss(&protected, 8 * M, LONG);
    wait_rss(&other, 8 * M, LONG);
    let report = oomguard::runtime::fallback_kill_cgroup_tasks(&spared.path, &mount, LONG);
    assert!(!report.cgroup_kill, "{report:#?}");
    assert_eq!(report.protected, [protected.id() as i32]);
    assert!(killed_by_sigkill(wait_exit(&mut other, LONG)));
    assert!(
        protected.try_wait().unwrap().is_none(),
        "-1000 must survive"
    );
    let _ = protected.kill();
    let _ = protected.wait();
}

/// Sanity of the layout seen from inside a v2 node: the agent's default --root is the
/// cgroup2 mount, and our sandbox is a v2 cgroup with memory.max.
#[test]
fn v2_layout_and_default_root() {
    if !v2_ready() {
        return;
    }
    let layout = oomguard::cgroup::Layout::read().unwrap();
    let root = layout.default_root().unwrap().to_path_buf();
    assert_eq!(
        oomguard::cgroup::Version::of(&root),
        oomguard::cgroup::Version::V2
    );
    let sb = sandbox("v2-layout", 64 * M);
    assert_eq!(sb.cg.limit().unwrap(), 64 * M);
    assert!(sb.path().starts_with(&root));
    let usage = MemCgroup::new(sb.path()).usage().unwrap();
    assert!(usage < 64 * M);
    let t0 = Instant::now();
    let out = std::process::Command::new(agent_exe())
        .args(["doctor"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("v2"),
        "doctor does not name the layout: {text}"
    );
    assert!(t0.elapsed() < LONG);
}

/// `--v2-throttle` puts memory.high at the kill threshold while guarding, a runaway is still
/// killed by the agent, and the old memory.high comes back when the agent stops.
#[test]
fn v2_throttle_sets_and_restores_memory_high() {
    let Some(sb) = setup(v2_ready, "v2-throttle", 128 * M) else {
        return;
    };
    let high = |cg: &MemCgroup| oomguard::cgroup::v2::high(&cg.path).unwrap();
    assert_eq!(high(&sb.cg), oomguard::cgroup::UNLIMITED);
    let mut agent = launch(&sb.cg.path)
        .args(WINNABLE)
        .args(&["--v2-throttle"])
        .start();
    let t = oomguard::threshold::Margins {
        ratio: 0.1,
        min: M,
        max: 50 * M,
    }
    .thresholds(128 * M)
    .unwrap();
    let deadline = Instant::now() + LONG;
    while high(&sb.cg) != t.kill {
        assert!(
            Instant::now() < deadline,
            "memory.high never set: {}",
            high(&sb.cg)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut hog = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    assert!(killed_by_sigkill(wait_exit(&mut hog, LONG)));
    agent
        .wait_for(Duration::from_secs(30), |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    assert!(agent.stop(LONG).is_some_and(|s| s.success()));
    assert_eq!(
        high(&sb.cg),
        oomguard::cgroup::UNLIMITED,
        "memory.high not given back"
    );
}
