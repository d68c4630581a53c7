//! Throw-away qemu guests: boot a Debian kernel with the cgroup layout asked for, run one
//! shell command, bring back its output, exit status and `/out` directory, power off.
//!
//! Everything is fetched and cached on first use under `target/vm/`: the kernel packages
//! (`apt-get download`, unpacked with `dpkg-deb -x`, the newest of each series the package
//! index knows), their ELF `vmlinux` (booted through its PVH entry: under TCG it skips the
//! slow in-guest decompressor) and the few modules the guest needs (virtio disk, ext4).
//! The guest's root is a busybox initramfs; the files it carries sit on an ext4 disk image
//! at their host paths (so a test binary's compiled-in paths work), booted as a snapshot
//! so every guest starts from the same disk and nothing it writes survives.

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::step;

/// The Debian kernel series the matrix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Series {
    /// Debian 12's kernel (`linux-image-6.1.0-NN-amd64`); the base of Amazon Linux 2023 too.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's backported 6.12 (`linux-image-6.12.NNN+deb12-amd64`, security suite);
    /// built without the v1 memory controller.
    #[value(name = "6.12")]
    V6_12,
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        })
    }
}

impl Series {
    /// Whether `name` is a package of this series' generic amd64 flavour.
    fn matches(self, name: &str) -> bool {
        match self {
            Series::V6_1 => name
                .strip_prefix("linux-image-6.1.0-")
                .and_then(|r| r.strip_suffix("-amd64"))
                .is_some_and(|abi| !abi.is_empty() && abi.bytes().all(|b| b.is_ascii_digit())),
            Series::V6_12 => name
                .strip_prefix("linux-image-6.12.")
                .and_then(|r| r.strip_suffix("+deb12-amd64"))
                .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())),
        }
    }
}

/// How the guest mounts its cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// The memory controller on cgroup v1 at /sys/fs/cgroup/memory (every v1 controller
    /// mounted, cgroup2 at /sys/fs/cgroup/unified: systemd's "hybrid" node).
    V1,
    /// cgroup2 only at /sys/fs/cgroup (booted with `cgroup_no_v1=all`), +memory enabled.
    V2,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::V1 => "v1",
            Layout::V2 => "v2",
        })
    }
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: Series,
    /// The kernel release, `uname -r` in the guest (e.g. `6.1.0-57-amd64`).
    pub release: String,
    /// The unpacked package (`boot/`, `lib/modules/<release>/`).
    pub root: PathBuf,
    /// What qemu boots: the ELF vmlinux when it could be unpacked, else the bzImage.
    pub image: PathBuf,
}

impl Kernel {
    /// Whether this kernel has the v1 memory controller (CONFIG_MEMCG_V1, or a kernel from
    /// before that option existed), read from the package's config file.
    pub fn has_memcg_v1(&self) -> bool {
        let config = self.root.join(format!("boot/config-{}", self.release));
        match fs::read_to_string(&config) {
            Ok(text) => {
                let memcg = text.lines().any(|l| l == "CONFIG_MEMCG=y");
                let v1_option = text.lines().any(|l| {
                    l.starts_with("CONFIG_MEMCG_V1=") || l == "# CONFIG_MEMCG_V1 is not set"
                });
                memcg && (!v1_option || text.lines().any(|l| l == "CONFIG_MEMCG_V1=y"))
            }
            Err(_) => true,
        }
    }
}

fn vm_dir(target: &Path) -> PathBuf {
    target.join("vm")
}

