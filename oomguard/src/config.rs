//! Command-line flags (upstream names where the upstream agent has them), defaults and
//! validation. Bad input never starts a half-configured agent: [`RunArgs::validate`] turns
//! the flags into a [`Config`] or one clear error.

use std::path::PathBuf;
use std::time::Duration;

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use thiserror::Error;

use crate::cgroup::{Layout, MemCgroup, Version, layout::node_summary};
use crate::size::Size;
use crate::threshold::Margins;

/// Where the control socket (`control.sock`) lives unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/oomguard";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Kill one whole container through its runtime.
    Container,
    /// Kill the task with the highest OOM score, like the kernel's memcg OOM killer.
    Process,
    /// Log what would be killed; kill nothing.
    Noop,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Container => "container",
            Policy::Process => "process",
            Policy::Noop => "noop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// eBPF when it loads, else pure eventfd (with one warning).
    Auto,
    /// Require eBPF; refuse to start without it.
    Ebpf,
    /// No eBPF: kernel notifications only. On cgroup v1 the threshold eventfds (the
    /// 3.10-compatible path); on cgroup v2, which has none, the fallback watcher
    /// (`memory.events`, PSI triggers, headroom-adaptive polling of `memory.current`).
    #[value(alias = "fallback")]
    Eventfd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Top of the subtree to guard: a directory of the cgroup v1 memory hierarchy or of
    /// cgroup2 (default: the v1 memory mount if there is one, else the cgroup2 mount).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// What to do when a cgroup crosses its threshold.
    #[arg(long, value_enum, default_value_t = Policy::Container)]
    pub policy: Policy,
    /// margin = clamp(limit * ratio, min, max); threshold = limit - margin.
    #[arg(long, default_value_t = 0.02)]
    pub margin_ratio: f64,
    /// Smallest margin; a bare number is MiB.
    #[arg(long, default_value = "1M")]
    pub min_margin: Size,
    /// Largest margin; a bare number is MiB.
    #[arg(long, default_value = "50M")]
    pub max_margin: Size,
    /// Skip the background force_empty while reclaimable page cache (total_inactive_file +
    /// total_active_file in memory.stat) is at least this fraction of the limit: dropping an
    /// I/O-heavy cgroup's cache would only hurt. (The kill itself follows the decision rule.)
    #[arg(long, default_value_t = 0.1)]
    pub cache_skip_ratio: f64,
    /// eBPF or eventfd signals.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Seconds between full rescans of --root (a safety net behind inotify).
    #[arg(long, alias = "walkIntervalSeconds", default_value_t = 277)]
    pub walk_interval: u64,
    /// While a cgroup stays at or above its threshold, re-check it this often (ms).
    #[arg(long, default_value_t = 50)]
    pub guard_ms: u64,
    /// The longest wait (ms) for a victim that has neither exited nor been reaped before its
    /// subtree may act again (the kernel's OOM reaper gives up on a task after about 1 s).
    #[arg(long, default_value_t = 1000)]
    pub cooldown_ms: u64,
    /// How long (ms) a kill worker waits for its victim's exit before it reports the victim as
    /// stuck (the guard thread never waits: it keeps the cgroup acting until the exit).
    #[arg(long, default_value_t = 500)]
    pub kill_timeout_ms: u64,
    /// Bound (ms) on one background memory.force_empty.
    #[arg(long, default_value_t = 2000)]
    pub reclaim_timeout_ms: u64,
    /// Minimum interval (ms) between two force_empty runs on one cgroup.
    #[arg(long, default_value_t = 10_000)]
    pub reclaim_interval_ms: u64,
    /// SCHED_FIFO priority of the guard thread (1-99); 0 keeps normal scheduling.
    #[arg(long, default_value_t = 10)]
    pub rt_priority: u8,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Node name for reports (default: $NODE_NAME, else the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// containerd socket of the docker runtime (containerd namespace "moby").
    #[arg(long, default_value = "/run/docker/containerd/docker-containerd.sock")]
    pub docker_containerd_sock: PathBuf,
    /// containerd socket of the containerd runtime (namespace "k8s.io").
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_sock: PathBuf,
    /// docker's data root: container labels come from containers/<id>/config.v2.json.
    #[arg(long, default_value = "/var/lib/docker")]
    pub docker_root: PathBuf,
    /// Where the eBPF maps are pinned (removed on a clean exit).
    #[arg(long, default_value = crate::bpf::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// A kubeconfig for posting Events (default: in-cluster config, else $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where the control socket (control.sock) for `oomguard cgroups`/`events` lives.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Serve /metrics, /healthz and /readyz on HOST:PORT (or :PORT, all addresses). Off when
    /// unset, empty or port 0.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// /healthz fails when the guard loop has not turned for this long (ms). Idle, it turns
    /// four times in this window; kills wait on workers, never on it.
    #[arg(long, default_value_t = 10_000)]
    pub watchdog_ms: u64,
    /// Do not watch the hierarchy with inotify (one watch per cgroup; fs.inotify.max_user_watches
    /// is small on old kernels). New cgroups are then found by the eBPF cgroup_mkdir program
    /// (a cgroup without a limit yet is re-checked 10 ms, 100 ms and 1 s after it was made)
    /// and by the rescan every --walk-interval, which is also when changed limits are seen.
    #[arg(long)]
    pub no_inotify: bool,
    /// cgroup v2 only, off by default: set each guarded cgroup's memory.high at its kill
    /// threshold, so the kernel throttles (and reclaims) a runaway cgroup there while the
    /// agent acts. It slows every workload that reaches the threshold and replaces a
    /// memory.high set by others (the kubelet's MemoryQoS); the old value is given back
    /// when the cgroup stops being guarded or the agent exits.
    #[arg(long)]
    pub v2_throttle: bool,
    /// More flags, read at start and again on SIGHUP (which is ignored without this file):
    /// whitespace-separated, `#` starts a comment, e.g. `--policy=noop`. They win over the
    /// command line. A reload that is invalid, or that changes a flag only a restart can
    /// change (--root, --mode, sockets, directories, --metrics-addr...), applies nothing.
    #[arg(long, value_name = "PATH")]
    pub flags_file: Option<PathBuf>,
}

