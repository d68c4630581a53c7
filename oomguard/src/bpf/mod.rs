//! The eBPF half of the guard: loading and attaching the programs built from `oomguard-ebpf`,
//! and the maps and ring buffer they share with user space.
//!
//! - Crossings: a guarded cgroup's usage crossed its reclaim or kill threshold, seen at the
//!   charge that did it; one record per crossing. `raw_tp/count_memcg_events` (every v1 charge;
//!   the tracepoint exists from about 6.13) where it can load on a v1 memory hierarchy, else
//!   `raw_tp/rss_stat` (5.5+, v1 and v2: the page faults that charge).
//! - At the limit (`vmscan:mm_vmscan_memcg_reclaim_begin`): a task of a guarded cgroup entered
//!   reclaim with the cgroup at its limit.
//! - Task scores (`rss_stat`, `sched_process_fork`/`exit`, `oom_score_adj_update`): the `TASKS`
//!   map of what `oom_badness` needs per process, so the process policy reads no `/proc`.
//! - Kernel OOMs (`oom:mark_victim`) and discovery (`cgroup:cgroup_mkdir`/`rmdir`).
//!
//! Programs degrade one by one: [`capabilities`] checks each against this kernel (its
//! tracepoint in BTF, the tracepoint's arguments, the struct layout it reads) and
//! [`EbpfGuard::load`] attaches every one that can, saying for each missing one what is lost.
//!
//! Everything is synchronous: [`EbpfGuard::ring_fd`] goes into the guard thread's epoll set and
//! [`EbpfGuard::drain`] reads what is pending without blocking. Kernel struct offsets and enum
//! values come from BTF ([`offsets`]), tracepoint record offsets from tracefs ([`tracefs`]).

pub mod btf;
pub mod mount;
pub mod offsets;
pub mod on_demand;
pub mod records;
pub mod sys;
pub mod tasks;
pub mod tracefs;

use std::{
    fs, io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, RingBuf},
    pin::PinError,
    programs::{ProgramError, RawTracePoint, TracePoint},
};
pub use oomguard_common::TaskScore;
use oomguard_common::Thresholds;

pub use self::records::{CgroupDir, Record, Threshold};
use self::{
    btf::{Btf, BtfError},
    offsets::{Layout, Part},
    sys::BPF_NOEXIST,
};

/// The eBPF object built by `build.rs`; empty when the build ran with `AYA_BUILD_SKIP=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oomguard-ebpf"));

/// Default `--bpf-pin-dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/oomguard";

const OFFSETS_GLOBAL: &str = "OFFSETS";
const THRESHOLDS_MAP: &str = "THRESHOLDS";
const TASKS_MAP: &str = "TASKS";
const EVENTS_MAP: &str = "EVENTS";
const GENERATION_MAP: &str = "GENERATION";
const RSS_ROLES_MAP: &str = "RSS_ROLES";
/// Test-only: a comma-separated list of tracepoint names to treat as absent from the kernel,
/// to exercise the per-program degradation on a kernel that has them all.
pub const HIDE_HOOKS_ENV: &str = "OOMGUARD_TEST_HIDE_HOOKS";
/// Maps pinned under the pin directory, by these names.
pub const PINNED_MAPS: [&str; 3] = [THRESHOLDS_MAP, TASKS_MAP, EVENTS_MAP];

/// Where a program attaches.
#[derive(Debug, Clone, Copy)]
enum Hook {
    /// A raw tracepoint: the `TP_PROTO` arguments, no tracefs needed.
    Raw(&'static str),
    /// A tracefs tracepoint `category:name`: the record.
    TracePoint(&'static str, &'static str),
}

impl Hook {
    /// The tracepoint's name, as in `btf_trace_<name>`.
    fn name(self) -> &'static str {
        match self {
            Hook::Raw(name) | Hook::TracePoint(_, name) => name,
        }
    }
}

/// What a program gives the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Threshold crossings (the one thing `--mode ebpf` requires).
    Crossing,
    AtLimit,
    /// The `TASKS` score map: the process policy reads /proc unless all of these run.
    Scores,
    KernelOom,
    Discovery,
}

/// One program of the object and what it needs of the kernel.
#[derive(Debug)]
struct Program {
    /// What the agent calls it (logs, `doctor`).
    name: &'static str,
    /// The function in the object: `rss_stat` does two programs' jobs, so that its
    /// tracepoint runs one program per event (see `rss_stat_roles`).
    object: &'static str,
    hook: Hook,
    /// The tracepoint arguments the program reads, after `void *`, as BTF spells them: a
    /// kernel whose prototype starts otherwise is not attached to.
    args: &'static [&'static str],
    parts: &'static [Part],
    role: Role,
    /// What the agent does without it.
    lost: &'static str,
}

