//! Throw-away memory cgroups beneath the caller's own memory cgroup, and a running agent,
//! for the demo, the tests and the benchmarks. Everything made here is removed on drop —
//! processes first, then cgroups, deepest first — even when the caller panics.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use oomguard::cgroup::{CgroupError, DEFAULT_MEMORY_ROOT, Layout, MemCgroup, cgroup_of_pid};

pub mod containerd;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A memory cgroup made beneath our own, removed with everything in it on drop.
pub struct Sandbox {
    pub cg: MemCgroup,
}

/// The memory hierarchy's mount: the v1 memory mount if there is one, else cgroup2.
pub fn memory_root() -> PathBuf {
    Layout::read()
        .ok()
        .and_then(|l| l.default_root().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MEMORY_ROOT))
}

/// Our own memory cgroup, on whichever hierarchy holds the memory controller.
pub fn own_cgroup() -> Result<MemCgroup, CgroupError> {
    cgroup_of_pid(&memory_root(), "self")
}

impl Sandbox {
    /// Makes `<own memory cgroup>/<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> Result<Self, CgroupError> {
        let own = own_cgroup()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = own
            .path
            .join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).map_err(|source| CgroupError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Sandbox {
            cg: MemCgroup::with_version(path, own.version),
        })
    }

    pub fn path(&self) -> &Path {
        &self.cg.path
    }

    /// Makes a child cgroup (removed with the sandbox). On v2 the sandbox first hands the
    /// memory controller down (`+memory` in its `cgroup.subtree_control`), which v2 allows
    /// only while the sandbox itself holds no process.
    pub fn child(&self, name: &str) -> Result<MemCgroup, CgroupError> {
        if self.cg.is_v2() {
            oomguard::cgroup::write_str(&self.cg.file("cgroup.subtree_control"), "+memory")?;
        }
        let path = self.cg.path.join(name);
        std::fs::create_dir(&path).map_err(|source| CgroupError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(MemCgroup::with_version(path, self.cg.version))
    }

    /// Kills every process in the sandbox and waits (bounded) until it is empty.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = self.cg.subtree_procs();
            if procs.is_empty() || Instant::now() > deadline {
                return;
            }
            for (_, pid) in procs {
                // SAFETY: kill(2) with a pid read from the sandbox's own cgroup.procs.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_all();
        let mut all = self.cg.subtree();
        all.reverse();
        for cg in all {
            for _ in 0..100 {
                match std::fs::remove_dir(&cg.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Makes `cmd` join `cg` before it execs, so it never runs a single instruction outside.
pub fn in_cgroup<'a>(cmd: &'a mut Command, cg: &MemCgroup) -> std::io::Result<&'a mut Command> {
    use std::os::unix::ffi::OsStrExt;
    let procs = std::ffi::CString::new(cg.file("cgroup.procs").as_os_str().as_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: after fork the closure only calls open/write/close, which are
    // async-signal-safe, on a C string prepared before the fork: no allocation.
    unsafe {
        Ok(cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n == 1 { Ok(()) } else { Err(err) }
        }))
    }
}

/// Called with each log record of an [`Agent`] as it arrives.
pub type Echo = Box<dyn Fn(&serde_json::Value) + Send>;

/// A running `oomguard run`, its stderr collected as JSON log records.
pub struct Agent {
    child: Child,
    log: Arc<(Mutex<VecDeque<serde_json::Value>>, Condvar)>,
    all: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Agent {
    /// Starts `exe run --log-format json <args>`; `echo` copies each record to our stderr
    /// through `echo`'s callback.
    pub fn start(exe: &Path, args: &[&str], echo: Option<Echo>) -> std::io::Result<Agent> {
        let mut cmd = Command::new(exe);
        cmd.arg("run").args(["--log-format", "json"]).args(args);
        Self::spawn(cmd, echo)
    }

    /// Runs a prepared `oomguard run` command (e.g. with a `pre_exec` hook) and collects
    /// its log like [`Agent::start`].
    pub fn spawn(mut cmd: Command, echo: Option<Echo>) -> std::io::Result<Agent> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
        let log = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
        let all = Arc::new(Mutex::new(Vec::new()));
        let (l2, a2) = (log.clone(), all.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str::<serde_json::Value>(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if let Some(f) = &echo {
                    f(&v);
                }
                if let Ok(mut a) = a2.lock() {
                    a.push(v.clone());
                }
                let (m, cv) = &*l2;
                if let Ok(mut q) = m.lock() {
                    q.push_back(v);
                }
                cv.notify_all();
            }
        });
        Ok(Agent { child, log, all })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` (times [`patience`]) for a record matching `pred`, consuming
    /// records up to it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + patience(timeout);
        let (m, cv) = &*self.log;
        let mut q = m.lock().ok()?;
        loop {
            while let Some(v) = q.pop_front() {
                if pred(&v) {
                    return Some(v);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            q = cv.wait_timeout(q, left).ok()?.0;
        }
    }

    /// Waits until the agent has armed `cg`.
    pub fn wait_armed(&self, cg: &Path, timeout: Duration) -> Option<serde_json::Value> {
        let want = cg.display().to_string();
        self.wait_for(timeout, |v| {
            v["message"] == "armed" && v["cgroup"].as_str() == Some(want.as_str())
        })
    }

    /// Waits until the agent has armed `cg`, or panics with the agent's log.
    pub fn expect_armed(&self, cg: &Path, timeout: Duration) -> serde_json::Value {
        self.wait_armed(cg, timeout).unwrap_or_else(|| {
            panic!(
                "{} not armed within {timeout:?}; log: {:#?}",
                cg.display(),
                self.records()
            )
        })
    }

    /// Every record so far (consumed or not).
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.all.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// How many records so far (consumed or not) match `pred`.
    pub fn count(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.all
            .lock()
            .map(|a| a.iter().filter(|v| pred(v)).count())
            .unwrap_or(0)
    }

    /// Decision records so far with this action.
    pub fn decisions(&self, action: &str) -> Vec<serde_json::Value> {
        self.records()
            .into_iter()
            .filter(|v| v["message"] == "decision" && v["action"] == action)
            .collect()
    }

    /// What woke each decision so far, in order ("eventfd", "ebpf", "recheck", ...). An
    /// episode is often decided on a re-check that an eventfd or eBPF wake-up scheduled, so
    /// a test of the signal looks at every decision, not only the kill's.
    pub fn wake_signals(&self) -> Vec<String> {
        self.records()
            .into_iter()
            .filter(|v| v["message"] == "decision")
            .filter_map(|v| v["signal"].as_str().map(str::to_string))
            .collect()
    }

    /// Asserts that no eBPF record woke the guard and that the kill was woken by an eventfd
    /// or by the re-check an eventfd wake-up scheduled (a wake-up that finds the cgroup
    /// still reclaiming or held writes no decision of its own).
    pub fn assert_woken_by_eventfds_only(&self) {
        let signals = self.wake_signals();
        let kill = self.decisions("kill");
        assert!(
            !signals.iter().any(|s| s == "ebpf")
                && kill
                    .first()
                    .is_some_and(|d| d["signal"] == "eventfd" || d["signal"] == "recheck"),
            "wake-ups: {signals:?}"
        );
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait up to `timeout` (times [`patience`]); returns the exit status if
    /// it exited.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + patience(timeout);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.running() && self.stop(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How much longer than on this machine a wait for something that should happen may take:
/// `$OOMGUARD_TEST_PATIENCE` (a factor, default 1). The kernel matrix's guests run under
/// emulation, 10–50× slower, and set it; a wait still ends as soon as what it waits for
/// happens, so only a failing wait gets longer.
pub fn patience(timeout: Duration) -> Duration {
    let factor = std::env::var("OOMGUARD_TEST_PATIENCE")
        .ok()
        .and_then(|f| f.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0);
    timeout.mul_f64(factor)
}

/// Says why the running test skips, on stderr and, in the kernel matrix's guests, in the
/// file `OOMGUARD_SKIP_LOG` names (`<test name>\t<reason>` per line), so the matrix counts it
/// as skipped, not passed.
pub fn record_skip(why: &str) {
    eprintln!("skipped: {why}");
    if let Some(log) = std::env::var_os("OOMGUARD_SKIP_LOG") {
        use std::io::Write;
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{name}\t{}", why.replace(['\n', '\t'], " "));
        }
    }
}

/// Finds a sibling binary of the running executable (e.g. `oomguard-memhog`), looking
/// also one directory up (test binaries live in `target/<profile>/deps`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// `oomguard-memhog`, next to the running test or tool (`target/<profile>/`). Integration
/// tests of other packages have no `CARGO_BIN_EXE_oomguard-memhog`; `cargo test --workspace`
/// builds it (this crate's own integration test needs it). Panics with one line saying how
/// to build it when it is missing.
pub fn memhog() -> PathBuf {
    sibling_binary("oomguard-memhog").unwrap_or_else(|| {
        panic!(
            "oomguard-memhog is not next to {} (build it: cargo build -p oomguard-dev --bin oomguard-memhog)",
            std::env::current_exe()
                .map(|e| e.display().to_string())
                .unwrap_or_else(|_| "this binary".into())
        )
    })
}
