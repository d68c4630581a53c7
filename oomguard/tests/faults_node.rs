//! Faults on the node side (issue 7): a cgroup removed between the signal and the kill,
//! force_empty answering EBUSY or EINTR or hanging, `cgroup.event_control` refusing a
//! registration, tracefs and bpffs missing, the fd limit reached, a victim in D state. In
//! each case the agent keeps guarding everything else and says what happened once.
//!
//! The kernel is made to refuse for real where it can be (file modes with the DAC
//! capabilities dropped, a private mount namespace, RLIMIT_NOFILE, the v1 freezer); a
//! seccomp filter stands in only for answers this kernel never gives (EBUSY from
//! force_empty, which only kernels before 3.16 return) or cannot be made to give on cue (a
//! force_empty that hangs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use oomguard::cgroup::{DEFAULT_MEMORY_ROOT, MemCgroup};
use oomguard::kill::{Outcome, kill_task};
use oomguard::reclaim::{ReclaimResult, Request};
use oomguard_dev::fixture::*;
use oomguard_dev::sandbox::{Agent, Sandbox};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const CAP_DAC_OVERRIDE: i32 = 1;
const CAP_DAC_READ_SEARCH: i32 = 2;
const CAP_SYS_ADMIN: i32 = 21;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// A classic-BPF seccomp program: `write(2)` (only with a byte count of `count`, when
/// given) gets `action`; everything else is allowed.
fn write_filter(action: u32, count: Option<u32>) -> Vec<libc::sock_filter> {
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first on x86_64).
    let mut f = vec![
        stmt(ld, 4),
        jeq(AUDIT_ARCH_X86_64, 0, 1),
        stmt(ld, 0),
        jeq(libc::SYS_write as u32, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    // The arch mismatch jumps over the nr load and test straight to ALLOW.
    f[1].jf = 2;
    if let Some(n) = count {
        f.extend([
            stmt(ld, 32),
            jeq(n, 0, 2),
            stmt(ld, 36),
            jeq(0, 1, 0),
            stmt(ret, libc::SECCOMP_RET_ALLOW),
        ]);
    }
    f.push(stmt(ret, action));
    f
}

/// Installs `prog` on the calling thread only (threads it starts later inherit it).
/// Returns the listener fd for a `SECCOMP_RET_USER_NOTIF` program.
fn install_on_this_thread(prog: &[libc::sock_filter], listener: bool) -> Option<OwnedFd> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    let flags = if listener {
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
    } else {
        0
    };
    // SAFETY: prctl and seccomp(2) with a valid program that outlives the calls; no TSYNC
    // flag, so only this thread is filtered.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let rc = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        );
        assert!(rc >= 0, "seccomp(2): {}", std::io::Error::last_os_error());
        listener.then(|| OwnedFd::from_raw_fd(rc as i32))
    }
}

/// The supervisor side of a `SECCOMP_RET_USER_NOTIF` filter: each filtered `write(2)`
/// waits until it is answered here.
struct Supervisor {
    listener: OwnedFd,
}

impl Supervisor {
    /// Waits (bounded) for the next filtered syscall; returns its id and number.
    fn next(&self, timeout: Duration) -> Option<(u64, i32)> {
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n != 1 {
            return None;
        }
        // SAFETY: the kernel wants a zeroed seccomp_notif to fill.
        let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the ioctl fills `notif`, a valid seccomp_notif.
        let rc = unsafe {
            libc::ioctl(
                self.listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut notif,
            )
        };
        (rc == 0).then_some((notif.id, notif.data.nr))
    }

    /// Answers one syscall: an errno, or (`errno` 0) "let the kernel run it".
    fn answer(&self, id: u64, errno: i32) {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error: -errno,
            flags: 0,
        };
        if errno == 0 {
            resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32;
        }
        // SAFETY: the ioctl reads a valid seccomp_notif_resp.
        let rc = unsafe {
            libc::ioctl(
                self.listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp,
            )
        };
        assert_eq!(rc, 0, "NOTIF_SEND: {}", std::io::Error::last_os_error());
    }
}

