//! Loads and attaches the eBPF programs built from `oomguard-ebpf`, and reads their maps.
//!
//! Tracepoint record layouts are not a stable kernel ABI, so field offsets are read from tracefs
//! at load time and handed to the programs as globals.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{MapData, MapError, PerCpuHashMap},
    programs::{ProgramError, TracePoint},
};

/// The eBPF object built by `build.rs`; empty when the build ran with `AYA_BUILD_SKIP=1`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oomguard-ebpf"));

/// Where tracefs is looked for, preferred first; it is mounted at the first when missing.
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

const MOUNTS_FILE: &str = "/proc/self/mounts";

const MEMCG_EVENTS_PROGRAM: &str = "count_memcg_events";
const MEMCG_EVENTS_MAP: &str = "MEMCG_EVENTS";
const ID_OFFSET_GLOBAL: &str = "ID_OFFSET";

/// Errors of loading, attaching and reading the eBPF programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting tracefs at {path}")]
    MountTracefs {
        path: PathBuf,
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
    #[error("the eBPF object is empty: oomguard was built with AYA_BUILD_SKIP set")]
    ObjectMissing,
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {program} is not in the object")]
    ProgramMissing { program: &'static str },
    #[error("eBPF program {program}")]
    Program {
        program: &'static str,
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
}

/// Returns the tracefs mount point, mounting tracefs at `/sys/kernel/tracing` when it is not
/// mounted at either usual place.
pub fn ensure_tracefs() -> Result<PathBuf, BpfError> {
    let mounts = fs::read_to_string(MOUNTS_FILE).map_err(|source| BpfError::Read {
        path: MOUNTS_FILE.into(),
        source,
    })?;
    if let Some(path) = tracefs_mount(&mounts) {
        return Ok(path);
    }
    let path = PathBuf::from(TRACEFS_MOUNTS[0]);
    mount_tracefs(&path).map_err(|source| BpfError::MountTracefs {
        path: path.clone(),
        source,
    })?;
    tracing::info!(path = %path.display(), "mounted tracefs, which was not mounted");
    Ok(path)
}

/// The first of [`TRACEFS_MOUNTS`] that `mounts` (in `/proc/self/mounts` format) lists as a
/// tracefs mount.
fn tracefs_mount(mounts: &str) -> Option<PathBuf> {
    let tracefs: Vec<&str> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "tracefs").then_some(target)
        })
        .collect();
    TRACEFS_MOUNTS
        .into_iter()
        .find(|candidate| tracefs.contains(candidate))
        .map(PathBuf::from)
}

fn mount_tracefs(target: &Path) -> io::Result<()> {
    let target =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; tracefs takes
    // no mount data.
    let ret = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Position of one field in a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLayout {
    pub offset: u32,
    pub size: u32,
}

/// Parses the layout of `field` out of a tracefs `events/<category>/<name>/format` file.
pub fn field_layout(format_text: &str, field: &str) -> Option<FieldLayout> {
    format_text.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        // `u64 id`, `char comm[16]`, `__data_loc char[] name`: the name is the last word.
        let name = declaration.rsplit(char::is_whitespace).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(value) = part.strip_prefix("offset:") {
                offset = value.parse().ok();
            } else if let Some(value) = part.strip_prefix("size:") {
                size = value.parse().ok();
            }
        }
        Some(FieldLayout {
            offset: offset?,
            size: size?,
        })
    })
}

/// Offset of `field` in a tracepoint record, from a tracefs `format` file.
pub fn field_offset(format_text: &str, field: &str) -> Option<u32> {
    field_layout(format_text, field).map(|layout| layout.offset)
}

/// Counts `memcg:count_memcg_events` tracepoint hits per memory cgroup, in the kernel.
///
/// The tracepoint fires on page faults and, on cgroup v1, on charge and uncharge batches, so the
/// count moves whenever a cgroup's memory use does. The programs stay attached while this value
/// lives.
pub struct MemcgEventCounter {
    events: PerCpuHashMap<MapData, u64, u64>,
    // Owns the program and its attachment; dropping it detaches.
    _ebpf: aya::Ebpf,
}

