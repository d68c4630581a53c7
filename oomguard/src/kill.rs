//! Killing one task safely: open a pidfd first, check it is still the task that was scored
//! and still inside the guarded cgroup, SIGKILL through the pidfd, `process_mrelease` to
//! reap its memory at once, then wait for the exit with a deadline. Plain `kill(2)` only
//! where pidfds don't exist (kernels before 5.3).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, kill_process, pidfd_open, pidfd_send_signal};

use crate::victim::{Task, parse_start_time};

/// What happened to one kill attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// SIGKILL sent and the task exited before the deadline.
    Exited {
        mreleased: bool,
        pidfd: bool,
        signal_us: u64,
        exit_us: u64,
    },
    /// SIGKILL sent but the task had not exited at the deadline (D state?).
    Stuck {
        mreleased: bool,
        pidfd: bool,
        signal_us: u64,
    },
    /// The task was gone before it could be signalled.
    Gone,
    /// Not killed: the pid now names another process, or it left the guarded cgroup.
    Refused { reason: String },
    /// The kernel refused the signal.
    Failed { errno: i32 },
}

impl Outcome {
    /// SIGKILL was sent (the task has exited or is exiting).
    pub fn signalled(&self) -> bool {
        matches!(self, Outcome::Exited { .. } | Outcome::Stuck { .. })
    }

    /// The task is dead or dying because of us.
    pub fn took_effect(&self) -> bool {
        matches!(self, Outcome::Exited { .. })
    }

    /// Microseconds from the start of the attempt to the signal, if one was sent.
    pub fn signal_us(&self) -> Option<u64> {
        match self {
            Outcome::Exited { signal_us, .. } | Outcome::Stuck { signal_us, .. } => {
                Some(*signal_us)
            }
            _ => None,
        }
    }
}

/// Is the process behind `pid` still the `task` that was scored (same start time), still
/// killable (`oom_score_adj` not -1000) and inside `scope`? `pinned`: a pidfd checked
/// before names it, so its start time need not be read again.
fn still_eligible(
    task: &Task,
    scope: &Path,
    memory_mount: &Path,
    pinned: bool,
) -> Result<(), String> {
    if !pinned {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", task.pid))
            .map_err(|_| "process gone".to_string())?;
        if parse_start_time(&stat) != Some(task.start_time) {
            return Err(format!("pid {} was recycled", task.pid));
        }
    }
    let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", task.pid))
        .map_err(|_| "process gone".to_string())?;
    killable(task, &adj)?;
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", task.pid))
        .map_err(|_| "process gone".to_string())?;
    inside(task, &cg, scope, memory_mount)
}

/// `oom_score_adj` (the file's text) lets the task be killed.
fn killable(task: &Task, adj: &str) -> Result<(), String> {
    if adj.trim().parse::<i32>() == Ok(crate::victim::OOM_SCORE_ADJ_MIN) {
        return Err(format!("pid {} became oom_score_adj -1000", task.pid));
    }
    Ok(())
}

/// `/proc/PID/cgroup` (the file's text) puts the task inside `scope`.
fn inside(task: &Task, cg: &str, scope: &Path, memory_mount: &Path) -> Result<(), String> {
    let rel = crate::cgroup::memory_cgroup_of(cg).ok_or("no memory cgroup")?;
    let abs = if beyond_our_cgroup_namespace(rel) {
        // A private cgroup namespace (cgroup v2 containers get one by default, the
        // DaemonSet's included) shows other cgroups relative to our own, as `/../..`: ask
        // the task's cgroup itself whether it still holds the task.
        let listed = crate::cgroup::MemCgroup::new(&task.cgroup)
            .procs()
            .is_ok_and(|p| p.contains(&task.pid));
        if listed {
            task.cgroup.clone()
        } else {
            return Err(format!("pid {} left {}", task.pid, task.cgroup.display()));
        }
    } else {
        memory_mount.join(rel.trim_start_matches('/'))
    };
    if !abs.starts_with(scope) {
        return Err(format!(
            "pid {} moved out of the guarded cgroup to {}",
            task.pid,
            abs.display()
        ));
    }
    Ok(())
}

