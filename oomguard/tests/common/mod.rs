//! Shared pieces of the root integration tests: the feature probe, serialisation of the
//! tests that race the kernel, and spawning workloads inside sandbox cgroups.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oomguard::cgroup::{DEFAULT_MEMORY_ROOT, MemCgroup, cgroup_of_pid};
use oomguard_dev::sandbox::{Agent, Sandbox, in_cgroup, patience};

pub const M: u64 = 1 << 20;

/// Set by `.ci/run`: a missing kernel feature is then a failure, not a skip.
pub const REQUIRE_ENV: &str = "OOMGUARD_REQUIRE_ALL_FEATURES";

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary: they race the kernel OOM killer and must not
/// compete with each other for CPU.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Probes for what these tests need: root, and a cgroup v1 memory hierarchy with threshold
/// notifications in our own memory cgroup. Returns false (after saying why) when the
/// kernel lacks it, unless the CI switch demands every feature.
pub fn kernel_ready() -> bool {
    let layout = oomguard::cgroup::Layout::read().unwrap_or_default();
    if layout.memory_version() == Some(oomguard::cgroup::Version::V2) {
        // The v1 paths (threshold eventfds, force_empty) do not exist on this node at all.
        return not_applicable(&format!(
            "needs the cgroup v1 memory controller ({})",
            oomguard::cgroup::layout::node_summary(&layout)
        ));
    }
    let why = probe();
    match why {
        None => true,
        Some(why) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("required feature missing ({REQUIRE_ENV} is set): {why}")
        }
        Some(why) => {
            skipped(&why);
            false
        }
    }
}

/// Says why the running test skips, on stderr and, in the kernel matrix's guests, in the
/// file `OOMGUARD_SKIP_LOG` names (`<test name>\t<reason>` per line), so the matrix counts it
/// as skipped, not passed.
pub fn skipped(why: &str) {
    oomguard_dev::sandbox::record_skip(why);
}

/// For a test of a cgroup layout or kernel this machine does not have (a v2 test on a v1
/// host): always a skip, never a failure, even under the CI switch, which asks for every
/// feature of *this* machine.
pub fn not_applicable(why: &str) -> bool {
    skipped(&format!("not applicable here: {why}"));
    false
}

/// For tests that need eBPF: true when it can be used; otherwise skips (saying why) or,
/// under the CI switch, fails.
pub fn ebpf_ready() -> bool {
    match oomguard::bpf::capabilities().reason() {
        None => true,
        Some(why) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("required feature missing ({REQUIRE_ENV} is set): {why}")
        }
        Some(why) => {
            skipped(&format!("eBPF unavailable: {why}"));
            false
        }
    }
}

/// For tests of the cgroup v2 paths: true on a node whose memory controller is on cgroup
/// v2 with `+memory` handed down to our own cgroup's children. On a node whose memory
/// controller is on v1 the test is not applicable (a skip even under the CI switch, which
/// means "every feature this node has"); a v2 node lacking the rest is a missing feature.
pub fn v2_ready() -> bool {
    let layout = oomguard::cgroup::Layout::read().unwrap_or_default();
    if layout.memory_version() != Some(oomguard::cgroup::Version::V2) {
        return not_applicable(&format!(
            "the memory controller is not on cgroup v2 here ({})",
            oomguard::cgroup::layout::node_summary(&layout)
        ));
    }
    let why = if rustix::process::geteuid().as_raw() != 0 {
        Some("not root: these tests make cgroups and kill processes".to_string())
    } else {
        match oomguard_dev::sandbox::own_cgroup() {
            Err(e) => Some(format!("no memory cgroup of our own: {e}")),
            Ok(own) => match std::fs::read_to_string(own.file("cgroup.subtree_control")) {
                Ok(c) if c.split_whitespace().any(|c| c == "memory") => None,
                Ok(_) => Some(format!(
                    "{} does not hand +memory down (cgroup.subtree_control)",
                    own.path.display()
                )),
                Err(e) => Some(format!("{}: {e}", own.path.display())),
            },
        }
    };
    match why {
        None => true,
        Some(why) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("required feature missing ({REQUIRE_ENV} is set): {why}")
        }
        Some(why) => {
            skipped(&why);
            false
        }
    }
}

