//! A real containerd (Debian's `containerd`, `runc`, `ctr`) on a private socket, root and
//! state under a temporary directory, CRI plugin disabled, and containers run with `ctr`
//! from a busybox rootfs inside cgroups the test names (beneath its own memory cgroup).
//!
//! Drop removes everything, also when the test failed: every task killed and deleted,
//! every container deleted, containerd stopped, leftover shims of this socket killed, the
//! cgroups runc made in the other hierarchies removed (the memory ones belong to the
//! test's `Sandbox`), the directory removed. Shim sockets, FIFOs and the runc root live
//! under /run/containerd whatever `--state` says, so container ids must be unique.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::TempDir;

/// What is missing for these tests, if anything.
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
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct Containerd {
    pub dir: TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    containers: Mutex<Vec<(String, String)>>,
    /// Directories runc made in the non-memory hierarchies, in creation order.
    made: Mutex<Vec<PathBuf>>,
}

impl Containerd {
    pub fn start(name: &str) -> Containerd {
        let dir = TempDir::new(&format!("containerd-{name}"));
        let socket = dir.path().join("containerd.sock");
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n",
                s = socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&socket)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            dir,
            socket,
            child: Some(child),
            containers: Mutex::new(Vec::new()),
            made: Mutex::new(Vec::new()),
        };
        let up = super::wait_for(Duration::from_secs(15), || {
            (c.socket.exists() && c.ctr("default", &["version"]).status.success()).then_some(())
        });
        assert!(
            up.is_some(),
            "containerd did not come up; its log:\n{}",
            std::fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default()
        );
        c
    }

    pub fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// A fresh busybox rootfs (each container gets its own), made on first use.
    fn rootfs(&self, id: &str) -> PathBuf {
        let root = self.dir.path().join("rootfs").join(id);
        let bin = root.join("bin");
        if bin.join("busybox").is_file() {
            return root;
        }
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(BUSYBOX, bin.join("busybox")).unwrap();
        for applet in ["sh", "sleep", "dd", "cat"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        for d in ["proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        root
    }

    /// Puts the host executable `src` into container `id`'s rootfs as `/bin/<name>` (a hard
    /// link where possible), with copies of the shared libraries `ldd` names at their host
    /// paths. Call it before [`Self::run`].
    pub fn install(&self, id: &str, src: &Path, name: &str) {
        let root = self.rootfs(id);
        link_or_copy(src, &root.join("bin").join(name));
        let out = Command::new("ldd").arg(src).output().expect("run ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(lib) = path {
                let dst = root.join(lib.trim_start_matches('/'));
                std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                std::fs::copy(lib, &dst).unwrap();
            }
        }
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
    ) {
        let rel = cgroup
            .strip_prefix("/sys/fs/cgroup/memory")
            .expect("a memory cgroup directory");
        self.note_new_dirs(rel);
        let rootfs = self.rootfs(id);
        let cg = format!("/{}", rel.display());
        let lim = limit.to_string();
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--cgroup".into(),
            cg,
            "--env".into(),
            "PATH=/bin".into(),
        ];
        if limit > 0 {
            args.push("--memory-limit".into());
            args.push(lim);
        }
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push("--rootfs".into());
        args.push(rootfs.display().to_string());
        args.push(id.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        self.containers
            .lock()
            .unwrap()
            .push((ns.to_string(), id.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ctr(ns, &argv);
        assert!(
            out.status.success(),
            "ctr run {id} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// RUNNING, STOPPED, ... as `ctr task ls` says (None when there is no task).
    pub fn task_status(&self, ns: &str, id: &str) -> Option<String> {
        let out = self.ctr(ns, &["task", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
        })
    }

    /// Records which directories of `rel` do not exist yet in the other hierarchies: runc
    /// will make them, and drop removes them.
    fn note_new_dirs(&self, rel: &Path) {
        let mut made = self.made.lock().unwrap();
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
        let list = std::mem::take(&mut *self.containers.lock().unwrap());
        for (ns, id) in &list {
            let _ = self.ctr(ns, &["task", "kill", "-a", "-s", "9", id]);
        }
        for (ns, id) in &list {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.task_status(ns, id).is_some_and(|s| s != "STOPPED")
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.ctr(ns, &["task", "rm", "-f", id]);
            let _ = self.ctr(ns, &["container", "rm", id]);
        }
    }
}

/// A hard link where the file system allows (test binaries are large), else a copy.
fn link_or_copy(src: &Path, dst: &Path) {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).unwrap();
    }
}

/// Every cgroup v1/v2 hierarchy but memory (the test's Sandbox owns that one).
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
        let made = std::mem::take(&mut *self.made.lock().unwrap());
        for dir in made.iter().rev() {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
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
