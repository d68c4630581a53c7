//! Loads the eBPF programs into the running kernel and checks what they count against real
//! memory cgroups. Runs as root on a cgroup v1 host:
//!
//! ```sh
//! sudo -E cargo test -p oomguard --test ebpf
//! ```
//!
//! The sandbox cgroups live beneath the test's own memory cgroup and are removed afterwards.
//! Without root or `bpf()` the test is skipped, unless `OOMGUARD_REQUIRE_ALL_FEATURES` is set
//! (as in CI), where a missing feature fails it.

use std::{
    error::Error,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use oomguard::bpf::MemcgEventCounter;

type TestResult = Result<(), Box<dyn Error>>;

const MEMORY_HIERARCHY: &str = "/sys/fs/cgroup/memory";
const TRACEFS: &str = "/sys/kernel/tracing";

#[test]
fn counts_memcg_events_of_a_cgroup_that_faults_in_memory() -> TestResult {
    if let Some(reason) = missing_feature() {
        if std::env::var_os("OOMGUARD_REQUIRE_ALL_FEATURES").is_some() {
            return Err(format!("OOMGUARD_REQUIRE_ALL_FEATURES is set but {reason}").into());
        }
        eprintln!("skipped: {reason}");
        return Ok(());
    }

    let busy = Sandbox::create("busy")?;
    let idle = Sandbox::create("idle")?;
    // Declared before the counter so that it is dropped after the programs are detached.
    let _tracefs = TracefsGuard::new()?;
    let counter = MemcgEventCounter::load()?;

    // dd faults in a 64 MiB anonymous buffer; `exec` keeps it in the pid written to cgroup.procs.
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            r#"echo $$ > "$0/cgroup.procs" && exec dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null"#,
        ])
        .arg(&busy.path)
        .status()?;
    assert!(status.success(), "workload in {busy:?} failed: {status}");

    let busy_count = counter.count(busy.id()?)?;
    let idle_count = counter.count(idle.id()?)?;
    eprintln!("memcg events: busy {busy_count}, idle {idle_count}");
    assert!(busy_count > 0, "no memcg events counted for {busy:?}");
    assert_eq!(idle_count, 0, "memcg events counted for {idle:?}");
    Ok(())
}

/// Why the kernel cannot run this test, if it cannot.
fn missing_feature() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new(MEMORY_HIERARCHY)
        .join("memory.usage_in_bytes")
        .exists()
    {
        return Some(format!(
            "no cgroup v1 memory hierarchy at {MEMORY_HIERARCHY}"
        ));
    }
    // BPF_MAP_CREATE (command 0) with no attributes: EINVAL when bpf() works, ENOSYS or EPERM
    // when it does not.
    const BPF_MAP_CREATE: libc::c_long = 0;
    // SAFETY: a null attribute pointer with size 0 is rejected by the kernel without access.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, std::ptr::null::<u8>(), 0) };
    let err = io::Error::last_os_error();
    match (ret, err.raw_os_error()) {
        (-1, Some(libc::ENOSYS | libc::EPERM)) => Some(format!("bpf() is unavailable: {err}")),
        _ => None,
    }
}

/// A memory cgroup beneath the test's own; its tasks are killed and it is removed on drop.
#[derive(Debug)]
struct Sandbox {
    path: PathBuf,
}

impl Sandbox {
    fn create(name: &str) -> io::Result<Self> {
        let path =
            own_memory_cgroup()?.join(format!("oomguard-test-ebpf-{}-{name}", std::process::id()));
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// The memcg id: the inode number of the cgroup's directory.
    fn id(&self) -> io::Result<u64> {
        Ok(fs::metadata(&self.path)?.ino())
    }

    fn kill_tasks(&self) {
        let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) else {
            return;
        };
        for pid in procs.lines().filter_map(|line| line.trim().parse().ok()) {
            // ESRCH is fine: the task exited since the read.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // rmdir fails with EBUSY until killed tasks have left the cgroup.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.kill_tasks();
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return,
                Err(err) if Instant::now() >= deadline => {
                    eprintln!("could not remove sandbox cgroup {:?}: {err}", self.path);
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The directory of this process's memory cgroup, from `/proc/self/cgroup`.
fn own_memory_cgroup() -> io::Result<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")?;
    let relative = cgroups
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers
                .split(',')
                .any(|controller| controller == "memory")
                .then_some(path)
        })
        .ok_or_else(|| io::Error::other("no memory controller in /proc/self/cgroup"))?;
    Ok(Path::new(MEMORY_HIERARCHY).join(relative.trim_start_matches('/')))
}

/// Unmounts tracefs on drop if it was not mounted when the guard was made: loading the programs
/// mounts it when it is missing.
struct TracefsGuard {
    was_mounted: bool,
}

impl TracefsGuard {
    fn new() -> io::Result<Self> {
        Ok(Self {
            was_mounted: tracefs_mounted()?,
        })
    }
}

impl Drop for TracefsGuard {
    fn drop(&mut self) {
        if self.was_mounted || !tracefs_mounted().unwrap_or(false) {
            return;
        }
        // SAFETY: a valid NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c"/sys/kernel/tracing".as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "could not unmount {TRACEFS}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

fn tracefs_mounted() -> io::Result<bool> {
    Ok(fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(TRACEFS) && fields.next() == Some("tracefs")
        }))
}
