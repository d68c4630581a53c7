//! The kernel layout handed to the eBPF programs (`oomguard_common::Offsets`): struct member
//! offsets and enum values from BTF, tracepoint record offsets from tracefs, the memory
//! hierarchy's id from `/proc/cgroups`. Nothing kernel-specific is compiled in.

use std::{fs, path::Path};

use oomguard_common::Offsets;

use super::{
    BpfError,
    btf::{Btf, BtfError},
    tracefs,
};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const PROC_CGROUPS: &str = "/proc/cgroups";

/// Pressure records are re-armed once usage is this far below the threshold: one per-CPU
/// charge batch (64 pages of 4 KiB), the size of the steps usage moves in.
const REARM_BYTES: u64 = 256 * 1024;
/// Thresholds are looked at once usage is this close to the lowest: above the largest step one
/// charge moves usage by (a 2 MiB huge page plus a 64-page charge batch), with room.
const NEAR_BYTES: u64 = 8 * 1024 * 1024;
/// At most one at-limit record per cgroup per millisecond.
const AT_LIMIT_INTERVAL_NS: u64 = 1_000_000;
/// A charge that does not fit may be as large as a PMD-sized huge page (2 MiB on x86-64).
const AT_LIMIT_SLACK_BYTES: u64 = 2 * 1024 * 1024;

/// Reads and parses the kernel's BTF.
pub fn vmlinux_btf() -> Result<Btf, BpfError> {
    let data = fs::read(VMLINUX_BTF).map_err(|source| BpfError::Read {
        path: VMLINUX_BTF.into(),
        source,
    })?;
    Btf::parse(&data).map_err(BpfError::Btf)
}

/// A group of [`Offsets`] fields, computed together: a program needs some of them, and a
/// kernel that lacks one group loses only the programs that need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// `task_struct` fields: pid, tgid, mm, signal.
    Task,
    /// The memory cgroup of a task, its id, usage, limit, parent and serial number.
    Memcg,
    /// What `oom_badness` needs of a task: rss counters, page tables, `oom_score_adj`.
    Scores,
    /// `PGPGIN`/`PGPGOUT` (the v1 charge events of `count_memcg_events`).
    Pgpg,
    /// The `cgroup:cgroup_mkdir`/`rmdir` record layout (tracefs) and the memory hierarchy's id.
    CgroupRecord,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Task => "task_struct layout",
            Part::Memcg => "memory cgroup layout",
            Part::Scores => "rss counter layout",
            Part::Pgpg => "PGPGIN/PGPGOUT",
            Part::CgroupRecord => "cgroup_mkdir record",
        }
    }
}

/// [`Offsets`] as far as this kernel provides them, and what is missing, by part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub offsets: Offsets,
    pub problems: Vec<(Part, String)>,
}

impl Layout {
    /// Why `part` could not be computed, if it could not.
    pub fn problem(&self, part: Part) -> Option<&str> {
        self.problems
            .iter()
            .find(|(p, _)| *p == part)
            .map(|(_, why)| why.as_str())
    }

    fn record<T>(&mut self, part: Part, result: Result<T, impl std::fmt::Display>) -> Option<T> {
        result
            .map_err(|e| self.problems.push((part, e.to_string())))
            .ok()
    }
}

/// Where and how the kernel keeps an mm's rss counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssCounters {
    /// Offset of the first counter in `struct mm_struct`.
    pub offset: u32,
    /// Distance between two counters.
    pub stride: u32,
    /// Offset of the counter's value (an s64) within one.
    pub value: u32,
    /// How many counters there are (`NR_MM_COUNTERS`).
    pub len: u32,
    /// 6.2+: `struct percpu_counter rss_stat[]`; before: `struct mm_rss_stat` of atomics.
    pub percpu: bool,
}

/// The rss counter layout, told apart by BTF: an array of `struct percpu_counter` (6.2+) or
/// a `struct mm_rss_stat { atomic_long_t count[]; }` (before).
pub fn rss_counters(btf: &Btf) -> Result<RssCounters, BtfError> {
    let rss_stat = btf.member("mm_struct", "rss_stat")?;
    let malformed = |what: String| BtfError::NoMember {
        strukt: "mm_struct".into(),
        member: what,
    };
    if rss_stat.array_len > 0 {
        let stride = btf.struct_size("percpu_counter")?;
        if rss_stat.size != stride.saturating_mul(rss_stat.array_len) {
            return Err(malformed(format!(
                "rss_stat as an array of struct percpu_counter ({} bytes for {} of {stride})",
                rss_stat.size, rss_stat.array_len
            )));
        }
        let count = btf.member("percpu_counter", "count")?;
        if count.size != 8 {
            return Err(malformed("rss_stat[].count of 8 bytes".into()));
        }
        return Ok(RssCounters {
            offset: rss_stat.offset,
            stride,
            value: count.offset,
            len: rss_stat.array_len,
            percpu: true,
        });
    }
    let count = btf.member("mm_rss_stat", "count")?;
    if count.array_len == 0 || count.size != 8 * count.array_len {
        return Err(malformed(
            "rss_stat.count as an array of atomic_long_t".into(),
        ));
    }
    Ok(RssCounters {
        offset: rss_stat.offset + count.offset,
        stride: 8,
        value: 0,
        len: count.array_len,
        percpu: false,
    })
}

