//! Margin and threshold math, and arming a threshold as a cgroup v1 eventfd.
//!
//! `margin = clamp(limit * margin_ratio, min_margin, max_margin)`, `threshold = limit - margin`
//! (the kill threshold). Reclaim happens *before* that: a second, lower threshold at
//! `limit - 2 * margin` starts `memory.force_empty` in the background, so reclaim never sits
//! between the kill threshold's signal and the kill.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::event::{EventfdFlags, eventfd};
use thiserror::Error;

use crate::cgroup::Counter;

const PAGE: u64 = 4096;

fn page_floor(bytes: u64) -> u64 {
    bytes / PAGE * PAGE
}

/// The margin settings (`--margin-ratio`, `--min-margin`, `--max-margin`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Margins {
    pub ratio: f64,
    pub min: u64,
    pub max: u64,
}

impl Default for Margins {
    fn default() -> Self {
        Self {
            ratio: 0.02,
            min: 1 << 20,
            max: 50 << 20,
        }
    }
}

/// The thresholds of one cgroup, all in bytes, on the usage of `counter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Thresholds {
    /// The counter whose usage is compared (its limit is `limit`).
    pub counter: Counter,
    pub limit: u64,
    pub margin: u64,
    /// At or above this usage the policy acts.
    pub kill: u64,
    /// At or above this usage `memory.force_empty` runs in the background.
    pub reclaim: u64,
}

impl Margins {
    pub fn margin(&self, limit: u64) -> u64 {
        let raw = (limit as f64 * self.ratio) as u64;
        raw.clamp(self.min, self.max)
    }

    /// The thresholds for a cgroup with this limit, or `None` when the limit is too small to
    /// leave room for the margin (the cgroup is then left to the kernel).
    ///
    /// Both thresholds are rounded down to whole pages: the kernel rounds a registered
    /// threshold that way, and the guard must compare usage against the very value the
    /// kernel signals on, or a crossing inside the last page would read as "below".
    pub fn thresholds(&self, limit: u64) -> Option<Thresholds> {
        self.thresholds_on(Counter::Memory, limit)
    }

    /// [`Margins::thresholds`] on the usage of `counter`, whose limit is `limit`: the same
    /// margin rule whichever counter binds.
    pub fn thresholds_on(&self, counter: Counter, limit: u64) -> Option<Thresholds> {
        let margin = self.margin(limit);
        let kill = page_floor(limit.checked_sub(margin)?);
        if kill == 0 {
            return None;
        }
        let reclaim = page_floor(kill.saturating_sub(margin)).max(PAGE);
        Some(Thresholds {
            counter,
            limit,
            margin,
            kill,
            reclaim,
        })
    }
}