fn probe() -> Option<String> {
    if rustix::process::geteuid().as_raw() != 0 {
        return Some("not root: these tests make cgroups and kill processes".into());
    }
    let own = match cgroup_of_pid(Path::new(DEFAULT_MEMORY_ROOT), "self") {
        Ok(c) => c,
        Err(e) => return Some(format!("no cgroup v1 memory controller: {e}")),
    };
    for f in [
        "cgroup.event_control",
        "memory.force_empty",
        "memory.oom_control",
    ] {
        if !own.file(f).exists() {
            return Some(format!("{} lacks {f}", own.path.display()));
        }
    }
    None
}

pub fn agent_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_oomguard"))
}

pub fn memhog_exe() -> std::path::PathBuf {
    oomguard_dev::sandbox::memhog()
}

/// Starts the agent on `root` with `extra` flags and waits until it has armed `root` and
/// finished its first walk (reclaim thresholds are armed after every kill threshold).
/// Without `--mode` in `extra` it runs in eventfd mode; eBPF pins go to a directory of
/// this test's own, removed by the agent on its clean exit.
pub fn start_agent(root: &MemCgroup, extra: &[&str]) -> Agent {
    let r = root.path.display().to_string();
    let pins = format!(
        "/sys/fs/bpf/oomguard-test-{}-{}",
        std::process::id(),
        root.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("x")
    );
    let mut args = vec!["--root", r.as_str(), "--bpf-pin-dir", pins.as_str()];
    if !extra.contains(&"--mode") {
        args.extend_from_slice(&["--mode", "eventfd"]);
    }
    args.extend_from_slice(extra);
    let agent = Agent::start(agent_exe(), &args, None).expect("start the agent");
    assert!(
        agent
            .wait_armed(&root.path, Duration::from_secs(10))
            .is_some(),
        "the agent did not arm {} within 10 s; its log: {:#?}",
        root.path.display(),
        agent.records()
    );
    // Read without consuming: the children's "armed" records stay for wait_armed.
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    while !agent
        .records()
        .iter()
        .any(|v| v["message"] == "first walk done")
    {
        assert!(
            Instant::now() < deadline,
            "no first walk within 10 s; log: {:#?}",
            agent.records()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    agent
}

/// Runs `oomguard-memhog <args>` inside `cg`.
pub fn hog(cg: &MemCgroup, args: &[&str]) -> Child {
    let mut cmd = Command::new(memhog_exe());
    cmd.args(args).stdout(Stdio::null());
    in_cgroup(&mut cmd, cg)
        .expect("cgroup path")
        .spawn()
        .expect("spawn memhog")
}

/// Waits (bounded) for a child to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + patience(timeout);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

pub fn killed_by_sigkill(st: Option<ExitStatus>) -> bool {
    st.and_then(|s| s.signal()) == Some(libc::SIGKILL)
}

/// The `killed` list of a decision record.
pub fn killed(decision: &serde_json::Value) -> Vec<serde_json::Value> {
    serde_json::from_str::<Vec<serde_json::Value>>(decision["killed"].as_str().unwrap_or("[]"))
        .unwrap_or_default()
}

/// Waits until `hog`'s resident memory reaches `bytes` (it has allocated its share).
pub fn wait_rss(child: &Child, bytes: u64, timeout: Duration) {
    let deadline = Instant::now() + patience(timeout);
    loop {
        let rss = oomguard::victim::read_task(child.id() as i32, Path::new(""))
            .map(|t| t.rss_bytes)
            .unwrap_or(0);
        if rss >= bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {} reached only {rss} bytes of rss, wanted {bytes}",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A sandbox with a memory limit.
pub fn sandbox(name: &str, limit: u64) -> Sandbox {
    let sb = Sandbox::new(name).expect("make a sandbox cgroup");
    sb.cg.set_limit(limit).expect("set the limit");
    sb
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// GET `path`: the status code and the body.
pub fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: oomguard\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The value of one series (`name{labels}`) in OpenMetrics text.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
