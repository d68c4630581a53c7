//! The decision rule against the kernel as the oracle: where the kernel kills nobody, the
//! agent kills nobody (issue 14's reproductions), and where it would kill, one victim at a
//! time, from the innermost guarded cgroup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oomguard_dev::fixture::*;
use oomguard_dev::sandbox::in_cgroup;

/// A private tmpfs, unmounted (and its directory removed) however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(name: &str) -> Tmpfs {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("oomguard-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512M", "oomguard-test"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs on {}: {st}", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Kills a child on drop (a test that fails must not leave workloads behind).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn idle_task(cg: &oomguard::cgroup::MemCgroup) -> Reap {
    let mut cmd = Command::new("sleep");
    cmd.arg("120").stdout(Stdio::null());
    Reap(
        in_cgroup(&mut cmd, cg)
            .unwrap()
            .spawn()
            .expect("spawn sleep"),
    )
}

/// Issue 14, first reproduction: one task holds about 90% of a 256 MiB limit in anonymous
/// memory while a writer fills the rest with page cache. The kernel reclaims the cache and
/// kills nobody; the agent (default margins) must not kill either.
#[test]
fn anonymous_memory_with_file_io_at_the_limit_is_not_killed() {
    let Some(sb) = setup(kernel_ready, "decide-cache", 256 * M) else {
        return;
    };
    let agent = start_agent(&sb.cg, &["--policy", "process"]);
    let anon = Reap(hog(&sb.cg, &["--total", "230M", "--rate", "0"]));
    wait_rss(&anon.0, 225 * M, Duration::from_secs(20));
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("oomguard-decide-cache-{}", std::process::id()));
    let mut writer = hog(
        &sb.cg,
        &[
            "--file",
            file.to_str().unwrap(),
            "--rate",
            "100M",
            "--total",
            "400M",
            "--hold",
            "0",
        ],
    );
    let st = wait_exit(&mut writer, Duration::from_secs(60));
    let _ = std::fs::remove_file(&file);
    let mut anon = anon;
    assert!(
        st.is_some_and(|s| s.success()),
        "the writer ended with {st:?}; decisions: {:#?}",
        agent.decisions("kill")
    );
    assert!(
        anon.0.try_wait().unwrap().is_none(),
        "the anonymous task was killed; decisions: {:#?}",
        agent.decisions("kill")
    );
    assert!(
        agent.decisions("kill").is_empty(),
        "{:#?}",
        agent.decisions("kill")
    );
    assert_eq!(sb.cg.subtree_oom_kills(), 0, "the kernel killed");
    let peak = sb.cg.max_usage().unwrap();
    assert!(
        peak >= 250 * M,
        "usage peaked at {peak}: the cgroup never reached the kill threshold, the test proved nothing"
    );
    let skips = agent.decisions("skip-cache");
    assert!(
        !skips.is_empty(),
        "no skip-cache record: the rule never ran"
    );
    eprintln!(
        "peak {peak}, skip-cache records {}, first: {}",
        skips.len(),
        skips[0]["detail"]
    );
}

/// A task allocating as fast as it can crosses the kill threshold with page cache in its
/// cgroup: 4 MiB of files it wrote (on a node, its own binary's and libraries' pages). At the
/// crossing the cache is reclaimable, so the rule alone would leave it to the kernel; nothing
/// signals the cache running out while usage sits at the limit, and the kernel reclaims it
/// in a few ms and kills. The agent measures the unreclaimable part's growth from the
/// reclaim threshold on and kills first (default margins, eventfd: no eBPF record comes).
fn fast_task_with_cache(mode: &str, ready: fn() -> bool) {
    let tag = format!("decide-fast-{mode}");
    let Some(sb) = setup(ready, &tag, 256 * M) else {
        return;
    };
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("oomguard-{tag}-{}", std::process::id()));
    let _rm = RemoveFile(file.clone());
    let mut writer = hog(
        &sb.cg,
        &[
            "--file",
            file.to_str().unwrap(),
            "--total",
            "4M",
            "--rate",
            "0",
            "--hold",
            "0",
        ],
    );
    assert!(wait_exit(&mut writer, Duration::from_secs(30)).is_some_and(|s| s.success()));
    // Written back: clean pages, which the kernel reclaims at once.
    std::fs::File::open(&file).unwrap().sync_all().unwrap();
    let cache = sb.cg.stat().unwrap().reclaimable_cache();
    assert!(
        cache >= 3 * M,
        "only {cache} bytes of page cache in the cgroup"
    );
    // The background reclaim at the reclaim threshold would drop this cache first; the
    // pages of a running binary come back as soon as it drops them. Leave them in place:
    // the reclaim is skipped while cache is at least 1% of the limit.
    let agent = start_agent(
        &sb.cg,
        &[
            "--policy",
            "process",
            "--mode",
            mode,
            "--cache-skip-ratio",
            "0.01",
        ],
    );
    let mut grow = hog(&sb.cg, &["--rate", "0", "--fast", "--total", "512M"]);
    let st = wait_exit(&mut grow, Duration::from_secs(30));
    let d = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_agent_won(&sb.cg, st, &d);
    assert_eq!(
        killed(&d)[0]["pid"].as_u64(),
        Some(u64::from(grow.id())),
        "{d:#}"
    );
}