/// Every program the agent has. Which crossing program runs is chosen in
/// [`program_checks`].
const PROGRAMS: [Program; 10] = [
    Program {
        name: "rss_pressure",
        object: "rss_stat",
        hook: Hook::Raw("rss_stat"),
        args: &["struct mm_struct *", "int"],
        parts: &[Part::Memcg],
        role: Role::Crossing,
        lost: "no eBPF crossing records: thresholds are signalled by eventfd (v1) or the fallback (v2) only",
    },
    Program {
        name: "memcg_pressure",
        object: "memcg_pressure",
        hook: Hook::Raw("count_memcg_events"),
        args: &["struct mem_cgroup *", "int"],
        parts: &[Part::Memcg, Part::Pgpg],
        role: Role::Crossing,
        lost: "crossings of page cache and kernel memory charges come from the eventfd only",
    },
    Program {
        name: "at_limit",
        object: "at_limit",
        hook: Hook::TracePoint("vmscan", "mm_vmscan_memcg_reclaim_begin"),
        args: &[],
        parts: &[Part::Task, Part::Memcg],
        role: Role::AtLimit,
        lost: "no at-limit records: a cgroup in reclaim at its limit is seen at its next crossing",
    },
    Program {
        name: "rss_stat",
        object: "rss_stat",
        hook: Hook::Raw("rss_stat"),
        args: &["struct mm_struct *", "int"],
        parts: &[Part::Task, Part::Scores],
        role: Role::Scores,
        lost: "no eBPF task scores: the process policy reads /proc",
    },
    Program {
        name: "sched_process_fork",
        object: "sched_process_fork",
        hook: Hook::Raw("sched_process_fork"),
        args: &["struct task_struct *", "struct task_struct *"],
        parts: &[Part::Task, Part::Scores],
        role: Role::Scores,
        lost: "no eBPF task scores: the process policy reads /proc",
    },
    Program {
        name: "sched_process_exit",
        object: "sched_process_exit",
        hook: Hook::Raw("sched_process_exit"),
        args: &["struct task_struct *"],
        parts: &[Part::Task, Part::Scores],
        role: Role::Scores,
        lost: "no eBPF task scores: the process policy reads /proc",
    },
    Program {
        name: "oom_score_adj_update",
        object: "oom_score_adj_update",
        hook: Hook::Raw("oom_score_adj_update"),
        args: &["struct task_struct *"],
        parts: &[Part::Task, Part::Scores],
        role: Role::Scores,
        lost: "no eBPF task scores: the process policy reads /proc",
    },
    Program {
        name: "mark_victim",
        object: "mark_victim",
        hook: Hook::Raw("mark_victim"),
        args: &["struct task_struct *"],
        parts: &[Part::Task, Part::Memcg, Part::Scores],
        role: Role::KernelOom,
        lost: "kernel OOM kills are seen through memory.oom_control (v1) or memory.events (v2) only",
    },
    Program {
        name: "cgroup_mkdir",
        object: "cgroup_mkdir",
        hook: Hook::TracePoint("cgroup", "cgroup_mkdir"),
        args: &[],
        parts: &[Part::CgroupRecord],
        role: Role::Discovery,
        lost: "new cgroups are found by inotify and the periodic walk only",
    },
    Program {
        name: "cgroup_rmdir",
        object: "cgroup_rmdir",
        hook: Hook::TracePoint("cgroup", "cgroup_rmdir"),
        args: &[],
        parts: &[Part::CgroupRecord],
        role: Role::Discovery,
        lost: "removed cgroups are found by inotify and the periodic walk only",
    },
];

