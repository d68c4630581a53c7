//! The eBPF programs against the running kernel and real memory cgroups. Runs as root on a
//! cgroup v1 host:
//!
//! ```sh
//! sudo -E cargo test -p oomguard --test ebpf -- --test-threads=1
//! ```
//!
//! Every cgroup lives beneath the test's own memory cgroup; every cgroup, process, pin and
//! mount a test makes is removed afterwards, also when it fails. A test is skipped only when a
//! probe says the kernel lacks a feature (and says which); with `OOMGUARD_REQUIRE_ALL_FEATURES`
//! set (CI) that is a failure instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::{
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use fixture::{M, hog, programs_ready, sandbox, wait_exit, wait_rss};
use oomguard::{
    bpf::{self, EbpfGuard, Record, Role, TaskScore, Threshold},
    cgroup::{DEFAULT_MEMORY_ROOT, cgroup_of_pid},
};

/// Sets [`bpf::HIDE_HOOKS_ENV`] for its lifetime (tests run one at a time, under
/// `fixture::serial()`).
struct HiddenHooks;

impl HiddenHooks {
    fn new(hooks: &str) -> Self {
        // SAFETY: the tests of this binary run one at a time (`--test-threads=1` and the
        // serial lock), and nothing else reads the environment meanwhile.
        unsafe { std::env::set_var(bpf::HIDE_HOOKS_ENV, hooks) };
        Self
    }
}

impl Drop for HiddenHooks {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { std::env::remove_var(bpf::HIDE_HOOKS_ENV) };
    }
}

/// Unmounts, on drop, tracefs and bpffs if they were not mounted when it was made:
/// [`EbpfGuard::load`] mounts them when missing.
struct MountGuard {
    before: Vec<(&'static str, &'static str)>,
}

const MOUNTS: [(&str, &str); 2] = [("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")];

fn mounted(target: &str, fstype: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(target) && fields.next() == Some(fstype)
        })
}

