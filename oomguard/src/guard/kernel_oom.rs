//! Attributing the kernel's own OOM kills: the `memory.oom_control` eventfd (or the v2
//! watcher's `memory.events`) says the kernel OOM path ran in a subtree; the subtree's
//! `oom_kill` counter says when it has counted the kill; the eBPF `mark_victim` records
//! name the victims. Each kill is reported once, by the innermost guarded cgroup whose
//! counter moved.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::registry::Registry;
use super::{Guard, drain};
use crate::bpf::Record;
use crate::report::{Action, Killed};

/// How long to wait for the kernel to count a kill after its OOM notification.
const OOM_COUNT_WAIT: Duration = Duration::from_secs(3);
/// Victims kept per cgroup for its next report (a fork bomb's OOM kills are not all named).
const KEPT_VICTIMS: usize = 16;

/// What a cgroup's subtree `oom_kill` counter says after an OOM notification.
#[derive(Debug, PartialEq, Eq)]
enum Counted {
    /// `n` kills the last report did not cover.
    New(u64),
    /// None yet: the notification comes when the cgroup enters OOM, before the kill is
    /// counted. Look again until `look_until` (`None`: stop looking, no kill came).
    NotYet { look_until: Option<Instant> },
}

fn counted(total: u64, seen: u64, pending_until: Option<Instant>, now: Instant) -> Counted {
    if total > seen {
        return Counted::New(total - seen);
    }
    let look_until = match pending_until {
        None => Some(now + OOM_COUNT_WAIT),
        Some(t) if t <= now => None,
        Some(t) => Some(t),
    };
    Counted::NotYet { look_until }
}

/// Keeps a kernel victim for the next report of each of `paths`.
fn stash(reg: &mut Registry, paths: &[PathBuf], victim: &Killed) {
    for p in paths {
        if let Some(e) = reg.entries.get_mut(p)
            && e.kernel_victims.len() < KEPT_VICTIMS
            && !e.kernel_victims.iter().any(|k| k.pid == victim.pid)
        {
            e.kernel_victims.push(victim.clone());
        }
    }
}

/// The victims `path` reports: no guarded cgroup around it reports them again.
fn take_victims(reg: &mut Registry, path: &Path) -> Vec<Killed> {
    let Some(e) = reg.entries.get_mut(path) else {
        return Vec::new();
    };
    let victims = std::mem::take(&mut e.kernel_victims);
    for other in reg.entries.values_mut() {
        other
            .kernel_victims
            .retain(|k| !victims.iter().any(|v| v.pid == k.pid));
    }
    victims
}

impl Guard {
    /// Keeps a kernel OOM victim (a `mark_victim` record) for the report of every guarded
    /// cgroup at or above its cgroup; returns those cgroups. Which limit was hit is not in
    /// the record: their subtree counters tell, as on the eventfd path.
    pub(super) fn stash_victim(&mut self, r: &Record) -> Vec<PathBuf> {
        let Record::KernelOomVictim {
            pid,
            rss_anon,
            rss_file,
            rss_shmem,
            oom_score_adj,
            ..
        } = *r
        else {
            return Vec::new();
        };
        let (paths, victim_cg) = self.victim_paths(r);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let victim = Killed {
            pid: pid as i32,
            comm,
            score: 0,
            rss_bytes: rss_anon + rss_file + rss_shmem,
            oom_score_adj,
            proccgroup: victim_cg
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            outcome: None,
        };
        stash(&mut self.reg, &paths, &victim);
        paths
    }

    /// The guarded cgroups at or above a victim record's cgroup, and its cgroup when known.
    /// A victim in a cgroup that is not guarded itself is placed by its `/proc/PID/cgroup`
    /// (it has not been reaped yet when the record is read, as a rule); when that is gone
    /// too, no cgroup: the OOM eventfd of the cgroup it happened in still reports it, and
    /// no guarded cgroup elsewhere walks its subtree for it.
    pub(super) fn victim_paths(&self, r: &Record) -> (Vec<PathBuf>, Option<PathBuf>) {
        let Record::KernelOomVictim { cgroup_id, pid, .. } = *r else {
            return (Vec::new(), None);
        };
        let victim_cg = self.reg.by_id.get(&cgroup_id).cloned().or_else(|| {
            let pid = pid.to_string();
            crate::cgroup::cgroup_of_pid(&self.deps.memory_mount, &pid)
                .ok()
                .map(|c| c.path)
        });
        let Some(v) = &victim_cg else {
            return (Vec::new(), None);
        };
        (self.reg.at_or_above(v), victim_cg)
    }

