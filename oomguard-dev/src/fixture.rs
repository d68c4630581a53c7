//! The integration tests' fixtures, one of each: the require-or-skip rule ([`require`]),
//! starting an agent ([`launch`], shorthand [`start_agent`]), workloads in sandbox cgroups
//! ([`hog`], [`memhog`]), serialisation of the tests that race the kernel ([`serial`]), and
//! small helpers (temporary directories, bounded polling, sockets, metrics text).
//! [`apiserver`] is a loopback Kubernetes API server, [`containerd`] the private containerd
//! with failures as panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod containerd;
pub mod swap;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oomguard::cgroup::{DEFAULT_MEMORY_ROOT, MemCgroup, cgroup_of_pid};

pub use crate::sandbox::{Agent, Sandbox, in_cgroup, memhog, patience, record_skip};

pub const M: u64 = 1 << 20;

/// Set by `.ci/run`: a missing kernel feature is then a failure, not a skip.
pub const REQUIRE_ENV: &str = "OOMGUARD_REQUIRE_ALL_FEATURES";

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises the tests of one binary: they race the kernel OOM killer and must not
/// compete with each other for CPU.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The one require-or-skip rule for a feature this machine may lack: `None` (nothing is
/// missing) is true; `Some(why)` is a skip (false, saying why, counted as skipped by the
/// kernel matrix) or, under [`REQUIRE_ENV`], a failure.
pub fn require(missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(why) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("required feature missing ({REQUIRE_ENV} is set): {why}")
        }
        Some(why) => {
            record_skip(&why);
            false
        }
    }
}

/// Root, and a cgroup v1 memory hierarchy with threshold notifications in our own memory
/// cgroup ([`require`]d); on a cgroup v2 node [`not_applicable`].
pub fn kernel_ready() -> bool {
    let layout = oomguard::cgroup::Layout::read().unwrap_or_default();
    if layout.memory_version() == Some(oomguard::cgroup::Version::V2) {
        // The v1 paths (threshold eventfds, force_empty) do not exist on this node at all.
        return not_applicable(&format!(
            "needs the cgroup v1 memory controller ({})",
            oomguard::cgroup::layout::node_summary(&layout)
        ));
    }
    require(probe())
}

/// For a test of a cgroup layout or kernel this machine does not have (a v2 test on a v1
/// host): always a skip, never a failure, even under the CI switch, which asks for every
/// feature of *this* machine.
pub fn not_applicable(why: &str) -> bool {
    record_skip(&format!("not applicable here: {why}"));
    false
}

/// [`kernel_ready`], swap accounting (the memsw files) in our own memory cgroup, and a swap
/// file of `bytes` switched on in the first of `dirs` that takes one (all [`require`]d): the
/// swap, switched off again when it drops. Swap is node-wide: hold it only while the test
/// runs (root tests run one at a time).
pub fn swap_ready(dirs: &[&Path], bytes: u64) -> Option<swap::SwapFile> {
    if !kernel_ready() {
        return None;
    }
    let own = crate::sandbox::own_cgroup().ok()?;
    if !own.file("memory.memsw.limit_in_bytes").exists() {
        require(Some(format!(
            "{} has no memory.memsw.* files: no swap accounting (swapaccount=0, or a kernel without CONFIG_MEMCG_SWAP)",
            own.path.display()
        )));
        return None;
    }
    match swap::SwapFile::on(dirs, bytes) {
        Ok(s) => Some(s),
        Err(why) => {
            require(Some(why));
            None
        }
    }
}

/// eBPF can be used ([`require`]d; the kernel itself is not checked).
pub fn ebpf_ready() -> bool {
    require(
        oomguard::bpf::capabilities()
            .reason()
            .map(|why| format!("eBPF unavailable: {why}")),
    )
}

