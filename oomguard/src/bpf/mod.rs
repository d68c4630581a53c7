//! The eBPF half of the guard: loading and attaching the programs built from `oomguard-ebpf`,
//! and the maps and ring buffer they share with user space.
//!
//! - Pressure (`raw_tp/count_memcg_events`): a guarded cgroup's usage crossed its reclaim or
//!   kill threshold, seen at the charge that did it; one record per crossing.
//! - At the limit (`vmscan:mm_vmscan_memcg_reclaim_begin`): a task of a guarded cgroup entered
//!   reclaim with the cgroup at its limit.
//! - Task scores (`rss_stat`, `sched_process_fork`/`exit`, `oom_score_adj_update`): the `TASKS`
//!   map of what `oom_badness` needs per process, so the process policy reads no `/proc`.
//! - Kernel OOMs (`oom:mark_victim`) and discovery (`cgroup:cgroup_mkdir`/`rmdir`).
//!
//! Everything is synchronous: [`EbpfGuard::ring_fd`] goes into the guard thread's epoll set and
//! [`EbpfGuard::drain`] reads what is pending without blocking. Kernel struct offsets and enum
//! values come from BTF ([`offsets`]), tracepoint record offsets from tracefs ([`tracefs`]).

pub mod btf;
pub mod mount;
pub mod offsets;
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
use self::{btf::BtfError, sys::BPF_NOEXIST};

/// The eBPF object built by `build.rs`; empty when the build ran with `AYA_BUILD_SKIP=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oomguard-ebpf"));

/// Default `--bpf-pin-dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/oomguard";

const OFFSETS_GLOBAL: &str = "OFFSETS";
const THRESHOLDS_MAP: &str = "THRESHOLDS";
const TASKS_MAP: &str = "TASKS";
const EVENTS_MAP: &str = "EVENTS";
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

/// Every program in the object, by function name, with its hook.
const PROGRAMS: [(&str, Hook); 9] = [
    ("memcg_pressure", Hook::Raw("count_memcg_events")),
    (
        "at_limit",
        Hook::TracePoint("vmscan", "mm_vmscan_memcg_reclaim_begin"),
    ),
    ("rss_stat", Hook::Raw("rss_stat")),
    ("sched_process_fork", Hook::Raw("sched_process_fork")),
    ("sched_process_exit", Hook::Raw("sched_process_exit")),
    ("oom_score_adj_update", Hook::Raw("oom_score_adj_update")),
    ("mark_victim", Hook::Raw("mark_victim")),
    ("cgroup_mkdir", Hook::TracePoint("cgroup", "cgroup_mkdir")),
    ("cgroup_rmdir", Hook::TracePoint("cgroup", "cgroup_rmdir")),
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
    #[error("the memory controller is not on a cgroup v1 hierarchy (/proc/cgroups)")]
    NoMemoryHierarchy,
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

/// What the kernel offers the eBPF mode, from [`capabilities`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub checks: Vec<Check>,
}

impl Capabilities {
    /// Whether everything the eBPF mode needs is there.
    pub fn usable(&self) -> bool {
        self.checks.iter().all(|c| c.problem.is_none())
    }

    /// One line naming everything missing, e.g. for `--mode auto`'s warning; `None` when
    /// [`Capabilities::usable`].
    pub fn reason(&self) -> Option<String> {
        let missing: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| Some(format!("{}: {}", c.feature, c.problem.as_ref()?)))
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }
}

/// Probes, without changing anything, for what [`EbpfGuard::load`] needs: the eBPF object,
/// `bpf()` with ring buffers, kernel BTF with every struct member and enum value the programs
/// read, tracefs (mounted or mountable), every tracepoint, and a v1 memory hierarchy.
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
    match offsets::vmlinux_btf() {
        Ok(btf) => {
            check(
                "kernel BTF",
                offsets::from_btf(&btf).err().map(|e| e.to_string()),
            );
            for (_, hook) in PROGRAMS {
                let problem = (!btf.has_typedef(&format!("btf_trace_{}", hook.name())))
                    .then(|| "not in this kernel".to_string());
                check(&format!("tracepoint {}", hook.name()), problem);
            }
        }
        Err(err) => check("kernel BTF", Some(error_chain(&err))),
    }
    check("tracefs", tracefs_problem());
    check(
        "cgroup v1 memory hierarchy",
        fs::read_to_string("/proc/cgroups")
            .ok()
            .and_then(|text| offsets::memory_hierarchy_id(&text))
            .is_none()
            .then(|| "the memory controller is not on a v1 hierarchy".to_string()),
    );
    Capabilities { checks }
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
fn error_chain(err: &dyn std::error::Error) -> String {
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
    pin_dir: PathBuf,
    /// The programs' aya-log records (a dropped record, say), passed to `log`, which the
    /// agent's tracing subscriber receives.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    // Owns the programs and their attachments.
    ebpf: Ebpf,
}

impl EbpfGuard {
    /// Mounts tracefs and bpffs where missing, computes the kernel layout, loads and attaches
    /// every program, and pins the maps under `pin_dir` (made if missing; stale pins of an
    /// earlier run are replaced). Needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN to mount).
    pub fn load(pin_dir: &Path) -> Result<EbpfGuard, BpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::ObjectMissing);
        }
        let tracefs = tracefs::ensure_tracefs()?;
        let btf = offsets::vmlinux_btf()?;
        let layout = offsets::compute(&btf, &tracefs)?;

        let mut ebpf = EbpfLoader::new()
            .override_global(OFFSETS_GLOBAL, &layout, true)
            .load(EBPF_OBJECT)
            .map_err(BpfError::Load)?;
        for (program, hook) in PROGRAMS {
            attach(&mut ebpf, program, hook)?;
        }

        mount::ensure_bpffs()?;
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
        tracing::info!(
            programs = PROGRAMS.len(),
            pin_dir = %pin_dir.display(),
            "eBPF programs attached"
        );
        Ok(EbpfGuard {
            events,
            thresholds,
            tasks,
            pin_dir: pin_dir.to_path_buf(),
            logger,
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
        sys::update(self.thresholds.as_fd(), &cgroup_id, &value, sys::BPF_ANY).map_err(|source| {
            BpfError::Syscall {
                what: "setting thresholds",
                map: THRESHOLDS_MAP,
                source,
            }
        })
    }

    /// Stops guarding `cgroup_id`; fine when it was not guarded.
    pub fn remove_cgroup(&self, cgroup_id: u64) -> Result<(), BpfError> {
        sys::delete(self.thresholds.as_fd(), &cgroup_id)
            .map(drop)
            .map_err(|source| BpfError::Syscall {
                what: "removing thresholds",
                map: THRESHOLDS_MAP,
                source,
            })
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
    pub fn drain(&mut self, mut f: impl FnMut(Record)) -> usize {
        let mut n = 0;
        while let Some(item) = self.events.next() {
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

fn attach(ebpf: &mut Ebpf, program: &'static str, hook: Hook) -> Result<(), BpfError> {
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
            prog.load().map_err(error)?;
            prog.attach(name).map_err(error)?;
        }
        Hook::TracePoint(category, name) => {
            let prog: &mut TracePoint = prog.try_into().map_err(error)?;
            prog.load().map_err(error)?;
            prog.attach(category, name).map_err(error)?;
        }
    }
    tracing::debug!(program, hook = hook.name(), "attached eBPF program");
    Ok(())
}

/// A duplicate of a hash map's fd, for element access through `&self`.
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, BpfError> {
    let data = match ebpf.map(name) {
        Some(Map::HashMap(data) | Map::LruHashMap(data)) => data,
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

/// The system page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}
