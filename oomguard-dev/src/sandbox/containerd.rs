//! A real containerd (Debian's `containerd`, `runc`, `ctr`) on a private socket, root and
//! state under a temporary directory, CRI plugin disabled, and containers run with `ctr`
//! from a busybox rootfs inside memory cgroups the caller names (beneath its own memory
//! cgroup), for the tests and the benchmarks.
//!
//! Drop removes everything, also when the caller failed: every task killed and deleted,
//! every container deleted, containerd stopped, leftover shims of this socket killed, the
//! cgroups runc made in the other hierarchies removed (the memory ones belong to the
//! caller's `Sandbox`), the directory removed. Shim sockets, FIFOs and the runc root live
//! under /run/containerd whatever `--state` says, so container ids must be unique.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What is missing to run containers here, if anything.
pub fn probe() -> Option<String> {
    if rustix::process::geteuid().as_raw() != 0 {
        return Some("not root: containerd and runc need root".into());
    }
    for bin in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
        if !in_path(bin) {
            return Some(format!(
                "{bin} is not installed (cargo xtask setup installs containerd and runc)"
            ));
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        return Some(format!("{BUSYBOX} is missing (apt package busybox-static)"));
    }
    if !Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
        return Some("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory".into());
    }
    None
}

const BUSYBOX: &str = "/bin/busybox";

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// A random 64-hex id, as docker and the CRI plugin make them.
pub fn container_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 32];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Unique enough for a private containerd: the time, our pid and a counter.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = N.fetch_add(1, Ordering::Relaxed);
        return format!("{t:032x}{:016x}{n:016x}", std::process::id());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

static N: AtomicU32 = AtomicU32::new(0);

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

pub struct Containerd {
    /// containerd's root, state, config, log and the containers' rootfs.
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    containers: Mutex<Vec<(String, String)>>,
    /// Directories runc made in the non-memory hierarchies, in creation order.
    made: Mutex<Vec<PathBuf>>,
}