/// A validated configuration: everything the agent needs, nothing half-checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: MemCgroup,
    pub policy: Policy,
    pub margins: Margins,
    pub cache_skip_ratio: f64,
    pub mode: Mode,
    pub walk_interval: Duration,
    pub guard_interval: Duration,
    pub cooldown: Duration,
    pub kill_timeout: Duration,
    pub reclaim_timeout: Duration,
    pub reclaim_interval: Duration,
    pub rt_priority: u8,
    pub log_format: LogFormat,
    pub node_name: String,
    pub docker_containerd_sock: PathBuf,
    pub containerd_sock: PathBuf,
    pub docker_root: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub watchdog: Duration,
    pub inotify: bool,
    pub v2_throttle: bool,
    pub flags_file: Option<PathBuf>,
}

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("--margin-ratio must be in (0, 1), got {0}")]
    MarginRatio(f64),
    #[error("--cache-skip-ratio must be in [0, 1], got {0}")]
    CacheRatio(f64),
    #[error("--min-margin ({min}) is larger than --max-margin ({max})")]
    MinAboveMax { min: Size, max: Size },
    #[error("--min-margin must be at least one page (4K), got {0}")]
    MinTooSmall(Size),
    #[error("--{flag} must be greater than 0")]
    Zero { flag: &'static str },
    #[error("--rt-priority must be 0 (off) or 1-99, got {0}")]
    RtPriority(u8),
    #[error("--metrics-addr must be HOST:PORT or :PORT, got {0:?}")]
    MetricsAddr(String),
    #[error("{0}")]
    Args(String),
    #[error("--flags-file {path}: {error}")]
    FlagsFile { path: String, error: String },
    #[error("--root {root} is not a memory cgroup directory ({why}); {node}")]
    Root {
        root: String,
        why: String,
        node: String,
    },
    #[error("no memory cgroup hierarchy is mounted; {0}")]
    NoHierarchy(String),
}