/// True when a `/proc/PID/cgroup` path lies outside our cgroup namespace (`/../x`): it is
/// relative to our namespace's root, not to the hierarchy's.
fn beyond_our_cgroup_namespace(rel: &str) -> bool {
    rel.split('/').any(|c| c == "..")
}

fn process_mrelease(pidfd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a pidfd we own; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0) };
    rc == 0
}

/// Kills `task` if it is still the scored process inside `scope`, and waits up to
/// `timeout` for it to exit.
pub fn kill_task(task: &Task, scope: &Path, memory_mount: &Path, timeout: Duration) -> Outcome {
    kill_task_pinned(task, scope, memory_mount, timeout).0
}

/// Like [`kill_task`], and when the victim was signalled but has not exited yet
/// ([`Outcome::Stuck`]), its pidfd too: the caller waits for its exit (it becomes
/// readable then) before choosing another victim, as the kernel does.
pub fn kill_task_pinned(
    task: &Task,
    scope: &Path,
    memory_mount: &Path,
    timeout: Duration,
) -> (Outcome, Option<OwnedFd>) {
    match signal_task(task, scope, memory_mount) {
        Ok(sent) => confirm(sent, timeout),
        Err(outcome) => (outcome, None),
    }
}

/// A task SIGKILLed by [`signal_task`], not yet confirmed gone.
#[derive(Debug)]
pub struct Signalled {
    pid: i32,
    start_time: u64,
    /// `None` on the `kill(2)` path (no pidfds).
    fd: Option<OwnedFd>,
    start: Instant,
    signal_us: u64,
}

impl Signalled {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The victim's pidfd: readable once it has exited.
    pub fn pidfd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// Microseconds from the start of the attempt to the signal.
    pub fn signal_us(&self) -> u64 {
        self.signal_us
    }
}

/// The kill's first half, all the kill threshold waits for: pin the process (pidfd), check
/// it is still the scored task inside `scope`, and SIGKILL it. The outcome when no signal
/// was sent (refused, gone, failed).
pub fn signal_task(task: &Task, scope: &Path, memory_mount: &Path) -> Result<Signalled, Outcome> {
    let start = Instant::now();
    let Some(pid) = Pid::from_raw(task.pid) else {
        let reason = "pid 0".into();
        return Err(Outcome::Refused { reason });
    };
    let fd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(Errno::SRCH) => return Err(Outcome::Gone),
        // ENOSYS: a kernel before 5.3. EPERM/EACCES: pidfd_open checks no permission, so
        // this is a seccomp profile or an LSM denying the call; kill(2) still works.
        Err(Errno::NOSYS | Errno::PERM | Errno::ACCESS) => None,
        Err(e) => {
            let errno = e.raw_os_error();
            return Err(Outcome::Failed { errno });
        }
    };
    // A pidfd names one process for good (a recycled pid number cannot redirect it): if
    // the start time still matches now, the signal reaches the task that was scored.
    // Without one, the check and kill(2) are as close together as the 3.10 path allows.
    still_eligible(task, scope, memory_mount, false)
        .map_err(|reason| Outcome::Refused { reason })?;
    send(task, pid, fd, start)
}

/// A task pinned ahead of its kill: its pidfd, and its `/proc` files the signal's last
/// check reads, kept open. Opened between `pidfd_open` and the start-time check, they name
/// the same process as the pidfd (the pid was not recycled while it lived), so at the
/// crossing the check costs two `pread`s instead of two path walks, opens and closes.
pub struct Pinned {
    pub pidfd: OwnedFd,
    adj: Option<std::fs::File>,
    cgroup: Option<std::fs::File>,
}

/// Pins `task` ahead of a kill (at the reclaim threshold): its pidfd, once checked to name
/// the scored task, killable, inside `scope`. `None` where pidfds don't exist.
pub fn pin(task: &Task, scope: &Path, memory_mount: &Path) -> Option<Pinned> {
    let pidfd = pidfd_open(Pid::from_raw(task.pid)?, PidfdFlags::empty()).ok()?;
    let adj = std::fs::File::open(format!("/proc/{}/oom_score_adj", task.pid)).ok();
    let cgroup = std::fs::File::open(format!("/proc/{}/cgroup", task.pid)).ok();
    still_eligible(task, scope, memory_mount, false).ok()?;
    Some(Pinned { pidfd, adj, cgroup })
}

