//! Victim scoring with the kernel's `oom_badness` rule, over tasks read from `/proc`.
//!
//! `points = rss + swap entries + page tables (pages) + oom_score_adj * (totalpages / 1000)`,
//! where `totalpages` is the memcg limit in pages for a memcg OOM. Tasks with
//! `oom_score_adj = -1000`, exiting tasks (zombies, no mm) and the agent itself are never
//! candidates. `/proc/PID/oom_score` is scaled to RAM+swap, not to the cgroup limit, so it is
//! not used.

use std::path::{Path, PathBuf};

use crate::cgroup::{Counter, MemCgroup};

pub const PAGE_SIZE: u64 = 4096;
pub const OOM_SCORE_ADJ_MIN: i32 = -1000;
/// The process of a pod's sandbox (pause) container: it holds the pod's namespaces, so
/// killing it kills the whole pod. Never a candidate.
pub const SANDBOX_COMM: &str = "pause";
/// Kubelet's `/pause` stays well under 1 MiB resident. A task named `pause` above this is not
/// a sandbox, whatever it calls itself: a container could otherwise rename its hog (prctl
/// PR_SET_NAME) to make it unkillable by the agent.
pub const SANDBOX_MAX_BYTES: u64 = 16 << 20;

/// Whether `comm` and memory use say "the pod's sandbox process".
pub fn is_sandbox(comm: &str, bytes: u64) -> bool {
    comm == SANDBOX_COMM && bytes <= SANDBOX_MAX_BYTES
}

/// One process as the scorer sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    pub pid: i32,
    pub comm: String,
    /// The memory cgroup directory the task is in.
    pub cgroup: PathBuf,
    /// RssAnon + RssFile + RssShmem.
    pub rss_bytes: u64,
    /// RssAnon: with the page tables, what its death frees (file and tmpfs pages stay).
    pub anon_bytes: u64,
    pub swap_bytes: u64,
    pub pgtables_bytes: u64,
    pub oom_score_adj: i32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22): with the pid, it
    /// names one process for good, so a recycled pid is never mistaken for it.
    pub start_time: u64,
    /// Zombie, dead, or without an mm: the kernel skips such tasks too.
    pub exiting: bool,
}

impl Task {
    /// What killing it gives back to its cgroup's `counter`: anonymous memory and page
    /// tables, and on memsw its swap entries too (freed swap is uncharged from memsw, not
    /// from memory). Its file and shmem pages stay charged (cache, tmpfs) after it dies.
    pub fn freeable_bytes(&self, counter: Counter) -> u64 {
        let swap = match counter {
            Counter::Memory => 0,
            Counter::Memsw => self.swap_bytes,
        };
        self.anon_bytes
            .saturating_add(self.pgtables_bytes)
            .saturating_add(swap)
    }
}

/// A task with its score, best victim first after [`rank`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    #[serde(flatten)]
    pub task: Task,
    pub score: i64,
}

/// The kernel's `oom_badness` for a memcg OOM with a limit of `limit_bytes`.
pub fn badness(task: &Task, limit_bytes: u64) -> i64 {
    let bytes = task
        .rss_bytes
        .saturating_add(task.swap_bytes)
        .saturating_add(task.pgtables_bytes);
    let pages = bytes / PAGE_SIZE;
    let total_pages = (limit_bytes / PAGE_SIZE) as i64;
    pages as i64 + i64::from(task.oom_score_adj) * (total_pages / 1000)
}

/// Scores and orders the candidates, highest score first (ties: larger rss, then lower
/// pid). Leaves out `exclude_pid` (the agent), adj -1000, exiting tasks and sandbox (pause)
/// processes ([`is_sandbox`]).
pub fn rank(tasks: Vec<Task>, limit_bytes: u64, exclude_pid: i32) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = tasks
        .into_iter()
        .filter(|t| {
            t.pid != exclude_pid
                && t.oom_score_adj != OOM_SCORE_ADJ_MIN
                && !t.exiting
                && !is_sandbox(&t.comm, t.rss_bytes)
        })
        .map(|task| Candidate {
            score: badness(&task, limit_bytes),
            task,
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .cmp(&a.score)
            .then(b.task.rss_bytes.cmp(&a.task.rss_bytes))
            .then(a.task.pid.cmp(&b.task.pid))
    });
    out
}

/// Fields of `/proc/PID/status` the scorer needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub state: char,
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub swap_bytes: u64,
    pub pgtables_bytes: u64,
    /// False for kernel threads and zombies: they have no mm.
    pub has_mm: bool,
}

pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    // Saturating: a number no kernel writes must not overflow (a panic in debug builds).
    let kib = |v: &str| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "Name" => s.name = v.to_string(),
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "RssAnon" | "RssFile" | "RssShmem" => {
                if k == "RssAnon" {
                    s.anon_bytes = kib(v);
                }
                s.rss_bytes = s.rss_bytes.saturating_add(kib(v));
                s.has_mm = true;
            }
            "VmSwap" => s.swap_bytes = kib(v),
            "VmPTE" => s.pgtables_bytes = kib(v),
            _ => {}
        }
    }
    s
}