impl MountGuard {
    fn new() -> Self {
        Self {
            before: MOUNTS
                .into_iter()
                .filter(|(target, fstype)| mounted(target, fstype))
                .collect(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        for (target, fstype) in MOUNTS {
            if self.before.contains(&(target, fstype)) || !mounted(target, fstype) {
                continue;
            }
            let c = std::ffi::CString::new(target).unwrap();
            // SAFETY: a valid NUL-terminated path that outlives the call.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "could not unmount {target}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// A loaded guard with its own pin directory, unpinned on drop.
struct Loaded {
    guard: Option<EbpfGuard>,
    // Dropped after the guard: the programs go before the mounts they came with.
    _mounts: MountGuard,
}

static PIN_COUNTER: AtomicU32 = AtomicU32::new(0);

fn pin_dir() -> PathBuf {
    let n = PIN_COUNTER.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/oomguard-test-{}-{n}",
        std::process::id()
    ))
}

impl Loaded {
    fn new() -> Self {
        let mounts = MountGuard::new();
        let guard = EbpfGuard::load(&pin_dir()).expect("load the eBPF programs");
        Self {
            guard: Some(guard),
            _mounts: mounts,
        }
    }
    fn get(&mut self) -> &mut EbpfGuard {
        self.guard.as_mut().unwrap()
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            let _ = guard.unpin();
        }
    }
}

/// Drains records until `done` says the collected ones suffice, or `timeout` passes. Waits in
/// poll(2) on the ring buffer's fd, as the guard thread's epoll does.
fn collect(
    guard: &mut EbpfGuard,
    timeout: Duration,
    mut done: impl FnMut(&[(Record, u64)]) -> bool,
) -> Vec<(Record, u64)> {
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    loop {
        guard.drain(|record| records.push((record, bpf::monotonic_ns())));
        if done(&records) {
            return records;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return records;
        }
        let mut pfd = libc::pollfd {
            fd: guard.ring_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
    }
}

fn crossings(records: &[(Record, u64)], id: u64, which: Threshold) -> Vec<(u64, u64, u64)> {
    records
        .iter()
        .filter_map(|(r, drained)| match r {
            Record::Crossing {
                threshold,
                cgroup_id,
                usage_bytes,
                threshold_bytes,
                ktime_ns,
                ..
            } if *cgroup_id == id && *threshold == which => Some((
                *usage_bytes,
                *threshold_bytes,
                drained.saturating_sub(*ktime_ns),
            )),
            _ => None,
        })
        .collect()
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn loads_attaches_and_pins_then_unpins() {
    if !programs_ready(&[]) {
        return;
    }
    let _serial = fixture::serial();
    let mounts = MountGuard::new();
    let dir = pin_dir();
    // A stale pin from an earlier run is replaced.
    let guard = EbpfGuard::load(&dir).expect("load");
    drop(guard);
    assert!(dir.join("THRESHOLDS").exists(), "pins survive a drop");
    let guard = EbpfGuard::load(&dir).expect("load over stale pins");
    for name in bpf::PINNED_MAPS {
        assert!(
            dir.join(name).exists(),
            "{name} is not pinned in {}",
            dir.display()
        );
    }
    guard.unpin().expect("unpin");
    assert!(!dir.exists(), "{} is left behind", dir.display());
    drop(mounts);
}

#[test]
fn reports_each_threshold_crossing_once_and_rearms() {
    if !programs_ready(&[]) {
        return;
    }
    let _serial = fixture::serial();
    crossing_rounds("preferred");
}

/// Without `count_memcg_events` (kernels before about 6.13), the crossings come from
/// `rss_stat`, the same way.
#[test]
fn rss_stat_gives_the_crossings_where_count_memcg_events_is_missing() {
    if !programs_ready(&["rss_pressure"]) {
        return;
    }
    let _serial = fixture::serial();
    let _hidden = HiddenHooks::new("count_memcg_events");
    crossing_rounds("rss_pressure");
}

/// On v1 kernels with `count_memcg_events` the crossings come from it (at the charge itself),
/// also with `rss_stat` gone.
#[test]
fn count_memcg_events_gives_the_crossings_where_rss_stat_is_missing() {
    if !programs_ready(&["memcg_pressure"]) {
        return;
    }
    let _serial = fixture::serial();
    let _hidden = HiddenHooks::new("rss_stat");
    crossing_rounds("memcg_pressure");
}

/// Two rounds of an anonymous hog growing past both thresholds: one record of each per round.
/// `program`: the crossing program that must be the one attached ("preferred": whichever).
fn crossing_rounds(program: &str) {
    let sb = sandbox("oomguard-ebpf-cross", 512 * M);
    let id = sb.cg.id().unwrap();
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    assert!(guard.has_crossing(), "{:#?}", guard.programs());
    let attached: Vec<&str> = guard
        .programs()
        .iter()
        .filter(|p| p.role == Role::Crossing && p.wanted() && !p.on_demand)
        .map(|p| p.program)
        .collect();
    eprintln!(
        "crossing program: {attached:?}, charge program on demand: {:?}",
        guard.charge_hook_state()
    );
    assert_eq!(attached.len(), 1, "exactly one crossing program runs");
    if program != "preferred" {
        assert_eq!(attached, [program]);
    }
    let (reclaim, kill_at) = (64 * M, 96 * M);
    guard.set_thresholds(id, reclaim, kill_at).unwrap();

    for round in 0..2 {
        let mut hog_child = hog(&sb.cg, &["--rate", "200M", "--total", "128M"]);
        let records = collect(guard, Duration::from_secs(60), |r| {
            !crossings(r, id, Threshold::Kill).is_empty()
        });
        // Hold at 128M for a while: usage stays above both thresholds, so no more records.
        wait_rss(&hog_child, 128 * M, Duration::from_secs(60));
        let later = collect(guard, Duration::from_millis(300), |_| false);
        let all: Vec<_> = records.into_iter().chain(later).collect();
        let r = crossings(&all, id, Threshold::Reclaim);
        let k = crossings(&all, id, Threshold::Kill);
        eprintln!(
            "round {round}: reclaim crossings (usage, threshold, drain latency ns) {r:?}; kill {k:?}"
        );
        assert_eq!(r.len(), 1, "one reclaim crossing per crossing: {r:?}");
        assert_eq!(k.len(), 1, "one kill crossing per crossing: {k:?}");
        assert!(r[0].0 >= reclaim && r[0].1 == reclaim, "{r:?}");
        assert!(k[0].0 >= kill_at && k[0].1 == kill_at, "{k:?}");
        eprintln!(
            "round {round}: past the threshold by {} KiB (reclaim) and {} KiB (kill)",
            (r[0].0 - reclaim) / 1024,
            (k[0].0 - kill_at) / 1024
        );
        if let Some((attached, attaches)) = guard.charge_hook_state() {
            eprintln!("round {round}: charge program attached {attached}, {attaches} attaches");
            assert!(attached, "attached on the approach, still near");
            assert_eq!(attaches, round + 1, "attached once per approach");
        }
        // Usage falls to nothing: both thresholds re-arm for the next round.
        kill(&mut hog_child);
        collect(guard, Duration::from_millis(200), |_| false);
        if guard.charge_hook_state().is_some() {
            // Far again: detached within the hold time and a check or two.
            let deadline = Instant::now() + Duration::from_secs(10);
            while guard
                .charge_hook_state()
                .is_some_and(|(attached, _)| attached)
                && Instant::now() < deadline
            {
                collect(guard, Duration::from_millis(100), |_| false);
            }
            assert_eq!(
                guard.charge_hook_state().map(|(attached, _)| attached),
                Some(false),
                "detached once no cgroup is near"
            );
        }
    }
    guard.remove_cgroup(id).unwrap();
    assert_eq!(guard.thresholds(id).unwrap(), None);
}

/// A hook the kernel lacks costs its own program only: the others load, and the start-up log
/// and `doctor` get one line naming the program, why, and what is lost.
#[test]
fn a_missing_hook_costs_only_its_own_program() {
    if !programs_ready(&[]) {
        return;
    }
    let _serial = fixture::serial();
    let _hidden = HiddenHooks::new("mark_victim,cgroup_mkdir");
    let caps = bpf::capabilities();
    // Only the hidden ones: the kernel may lack others of its own (6.1: count_memcg_events).
    let missing: Vec<String> = caps
        .missing_programs()
        .into_iter()
        .filter(|l| l.contains(bpf::HIDE_HOOKS_ENV))
        .collect();
    eprintln!("{missing:#?}");
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(missing[0].contains("mark_victim") && missing[0].contains("memory.oom_control"));
    assert!(missing[1].contains("cgroup_mkdir") && missing[1].contains("inotify"));
    assert!(caps.usable(), "{:?}", caps.reason());

    let mut loaded = Loaded::new();
    let guard = loaded.get();
    let wanted: Vec<&str> = guard
        .programs()
        .iter()
        .filter(|p| p.wanted())
        .map(|p| p.program)
        .collect();
    eprintln!("attached: {wanted:?}");
    assert!(!wanted.contains(&"mark_victim") && !wanted.contains(&"cgroup_mkdir"));
    assert!(wanted.contains(&"cgroup_rmdir") && wanted.contains(&"at_limit"));
    assert!(guard.has_crossing() && guard.has_scores());
}

/// With no crossing program possible, `--mode ebpf` has nothing to run on: the reason names
/// both crossing programs.
#[test]
fn no_crossing_program_is_the_reason_ebpf_mode_cannot_run() {
    if !programs_ready(&[]) {
        return;
    }
    let _serial = fixture::serial();
    let _hidden = HiddenHooks::new("count_memcg_events,rss_stat");
    let caps = bpf::capabilities();
    let reason = caps
        .reason()
        .expect("not usable without a crossing program");
    eprintln!("{reason}");
    assert!(reason.contains("no crossing signal"), "{reason}");
    assert!(reason.contains("memcg_pressure") && reason.contains("rss_pressure"));
    // The score programs on rss_stat go too; the rest still could load.
    assert!(caps.loadable());
    assert!(
        caps.missing_programs()
            .iter()
            .any(|l| l.contains("rss_stat) not loaded"))
    );
}

/// The thresholds map holds 16,384 cgroups; one more is a clear error (the guard then keeps
/// the cgroup on its eventfd), and a freed slot takes a cgroup again.
#[test]
fn a_full_thresholds_map_refuses_with_a_clear_error() {
    if !programs_ready(&[]) {
        return;
    }
    let _serial = fixture::serial();
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    // Ids no cgroup has (inode numbers this high are not handed out).
    let base = u64::MAX - u64::from(oomguard_common::THRESHOLDS_MAX_ENTRIES) - 10;
    let ids = base..base + u64::from(oomguard_common::THRESHOLDS_MAX_ENTRIES);
    for id in ids.clone() {
        guard.set_thresholds(id, 1, 2).unwrap();
    }
    let err = guard.set_thresholds(u64::MAX, 1, 2).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, bpf::BpfError::Full { .. }), "{err:?}");
    assert!(err.to_string().contains("full (16384 entries)"), "{err}");
    guard.remove_cgroup(base).unwrap();
    guard.set_thresholds(u64::MAX, 1, 2).unwrap();
    for id in ids.skip(1).chain([u64::MAX]) {
        guard.remove_cgroup(id).unwrap();
    }
}

#[test]
fn reports_a_cgroup_at_its_limit_and_the_kernel_oom_victim() {
    if !programs_ready(&["at_limit", "mark_victim"]) {
        return;
    }
    let _serial = fixture::serial();
    let limit = 64 * M;
    let sb = sandbox("oomguard-ebpf-limit", limit);
    let id = sb.cg.id().unwrap();
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    guard
        .set_thresholds(id, limit - 16 * M, limit - 8 * M)
        .unwrap();

    // Nobody kills it but the kernel.
    let mut hog_child = hog(&sb.cg, &["--rate", "0", "--total", "256M"]);
    let pid = hog_child.id();
    let records = collect(guard, Duration::from_secs(60), |r| {
        r.iter()
            .any(|(r, _)| matches!(r, Record::KernelOomVictim { pid: p, .. } if *p == pid))
    });
    let status = wait_exit(&mut hog_child, Duration::from_secs(60));
    assert!(
        fixture::killed_by_sigkill(status),
        "the kernel did not kill the hog: {status:?}"
    );

    let at_limit: Vec<_> = records
        .iter()
        .filter_map(|(r, drained)| match r {
            Record::AtLimit {
                cgroup_id,
                usage_bytes,
                limit_bytes,
                ktime_ns,
                ..
            } if *cgroup_id == id => Some((*usage_bytes, *limit_bytes, *ktime_ns, *drained)),
            _ => None,
        })
        .collect();
    eprintln!("at-limit records (usage, limit, ktime, drained): {at_limit:?}");
    assert!(!at_limit.is_empty(), "no at-limit record in {records:?}");
    for (usage, limit_bytes, _, _) in &at_limit {
        assert_eq!(*limit_bytes, limit);
        assert!(
            usage + 2 * M >= limit,
            "usage {usage} is not at the limit {limit}"
        );
    }
    for pair in at_limit.windows(2) {
        assert!(
            pair[1].2 - pair[0].2 >= 1_000_000,
            "at-limit records less than 1 ms apart: {pair:?}"
        );
    }

    let victim = records.iter().find_map(|(r, _)| match r {
        Record::KernelOomVictim {
            pid: p,
            cgroup_id,
            rss_anon,
            cgroup_limit_bytes,
            ..
        } if *p == pid => Some((*cgroup_id, *rss_anon, *cgroup_limit_bytes)),
        _ => None,
    });
    eprintln!("mark_victim (cgroup id, rss_anon, cgroup limit): {victim:?}");
    let (victim_cgroup, rss_anon, victim_limit) = victim.expect("a mark_victim record");
    assert_eq!(victim_cgroup, id);
    assert_eq!(victim_limit, limit);
    assert!(rss_anon > limit / 2, "victim rss_anon {rss_anon}");
    assert!(sb.cg.oom_control().unwrap().oom_kill >= 1);
}

/// RssAnon, RssFile, RssShmem of `/proc/PID/status`, in bytes.
fn proc_rss(pid: u32) -> (u64, u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("RssAnon"), field("RssFile"), field("RssShmem"))
}

/// The kernel's rss counters are per-CPU with a batch of max(32, 2 × CPUs) pages (6.2+); the
/// shared count the programs read may trail the exact sum `/proc` shows by a batch per CPU.
/// Before 6.2 each thread keeps up to 64 page events (TASK_RSS_EVENTS_THRESH) of its own
/// before folding them into the mm's atomics, and /proc and the program may each see a
/// different fold: two of those per counter.
fn tolerance() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    (cpus * 32.max(2 * cpus)).max(2 * 64) * bpf::page_size()
}

