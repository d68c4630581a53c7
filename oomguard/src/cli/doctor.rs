//! `oomguard doctor [--json]`: what this node offers the agent, probed for real but without
//! side effects (the cgroup probes run on a throw-away child of our own memory cgroup, removed
//! before exit), and the mode `--mode auto` would pick. Exit 0 when the agent can run.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::args::DoctorArgs;
use super::{Align, Paint, Table, error_line};
use crate::cgroup::{Counter, MemCgroup, cgroup_of_pid};
use crate::threshold::{Notifier, arm};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Status {
    #[serde(rename = "ok")]
    Ok,
    /// The kernel or the node lacks it.
    #[serde(rename = "missing")]
    Missing,
    /// Optional and absent here (a runtime socket, a Kubernetes config): not an error.
    #[serde(rename = "not present")]
    NotPresent,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::NotPresent => "not present",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub group: &'static str,
    pub name: String,
    pub status: Status,
    /// The agent cannot run without it.
    pub required: bool,
    pub detail: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub kernel: String,
    /// `v1`, `v2`, `hybrid` or `none`, and where the hierarchies are mounted.
    pub layout: String,
    pub checks: Vec<Check>,
    pub can_run: bool,
    /// `ebpf` or `eventfd`.
    pub auto_mode: &'static str,
    pub auto_reason: String,
}

impl Report {
    fn from_checks(
        kernel: String,
        layout: String,
        checks: Vec<Check>,
        ebpf: Option<String>,
    ) -> Report {
        let can_run = checks.iter().all(|c| !c.required || c.status == Status::Ok);
        let (auto_mode, auto_reason) = match ebpf {
            None => (
                "ebpf",
                "an eBPF crossing program can load (each program's status is listed); threshold \
                 eventfds stay armed as the backstop"
                    .to_string(),
            ),
            Some(why) => ("eventfd", format!("eBPF cannot be used: {why}")),
        };
        Report {
            kernel,
            layout,
            checks,
            can_run,
            auto_mode,
            auto_reason,
        }
    }
}