/// `oomguard run --log-format json --root <root> <args>`, eBPF pins in a directory of
/// this test's own; `hook` runs in the child before exec.
fn agent_with(
    root: &Path,
    tag: &str,
    args: &[&str],
    hook: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Agent {
    // SAFETY: every hook below only makes system calls on data prepared before the fork.
    unsafe { launch(root).pins(tag).args(args).pre_exec(hook) }.spawn()
}

/// [`agent_with`] in `mode` with the process policy and a 10% margin (most tests here),
/// then `extra`.
fn process_agent(
    root: &Path,
    tag: &str,
    mode: &str,
    extra: &[&str],
    hook: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Agent {
    let mut args = vec![
        "--mode",
        mode,
        "--policy",
        "process",
        "--margin-ratio",
        "0.1",
    ];
    args.extend_from_slice(extra);
    agent_with(root, tag, &args, hook)
}

/// Drops capabilities from the bounding set: root gets at exec only what is left in it.
fn drop_caps(caps: &[i32]) -> std::io::Result<()> {
    for &cap in caps {
        // SAFETY: prctl with plain integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// WARN and ERROR lines from record `from` on, decision records left out.
fn warnings_since(agent: &Agent, from: usize) -> Vec<serde_json::Value> {
    agent.records()[from..]
        .iter()
        .filter(|v| (v["level"] == "WARN" || v["level"] == "ERROR") && v["message"] != "decision")
        .cloned()
        .collect()
}

/// Waits (bounded) until a record matching `pred` has been logged, whether or not
/// [`Agent::wait_for`] consumed it already.
fn seen(
    agent: &Agent,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let mut found = None;
    wait_until(timeout, || {
        found = agent.records().into_iter().find(|v| pred(v));
        found.is_some()
    });
    found
}

fn is(v: &serde_json::Value, message: &str, cg: &Path) -> bool {
    v["message"] == message && v["cgroup"].as_str() == Some(cg.to_str().unwrap())
}

fn mount() -> PathBuf {
    PathBuf::from(DEFAULT_MEMORY_ROOT)
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `D`, `Z`...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// A file for page cache, outside cgroupfs, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("oomguard-faults-{}-{tag}", std::process::id())))
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Polls `cond` every 10 ms for at most `timeout`.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Grows a process policy hog in `cg` until the agent kills it, and checks the kernel did
/// not have to.
fn agent_kills_a_hog_in(agent: &Agent, cg: &MemCgroup) {
    let mut h = hog(cg, &["--rate", "50M", "--total", "1G"]);
    let st = wait_exit(&mut h, Duration::from_secs(30));
    let want = cg.path.display().to_string();
    let d = agent
        .wait_for(Duration::from_secs(5), |v| {
            v["action"] == "kill" && v["oomcgroup"].as_str() == Some(want.as_str())
        })
        .unwrap_or_else(|| panic!("no kill in {want}; log: {:#?}", agent.records()));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    assert_eq!(killed(&d)[0]["pid"].as_u64(), Some(u64::from(h.id())));
    assert_eq!(
        cg.subtree_oom_kills(),
        0,
        "the kernel OOM killer acted in {want}"
    );
}

// ---------------------------------------------------------------------------------------
// 1. A cgroup removed between the signal and the kill.

/// The victim was ranked inside the guarded cgroup, then moved to a sibling and the
/// cgroup removed before the kill: `kill_task` refuses and the task lives on.
#[test]
fn a_victim_whose_cgroup_was_removed_before_the_kill_is_not_killed() {
    let Some(sb) = setup(kernel_ready, "faults-removed-lib", 256 * M) else {
        return;
    };
    let guarded = sb.child("guarded").unwrap();
    let sibling = sb.child("sibling").unwrap();
    let mut victim = hog(&guarded, &["--total", "8M"]);
    wait_rss(&victim, 8 * M, Duration::from_secs(10));
    let ranked = oomguard::victim::candidates(&guarded, 64 * M, std::process::id() as i32);
    assert_eq!(ranked.len(), 1, "{ranked:?}");
    assert_eq!(ranked[0].task.pid as u32, victim.id());

    sibling.add_proc(victim.id() as i32).unwrap();
    std::fs::remove_dir(&guarded.path).unwrap();
    assert!(!guarded.exists());

    let out = kill_task(
        &ranked[0].task,
        &guarded.path,
        &mount(),
        Duration::from_secs(1),
    );
    match &out {
        Outcome::Refused { reason } => assert!(reason.contains("moved out"), "{reason}"),
        other => panic!("the kill must be refused: {other:?}"),
    }
    assert!(victim.try_wait().unwrap().is_none(), "the victim must live");
    assert!(matches!(proc_state(victim.id()), Some('R' | 'S')));
    eprintln!("kill_task after the cgroup was removed: {out:?}");
}

/// A guarded cgroup held above its kill threshold (by page cache the kernel can reclaim,
/// so the agent leaves it alone and re-checks it every --guard-ms) is removed: the agent
/// disarms it, says so once, never touches it again, and still kills in a sibling.
#[test]
fn removing_a_cgroup_above_its_threshold_disarms_it_once_and_siblings_stay_guarded() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-removed-agent").unwrap();
    let doomed = sb.child("doomed").unwrap();
    doomed.set_limit(64 * M).unwrap();
    let other = sb.child("other").unwrap();
    other.set_limit(128 * M).unwrap();
    let park = Sandbox::new("faults-removed-park").unwrap();
    let agent = process_agent(
        sb.path(),
        "removed",
        "eventfd",
        &["--walk-interval", "1"],
        || Ok(()),
    );
    for cg in [&doomed, &other] {
        assert!(
            agent
                .wait_armed(&cg.path, Duration::from_secs(10))
                .is_some(),
            "{} not armed; log: {:#?}",
            cg.path.display(),
            agent.records()
        );
    }
    let file = TempFile::new("removed");
    let mut writer = hog(&doomed, &["--file", file.arg(), "--total", "60M"]);
    let want = doomed.path.display().to_string();
    agent
        .wait_for(Duration::from_secs(20), |v| {
            v["action"] == "skip-cache" && v["oomcgroup"].as_str() == Some(want.as_str())
        })
        .unwrap_or_else(|| panic!("doomed never above its threshold: {:#?}", agent.records()));
    let t = oomguard::threshold::Margins {
        ratio: 0.1,
        min: M,
        max: 50 * M,
    }
    .thresholds(64 * M)
    .unwrap();
    assert!(doomed.usage().unwrap() >= t.kill);

    park.cg.add_proc(writer.id() as i32).unwrap();
    std::fs::remove_dir(&doomed.path).unwrap();
    let removed_at = Instant::now();
    agent
        .wait_for(Duration::from_secs(10), |v| {
            is(v, "cgroup removed; disarmed", &doomed.path)
        })
        .unwrap_or_else(|| panic!("no disarm line; log: {:#?}", agent.records()));
    let disarm_ms = removed_at.elapsed().as_millis();
    let records_at_removal = agent.records().len();
    // Two rescans (--walk-interval 1) and many --guard-ms re-checks later:
    std::thread::sleep(Duration::from_millis(2500));
    agent_kills_a_hog_in(&agent, &other);

    let all = agent.records();
    let about_doomed = |v: &serde_json::Value| {
        v["cgroup"].as_str() == Some(want.as_str())
            || v["oomcgroup"].as_str() == Some(want.as_str())
    };
    assert_eq!(
        all.iter()
            .filter(|v| is(v, "cgroup removed; disarmed", &doomed.path))
            .count(),
        1
    );
    let after: Vec<_> = all[records_at_removal..]
        .iter()
        .filter(|v| about_doomed(v))
        .collect();
    assert!(
        after.is_empty(),
        "records about the removed cgroup: {after:#?}"
    );
    let warnings = warnings_since(&agent, records_at_removal);
    assert!(warnings.is_empty(), "{warnings:#?}");
    eprintln!(
        "disarm logged {disarm_ms} ms after rmdir; {} records in all",
        all.len()
    );
    park.kill_all();
    let _ = writer.wait();
}

// ---------------------------------------------------------------------------------------
// 2. force_empty answering EBUSY, EINTR, or hanging.

/// The reclaim worker, started on a thread whose `write(2)` calls (only force_empty's)
/// wait for this test's answer: EBUSY, a stray EINTR, the real write, no answer at all.
#[test]
fn force_empty_refused_interrupted_or_hung_is_bounded_and_the_worker_serves_on() {
    let Some(sb) = setup(kernel_ready, "faults-reclaim", 256 * M) else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let prog = write_filter(libc::SECCOMP_RET_USER_NOTIF, None);
        let listener = install_on_this_thread(&prog, true).unwrap();
        // The worker and its watchdog inherit the filter; nothing else does.
        let reclaimer = oomguard::reclaim::spawn(timeout, 4).unwrap();
        tx.send((listener, reclaimer)).unwrap();
    });
    let (listener, reclaimer) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let sup = Supervisor { listener };
    let (done_tx, done_rx) = mpsc::channel();
    let request = |cg: &MemCgroup| {
        let tx = done_tx.clone();
        assert!(reclaimer.request(Request {
            cgroup: cg.clone(),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        }));
    };
    let write = || {
        let (id, nr) = sup
            .next(Duration::from_secs(5))
            .expect("the worker did not write");
        assert_eq!(i64::from(nr), libc::SYS_write);
        id
    };
    let result = || done_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    // Page cache to reclaim, written back so force_empty can drop it.
    let file = TempFile::new("reclaim");
    let mut w = hog(&sb.cg, &["--file", file.arg(), "--total", "32M"]);
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::metadata(&file.0).is_ok_and(|m| m.len() >= 32 * M)
    }));
    w.kill().unwrap();
    w.wait().unwrap();
    // SAFETY: sync(2) has no arguments.
    unsafe { libc::sync() };

    // EBUSY (kernels before 3.16 while tasks remain): Failed at once.
    request(&sb.cg);
    sup.answer(write(), libc::EBUSY);
    let r = result();
    assert!(
        matches!(r, ReclaimResult::Failed { errno, .. } if errno == libc::EBUSY),
        "{r:?}"
    );
    eprintln!("EBUSY: {r:?}");

    // The worker serves the next request: the real force_empty.
    let before = sb.cg.usage().unwrap();
    request(&sb.cg);
    sup.answer(write(), 0);
    let r = result();
    assert!(
        matches!(r, ReclaimResult::Done { freed, .. } if freed > 0),
        "{r:?} (usage before {before})"
    );
    eprintln!("real force_empty after EBUSY: {r:?}");

    // A stray EINTR long before the time bound is not the time bound: written again.
    request(&sb.cg);
    sup.answer(write(), libc::EINTR);
    match sup.next(Duration::from_secs(2)) {
        Some((id, _)) => sup.answer(id, 0),
        None => panic!(
            "an EINTR before the bound was not written again: {:?}",
            done_rx.recv_timeout(Duration::from_secs(1))
        ),
    }
    let r = result();
    assert!(matches!(r, ReclaimResult::Done { .. }), "{r:?}");
    eprintln!("EINTR, then the real write: {r:?}");

    // EINTR on every try: given up as Failed, still not reported as the time bound.
    request(&sb.cg);
    let mut tries = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        if let Ok(r) = done_rx.try_recv() {
            break r;
        }
        assert!(Instant::now() < deadline, "no result after {tries} EINTRs");
        if let Some((id, _)) = sup.next(Duration::from_millis(100)) {
            tries += 1;
            assert!(tries <= 10, "EINTR retried without end");
            sup.answer(id, libc::EINTR);
        }
    };
    assert!(
        matches!(r, ReclaimResult::Failed { errno, .. } if errno == libc::EINTR),
        "{r:?}"
    );
    eprintln!("EINTR {tries} times: {r:?}");

    // A write that hangs: interrupted at the bound by the watchdog's SIGUSR1.
    request(&sb.cg);
    let _unanswered = write();
    let r = result();
    match r {
        ReclaimResult::TimedOut { took, .. } => assert!(took >= timeout, "{took:?}"),
        other => panic!("a hung force_empty must time out: {other:?}"),
    }
    eprintln!("hung write, bound {timeout:?}: {r:?}");

    // And the worker still serves.
    request(&sb.cg);
    sup.answer(write(), 0);
    let r = result();
    assert!(matches!(r, ReclaimResult::Done { .. }), "{r:?}");
}