#[test]
fn a_fast_task_crossing_with_cache_in_its_cgroup_is_killed_before_the_kernel() {
    fast_task_with_cache("eventfd", kernel_ready);
}

#[test]
fn a_fast_task_crossing_with_cache_in_its_cgroup_is_killed_before_the_kernel_ebpf() {
    fast_task_with_cache("ebpf", ebpf_ready);
}

/// Removes a file however the test ends.
struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Issue 14, second reproduction: a tmpfs file holds a 128 MiB cgroup just above its kill
/// threshold; idle tasks started there one after another allocate nothing. The kernel kills
/// none of them; the agent must not either: killing one frees nothing the overshoot needs.
#[test]
fn idle_tasks_in_a_cgroup_held_up_by_tmpfs_are_not_killed() {
    let Some(sb) = setup(kernel_ready, "decide-tmpfs", 128 * M) else {
        return;
    };
    let fs = Tmpfs::new("decide-tmpfs");
    // Kill threshold 115.2 MiB (10% margin); the file takes the cgroup to ~117 MiB.
    let mut writer = hog(
        &sb.cg,
        &[
            "--file",
            fs.0.join("held").to_str().unwrap(),
            "--total",
            "116M",
            "--hold",
            "0",
        ],
    );
    let st = wait_exit(&mut writer, Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "writer: {st:?}");
    let usage = sb.cg.usage().unwrap();
    let kill = 128 * M - 128 * M / 10;
    assert!(
        usage >= kill && usage < 128 * M,
        "usage {usage} is not between the kill threshold {kill} and the limit"
    );
    let agent = start_agent(&sb.cg, WINNABLE);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(idle_task(&sb.cg));
        std::thread::sleep(Duration::from_secs(2));
    }
    // Well past a cooldown (1 s) since the last one started.
    std::thread::sleep(Duration::from_secs(2));
    let alive = idle
        .iter_mut()
        .filter_map(|r| r.0.try_wait().unwrap().is_none().then_some(()))
        .count();
    assert_eq!(
        alive,
        3,
        "idle tasks were killed; decisions: {:#?}",
        agent.decisions("kill")
    );
    assert!(agent.decisions("kill").is_empty());
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    let no_help = agent.decisions("no-help");
    let no_cand = agent.decisions("no-candidate");
    assert!(
        !no_help.is_empty() || !no_cand.is_empty(),
        "the agent never considered the cgroup: {:#?}",
        agent.records()
    );
    drop(idle);
    sb.cg.force_empty().ok();
    drop(fs);
}

/// Where the kernel would kill (anonymous memory past the threshold) the agent still does,
/// once, and in a cgroup held partly by tmpfs the victim is the task that frees memory, not
/// the one the tmpfs pages make look big.
#[test]
fn with_tmpfs_held_the_growing_task_is_killed_once() {
    let Some(sb) = setup(kernel_ready, "decide-grow", 256 * M) else {
        return;
    };
    let fs = Tmpfs::new("decide-grow");
    let mut writer = hog(
        &sb.cg,
        &[
            "--file",
            fs.0.join("held").to_str().unwrap(),
            "--total",
            "64M",
            "--hold",
            "0",
        ],
    );
    assert!(wait_exit(&mut writer, Duration::from_secs(30)).is_some_and(|s| s.success()));
    let agent = start_agent(&sb.cg, WINNABLE);
    let idle = idle_task(&sb.cg);
    let mut grow = hog(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut grow, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "the grower ended with {st:?}");
    std::thread::sleep(Duration::from_secs(2));
    let kills = agent.decisions("kill");
    assert_eq!(kills.len(), 1, "{kills:#?}");
    assert_eq!(
        killed(&kills[0])[0]["pid"].as_u64(),
        Some(u64::from(grow.id()))
    );
    let mut idle = idle;
    assert!(idle.0.try_wait().unwrap().is_none(), "the idle task died");
    assert_eq!(sb.cg.subtree_oom_kills(), 0, "the kernel had to act");
    drop(idle);
    drop(fs);
}

/// Nested guarded cgroups (a pod and its container): one crossing, one kill, by the
/// container (the innermost guarded cgroup); the pod does not kill a second task.
#[test]
fn nested_limits_make_one_kill_from_the_innermost_cgroup() {
    let Some(sb) = setup(kernel_ready, "decide-nested", 256 * M) else {
        return;
    };
    let inner = sb.child("ctr").unwrap();
    inner.set_limit(240 * M).unwrap();
    let agent = start_agent(&sb.cg, WINNABLE);
    assert!(
        agent
            .wait_armed(&inner.path, Duration::from_secs(10))
            .is_some(),
        "the inner cgroup was not armed"
    );
    let bystander = Reap(hog(&sb.cg, &["--total", "8M", "--rate", "0"]));
    wait_rss(&bystander.0, 7 * M, Duration::from_secs(10));
    let mut grow = hog(&inner, &["--rate", "0", "--total", "1G"]);
    let st = wait_exit(&mut grow, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "the grower ended with {st:?}");
    std::thread::sleep(Duration::from_secs(2));
    let kills = agent.decisions("kill");
    assert_eq!(kills.len(), 1, "{kills:#?}");
    assert_eq!(
        kills[0]["oomcgroup"].as_str(),
        Some(inner.path.to_str().unwrap()),
        "{kills:#?}"
    );
    let mut bystander = bystander;
    assert!(
        bystander.0.try_wait().unwrap().is_none(),
        "the bystander died"
    );
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
}