pub fn main(args: DoctorArgs) -> ExitCode {
    let report = probe(&args);
    if args.json {
        super::print_json(&report);
    } else {
        for line in render(&report, super::stdout_width(), super::colour_stdout()) {
            println!("{line}");
        }
    }
    if report.can_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The report for humans, within `width` columns (`None`: no line is cut or wrapped).
fn render(report: &Report, width: Option<usize>, colour: bool) -> Vec<String> {
    let mut t = Table::new(&[
        ("GROUP", Align::Left),
        ("CHECK", Align::Left),
        ("STATUS", Align::Left),
        ("DETAIL", Align::Left),
    ])
    // What was checked and how it came out stay readable; the detail gives way.
    .whole(0)
    .whole(1)
    .whole(2)
    .paint(2, |s| match s {
        "ok" => Some(Paint::Green),
        "MISSING" => Some(Paint::Red),
        "missing" => Some(Paint::Yellow),
        _ => Some(Paint::Dim),
    });
    for c in &report.checks {
        let status = match (c.status, c.required) {
            (Status::Missing, true) => "MISSING".to_string(),
            (s, _) => s.as_str().to_string(),
        };
        t.row(vec![
            c.group.into(),
            c.name.clone(),
            status,
            c.detail.clone(),
        ]);
    }
    let mut lines = wrap(
        &format!("kernel {}, cgroup layout {}", report.kernel, report.layout),
        width,
    );
    lines.extend(t.render(width, colour));
    lines.push(String::new());
    lines.push(if report.can_run {
        "the agent can run on this node".to_string()
    } else {
        "the agent cannot run on this node (MISSING above)".to_string()
    });
    let mode = format!(
        "--mode auto would use {}: {}",
        report.auto_mode, report.auto_reason
    );
    lines.extend(wrap(&mode, width));
    lines
}

/// Splits `text` at spaces into lines of at most `width` characters (longer words stay
/// whole); one line without a width.
fn wrap(text: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width else {
        return vec![text.to_string()];
    };
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

fn check(
    group: &'static str,
    name: &str,
    required: bool,
    result: Result<String, (Status, String)>,
) -> Check {
    let (status, detail) = match result {
        Ok(detail) => (Status::Ok, detail),
        Err((status, detail)) => (status, detail),
    };
    Check {
        group,
        name: name.to_string(),
        status,
        required,
        detail,
    }
}

fn missing(detail: impl std::fmt::Display) -> (Status, String) {
    (Status::Missing, detail.to_string())
}

/// Runs every probe.
pub fn probe(args: &DoctorArgs) -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut checks = Vec::new();
    let layout = crate::cgroup::Layout::read().unwrap_or_default();
    match layout.memory_version() {
        Some(crate::cgroup::Version::V2) => cgroup_v2_checks(&layout, &mut checks),
        _ => cgroup_checks(&mut checks),
    }

    let caps = crate::bpf::capabilities();
    checks.push(check(
        "ebpf",
        "bpf() system call",
        false,
        probe_bpf_syscall(),
    ));
    for c in &caps.checks {
        let name = match c.feature.as_str() {
            "bpf() with ring buffers" => "ring buffer",
            other => other,
        };
        let result = match &c.problem {
            None => Ok(String::new()),
            Some(p) => Err(missing(p)),
        };
        checks.push(check("ebpf", name, false, result));
    }
    for p in &caps.programs {
        let result = match (&p.problem, &p.standby) {
            (Some(problem), _) => Err(missing(format!("{problem}; {}", p.lost))),
            (None, Some(why)) => Ok(format!("usable, not attached: {why}")),
            (None, None) if p.on_demand => Ok(format!(
                "on {}, attached on demand: while a guarded cgroup is within {} MiB (at most half) of its thresholds",
                p.hook,
                crate::bpf::on_demand::APPROACH_BYTES >> 20
            )),
            (None, None) => Ok(format!("on {}", p.hook)),
        };
        checks.push(check("ebpf program", p.program, false, result));
    }
    checks.push(check("ebpf", "bpffs", false, probe_bpffs()));

    checks.push(check("kill", "pidfd_open", false, probe_pidfd()));
    checks.push(check(
        "kill",
        "process_mrelease",
        false,
        probe_process_mrelease(),
    ));
    checks.push(check("scheduling", "SCHED_FIFO", false, probe_realtime()));
    checks.push(check(
        "runtime",
        "docker containerd socket",
        false,
        probe_socket(&args.docker_containerd_sock),
    ));
    checks.push(check(
        "runtime",
        "containerd socket",
        false,
        probe_socket(&args.containerd_sock),
    ));
    checks.push(check(
        "kubernetes",
        "configuration",
        false,
        probe_kube(args.kubeconfig.as_deref()),
    ));
    Report::from_checks(kernel, layout.describe(), checks, caps.reason())
}

/// cgroup v2: the files the agent reads (required) and the ones it uses when the kernel
/// has them, on a throw-away child of our cgroup when ours hands `+memory` down, else on
/// our own cgroup, read-only.
fn cgroup_v2_checks(layout: &crate::cgroup::Layout, checks: &mut Vec<Check>) {
    let mount = layout.cgroup2.first().cloned().unwrap_or_default();
    checks.push(check(
        "cgroup",
        "memory cgroup v2",
        true,
        Ok(format!("cgroup2 mounted at {}", mount.display())),
    ));
    let files = [
        ("memory.max", true, "the limit"),
        ("memory.current", true, "usage, polled by the fallback"),
        ("memory.events", true, "limit hits and kernel OOM kills"),
        ("memory.pressure", false, "PSI triggers (boot with psi=1)"),
        ("memory.reclaim", false, "the reclaim step (kernel 5.19+)"),
        (
            "cgroup.kill",
            false,
            "the direct container kill (kernel 5.14+)",
        ),
    ];
    let own = match cgroup_of_pid(&mount, "self") {
        Ok(own) => own,
        Err(e) => {
            for (file, required, _) in files {
                checks.push(check("cgroup", file, required, Err(missing(&e))));
            }
            return;
        }
    };
    let delegates = std::fs::read_to_string(own.file("cgroup.subtree_control"))
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
    let probe_cg = delegates.then(|| ProbeCgroup::new(&own).ok()).flatten();
    let (target, tried_on) = match &probe_cg {
        Some(p) => (&p.cg, "on a throw-away child of our cgroup"),
        None => (&own, "in our own cgroup"),
    };
    for (file, required, what) in files {
        let result = if target.file(file).exists() {
            Ok(format!("{what}: present {tried_on}"))
        } else {
            Err(missing(format!(
                "{what}: {} has no {file}",
                target.path.display()
            )))
        };
        checks.push(check("cgroup", file, required, result));
    }
}

/// The memory hierarchy, our own memory cgroup, and the three control files on a throw-away
/// child of it.
fn cgroup_checks(checks: &mut Vec<Check>) {
    let mount = super::memory_mount();
    checks.push(check(
        "cgroup",
        "memory cgroup v1",
        true,
        mount
            .as_ref()
            .map(|m| format!("mounted at {}", m.display()))
            .ok_or_else(|| missing("no cgroup v1 hierarchy with the memory controller")),
    ));
    let files = [
        ("cgroup.event_control", true),
        ("memory.force_empty", false),
        ("memory.oom_control", false),
    ];
    let own = mount
        .as_deref()
        .ok_or_else(|| "no memory hierarchy".to_string())
        .and_then(|m| cgroup_of_pid(m, "self").map_err(|e| e.to_string()));
    let own = match own {
        Ok(own) => own,
        Err(why) => {
            for (file, required) in files {
                checks.push(check("cgroup", file, required, Err(missing(&why))));
            }
            return;
        }
    };
    let probe_cg = ProbeCgroup::new(&own);
    let target = match &probe_cg {
        Ok(p) => &p.cg,
        Err(_) => &own,
    };
    let tried_on = match &probe_cg {
        Ok(_) => "on a throw-away child of our memory cgroup".to_string(),
        Err(e) => format!("checked read-only (cannot make a probe cgroup: {e})"),
    };
    let made = probe_cg.is_ok();
    for (file, required) in files {
        let result = if !target.file(file).exists() {
            Err(missing(format!("{} has no {file}", target.path.display())))
        } else if !made {
            Ok(format!("present; {tried_on}"))
        } else {
            let outcome = match file {
                "cgroup.event_control" => {
                    arm(&target.path, Notifier::Usage(Counter::Memory, 1 << 40))
                        .map(drop)
                        .map_err(|e| error_line(&e))
                }
                "memory.oom_control" => arm(&target.path, Notifier::Oom)
                    .map(drop)
                    .map_err(|e| error_line(&e)),
                _ => target.force_empty().map_err(|e| error_line(&e)),
            };
            outcome
                .map(|()| format!("works {tried_on}"))
                .map_err(missing)
        };
        checks.push(check("cgroup", file, required, result));
    }
    let swap = crate::cgroup::node_swap_total();
    let swappiness = std::fs::read_to_string("/proc/sys/vm/swappiness")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    checks.push(check(
        "cgroup",
        "swap accounting",
        false,
        Ok(swap_accounting(
            target.file("memory.memsw.limit_in_bytes").exists(),
            swap,
            swappiness,
        )),
    ));
}

/// What swap accounting means for the guard here: which counter a cgroup is guarded on.
/// Informational: either way the agent runs.
fn swap_accounting(memsw_files: bool, swap_total: u64, swappiness: Option<u64>) -> String {
    let swap = if swap_total == 0 {
        "the node has no swap".to_string()
    } else {
        format!("swap {} MiB", swap_total >> 20)
    };
    let node_swappiness = swappiness.map_or(String::new(), |s| format!(", vm.swappiness {s}"));
    if !memsw_files {
        return format!(
            "off (no memory.memsw.* files; swapaccount=0 or not built in): guarded on memory limits; {swap}{node_swappiness}"
        );
    }
    if swap_total == 0 {
        return format!(
            "on; {swap}, so memory+swap usage equals memory usage: guarded on memory limits"
        );
    }
    format!(
        "on; {swap}{node_swappiness}: a cgroup whose memory+swap limit is below its memory limit + swap (and swappiness not 0) is guarded on memory.memsw (column ON of `oomguard cgroups`)"
    )
}

/// An empty child of our own memory cgroup, removed on drop.
struct ProbeCgroup {
    cg: MemCgroup,
}

impl ProbeCgroup {
    fn new(own: &MemCgroup) -> std::io::Result<ProbeCgroup> {
        let path = own
            .path
            .join(format!("oomguard-doctor-{}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(ProbeCgroup {
            cg: MemCgroup::new(path),
        })
    }
}

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        // The eventfds are closed already; the kernel may need a moment to let go.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.cg.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return,
            }
        }
    }
}