/// In the agent, every 1-byte `write(2)` (force_empty's "0") answers EBUSY: the failed
/// reclaim is reported once per --reclaim-interval-ms, not on every crossing, and the
/// kill threshold still kills.
#[test]
fn a_refused_force_empty_is_reported_once_per_interval_and_kills_go_on() {
    let Some(sb) = setup(kernel_ready, "faults-ebusy", 128 * M) else {
        return;
    };
    let prog = write_filter(libc::SECCOMP_RET_ERRNO | libc::EBUSY as u32, Some(1));
    let mut agent = process_agent(
        sb.path(),
        "ebusy",
        "eventfd",
        &["--reclaim-interval-ms", "600000"],
        move || {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: prctl with a filter built before the fork.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &fprog as *const libc::sock_fprog,
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        },
    );
    agent.expect_armed(sb.path(), Duration::from_secs(10));
    let from = agent.records().len();
    // Three crossings of the reclaim threshold, each ending in a kill.
    for _ in 0..3 {
        agent_kills_a_hog_in(&agent, &sb.cg);
        assert!(wait_until(Duration::from_secs(5), || sb
            .cg
            .usage()
            .is_ok_and(|u| u < 32 * M)));
    }
    // The first crossing's reclaim result may trail its kill.
    agent.wait_for(Duration::from_secs(5), |v| v["action"] == "reclaim");
    let reclaims = agent.decisions("reclaim");
    assert_eq!(reclaims.len(), 1, "{reclaims:#?}");
    let detail = reclaims[0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("Failed") && detail.contains(&format!("errno: {}", libc::EBUSY)),
        "{detail}"
    );
    assert_eq!(agent.decisions("kill").len(), 3);
    let warnings = warnings_since(&agent, from);
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert!(agent.running());
    eprintln!("reclaim record: {detail}");
}