impl Containerd {
    /// Starts containerd under a fresh temporary directory and waits (≤ 15 s) until `ctr`
    /// reaches it.
    pub fn start(name: &str) -> Result<Containerd, String> {
        let dir = std::env::temp_dir().join(format!(
            "oomguard-containerd-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
        let mut c = Containerd {
            socket: dir.join("containerd.sock"),
            dir,
            child: None,
            containers: Mutex::new(Vec::new()),
            made: Mutex::new(Vec::new()),
        };
        let cfg = c.dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n",
                s = c.socket.display()
            ),
        )
        .map_err(|e| io_err(cfg.display(), e))?;
        let log_path = c.dir.join("containerd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| io_err(log_path.display(), e))?;
        let child = Command::new("containerd")
            .arg("--root")
            .arg(c.dir.join("root"))
            .arg("--state")
            .arg(c.dir.join("state"))
            .arg("--address")
            .arg(&c.socket)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| io_err("start containerd", e))?;
        c.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if c.socket.exists() && c.ctr("default", &["version"])?.status.success() {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "containerd did not come up within 15 s; its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `ctr -a <socket> -n <ns> <args>`.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Result<Output, String> {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io_err("run ctr", e))
    }

    /// A fresh busybox rootfs (each container gets its own), made on first use.
    fn rootfs(&self, id: &str) -> Result<PathBuf, String> {
        let root = self.dir.join("rootfs").join(id);
        let bin = root.join("bin");
        if bin.join("busybox").is_file() {
            return Ok(root);
        }
        let made = |p: &Path, r: std::io::Result<()>| r.map_err(|e| io_err(p.display(), e));
        made(&bin, std::fs::create_dir_all(&bin))?;
        std::fs::copy(BUSYBOX, bin.join("busybox")).map_err(|e| io_err(BUSYBOX, e))?;
        for applet in ["sh", "sleep", "dd", "cat"] {
            let link = bin.join(applet);
            made(&link, std::os::unix::fs::symlink("busybox", &link))?;
        }
        for d in ["proc", "sys", "dev", "tmp", "etc"] {
            let dir = root.join(d);
            made(&dir, std::fs::create_dir_all(&dir))?;
        }
        Ok(root)
    }

    /// Puts the host executable `src` into container `id`'s rootfs as `/bin/<name>` (a hard
    /// link where possible), with copies of the shared libraries `ldd` names at their host
    /// paths. Call it before [`Self::run`].
    pub fn install(&self, id: &str, src: &Path, name: &str) -> Result<(), String> {
        let root = self.rootfs(id)?;
        link_or_copy(src, &root.join("bin").join(name))?;
        let out = Command::new("ldd")
            .arg(src)
            .output()
            .map_err(|e| io_err("run ldd", e))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(lib) = path {
                let dst = root.join(lib.trim_start_matches('/'));
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io_err(parent.display(), e))?;
                }
                std::fs::copy(lib, &dst).map_err(|e| io_err(lib, e))?;
            }
        }
        Ok(())
    }

    /// Runs container `id` in namespace `ns` detached, inside memory cgroup `cgroup` (an
    /// absolute directory under /sys/fs/cgroup/memory), with `labels`, running `cmd`.
    /// `limit` 0 sets no memory limit on the container's own cgroup.
    pub fn run(
        &self,
        ns: &str,
        id: &str,
        cgroup: &Path,
        limit: u64,
        labels: &[(&str, &str)],
        cmd: &[&str],
    ) -> Result<(), String> {
        let rel = cgroup
            .strip_prefix("/sys/fs/cgroup/memory")
            .map_err(|_| format!("{} is not a memory cgroup directory", cgroup.display()))?;
        self.note_new_dirs(rel);
        let rootfs = self.rootfs(id)?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--cgroup".into(),
            format!("/{}", rel.display()),
            "--env".into(),
            "PATH=/bin".into(),
        ];
        if limit > 0 {
            args.push("--memory-limit".into());
            args.push(limit.to_string());
        }
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push("--rootfs".into());
        args.push(rootfs.display().to_string());
        args.push(id.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        if let Ok(mut c) = self.containers.lock() {
            c.push((ns.to_string(), id.to_string()));
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ctr(ns, &argv)?;
        if !out.status.success() {
            return Err(format!(
                "ctr run {id} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// RUNNING, STOPPED, ... as `ctr task ls` says (None when there is no task).
    pub fn task_status(&self, ns: &str, id: &str) -> Option<String> {
        let out = self.ctr(ns, &["task", "ls"]).ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
        })
    }

    /// Kills container `id`'s task, then deletes the task and the container (bounded).
    pub fn remove(&self, ns: &str, id: &str) {
        let _ = self.ctr(ns, &["task", "kill", "-a", "-s", "9", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.task_status(ns, id).is_some_and(|s| s != "STOPPED") && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.ctr(ns, &["task", "rm", "-f", id]);
        let _ = self.ctr(ns, &["container", "rm", id]);
        if let Ok(mut c) = self.containers.lock() {
            c.retain(|(n, i)| !(n == ns && i == id));
        }
    }

    /// Records which directories of `rel` do not exist yet in the other hierarchies: runc
    /// will make them, and drop removes them.
    fn note_new_dirs(&self, rel: &Path) {
        let Ok(mut made) = self.made.lock() else {
            return;
        };
        for h in hierarchies() {
            let mut p = h.clone();
            for comp in rel.components() {
                p.push(comp);
                if !p.exists() && !made.contains(&p) {
                    made.push(p.clone());
                }
            }
        }
    }

    fn cleanup_containers(&self) {
        let list = self
            .containers
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        for (ns, id) in &list {
            let _ = self.ctr(ns, &["task", "kill", "-a", "-s", "9", id]);
        }
        for (ns, id) in &list {
            self.remove(ns, id);
        }
    }
}

/// A hard link where the file system allows (test binaries are large), else a copy.
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), String> {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).map_err(|e| io_err(format!("copy to {}", dst.display()), e))?;
    }
    Ok(())
}

/// Every cgroup v1/v2 hierarchy but memory (the caller's Sandbox owns that one).
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && !p.is_symlink()
                        && p.file_name().is_some_and(|n| n != "memory")
                        && p.join("cgroup.procs").exists()
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cleanup_containers();
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_shims_of(&self.socket);
        let made = self
            .made
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default();
        for dir in made.iter().rev() {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Shims outlive containerd; the ones serving our socket go with it.
fn kill_shims_of(socket: &Path) {
    let want = socket.as_os_str().as_encoded_bytes();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
        if is_shim && args.windows(2).any(|w| w[0] == b"-address" && w[1] == want) {
            // SAFETY: a shim we started through our own containerd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