/// Creates (and closes) a one-entry array map.
fn probe_bpf_syscall() -> Result<String, (Status, String)> {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 28],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = CreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        rest: [0; 28],
    };
    // SAFETY: BPF_MAP_CREATE with a zero-padded attr of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<CreateAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(missing(match err.raw_os_error() {
            Some(libc::ENOSYS) => format!("no bpf() system call ({err})"),
            Some(libc::EPERM) => format!("bpf() not permitted ({err})"),
            _ => err.to_string(),
        }));
    }
    // SAFETY: closing the fd BPF_MAP_CREATE just returned, owned by nobody else.
    unsafe { libc::close(fd as i32) };
    Ok("created a test map".into())
}

fn probe_bpffs() -> Result<String, (Status, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let targets = crate::bpf::mount::targets_of(&mounts, "bpf");
    if let Some(t) = targets.first() {
        return Ok(format!("mounted at {t}"));
    }
    let known = std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|text| text.lines().any(|l| l.ends_with("\tbpf")));
    if known {
        Ok(format!(
            "not mounted; the agent mounts it at {}",
            crate::bpf::mount::BPFFS
        ))
    } else {
        Err(missing("the kernel has no bpf filesystem"))
    }
}

fn probe_pidfd() -> Result<String, (Status, String)> {
    match rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    ) {
        Ok(_) => Ok("kills go through pidfds".into()),
        Err(rustix::io::Errno::NOSYS) => Err(missing(
            "no pidfd_open (kernel < 5.3): kills fall back to kill(2)",
        )),
        Err(e) => Err(missing(format!("pidfd_open failed: {e}"))),
    }
}