// ---------------------------------------------------------------------------------------
// 3. cgroup.event_control refusing a registration.

/// A file's mode, changed for the test and put back on drop.
struct ModeGuard {
    path: PathBuf,
    mode: u32,
}

impl ModeGuard {
    fn set(path: PathBuf, mode: u32) -> ModeGuard {
        let old = std::fs::metadata(&path).unwrap().permissions().mode();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        ModeGuard { path, mode: old }
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.mode));
    }
}

/// One cgroup's `cgroup.event_control` is mode 000 and the agent runs without
/// CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: the kernel refuses the registration. Logged
/// once across rescans; the sibling is guarded; armed at the first rescan after the mode
/// is put back.
#[test]
fn a_refused_registration_is_logged_once_and_the_sibling_stays_guarded() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-refused").unwrap();
    let refused = sb.child("refused").unwrap();
    refused.set_limit(64 * M).unwrap();
    let sibling = sb.child("sibling").unwrap();
    sibling.set_limit(128 * M).unwrap();
    let mode = ModeGuard::set(refused.file("cgroup.event_control"), 0o000);
    let agent = process_agent(
        sb.path(),
        "refused",
        "eventfd",
        &["--walk-interval", "1"],
        || drop_caps(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]),
    );
    agent.expect_armed(&sibling.path, Duration::from_secs(10));
    let warn = seen(&agent, Duration::from_secs(10), |v| {
        is(v, "cannot guard cgroup", &refused.path)
    })
    .unwrap_or_else(|| panic!("no failure line; log: {:#?}", agent.records()));
    let error = warn["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("cgroup.event_control") && error.contains("Permission denied"),
        "{error}"
    );
    // Three rescans (--walk-interval 1) retry it and fail the same way.
    std::thread::sleep(Duration::from_millis(3500));
    agent_kills_a_hog_in(&agent, &sibling);
    let failures = agent.count(|v| is(v, "cannot guard cgroup", &refused.path));
    assert_eq!(failures, 1, "{:#?}", agent.records());
    assert_eq!(agent.count(|v| is(v, "armed", &refused.path)), 0);

    drop(mode);
    agent
        .wait_armed(&refused.path, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("not armed after the fix; log: {:#?}", agent.records()));
    assert_eq!(
        agent.count(|v| is(v, "cannot guard cgroup", &refused.path)),
        1
    );
    eprintln!("refused registration, logged once: {error}");
}