/// Reads a kept `/proc` file afresh (`pread` at 0 regenerates it) into `buf`: `Err` when
/// the process is gone (reaped: `ESRCH`), `Ok(None)` when not kept or larger than `buf`.
fn pread_text<'a>(
    file: Option<&std::fs::File>,
    buf: &'a mut [u8],
) -> Result<Option<&'a str>, Outcome> {
    let Some(file) = file else {
        return Ok(None);
    };
    let text = crate::sys::pread_whole(file, buf).map_err(|_| Outcome::Gone)?;
    Ok(text.filter(|t| !t.is_empty()))
}

/// [`signal_task`] for a task [`pin`]ned before: its pidfd may name a process that has
/// died since (then readable: nothing is signalled), and the task may have left `scope` or
/// become unkillable (checked again through its kept `/proc` files, else by pid, without
/// the start time the pidfd stands for).
pub fn signal_pinned(
    task: &Task,
    pinned: Pinned,
    scope: &Path,
    memory_mount: &Path,
) -> Result<Signalled, Outcome> {
    let start = Instant::now();
    let pid = Pid::from_raw(task.pid).ok_or(Outcome::Gone)?;
    if pidfd_exited(&pinned.pidfd) {
        return Err(Outcome::Gone);
    }
    let mut adj = [0u8; 32];
    let mut cg = [0u8; 4096];
    let refused = |reason| Outcome::Refused { reason };
    match (
        pread_text(pinned.adj.as_ref(), &mut adj)?,
        pread_text(pinned.cgroup.as_ref(), &mut cg)?,
    ) {
        (Some(adj), Some(cg)) => {
            killable(task, adj).map_err(refused)?;
            inside(task, cg, scope, memory_mount).map_err(refused)?;
        }
        _ => still_eligible(task, scope, memory_mount, true).map_err(refused)?,
    }
    send(task, pid, Some(pinned.pidfd), start)
}

fn send(task: &Task, pid: Pid, fd: Option<OwnedFd>, start: Instant) -> Result<Signalled, Outcome> {
    let sent = match &fd {
        Some(fd) => pidfd_send_signal(fd, Signal::KILL),
        None => kill_process(pid, Signal::KILL),
    };
    match sent {
        Ok(()) => Ok(Signalled {
            pid: task.pid,
            start_time: task.start_time,
            fd,
            start,
            signal_us: start.elapsed().as_micros() as u64,
        }),
        Err(Errno::SRCH) => Err(Outcome::Gone),
        Err(e) => Err(Outcome::Failed {
            errno: e.raw_os_error(),
        }),
    }
}

/// The kill's second half, off the kill threshold's path: `process_mrelease` to reap the
/// victim's memory at once, then wait up to `timeout` for its exit. The pidfd comes back
/// with [`Outcome::Stuck`], for the caller to wait on.
pub fn confirm(sent: Signalled, timeout: Duration) -> (Outcome, Option<OwnedFd>) {
    let Signalled {
        pid,
        start_time,
        fd,
        start,
        signal_us,
    } = sent;
    let Some(fd) = fd else {
        return (
            wait_without_pidfd(pid, start_time, start, signal_us, timeout),
            None,
        );
    };
    let mreleased = process_mrelease(&fd);
    if wait_pidfd(&fd, timeout.saturating_sub(start.elapsed())) {
        let exit_us = start.elapsed().as_micros() as u64;
        let out = Outcome::Exited {
            mreleased,
            pidfd: true,
            signal_us,
            exit_us,
        };
        (out, None)
    } else {
        let out = Outcome::Stuck {
            mreleased,
            pidfd: true,
            signal_us,
        };
        (out, Some(fd))
    }
}

/// Whether a pidfd's process has exited (the pidfd is readable), without waiting.
pub fn pidfd_exited(fd: &OwnedFd) -> bool {
    wait_pidfd(fd, Duration::ZERO)
}