fn probe_process_mrelease() -> Result<String, (Status, String)> {
    let Ok(pidfd) = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    ) else {
        return Err(missing("needs a pidfd"));
    };
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a pidfd we own; we are not exiting, so the kernel refuses
    // (EINVAL) without touching our memory. Only ENOSYS matters here.
    let rc = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0) };
    let err = std::io::Error::last_os_error();
    if rc != 0 && err.raw_os_error() == Some(libc::ENOSYS) {
        Err(missing(
            "no process_mrelease (kernel < 5.15): a victim's memory is freed by its exit",
        ))
    } else {
        Ok("victims' memory is reaped at once".into())
    }
}

fn probe_realtime() -> Result<String, (Status, String)> {
    let result = std::thread::Builder::new()
        .name("oomguard-doctor-rt".into())
        .spawn(|| crate::sys::set_realtime(1))
        .map_err(|e| missing(format!("cannot start a thread: {e}")))?
        .join()
        .map_err(|_| missing("the probe thread panicked"))?;
    result
        .map(|()| "the guard thread can run SCHED_FIFO".into())
        .map_err(|e| {
            missing(format!(
                "SCHED_FIFO refused ({e}): the guard runs SCHED_OTHER"
            ))
        })
}

/// Connects to a unix socket with a timeout.
fn probe_socket(path: &Path) -> Result<String, (Status, String)> {
    if !path.exists() {
        return Err((Status::NotPresent, format!("no socket {}", path.display())));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&p).map(drop));
    });
    match rx.recv_timeout(Duration::from_secs(1)) {
        Ok(Ok(())) => Ok(format!("{} reachable", path.display())),
        Ok(Err(e)) => Err(missing(format!("{}: {e}", path.display()))),
        Err(_) => Err(missing(format!("{}: connect timed out", path.display()))),
    }
}