/// The process policy never picks a task in the agent's own cgroup, even the biggest.
#[test]
fn tasks_of_the_agents_own_cgroup_are_never_chosen() {
    let Some(sb) = setup(kernel_ready, "decide-self", 256 * M) else {
        return;
    };
    let own = sb.child("agent").unwrap();
    let work = sb.child("work").unwrap();
    // The agent runs inside the guarded subtree, in its own cgroup, as a DaemonSet's
    // container would; a big helper shares that cgroup.
    let agent = launch(&sb.cg.path).args(WINNABLE).in_cgroup(&own).start();
    let helper = Reap(hog(&own, &["--total", "150M", "--rate", "0"]));
    wait_rss(&helper.0, 140 * M, Duration::from_secs(20));
    let mut grow = hog(&work, &["--rate", "50M", "--total", "1G"]);
    let st = wait_exit(&mut grow, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "the grower ended with {st:?}");
    let mut helper = helper;
    assert!(
        helper.0.try_wait().unwrap().is_none(),
        "the task in the agent's own cgroup was killed: {:#?}",
        agent.decisions("kill")
    );
    // The decision record is written once the victim's exit is confirmed, which can come
    // just after the test saw the exit itself.
    let kill = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_eq!(killed(&kill)[0]["pid"].as_u64(), Some(u64::from(grow.id())));
}

/// A cgroup removed and made again at the same path with the same limit is a new cgroup:
/// the rescan arms it again although its thresholds did not change (without inotify, so
/// nothing but the rescan can tell).
#[test]
fn a_cgroup_made_again_with_the_same_limit_is_re_armed() {
    let Some(sb) = setup(kernel_ready, "decide-recreate", 512 * M) else {
        return;
    };
    let child = sb.child("c").unwrap();
    child.set_limit(128 * M).unwrap();
    let agent = launch(&sb.cg.path)
        .args(WINNABLE)
        .args(&["--no-inotify", "--walk-interval", "1"])
        .start();
    assert!(
        agent
            .wait_armed(&child.path, Duration::from_secs(10))
            .is_some()
    );
    std::fs::remove_dir(&child.path).unwrap();
    let again = sb.child("c").unwrap();
    again.set_limit(128 * M).unwrap();
    // Two rescans.
    std::thread::sleep(Duration::from_millis(2500));
    let mut hog = hog(&again, &["--rate", "50M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "the hog ended with {st:?}");
    assert_eq!(
        again.subtree_oom_kills(),
        0,
        "the kernel had to act: the re-made cgroup was not guarded; log: {:#?}",
        agent.records()
    );
    // The record comes once the victim's exit is confirmed; then no second one follows.
    assert!(
        agent
            .wait_for(Duration::from_secs(5), |v| {
                v["message"] == "decision" && v["action"] == "kill"
            })
            .is_some(),
        "no kill decision: {:#?}",
        agent.records()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.decisions("kill").len(), 1);
}

/// `memory.oom_kill_disable=1`: a user-space OOM handler owns the cgroup (the kernel
/// freezes its tasks at the limit instead of killing). The agent leaves it alone and says
/// so.
#[test]
fn a_cgroup_with_oom_kill_disabled_is_left_alone() {
    let Some(sb) = setup(kernel_ready, "decide-oomoff", 128 * M) else {
        return;
    };
    std::fs::write(sb.cg.file("memory.oom_control"), "1").unwrap();
    let agent = start_agent(&sb.cg, WINNABLE);
    // Said while arming, so before the "armed" record start_agent waited for: look at every
    // record, not only those after it.
    let said = |a: &oomguard_dev::sandbox::Agent| {
        a.records().iter().any(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("oom_kill_disable=1"))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !said(&agent) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        said(&agent),
        "the agent did not say it leaves the cgroup alone: {:#?}",
        agent.records()
    );
    let hog = Reap(hog(&sb.cg, &["--rate", "100M", "--total", "200M"]));
    // The hog reaches the limit and waits there (the kernel's OOM is disabled).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sb.cg.oom_control().unwrap().under_oom {
        assert!(
            std::time::Instant::now() < deadline,
            "the hog never reached the limit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut hog = hog;
    assert!(hog.0.try_wait().unwrap().is_none(), "the hog was killed");
    assert!(
        agent.decisions("kill").is_empty(),
        "{:#?}",
        agent.decisions("kill")
    );
    drop(hog);
}
