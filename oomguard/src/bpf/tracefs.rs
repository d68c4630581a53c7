//! tracefs: where it is (mounting it when it is not), and tracepoint record layouts from its
//! `events/<category>/<name>/format` files. Record layouts are not a stable kernel ABI, so the
//! programs get these offsets at load time.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{BpfError, mount};

/// Where tracefs is looked for, preferred first; it is mounted at the first when missing.
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point, if tracefs is mounted at one of the usual places.
pub fn tracefs_mounted() -> Result<Option<PathBuf>, BpfError> {
    Ok(tracefs_mount(&mount::read_mounts()?))
}

/// Returns the tracefs mount point, mounting tracefs at `/sys/kernel/tracing` when it is not
/// mounted at either usual place.
pub fn ensure_tracefs() -> Result<PathBuf, BpfError> {
    if let Some(path) = tracefs_mounted()? {
        return Ok(path);
    }
    let path = PathBuf::from(TRACEFS_MOUNTS[0]);
    mount::mount(c"nodev", &path, c"tracefs").map_err(|source| BpfError::Mount {
        path: path.clone(),
        fstype: "tracefs",
        source,
    })?;
    tracing::info!(path = %path.display(), "mounted tracefs, which was not mounted");
    Ok(path)
}

/// The first of [`TRACEFS_MOUNTS`] that `mounts` (in `/proc/self/mounts` format) lists as a
/// tracefs mount.
pub fn tracefs_mount(mounts: &str) -> Option<PathBuf> {
    let tracefs = mount::targets_of(mounts, "tracefs");
    TRACEFS_MOUNTS
        .into_iter()
        .find(|candidate| tracefs.iter().any(|t| t == candidate))
        .map(PathBuf::from)
}

/// The `format` file of a tracepoint, read.
pub fn read_format(
    tracefs: &Path,
    category: &str,
    name: &str,
) -> Result<(PathBuf, String), BpfError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path).map_err(|source| BpfError::Read {
        path: path.clone(),
        source,
    })?;
    Ok((path, text))
}

/// Offset of `field` in a tracepoint record, checking its size.
pub fn field(
    (path, text): &(PathBuf, String),
    field: &'static str,
    size: u32,
) -> Result<u32, BpfError> {
    let layout = field_layout(text, field).ok_or_else(|| BpfError::FieldMissing {
        path: path.clone(),
        field,
    })?;
    if layout.size != size {
        return Err(BpfError::FieldSize {
            path: path.clone(),
            field,
            size: layout.size,
            expected: size,
        });
    }
    Ok(layout.offset)
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