/// `memory.oom_control` unreadable (mode 000, no CAP_DAC_*): the OOM notifier cannot be
/// armed. The cgroup is guarded all the same (its thresholds are armed and a hog in it is
/// killed), and the missing notifier is said once instead of silently dropped.
#[test]
fn a_refused_oom_notifier_is_logged_and_the_cgroup_is_still_guarded() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-oomctl").unwrap();
    let cg = sb.child("c").unwrap();
    cg.set_limit(64 * M).unwrap();
    let _mode = ModeGuard::set(cg.file("memory.oom_control"), 0o000);
    let agent = process_agent(
        sb.path(),
        "oomctl",
        "eventfd",
        &["--walk-interval", "1"],
        || drop_caps(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]),
    );
    agent.expect_armed(&cg.path, Duration::from_secs(10));
    let warn = seen(&agent, Duration::from_secs(5), |v| {
        is(
            v,
            "cannot arm the OOM notifier: a kernel OOM kill in this cgroup will not be reported",
            &cg.path,
        )
    })
    .unwrap_or_else(|| {
        panic!(
            "no line about the OOM notifier; log: {:#?}",
            agent.records()
        )
    });
    let error = warn["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("memory.oom_control") && error.contains("Permission denied"),
        "{error}"
    );
    agent_kills_a_hog_in(&agent, &cg);
    // Rescans (--walk-interval 1) do not re-arm an unchanged cgroup, nor say it again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        agent.count(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cannot arm the OOM notifier"))),
        1,
        "{:#?}",
        agent.records()
    );
}

/// A guarded cgroup's usage file becomes unreadable while the guard re-checks it every
/// --guard-ms (it is above its threshold): the failure is logged at most once, not per
/// re-check. The guard keeps the usage file of each cgroup it re-checks open (one `pread`
/// per read), so a mode change after it opened the file does not stop its reads at all (no
/// line); a read that fails closes the kept file and reads by path, which then fails too.
#[test]
fn an_unreadable_usage_is_logged_once_not_on_every_recheck() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-unreadable").unwrap();
    let cached = sb.child("cached").unwrap();
    cached.set_limit(64 * M).unwrap();
    let agent = process_agent(
        sb.path(),
        "unreadable",
        "eventfd",
        &["--guard-ms", "50"],
        || drop_caps(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]),
    );
    agent.expect_armed(&cached.path, Duration::from_secs(10));
    let file = TempFile::new("unreadable");
    let mut writer = hog(&cached, &["--file", file.arg(), "--total", "60M"]);
    let want = cached.path.display().to_string();
    seen(&agent, Duration::from_secs(20), |v| {
        v["action"] == "skip-cache" && v["oomcgroup"].as_str() == Some(want.as_str())
    })
    .unwrap_or_else(|| panic!("never above its threshold: {:#?}", agent.records()));
    let from = agent.records().len();
    let mode = ModeGuard::set(cached.file("memory.usage_in_bytes"), 0o000);
    // About twenty re-checks at --guard-ms 50.
    std::thread::sleep(Duration::from_secs(1));
    let lines = agent.records()[from..]
        .iter()
        .filter(|v| is(v, "cannot read usage", &cached.path))
        .count();
    drop(mode);
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert!(lines <= 1, "{:#?}", &agent.records()[from..]);
}

/// Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread's effective
/// set (capset(2) changes only the calling thread).
fn drop_dac_on_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a valid header and two data structs (version 3).
    unsafe {
        assert_eq!(
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut Header,
                data.as_mut_ptr()
            ),
            0
        );
        data[0].effective &= !((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH));
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()),
            0
        );
    }
}

