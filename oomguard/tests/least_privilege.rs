//! The agent confined the way deploy/daemonset.yaml confines it, for real: uid 0 with exactly
//! the capabilities the manifest adds (bounding, permitted and effective sets; inheritable and
//! ambient empty; no_new_privs), a read-only root filesystem (and read-only /sys and
//! /proc/sys, as the runtime mounts them), RLIMIT_MEMLOCK 8 MiB and RLIMIT_RTPRIO 0 (a
//! container's usual limits), writing only to its --state-dir and --bpf-pin-dir volumes.
//! It must still arm thresholds and kill a memory hog of another user before the kernel
//! does, in eventfd and in eBPF mode.
//!
//! Then each capability is taken away in turn to show what it is for. The list comes from
//! the manifest, so the manifest and this test cannot drift apart. Capabilities this
//! machine does not have (its bounding set) cannot be granted: the test reduces to the
//! intersection and says what it could not check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use caps::{CapSet, Capability, CapsHashSet};
use k8s_openapi::api::apps::v1::DaemonSet;
use oomguard::cgroup::MemCgroup;
use oomguard_dev::fixture::*;
use oomguard_dev::sandbox::{Agent, in_cgroup};

/// The uid the memory hog runs as: not the agent's, so killing it takes CAP_KILL.
const NOBODY: u32 = 65534;
/// A container's usual RLIMIT_MEMLOCK (systemd's default for the runtime's children).
const MEMLOCK_LIMIT: u64 = 8 << 20;

/// The capabilities deploy/daemonset.yaml adds to the agent's container (after dropping ALL).
fn manifest_capabilities() -> CapsHashSet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let ds: DaemonSet = serde_yaml::from_str(&text).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = pod
        .containers
        .iter()
        .find(|c| c.name == "oom-guard")
        .unwrap();
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        sc.run_as_user,
        Some(0),
        "the manifest runs the agent as root"
    );
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    caps.add
        .as_ref()
        .unwrap()
        .iter()
        .map(|name| {
            format!("CAP_{name}")
                .parse::<Capability>()
                .unwrap_or_else(|_| panic!("unknown capability {name} in the manifest"))
        })
        .collect()
}

/// What this machine can grant (our bounding set).
fn grantable() -> CapsHashSet {
    caps::read(None, CapSet::Bounding).unwrap()
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// `set`'s names in capability order.
fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<Capability> = set.iter().copied().collect();
    v.sort_by_key(|c| c.index());
    v.iter().map(|c| c.to_string()).collect()
}

/// A directory of this test's own (the --state-dir volume), removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("oomguard-lp-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        StateDir(p)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the agent is confined.
struct Confinement {
    /// The capabilities it keeps (must be grantable here).
    keep: CapsHashSet,
    /// Mount points to detach in its mount namespace: a node that has not mounted them.
    detach: Vec<&'static str>,
}