/// The struct-layout parts of [`Offsets`], from BTF (no tracefs needed); each part is computed
/// on its own, so one missing member costs only the programs that need its part.
pub fn from_btf(btf: &Btf) -> Layout {
    let mut layout = Layout {
        offsets: Offsets {
            page_size: super::page_size(),
            rearm_bytes: REARM_BYTES,
            at_limit_interval_ns: AT_LIMIT_INTERVAL_NS,
            at_limit_slack_bytes: AT_LIMIT_SLACK_BYTES,
            near_bytes: NEAR_BYTES,
            ..Offsets::default()
        },
        problems: Vec::new(),
    };
    if let Some(task) = layout.record(Part::Task, task_part(btf)) {
        let o = &mut layout.offsets;
        (o.task_pid, o.task_tgid, o.task_mm, o.task_signal) = task;
    }
    if let Some(memcg) = layout.record(Part::Memcg, memcg_part(btf)) {
        let o = &mut layout.offsets;
        (
            o.memcg_css,
            o.memcg_memory,
            o.counter_usage,
            o.counter_max,
            o.css_cgroup,
            o.css_parent,
            o.css_serial_nr,
            o.cgroup_kn,
            o.kn_id,
            o.task_cgroups,
            o.css_set_memory,
        ) = memcg;
    }
    if let Some(scores) = layout.record(Part::Scores, scores_part(btf)) {
        let o = &mut layout.offsets;
        let (rss, [file, anon, swap, shmem], adj, live, owner, pgtables) = scores;
        (o.mm_rss_stat, o.mm_counter_stride, o.mm_counter_value) =
            (rss.offset, rss.stride, rss.value);
        (
            o.mm_filepages,
            o.mm_anonpages,
            o.mm_swapents,
            o.mm_shmempages,
        ) = (file, anon, swap, shmem);
        (
            o.signal_oom_score_adj,
            o.signal_live,
            o.mm_owner,
            o.mm_pgtables_bytes,
        ) = (adj, live, owner, pgtables);
    }
    let pgpg = enum_u32(btf, "PGPGIN").and_then(|i| Ok((i, enum_u32(btf, "PGPGOUT")?)));
    if let Some((pgpgin, pgpgout)) = layout.record(Part::Pgpg, pgpg) {
        (layout.offsets.pgpgin, layout.offsets.pgpgout) = (pgpgin, pgpgout);
    }
    layout
}

const POINTER: u32 = std::mem::size_of::<usize>() as u32;

/// Offset of `strukt.name`, checking its size.
fn member(btf: &Btf, strukt: &str, name: &str, size: u32) -> Result<u32, BtfError> {
    let found = btf.member(strukt, name)?;
    if found.size != size {
        return Err(BtfError::NoMember {
            strukt: strukt.to_string(),
            member: format!("{name} of {size} bytes (it has {})", found.size),
        });
    }
    Ok(found.offset)
}

fn enum_u32(btf: &Btf, name: &str) -> Result<u32, BtfError> {
    u32::try_from(btf.enum_value(name)?)
        .map_err(|_| BtfError::NoEnumValue(format!("{name} (out of range)")))
}

fn task_part(btf: &Btf) -> Result<(u32, u32, u32, u32), BtfError> {
    Ok((
        member(btf, "task_struct", "pid", 4)?,
        member(btf, "task_struct", "tgid", 4)?,
        member(btf, "task_struct", "mm", POINTER)?,
        member(btf, "task_struct", "signal", POINTER)?,
    ))
}

type MemcgPart = (u32, u32, u32, u32, u32, u32, u32, u32, u32, u32, u32);

fn memcg_part(btf: &Btf) -> Result<MemcgPart, BtfError> {
    let memcg_memory = btf.member("mem_cgroup", "memory")?;
    let page_counter = btf.struct_size("page_counter")?;
    if memcg_memory.size != page_counter {
        return Err(BtfError::NoMember {
            strukt: "mem_cgroup".into(),
            member: "memory (a struct page_counter)".into(),
        });
    }
    let subsys = btf.member("css_set", "subsys")?;
    let memory_cgrp_id = enum_u32(btf, "memory_cgrp_id")?;
    if memory_cgrp_id >= subsys.array_len {
        return Err(BtfError::NoEnumValue(format!(
            "memory_cgrp_id {memory_cgrp_id} (css_set has {} subsystems)",
            subsys.array_len
        )));
    }
    Ok((
        btf.member("mem_cgroup", "css")?.offset,
        memcg_memory.offset,
        member(btf, "page_counter", "usage", 8)?,
        member(btf, "page_counter", "max", 8)?,
        member(btf, "cgroup_subsys_state", "cgroup", POINTER)?,
        member(btf, "cgroup_subsys_state", "parent", POINTER)?,
        member(btf, "cgroup_subsys_state", "serial_nr", 8)?,
        member(btf, "cgroup", "kn", POINTER)?,
        member(btf, "kernfs_node", "id", 8)?,
        member(btf, "task_struct", "cgroups", POINTER)?,
        subsys.offset + memory_cgrp_id * POINTER,
    ))
}