/// Errors of loading, attaching and using the eBPF programs and maps.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {fstype} at {path}")]
    Mount {
        path: PathBuf,
        fstype: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no field `{field}` in tracepoint format {path}")]
    FieldMissing { path: PathBuf, field: &'static str },
    #[error("field `{field}` in {path} is {size} bytes, expected {expected}")]
    FieldSize {
        path: PathBuf,
        field: &'static str,
        size: u32,
        expected: u32,
    },
    #[error("kernel BTF ({})", offsets::VMLINUX_BTF)]
    Btf(#[source] BtfError),
    #[error("the memory controller is not enabled (/proc/cgroups)")]
    NoMemoryHierarchy,
    #[error("no eBPF crossing signal can load here: {0}")]
    NoCrossing(String),
    #[error("eBPF map {map} is full ({max} entries)")]
    Full { map: &'static str, max: u32 },
    #[error("the eBPF object is empty: oomguard was built with AYA_BUILD_SKIP set")]
    ObjectMissing,
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {program} is not in the object")]
    ProgramMissing { program: &'static str },
    #[error("eBPF program {program} ({hook})")]
    Program {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {map} is not in the object")]
    MapMissing { map: &'static str },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning eBPF map at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("{what} {path}")]
    PinDir {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} in eBPF map {map}")]
    Syscall {
        what: &'static str,
        map: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One probed feature: what, and what is wrong with it (`None`: present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub feature: String,
    pub problem: Option<String>,
}

/// Whether one program can run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramCheck {
    pub program: &'static str,
    /// The tracepoint it attaches to.
    pub hook: &'static str,
    pub role: Role,
    /// Why it cannot load here; `None`: it can.
    pub problem: Option<String>,
    /// Usable, but another program does its job here (the crossing programs).
    pub standby: Option<String>,
    /// Loaded, and attached only while a guarded cgroup is near its thresholds (the charge
    /// program on v1: see [`on_demand`]).
    pub on_demand: bool,
    /// What the agent does without it.
    pub lost: &'static str,
}

impl ProgramCheck {
    /// Whether it is to be attached: it can load and nothing else does its job.
    pub fn wanted(&self) -> bool {
        self.problem.is_none() && self.standby.is_none()
    }

    /// The line the start-up log and `doctor` give a program that is not attached.
    pub fn missing_line(&self) -> Option<String> {
        let problem = self.problem.as_ref()?;
        Some(format!(
            "eBPF program {} ({}) not loaded: {problem}; {}",
            self.program, self.hook, self.lost
        ))
    }
}

/// What the kernel offers the eBPF mode, from [`capabilities`]: the common needs (object,
/// `bpf()`, BTF) and each program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub checks: Vec<Check>,
    pub programs: Vec<ProgramCheck>,
}

impl Capabilities {
    /// Whether `--mode ebpf` can run: the common needs and a crossing program.
    pub fn usable(&self) -> bool {
        self.reason().is_none()
    }

    /// Whether the common needs are there (some program may load).
    pub fn loadable(&self) -> bool {
        self.checks.iter().all(|c| c.problem.is_none())
    }

    /// One line naming what keeps `--mode ebpf` from running; `None` when
    /// [`Capabilities::usable`].
    pub fn reason(&self) -> Option<String> {
        let mut missing: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| Some(format!("{}: {}", c.feature, c.problem.as_ref()?)))
            .collect();
        if missing.is_empty()
            && !self
                .programs
                .iter()
                .any(|p| p.role == Role::Crossing && p.wanted())
        {
            let why: Vec<String> = self
                .programs
                .iter()
                .filter(|p| p.role == Role::Crossing)
                .filter_map(|p| Some(format!("{} ({})", p.problem.as_ref()?, p.program)))
                .collect();
            missing.push(format!("no crossing signal: {}", why.join("; ")));
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// One line per program that cannot load here, with what is lost.
    pub fn missing_programs(&self) -> Vec<String> {
        self.programs
            .iter()
            .filter_map(ProgramCheck::missing_line)
            .collect()
    }
}

/// Tracepoints named in [`HIDE_HOOKS_ENV`].
fn hidden_hooks() -> Vec<String> {
    std::env::var(HIDE_HOOKS_ENV)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect()
}

/// Why tracepoint `hook` cannot be read as `args` (its first arguments after `void *`, as BTF
/// spells them): absent, or another prototype.
fn prototype_problem(btf: &Btf, hook: &str, args: &[&str]) -> Option<String> {
    match btf.tracepoint_args(hook) {
        None => Some(format!("tracepoint {hook} not in this kernel")),
        Some(found) if found.len() < args.len() || found.iter().zip(args).any(|(f, a)| f != a) => {
            Some(format!(
                "tracepoint {hook} takes ({}), the program reads ({})",
                found.join(", "),
                args.join(", ")
            ))
        }
        Some(_) => None,
    }
}

/// Whether one program can run, given the kernel's BTF and layout.
fn program_check(
    program: &Program,
    btf: &Btf,
    layout: &Layout,
    tracefs: Option<&Path>,
    hidden: &[String],
) -> ProgramCheck {
    let hook = program.hook.name();
    let problem = if hidden.iter().any(|h| h == hook) {
        Some(format!(
            "tracepoint {hook} not in this kernel ({HIDE_HOOKS_ENV})"
        ))
    } else {
        prototype_problem(btf, hook, program.args)
    };
    let problem = problem
        .or_else(|| match (program.hook, tracefs) {
            (Hook::TracePoint(category, name), Some(tracefs))
                if !tracefs.join("events").join(category).join(name).is_dir() =>
            {
                Some(format!("no tracefs event {category}/{name}"))
            }
            (Hook::TracePoint(..), None) => tracefs_problem(),
            _ => None,
        })
        .or_else(|| {
            program
                .parts
                .iter()
                .find_map(|&part| Some(format!("{}: {}", part.name(), layout.problem(part)?)))
        });
    ProgramCheck {
        program: program.name,
        hook,
        role: program.role,
        problem,
        standby: None,
        on_demand: false,
        lost: program.lost,
    }
}

/// Checks every program against this kernel, and picks the crossing program: `rss_pressure`
/// where it can load (about 70 ns per faulted page), else `memcg_pressure`. On a v1 memory
/// hierarchy, `memcg_pressure` joins it on demand where it can load: it sees every charge at
/// the charge itself, so its record comes no later than the v1 threshold eventfd (the
/// `rss_stat` one can be a few microseconds behind), but costs about 360 ns per faulted page
/// on the whole node, so it is attached only while a guarded cgroup is near its thresholds
/// ([`on_demand`]).
fn program_checks(btf: &Btf, layout: &Layout, tracefs: Option<&Path>) -> Vec<ProgramCheck> {
    let hidden = hidden_hooks();
    let mut checks: Vec<ProgramCheck> = PROGRAMS
        .iter()
        .map(|p| program_check(p, btf, layout, tracefs, &hidden))
        .collect();
    let on_v2 = memory_on_v2();
    let preference = crossing_preference();
    let mut chosen: Option<&'static str> = None;
    for name in preference {
        let Some(check) = checks.iter_mut().find(|c| c.program == name) else {
            continue;
        };
        if check.problem.is_some() {
            continue;
        }
        if check.program == "memcg_pressure" && on_v2 {
            check.standby =
                Some("it counts v1 charges (PGPGIN); the memory controller is on cgroup v2".into());
        } else if let Some(other) = chosen {
            check.standby = Some(format!("{other} gives the crossings here"));
        } else {
            chosen = Some(check.program);
        }
    }
    if !on_v2
        && chosen == Some("rss_pressure")
        && let Some(charge) = checks
            .iter_mut()
            .find(|c| c.program == "memcg_pressure" && c.problem.is_none())
    {
        charge.standby = None;
        charge.on_demand = true;
    }
    checks
}

/// Whether the memory controller is on cgroup v2 (`/proc/cgroups` hierarchy 0).
fn memory_on_v2() -> bool {
    fs::read_to_string("/proc/cgroups")
        .ok()
        .and_then(|t| offsets::memory_hierarchy_id(&t))
        == Some(0)
}

/// The crossing programs, preferred first (see [`program_checks`]).
fn crossing_preference() -> [&'static str; 2] {
    ["rss_pressure", "memcg_pressure"]
}

/// Probes, without changing anything, what [`EbpfGuard::load`] needs: the eBPF object,
/// `bpf()` with ring buffers and kernel BTF in common, and for each program its tracepoint,
/// the tracepoint's arguments and the layout it reads.
pub fn capabilities() -> Capabilities {
    let mut checks = Vec::new();
    let mut check = |feature: &str, problem: Option<String>| {
        checks.push(Check {
            feature: feature.to_string(),
            problem,
        });
    };
    check(
        "eBPF object",
        EBPF_OBJECT
            .is_empty()
            .then(|| "not built in (AYA_BUILD_SKIP was set)".to_string()),
    );
    check(
        "bpf() with ring buffers",
        sys::probe_ring_buffer()
            .err()
            .map(|err| match err.raw_os_error() {
                Some(libc::ENOSYS) => format!("no bpf() system call ({err})"),
                Some(libc::EPERM) => format!("bpf() not permitted ({err})"),
                Some(libc::EINVAL) => format!("no ring buffer maps, kernel older than 5.8 ({err})"),
                _ => err.to_string(),
            }),
    );
    let mut programs = Vec::new();
    match offsets::vmlinux_btf() {
        Ok(btf) => {
            check("kernel BTF", None);
            let tracefs = tracefs::tracefs_mounted().ok().flatten();
            let mut layout = offsets::compute(&btf, tracefs.as_deref());
            if tracefs.is_none() && tracefs_problem().is_none() {
                // Loading mounts it and reads the record layout then.
                layout
                    .problems
                    .retain(|(part, _)| *part != Part::CgroupRecord);
            }
            programs = program_checks(&btf, &layout, tracefs.as_deref());
        }
        Err(err) => check("kernel BTF", Some(error_chain(&err))),
    }
    Capabilities { checks, programs }
}

fn tracefs_problem() -> Option<String> {
    match tracefs::tracefs_mounted() {
        Ok(Some(_)) => None,
        Ok(None) => {
            let known = fs::read_to_string("/proc/filesystems")
                .is_ok_and(|text| text.lines().any(|l| l.ends_with("\ttracefs")));
            if !known {
                Some("not mounted, and the kernel has no tracefs".into())
            } else if !Path::new("/sys/kernel/tracing").is_dir() {
                Some("not mounted, and /sys/kernel/tracing is missing".into())
            } else {
                None
            }
        }
        Err(err) => Some(error_chain(&err)),
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of the records' `ktime_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The loaded and attached programs, their maps (pinned), and the ring buffer.
///
/// Dropping it detaches the programs; the pins (and so the maps) stay until
/// [`EbpfGuard::unpin`].
pub struct EbpfGuard {
    events: RingBuf<MapData>,
    thresholds: OwnedFd,
    tasks: OwnedFd,
    /// `GENERATION[0]`, bumped after every change to the thresholds (the programs cache which
    /// cgroups are guarded), and the last value written.
    generation: OwnedFd,
    generation_value: std::sync::atomic::AtomicU64,
    /// Every program and whether it runs (`wanted()`: attached).
    programs: Vec<ProgramCheck>,
    pin_dir: PathBuf,
    /// The programs' aya-log records (a dropped record, say), passed to `log`, which the
    /// agent's tracing subscriber receives.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The charge program where it is attached on demand.
    charge_hook: Option<on_demand::ChargeHook>,
    // Owns the programs and their attachments.
    ebpf: Ebpf,
}

impl EbpfGuard {
    /// Mounts tracefs and bpffs where missing, computes the kernel layout, loads and attaches
    /// every program that can run here (logging one line for each that cannot, with what is
    /// lost), and pins the maps under `pin_dir` (made if missing; stale pins of an earlier run
    /// are replaced). Fails only when nothing can load (no object, no `bpf()`, no BTF, no ring
    /// buffer); whether a crossing program runs is [`EbpfGuard::has_crossing`]. Needs root
    /// (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN to mount).
    pub fn load(pin_dir: &Path) -> Result<EbpfGuard, BpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::ObjectMissing);
        }
        // bpffs first: without it nothing is pinned and the agent falls back as a whole, so
        // no per-program line should come before that one warning.
        mount::ensure_bpffs()?;
        let tracefs = tracefs::ensure_tracefs()
            .inspect_err(|e| {
                tracing::warn!(error = %error_chain(e), "no tracefs: the programs on tracefs tracepoints will not load");
            })
            .ok();
        let btf = offsets::vmlinux_btf()?;
        let mut layout = offsets::compute(&btf, tracefs.as_deref());
        let mut programs = program_checks(&btf, &layout, tracefs.as_deref());
        drop(btf);
        if programs.iter().any(|p| p.on_demand) {
            layout.offsets.approach_bytes = on_demand::APPROACH_BYTES;
        }
        let tasks_max = tasks_map_size();

        let mut ebpf = EbpfLoader::new()
            .override_global(OFFSETS_GLOBAL, &layout.offsets, true)
            .map_max_entries(TASKS_MAP, tasks_max)
            .load(EBPF_OBJECT)
            .map_err(BpfError::Load)?;
        attach_all(&mut ebpf, &mut programs);
        let roles = map_fd(&ebpf, RSS_ROLES_MAP)?;
        sys::update(
            roles.as_fd(),
            &0u32,
            &rss_stat_roles(&programs),
            sys::BPF_ANY,
        )
        .map_err(|source| BpfError::Syscall {
            what: "setting the rss_stat roles",
            map: RSS_ROLES_MAP,
            source,
        })?;
        for line in programs.iter().filter_map(ProgramCheck::missing_line) {
            tracing::warn!("{line}");
        }
        let attached: Vec<&'static str> = programs
            .iter()
            .filter(|p| p.wanted())
            .map(|p| p.program)
            .collect();

        fs::create_dir_all(pin_dir).map_err(|source| BpfError::PinDir {
            what: "making",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed a stale pin"),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BpfError::PinDir {
                        what: "removing the stale pin",
                        path,
                        source,
                    });
                }
            }
            let map = ebpf.map(name).ok_or(BpfError::MapMissing { map: name })?;
            map.pin(&path)
                .map_err(|source| BpfError::Pin { path, source })?;
        }

        let thresholds = map_fd(&ebpf, THRESHOLDS_MAP)?;
        let tasks = map_fd(&ebpf, TASKS_MAP)?;
        let events = ebpf
            .take_map(EVENTS_MAP)
            .ok_or(BpfError::MapMissing { map: EVENTS_MAP })?;
        let events = RingBuf::try_from(events).map_err(|source| BpfError::Map {
            map: EVENTS_MAP,
            source,
        })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "the eBPF programs' log records will not be read");
                None
            }
        };
        let generation = map_fd(&ebpf, GENERATION_MAP)?;
        let charge_hook = charge_hook(&ebpf, &programs, &thresholds)?;
        let on_demand: Vec<&'static str> = programs
            .iter()
            .filter(|p| p.wanted() && p.on_demand)
            .map(|p| p.program)
            .collect();
        tracing::info!(
            programs = %attached.join(","),
            on_demand = %on_demand.join(","),
            tasks_map_entries = tasks_max,
            pin_dir = %pin_dir.display(),
            "eBPF programs attached"
        );
        Ok(EbpfGuard {
            events,
            thresholds,
            tasks,
            generation,
            generation_value: std::sync::atomic::AtomicU64::new(0),
            programs,
            pin_dir: pin_dir.to_path_buf(),
            logger,
            charge_hook,
            ebpf,
        })
    }

    /// Guards the memcg `cgroup_id` (its directory's inode number) with these thresholds in
    /// bytes (0 disables one). Re-arms both: a cgroup already above gets a record at its next
    /// charge.
    pub fn set_thresholds(&self, cgroup_id: u64, reclaim: u64, kill: u64) -> Result<(), BpfError> {
        let value = Thresholds {
            reclaim_bytes: reclaim,
            kill_bytes: kill,
            ..Thresholds::default()
        };
        let set = sys::update(self.thresholds.as_fd(), &cgroup_id, &value, sys::BPF_ANY).map_err(
            |source| match source.raw_os_error() {
                Some(libc::E2BIG) => BpfError::Full {
                    map: THRESHOLDS_MAP,
                    max: oomguard_common::THRESHOLDS_MAX_ENTRIES,
                },
                _ => BpfError::Syscall {
                    what: "setting thresholds",
                    map: THRESHOLDS_MAP,
                    source,
                },
            },
        );
        self.bump_generation();
        set
    }

    /// Tells the crossing programs the thresholds changed: they drop their cached walks.
    fn bump_generation(&self) {
        let next = self
            .generation_value
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        // An array element always exists; a failure here would leave a cached walk stale
        // until the next change, so say it.
        if let Err(e) = sys::update(self.generation.as_fd(), &0u32, &next, sys::BPF_ANY) {
            tracing::warn!(error = %e, "cannot bump the eBPF thresholds generation");
        }
    }

    /// Whether a crossing program is attached (what `--mode ebpf` requires).
    pub fn has_crossing(&self) -> bool {
        self.programs
            .iter()
            .any(|p| p.role == Role::Crossing && p.wanted())
    }

    /// Whether every score program is attached, so the `TASKS` map is kept current.
    pub fn has_scores(&self) -> bool {
        self.programs
            .iter()
            .filter(|p| p.role == Role::Scores)
            .all(ProgramCheck::wanted)
    }

    /// Every program, and why it does not run where it does not.
    pub fn programs(&self) -> &[ProgramCheck] {
        &self.programs
    }

    /// Where the charge program is attached on demand: whether it is attached now, and how
    /// many times it was attached.
    pub fn charge_hook_state(&self) -> Option<(bool, u64)> {
        self.charge_hook
            .as_ref()
            .map(|h| (h.attached(), h.attaches()))
    }

    /// Stops guarding `cgroup_id`; fine when it was not guarded.
    pub fn remove_cgroup(&self, cgroup_id: u64) -> Result<(), BpfError> {
        let removed = sys::delete(self.thresholds.as_fd(), &cgroup_id)
            .map(drop)
            .map_err(|source| BpfError::Syscall {
                what: "removing thresholds",
                map: THRESHOLDS_MAP,
                source,
            });
        self.bump_generation();
        removed
    }

    /// The thresholds and edge state of `cgroup_id`, if it is guarded.
    pub fn thresholds(&self, cgroup_id: u64) -> Result<Option<Thresholds>, BpfError> {
        sys::lookup(self.thresholds.as_fd(), &cgroup_id).map_err(|source| BpfError::Syscall {
            what: "reading thresholds",
            map: THRESHOLDS_MAP,
            source,
        })
    }

    /// The ring buffer's fd: readable (for epoll) when records are pending.
    pub fn ring_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// The programs' log ring: readable (for epoll) when log records are pending.
    pub fn log_fd(&self) -> Option<BorrowedFd<'_>> {
        self.logger.as_ref().map(|l| l.as_fd())
    }

    /// Passes pending log records of the programs to `log` (and so to tracing), without
    /// blocking.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// Hands every pending record to `f`, without blocking; returns how many. Records of a kind
    /// this build does not know are skipped.
    /// Approach records attach the charge program ([`on_demand`]) and are not passed on.
    pub fn drain(&mut self, mut f: impl FnMut(Record)) -> usize {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            if let Some(approach) = records::approach(&item) {
                if let Some(hook) = &self.charge_hook {
                    hook.approach(approach.cgroup_id, approach.ktime_ns);
                }
                continue;
            }
            if let Some(record) = Record::decode(&item) {
                n += 1;
                f(record);
            }
        }
        n
    }

    /// The scores of `pids` that the map knows (one lookup each: see the `ebpf_scores` test
    /// for why not one pass over the map), in the order given.
    pub fn task_scores(&self, pids: &[i32]) -> Vec<(i32, TaskScore)> {
        pids.iter()
            .filter_map(|&pid| {
                let key = u32::try_from(pid).ok()?;
                let score: TaskScore = sys::lookup(self.tasks.as_fd(), &key).ok()??;
                Some((pid, score))
            })
            .collect()
    }

    /// Every entry of the map, by one pass over it (for dumps).
    pub fn all_task_scores(&self) -> Result<Vec<(i32, TaskScore)>, BpfError> {
        let map_error = |source| BpfError::Map {
            map: TASKS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(TASKS_MAP)
            .ok_or(BpfError::MapMissing { map: TASKS_MAP })?;
        let tasks: HashMap<&MapData, u32, TaskScore> = HashMap::try_from(map).map_err(map_error)?;
        // Entries removed during the walk are skipped, not errors.
        Ok(tasks
            .iter()
            .filter_map(Result::ok)
            .map(|(pid, score)| (pid as i32, score))
            .collect())
    }

    /// Adds every process of `/proc` the map does not know yet (processes forked after
    /// [`EbpfGuard::load`] are already there, fresher); returns how many were added.
    pub fn seed_tasks_from_proc(&self) -> Result<usize, BpfError> {
        let entries = fs::read_dir("/proc").map_err(|source| BpfError::Read {
            path: "/proc".into(),
            source,
        })?;
        let mut added = 0;
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // The process may exit at any point: then it is simply not seeded.
            let dir = entry.path();
            let (Ok(status), Ok(adj)) = (
                fs::read_to_string(dir.join("status")),
                fs::read_to_string(dir.join("oom_score_adj")),
            ) else {
                continue;
            };
            let Some(score) = tasks::score_from_status(&status, &adj) else {
                continue;
            };
            match sys::update(self.tasks.as_fd(), &pid, &score, BPF_NOEXIST) {
                Ok(()) => added += 1,
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(BpfError::Syscall {
                        what: "seeding tasks",
                        map: TASKS_MAP,
                        source,
                    });
                }
            }
        }
        Ok(added)
    }

    /// The pin directory given to [`EbpfGuard::load`].
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Removes the pins (and the pin directory if it is then empty), detaches the programs.
    pub fn unpin(self) -> Result<(), BpfError> {
        remove_pins(&self.pin_dir).map(|_| ())
    }
}