    /// Drains the ring now, keeping victims and putting every other record in the backlog.
    /// The kernel counts a kill before `mark_victim` fires, so a victim can still be on its
    /// way: the report then waits for it ([`VICTIM_WAIT`]).
    pub(super) fn collect_victims(&mut self) {
        let mut records = Vec::new();
        if let Some(bpf) = &mut self.deps.ebpf {
            bpf.drain(|r| records.push(r));
        }
        for r in records {
            if let Record::KernelOomVictim { ktime_ns, .. } = r {
                self.stash_victim(&r);
                self.stashed.insert(ktime_ns);
            }
            self.backlog.push(r);
        }
    }

    /// Whether the kernel's victims are named by eBPF records (`mark_victim` attached).
    fn victims_named(&self) -> bool {
        self.deps.ebpf.as_ref().is_some_and(|bpf| {
            bpf.programs()
                .iter()
                .any(|p| p.program == "mark_victim" && p.wanted())
        })
    }

    /// Whether `path` waits on the kernel: an OOM notification whose kill is not counted
    /// yet, or a counted kill whose report waits for its victim's record.
    pub(super) fn oom_waiting(e: &super::registry::Entry) -> bool {
        e.oom_pending_until.is_some() || e.oom_report.is_some()
    }

    pub(super) fn oom_signal(&mut self, path: &Path) {
        let named = self.victims_named();
        let Some(e) = self.reg.entries.get_mut(path) else {
            return;
        };
        if let Some(fd) = &e.armed.oom_fd {
            drain(fd);
        }
        let total = e.armed.cgroup.subtree_oom_kills();
        let now = Instant::now();
        match counted(total, e.oom_kills_seen, e.oom_pending_until, now) {
            Counted::New(n) => {
                e.oom_pending_until = None;
                e.oom_kills_seen = total;
                e.oom_report = Some(held(e.oom_report, n, total, now));
                self.collect_victims();
            }
            Counted::NotYet { look_until } => {
                if e.oom_report.is_none() {
                    e.oom_pending_until = look_until;
                    return;
                }
            }
        }
        let Some(e) = self.reg.entries.get_mut(path) else {
            return;
        };
        let Some(report) = e.oom_report else {
            return;
        };
        if !report_now(&report, !e.kernel_victims.is_empty(), named, now) {
            return;
        }
        e.oom_report = None;
        let usage = e
            .armed
            .cgroup
            .counter_usage(e.armed.thresholds.counter)
            .unwrap_or(0);
        let stats = e.armed.cgroup.stat().unwrap_or_default();
        let victims = take_victims(&mut self.reg, path);
        let mut d = self.decision(&self.reg.entries[path], Action::KernelOom, usage, stats);
        if let Some(v) = victims.first() {
            d.proccgroup = v.proccgroup.clone();
        }
        d.killed = victims;
        d.detail = format!(
            "the kernel OOM killer killed {} task(s) in this cgroup's subtree \
             (oom_kill total {})",
            report.new, report.total
        );
        self.deps.reporter.send(d);
    }
}

/// Kernel kills counted in a subtree, waiting for their victims' records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldReport {
    /// Kills since the last report.
    pub new: u64,
    /// The subtree's `oom_kill` counter when last read.
    pub total: u64,
    /// When the first of them was counted.
    pub since: Instant,
}

/// How long a counted kill's report waits for its victim's `mark_victim` record. The kernel
/// counts the kill, sends SIGKILL, then marks the victim: microseconds apart on a node, but
/// a busy or emulated CPU can put the agent's read of the counter in between.
const VICTIM_WAIT: Duration = Duration::from_millis(500);

/// `n` more kills counted (total `total`) on top of what `before` held.
fn held(before: Option<HeldReport>, n: u64, total: u64, now: Instant) -> HeldReport {
    match before {
        Some(h) => HeldReport {
            new: h.new + n,
            total,
            since: h.since,
        },
        None => HeldReport {
            new: n,
            total,
            since: now,
        },
    }
}