/// Makes `cmd` run confined by `conf`, with `state_dir` its only writable directory on the
/// root filesystem. Everything the child runs after the fork is prepared here.
fn confine(cmd: &mut Command, conf: &Confinement, state_dir: &Path) {
    let cstr = |p: &[u8]| CString::new(p).unwrap();
    let state = cstr(state_dir.as_os_str().as_bytes());
    let detach: Vec<CString> = conf.detach.iter().map(|p| cstr(p.as_bytes())).collect();
    let read_only: Vec<CString> = ["/", "/sys", "/proc/sys"]
        .iter()
        .map(|p| cstr(p.as_bytes()))
        .collect();
    let proc_sys = cstr(b"/proc/sys");
    let keep: CapsHashSet = conf.keep.iter().copied().collect();
    let bounding = grantable();
    let drop_bounding: Vec<Capability> = caps::all()
        .into_iter()
        .filter(|c| !conf.keep.contains(c) && bounding.contains(c))
        .collect();
    let none = CapsHashSet::new();
    // SAFETY: after the fork the closure makes system calls only, on data prepared above;
    // the caps calls used here do not allocate unless they fail.
    unsafe {
        cmd.pre_exec(move || {
            let ok = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            let null = std::ptr::null::<libc::c_char>();
            // A mount namespace of its own, so nothing below reaches the host's mounts.
            ok(libc::unshare(libc::CLONE_NEWNS))?;
            ok(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for m in &detach {
                ok(libc::umount2(m.as_ptr(), libc::MNT_DETACH))?;
            }
            // The volume: a bind mount keeps its own (writable) flags.
            ok(libc::mount(
                state.as_ptr(),
                state.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            ok(libc::mount(
                proc_sys.as_ptr(),
                proc_sys.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            // readOnlyRootFilesystem, and the runtime's read-only /sys and /proc/sys.
            for target in &read_only {
                ok(libc::mount(
                    null,
                    target.as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
            let limit = |resource, value: u64| {
                let l = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                ok(libc::setrlimit(resource, &l))
            };
            limit(libc::RLIMIT_MEMLOCK, MEMLOCK_LIMIT)?;
            limit(libc::RLIMIT_RTPRIO, 0)?;
            // allowPrivilegeEscalation: false.
            ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // Bounding first (dropping needs CAP_SETPCAP, which `keep` may lack), then
            // effective before permitted (effective must stay a subset of permitted).
            for c in &drop_bounding {
                caps::drop(None, CapSet::Bounding, *c).map_err(std::io::Error::other)?;
            }
            caps::set(None, CapSet::Effective, &keep).map_err(std::io::Error::other)?;
            caps::set(None, CapSet::Permitted, &keep).map_err(std::io::Error::other)?;
            caps::set(None, CapSet::Inheritable, &none).map_err(std::io::Error::other)?;
            caps::clear(None, CapSet::Ambient).map_err(std::io::Error::other)?;
            Ok(())
        });
    }
}

fn pin_dir(tag: &str) -> String {
    format!("/sys/fs/bpf/oomguard-lp-{}-{tag}", std::process::id())
}

/// Starts `oomguard run` on `root`, confined by `conf`; `args` follow the fixed ones.
fn start_confined(
    root: &MemCgroup,
    conf: &Confinement,
    state: &StateDir,
    tag: &str,
    args: &[&str],
) -> Agent {
    let state_dir = state.0.display().to_string();
    let mut cmd = launch(&root.path)
        .args(&["--bpf-pin-dir", &pin_dir(tag), "--state-dir", &state_dir])
        .args(args)
        .command();
    confine(&mut cmd, conf, &state.0);
    Agent::spawn(cmd, None).expect("start the confined agent")
}

fn wait_armed(agent: &Agent, root: &MemCgroup) {
    assert!(
        agent
            .wait_armed(&root.path, Duration::from_secs(15))
            .is_some(),
        "the confined agent did not arm {}; its log: {:#?}",
        root.path.display(),
        agent.records()
    );
}

/// Runs `oomguard-memhog <args>` as uid/gid [`NOBODY`] inside `cg`.
fn hog_as_nobody(cg: &MemCgroup, args: &[&str]) -> Child {
    // A copy that uid NOBODY can reach: the build directory may be under a private one.
    let dir = StateDir::new("hog");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.0.join("oomguard-memhog");
    std::fs::copy(memhog(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(args).stdout(Stdio::null());
    // Joins the cgroup first (as root: cgroup.procs is root's), then becomes nobody.
    in_cgroup(&mut cmd, cg).unwrap();
    // SAFETY: setgroups/setgid/setuid only.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn memhog as nobody")
}

/// `Name:\tvalue` of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn status_mask(pid: u32, name: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, name), 16).unwrap()
}

/// The scheduling policy (1 = SCHED_FIFO) of the agent's guard thread.
fn guard_thread_policy(pid: u32) -> Option<String> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "oomguard-guard" {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            return rest.split_whitespace().nth(41 - 3).map(str::to_string);
        }
    }
    None
}

/// Log records at warn or error level.
fn complaints(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .records()
        .into_iter()
        .filter(|v| v["level"] == "WARN" || v["level"] == "ERROR" || v.get("raw").is_some())
        .collect()
}

fn has_record(agent: &Agent, message: &str) -> bool {
    agent.records().iter().any(|v| v["message"] == message)
}

/// The manifest's capabilities that this machine can grant; prints the others.
fn manifest_here() -> CapsHashSet {
    let wanted = manifest_capabilities();
    let here = grantable();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !here.contains(c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "note: this machine's bounding set lacks {}: the agent runs without it here, \
             so what it is for could not be checked",
            missing.join(", ")
        );
    }
    wanted.into_iter().filter(|c| here.contains(c)).collect()
}

/// The agent, confined exactly as the DaemonSet confines it, kills a hog of another user
/// before the kernel and protects itself as far as the granted capabilities allow.
fn works_with_exactly_the_manifests_capabilities(mode: &str) {
    if !kernel_ready() || (mode == "ebpf" && !ebpf_ready()) {
        return;
    }
    let _serial = serial();
    let wanted = manifest_capabilities();
    let keep = manifest_here();
    let sb = sandbox("lp-exact", 256 * M);
    let state = StateDir::new(mode);
    let conf = Confinement {
        keep: keep.clone(),
        detach: Vec::new(),
    };
    let agent = start_confined(
        &sb.cg,
        &conf,
        &state,
        mode,
        &[
            "--mode",
            mode,
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
        ],
    );
    wait_armed(&agent, &sb.cg);
    let pid = agent.pid();

    // The confinement is what the manifest says, as the kernel sees it.
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    for set in ["CapBnd", "CapPrm", "CapEff"] {
        assert_eq!(
            status_mask(pid, set),
            mask(&keep),
            "{set} of the agent (want {:?})",
            names(&keep)
        );
    }
    assert_eq!(status_mask(pid, "CapInh"), 0);
    assert_eq!(status_mask(pid, "CapAmb"), 0);
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_opts = mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .map(|f| f[5].to_string())
        .unwrap();
    assert!(
        root_opts.split(',').any(|o| o == "ro"),
        "the agent's root is not read-only: {root_opts}"
    );

    // The control socket: in the state volume, mode 0600.
    let sock = state.0.join("control.sock");
    let meta = std::fs::metadata(&sock)
        .unwrap_or_else(|e| panic!("no control socket at {}: {e}", sock.display()));
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    if mode == "ebpf" {
        assert!(
            has_record(
                &agent,
                "eBPF programs loaded and attached; threshold eventfds stay armed as the backstop"
            ),
            "{:#?}",
            agent.records()
        );
        assert!(Path::new(&pin_dir(mode)).join("THRESHOLDS").exists());
    }

    // A hog of another user: killed by the agent, not by the kernel.
    let mut hog = hog_as_nobody(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    let decision = expect_decision(&agent, "kill", Duration::from_secs(5));
    assert_agent_won(&sb.cg, st, &decision);
    let k = killed(&decision);
    assert_eq!(k[0]["pid"].as_u64(), Some(u64::from(hog.id())));
    assert_eq!(k[0]["outcome"], "exited", "{decision:#}");
    // Which signal woke the guard for the kill is not this test's subject (guard.rs pins it
    // where the charge path runs), and since episodes re-check usage a kill may follow an
    // eventfd wake-up; that the eBPF programs work under these capabilities is: a crossing
    // record from them reached the guard.
    if mode == "ebpf" {
        assert!(
            agent
                .records()
                .iter()
                .any(|v| v["message"] == "decision" && v["signal"] == "ebpf"),
            "no decision woke by an eBPF record: {:#?}",
            agent.decisions("kill")
        );
    }

    // Self-protection, for each capability that buys it.
    let cap = |c: Capability| keep.contains(&c);
    let vmlck: u64 = status_field(pid, "VmLck")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    if cap(Capability::CAP_IPC_LOCK) {
        assert!(vmlck > 0, "mlockall did not take effect");
    }
    if cap(Capability::CAP_SYS_NICE) {
        assert_eq!(guard_thread_policy(pid).as_deref(), Some("1"), "SCHED_FIFO");
    }
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    if cap(Capability::CAP_SYS_RESOURCE) {
        assert_eq!(adj.trim(), "-1000");
    } else if wanted.contains(&Capability::CAP_SYS_RESOURCE) {
        eprintln!(
            "could not check: CAP_SYS_RESOURCE (oom_score_adj -1000); without it here the \
             agent's oom_score_adj is {} (warned: {})",
            adj.trim(),
            has_record(&agent, "cannot set our oom_score_adj to -1000")
        );
    }

    // Nothing else complained: no permission refused, no write to the read-only root.
    let unexpected: Vec<serde_json::Value> = complaints(&agent)
        .into_iter()
        .filter(|v| {
            v["message"] != "cannot set our oom_score_adj to -1000"
                || cap(Capability::CAP_SYS_RESOURCE)
        })
        .filter(|v| {
            let text = v.to_string();
            [
                "ermission",
                "not permitted",
                "Read-only",
                "EPERM",
                "EACCES",
                "EROFS",
            ]
            .iter()
            .any(|s| text.contains(s))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "the confined agent was refused something: {unexpected:#?}"
    );
    eprintln!(
        "{mode}: confined to {:?} (CapEff {:#x}), root read-only; killed pid {} of uid {NOBODY}; \
         VmLck {vmlck} kB; oom_score_adj {}; guard thread policy {:?}",
        names(&keep),
        mask(&keep),
        hog.id(),
        adj.trim(),
        guard_thread_policy(pid)
    );
}

#[test]
fn works_with_exactly_the_manifests_capabilities_eventfd_mode() {
    works_with_exactly_the_manifests_capabilities("eventfd");
}

#[test]
fn works_with_exactly_the_manifests_capabilities_ebpf_mode() {
    works_with_exactly_the_manifests_capabilities("ebpf");
}

/// The manifest's capabilities without `cap`, or `None` (after saying so) when the manifest
/// does not list it or this machine cannot grant it.
fn all_but(cap: Capability) -> Option<CapsHashSet> {
    if !manifest_capabilities().contains(&cap) {
        eprintln!("skipped: the manifest does not list {cap}");
        return None;
    }
    if !grantable().contains(&cap) {
        eprintln!("could not check {cap}: this machine's bounding set lacks it");
        return None;
    }
    let mut keep = manifest_here();
    keep.remove(&cap);
    Some(keep)
}

/// Without CAP_KILL the agent cannot signal another user's task: the kill fails with EPERM
/// and the kernel OOM killer has to act.
#[test]
fn kill_is_needed_to_kill_another_users_task() {
    if !kernel_ready() {
        return;
    }
    let Some(keep) = all_but(Capability::CAP_KILL) else {
        return;
    };
    let _serial = serial();
    let sb = sandbox("lp-nokill", 128 * M);
    let state = StateDir::new("nokill");
    let conf = Confinement {
        keep,
        detach: Vec::new(),
    };
    let agent = start_confined(
        &sb.cg,
        &conf,
        &state,
        "nokill",
        &[
            "--mode",
            "eventfd",
            "--policy",
            "process",
            "--margin-ratio",
            "0.1",
        ],
    );
    wait_armed(&agent, &sb.cg);
    let mut hog = hog_as_nobody(&sb.cg, &["--rate", "100M", "--total", "1G"]);
    let st = wait_exit(&mut hog, Duration::from_secs(30));
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
    let failed = expect_decision(&agent, "kill-failed", Duration::from_secs(5));
    let k = killed(&failed);
    assert_eq!(k[0]["outcome"], "failed", "{failed:#}");
    assert_eq!(k[0]["errno"].as_i64(), Some(i64::from(libc::EPERM)));
    assert!(
        sb.cg.subtree_oom_kills() >= 1,
        "the kernel should have killed it"
    );
    assert!(agent.decisions("kill").is_empty());
}

/// Without CAP_IPC_LOCK, mlockall fails under the container's RLIMIT_MEMLOCK.
#[test]
fn ipc_lock_is_needed_for_mlockall() {
    if !kernel_ready() {
        return;
    }
    let Some(keep) = all_but(Capability::CAP_IPC_LOCK) else {
        return;
    };
    let _serial = serial();
    let sb = sandbox("lp-nolock", 64 * M);
    let state = StateDir::new("nolock");
    let conf = Confinement {
        keep,
        detach: Vec::new(),
    };
    let agent = start_confined(&sb.cg, &conf, &state, "nolock", &["--mode", "eventfd"]);
    wait_armed(&agent, &sb.cg);
    assert!(
        has_record(
            &agent,
            "mlockall failed; the kill path may page-fault under pressure"
        ),
        "{:#?}",
        agent.records()
    );
    assert_eq!(status_field(agent.pid(), "VmLck"), "0 kB");
}

/// Without CAP_SYS_NICE (and RLIMIT_RTPRIO 0) the guard thread cannot run SCHED_FIFO.
#[test]
fn sys_nice_is_needed_for_the_real_time_guard_thread() {
    if !kernel_ready() {
        return;
    }
    let Some(keep) = all_but(Capability::CAP_SYS_NICE) else {
        return;
    };
    let _serial = serial();
    let sb = sandbox("lp-nonice", 64 * M);
    let state = StateDir::new("nonice");
    let conf = Confinement {
        keep,
        detach: Vec::new(),
    };
    let agent = start_confined(&sb.cg, &conf, &state, "nonice", &["--mode", "eventfd"]);
    wait_armed(&agent, &sb.cg);
    assert!(
        has_record(
            &agent,
            "cannot set SCHED_FIFO on the guard thread; it runs at normal priority"
        ),
        "{:#?}",
        agent.records()
    );
    assert_eq!(guard_thread_policy(agent.pid()).as_deref(), Some("0"));
}

/// `--mode ebpf` with `keep` must refuse to start, naming why.
fn ebpf_refused(keep: CapsHashSet, detach: Vec<&'static str>, tag: &str) -> String {
    let sb = sandbox(&format!("lp-{tag}"), 64 * M);
    let state = StateDir::new(tag);
    let conf = Confinement { keep, detach };
    let mut agent = start_confined(&sb.cg, &conf, &state, tag, &["--mode", "ebpf"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while agent.running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !agent.running(),
        "--mode ebpf started: {:#?}",
        agent.records()
    );
    let errors: Vec<String> = agent
        .records()
        .iter()
        .filter(|v| v["level"] == "ERROR")
        .map(|v| v["message"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(errors.len(), 1, "{:#?}", agent.records());
    assert!(
        errors[0].starts_with("--mode ebpf: eBPF cannot be used"),
        "{errors:?}"
    );
    eprintln!("{tag}: {}", errors[0]);
    errors[0].clone()
}

/// Without CAP_BPF no map can be made: eBPF mode refuses to start.
#[test]
fn bpf_is_needed_for_ebpf_mode() {
    if !kernel_ready() || !ebpf_ready() {
        return;
    }
    let Some(keep) = all_but(Capability::CAP_BPF) else {
        return;
    };
    let _serial = serial();
    let why = ebpf_refused(keep, Vec::new(), "nobpf");
    assert!(why.contains("bpf() not permitted"), "{why}");
}

/// Without CAP_PERFMON the tracing programs cannot be loaded: eBPF mode refuses to start.
#[test]
fn perfmon_is_needed_for_ebpf_mode() {
    if !kernel_ready() || !ebpf_ready() {
        return;
    }
    let Some(keep) = all_but(Capability::CAP_PERFMON) else {
        return;
    };
    let _serial = serial();
    let why = ebpf_refused(keep, Vec::new(), "noperfmon");
    assert!(why.contains("Operation not permitted"), "{why}");
}

/// CAP_SYS_ADMIN is not in the manifest: it is only needed to mount tracefs and bpffs, which
/// the node mounts (systemd does) and the DaemonSet passes in as volumes. On a node that has
/// not mounted them, `--mode ebpf` without it refuses to start, naming the bpffs mount (tracefs
/// only costs the programs on tracefs tracepoints); with it,
/// the agent mounts them itself (in its own mount namespace here, as in a container).
#[test]
fn sys_admin_is_needed_only_to_mount_tracefs_and_bpffs() {
    if !kernel_ready() || !ebpf_ready() {
        return;
    }
    let keep = manifest_here();
    assert!(
        !manifest_capabilities().contains(&Capability::CAP_SYS_ADMIN),
        "the manifest adds SYS_ADMIN"
    );
    let _serial = serial();
    let unmounted = vec!["/sys/kernel/tracing", "/sys/fs/bpf"];
    let why = ebpf_refused(keep.clone(), unmounted.clone(), "noadmin");
    // Without tracefs only the programs on tracefs tracepoints are lost (a warning each);
    // without bpffs there are no pins, so that is the refusal.
    assert!(
        why.contains("mounting bpf at /sys/fs/bpf") && why.contains("Operation not permitted"),
        "{why}"
    );

    if !grantable().contains(&Capability::CAP_SYS_ADMIN) {
        eprintln!("could not check CAP_SYS_ADMIN: this machine's bounding set lacks it");
        return;
    }
    let mut with_admin = keep;
    with_admin.insert(Capability::CAP_SYS_ADMIN);
    let sb = sandbox("lp-admin", 64 * M);
    let state = StateDir::new("admin");
    let conf = Confinement {
        keep: with_admin,
        detach: unmounted,
    };
    let agent = start_confined(&sb.cg, &conf, &state, "admin", &["--mode", "ebpf"]);
    wait_armed(&agent, &sb.cg);
    for m in [
        "mounted tracefs, which was not mounted",
        "mounted bpffs, which was not mounted",
    ] {
        assert!(has_record(&agent, m), "no {m:?}: {:#?}", agent.records());
    }
}
