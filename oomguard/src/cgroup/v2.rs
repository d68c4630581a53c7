//! What only cgroup v2 has: `memory.events` counters, PSI triggers on `memory.pressure`,
//! and `memory.high`.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use super::{MemStat, Result, read_string, write_str};

/// Parsed `memory.events` (hierarchical: this cgroup and its descendants).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// Usage went over `memory.high`.
    pub high: u64,
    /// A charge hit `memory.max` (and reclaim ran).
    pub max: u64,
    /// The cgroup hit its limit and reclaim failed: the OOM path ran.
    pub oom: u64,
    /// Tasks the kernel OOM killer killed.
    pub oom_kill: u64,
}

impl MemoryEvents {
    pub fn parse(text: &str) -> Self {
        let st = MemStat::parse(text);
        MemoryEvents {
            high: st.get("high"),
            max: st.get("max"),
            oom: st.get("oom"),
            oom_kill: st.get("oom_kill"),
        }
    }
}

/// The PSI trigger the fallback arms on each guarded cgroup: some task stalled 100 ms on
/// memory within a 1 s window (the kernel's minimum window is 500 ms). It fires only when
/// the cgroup is already reclaiming at its limit, so it is a late signal: a prompt to look
/// now, never the only one.
pub const PSI_TRIGGER: &str = "some 100000 1000000";

/// Arms a PSI trigger on `cgroup`'s `memory.pressure`; the returned fd polls `POLLPRI` when
/// it fires and unregisters when closed.
pub fn psi_trigger(cgroup: &Path, spec: &str) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(cgroup.join("memory.pressure"))?;
    // The kernel wants the trigger, NUL included, in one write.
    let mut buf = spec.as_bytes().to_vec();
    buf.push(0);
    f.write_all(&buf)?;
    Ok(f.into())
}

/// `memory.high` of a v2 cgroup ([`super::UNLIMITED`] for `max`).
pub fn high(cgroup: &Path) -> Result<u64> {
    let path = cgroup.join("memory.high");
    let text = read_string(&path)?;
    super::parse_v2_limit(&text).ok_or(super::CgroupError::Parse { path, text })
}

/// Sets `memory.high` (`None`: `max`, no throttling).
pub fn set_high(cgroup: &Path, bytes: Option<u64>) -> Result<()> {
    let value = bytes.map_or_else(|| "max".to_string(), |b| b.to_string());
    write_str(&cgroup.join("memory.high"), &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_events_parse() {
        let e = MemoryEvents::parse("low 0\nhigh 2\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n");
        assert_eq!(
            e,
            MemoryEvents {
                high: 2,
                max: 17,
                oom: 1,
                oom_kill: 1
            }
        );
        assert_eq!(MemoryEvents::parse(""), MemoryEvents::default());
    }
}