/// Whether a held report goes out now: its victims are in, no record will name them
/// (`mark_victim` not attached), or it waited [`VICTIM_WAIT`].
fn report_now(report: &HeldReport, have_victims: bool, named: bool, now: Instant) -> bool {
    have_victims || !named || now >= report.since + VICTIM_WAIT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::registry::tests::registry;

    fn victim(pid: i32, cgroup: &str) -> Killed {
        Killed {
            pid,
            comm: "hog".into(),
            score: 0,
            rss_bytes: 1,
            oom_score_adj: 0,
            proccgroup: cgroup.into(),
            outcome: None,
        }
    }

    fn pids(victims: Vec<Killed>) -> Vec<i32> {
        victims.iter().map(|k| k.pid).collect()
    }

    #[test]
    fn a_notification_before_the_count_is_looked_at_again_for_a_while() {
        let now = Instant::now();
        assert_eq!(counted(3, 1, None, now), Counted::New(2));
        assert_eq!(
            counted(1, 1, None, now),
            Counted::NotYet {
                look_until: Some(now + OOM_COUNT_WAIT)
            }
        );
        let until = now + Duration::from_secs(1);
        assert_eq!(
            counted(1, 1, Some(until), now),
            Counted::NotYet {
                look_until: Some(until)
            },
            "the first notification's deadline holds"
        );
        assert_eq!(
            counted(1, 1, Some(now), now),
            Counted::NotYet { look_until: None },
            "no kill was counted in time: stop looking"
        );
        assert_eq!(counted(2, 1, Some(until), now), Counted::New(1));
    }

    #[test]
    fn a_victim_is_reported_once_by_the_cgroup_that_reports_first() {
        let mut r = registry(&["/m/pod", "/m/pod/ctr", "/m/other"]);
        let paths = r.at_or_above(Path::new("/m/pod/ctr/unguarded"));
        let v = victim(42, "/m/pod/ctr/unguarded");
        stash(&mut r, &paths, &v);
        stash(&mut r, &paths, &v);
        let inner = pids(take_victims(&mut r, Path::new("/m/pod/ctr")));
        assert_eq!(inner, [42], "once, though its record came twice");
        assert!(
            take_victims(&mut r, Path::new("/m/pod")).is_empty(),
            "not again by the pod around it"
        );
        assert!(take_victims(&mut r, Path::new("/m/other")).is_empty());
        assert!(take_victims(&mut r, Path::new("/m/gone")).is_empty());
    }

    #[test]
    fn the_outer_cgroup_reports_what_the_inner_did_not() {
        let mut r = registry(&["/m/pod", "/m/pod/ctr"]);
        let a = victim(1, "/m/pod/ctr");
        let b = victim(2, "/m/pod/side");
        let ctr = r.at_or_above(Path::new("/m/pod/ctr"));
        let side = r.at_or_above(Path::new("/m/pod/side"));
        stash(&mut r, &ctr, &a);
        stash(&mut r, &side, &b);
        assert_eq!(pids(take_victims(&mut r, Path::new("/m/pod"))), [1, 2]);
        assert!(take_victims(&mut r, Path::new("/m/pod/ctr")).is_empty());
    }

    #[test]
    fn a_counted_kill_waits_a_little_for_its_victims_record() {
        let t0 = Instant::now();
        let first = held(None, 1, 5, t0);
        assert_eq!((first.new, first.total, first.since), (1, 5, t0));
        let later = t0 + Duration::from_millis(10);
        let second = held(Some(first), 2, 7, later);
        assert_eq!(
            (second.new, second.total, second.since),
            (3, 7, t0),
            "kills counted while waiting are added; the wait runs from the first"
        );
        assert!(!report_now(&first, false, true, later), "record not in yet");
        assert!(report_now(&first, true, true, later), "victim named");
        assert!(
            report_now(&first, false, false, later),
            "no mark_victim here"
        );
        assert!(
            report_now(&first, false, true, t0 + VICTIM_WAIT),
            "waited long enough: reported unnamed"
        );
    }

    #[test]
    fn victims_kept_per_cgroup_are_bounded() {
        let mut r = registry(&["/m/a"]);
        let paths = [PathBuf::from("/m/a")];
        for pid in 0..100 {
            stash(&mut r, &paths, &victim(pid, "/m/a"));
        }
        assert_eq!(take_victims(&mut r, Path::new("/m/a")).len(), KEPT_VICTIMS);
    }
}