/// `MemCgroup::walk` tells a directory it could not list from one that is gone.
#[test]
fn the_walk_names_a_directory_it_cannot_list() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-walk").unwrap();
    let mid = sb.child("mid").unwrap();
    let leaf = mid.path.join("leaf");
    std::fs::create_dir(&leaf).unwrap();
    let _mode = ModeGuard::set(mid.path.clone(), 0o111);
    let root = sb.cg.clone();
    let (seen, unlisted) = std::thread::spawn(move || {
        drop_dac_on_this_thread();
        let (all, unlisted) = root.walk();
        let all: Vec<PathBuf> = all.into_iter().map(|c| c.path).collect();
        let unlisted: Vec<(PathBuf, String)> = unlisted
            .into_iter()
            .map(|(p, e)| (p, oomguard::error_line(&e)))
            .collect();
        (all, unlisted)
    })
    .join()
    .unwrap();
    assert_eq!(seen, [sb.path().to_path_buf(), mid.path.clone()]);
    assert_eq!(unlisted.len(), 1, "{unlisted:?}");
    assert_eq!(unlisted[0].0, mid.path);
    assert!(unlisted[0].1.contains("Permission denied"), "{unlisted:?}");
    // With the capabilities (this thread), the same walk sees everything.
    let (all, unlisted) = sb.cg.walk();
    assert_eq!(all.len(), 3);
    assert!(unlisted.is_empty());
}

/// A directory inside --root that the agent can traverse but not list (mode 0111, DAC
/// capabilities dropped): the rescan cannot see what is beneath it, which is not the same
/// as it being gone. The cgroups armed there stay guarded.
#[test]
fn a_directory_the_walk_cannot_list_does_not_disarm_the_cgroups_beneath_it() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-unlisted").unwrap();
    let mid = sb.child("mid").unwrap();
    let leaf = MemCgroup::new(mid.path.join("leaf"));
    std::fs::create_dir(&leaf.path).unwrap();
    leaf.set_limit(128 * M).unwrap();
    let agent = process_agent(
        sb.path(),
        "unlisted",
        "eventfd",
        &["--walk-interval", "1"],
        || drop_caps(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]),
    );
    agent.expect_armed(&leaf.path, Duration::from_secs(10));
    let _mode = ModeGuard::set(mid.path.clone(), 0o111);
    // Two rescans (--walk-interval 1).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        agent.count(|v| is(v, "cgroup removed; disarmed", &leaf.path)),
        0,
        "{:#?}",
        agent.records()
    );
    agent_kills_a_hog_in(&agent, &leaf);
}

// ---------------------------------------------------------------------------------------
// 4. tracefs or bpffs missing.

/// `(mount id, mount point)` of every tracefs and bpf mount in a mountinfo text.
fn pseudo_mounts(mountinfo: &str) -> Vec<(String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let fstype = *f.get(sep + 1)?;
            matches!(fstype, "tracefs" | "bpf").then(|| (f[0].to_string(), f[4].to_string()))
        })
        .collect()
}

fn host_pseudo_mounts() -> Vec<(String, String)> {
    pseudo_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
}

/// A pre-exec hook: a private mount namespace without tracefs and bpffs, then `caps`
/// dropped from the bounding set.
fn private_ns_without_pseudo_fs(
    caps: &'static [i32],
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    let mut targets: Vec<CString> = host_pseudo_mounts()
        .into_iter()
        .map(|(_, t)| CString::new(t).unwrap())
        .collect();
    // Deepest first, so nested mounts go before their parents.
    targets.sort_by_key(|t| std::cmp::Reverse(t.as_bytes().len()));
    move || {
        // SAFETY: unshare, mount and umount2 on C strings prepared before the fork.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for t in &targets {
                if libc::umount2(t.as_ptr(), libc::MNT_DETACH) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        drop_caps(caps)
    }
}

/// Checks the agent's mount namespace is its own and none of its tracefs/bpf mounts is
/// in ours, and that ours did not change.
fn assert_host_mounts_untouched(agent: &Agent, before: &[(String, String)]) {
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", agent.pid())).unwrap();
    assert_ne!(
        ours, theirs,
        "the agent must run in its own mount namespace"
    );
    let now = host_pseudo_mounts();
    assert_eq!(now, before, "the host's tracefs/bpf mounts changed");
}

/// tracefs and bpffs unmounted (in the agent's private mount namespace): `--mode ebpf`
/// mounts both itself, says so, and kills before the kernel; the host's mounts stay as
/// they were.
#[test]
fn ebpf_mode_mounts_missing_tracefs_and_bpffs_itself() {
    if !kernel_ready() || !ebpf_ready() {
        return;
    }
    let _serial = serial();
    let before = host_pseudo_mounts();
    let sb = sandbox("faults-mount", 256 * M);
    let mut agent = process_agent(
        sb.path(),
        "mount",
        "ebpf",
        &[],
        private_ns_without_pseudo_fs(&[]),
    );
    agent.expect_armed(sb.path(), Duration::from_secs(15));
    let messages: Vec<String> = agent
        .records()
        .iter()
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect();
    for m in [
        "mounted tracefs, which was not mounted",
        "mounted bpffs, which was not mounted",
        "eBPF programs loaded and attached; threshold eventfds stay armed as the backstop",
    ] {
        assert_eq!(
            messages.iter().filter(|x| *x == m).count(),
            1,
            "{m}: {messages:#?}"
        );
    }
    let inside = pseudo_mounts(
        &std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid())).unwrap(),
    );
    let mut points: Vec<&str> = inside.iter().map(|(_, t)| t.as_str()).collect();
    points.sort_unstable();
    assert_eq!(points, ["/sys/fs/bpf", "/sys/kernel/tracing"], "{inside:?}");
    assert_host_mounts_untouched(&agent, &before);
    for (id, _) in &inside {
        assert!(
            before.iter().all(|(b, _)| b != id),
            "mount {id} is the host's"
        );
    }
    agent_kills_a_hog_in(&agent, &sb.cg);
    assert!(agent.stop(Duration::from_secs(10)).is_some());
    assert_eq!(host_pseudo_mounts(), before);
}