/// The kernel of `series`: the newest version the package index offers, downloaded and
/// unpacked once; a cached one when the index offers none (offline).
pub fn kernel(target: &Path, series: Series) -> Result<Kernel> {
    let cache = vm_dir(target).join("kernels");
    fs::create_dir_all(&cache)?;
    let package = match newest_package(series)? {
        Some(p) => p,
        None => {
            let cached = cached_packages(&cache, series);
            match cached.last() {
                Some(p) => {
                    step(&format!(
                        "the package index offers no {series} kernel; using the cached {p}"
                    ));
                    p.clone()
                }
                None => bail!(
                    "no {series} kernel package in the package index (apt-cache search) and none cached"
                ),
            }
        }
    };
    let dir = cache.join(&package);
    let root = dir.join("root");
    if !root.join("boot").is_dir() {
        step(&format!(
            "downloading the {series} kernel ({package}) into {}",
            dir.display()
        ));
        let tmp = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        crate::exec(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
                .current_dir(&tmp),
        )
        .with_context(|| format!("apt-get download {package}"))?;
        let deb = fs::read_dir(&tmp)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        crate::exec(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(tmp.join("root")),
        )?;
        fs::remove_file(&deb)?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&tmp, &dir)?;
    }
    let release = fs::read_dir(root.join("lib/modules"))
        .with_context(|| format!("{package} has no lib/modules"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    let bz = root.join(format!("boot/vmlinuz-{release}"));
    if !bz.is_file() {
        bail!("{package} has no {}", bz.display());
    }
    let elf = dir.join("vmlinux");
    if !elf.is_file() {
        step(&format!("unpacking {} to an ELF vmlinux", bz.display()));
        match unpack_vmlinux(&bz) {
            Ok(bytes) => fs::write(&elf, bytes)?,
            Err(e) => step(&format!("cannot unpack it ({e:#}); booting the bzImage")),
        }
    }
    let image = if elf.is_file() { elf } else { bz };
    Ok(Kernel {
        series,
        release,
        root,
        image,
    })
}

/// The newest package of `series` in the local package index (`apt-get update` once if
/// the index has none).
fn newest_package(series: Series) -> Result<Option<String>> {
    let search = || -> Vec<String> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", "^linux-image-6\\.1"])
            .stderr(Stdio::null())
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut names: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| series.matches(n))
            .map(str::to_owned)
            .collect();
        names.sort_by(|a, b| version_cmp(a, b));
        names
    };
    let mut names = search();
    if names.is_empty() {
        step("updating the package index (apt-get update) to find the kernel packages");
        let _ = crate::exec(Command::new("apt-get").args(["update", "-q"]));
        names = search();
    }
    Ok(names.pop())
}

fn cached_packages(cache: &Path, series: Series) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| series.matches(n) && cache.join(n).join("root/boot").is_dir())
                .collect()
        })
        .unwrap_or_default();
    names.sort_by(|a, b| version_cmp(a, b));
    names
}