impl MemcgEventCounter {
    /// Loads the program, tells it where the memcg id sits in the record, and attaches it.
    /// Needs root (CAP_BPF and CAP_PERFMON); mounts tracefs when it is missing.
    pub fn load() -> Result<Self, BpfError> {
        const CATEGORY: &str = "memcg";
        const FIELD: &str = "id";
        if EBPF_OBJECT.is_empty() {
            return Err(BpfError::ObjectMissing);
        }
        let tracefs = ensure_tracefs()?;
        let format_path = tracefs
            .join("events")
            .join(CATEGORY)
            .join(MEMCG_EVENTS_PROGRAM)
            .join("format");
        let format = fs::read_to_string(&format_path).map_err(|source| BpfError::Read {
            path: format_path.clone(),
            source,
        })?;
        let id = field_layout(&format, FIELD).ok_or_else(|| BpfError::FieldMissing {
            path: format_path.clone(),
            field: FIELD,
        })?;
        let expected = u64::BITS / 8;
        if id.size != expected {
            return Err(BpfError::FieldSize {
                path: format_path,
                field: FIELD,
                size: id.size,
                expected,
            });
        }

        let mut ebpf = EbpfLoader::new()
            .override_global(ID_OFFSET_GLOBAL, &id.offset, true)
            .load(EBPF_OBJECT)
            .map_err(BpfError::Load)?;
        let program_error = |source| BpfError::Program {
            program: MEMCG_EVENTS_PROGRAM,
            source,
        };
        let program: &mut TracePoint = ebpf
            .program_mut(MEMCG_EVENTS_PROGRAM)
            .ok_or(BpfError::ProgramMissing {
                program: MEMCG_EVENTS_PROGRAM,
            })?
            .try_into()
            .map_err(program_error)?;
        program.load().map_err(program_error)?;
        program
            .attach(CATEGORY, MEMCG_EVENTS_PROGRAM)
            .map_err(program_error)?;
        tracing::debug!(
            program = MEMCG_EVENTS_PROGRAM,
            id_offset = id.offset,
            "attached eBPF program"
        );

        let map = ebpf
            .take_map(MEMCG_EVENTS_MAP)
            .ok_or(BpfError::MapMissing {
                map: MEMCG_EVENTS_MAP,
            })?;
        let events = PerCpuHashMap::try_from(map).map_err(|source| BpfError::Map {
            map: MEMCG_EVENTS_MAP,
            source,
        })?;
        Ok(Self {
            events,
            _ebpf: ebpf,
        })
    }

    /// Tracepoint hits counted for the memcg with this id (the inode number of its directory in
    /// the v1 memory hierarchy) since [`MemcgEventCounter::load`]; 0 when it has none.
    pub fn count(&self, memcg_id: u64) -> Result<u64, BpfError> {
        match self.events.get(&memcg_id, 0) {
            Ok(per_cpu) => Ok(per_cpu.iter().fold(0, |sum, n| sum.saturating_add(*n))),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(source) => Err(BpfError::Map {
                map: MEMCG_EVENTS_MAP,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/sys/kernel/tracing/events/memcg/count_memcg_events/format` on Linux 6.18.
    const COUNT_MEMCG_EVENTS_FORMAT: &str = "\
name: count_memcg_events
ID: 761
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:u64 id;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int item;\toffset:16;\tsize:4;\tsigned:1;
\tfield:unsigned long val;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"memcg_id=%llu item=%d val=%lu\", REC->id, REC->item, REC->val
";

    #[test]
    fn finds_the_memcg_id_offset() {
        assert_eq!(field_offset(COUNT_MEMCG_EVENTS_FORMAT, "id"), Some(8));
        assert_eq!(field_offset(COUNT_MEMCG_EVENTS_FORMAT, "item"), Some(16));
        assert_eq!(field_offset(COUNT_MEMCG_EVENTS_FORMAT, "val"), Some(24));
        assert_eq!(
            field_offset(COUNT_MEMCG_EVENTS_FORMAT, "common_pid"),
            Some(4)
        );
    }

    #[test]
    fn reports_the_field_size() {
        assert_eq!(
            field_layout(COUNT_MEMCG_EVENTS_FORMAT, "id"),
            Some(FieldLayout { offset: 8, size: 8 })
        );
        assert_eq!(
            field_layout(COUNT_MEMCG_EVENTS_FORMAT, "item"),
            Some(FieldLayout {
                offset: 16,
                size: 4
            })
        );
    }

    #[test]
    fn matches_whole_field_names_only() {
        // `id` must not match `common_pid` or the `memcg_id` in the print format.
        let format = "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
                      print fmt: \"memcg_id=%llu\", REC->id\n";
        assert_eq!(field_offset(format, "id"), None);
        assert_eq!(field_offset(COUNT_MEMCG_EVENTS_FORMAT, "memcg_id"), None);
    }

    #[test]
    fn handles_array_and_dynamic_fields() {
        let format = "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
                      \tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n";
        assert_eq!(field_offset(format, "comm"), Some(8));
        assert_eq!(field_offset(format, "name"), Some(24));
    }

    #[test]
    fn rejects_a_field_without_an_offset() {
        let format = "\tfield:u64 id;\toffset:x;\tsize:8;\tsigned:0;\n";
        assert_eq!(field_offset(format, "id"), None);
        assert_eq!(field_offset("", "id"), None);
    }

    #[test]
    fn finds_tracefs_in_mounts() {
        // `/proc/self/mounts` on the build machine after `mount -t tracefs nodev /sys/kernel/tracing`.
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
nodev /sys/kernel/tracing tracefs rw,relatime 0 0
";
        assert_eq!(
            tracefs_mount(mounts),
            Some(PathBuf::from("/sys/kernel/tracing"))
        );
    }

    #[test]
    fn finds_tracefs_under_debugfs() {
        let mounts = "\
debugfs /sys/kernel/debug debugfs rw,nosuid,nodev,noexec,relatime 0 0
tracefs /sys/kernel/debug/tracing tracefs rw,nosuid,nodev,noexec,relatime 0 0
";
        assert_eq!(
            tracefs_mount(mounts),
            Some(PathBuf::from("/sys/kernel/debug/tracing"))
        );
    }

    #[test]
    fn ignores_tracefs_elsewhere_and_other_filesystems_at_the_usual_places() {
        let mounts = "\
nodev /mnt/tracing tracefs rw,relatime 0 0
tmpfs /sys/kernel/tracing tmpfs rw 0 0
";
        assert_eq!(tracefs_mount(mounts), None);
    }
}