/// Within the counters' error, or 1% of the value (a TCG guest's 6.12 was seen 145 pages off
/// on 130 MiB, past the per-CPU batch bound: the program updates the map only when the shared
/// counter moves, so its snapshot can trail by what the last moves left unfolded).
fn assert_close(what: &str, map: u64, proc: u64) {
    let diff = map.abs_diff(proc);
    let tolerance = tolerance().max(proc / 100);
    eprintln!("{what}: map {map}, /proc {proc}, off by {diff} (tolerance {tolerance})");
    assert!(diff <= tolerance, "{what}: map {map} vs /proc {proc}");
}

#[test]
fn task_scores_follow_proc() {
    if !programs_ready(&[
        "rss_stat",
        "sched_process_fork",
        "sched_process_exit",
        "oom_score_adj_update",
    ]) {
        return;
    }
    let _serial = fixture::serial();
    let sb = sandbox("oomguard-ebpf-tasks", 1024 * M);
    // Started before the programs: known only through seeding.
    let mut early = hog(&sb.cg, &["--rate", "0", "--total", "32M", "--adj", "100"]);
    wait_rss(&early, 32 * M, Duration::from_secs(60));
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    let early_pid = early.id() as i32;
    // The map may know it already (its rss moved since the attach); seed the rest.
    let seeded = guard.seed_tasks_from_proc().unwrap();
    eprintln!("seeded {seeded} processes");
    let scores = guard.task_scores(&[early_pid]);
    assert_eq!(scores.len(), 1, "the early hog is not in the map");
    let (anon, file, shmem) = proc_rss(early.id());
    assert_close("early RssAnon", scores[0].1.rss_anon, anon);
    assert_close("early RssFile", scores[0].1.rss_file, file);
    assert_close("early RssShmem", scores[0].1.rss_shmem, shmem);
    assert_eq!(scores[0].1.oom_score_adj, 100);

    // Started after: fork, exec, its own adj write and its faults keep the map current.
    let mut late = hog(&sb.cg, &["--rate", "0", "--total", "96M", "--adj", "300"]);
    wait_rss(&late, 96 * M, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(50));
    let late_pid = late.id() as i32;
    let score: TaskScore = guard.task_scores(&[late_pid]).first().unwrap().1;
    let (anon, file, shmem) = proc_rss(late.id());
    assert_close("late RssAnon", score.rss_anon, anon);
    assert_close("late RssFile", score.rss_file, file);
    assert_close("late RssShmem", score.rss_shmem, shmem);
    assert_eq!(score.oom_score_adj, 300);
    assert!(score.pgtables > 0);

    // Exit removes the entry.
    kill(&mut late);
    kill(&mut early);
    assert!(
        guard.task_scores(&[late_pid, early_pid]).is_empty(),
        "exited tasks remain"
    );

    // Per-pid lookups against one pass over the map, for every process there is.
    let pids: Vec<i32> = guard
        .all_task_scores()
        .unwrap()
        .iter()
        .map(|(p, _)| *p)
        .collect();
    let start = Instant::now();
    let looked_up = guard.task_scores(&pids);
    let lookups = start.elapsed();
    let start = Instant::now();
    let walked = guard.all_task_scores().unwrap();
    let walk = start.elapsed();
    eprintln!(
        "{} pids: per-pid lookups {lookups:?} ({} found), one pass {walk:?} ({} entries)",
        pids.len(),
        looked_up.len(),
        walked.len()
    );
}