/// tracefs and bpffs missing and CAP_SYS_ADMIN dropped, so the agent cannot mount them:
/// `--mode auto` says why once and guards with eventfds.
#[test]
fn auto_mode_falls_back_once_when_it_cannot_mount_tracefs() {
    if !kernel_ready() || !ebpf_ready() {
        return;
    }
    let _serial = serial();
    let before = host_pseudo_mounts();
    let sb = sandbox("faults-nomount", 256 * M);
    let agent = process_agent(
        sb.path(),
        "nomount",
        "auto",
        &[],
        private_ns_without_pseudo_fs(&[CAP_SYS_ADMIN]),
    );
    agent.expect_armed(sb.path(), Duration::from_secs(15));
    let fallback = "eBPF unavailable; guarding with threshold eventfds only";
    // Every warning or error that mentions eBPF, bpffs or tracefs: the fallback's one.
    let warns: Vec<serde_json::Value> = warnings_since(&agent, 0)
        .into_iter()
        .filter(|v| {
            let text = v.to_string().to_lowercase();
            text.contains("bpf") || text.contains("tracefs")
        })
        .collect();
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert_eq!(warns[0]["message"], fallback);
    // Neither pseudo file system can be mounted here; bpffs is tried first (nothing can be
    // pinned without it), so it is the one named.
    let reason = warns[0]["reason"].as_str().unwrap_or_default();
    assert!(
        (reason.contains("tracefs") || reason.contains("mounting bpf"))
            && reason.contains("Operation not permitted"),
        "{reason}"
    );
    assert_host_mounts_untouched(&agent, &before);
    agent_kills_a_hog_in(&agent, &sb.cg);
    agent.assert_woken_by_eventfds_only();
    eprintln!("fallback reason: {reason}");
}

// ---------------------------------------------------------------------------------------
// 5. The fd limit reached.

/// Sets RLIMIT_NOFILE (soft and hard) in the child.
fn nofile(limit: u64) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    nofile_soft_hard(limit, limit)
}

/// Sets the soft and the hard RLIMIT_NOFILE in the child.
fn nofile_soft_hard(
    soft: u64,
    hard: u64,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    move || {
        let r = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

const FD_LIMIT: u64 = 100;
const FD_CGROUPS: usize = 40;

/// RLIMIT_NOFILE 100 and 40 limited cgroups (3 eventfds each): the agent arms what it can,
/// says once per cgroup why it cannot arm the rest, kills in an armed one, and arms the
/// rest at the rescan after armed cgroups were removed.
#[test]
fn at_the_fd_limit_the_agent_guards_what_it_armed_and_arms_the_rest_later() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-nofile").unwrap();
    let cgs: Vec<MemCgroup> = (0..FD_CGROUPS)
        .map(|i| {
            let cg = sb.child(&format!("c{i:02}")).unwrap();
            cg.set_limit(64 * M).unwrap();
            cg
        })
        .collect();
    let mut agent = process_agent(
        sb.path(),
        "nofile",
        "eventfd",
        &["--walk-interval", "1"],
        nofile(FD_LIMIT),
    );
    let state = |agent: &Agent| {
        let armed: Vec<&MemCgroup> = cgs
            .iter()
            .filter(|c| agent.count(|v| is(v, "armed", &c.path)) > 0)
            .collect();
        let failed: Vec<&MemCgroup> = cgs
            .iter()
            .filter(|c| agent.count(|v| is(v, "cannot guard cgroup", &c.path)) > 0)
            .collect();
        (armed, failed)
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (a, f) = state(&agent);
            a.len() + f.len() >= FD_CGROUPS
        }),
        "every cgroup must be armed or reported; log: {:#?}",
        agent.records()
    );
    // Three rescans retry the ones that failed.
    std::thread::sleep(Duration::from_millis(3500));
    assert!(agent.running(), "the agent exited: {:#?}", agent.records());
    let (armed, failed) = state(&agent);
    assert!(
        !armed.is_empty() && !failed.is_empty(),
        "{:#?}",
        agent.records()
    );
    let armed: Vec<MemCgroup> = armed.into_iter().cloned().collect();
    let failed: Vec<MemCgroup> = failed.into_iter().cloned().collect();
    for c in &failed {
        let lines = agent.count(|v| is(v, "cannot guard cgroup", &c.path));
        assert_eq!(lines, 1, "{} reported {lines} times", c.path.display());
    }
    let sample = agent
        .records()
        .into_iter()
        .find(|v| v["message"] == "cannot guard cgroup")
        .unwrap();
    eprintln!(
        "RLIMIT_NOFILE {FD_LIMIT}: {} of {FD_CGROUPS} armed, {} reported: {}",
        armed.len(),
        failed.len(),
        sample["error"]
    );

    agent_kills_a_hog_in(&agent, &armed[0]);

    // Free the fds of the armed ones: the next rescan arms the others.
    let records_before = agent.records().len();
    for c in &armed {
        std::fs::remove_dir(&c.path).unwrap();
    }
    let rearmed = |agent: &Agent| {
        agent.records()[records_before..]
            .iter()
            .filter(|v| failed.iter().any(|c| is(v, "armed", &c.path)))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || rearmed(&agent) >= 1),
        "nothing armed after fds were freed; log: {:#?}",
        agent.records()
    );
    let newly = rearmed(&agent);
    eprintln!(
        "after removing {} armed cgroups: {newly} of the {} others armed",
        armed.len(),
        failed.len()
    );
    let now_armed: Vec<&MemCgroup> = failed
        .iter()
        .filter(|c| {
            agent.records()[records_before..]
                .iter()
                .any(|v| is(v, "armed", &c.path))
        })
        .collect();
    agent_kills_a_hog_in(&agent, now_armed[0]);
    assert!(agent.running());
    assert!(agent.stop(Duration::from_secs(10)).is_some());
}