#[derive(Debug, Error)]
pub enum ArmError {
    #[error("cannot open {file} of {cgroup}")]
    Open {
        cgroup: String,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd")]
    Eventfd(#[source] std::io::Error),
    #[error(
        "no file descriptor left to arm {cgroup}: RLIMIT_NOFILE is {limit}, and the last {FD_RESERVE} are kept for acting on the cgroups already guarded"
    )]
    FdLimit { cgroup: String, limit: u64 },
    #[error("cgroup.event_control of {cgroup} refused a threshold of {bytes} bytes")]
    Register {
        cgroup: String,
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Which file a notification eventfd is registered against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notifier {
    /// The counter's usage file (`memory.usage_in_bytes`, `memory.memsw.usage_in_bytes`)
    /// crossing a threshold (either direction), or the cgroup's removal.
    Usage(Counter, u64),
    /// `memory.oom_control`: the kernel OOM path ran in this cgroup.
    Oom,
}

/// File descriptors an armed eventfd must leave free below RLIMIT_NOFILE. Acting on a
/// guarded cgroup opens a few files at once (usage, `memory.stat`, `cgroup.procs`, `/proc`,
/// a pidfd), and so do the reporters and the runtime client: at the fd limit, arming one
/// more cgroup must not leave the agent unable to kill in those it already guards.
pub const FD_RESERVE: u64 = 32;

/// The soft RLIMIT_NOFILE, if there is one.
fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Registers an eventfd the way kubelet does: open the watched file read-only and
/// `cgroup.event_control` write-only, write `"<efd> <fd> [<bytes>]"`, close both files.
/// The returned eventfd is non-blocking; closing it unregisters the notification.
///
/// Out of file descriptors (EMFILE, or the eventfd would take one of the last
/// [`FD_RESERVE`]) it fails with [`ArmError::FdLimit`], the same error whichever step ran
/// out, so a caller that reports each distinct failure once reports this one once.
pub fn arm(cgroup: &Path, notifier: Notifier) -> Result<OwnedFd, ArmError> {
    let name = || cgroup.display().to_string();
    let out_of_fds = || ArmError::FdLimit {
        cgroup: name(),
        limit: fd_limit().unwrap_or(0),
    };
    let open_error = |file: &'static str, source: std::io::Error| {
        if source.raw_os_error() == Some(libc::EMFILE) {
            out_of_fds()
        } else {
            ArmError::Open {
                cgroup: name(),
                file,
                source,
            }
        }
    };
    let watched_name = match notifier {
        Notifier::Usage(Counter::Memory, _) => "memory.usage_in_bytes",
        Notifier::Usage(Counter::Memsw, _) => "memory.memsw.usage_in_bytes",
        Notifier::Oom => "memory.oom_control",
    };
    let watched = std::fs::File::open(cgroup.join(watched_name))
        .map_err(|source| open_error(watched_name, source))?;
    let mut control = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.event_control"))
        .map_err(|source| open_error("cgroup.event_control", source))?;
    let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| {
        if e == rustix::io::Errno::MFILE {
            out_of_fds()
        } else {
            ArmError::Eventfd(e.into())
        }
    })?;
    // The kernel hands out the lowest free number: an eventfd this high means every
    // number below it is taken.
    if let Some(limit) = fd_limit()
        && efd.as_raw_fd() as u64 + FD_RESERVE >= limit
    {
        return Err(out_of_fds());
    }
    let line = match notifier {
        Notifier::Usage(_, bytes) => {
            format!("{} {} {}", efd.as_raw_fd(), watched.as_raw_fd(), bytes)
        }
        Notifier::Oom => format!("{} {}", efd.as_raw_fd(), watched.as_raw_fd()),
    };
    control
        .write_all(line.as_bytes())
        .map_err(|source| ArmError::Register {
            cgroup: name(),
            bytes: match notifier {
                Notifier::Usage(_, b) => b,
                Notifier::Oom => 0,
            },
            source,
        })?;
    Ok(efd)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn seed_example_1000m() {
        let t = Margins::default().thresholds(1000 * M).unwrap();
        assert_eq!(t.margin, 20 * M);
        assert_eq!(t.kill, 980 * M);
        assert_eq!(t.reclaim, 960 * M);
    }

    #[test]
    fn margin_is_clamped() {
        let m = Margins::default();
        assert_eq!(m.margin(10 * M), M, "2% of 10M is below min_margin 1M");
        assert_eq!(
            m.margin(10_000 * M),
            50 * M,
            "2% of 10G is above max_margin 50M"
        );
        let upstream = Margins {
            ratio: 0.02,
            min: M,
            max: 30 * M,
        };
        assert_eq!(upstream.margin(4096 * M), 30 * M);
    }

    #[test]
    fn thresholds_are_whole_pages() {
        let m = Margins {
            ratio: 0.1,
            min: M,
            max: 50 * M,
        };
        let t = m.thresholds(128 * M).unwrap();
        // 10% of 128M is 13421772.8 bytes: not a page multiple.
        assert_eq!(t.kill % 4096, 0);
        assert_eq!(t.reclaim % 4096, 0);
        assert!(t.kill <= 128 * M - t.margin && t.kill > 128 * M - t.margin - 4096);
    }

    #[test]
    fn memsw_thresholds_follow_the_same_rule() {
        let m = Margins::default();
        let memsw = m.thresholds_on(Counter::Memsw, 1000 * M).unwrap();
        let memory = m.thresholds(1000 * M).unwrap();
        assert_eq!(memsw.counter, Counter::Memsw);
        assert_eq!(memory.counter, Counter::Memory);
        assert_eq!(
            (memsw.limit, memsw.margin, memsw.kill, memsw.reclaim),
            (memory.limit, memory.margin, memory.kill, memory.reclaim)
        );
        assert_ne!(memsw, memory, "a change of counter re-arms");
    }

    #[test]
    fn tiny_limits_are_not_guarded() {
        let m = Margins::default();
        assert_eq!(m.thresholds(M), None);
        assert_eq!(m.thresholds(M / 2), None);
        let t = m.thresholds(M + 4096).unwrap();
        assert_eq!(t.kill, 4096);
        assert_eq!(t.reclaim, 4096);
    }
}