/// Start time (field 22) of `/proc/PID/stat`. The comm field may hold spaces and
/// parentheses, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the comm: field 3 (state) is the first; start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Reads one process from `/proc`; `None` when it is gone.
pub fn read_task(pid: i32, cgroup: &Path) -> Option<Task> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).ok()?;
    let st = parse_status(&status);
    Some(Task {
        pid,
        comm: st.name,
        cgroup: cgroup.to_path_buf(),
        rss_bytes: st.rss_bytes,
        anon_bytes: st.anon_bytes,
        swap_bytes: st.swap_bytes,
        pgtables_bytes: st.pgtables_bytes,
        oom_score_adj: adj.trim().parse().unwrap_or(0),
        start_time: parse_start_time(&stat)?,
        exiting: !st.has_mm || matches!(st.state, 'Z' | 'X' | 'x'),
    })
}

/// Every process of `cgroup` and its descendants, ranked for a limit of `limit_bytes`.
pub fn candidates(cgroup: &MemCgroup, limit_bytes: u64, exclude_pid: i32) -> Vec<Candidate> {
    let tasks = cgroup
        .subtree_procs()
        .into_iter()
        .filter_map(|(cg, pid)| read_task(pid, &cg.path))
        .collect();
    rank(tasks, limit_bytes, exclude_pid)
}

/// A task's memory as the eBPF score map keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapScore {
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub swap_bytes: u64,
    pub pgtables_bytes: u64,
    pub oom_score_adj: i32,
}

impl From<&oomguard_common::TaskScore> for MapScore {
    fn from(s: &oomguard_common::TaskScore) -> Self {
        MapScore {
            rss_bytes: s.rss_anon + s.rss_file + s.rss_shmem,
            anon_bytes: s.rss_anon,
            swap_bytes: s.swap,
            pgtables_bytes: s.pgtables,
            oom_score_adj: s.oom_score_adj,
        }
    }
}