impl RunArgs {
    /// Checks every flag; `hostname` is the fallback node name.
    pub fn validate(&self, hostname: &str) -> Result<Config, ConfigError> {
        if !(self.margin_ratio > 0.0 && self.margin_ratio < 1.0) {
            return Err(ConfigError::MarginRatio(self.margin_ratio));
        }
        if !(0.0..=1.0).contains(&self.cache_skip_ratio) {
            return Err(ConfigError::CacheRatio(self.cache_skip_ratio));
        }
        if self.min_margin > self.max_margin {
            return Err(ConfigError::MinAboveMax {
                min: self.min_margin,
                max: self.max_margin,
            });
        }
        if self.min_margin.bytes() < 4096 {
            return Err(ConfigError::MinTooSmall(self.min_margin));
        }
        for (flag, v) in [
            ("walk-interval", self.walk_interval),
            ("guard-ms", self.guard_ms),
            ("kill-timeout-ms", self.kill_timeout_ms),
            ("reclaim-timeout-ms", self.reclaim_timeout_ms),
            ("watchdog-ms", self.watchdog_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { flag });
            }
        }
        if self.rt_priority > 99 {
            return Err(ConfigError::RtPriority(self.rt_priority));
        }
        let metrics_addr = parse_metrics_addr(self.metrics_addr.as_deref())?;
        let root = resolve_root(self.root.as_deref(), &Layout::read().unwrap_or_default())?;
        Ok(Config {
            root,
            policy: self.policy,
            margins: Margins {
                ratio: self.margin_ratio,
                min: self.min_margin.bytes(),
                max: self.max_margin.bytes(),
            },
            cache_skip_ratio: self.cache_skip_ratio,
            mode: self.mode,
            walk_interval: Duration::from_secs(self.walk_interval),
            guard_interval: Duration::from_millis(self.guard_ms),
            cooldown: Duration::from_millis(self.cooldown_ms),
            kill_timeout: Duration::from_millis(self.kill_timeout_ms),
            reclaim_timeout: Duration::from_millis(self.reclaim_timeout_ms),
            reclaim_interval: Duration::from_millis(self.reclaim_interval_ms),
            rt_priority: self.rt_priority,
            log_format: self.log_format,
            node_name: self
                .node_name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| hostname.to_string()),
            docker_containerd_sock: self.docker_containerd_sock.clone(),
            containerd_sock: self.containerd_sock.clone(),
            docker_root: self.docker_root.clone(),
            bpf_pin_dir: self.bpf_pin_dir.clone(),
            kubeconfig: self.kubeconfig.clone(),
            state_dir: self.state_dir.clone(),
            metrics_addr,
            watchdog: Duration::from_millis(self.watchdog_ms),
            inotify: !self.no_inotify,
            v2_throttle: self.v2_throttle,
            flags_file: self.flags_file.clone(),
        })
    }
}

impl RunArgs {
    /// The command line (`self`, parsed once by the binary's clap tree) with the flags file
    /// it names laid over it, validated: what the agent starts with and what SIGHUP reloads.
    pub fn config(&self, hostname: &str) -> Result<Config, ConfigError> {
        self.with_flags_file()?.validate(hostname)
    }

    /// `run`'s flags from `words` (what follows `run`) and, when they name a `--flags-file`,
    /// that file's flags over them. For callers without the binary's clap tree (tests).
    pub fn load<T: Into<OsString> + Clone>(words: &[T]) -> Result<RunArgs, ConfigError> {
        let (run, _) = parse_words(words.iter().cloned()).map_err(ConfigError::Args)?;
        run.with_flags_file()
    }

    /// `self` with the flags its `--flags-file` names laid over it (the file wins); `self`
    /// unchanged without one. Only flags written in the file count: its defaults and the
    /// environment do not undo the command line.
    pub fn with_flags_file(&self) -> Result<RunArgs, ConfigError> {
        let Some(path) = &self.flags_file else {
            return Ok(self.clone());
        };
        let err = |error: String| ConfigError::FlagsFile {
            path: path.display().to_string(),
            error,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let (file, matches) = parse_words(flags_file_tokens(&text)).map_err(err)?;
        let written = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        if written("flags_file") {
            return Err(err("may not name another --flags-file".into()));
        }
        let mut run = self.clone();
        overlay(&mut run, file, written);
        Ok(run)
    }
}

/// `words` parsed as `run`'s flags alone (no program or subcommand name); a repeated flag
/// takes its last value, as on the command line.
fn parse_words<T: Into<OsString> + Clone>(
    words: impl IntoIterator<Item = T>,
) -> Result<(RunArgs, ArgMatches), String> {
    let command = RunArgs::augment_args(
        clap::Command::new("run")
            .no_binary_name(true)
            .args_override_self(true),
    );
    let matches = command
        .try_get_matches_from(words)
        .map_err(|e| clap_error_line(&e))?;
    let run = RunArgs::from_arg_matches(&matches).map_err(|e| clap_error_line(&e))?;
    Ok((run, matches))
}

/// Lays the fields `written` names (clap ids: the field names) over `base`, and lists them
/// so a test can check that every flag is here.
macro_rules! run_flags {
    ($($field:ident),* $(,)?) => {
        #[cfg(test)]
        const RUN_FLAGS: &[&str] = &[$(stringify!($field)),*];

        fn overlay(base: &mut RunArgs, file: RunArgs, written: impl Fn(&str) -> bool) {
            $(if written(stringify!($field)) {
                base.$field = file.$field;
            })*
        }
    };
}

run_flags!(
    root,
    policy,
    margin_ratio,
    min_margin,
    max_margin,
    cache_skip_ratio,
    mode,
    walk_interval,
    guard_ms,
    cooldown_ms,
    kill_timeout_ms,
    reclaim_timeout_ms,
    reclaim_interval_ms,
    rt_priority,
    log_format,
    node_name,
    docker_containerd_sock,
    containerd_sock,
    docker_root,
    bpf_pin_dir,
    kubeconfig,
    state_dir,
    metrics_addr,
    watchdog_ms,
    no_inotify,
    v2_throttle,
    flags_file,
);

/// A clap error as one line: its first paragraph (what is wrong, and the missing arguments
/// or possible values clap lists under it), without the `error: ` prefix, tips and usage.
pub fn clap_error_line(error: &clap::Error) -> String {
    let text = error.render().to_string();
    let line = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    match line.strip_prefix("error: ").unwrap_or(&line) {
        "" => "invalid arguments".to_string(),
        line => line.to_string(),
    }
}

/// The flags in a flags file: whitespace-separated words, `#` to the end of the line is a
/// comment. (No quoting: a value cannot contain spaces.)
pub fn flags_file_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_once('#').map_or(l, |(before, _)| before))
        .flat_map(str::split_whitespace)
        .map(str::to_string)
        .collect()
}

