//! Degraded kernels, simulated with a seccomp filter on the agent: `bpf()` denied (EPERM)
//! and the 3.10 syscall surface (ENOSYS for bpf, pidfd_open, pidfd_send_signal,
//! process_mrelease). `auto` must still guard before the kernel; `ebpf` must refuse to start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use oomguard_dev::fixture::*;
use oomguard_dev::sandbox::Agent;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// A classic-BPF seccomp program: on x86_64, answer each listed syscall with its errno;
/// allow everything else.
fn filter(deny: &[(i64, i32)]) -> Vec<libc::sock_filter> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ld_abs = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let ret = libc::BPF_RET | libc::BPF_K;
    let mut f = vec![
        stmt(ld_abs, 4), // seccomp_data.arch
        jump(jeq, AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ld_abs, 0), // seccomp_data.nr
    ];
    for &(nr, errno) in deny {
        f.push(jump(jeq, nr as u32, 0, 1));
        f.push(stmt(ret, libc::SECCOMP_RET_ERRNO | (errno as u32 & 0xffff)));
    }
    f.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
    f
}

/// `oomguard run <args>` with `deny` answered by the kernel's seccomp filter.
fn agent_denied(root: &str, pins: &str, args: &[&str], deny: &[(i64, i32)]) -> Agent {
    let prog = filter(deny);
    let launch = launch(std::path::Path::new(root))
        .args(&["--bpf-pin-dir", pins])
        .args(args);
    // SAFETY: prctl with a filter built before the fork; no allocation after it.
    let launch = unsafe {
        launch.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    launch.spawn()
}

fn pins(tag: &str) -> String {
    format!("/sys/fs/bpf/oomguard-test-{}-{tag}", std::process::id())
}

#[test]
fn auto_mode_guards_with_eventfds_when_bpf_is_denied() {
    let Some(sb) = setup(kernel_ready, "degraded-eperm", 256 * M) else {
        return;
    };
    let root = sb.path().display().to_string();
    let agent = agent_denied(
        &root,
        &pins("eperm"),
        &[
            "--mode",
            "auto",
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
        ],
        &[(libc::SYS_bpf, libc::EPERM)],
    );
    let warn = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["message"] == "eBPF unavailable; guarding with threshold eventfds only"
        })
        .unwrap_or_else(|| panic!("no fallback warning; log: {:#?}", agent.records()));
    let reason = warn["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("bpf"),
        "the warning must name what failed: {reason}"
    );
    let warnings = agent
        .records()
        .into_iter()
        .filter(|v| v["message"] == "eBPF unavailable; guarding with threshold eventfds only")
        .count();
    assert_eq!(warnings, 1, "one warning line, not one per failure");
    agent.expect_armed(sb.path(), Duration::from_secs(10));
    let mut hog = hog(&sb.cg, &["--rate", "200M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    agent
        .wait_for(Duration::from_secs(5), |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    agent.assert_woken_by_eventfds_only();
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
}

#[test]
fn ebpf_mode_refuses_to_start_when_bpf_is_denied() {
    let Some(sb) = setup(kernel_ready, "degraded-refuse", 64 * M) else {
        return;
    };
    let root = sb.path().display().to_string();
    let mut agent = agent_denied(
        &root,
        &pins("refuse"),
        &["--mode", "ebpf", "--policy", "process"],
        &[(libc::SYS_bpf, libc::EPERM)],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!agent.running(), "--mode ebpf must not run without eBPF");
    let err = agent
        .wait_for(Duration::from_secs(2), |v| v["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error line; log: {:#?}", agent.records()));
    let msg = err["message"].as_str().unwrap_or_default();
    assert!(msg.contains("--mode ebpf") && msg.contains("bpf"), "{msg}");
    assert!(
        agent.records().iter().all(|v| v["message"] != "armed"),
        "nothing may be armed"
    );
}

/// An agent in `mode` (process policy, 10% margin) with `denied` system calls failing,
/// and a hog at 200 MB/s: the hog must be SIGKILLed by the agent, not by the kernel.
/// Returns the kill's decision record.
fn kill_with_calls_denied(
    tag: &str,
    mode: &str,
    denied: &[(i64, i32)],
) -> Option<serde_json::Value> {
    let sb = setup(kernel_ready, &format!("degraded-{tag}"), 256 * M)?;
    let root = sb.path().display().to_string();
    let agent = agent_denied(
        &root,
        &pins(tag),
        &[
            "--mode",
            mode,
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
        ],
        denied,
    );
    agent.expect_armed(sb.path(), Duration::from_secs(10));
    let mut hog = hog(&sb.cg, &["--rate", "200M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    let d = agent
        .wait_for(Duration::from_secs(5), |v| {
            v["action"] == "kill" || v["action"] == "kill-failed"
        })
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    assert_eq!(d["action"], "kill", "{d:#}");
    assert_eq!(killed(&d)[0]["pid"].as_u64(), Some(u64::from(hog.id())));
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    Some(d)
}

/// The 3.10 syscall surface: no bpf, no pidfds, no process_mrelease. `auto` guards with
/// eventfds and kills with plain kill(2), still before the kernel.
#[test]
fn kernel_3_10_surface_still_guards_with_kill() {
    let Some(d) = kill_with_calls_denied(
        "310",
        "auto",
        &[
            (libc::SYS_bpf, libc::ENOSYS),
            (libc::SYS_pidfd_open, libc::ENOSYS),
            (libc::SYS_pidfd_send_signal, libc::ENOSYS),
            (libc::SYS_process_mrelease, libc::ENOSYS),
        ],
    ) else {
        return;
    };
    let k = killed(&d);
    assert_eq!(
        k[0]["pidfd"], false,
        "without pidfds the kill is kill(2): {d:#}"
    );
    assert_eq!(k[0]["mreleased"], false);
}

/// A seccomp profile that denies the pidfd calls with EPERM (as container runtimes' default
/// profiles did before they knew them) on a kernel that has them: the kill falls back to
/// kill(2) as on 3.10, instead of failing.
#[test]
fn pidfd_denied_by_seccomp_falls_back_to_kill() {
    let Some(d) = kill_with_calls_denied(
        "pidfd-eperm",
        "eventfd",
        &[
            (libc::SYS_pidfd_open, libc::EPERM),
            (libc::SYS_pidfd_send_signal, libc::EPERM),
        ],
    ) else {
        return;
    };
    assert_eq!(
        killed(&d)[0]["pidfd"],
        false,
        "the kill must be kill(2): {d:#}"
    );
}

/// A cgroup v1 freezer cgroup beneath our own: its tasks sleep uninterruptibly
/// (`TASK_FROZEN`), so SIGKILL stays pending until it is thawed. Thawed, emptied and
/// removed on drop.
struct Frozen {
    path: std::path::PathBuf,
}

impl Frozen {
    fn new() -> Option<Frozen> {
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = text.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            c.split(',')
                .any(|c| c == "freezer")
                .then(|| path.to_string())
        })?;
        let path = std::path::Path::new("/sys/fs/cgroup/freezer")
            .join(rel.trim_start_matches('/'))
            .join(format!("oomguard-test-{}", std::process::id()));
        std::fs::create_dir(&path).ok()?;
        Some(Frozen { path })
    }

    /// A freezer cgroup, or the skip said (a failure where every feature is required).
    fn or_skip() -> Option<Frozen> {
        let f = Frozen::new();
        if f.is_none() {
            require(Some("no cgroup v1 freezer hierarchy".into()));
        }
        f
    }

    /// A 70 MiB task in `cg`, frozen (the kernel shows it in D state, like one stuck in
    /// the kernel), and a task growing `grow` more at 20 MiB/s to push `cg` over.
    fn stuck_hog(
        &self,
        cg: &oomguard::cgroup::MemCgroup,
        grow: &str,
    ) -> (std::process::Child, std::process::Child) {
        let big = hog(cg, &["--total", "70M"]);
        wait_rss(&big, 70 * M, Duration::from_secs(10));
        self.add(big.id());
        self.set("FROZEN");
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", big.id())).unwrap();
        let state = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next();
        assert_eq!(state, Some("D"), "{stat}");
        (big, hog(cg, &["--rate", "20M", "--total", grow]))
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    fn set(&self, state: &str) {
        std::fs::write(self.path.join("freezer.state"), state).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(self.path.join("freezer.state"))
            .unwrap_or_default()
            .trim()
            != state
        {
            assert!(
                std::time::Instant::now() < deadline,
                "freezer never got {state}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("freezer.state"), "THAWED");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A victim that does not die (frozen, and no process_mrelease to reap it): like the kernel,
/// which never picks a new victim while one is still exiting, the agent kills no second task
/// while the first is stuck, and the kernel's OOM killer kills nobody either (it reaps the
/// victim that already has SIGKILL pending).
#[test]
fn a_victim_that_does_not_die_is_not_followed_by_a_second_kill() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let Some(freezer) = Frozen::or_skip() else {
        return;
    };
    let sb = sandbox("degraded-stuck", 128 * M);
    let root = sb.path().display().to_string();
    let agent = agent_denied(
        &root,
        &pins("stuck"),
        &[
            "--mode",
            "eventfd",
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
            "--kill-timeout-ms",
            "300",
            // The stuck victim is waited for longer than the window below: after the wait
            // a later decision may rightly take the next candidate if usage grew, and
            // under load the grower can still be growing then.
            "--cooldown-ms",
            "10000",
        ],
        &[(libc::SYS_process_mrelease, libc::ENOSYS)],
    );
    agent.expect_armed(sb.path(), Duration::from_secs(10));
    let (mut big, mut grower) = freezer.stuck_hog(&sb.cg, "60M");
    let d = agent
        .wait_for(Duration::from_secs(20), |v| v["action"] == "kill")
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    // One victim at a time, as the kernel does: the stuck one first, alone; only once its
    // wait is over (bounded) does a later decision take the next candidate.
    let k = killed(&d);
    assert_eq!(k.len(), 1, "{d:#}");
    assert_eq!(k[0]["pid"].as_u64(), Some(u64::from(big.id())));
    assert_eq!(k[0]["outcome"], "stuck");
    assert!(
        agent
            .wait_for(Duration::from_secs(3), |v| v["action"] == "kill")
            .is_none(),
        "a second victim while the first is stuck: {:#?}",
        agent.decisions("kill")
    );
    eprintln!("a D-state victim, and no second kill while it is stuck: {k:?}");
    assert_eq!(sb.cg.subtree_oom_kills(), 0);
    // Thawed, the first victim dies of its pending SIGKILL.
    freezer.set("THAWED");
    assert!(killed_by_sigkill(wait_exit(
        &mut big,
        Duration::from_secs(5)
    )));
    let _ = grower.kill();
    let _ = grower.wait();
}

/// Whether `pid` has SIGKILL pending (signalled, not yet dead).
fn sigkill_pending(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|l| l.strip_prefix("ShdPnd:"))
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .any(|mask| mask & (1 << (libc::SIGKILL - 1)) != 0)
}

/// A victim that does not die holds its own cgroup only: everything after the signal
/// (reaping, the wait for its exit) runs off the guard thread, so a second cgroup's hog
/// crossing meanwhile is killed before the kernel's OOM killer, long before the stuck
/// victim's wait (`--kill-timeout-ms`) is over.
#[test]
fn a_stuck_victim_delays_no_other_cgroup() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let Some(freezer) = Frozen::or_skip() else {
        return;
    };
    let sb = oomguard_dev::sandbox::Sandbox::new("degraded-neighbour").expect("make a sandbox");
    let stuck = sb.child("stuck").unwrap();
    let other = sb.child("other").unwrap();
    stuck.set_limit(128 * M).unwrap();
    other.set_limit(128 * M).unwrap();
    let root = sb.path().display().to_string();
    let wait = Duration::from_secs(20);
    let agent = agent_denied(
        &root,
        &pins("neighbour"),
        &[
            "--mode",
            "eventfd",
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
            "--kill-timeout-ms",
            "20000",
        ],
        &[(libc::SYS_process_mrelease, libc::ENOSYS)],
    );
    // Armed in either order: look through every record, not the unconsumed ones.
    let deadline = std::time::Instant::now() + oomguard_dev::sandbox::patience(wait);
    let armed = |cg: &oomguard::cgroup::MemCgroup| {
        let want = cg.path.display().to_string();
        agent
            .records()
            .iter()
            .any(|v| v["message"] == "armed" && v["cgroup"].as_str() == Some(want.as_str()))
    };
    while !(armed(&stuck) && armed(&other)) {
        assert!(
            std::time::Instant::now() < deadline,
            "not armed: {:#?}",
            agent.records()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // 70 + 52 MiB: over the 115.2 MiB threshold, under the 128 MiB limit.
    let (mut big, mut grower) = freezer.stuck_hog(&stuck, "52M");
    let deadline = std::time::Instant::now() + oomguard_dev::sandbox::patience(wait);
    while !sigkill_pending(big.id()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the frozen hog was never signalled; log: {:#?}",
            agent.records()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The stuck victim's wait now runs for 20 s; the other cgroup's hog reaches the
    // kernel's limit about 1.3 s after it starts.
    let mut fast = hog(&other, &["--rate", "100M", "--total", "200M"]);
    let d = agent
        .wait_for(wait, |v| {
            v["message"] == "decision" && v["action"] == "kill"
        })
        .unwrap_or_else(|| panic!("no kill; log: {:#?}", agent.records()));
    let want = other.path.display().to_string();
    assert_eq!(
        d["oomcgroup"].as_str(),
        Some(want.as_str()),
        "the neighbour's kill is reported first (the stuck one's after its wait): {d:#}"
    );
    let k = killed(&d);
    assert_eq!(k[0]["pid"].as_u64(), Some(u64::from(fast.id())), "{d:#}");
    assert!(killed_by_sigkill(wait_exit(
        &mut fast,
        Duration::from_secs(5)
    )));
    assert_eq!(
        other.subtree_oom_kills(),
        0,
        "the kernel had to kill: {d:#}"
    );
    assert_eq!(stuck.subtree_oom_kills(), 0);
    eprintln!(
        "neighbour killed {} us after its wake-up while a victim was stuck ({})",
        d["wake_to_kill_us"], d["detail"]
    );
    freezer.set("THAWED");
    assert!(killed_by_sigkill(wait_exit(
        &mut big,
        Duration::from_secs(5)
    )));
    let _ = grower.kill();
    let _ = grower.wait();
}