/// Removes our own pins under `pin_dir`, and the directory when nothing else lives there
/// (another tool's pins or directories are left alone). Returns how many pins it removed.
pub fn remove_pins(pin_dir: &Path) -> Result<usize, BpfError> {
    let mut removed = 0;
    for name in PINNED_MAPS {
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BpfError::PinDir {
                    what: "removing the pin",
                    path,
                    source,
                });
            }
        }
    }
    // Fails (and is left in place) when something else lives there too.
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}

/// Attaches every wanted program (a function in the object once, however many programs it
/// serves); one that fails gets its problem recorded, and when it was the crossing program,
/// the next usable crossing program is tried.
fn attach_all(ebpf: &mut Ebpf, checks: &mut [ProgramCheck]) {
    let mut attached: Vec<(&'static str, Option<String>)> = Vec::new();
    let mut attach_later = Vec::new();
    for i in 0..checks.len() {
        if !checks[i].wanted() {
            continue;
        }
        let Some(program) = PROGRAMS.iter().find(|p| p.name == checks[i].program) else {
            continue;
        };
        let failed = match attached
            .iter()
            .find(|(object, _)| *object == program.object)
        {
            Some((_, failed)) => failed.clone(),
            None => {
                let on_demand = checks[i].on_demand;
                let failed = attach(ebpf, program.object, program.hook, !on_demand)
                    .err()
                    .map(|e| error_chain(&e));
                attached.push((program.object, failed.clone()));
                failed
            }
        };
        let Some(failed) = failed else { continue };
        checks[i].problem = Some(failed);
        if checks[i].role == Role::Crossing {
            let next = crossing_preference().into_iter().find_map(|name| {
                checks.iter().position(|c| {
                    c.program == name && c.problem.is_none() && (c.standby.is_some() || c.on_demand)
                })
            });
            if let Some(next) = next {
                checks[next].standby = None;
                checks[next].on_demand = false;
                // An earlier one is attached here; a later one in the loop.
                if next < i {
                    attach_later.push(next);
                }
            }
        }
    }
    for i in attach_later {
        let Some(program) = PROGRAMS.iter().find(|p| p.name == checks[i].program) else {
            continue;
        };
        let done = attached
            .iter()
            .any(|(object, failed)| *object == program.object && failed.is_none());
        if !done && let Err(e) = attach(ebpf, program.object, program.hook, true) {
            checks[i].problem = Some(error_chain(&e));
        }
    }
}

/// The on-demand attachment of the charge program, where [`program_checks`] chose it.
fn charge_hook(
    ebpf: &Ebpf,
    checks: &[ProgramCheck],
    thresholds: &OwnedFd,
) -> Result<Option<on_demand::ChargeHook>, BpfError> {
    let Some(check) = checks.iter().find(|c| c.wanted() && c.on_demand) else {
        return Ok(None);
    };
    let Some(program) = PROGRAMS.iter().find(|p| p.name == check.program) else {
        return Ok(None);
    };
    let Hook::Raw(hook) = program.hook else {
        return Ok(None);
    };
    let error = |source| BpfError::Program {
        program: program.name,
        hook,
        source,
    };
    let prog = ebpf
        .program(program.object)
        .ok_or(BpfError::ProgramMissing {
            program: program.object,
        })?;
    let fd = prog
        .fd()
        .map_err(error)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| error(ProgramError::IOError(e)))?;
    let thresholds = thresholds.try_clone().map_err(|source| BpfError::Syscall {
        what: "duplicating the fd",
        map: THRESHOLDS_MAP,
        source,
    })?;
    let name = match hook {
        "count_memcg_events" => c"count_memcg_events",
        _ => return Ok(None),
    };
    Ok(Some(on_demand::ChargeHook::new(fd, name, thresholds)))
}