/// The 3.10 path's confirmation: poll `/proc` for the exit.
fn wait_without_pidfd(
    pid: i32,
    start_time: u64,
    start: Instant,
    signal_us: u64,
    timeout: Duration,
) -> Outcome {
    let deadline = start + timeout;
    while Instant::now() < deadline {
        let same = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_start_time(&s))
            == Some(start_time);
        let zombie = crate::victim::read_task(pid, Path::new("")).is_none_or(|t| t.exiting);
        if !same || zombie {
            return Outcome::Exited {
                mreleased: false,
                pidfd: false,
                signal_us,
                exit_us: start.elapsed().as_micros() as u64,
            };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Outcome::Stuck {
        mreleased: false,
        pidfd: false,
        signal_us,
    }
}

/// Waits until the pidfd is readable (the process exited) or `timeout` passes.
fn wait_pidfd(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let borrowed = fd.as_fd();
        let mut fds = [PollFd::new(&borrowed, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(Errno::INTR) if !left.is_zero() => continue,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::victim::read_task;

    /// The v1 memory mount and our own cgroup in it (`None`, said, on a node without one).
    fn v1_scope() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        let mount = std::path::PathBuf::from(crate::cgroup::DEFAULT_MEMORY_ROOT);
        let cg = crate::cgroup::cgroup_of_pid(&mount, "self").unwrap();
        if !cg.path.exists() {
            eprintln!(
                "skipped: no cgroup v1 memory hierarchy at {}",
                mount.display()
            );
            return None;
        }
        Some((mount, cg.path))
    }

    #[test]
    fn paths_beyond_a_cgroup_namespace() {
        assert!(beyond_our_cgroup_namespace("/../../kubepods.slice/x.scope"));
        assert!(!beyond_our_cgroup_namespace("/kubepods.slice/x..scope"));
        assert!(!beyond_our_cgroup_namespace("/"));
    }

    #[test]
    fn kills_a_child_and_confirms_the_exit() {
        let Some((mount, scope)) = v1_scope() else {
            return;
        };
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let task = read_task(child.id() as i32, &scope).unwrap();
        let out = kill_task(&task, &scope, &mount, Duration::from_secs(2));
        assert!(out.took_effect(), "{out:?}");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn refuses_a_recycled_pid_and_a_task_outside_the_scope() {
        let Some((mount, scope)) = v1_scope() else {
            return;
        };
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let mut task = read_task(child.id() as i32, &scope).unwrap();
        let outside = scope.join("not-an-ancestor");
        let out = kill_task(&task, &outside, &mount, Duration::from_secs(1));
        assert!(matches!(out, Outcome::Refused { .. }), "{out:?}");
        task.start_time += 1;
        let out = kill_task(&task, &scope, &mount, Duration::from_secs(1));
        assert!(matches!(out, Outcome::Refused { .. }), "{out:?}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child must still run"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_pinned_task_is_signalled_only_while_it_lives_inside_the_scope() {
        let Some((mount, scope)) = v1_scope() else {
            return;
        };
        let mut dead = Command::new("sleep").arg("30").spawn().unwrap();
        let task = read_task(dead.id() as i32, &scope).unwrap();
        let fd = pin(&task, &scope, &mount).expect("pin a live child");
        dead.kill().unwrap();
        dead.wait().unwrap();
        let out = signal_pinned(&task, fd, &scope, &mount).map(|s| s.pid());
        assert_eq!(
            out.unwrap_err(),
            Outcome::Gone,
            "its pidfd names a dead process"
        );

        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let task = read_task(child.id() as i32, &scope).unwrap();
        let fd = pin(&task, &scope, &mount).unwrap();
        let outside = scope.join("not-an-ancestor");
        let out = signal_pinned(&task, fd, &outside, &mount).map(|s| s.pid());
        assert!(matches!(out, Err(Outcome::Refused { .. })), "{out:?}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child must still run"
        );
        let fd = pin(&task, &scope, &mount).unwrap();
        let sent = signal_pinned(&task, fd, &scope, &mount).unwrap();
        let (out, _) = confirm(sent, Duration::from_secs(2));
        assert!(out.took_effect(), "{out:?}");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