type ScoresPart = (RssCounters, [u32; 4], u32, u32, u32, u32);

fn scores_part(btf: &Btf) -> Result<ScoresPart, BtfError> {
    let rss = rss_counters(btf)?;
    let mut members = [0; 4];
    for (slot, name) in members.iter_mut().zip([
        "MM_FILEPAGES",
        "MM_ANONPAGES",
        "MM_SWAPENTS",
        "MM_SHMEMPAGES",
    ]) {
        let value = enum_u32(btf, name)?;
        if value >= rss.len {
            return Err(BtfError::NoEnumValue(format!(
                "{name} {value} (mm_struct has {} rss counters)",
                rss.len
            )));
        }
        *slot = value;
    }
    Ok((
        rss,
        members,
        member(btf, "signal_struct", "oom_score_adj", 2)?,
        member(btf, "signal_struct", "live", 4)?,
        member(btf, "mm_struct", "owner", POINTER)?,
        member(btf, "mm_struct", "pgtables_bytes", 8)?,
    ))
}

/// Every field of [`Offsets`] this kernel provides: BTF, then (with tracefs) the
/// `cgroup:cgroup_mkdir` record layout and the memory hierarchy's id.
pub fn compute(btf: &Btf, tracefs: Option<&Path>) -> Layout {
    let mut layout = from_btf(btf);
    let record = match tracefs {
        Some(tracefs) => cgroup_record(tracefs).map_err(|e| super::error_chain(&e)),
        None => Err("tracefs is not mounted".to_string()),
    };
    if let Some((root, level, id, path, hierarchy)) = layout.record(Part::CgroupRecord, record) {
        let o = &mut layout.offsets;
        (
            o.tp_cgroup_root,
            o.tp_cgroup_level,
            o.tp_cgroup_id,
            o.tp_cgroup_path,
            o.memory_hierarchy_id,
        ) = (root, level, id, path, hierarchy);
    }
    layout
}

fn cgroup_record(tracefs: &Path) -> Result<(u32, u32, u32, u32, u32), BpfError> {
    let mut first = None;
    for name in ["cgroup_mkdir", "cgroup_rmdir"] {
        let format = tracefs::read_format(tracefs, "cgroup", name)?;
        let fields = (
            tracefs::field(&format, "root", 4)?,
            tracefs::field(&format, "level", 4)?,
            tracefs::field(&format, "id", 8)?,
            tracefs::field(&format, "path", 4)?,
        );
        // Both programs share one set of offsets: the events share a class, so the layouts
        // are the same; check rather than assume.
        match first {
            None => first = Some(fields),
            Some(mkdir) if mkdir != fields => {
                return Err(BpfError::FieldMissing {
                    path: format.0,
                    field: "root/level/id/path at the offsets of cgroup_mkdir",
                });
            }
            Some(_) => {}
        }
    }
    let (root, level, id, path) = first.unwrap_or_default();
    let cgroups = fs::read_to_string(PROC_CGROUPS).map_err(|source| BpfError::Read {
        path: PROC_CGROUPS.into(),
        source,
    })?;
    let hierarchy = memory_hierarchy_id(&cgroups).ok_or(BpfError::NoMemoryHierarchy)?;
    Ok((root, level, id, path, hierarchy))
}

/// The hierarchy id of the memory controller in `/proc/cgroups`: a v1 hierarchy's id, or 0
/// when it is enabled but on cgroup v2 (whose `cgroup_mkdir` records carry root 0); `None` when
/// the controller is disabled or absent.
pub fn memory_hierarchy_id(proc_cgroups: &str) -> Option<u32> {
    proc_cgroups.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()? != "memory" {
            return None;
        }
        let id: u32 = fields.next()?.parse().ok()?;
        let _cgroups = fields.next()?;
        (fields.next()? == "1").then_some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_memory_hierarchy() {
        let text = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
                    cpuset\t2\t10\t1\n\
                    memory\t4\t120\t1\n";
        assert_eq!(memory_hierarchy_id(text), Some(4));
        // cgroup v2: the controller is on the default hierarchy, id 0.
        assert_eq!(memory_hierarchy_id("memory\t0\t1\t1\n"), Some(0));
        assert_eq!(memory_hierarchy_id("memory\t0\t1\t0\n"), None);
        assert_eq!(memory_hierarchy_id("cpu\t3\t1\t1\n"), None);
    }
}