/// What the `rss_stat` function does here: the [`oomguard_common::rss_roles`] of the wanted
/// programs it serves.
fn rss_stat_roles(checks: &[ProgramCheck]) -> u32 {
    let wanted = |name: &str| checks.iter().any(|c| c.program == name && c.wanted());
    let mut roles = 0;
    if wanted("rss_stat") {
        roles |= oomguard_common::rss_roles::SCORES;
    }
    if wanted("rss_pressure") {
        roles |= oomguard_common::rss_roles::CROSSING;
    }
    roles
}

/// Loads `program` (unless loaded) and, when `attach`, attaches it to `hook`.
fn attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    hook: Hook,
    attach: bool,
) -> Result<(), BpfError> {
    let error = |source| BpfError::Program {
        program,
        hook: hook.name(),
        source,
    };
    let prog = ebpf
        .program_mut(program)
        .ok_or(BpfError::ProgramMissing { program })?;
    match hook {
        Hook::Raw(name) => {
            let prog: &mut RawTracePoint = prog.try_into().map_err(error)?;
            if prog.fd().is_err() {
                prog.load().map_err(error)?;
            }
            if attach {
                prog.attach(name).map_err(error)?;
            }
        }
        Hook::TracePoint(category, name) => {
            let prog: &mut TracePoint = prog.try_into().map_err(error)?;
            if prog.fd().is_err() {
                prog.load().map_err(error)?;
            }
            if attach {
                prog.attach(category, name).map_err(error)?;
            }
        }
    }
    if attach {
        tracing::debug!(program, hook = hook.name(), "attached eBPF program");
    } else {
        tracing::debug!(
            program,
            hook = hook.name(),
            "loaded eBPF program, attached on demand"
        );
    }
    Ok(())
}