/// Like [`candidates`], but scored from the eBPF score map: one lookup per pid instead of
/// three `/proc` reads per task. `/proc` is read only for the best `want` candidates (their
/// name, start time and state, which the kill needs) and for tasks the map does not hold.
pub fn candidates_from_map(
    cgroup: &MemCgroup,
    limit_bytes: u64,
    exclude_pid: i32,
    want: usize,
    lookup: impl FnOnce(&[i32]) -> Vec<(i32, MapScore)>,
) -> Vec<Candidate> {
    let procs = cgroup.subtree_procs();
    let pids: Vec<i32> = procs.iter().map(|(_, p)| *p).collect();
    let found: std::collections::HashMap<i32, MapScore> = lookup(&pids).into_iter().collect();
    let mut scored: Vec<(i64, u64, i32, &Path)> = Vec::with_capacity(procs.len());
    let mut unknown = Vec::new();
    for (cg, pid) in &procs {
        match found.get(pid) {
            Some(m) if *pid != exclude_pid && m.oom_score_adj != OOM_SCORE_ADJ_MIN => {
                let t = Task {
                    pid: *pid,
                    comm: String::new(),
                    cgroup: PathBuf::new(),
                    rss_bytes: m.rss_bytes,
                    anon_bytes: m.anon_bytes,
                    swap_bytes: m.swap_bytes,
                    pgtables_bytes: m.pgtables_bytes,
                    oom_score_adj: m.oom_score_adj,
                    start_time: 0,
                    exiting: false,
                };
                scored.push((
                    badness(&t, limit_bytes),
                    m.rss_bytes,
                    *pid,
                    cg.path.as_path(),
                ));
            }
            Some(_) => {}
            None => unknown.push((cg, *pid)),
        }
    }
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let mut tasks: Vec<Task> = Vec::new();
    for (_, _, pid, cg) in scored {
        if tasks.len() >= want {
            break;
        }
        // Name, start time and state from /proc; the memory numbers stay the map's.
        if let Some(mut t) = read_task(pid, cg) {
            let m = found[&pid];
            t.rss_bytes = m.rss_bytes;
            t.anon_bytes = m.anon_bytes;
            t.swap_bytes = m.swap_bytes;
            t.pgtables_bytes = m.pgtables_bytes;
            t.oom_score_adj = m.oom_score_adj;
            tasks.push(t);
        }
    }
    tasks.extend(
        unknown
            .into_iter()
            .filter_map(|(cg, pid)| read_task(pid, &cg.path)),
    );
    let mut ranked = rank(tasks, limit_bytes, exclude_pid);
    ranked.truncate(want.max(1));
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn task(pid: i32, rss_mib: u64, adj: i32) -> Task {
        Task {
            pid,
            comm: format!("t{pid}"),
            cgroup: PathBuf::from("/cg"),
            rss_bytes: rss_mib * M,
            anon_bytes: rss_mib * M,
            swap_bytes: 0,
            pgtables_bytes: 0,
            oom_score_adj: adj,
            start_time: 1,
            exiting: false,
        }
    }

    #[test]
    fn badness_matches_kernel_rule() {
        let mut t = task(1, 100, 0);
        t.swap_bytes = 10 * M;
        t.pgtables_bytes = 8192;
        assert_eq!(badness(&t, 1000 * M), (110 * M / 4096 + 2) as i64);
        // adj 500 with a 1000M limit adds 500 * (256000 / 1000) pages = half the limit.
        let t = task(1, 0, 500);
        assert_eq!(badness(&t, 1000 * M), 500 * 256);
        let t = task(1, 100, -1000 + 1);
        assert!(badness(&t, 1000 * M) < 0);
    }

    #[test]
    fn swap_is_freed_on_memsw_only() {
        let mut t = task(1, 100, 0);
        t.swap_bytes = 30 * M;
        t.pgtables_bytes = 4096;
        assert_eq!(t.freeable_bytes(Counter::Memory), 100 * M + 4096);
        assert_eq!(t.freeable_bytes(Counter::Memsw), 130 * M + 4096);
    }

    #[test]
    fn biggest_first() {
        let r = rank(
            vec![task(1, 10, 0), task(2, 300, 0), task(3, 50, 0)],
            1000 * M,
            -1,
        );
        let pids: Vec<i32> = r.iter().map(|c| c.task.pid).collect();
        assert_eq!(pids, vec![2, 3, 1]);
    }

    #[test]
    fn adj_shifts_the_choice() {
        // 50 MiB with adj +300 (+300 * 256 pages = 75 MiB worth) beats 100 MiB with adj 0.
        let r = rank(vec![task(1, 100, 0), task(2, 50, 300)], 1000 * M, -1);
        assert_eq!(r[0].task.pid, 2);
    }

    #[test]
    fn never_adj_min_exiting_or_self() {
        let mut zombie = task(3, 900, 0);
        zombie.exiting = true;
        let r = rank(
            vec![task(1, 800, -1000), task(2, 10, 0), zombie, task(4, 700, 0)],
            1000 * M,
            4,
        );
        let pids: Vec<i32> = r.iter().map(|c| c.task.pid).collect();
        assert_eq!(pids, vec![2]);
    }

    #[test]
    fn never_the_pause_process() {
        let mut pause = task(1, 1, 1000);
        pause.comm = "pause".into();
        let r = rank(vec![pause, task(2, 1, 0)], 1000 * M, -1);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].task.pid, 2);
    }

    #[test]
    fn a_big_task_calling_itself_pause_is_no_sandbox() {
        let mut real = task(1, 1, 1000);
        real.comm = "pause".into();
        let mut fake = task(3, 900, 0);
        fake.comm = "pause".into();
        let r = rank(vec![real, task(2, 10, 0), fake], 1000 * M, -1);
        let pids: Vec<i32> = r.iter().map(|c| c.task.pid).collect();
        assert_eq!(pids, vec![3, 2]);
    }

    #[test]
    fn status_parses() {
        let text = "Name:\tmem hog\nState:\tR (running)\nVmPTE:\t     200 kB\n\
RssAnon:\t  102400 kB\nRssFile:\t    1024 kB\nRssShmem:\t       0 kB\nVmSwap:\t      8 kB\n";
        let s = parse_status(text);
        assert_eq!(s.name, "mem hog");
        assert_eq!(s.state, 'R');
        assert_eq!(s.rss_bytes, (102400 + 1024) * 1024);
        assert_eq!(s.anon_bytes, 102400 * 1024);
        assert_eq!(s.swap_bytes, 8 * 1024);
        assert_eq!(s.pgtables_bytes, 200 * 1024);
        assert!(s.has_mm);
        let kthread = parse_status("Name:\tkworker/0:1\nState:\tI (idle)\n");
        assert!(!kthread.has_mm);
    }

    #[test]
    fn huge_status_numbers_saturate() {
        // Found by the proc_status fuzz target: kB to bytes overflowed.
        let s = parse_status("VmSwap:\t  52426666666666660\nRssAnon:\t 2097152 kB\n");
        assert_eq!(s.swap_bytes, u64::MAX);
        let s = parse_status("RssAnon:\t18014398509481984 kB\nRssFile:\t1 kB\n");
        assert_eq!(s.rss_bytes, u64::MAX);
        let mut t = task(1, 0, 1000);
        (t.rss_bytes, t.swap_bytes) = (u64::MAX, u64::MAX);
        assert_eq!(
            badness(&t, u64::MAX),
            (u64::MAX / PAGE_SIZE) as i64 + 1000 * (u64::MAX / PAGE_SIZE / 1000) as i64
        );
    }

    #[test]
    fn start_time_survives_odd_comm() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = read_task(std::process::id() as i32, Path::new("/x")).unwrap();
        assert!(me.rss_bytes > 0);
        assert!(!me.exiting);
        assert!(me.start_time > 0);
    }
}
