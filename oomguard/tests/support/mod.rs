//! Test helpers shared by the runtime, events and deploy tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod containerd;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Set by `.ci/run`: a missing feature is then a failure, not a skip.
pub const REQUIRE_ENV: &str = "OOMGUARD_REQUIRE_ALL_FEATURES";

/// Skips (printing why) or, under CI's switch, fails.
pub fn feature_missing(why: &str) -> bool {
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("required feature missing ({REQUIRE_ENV} is set): {why}");
    }
    // In the kernel matrix's guests the runner counts this test as skipped, not passed.
    oomguard_dev::sandbox::record_skip(why);
    true
}

static N: AtomicU32 = AtomicU32::new(0);

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "oomguard-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + oomguard_dev::sandbox::patience(timeout);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A decision record like the guard's, for event messages.
pub fn decision(oomcgroup: &str) -> oomguard::report::Decision {
    let mut d = oomguard::report::Decision::new(
        "node-1",
        oomguard::config::Policy::Container,
        oomguard::report::Action::Kill,
        oomcgroup,
    );
    d.proccgroup = format!("{oomcgroup}/c1");
    (d.limit, d.threshold, d.usage) = (256 << 20, 250 << 20, 251 << 20);
    d.stats = oomguard::cgroup::MemStat::parse("rss 262144000\ncache 0\n");
    d.wake_to_kill_us = Some(1500);
    d
}

/// A unix socket that accepts connections and never answers (a hung runtime). The
/// accepted connections are held until drop.
pub struct HungSocket {
    pub path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn hung_socket(path: &Path) -> HungSocket {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    HungSocket {
        path: path.to_path_buf(),
        stop,
        thread: Some(thread),
    }
}

impl Drop for HungSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket file nobody listens on (a runtime that died): connect is refused.
pub fn stale_socket(path: &Path) {
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
}