/// A duplicate of a hash map's fd, for element access through `&self`.
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, BpfError> {
    let data = match ebpf.map(name) {
        Some(Map::HashMap(data) | Map::LruHashMap(data) | Map::Array(data)) => data,
        Some(_) => {
            return Err(BpfError::Map {
                map: name,
                source: MapError::InvalidName {
                    name: format!("{name} is not a hash map"),
                },
            });
        }
        None => return Err(BpfError::MapMissing { map: name }),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| BpfError::Syscall {
            what: "duplicating the fd",
            map: name,
            source,
        })
}

/// Entries of the `TASKS` map: four times the processes running now, at least 16,384, at most
/// the compiled 131,072 (an LRU hash is allocated in full at creation: about 120 bytes an
/// entry, charged to the agent's memory cgroup).
fn tasks_map_size() -> u32 {
    let processes = fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count()
    });
    tasks_map_entries(processes)
}

/// [`tasks_map_size`] for `processes` running.
pub fn tasks_map_entries(processes: usize) -> u32 {
    let wanted = u32::try_from(processes.saturating_mul(4)).unwrap_or(u32::MAX);
    wanted.clamp(16_384, oomguard_common::TASKS_MAX_ENTRIES)
}

/// The system page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program's prototype as this kernel has it, and a prototype that does not match
    /// (what a kernel that changed a tracepoint looks like).
    #[test]
    fn tracepoint_prototypes_are_checked_against_btf() {
        let btf = match offsets::vmlinux_btf() {
            Ok(btf) => btf,
            Err(e) => {
                eprintln!("skipped: no kernel BTF: {}", error_chain(&e));
                return;
            }
        };
        for p in PROGRAMS.iter().filter(|p| !p.args.is_empty()) {
            let problem = prototype_problem(&btf, p.hook.name(), p.args);
            eprintln!("{}: {problem:?}", p.name);
            assert!(
                problem.is_none()
                    || problem
                        .as_deref()
                        .is_some_and(|w| w.contains("not in this kernel")),
                "{}: {problem:?}",
                p.name
            );
        }
        let wrong = prototype_problem(&btf, "sched_process_exit", &["struct mm_struct *"]);
        assert!(
            wrong
                .as_deref()
                .is_some_and(|w| w.contains("takes (struct task_struct *")
                    && w.contains("reads (struct mm_struct *)")),
            "{wrong:?}"
        );
        let longer = prototype_problem(
            &btf,
            "oom_score_adj_update",
            &["struct task_struct *", "int", "int", "int"],
        );
        assert!(longer.is_some(), "more arguments than the tracepoint has");
        assert!(prototype_problem(&btf, "no_such_tracepoint", &[]).is_some());
    }

    #[test]
    fn the_task_map_holds_four_times_the_processes_within_bounds() {
        assert_eq!(tasks_map_entries(0), 16_384);
        assert_eq!(tasks_map_entries(5_000), 20_000);
        assert_eq!(tasks_map_entries(25_000), 100_000);
        assert_eq!(
            tasks_map_entries(1_000_000),
            oomguard_common::TASKS_MAX_ENTRIES
        );
    }
}