/// [`kernel_ready`], eBPF, and each of `programs` can run on this kernel ([`require`]d,
/// naming which cannot and why).
pub fn programs_ready(programs: &[&str]) -> bool {
    if !kernel_ready() {
        return false;
    }
    let caps = oomguard::bpf::capabilities();
    if let Some(why) = caps.reason() {
        return require(Some(why));
    }
    let missing: Vec<String> = caps
        .programs
        .iter()
        .filter(|p| programs.contains(&p.program))
        .filter_map(|p| p.missing_line())
        .collect();
    require((!missing.is_empty()).then(|| missing.join("; ")))
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
        match crate::sandbox::own_cgroup() {
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
    require(why)
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

/// The agent binary, `oomguard`, next to the running test (`target/<profile>/`; cargo
/// builds it for the agent's integration tests).
pub fn agent_exe() -> PathBuf {
    crate::sandbox::sibling_binary("oomguard").unwrap_or_else(|| {
        panic!("the agent (oomguard) is not next to this test binary (build it: cargo build -p oomguard)")
    })
}

/// Runs `oomguard <args>` to its end (a CLI subcommand, or bad input): the exit code (-1
/// for a signal), stdout and stderr.
pub fn oomguard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_exe())
        .args(args)
        .output()
        .expect("run oomguard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Flags under which a correct agent wins every race against the kernel's OOM killer: the
/// process policy with a margin of 10% of the limit.
pub const WINNABLE: &[&str] = &["--policy", "process", "--margin-ratio", "0.1"];

/// The one way the tests start an agent: `oomguard run --root <root>` with, unless the
/// arguments name them, `--log-format json`, `--mode eventfd` and eBPF pins in a directory
/// of this test's own (removed by the agent on its clean exit). [`Launch::start`] waits until the agent
/// has armed `root` (or [`Launch::armed`]'s cgroups) and finished its first walk (reclaim
/// thresholds are armed after every kill threshold).
pub fn launch(root: &Path) -> Launch {
    let tag = root.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    Launch {
        root: root.to_path_buf(),
        args: Vec::new(),
        pins: format!("/sys/fs/bpf/oomguard-test-{}-{tag}", std::process::id()),
        cgroup: None,
        hooks: Vec::new(),
        armed: vec![root.to_path_buf()],
        timeout: Duration::from_secs(10),
        wait: true,
    }
}

/// [`launch`] on `root` with `extra` flags, started and armed.
pub fn start_agent(root: &MemCgroup, extra: &[&str]) -> Agent {
    launch(&root.path).args(extra).start()
}

type Hook = Box<dyn FnMut() -> std::io::Result<()> + Send + Sync>;

/// An agent about to start; see [`launch`].
pub struct Launch {
    root: PathBuf,
    args: Vec<String>,
    pins: String,
    cgroup: Option<MemCgroup>,
    hooks: Vec<Hook>,
    armed: Vec<PathBuf>,
    timeout: Duration,
    wait: bool,
}

impl Launch {
    /// More flags, after the fixed ones.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Pins in `/sys/fs/bpf/oomguard-test-<pid>-<tag>` (default tag: the root's name).
    pub fn pins(mut self, tag: &str) -> Self {
        self.pins = format!("/sys/fs/bpf/oomguard-test-{}-{tag}", std::process::id());
        self
    }

    /// Posts events to the API server `kubeconfig` names, as node `node`.
    pub fn kube(self, kubeconfig: &Path, node: &str) -> Self {
        let kubeconfig = kubeconfig.display().to_string();
        self.args(&["--kubeconfig", kubeconfig.as_str(), "--node-name", node])
    }

    /// The agent runs in `cg` from its first instruction (as a DaemonSet's container would).
    pub fn in_cgroup(mut self, cg: &MemCgroup) -> Self {
        self.cgroup = Some(cg.clone());
        self
    }

    /// Runs `hook` in the child before exec (seccomp filters, capability drops).
    ///
    /// # Safety
    /// As [`CommandExt::pre_exec`]: after fork, `hook` may only make async-signal-safe calls
    /// on data prepared before it.
    pub unsafe fn pre_exec(
        mut self,
        hook: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    /// Waits for these cgroups to be armed instead of the root (e.g. pods below kubepods).
    pub fn armed(mut self, cgroups: &[&Path]) -> Self {
        self.armed = cgroups.iter().map(|c| c.to_path_buf()).collect();
        self
    }

    /// How long [`Launch::start`] waits for each cgroup to be armed (default 10 s).
    pub fn armed_within(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts without waiting for anything (an agent that must refuse to start, or a test
    /// that watches the start itself).
    pub fn spawn(mut self) -> Agent {
        self.wait = false;
        self.start()
    }

    /// The command this launch runs (for a test that reads the agent's output itself).
    pub fn command(&mut self) -> Command {
        let mut cmd = Command::new(agent_exe());
        cmd.arg("run").arg("--root").arg(&self.root);
        for (flag, default) in [
            ("--log-format", "json"),
            ("--mode", "eventfd"),
            ("--bpf-pin-dir", self.pins.as_str()),
        ] {
            let given = |a: &String| a == flag || a.starts_with(&format!("{flag}="));
            if !self.args.iter().any(given) {
                cmd.args([flag, default]);
            }
        }
        cmd.args(&self.args);
        if let Some(cg) = &self.cgroup {
            in_cgroup(&mut cmd, cg).expect("cgroup path");
        }
        for hook in self.hooks.drain(..) {
            // SAFETY: the caller of `Launch::pre_exec` vouched for the hook.
            unsafe { cmd.pre_exec(hook) };
        }
        cmd
    }

    /// Starts the agent and, unless [`Launch::spawn`]ed, waits until it has armed what it
    /// should and finished its first walk.
    pub fn start(mut self) -> Agent {
        let agent = Agent::spawn(self.command(), None).expect("start the agent");
        if !self.wait {
            return agent;
        }
        for cg in &self.armed {
            assert!(
                agent.wait_armed(cg, self.timeout).is_some(),
                "the agent did not arm {} within {:?}; its log: {:#?}",
                cg.display(),
                self.timeout,
                agent.records()
            );
        }
        // Read without consuming: the children's "armed" records stay for wait_armed.
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        while agent.count(message("first walk done")) == 0 {
            assert!(
                Instant::now() < deadline,
                "no first walk within 10 s; log: {:#?}",
                agent.records()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }
}

/// Matches the log records whose message is `m` (for [`Agent::count`]).
pub fn message(m: &str) -> impl Fn(&serde_json::Value) -> bool + '_ {
    move |v| v["message"] == m
}

/// Runs `oomguard-memhog <args>` inside `cg`.
pub fn hog(cg: &MemCgroup, args: &[&str]) -> Child {
    let mut cmd = Command::new(memhog());
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

/// Waits (bounded) for the agent's decision record with this `action` (`kill`,
/// `kernel-oom`, …); fails the test with the agent's log when none comes.
pub fn expect_decision(agent: &Agent, action: &str, timeout: Duration) -> serde_json::Value {
    agent
        .wait_for(timeout, |v| {
            v["message"] == "decision" && v["action"] == action
        })
        .unwrap_or_else(|| panic!("no {action} decision; log: {:#?}", agent.records()))
}

/// The agent won the race: the kernel's OOM killer never acted in `cg`, and the workload
/// ended by SIGKILL (`st`, its exit status).
pub fn assert_agent_won(cg: &MemCgroup, st: Option<ExitStatus>, decision: &serde_json::Value) {
    assert_eq!(
        cg.subtree_oom_kills(),
        0,
        "the kernel OOM killer had to act; decision: {decision:#}"
    );
    assert!(killed_by_sigkill(st), "memhog ended with {st:?}");
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

/// What most root tests start with: `ready` (a probe such as [`kernel_ready`] or
/// [`v2_ready`]) passed, this binary's tests serialised ([`serial`]) and a sandbox with
/// `limit`. None when the probe skipped the test.
pub fn setup(ready: fn() -> bool, name: &str, limit: u64) -> Option<Setup> {
    if !ready() {
        return None;
    }
    let serial = serial();
    Some(Setup {
        sb: sandbox(name, limit),
        _serial: serial,
    })
}

/// A [`setup`]: the sandbox (what it dereferences to), then the serial lock; the sandbox is
/// removed before the next test may start.
pub struct Setup {
    pub sb: Sandbox,
    _serial: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Setup {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sb
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
    let deadline = Instant::now() + patience(timeout);
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

/// An event sink posting to a loopback API server through a kubeconfig of its own, on a
/// runtime of its own (fields drop in order: server, directory, runtime, sink).
pub struct SinkRig {
    pub server: apiserver::FakeApiServer,
    pub dir: TempDir,
    pub rt: tokio::runtime::Runtime,
    pub sink: oomguard::events::EventSink,
}

/// A [`SinkRig`] for node `node-1`; `adjust` changes the options before the sink starts.
pub fn sink_rig(tag: &str, adjust: impl FnOnce(&mut oomguard::events::EventsOptions)) -> SinkRig {
    let server = apiserver::FakeApiServer::start();
    let dir = TempDir::new(tag);
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut opts = oomguard::events::EventsOptions::new("node-1");
    opts.kubeconfig = Some(kubeconfig);
    adjust(&mut opts);
    let sink = oomguard::events::EventSink::spawn(rt.handle(), opts);
    SinkRig {
        server,
        dir,
        rt,
        sink,
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