#[test]
fn reports_cgroups_made_and_removed() {
    if !programs_ready(&["cgroup_mkdir", "cgroup_rmdir"]) {
        return;
    }
    let _serial = fixture::serial();
    let sb = sandbox("oomguard-ebpf-dirs", 64 * M);
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    let child = sb.child("made-after-start").unwrap();
    let id = fs::metadata(&child.path).unwrap().ino();
    let records = collect(guard, Duration::from_secs(60), |r| {
        r.iter()
            .any(|(r, _)| matches!(r, Record::CgroupMkdir(d) if d.cgroup_id == id))
    });
    let made = records
        .iter()
        .find_map(|(r, _)| match r {
            Record::CgroupMkdir(d) if d.cgroup_id == id => Some(d.clone()),
            _ => None,
        })
        .expect("a mkdir record");
    eprintln!("mkdir record: {made:?}");
    let own = cgroup_of_pid(Path::new(DEFAULT_MEMORY_ROOT), "self").unwrap();
    let relative = child.path.strip_prefix(DEFAULT_MEMORY_ROOT).unwrap();
    assert_eq!(made.path, Path::new("/").join(relative));
    assert_eq!(
        made.level as usize,
        relative.components().count(),
        "level of {} (own cgroup {})",
        child.path.display(),
        own.path.display()
    );

    fs::remove_dir(&child.path).unwrap();
    let records = collect(guard, Duration::from_secs(60), |r| {
        r.iter()
            .any(|(r, _)| matches!(r, Record::CgroupRmdir(d) if d.cgroup_id == id))
    });
    assert!(
        records.iter().any(
            |(r, _)| matches!(r, Record::CgroupRmdir(d) if d.cgroup_id == id && d.path == made.path)
        ),
        "no rmdir record in {records:?}"
    );
}