/// Compares names by their runs of digits as numbers: `6.12.9` < `6.12.117`.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut digits = false;
        for c in s.chars() {
            if c.is_ascii_digit() != digits && !cur.is_empty() {
                out.push(if digits {
                    Ok(cur.parse().unwrap_or(u64::MAX))
                } else {
                    Err(cur.clone())
                });
                cur.clear();
            }
            digits = c.is_ascii_digit();
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(if digits {
                Ok(cur.parse().unwrap_or(u64::MAX))
            } else {
                Err(cur)
            });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// Finds the compressed kernel inside a bzImage and decompresses it with the matching
/// tool (xz, zstd, lz4, gzip): the first candidate that yields an ELF file wins.
fn unpack_vmlinux(bz: &Path) -> Result<Vec<u8>> {
    let data = fs::read(bz)?;
    let formats: [(&[u8], &str, &[&str]); 4] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x02\x21\x4c\x18", "lz4", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        let mut from = 0;
        while let Some(i) = find(&data[from..], magic).map(|i| i + from) {
            from = i + 1;
            let Ok(mut child) = Command::new(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                break;
            };
            let mut stdin = child.stdin.take().context("stdin")?;
            let input = data[i..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            let mut out = Vec::new();
            child
                .stdout
                .take()
                .context("stdout")?
                .read_to_end(&mut out)?;
            let _ = child.wait();
            let _ = writer.join();
            if out.len() > 1 << 20 && out.starts_with(b"\x7fELF") {
                return Ok(out);
            }
        }
    }
    bail!("no compressed ELF kernel found in {}", bz.display())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Accelerator: KVM when it can boot a stock kernel, else TCG. `/dev/kvm` on this machine
/// kind is a paravirtual KVM (`kvm_pvm`) under which stock kernels never reach init.
fn accel() -> (&'static str, &'static str) {
    let forced = std::env::var("OOMGUARD_VM_ACCEL").unwrap_or_default();
    let kvm_usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && !Path::new("/sys/module/kvm_pvm").exists();
    match forced.as_str() {
        "kvm" => ("kvm", "host"),
        "tcg" => ("tcg", "max"),
        _ if kvm_usable => ("kvm", "host"),
        _ => ("tcg", "max"),
    }
}

/// What to run in a guest.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: Kernel,
    pub layout: Layout,
    pub mem_mib: u32,
    pub cpus: u32,
    /// For the whole guest, boot to power-off.
    pub timeout: Duration,
    /// An ext4 image (see [`Disk`]) mounted at /disk, its `files/` at their host paths.
    pub disk: Option<PathBuf>,
    /// Extra `NAME=value` for the command's environment.
    pub env: Vec<(String, String)>,
    /// Print the command's output as it comes (else only return it).
    pub echo: Option<String>,
}

/// What came back from a guest.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status; None when the guest never reported one.
    pub status: Option<i32>,
    /// The guest's kernel console (for a boot failure or a panic).
    pub console: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn console_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.console.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Files to carry into guests: an ext4 image holding each at its host path under `files/`,
/// plus free space for the tests' page cache (the initramfs root is tmpfs, whose pages
/// cannot be reclaimed).
pub struct Disk;

impl Disk {
    /// `dirs` are made empty (and writable) at their host paths too.
    pub fn build(
        target: &Path,
        files: &[PathBuf],
        dirs: &[PathBuf],
        free_mib: u64,
    ) -> Result<PathBuf> {
        let dir = vm_dir(target).join("disk");
        let stage = dir.join("stage");
        let _ = fs::remove_dir_all(&stage);
        fs::create_dir_all(stage.join("files"))?;
        fs::create_dir_all(stage.join("tmp"))?;
        fs::set_permissions(stage.join("tmp"), fs::Permissions::from_mode(0o1777))?;
        let mut bytes = 0;
        for f in files {
            let abs = fs::canonicalize(f).with_context(|| format!("{}", f.display()))?;
            let rel = abs.strip_prefix("/").unwrap_or(&abs);
            let dst = stage.join("files").join(rel);
            fs::create_dir_all(dst.parent().context("file without a parent")?)?;
            // Debug info is most of a test binary's size and no use in a guest (symbols,
            // for backtraces, stay).
            let stripped = Command::new("objcopy")
                .arg("--strip-debug")
                .arg(&abs)
                .arg(&dst)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !stripped {
                let _ = fs::remove_file(&dst);
                fs::copy(&abs, &dst)?;
            }
            bytes += fs::metadata(&dst)?.len();
            // The same file under the name it was asked by (a symlinked target dir).
            if f.is_absolute() && f != &abs {
                let alias = stage.join("files").join(f.strip_prefix("/").unwrap_or(f));
                fs::create_dir_all(alias.parent().context("file without a parent")?)?;
                let _ = fs::hard_link(&dst, &alias);
            }
        }
        for d in dirs {
            let d = stage.join("files").join(d.strip_prefix("/").unwrap_or(d));
            fs::create_dir_all(&d)?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o1777))?;
        }
        let img = dir.join("disk.img");
        let size = bytes + bytes / 5 + (free_mib << 20) + (64 << 20);
        let _ = fs::remove_file(&img);
        fs::File::create(&img)?.set_len(size)?;
        crate::exec(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
                .arg(&stage)
                .arg(&img)
                .stdout(Stdio::null()),
        )
        .context("mkfs.ext4 -d (e2fsprogs) for the guest disk")?;
        let _ = fs::remove_dir_all(&stage);
        let list: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
        fs::write(img.with_extension("files"), list)?;
        Ok(img)
    }
}