impl Config {
    /// The flags a reload cannot change (they are bound at start), among those `new`
    /// changes. Empty: `new` may replace `self`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |flag, differs: bool| {
            if differs {
                changed.push(flag);
            }
        };
        check("--root", self.root.path != new.root.path);
        check("--mode", self.mode != new.mode);
        check("--rt-priority", self.rt_priority != new.rt_priority);
        check("--log-format", self.log_format != new.log_format);
        check("--node-name", self.node_name != new.node_name);
        check(
            "--docker-containerd-sock",
            self.docker_containerd_sock != new.docker_containerd_sock,
        );
        check(
            "--containerd-sock",
            self.containerd_sock != new.containerd_sock,
        );
        check("--docker-root", self.docker_root != new.docker_root);
        check("--bpf-pin-dir", self.bpf_pin_dir != new.bpf_pin_dir);
        check("--kubeconfig", self.kubeconfig != new.kubeconfig);
        check("--state-dir", self.state_dir != new.state_dir);
        check("--metrics-addr", self.metrics_addr != new.metrics_addr);
        check("--watchdog-ms", self.watchdog != new.watchdog);
        check(
            "--reclaim-timeout-ms",
            self.reclaim_timeout != new.reclaim_timeout,
        );
        check("--no-inotify", self.inotify != new.inotify);
        check("--v2-throttle", self.v2_throttle != new.v2_throttle);
        check("--flags-file", self.flags_file != new.flags_file);
        changed
    }

    /// What a reload changes, for its log line (`flag: old -> new`).
    pub fn reload_summary(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |flag: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{flag}: {a} -> {b}"));
            }
        };
        diff(
            "--policy",
            self.policy.as_str().into(),
            new.policy.as_str().into(),
        );
        diff(
            "--margin-ratio",
            self.margins.ratio.to_string(),
            new.margins.ratio.to_string(),
        );
        diff(
            "--min-margin",
            self.margins.min.to_string(),
            new.margins.min.to_string(),
        );
        diff(
            "--max-margin",
            self.margins.max.to_string(),
            new.margins.max.to_string(),
        );
        diff(
            "--cache-skip-ratio",
            self.cache_skip_ratio.to_string(),
            new.cache_skip_ratio.to_string(),
        );
        for (flag, a, b) in [
            ("--walk-interval", self.walk_interval, new.walk_interval),
            ("--guard-ms", self.guard_interval, new.guard_interval),
            ("--cooldown-ms", self.cooldown, new.cooldown),
            ("--kill-timeout-ms", self.kill_timeout, new.kill_timeout),
            (
                "--reclaim-interval-ms",
                self.reclaim_interval,
                new.reclaim_interval,
            ),
        ] {
            diff(flag, format!("{a:?}"), format!("{b:?}"));
        }
        out
    }
}