/// `MAJOR.MINOR` of the running kernel, from `uname -r`.
fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// The layout read from this kernel's BTF (`/sys/kernel/btf/vmlinux`: the host's, and in the
/// kernel matrix the guests' 6.1 and 6.12) is the one the kernel's version says it has: the
/// `mm_struct` rss counters are an `atomic_long_t count[]` before 6.2 and an array of
/// `struct percpu_counter` since. The version is the oracle here only; the agent decides by BTF.
/// No part of the layout may be missing on the kernels of the matrix, on v1 or v2.
#[test]
fn btf_layout_is_the_one_of_this_kernel_version() {
    use oomguard::bpf::offsets;
    let btf = match offsets::vmlinux_btf() {
        Ok(btf) => btf,
        Err(e) => {
            fixture::require(Some(format!("no kernel BTF: {e}")));
            return;
        }
    };
    let version = kernel_version();
    let percpu = version >= (6, 2);
    let rss = offsets::rss_counters(&btf).unwrap();
    eprintln!("{version:?}: {rss:?}");
    // NR_MM_COUNTERS: file, anon, swap entries, shmem (since 4.5).
    assert_eq!((rss.percpu, rss.len), (percpu, 4), "kernel {version:?}");
    let mm = btf.struct_size("mm_struct").unwrap();
    assert!(
        rss.offset + rss.len * rss.stride <= mm,
        "{rss:?} past mm_struct ({mm} bytes)"
    );
    if percpu {
        let counter = btf.struct_size("percpu_counter").unwrap();
        let count = btf.member("percpu_counter", "count").unwrap();
        assert_eq!((rss.stride, rss.value), (counter, count.offset));
        assert_eq!(
            btf.member("mm_struct", "rss_stat").unwrap().offset,
            rss.offset
        );
    } else {
        assert_eq!((rss.stride, rss.value), (8, 0));
        let outer = btf.member("mm_struct", "rss_stat").unwrap();
        assert_eq!(
            outer.offset + btf.member("mm_rss_stat", "count").unwrap().offset,
            rss.offset
        );
    }
    let layout = offsets::from_btf(&btf);
    assert_eq!(layout.problems, [], "kernel {version:?}");
    let o = layout.offsets;
    eprintln!("{o:?}");
    assert_eq!(
        (
            o.mm_filepages,
            o.mm_anonpages,
            o.mm_swapents,
            o.mm_shmempages
        ),
        (0, 1, 2, 3),
        "the rss counter enum (stable since 4.5)"
    );
    assert_eq!(
        (o.mm_rss_stat, o.mm_counter_stride, o.mm_counter_value),
        (rss.offset, rss.stride, rss.value)
    );
    // `struct page_counter` starts with its usage; a memcg's css comes first.
    assert_eq!((o.counter_usage, o.memcg_css), (0, 0));
    assert!(o.counter_max > o.counter_usage);
    assert_ne!(o.pgpgin, o.pgpgout);
}

