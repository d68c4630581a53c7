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

/// The struct-layout half of [`Offsets`], from BTF (no tracefs needed).
pub fn from_btf(btf: &Btf) -> Result<Offsets, BtfError> {
    let pointer = std::mem::size_of::<usize>() as u32;
    let member = |strukt: &str, name: &str, size: u32| -> Result<u32, BtfError> {
        let found = btf.member(strukt, name)?;
        if found.size != size {
            return Err(BtfError::NoMember {
                strukt: strukt.to_string(),
                member: format!("{name} of {size} bytes (it has {})", found.size),
            });
        }
        Ok(found.offset)
    };
    let enum_u32 = |name: &str| -> Result<u32, BtfError> {
        u32::try_from(btf.enum_value(name)?)
            .map_err(|_| BtfError::NoEnumValue(format!("{name} (out of range)")))
    };
    let long = 8;

    let memcg_memory = btf.member("mem_cgroup", "memory")?;
    let page_counter = btf.struct_size("page_counter")?;
    if memcg_memory.size != page_counter {
        return Err(BtfError::NoMember {
            strukt: "mem_cgroup".into(),
            member: "memory (a struct page_counter)".into(),
        });
    }
    let subsys = btf.member("css_set", "subsys")?;
    let memory_cgrp_id = enum_u32("memory_cgrp_id")?;
    if memory_cgrp_id >= subsys.array_len {
        return Err(BtfError::NoEnumValue(format!(
            "memory_cgrp_id {memory_cgrp_id} (css_set has {} subsystems)",
            subsys.array_len
        )));
    }
    let rss_stat = btf.member("mm_struct", "rss_stat")?;
    let percpu_counter_size = btf.struct_size("percpu_counter")?;
    let members = [
        "MM_FILEPAGES",
        "MM_ANONPAGES",
        "MM_SWAPENTS",
        "MM_SHMEMPAGES",
    ]
    .map(enum_u32);
    let [mm_filepages, mm_anonpages, mm_swapents, mm_shmempages] = members;
    let (mm_filepages, mm_anonpages, mm_swapents, mm_shmempages) =
        (mm_filepages?, mm_anonpages?, mm_swapents?, mm_shmempages?);
    for (name, value) in [
        ("MM_FILEPAGES", mm_filepages),
        ("MM_ANONPAGES", mm_anonpages),
        ("MM_SWAPENTS", mm_swapents),
        ("MM_SHMEMPAGES", mm_shmempages),
    ] {
        if value >= rss_stat.array_len {
            return Err(BtfError::NoEnumValue(format!(
                "{name} {value} (mm_struct has {} rss counters)",
                rss_stat.array_len
            )));
        }
    }

    Ok(Offsets {
        page_size: super::page_size(),
        rearm_bytes: REARM_BYTES,
        at_limit_interval_ns: AT_LIMIT_INTERVAL_NS,
        at_limit_slack_bytes: AT_LIMIT_SLACK_BYTES,
        memcg_css: btf.member("mem_cgroup", "css")?.offset,
        memcg_memory: memcg_memory.offset,
        counter_usage: member("page_counter", "usage", long)?,
        counter_max: member("page_counter", "max", long)?,
        css_cgroup: member("cgroup_subsys_state", "cgroup", pointer)?,
        css_parent: member("cgroup_subsys_state", "parent", pointer)?,
        cgroup_kn: member("cgroup", "kn", pointer)?,
        kn_id: member("kernfs_node", "id", 8)?,
        task_pid: member("task_struct", "pid", 4)?,
        task_tgid: member("task_struct", "tgid", 4)?,
        task_mm: member("task_struct", "mm", pointer)?,
        task_signal: member("task_struct", "signal", pointer)?,
        task_cgroups: member("task_struct", "cgroups", pointer)?,
        css_set_memory: subsys.offset + memory_cgrp_id * pointer,
        signal_oom_score_adj: member("signal_struct", "oom_score_adj", 2)?,
        mm_owner: member("mm_struct", "owner", pointer)?,
        mm_rss_stat: rss_stat.offset,
        mm_pgtables_bytes: member("mm_struct", "pgtables_bytes", long)?,
        percpu_counter_size,
        percpu_counter_count: member("percpu_counter", "count", 8)?,
        mm_filepages,
        mm_anonpages,
        mm_swapents,
        mm_shmempages,
        pgpgin: enum_u32("PGPGIN")?,
        pgpgout: enum_u32("PGPGOUT")?,
        ..Offsets::default()
    })
}

/// Every field of [`Offsets`]: BTF, then the `cgroup:cgroup_mkdir` record layout and the
/// memory hierarchy's id.
pub fn compute(btf: &Btf, tracefs: &Path) -> Result<Offsets, BpfError> {
    let mut offsets = from_btf(btf).map_err(BpfError::Btf)?;
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
        if name == "cgroup_mkdir" {
            (
                offsets.tp_cgroup_root,
                offsets.tp_cgroup_level,
                offsets.tp_cgroup_id,
                offsets.tp_cgroup_path,
            ) = fields;
        } else if fields
            != (
                offsets.tp_cgroup_root,
                offsets.tp_cgroup_level,
                offsets.tp_cgroup_id,
                offsets.tp_cgroup_path,
            )
        {
            return Err(BpfError::FieldMissing {
                path: format.0,
                field: "root/level/id/path at the offsets of cgroup_mkdir",
            });
        }
    }
    let cgroups = fs::read_to_string(PROC_CGROUPS).map_err(|source| BpfError::Read {
        path: PROC_CGROUPS.into(),
        source,
    })?;
    offsets.memory_hierarchy_id =
        memory_hierarchy_id(&cgroups).ok_or(BpfError::NoMemoryHierarchy)?;
    Ok(offsets)
}

/// The hierarchy id of the memory controller in `/proc/cgroups`; `None` when it is not on a
/// v1 hierarchy (id 0 means cgroup v2 or unmounted).
pub fn memory_hierarchy_id(proc_cgroups: &str) -> Option<u32> {
    proc_cgroups.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()? != "memory" {
            return None;
        }
        let id: u32 = fields.next()?.parse().ok()?;
        (id != 0).then_some(id)
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
        assert_eq!(memory_hierarchy_id("memory\t0\t1\t1\n"), None);
        assert_eq!(memory_hierarchy_id("cpu\t3\t1\t1\n"), None);
    }
}