/// `--metrics-addr`: `HOST:PORT`, `[V6]:PORT` or `:PORT`; unset, empty or port 0 is off.
/// `--root` as given, or its default, checked to be a directory of a memory hierarchy.
fn resolve_root(
    given: Option<&std::path::Path>,
    layout: &Layout,
) -> Result<MemCgroup, ConfigError> {
    let node = || node_summary(layout);
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => layout
            .default_root()
            .ok_or_else(|| ConfigError::NoHierarchy(node()))?
            .to_path_buf(),
    };
    let root = MemCgroup::new(&path);
    let why = match root.version {
        // Any v1 memory directory, the hierarchy's root included, has a limit file.
        Version::V1 => root
            .limit()
            .err()
            .map(|_| "no readable memory.limit_in_bytes".to_string()),
        // A v2 directory has memory files only where the memory controller is enabled:
        // `cgroup.controllers` lists it (the cgroup2 root lists every controller).
        Version::V2 => match std::fs::read_to_string(path.join("cgroup.controllers")) {
            Ok(c) if c.split_whitespace().any(|c| c == "memory") => None,
            Ok(_) => Some("cgroup2 without the memory controller in cgroup.controllers".into()),
            Err(e) => Some(format!("cannot read cgroup.controllers: {e}")),
        },
    };
    match why {
        None => Ok(root),
        Some(why) => Err(ConfigError::Root {
            root: path.display().to_string(),
            why,
            node: node(),
        }),
    }
}