#[test]
fn this_kernel_has_every_capability() {
    if !fixture::kernel_ready() {
        return;
    }
    let caps = bpf::capabilities();
    eprintln!("{caps:#?}");
    let reason = caps
        .reason()
        .into_iter()
        .chain(caps.missing_programs())
        .collect::<Vec<_>>();
    fixture::require((!reason.is_empty()).then(|| reason.join("; ")));
}

/// The process policy ranks from the eBPF score map exactly as from /proc: over randomized
/// task sets (sizes and oom_score_adj), both sources pick the same victim.
#[test]
fn map_and_proc_pick_the_same_victim() {
    if !programs_ready(&[
        "rss_stat",
        "sched_process_fork",
        "sched_process_exit",
        "oom_score_adj_update",
    ]) {
        return;
    }
    let _serial = fixture::serial();
    let mut loaded = Loaded::new();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        // xorshift64: reproducible from the printed seed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..3 {
        let sb = sandbox(&format!("victim-agree-{round}"), 1 << 30);
        let mut hogs = Vec::new();
        for _ in 0..8 {
            let mib = 4 + next(28);
            let adj = next(4) * 100;
            let h = hog(
                &sb.cg,
                &["--total", &format!("{mib}M"), "--adj", &adj.to_string()],
            );
            hogs.push((h, mib));
        }
        for (h, mib) in &hogs {
            wait_rss(h, mib * M, Duration::from_secs(60));
        }
        let guard = loaded.get();
        let limit = 1 << 30;
        let from_proc = oomguard::victim::candidates(&sb.cg, limit, -1);
        let from_map = oomguard::victim::candidates_from_map(&sb.cg, limit, -1, 8, |pids| {
            guard
                .task_scores(pids)
                .iter()
                .map(|(p, s)| (*p, oomguard::victim::MapScore::from(s)))
                .collect()
        });
        assert_eq!(from_proc.len(), 8);
        assert_eq!(from_map.len(), 8);
        // Both read the kernel's per-CPU rss counters, which are exact only to the counter
        // batch per CPU (three counters: anon, file, shmem), so a near-tie may rank either
        // way. The map's choice must score, by /proc, within that error of /proc's choice.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
        let batch = 32.max(2 * cpus);
        // Per counter: a batch per CPU (6.2+), or two 64-event folds per thread (pre-6.2).
        let tolerance = 3 * (batch * cpus).max(2 * 64);
        let map_pick = from_proc
            .iter()
            .find(|c| c.task.pid == from_map[0].task.pid)
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: the map chose {:?}, not a task of the cgroup",
                    from_map[0]
                )
            });
        assert!(
            from_proc[0].score - map_pick.score <= tolerance,
            "round {round}: /proc chose {:?}, the map chose {:?}, which /proc scores {} points lower \
             (the counters' error is at most {tolerance})",
            from_proc[0],
            from_map[0],
            from_proc[0].score - map_pick.score
        );
        for (h, _) in &mut hogs {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// The messages `log` received (aya-log's records end up there).
static LOGGED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LOGGED
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn a_record_dropped_on_a_full_ring_is_logged_through_aya_log() {
    if !programs_ready(&[]) {
        return;
    }
    let _serial = fixture::serial();
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Trace);
    let sb = sandbox("oomguard-ebpf-full", 512 * M);
    let id = sb.cg.id().unwrap();
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    guard.flush_logs();
    assert!(guard.log_fd().is_some(), "no aya-log ring");
    // Fill the 256 KiB ring without draining it: each mkdir and rmdir is a 512-byte record.
    let mut made = 0;
    for i in 0..2000 {
        let c = sb.child(&format!("filler-{i}")).unwrap();
        std::fs::remove_dir(&c.path).unwrap();
        made += 2;
    }
    guard.set_thresholds(id, 0, 16 * M).unwrap();
    let mut h = hog(&sb.cg, &["--rate", "200M", "--total", "32M"]);
    wait_rss(&h, 32 * M, Duration::from_secs(60));
    kill(&mut h);
    guard.flush_logs();
    let logged = LOGGED.lock().unwrap().clone();
    let want = format!("of memcg {id} dropped");
    let drops: Vec<&String> = logged.iter().filter(|l| l.contains(&want)).collect();
    eprintln!("{made} cgroup records queued; aya-log said: {drops:?}");
    // One line per dropped crossing, not per charge event (thousands while the ring is
    // full). Under load the cgroup can fall back through the re-arm band (its page cache
    // reclaimed) and cross again, which is a crossing of its own: a few lines, not one per
    // event.
    assert!(
        (1..=3).contains(&drops.len()),
        "one log line per dropped crossing: {logged:#?}"
    );
    assert!(
        drops[0].starts_with("WARN ring buffer full: crossing record"),
        "{drops:?}"
    );
    // Once drained, the ring takes the next crossing again: no log for it.
    let drained = guard.drain(|_| {});
    assert!(drained > 100, "only {drained} records were queued");
}