/// A soft limit of 100 under a hard one of 4,096 (as runtimes often start daemons): the
/// agent raises the soft limit at start and arms all 40 cgroups, none reported.
#[test]
fn a_low_soft_fd_limit_is_raised_to_the_hard_one_at_start() {
    if !kernel_ready() {
        return;
    }
    let _serial = serial();
    let sb = Sandbox::new("faults-softfd").unwrap();
    let cgs: Vec<MemCgroup> = (0..FD_CGROUPS)
        .map(|i| {
            let cg = sb.child(&format!("c{i:02}")).unwrap();
            cg.set_limit(64 * M).unwrap();
            cg
        })
        .collect();
    let mut agent = agent_with(
        sb.path(),
        "softfd",
        &["--mode", "eventfd", "--policy", "noop"],
        nofile_soft_hard(FD_LIMIT, 4096),
    );
    let all_armed = |agent: &Agent| {
        cgs.iter()
            .all(|c| agent.count(|v| is(v, "armed", &c.path)) > 0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || all_armed(&agent)),
        "not every cgroup was armed; log: {:#?}",
        agent.records()
    );
    let raised = agent
        .records()
        .into_iter()
        .find(|v| v["message"] == "raised the soft fd limit to the hard limit");
    let raised =
        raised.unwrap_or_else(|| panic!("no line about the fd limit: {:#?}", agent.records()));
    assert_eq!(
        (raised["old"].as_u64(), raised["new"].as_u64()),
        (Some(FD_LIMIT), Some(4096))
    );
    assert_eq!(
        agent.count(|v| v["message"] == "cannot guard cgroup"),
        0,
        "{:#?}",
        agent.records()
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        ["4096", "4096"],
        "{line}"
    );
    assert!(agent.stop(Duration::from_secs(10)).is_some());
}

// ---------------------------------------------------------------------------------------
// 6. A victim in D state.

/// A process blocked in `vfork` (its child never execs) sleeps in D state, but
/// killably: the kill takes effect as for any other task.
#[test]
fn a_killable_d_state_victim_dies() {
    let Some(sb) = setup(kernel_ready, "faults-dstate", 64 * M) else {
        return;
    };
    let procs = CString::new(sb.cg.file("cgroup.procs").as_os_str().as_bytes()).unwrap();
    // SAFETY: after fork the child only makes system calls (open, write, close, clone,
    // pause, _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(1);
            }
            libc::close(fd);
            // vfork semantics without a shared address space: this process waits
            // (TASK_KILLABLE) until its child execs or exits, which it never does.
            let c = libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_VFORK | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            );
            if c == 0 {
                loop {
                    libc::pause();
                }
            }
            libc::_exit(2);
        }
    }
    let pid = pid as u32;
    // Both in the sandbox: the child exists, so its parent waits for it (joining the
    // cgroup can show a brief D state of its own).
    assert!(
        wait_until(Duration::from_secs(5), || sb
            .cg
            .procs()
            .is_ok_and(|p| p.len() == 2)
            && proc_state(pid) == Some('D')),
        "the vfork parent is in state {:?}",
        proc_state(pid)
    );
    let task = oomguard::victim::read_task(pid as i32, sb.path()).unwrap();
    let out = kill_task(&task, sb.path(), &mount(), Duration::from_secs(2));
    assert!(matches!(out, Outcome::Exited { .. }), "{out:?}");
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    assert_eq!(r, pid as i32);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    eprintln!("vfork parent in D state: {out:?}");
}