fn parse_metrics_addr(v: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let full = match v.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => v.to_string(),
    };
    let addr: std::net::SocketAddr = full
        .parse()
        .map_err(|_| ConfigError::MetricsAddr(v.to_string()))?;
    Ok((addr.port() != 0).then_some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(words: &[&str]) -> RunArgs {
        parse_words(words).unwrap().0
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut words = vec!["--root", "/proc/self"];
        words.extend_from_slice(args);
        let run = run_args(&words);
        // /proc/self has no memory.limit_in_bytes: validation of everything before the
        // root check is what these tests pin down.
        run.validate("host")
    }

    #[test]
    fn defaults_are_upstream() {
        let run = run_args(&[]);
        assert_eq!(run.root, None, "resolved from mountinfo at validation");
        assert_eq!(run.policy, Policy::Container);
        assert_eq!(run.margin_ratio, 0.02);
        assert_eq!(run.min_margin, Size(1 << 20));
        assert_eq!(run.max_margin, Size(50 << 20));
        assert_eq!(run.mode, Mode::Auto);
        assert_eq!(
            run.docker_containerd_sock,
            PathBuf::from("/run/docker/containerd/docker-containerd.sock")
        );
        assert_eq!(
            run.containerd_sock,
            PathBuf::from("/run/containerd/containerd.sock")
        );
    }

    #[test]
    fn upstream_bare_numbers_are_mib() {
        let run = run_args(&["--min-margin=1", "--max-margin=30"]);
        assert_eq!(run.max_margin, Size(30 << 20));
    }

    #[test]
    fn bad_values_are_refused() {
        assert_eq!(
            parse(&["--margin-ratio", "0"]).unwrap_err(),
            ConfigError::MarginRatio(0.0)
        );
        assert_eq!(
            parse(&["--margin-ratio", "1"]).unwrap_err(),
            ConfigError::MarginRatio(1.0)
        );
        assert!(matches!(
            parse(&["--min-margin", "60M"]).unwrap_err(),
            ConfigError::MinAboveMax { .. }
        ));
        assert!(matches!(
            parse(&["--min-margin", "1B"]).unwrap_err(),
            ConfigError::MinTooSmall(_)
        ));
        assert_eq!(
            parse(&["--guard-ms", "0"]).unwrap_err(),
            ConfigError::Zero { flag: "guard-ms" }
        );
        assert_eq!(
            parse(&["--rt-priority", "100"]).unwrap_err(),
            ConfigError::RtPriority(100)
        );
        assert_eq!(
            parse(&["--cache-skip-ratio", "1.5"]).unwrap_err(),
            ConfigError::CacheRatio(1.5)
        );
        assert!(matches!(parse(&[]).unwrap_err(), ConfigError::Root { .. }));
        assert_eq!(
            parse(&["--metrics-addr", "localhost"]).unwrap_err(),
            ConfigError::MetricsAddr("localhost".into())
        );
        assert_eq!(
            parse(&["--metrics-addr", ":99999"]).unwrap_err(),
            ConfigError::MetricsAddr(":99999".into())
        );
        assert_eq!(
            parse(&["--watchdog-ms", "0"]).unwrap_err(),
            ConfigError::Zero {
                flag: "watchdog-ms"
            }
        );
    }

    #[test]
    fn root_defaults_to_the_memory_mount_of_the_layout() {
        let none = Layout::parse("22 1 0:20 / /sys rw - sysfs sysfs rw\n");
        let e = resolve_root(None, &none).unwrap_err();
        assert!(matches!(e, ConfigError::NoHierarchy(_)), "{e}");
        assert!(e.to_string().contains("cgroup layout none, kernel "), "{e}");
        // A directory that is no cgroup at all names the layout found.
        let v2 = Layout::parse("35 22 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let e = resolve_root(Some(std::path::Path::new("/proc/self")), &v2).unwrap_err();
        assert!(
            e.to_string()
                .contains("cgroup layout v2 (cgroup2 at /sys/fs/cgroup)"),
            "{e}"
        );
    }

    #[test]
    fn flags_file_words_and_comments() {
        let text = "# policy for this node\n--policy=noop   --cooldown-ms 5 # short\n\n  --margin-ratio=0.1\n";
        assert_eq!(
            flags_file_tokens(text),
            ["--policy=noop", "--cooldown-ms", "5", "--margin-ratio=0.1"]
        );
    }

    #[test]
    fn the_flags_file_wins_and_bad_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("oomguard-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("flags");
        let args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
            let mut v: Vec<std::ffi::OsString> = vec!["--policy".into(), "process".into()];
            v.push("--flags-file".into());
            v.push(file.clone().into());
            v.extend(extra.iter().map(std::ffi::OsString::from));
            v
        };
        std::fs::write(&file, "--policy=noop\n--cooldown-ms 7\n").unwrap();
        let run = RunArgs::load(&args(&[])).unwrap();
        assert_eq!(run.policy, Policy::Noop);
        assert_eq!(run.cooldown_ms, 7);
        std::fs::write(&file, "--policy=reboot\n").unwrap();
        let e = RunArgs::load(&args(&[])).unwrap_err().to_string();
        assert!(
            e.starts_with("--flags-file ") && e.contains("reboot"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        std::fs::write(&file, "--flags-file /etc/other\n").unwrap();
        assert!(RunArgs::load(&args(&[])).is_err());
        std::fs::remove_file(&file).unwrap();
        let e = RunArgs::load(&args(&[])).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_addr_forms() {
        assert_eq!(parse_metrics_addr(None), Ok(None));
        assert_eq!(parse_metrics_addr(Some("")), Ok(None));
        assert_eq!(parse_metrics_addr(Some(":0")), Ok(None));
        assert_eq!(parse_metrics_addr(Some("127.0.0.1:0")), Ok(None));
        assert_eq!(
            parse_metrics_addr(Some(":9102")),
            Ok(Some("0.0.0.0:9102".parse().unwrap()))
        );
        assert_eq!(
            parse_metrics_addr(Some("[::1]:9102")),
            Ok(Some("[::1]:9102".parse().unwrap()))
        );
    }

    #[test]
    fn unknown_policy_is_a_parse_error() {
        let e = parse_words(["--policy", "reboot"]).unwrap_err();
        assert!(e.contains("reboot") && !e.starts_with("error:"), "{e}");
        assert!(
            e.contains("[possible values: container, process, noop]"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn every_flag_can_come_from_the_flags_file() {
        let command = RunArgs::augment_args(clap::Command::new("run"));
        let ids: Vec<&str> = command
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .collect();
        for id in &ids {
            assert!(RUN_FLAGS.contains(id), "{id} is missing from run_flags!");
        }
        assert_eq!(ids.len(), RUN_FLAGS.len());
    }

    #[test]
    fn the_flags_file_changes_only_what_it_writes() {
        let dir = std::env::temp_dir().join(format!("oomguard-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("flags");
        std::fs::write(&file, "--cooldown-ms 7\n").unwrap();
        let mut words = vec![
            "--policy",
            "process",
            "--no-inotify",
            "--node-name",
            "from-the-command-line",
            "--flags-file",
        ];
        words.push(file.to_str().unwrap());
        let cmdline = run_args(&words);
        let run = cmdline.with_flags_file().unwrap();
        assert_eq!(run.cooldown_ms, 7);
        assert_eq!(run.policy, Policy::Process, "file defaults do not win");
        assert!(run.no_inotify, "an unset switch in the file is not false");
        assert_eq!(run.node_name.as_deref(), Some("from-the-command-line"));
        assert_eq!(
            cmdline.cooldown_ms, 1000,
            "the command line is kept for reloads"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