/// This process's cgroup v2 directory, when the memory controller is on cgroup v2 and may be
/// enabled for children there; else why not.
fn own_v2_memory_cgroup() -> Result<PathBuf, String> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let mount = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .find(|m| {
            fs::read_to_string(m.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        })
        .ok_or("the memory controller is not on cgroup v2 here")?;
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    let dir = mount.join(own.trim_start_matches('/'));
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    if !enabled.split_whitespace().any(|c| c == "memory") {
        return Err(format!(
            "memory is not in {}/cgroup.subtree_control",
            dir.display()
        ));
    }
    Ok(dir)
}

/// A cgroup v2 directory of the test's own, removed (after killing what runs in it) on drop.
struct V2Cgroup(PathBuf);

impl Drop for V2Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// On cgroup v2 (kernels without a v1 memory controller, such as Debian's 6.12) the crossing
/// records come the same way, keyed by the cgroup2 directory's inode.
#[test]
fn reports_crossings_on_cgroup_v2() {
    let parent = match own_v2_memory_cgroup() {
        Ok(dir) => dir,
        Err(why) => {
            // Not a missing feature: the host's layout is another one.
            fixture::not_applicable(&why.to_string());
            return;
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        fixture::record_skip("needs root");
        return;
    }
    if !fixture::require(bpf::capabilities().reason()) {
        return;
    }
    let _serial = fixture::serial();
    let cg = V2Cgroup(parent.join(format!("oomguard-ebpf-v2-{}", std::process::id())));
    fs::create_dir(&cg.0).unwrap();
    fs::write(cg.0.join("memory.max"), (512 * M).to_string()).unwrap();
    let id = fs::metadata(&cg.0).unwrap().ino();
    let mut loaded = Loaded::new();
    let guard = loaded.get();
    assert!(guard.has_crossing(), "{:#?}", guard.programs());
    let (reclaim, kill_at) = (64 * M, 96 * M);
    guard.set_thresholds(id, reclaim, kill_at).unwrap();
    let memcg = oomguard::cgroup::MemCgroup::new(&cg.0);
    let mut cmd = std::process::Command::new(fixture::memhog());
    cmd.args(["--rate", "200M", "--total", "128M"])
        .stdout(std::process::Stdio::null());
    let mut child = oomguard_dev::sandbox::in_cgroup(&mut cmd, &memcg)
        .unwrap()
        .spawn()
        .unwrap();
    // Generous: a TCG guest runs 10-50x slower.
    let records = collect(guard, Duration::from_secs(60), |r| {
        !crossings(r, id, Threshold::Kill).is_empty()
    });
    // The score map reads the kernel's rss counters (percpu on 6.2+, atomics before).
    wait_rss(&child, 128 * M, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(50));
    let scores = guard.task_scores(&[child.id() as i32]);
    let (anon, _, _) = proc_rss(child.id());
    kill(&mut child);
    assert_eq!(scores.len(), 1, "the hog is not in the score map");
    assert_close("v2 hog RssAnon", scores[0].1.rss_anon, anon);
    let r = crossings(&records, id, Threshold::Reclaim);
    let k = crossings(&records, id, Threshold::Kill);
    eprintln!("v2 crossings: reclaim {r:?}, kill {k:?}");
    assert_eq!(r.len(), 1, "{records:?}");
    assert_eq!(k.len(), 1, "{records:?}");
    assert!(r[0].0 >= reclaim && k[0].0 >= kill_at);
    guard.remove_cgroup(id).unwrap();
}