fn probe_kube(flag: Option<&Path>) -> Result<String, (Status, String)> {
    if let Some(path) = flag {
        return if path.is_file() {
            Ok(format!("--kubeconfig {}", path.display()))
        } else {
            Err(missing(format!(
                "--kubeconfig {}: no such file",
                path.display()
            )))
        };
    }
    const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && Path::new(TOKEN).is_file() {
        return Ok("in-cluster (service account)".into());
    }
    if let Some(list) = std::env::var_os("KUBECONFIG") {
        if let Some(p) = std::env::split_paths(&list).find(|p| p.is_file()) {
            return Ok(format!("KUBECONFIG {}", p.display()));
        }
        return Err(missing(format!(
            "KUBECONFIG={} names no file",
            list.to_string_lossy()
        )));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".kube/config");
        if p.is_file() {
            return Ok(format!("{}", p.display()));
        }
    }
    Err((
        Status::NotPresent,
        "none found: Kubernetes Events are not posted".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, status: Status, required: bool) -> Check {
        Check {
            group: "g",
            name: name.into(),
            status,
            required,
            detail: "d".into(),
        }
    }

    #[test]
    fn only_required_checks_decide_whether_the_agent_can_run() {
        let r = Report::from_checks(
            "6.1".into(),
            "v2 (cgroup2 at /sys/fs/cgroup)".into(),
            vec![
                c("a", Status::Ok, true),
                c("b", Status::Missing, false),
                c("c", Status::NotPresent, false),
            ],
            Some("tracefs: gone".into()),
        );
        assert!(r.can_run);
        assert_eq!(r.auto_mode, "eventfd");
        assert!(r.auto_reason.contains("tracefs: gone"));
        let r = Report::from_checks(
            "3.10".into(),
            "v1".into(),
            vec![c("a", Status::Missing, true)],
            None,
        );
        assert!(!r.can_run);
        assert_eq!(r.auto_mode, "ebpf");
        let lines = render(&r, Some(100), false);
        assert!(lines.iter().any(|l| l.contains("MISSING")));
        assert_eq!(lines[0], "kernel 3.10, cgroup layout v1");
        assert!(lines.iter().all(|l| l.chars().count() <= 100));
    }

    #[test]
    fn long_details_are_cut_at_their_end_and_only_on_a_terminal() {
        let mut check = c("memory cgroup", Status::Ok, true);
        check.detail = format!("{} a throw-away child of our memory cgroup", "x".repeat(70));
        let r = Report::from_checks("6.18".into(), "v2".into(), vec![check], None);
        let lines = render(&r, Some(80), false);
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
        let row = lines.iter().find(|l| l.starts_with("g ")).unwrap();
        assert!(row.contains("  xxxxxxxx") && row.ends_with('…'), "{row}");
        let lines = render(&r, None, false);
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("a throw-away child of our memory cgroup")),
            "{lines:#?}"
        );
        assert!(lines.iter().all(|l| !l.contains('…')), "{lines:#?}");
    }

    #[test]
    fn long_reasons_wrap() {
        let text = "word ".repeat(50);
        let lines = wrap(text.trim(), Some(20));
        assert!(lines.iter().all(|l| l.len() <= 20));
        assert_eq!(lines.join(" "), text.trim());
    }

    #[test]
    fn swap_accounting_says_which_counter_guards() {
        let off = swap_accounting(false, 1 << 30, Some(60));
        assert!(off.starts_with("off"), "{off}");
        assert!(off.contains("memory limits"), "{off}");
        let no_swap = swap_accounting(true, 0, Some(60));
        assert!(no_swap.starts_with("on"), "{no_swap}");
        assert!(no_swap.contains("no swap"), "{no_swap}");
        assert!(no_swap.contains("memory limits"), "{no_swap}");
        let memsw = swap_accounting(true, 2 << 30, Some(60));
        assert!(memsw.contains("swap 2048 MiB"), "{memsw}");
        assert!(memsw.contains("vm.swappiness 60"), "{memsw}");
        assert!(memsw.contains("memory.memsw"), "{memsw}");
    }

    #[test]
    fn a_missing_socket_is_not_present_not_an_error() {
        let r = probe_socket(Path::new("/nonexistent/containerd.sock"));
        assert!(matches!(r, Err((Status::NotPresent, _))));
    }
}