/// Modules the guest loads for its disk, in dependency order, decompressed into `dst`.
fn modules(kernel: &Kernel, dst: &Path) -> Result<Vec<String>> {
    let moddir = kernel.root.join("lib/modules").join(&kernel.release);
    if !moddir.join("modules.dep").is_file() {
        crate::exec(
            Command::new("depmod")
                .arg("-b")
                .arg(&kernel.root)
                .arg(&kernel.release),
        )
        .context("depmod (kmod) for the guest kernel's modules")?;
    }
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(&kernel.root)
        .args(["-S", &kernel.release, "--show-depends", "-a"])
        .args(["virtio_pci", "virtio_blk", "ext4"])
        .output()
        .context("modprobe (kmod) --show-depends")?;
    if !out.status.success() {
        bail!(
            "modprobe --show-depends for the guest kernel failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut names = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("insmod") {
            continue;
        }
        let Some(path) = words.next() else { continue };
        let base = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let (name, tool) = if let Some(n) = base.strip_suffix(".xz") {
            (n, Some("xz"))
        } else if let Some(n) = base.strip_suffix(".zst") {
            (n, Some("zstd"))
        } else if let Some(n) = base.strip_suffix(".gz") {
            (n, Some("gzip"))
        } else {
            (base, None)
        };
        if names.iter().any(|n| n == name) {
            continue;
        }
        let target = dst.join(name);
        match tool {
            Some(tool) => {
                let out = Command::new(tool)
                    .args(["-dc", path])
                    .output()
                    .with_context(|| format!("{tool} -dc {path}"))?;
                fs::write(&target, out.stdout)?;
            }
            None => {
                fs::copy(path, &target)?;
            }
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// The shared libraries (and ELF interpreter) of each dynamically linked file, from `ldd`.
fn libraries(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = Vec::new();
    for f in files {
        let Ok(out) = Command::new("ldd").arg(f).stderr(Stdio::null()).output() else {
            continue;
        };
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if word.starts_with('/') && !libs.iter().any(|l| l == Path::new(word)) {
                libs.push(PathBuf::from(word));
            }
        }
    }
    libs
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ulimit -l unlimited
ulimit -n 65536
stty -F /dev/ttyS1 raw -echo; stty -F /dev/ttyS2 raw -echo
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
say() { echo "vm: $*" > /dev/ttyS1; }
failed=
for m in $(cat /modules); do insmod /lib/modules/$m 2>/dev/null; done
. /env
if [ -s /has-disk ]; then
  mkdir -p /disk
  n=0; while [ ! -e /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  if mount -t ext4 /dev/vda /disk; then
    for d in /disk/files/*; do
      [ -d "$d" ] || continue
      t=/$(basename "$d"); mkdir -p "$t"; mount --bind "$d" "$t"
    done
    export TMPDIR=/disk/tmp
  else
    say "cannot mount the disk (/dev/vda)"; failed=1
  fi
fi
if [ "$LAYOUT" = v2 ]; then
  mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
  echo +memory > /sys/fs/cgroup/cgroup.subtree_control || { say "cannot enable +memory on cgroup2"; failed=1; }
else
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  for c in $(awk 'NR>1 && $4==1 {print $1}' /proc/cgroups); do
    case $c in cpu|cpuacct) d=cpu,cpuacct;; net_cls|net_prio) d=net_cls,net_prio;; *) d=$c;; esac
    [ -d /sys/fs/cgroup/$d ] && continue
    mkdir /sys/fs/cgroup/$d
    mount -t cgroup -o $d cgroup /sys/fs/cgroup/$d 2>/dev/null || rmdir /sys/fs/cgroup/$d
  done
  [ -d /sys/fs/cgroup/cpu ] || ln -s cpu,cpuacct /sys/fs/cgroup/cpu
  mkdir /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
  if [ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
    # The command runs in a child of the root memory cgroup, like a process on a node
    # (the root has no memory.force_empty and no limit files of its own).
    mkdir /sys/fs/cgroup/memory/vm && echo $$ > /sys/fs/cgroup/memory/vm/cgroup.procs
  else
    say "no cgroup v1 memory controller in this kernel (built without CONFIG_MEMCG_V1?)"; failed=1
  fi
fi
cd /tmp
mkdir -p /out
if [ -z "$failed" ]; then sh /cmd > /dev/ttyS1 2>&1 < /dev/null; rc=$?; else rc=125; fi
tar -C /out -cf /dev/ttyS2 .
echo "@@OOMGUARD_VM_EXIT=$rc@@" > /dev/ttyS1
sync
poweroff -f
"#;

const EXIT_MARK: &str = "@@OOMGUARD_VM_EXIT=";

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots `guest`, runs `command` with `sh` in it, and returns what came back. `out`, when
/// given, receives the guest's `/out` directory.
pub fn run(target: &Path, guest: &Guest, command: &str, out: Option<&Path>) -> Result<Outcome> {
    if let Some(why) = unsupported(&guest.kernel, guest.layout) {
        bail!("{why}");
    }
    let busybox = Path::new("/bin/busybox");
    let ldd = Command::new("ldd").arg(busybox).output();
    if !busybox.is_file() || ldd.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("=>")) {
        bail!("the guest needs a static /bin/busybox (apt-get install busybox-static)");
    }
    fs::create_dir_all(vm_dir(target))?;
    let work = TempDir::new(&vm_dir(target).join("run"))?;
    let root = work.0.join("root");
    for d in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "out",
        "etc",
        "root",
        "lib/modules",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy(busybox, root.join("bin/busybox"))?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("cmd"), format!("{command}\n"))?;
    let mut env = format!(
        "export LAYOUT={} OOMGUARD_VM={}/{}\n",
        guest.layout, guest.kernel.series, guest.layout
    );
    for (k, v) in &guest.env {
        env.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    fs::write(root.join("env"), env)?;
    let mods = if guest.disk.is_some() {
        modules(&guest.kernel, &root.join("lib/modules"))?
    } else {
        Vec::new()
    };
    fs::write(root.join("modules"), mods.join("\n"))?;
    if guest.disk.is_some() {
        fs::write(root.join("has-disk"), "1")?;
    }
    // Libraries the carried binaries need, at their host paths in the initramfs.
    for lib in libraries(&guest_binaries(guest)) {
        let dst = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        fs::create_dir_all(dst.parent().context("library without a parent")?)?;
        fs::copy(&lib, &dst).with_context(|| format!("copy {}", lib.display()))?;
    }
    let initrd = work.0.join("initrd");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | /bin/busybox cpio -o -H newc > \"$0\" 2>/dev/null")
        .arg(&initrd)
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("cannot pack the guest's initramfs (busybox cpio)");
    }

    let (accel, cpu) = accel();
    let mut append = String::from(
        "console=ttyS0 panic=-1 nokaslr tsc=reliable no_timer_check i8042.noaux \
         i8042.nokbd i8042.nopnp psi=1 quiet loglevel=4",
    );
    if guest.layout == Layout::V2 {
        append.push_str(" cgroup_no_v1=all");
    }
    let console = work.0.join("console.log");
    let outlog = work.0.join("out.log");
    let outtar = work.0.join("out.tar");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel, "-cpu", cpu, "-M", "q35"])
        .args(["-m", &guest.mem_mib.to_string()])
        .args(["-smp", &guest.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&guest.kernel.image)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", outlog.display()))
        .arg("-serial")
        .arg(format!("file:{}", outtar.display()));
    if let Some(disk) = &guest.disk {
        qemu.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            disk.display()
        ));
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe. The guest dies with us (Ctrl-C, a killed CI job):
    // no qemu is left behind.
    unsafe {
        use std::os::unix::process::CommandExt;
        qemu.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let timed_out = wait_echoing(&mut child, &outlog, guest.timeout, guest.echo.as_deref())?;
    let mut qemu_log = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut qemu_log);
    }
    let elapsed = started.elapsed();
    let raw = fs::read(&outlog).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.rfind(EXIT_MARK).and_then(|i| {
        text[i + EXIT_MARK.len()..]
            .split("@@")
            .next()
            .and_then(|n| n.parse().ok())
    });
    let mut console_text =
        String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
    if timed_out {
        console_text.push_str(&format!(
            "\n(oomguard vm: the guest did not power off within {} s: stopped)\n",
            guest.timeout.as_secs()
        ));
    }
    console_text.push_str(&qemu_log);
    if let Some(out) = out
        && fs::metadata(&outtar).is_ok_and(|m| m.len() > 0)
    {
        fs::create_dir_all(out)?;
        let _ = Command::new("tar")
            .arg("-C")
            .arg(out)
            .arg("-xf")
            .arg(&outtar)
            .stderr(Stdio::null())
            .status();
    }
    Ok(Outcome {
        status,
        console: console_text,
        elapsed,
    })
}

/// Why `kernel` cannot boot with `layout`, if it cannot.
pub fn unsupported(kernel: &Kernel, layout: Layout) -> Option<String> {
    (layout == Layout::V1 && !kernel.has_memcg_v1()).then(|| {
        format!(
            "kernel {} has no cgroup v1 memory controller (built without CONFIG_MEMCG_V1): \
             use --cgroup v2",
            kernel.release
        )
    })
}

/// The files on the guest's disk that are ELF executables (their libraries go in the
/// initramfs).
fn guest_binaries(guest: &Guest) -> Vec<PathBuf> {
    let Some(disk) = &guest.disk else {
        return Vec::new();
    };
    let list = disk.with_extension("files");
    fs::read_to_string(list)
        .map(|t| t.lines().map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// Waits for qemu to exit, at most `timeout`; while it runs, prints each new complete line
/// of the guest's output prefixed with `echo`. True when it had to be stopped.
fn wait_echoing(
    child: &mut Child,
    outlog: &Path,
    timeout: Duration,
    echo: Option<&str>,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    let mut pending = Vec::new();
    let pump = |offset: &mut u64, pending: &mut Vec<u8>| {
        let Some(prefix) = echo else { return };
        let Ok(mut f) = fs::File::open(outlog) else {
            return;
        };
        if f.seek(SeekFrom::Start(*offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        *offset += buf.len() as u64;
        pending.extend_from_slice(&buf);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if !line.contains(EXIT_MARK) {
                println!("{prefix}{line}");
            }
        }
    };
    loop {
        if child.try_wait()?.is_some() {
            pump(&mut offset, &mut pending);
            return Ok(false);
        }
        pump(&mut offset, &mut pending);
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Result<Self> {
        fs::create_dir_all(parent)?;
        for n in 0..1000u32 {
            let p = parent.join(format!("{}-{n}", std::process::id()));
            if fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        bail!("cannot make a work directory under {}", parent.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_generic_amd64_only() {
        assert!(Series::V6_1.matches("linux-image-6.1.0-57-amd64"));
        assert!(!Series::V6_1.matches("linux-image-6.1.0-57-cloud-amd64"));
        assert!(!Series::V6_1.matches("linux-image-6.1.0-57-rt-amd64"));
        assert!(!Series::V6_1.matches("linux-image-6.1.0-57-amd64-dbg"));
        assert!(!Series::V6_1.matches("linux-image-6.12.117+deb12-amd64"));
        assert!(Series::V6_12.matches("linux-image-6.12.117+deb12-amd64"));
        assert!(!Series::V6_12.matches("linux-image-6.12.117+deb12-cloud-amd64"));
        assert!(!Series::V6_12.matches("linux-image-6.1.0-57-amd64"));
    }

    #[test]
    fn newest_version_sorts_numerically() {
        let mut v = [
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.38+deb12-amd64",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v[2], "linux-image-6.12.117+deb12-amd64");
        assert_eq!(v[0], "linux-image-6.12.9+deb12-amd64");
        let mut w = ["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-57-amd64"];
        w.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(w[1], "linux-image-6.1.0-57-amd64");
    }
}
