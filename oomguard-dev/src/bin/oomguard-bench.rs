//! `oomguard-bench` (run it through `cargo xtask bench`): kernel-OOM avoidance, reaction
//! latency, footprint and victim-selection cost, measured side by side in one run on real
//! cgroups beneath our own memory cgroup. Writes JSON and prints a table.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use oomguard::cgroup::MemCgroup;
use oomguard::threshold::Margins;
use oomguard_dev::sandbox::{Agent, Sandbox, in_cgroup, sibling_binary};
use oomguard_dev::soak;
use serde::Serialize;

const M: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "oomguard-bench",
    about = "Measure oomguard against the kernel, side by side"
)]
struct Args {
    /// Fewer trials and scenarios (about 4 minutes instead of about 15).
    #[arg(long)]
    quick: bool,
    /// Only the avoidance scenarios whose name contains this (no footprint or selection);
    /// `container` runs only the container policy's latency, `footprint` only the footprint,
    /// `storm` only the OOM storm, `neighbour` only the stuck neighbour.
    #[arg(long)]
    only: Option<String>,
    /// Only the "no growth" soak: kills and cgroup create/delete cycles against a running
    /// agent in each mode, with its fds, RSS and threads before and after.
    #[arg(long, conflicts_with_all = ["quick", "only"])]
    soak: bool,
    /// Only the per-fault overhead: a process faulting in --overhead-size of anonymous memory,
    /// with no agent, the eventfd agent and the eBPF agent in alternating blocks, in a guarded
    /// and an unguarded cgroup; then the eBPF programs' mean run time with BPF stats on.
    #[arg(long, conflicts_with_all = ["quick", "only", "soak"])]
    overhead: bool,
    /// Alternating blocks of the overhead run (each: every mode, every placement, 3 runs).
    #[arg(long, default_value_t = 5, requires = "overhead")]
    overhead_blocks: usize,
    /// Anonymous memory each overhead run faults in.
    #[arg(long, default_value = "1G", requires = "overhead")]
    overhead_size: oomguard::size::Size,
    /// Kills in the soak (after its warm-up).
    #[arg(long, default_value_t = 1000, requires = "soak")]
    soak_kills: u64,
    /// Cgroup create/delete cycles in the soak (after its warm-up).
    #[arg(long, default_value_t = 1000, requires = "soak")]
    soak_cycles: u64,
    /// Only the differential suite: every scenario with the kernel alone, then with the
    /// agent in each mode ("kernel kills N, agent kills M, agent kills where the kernel
    /// killed nobody K").
    #[arg(long, conflicts_with_all = ["quick", "only", "soak"])]
    differential: bool,
    /// Trials per scenario and side in the differential suite.
    #[arg(long, default_value_t = 3, requires = "differential")]
    differential_trials: u32,
    /// Where to write the JSON results [default: bench-results/latest.json, or
    /// bench-results/soak.json with --soak, bench-results/differential.json with
    /// --differential].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Machine {
    kernel: String,
    cores: usize,
    memory_bytes: u64,
    cpu_model: String,
    modes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct AvoidanceRow {
    scenario: String,
    mode: String,
    trials: u32,
    /// Killed by the agent with the kernel's oom_kill count unchanged.
    guarded: u32,
    /// memory.failcnt stayed 0.
    limit_untouched: u32,
    kernel_kills: u64,
    /// Peak usage past the kill threshold (0 when the peak stayed below it).
    overshoot_p50_kib: u64,
    overshoot_p99_kib: u64,
    /// Agent kills needed per trial (the many-process scenario), mean.
    kills_per_trial: f64,
}

#[derive(Debug, Clone, Serialize)]
struct LatencyRow {
    mode: String,
    samples: usize,
    signal_to_sigkill_p50_us: u64,
    signal_to_sigkill_p99_us: u64,
    signal_to_sigkill_max_us: u64,
    signal_to_gone_p50_us: u64,
    signal_to_gone_p99_us: u64,
    signal_to_gone_max_us: u64,
}

/// The container policy through a private containerd: signal → kill request sent, and
/// signal → the container's cgroup holding no task (the container stopped).
#[derive(Debug, Clone, Serialize)]
struct ContainerLatencyRow {
    mode: String,
    trials: u32,
    /// Killed through containerd (not the direct fallback), the kernel's count unchanged.
    guarded_via_containerd: u32,
    kernel_kills: u64,
    signal_to_kill_request_p50_us: u64,
    signal_to_kill_request_p99_us: u64,
    signal_to_kill_request_max_us: u64,
    signal_to_stopped_p50_us: u64,
    signal_to_stopped_p99_us: u64,
    signal_to_stopped_max_us: u64,
}

#[derive(Debug, Clone, Serialize)]
struct FootprintRow {
    mode: String,
    cgroups: usize,
    /// The agent's first walk: list the cgroups, read their limits, register every
    /// threshold (from its "first walk done" record).
    arm_all_ms: f64,
    /// The first walk until every kill threshold was armed (every cgroup guarded); the
    /// reclaim thresholds are armed after them.
    guarded_ms: f64,
    /// From starting the agent's process to the last cgroup armed (includes loading eBPF).
    start_to_armed_ms: f64,
    rss_kib: u64,
    cpu_percent_of_core: f64,
    window_s: f64,
    /// RSS after this agent then killed 1,000 hogs (the full run's largest row only).
    rss_after_1000_kills_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct SoakRow {
    mode: String,
    #[serde(flatten)]
    outcome: soak::Outcome,
    /// Entries of each pinned eBPF map after the soak (eBPF mode).
    bpf_map_entries: std::collections::BTreeMap<String, u64>,
    /// Cgroups with a limit (guarded) at the end: the kill cgroups.
    guarded_cgroups: usize,
    duration_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct SelectionRow {
    tasks: usize,
    source: String,
    per_selection_us: f64,
    same_victim: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct OverheadRow {
    /// `none`, `eventfd` or `ebpf`.
    agent: String,
    /// Whether the hog's cgroup is guarded (has a limit under the agent's root).
    guarded: bool,
    runs: usize,
    wall_median_ms: f64,
    /// Median over blocks of (this block's median / the same block's no-agent median).
    ratio_median: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ProgramCost {
    program: String,
    runs: u64,
    mean_ns: f64,
    /// Runs per 4 KiB page faulted in.
    runs_per_page: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    quick: bool,
    avoidance: Vec<AvoidanceRow>,
    latency: Vec<LatencyRow>,
    /// Empty when containerd is not installed (see `container_latency_skipped`).
    container_latency: Vec<ContainerLatencyRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_latency_skipped: Option<String>,
    footprint: Vec<FootprintRow>,
    victim_selection: Vec<SelectionRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    soak: Vec<SoakRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    overhead: Vec<OverheadRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    program_cost: Vec<ProgramCost>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    differential: Vec<DiffRow>,
    duration_s: f64,
}

struct Scenario {
    name: &'static str,
    limit: u64,
    /// Bytes per second per workload; 0 = unthrottled.
    rate: u64,
    margin_ratio: f64,
    min_margin: &'static str,
    burners: bool,
    /// Cgroups going over at once.
    cgroups: usize,
    /// Processes per cgroup growing together.
    procs: usize,
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let base = |name, limit, rate| Scenario {
        name,
        limit,
        rate,
        margin_ratio: 0.02,
        min_margin: "1M",
        burners: false,
        cgroups: 1,
        procs: 1,
    };
    let mut v = vec![
        base("128MiB @64MB/s", 128 * M, 64_000_000),
        base("128MiB @256MB/s", 128 * M, 256_000_000),
        base("128MiB unthrottled", 128 * M, 0),
        base("32MiB 1MiB-margin unthrottled", 32 * M, 0),
    ];
    if !quick {
        v.push(Scenario {
            burners: true,
            ..base("128MiB @256MB/s + CPU burners", 128 * M, 256_000_000)
        });
        v.push(Scenario {
            burners: true,
            ..base("32MiB unthrottled + CPU burners", 32 * M, 0)
        });
        v.push(Scenario {
            cgroups: 10,
            ..base("10 cgroups x 128MiB @64MB/s", 128 * M, 64_000_000)
        });
        v.push(Scenario {
            procs: 50,
            ..base("50 procs x 4MB/s in 256MiB", 256 * M, 4_000_000)
        });
    }
    v
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oomguard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let agent = sibling_binary("oomguard").ok_or("oomguard is not next to oomguard-bench")?;
    let memhog = sibling_binary("oomguard-memhog").ok_or("oomguard-memhog is missing")?;
    let machine = machine();
    progress(&format!(
        "{} cores, kernel {}, modes {:?}",
        machine.cores, machine.kernel, machine.modes
    ));
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(if args.soak {
            "bench-results/soak.json"
        } else if args.differential {
            "bench-results/differential.json"
        } else {
            "bench-results/latest.json"
        })
    });
    if args.differential {
        let rows = differential(&machine.modes, args.differential_trials, &agent, &memhog)?;
        let report = Report {
            machine,
            quick: false,
            avoidance: Vec::new(),
            latency: Vec::new(),
            container_latency: Vec::new(),
            container_latency_skipped: None,
            footprint: Vec::new(),
            victim_selection: Vec::new(),
            soak: Vec::new(),
            overhead: Vec::new(),
            program_cost: Vec::new(),
            differential: rows,
            duration_s: started.elapsed().as_secs_f64(),
        };
        return write_report(&report, &out);
    }
    if args.soak {
        let mut rows = Vec::new();
        for mode in machine.modes.iter().filter(|m| m.as_str() != "kernel-only") {
            rows.push(soak_row(
                mode,
                &agent,
                &memhog,
                args.soak_kills,
                args.soak_cycles,
            )?);
        }
        let report = Report {
            machine,
            quick: false,
            avoidance: Vec::new(),
            latency: Vec::new(),
            container_latency: Vec::new(),
            container_latency_skipped: None,
            footprint: Vec::new(),
            victim_selection: Vec::new(),
            soak: rows,
            overhead: Vec::new(),
            program_cost: Vec::new(),
            differential: Vec::new(),
            duration_s: started.elapsed().as_secs_f64(),
        };
        return write_report(&report, &out);
    }
    if args.overhead {
        let bytes = args.overhead_size.bytes();
        let (overhead, program_cost) =
            overhead_rows(&machine.modes, args.overhead_blocks, bytes, &agent)?;
        let report = Report {
            machine,
            quick: false,
            avoidance: Vec::new(),
            latency: Vec::new(),
            container_latency: Vec::new(),
            container_latency_skipped: None,
            footprint: Vec::new(),
            victim_selection: Vec::new(),
            soak: Vec::new(),
            overhead,
            program_cost,
            differential: Vec::new(),
            duration_s: started.elapsed().as_secs_f64(),
        };
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("bench-results/overhead.json"));
        return write_report(&report, &out);
    }
    // Issue 13's rows, each in its own report.
    match args.only.as_deref() {
        Some("storm") => return storm(&machine, &agent, &memhog, args.out.clone()),
        Some("neighbour") => return neighbour(&machine, &agent, &memhog, args.out.clone()),
        _ => {}
    }
    let trials = if args.quick { 5 } else { 20 };
    let mut avoidance = Vec::new();
    let mut latencies: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
    let list: Vec<Scenario> = scenarios(args.quick)
        .into_iter()
        .filter(|s| args.only.as_deref().is_none_or(|o| s.name.contains(o)))
        .collect();
    let modes: Vec<String> = machine.modes.clone();
    for (i, sc) in list.iter().enumerate() {
        for mode in modes.iter().map(String::as_str) {
            progress(&format!(
                "[{}/{}] {} — {mode}, {trials} trials",
                i + 1,
                list.len(),
                sc.name
            ));
            let (row, lat) = avoid(sc, mode, trials, &agent, &memhog)?;
            progress(&format!(
                "    guarded {}/{}, limit untouched {}/{}, kernel kills {}, overshoot p50 {} KiB p99 {} KiB",
                row.guarded,
                row.trials,
                row.limit_untouched,
                row.trials,
                row.kernel_kills,
                row.overshoot_p50_kib,
                row.overshoot_p99_kib
            ));
            avoidance.push(row);
            latencies.entry(mode.to_string()).or_default().extend(lat);
        }
    }
    let latency = latencies
        .iter()
        .filter(|(m, _)| m.as_str() != "kernel-only")
        .map(|(m, l)| latency_row(m, l))
        .collect();
    let mut container_latency = Vec::new();
    let mut container_latency_skipped = None;
    if args
        .only
        .as_deref()
        .is_none_or(|o| "container policy".contains(o))
    {
        match oomguard_dev::sandbox::containerd::probe() {
            Some(why) => {
                progress(&format!("container policy latency skipped: {why}"));
                container_latency_skipped = Some(why);
            }
            None => {
                for mode in modes.iter().filter(|m| m.as_str() != "kernel-only") {
                    let n = if args.quick { 5 } else { 20 };
                    progress(&format!(
                        "container policy latency ({mode}): {n} app containers through containerd"
                    ));
                    let row = container_latency_row(mode, n, &agent, &memhog)?;
                    progress(&format!(
                        "    guarded via containerd {}/{}, kernel kills {}, signal→stopped p50 {} µs p99 {} µs",
                        row.guarded_via_containerd,
                        row.trials,
                        row.kernel_kills,
                        row.signal_to_stopped_p50_us,
                        row.signal_to_stopped_p99_us
                    ));
                    container_latency.push(row);
                }
            }
        }
    }
    let sizes: &[usize] = match (args.only.as_deref(), args.quick) {
        (Some("footprint"), true) | (None, true) => &[10, 100],
        (Some("footprint"), false) | (None, false) => &[10, 100, 1000],
        (Some(_), _) => &[],
    };
    let mut footprint = Vec::new();
    for mode in modes.iter().filter(|m| m.as_str() != "kernel-only") {
        for &n in sizes {
            progress(&format!("footprint ({mode}): {n} idle guarded cgroups"));
            let window = if args.quick { 3.0 } else { 20.0 };
            // The full run's largest agent then kills 1,000 hogs (issue 6: "RSS after
            // 1,000 kills"), about half a minute per mode.
            let kills = (!args.quick && n == 1000).then_some((memhog.as_path(), 1000));
            footprint.push(footprint_row(n, &agent, mode, window, kills)?);
        }
    }
    let mut victim_selection = Vec::new();
    let tasks: &[usize] = if args.only.is_some() {
        &[]
    } else {
        &[10, 100, 1000]
    };
    for &n in tasks {
        progress(&format!("victim selection: {n} tasks in one cgroup"));
        victim_selection.extend(selection_rows(n, &memhog)?);
    }
    let report = Report {
        machine,
        quick: args.quick,
        avoidance,
        latency,
        container_latency,
        container_latency_skipped,
        footprint,
        victim_selection,
        soak: Vec::new(),
        overhead: Vec::new(),
        program_cost: Vec::new(),
        differential: Vec::new(),
        duration_s: started.elapsed().as_secs_f64(),
    };
    write_report(&report, &out)
}

/// Runs of each (agent, placement) per block.
const OVERHEAD_RUNS: usize = 3;

/// The per-fault overhead: `blocks` rounds, each running the hog with no agent, then each
/// agent mode (rotating the order every block so drift spreads evenly), in a guarded and an
/// unguarded cgroup. Then one more eBPF block with `kernel.bpf_stats_enabled=1` for the
/// programs' mean run time (the stats cost time of their own, so the timed blocks run without).
fn overhead_rows(
    modes: &[String],
    blocks: usize,
    bytes: u64,
    agent_exe: &Path,
) -> Result<(Vec<OverheadRow>, Vec<ProgramCost>), String> {
    let sb = Sandbox::new("bench-overhead").map_err(|e| e.to_string())?;
    let guarded = sb.child("guarded").map_err(|e| e.to_string())?;
    // Room for the hog: no threshold is ever crossed, the cost measured is the steady one.
    guarded
        .set_limit(bytes + 512 * M)
        .map_err(|e| e.to_string())?;
    let unguarded = sb.child("unguarded").map_err(|e| e.to_string())?;
    let mut agents: Vec<&str> = vec!["none"];
    agents.extend(
        modes
            .iter()
            .map(String::as_str)
            .filter(|m| *m != "kernel-only"),
    );
    let run_once = |cg: &MemCgroup| fault_in(cg, bytes as usize);
    let root = sb.path().display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-overhead-{}", std::process::id());
    let state = StateDir::new("overhead")?;
    let start_agent = |mode: &str| -> Result<Agent, String> {
        let mut flags = vec!["--root", &root, "--mode", mode, "--bpf-pin-dir", &pins];
        flags.extend(["--state-dir", state.path(), "--policy", "noop"]);
        let agent = Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?;
        agent
            .wait_armed(&guarded.path, Duration::from_secs(60))
            .ok_or("the guarded cgroup was not armed within 60 s")?;
        Ok(agent)
    };
    // (agent, guarded) → per-block medians.
    let mut medians: std::collections::BTreeMap<(String, bool), Vec<f64>> = Default::default();
    let mut all: std::collections::BTreeMap<(String, bool), Vec<f64>> = Default::default();
    for block in 0..blocks {
        let mut order = agents.clone();
        order.rotate_left(block % agents.len());
        for mode in order {
            let agent = match mode {
                "none" => None,
                m => Some(start_agent(m)?),
            };
            for (cg, is_guarded) in [(&guarded, true), (&unguarded, false)] {
                let mut times = Vec::new();
                for _ in 0..OVERHEAD_RUNS {
                    times.push(run_once(cg)?);
                }
                all.entry((mode.to_string(), is_guarded))
                    .or_default()
                    .extend(&times);
                medians
                    .entry((mode.to_string(), is_guarded))
                    .or_default()
                    .push(median(&mut times));
            }
            drop(agent);
            progress(&format!("    block {}/{blocks}: {mode} done", block + 1));
        }
    }
    let mut rows = Vec::new();
    for ((mode, is_guarded), per_block) in &medians {
        let base = &medians[&("none".to_string(), *is_guarded)];
        let mut ratios: Vec<f64> = per_block.iter().zip(base).map(|(m, b)| m / b).collect();
        let mut times = all[&(mode.clone(), *is_guarded)].clone();
        rows.push(OverheadRow {
            agent: mode.clone(),
            guarded: *is_guarded,
            runs: times.len(),
            wall_median_ms: median(&mut times),
            ratio_median: median(&mut ratios),
        });
    }
    let mut costs = Vec::new();
    if agents.contains(&"ebpf") {
        let agent = start_agent("ebpf")?;
        let stats = BpfStats::enable()?;
        let before = oomguard::cli::bpf::prog::programs(Path::new(&pins))
            .map_err(|e| oomguard::error_line(&e))?;
        for cg in [&guarded, &unguarded] {
            for _ in 0..OVERHEAD_RUNS {
                run_once(cg)?;
            }
        }
        let after = oomguard::cli::bpf::prog::programs(Path::new(&pins))
            .map_err(|e| oomguard::error_line(&e))?;
        drop(stats);
        drop(agent);
        let pages = (bytes / 4096) as f64 * 2.0 * OVERHEAD_RUNS as f64;
        for p in &after {
            let b = before.iter().find(|b| b.id == p.id);
            let runs = p.run_count.unwrap_or(0) - b.and_then(|b| b.run_count).unwrap_or(0);
            let ns = p.run_time_ns.unwrap_or(0) - b.and_then(|b| b.run_time_ns).unwrap_or(0);
            costs.push(ProgramCost {
                program: p.name.clone(),
                runs,
                mean_ns: if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                },
                runs_per_page: runs as f64 / pages,
            });
        }
    }
    Ok((rows, costs))
}

/// Forks a process into `cg` that faults in `bytes` of anonymous memory one 4 KiB page at a
/// time and exits; returns the whole process's wall time in ms. A forked child rather than
/// the memhog: the memhog fills every byte, which in a debug build costs more than the faults.
fn fault_in(cg: &MemCgroup, bytes: usize) -> Result<f64, String> {
    use std::os::unix::ffi::OsStrExt;
    let procs = std::ffi::CString::new(cg.file("cgroup.procs").as_os_str().as_bytes())
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    // SAFETY: the child only calls async-signal-safe functions (open, write, close, mmap,
    // _exit) and writes to memory it mapped itself; nothing is allocated after the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(2);
            }
            libc::close(fd);
            let p = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                libc::_exit(3);
            }
            let p = p.cast::<u8>();
            let mut off = 0;
            while off < bytes {
                std::ptr::write_volatile(p.add(off), 1);
                off += 4096;
            }
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("the faulting child failed (status {status:#x})"));
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `kernel.bpf_stats_enabled=1` while it lives; the previous value after.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self, String> {
        let before = std::fs::read_to_string(BPF_STATS).map_err(|e| format!("{BPF_STATS}: {e}"))?;
        std::fs::write(BPF_STATS, "1").map_err(|e| format!("{BPF_STATS}: {e}"))?;
        Ok(Self(before.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

/// Writes the JSON to `out`, the tables beside it (`.md`) and, when there are avoidance
/// rows, the chart (`.svg`); prints the tables.
fn write_report(report: &Report, out: &Path) -> Result<(), String> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(out, json).map_err(|e| format!("{}: {e}", out.display()))?;
    let table = render(report);
    print!("{table}");
    let mut wrote = vec![out.display().to_string()];
    let md = out.with_extension("md");
    std::fs::write(&md, &table).map_err(|e| format!("{}: {e}", md.display()))?;
    wrote.push(md.display().to_string());
    if !report.avoidance.is_empty() {
        let svg = out.with_extension("svg");
        std::fs::write(&svg, chart(report)).map_err(|e| format!("{}: {e}", svg.display()))?;
        wrote.push(svg.display().to_string());
    }
    progress(&format!(
        "wrote {} in {:.0} s",
        wrote.join(", "),
        report.duration_s
    ));
    Ok(())
}

fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: mem_kib * 1024,
        cpu_model,
        modes: {
            let mut m = vec!["kernel-only".to_string(), "eventfd".to_string()];
            match oomguard::bpf::capabilities().reason() {
                None => m.push("ebpf".into()),
                Some(why) => progress(&format!("no ebpf rows: {why}")),
            }
            m
        },
    }
}

/// Busy loops on every core, killed on drop.
struct Burners(Vec<Child>);

impl Burners {
    fn start(n: usize) -> Result<Self, String> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(Burners(v))
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The pod of the container-policy rows: its limit, the app's growth rate and the margin.
/// With a 10% margin (12.8 MiB) the app grows at most ~8 MiB during the slowest kill
/// through containerd measured in the tests (121 ms), so the kernel stays out of it.
const POD_LIMIT: u64 = 128 * M;
const APP_RATE: &str = "64M";
const POD_MARGIN_RATIO: &str = "0.1";

/// `trials` app containers, one at a time, outgrowing a pod (laid out like kubelet's
/// cgroupfs driver, with a `pause` sandbox container) against the agent's container policy
/// on a private containerd; each app is removed before the next starts.
fn container_latency_row(
    mode: &str,
    trials: u32,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<ContainerLatencyRow, String> {
    use oomguard::runtime::labels;
    use oomguard_dev::sandbox::containerd::{Containerd, container_id};
    const NS: &str = "k8s.io";
    const UID: &str = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
    let sb = Sandbox::new("bench-ctr").map_err(|e| e.to_string())?;
    let kubepods = sb.path().join("kubepods");
    let pod = kubepods.join("burstable").join(format!("pod{UID}"));
    std::fs::create_dir_all(&pod).map_err(|e| format!("{}: {e}", pod.display()))?;
    let pod_cg = MemCgroup::new(&pod);
    pod_cg.set_limit(POD_LIMIT).map_err(|e| e.to_string())?;
    // Dropped before `sb`: containers and containerd go before the cgroups.
    let ctrd = Containerd::start("bench")?;
    let run = |id: &str, kind: &str, name: &str, cmd: &[&str]| {
        let l = [
            (labels::POD_NAME, "bench-0"),
            (labels::POD_NAMESPACE, "bench"),
            (labels::POD_UID, UID),
            (labels::CONTAINER_NAME, name),
            (labels::CRI_KIND, kind),
        ];
        ctrd.run(NS, id, &pod.join(id), 0, &l, cmd)
    };
    let sandbox = container_id();
    ctrd.install(&sandbox, memhog, "pause")?;
    run(
        &sandbox,
        "sandbox",
        "POD",
        &["/bin/pause", "--total", "0", "--hold", "100000"],
    )?;
    let pins = format!("/sys/fs/bpf/oomguard-bench-ctr-{}", std::process::id());
    let state = StateDir::new("ctr")?;
    let root = kubepods.display().to_string();
    let sock = ctrd.socket.display().to_string();
    let missing = ctrd.dir.join("no-docker.sock").display().to_string();
    let agent = Agent::start(
        agent_exe,
        &[
            "--root",
            &root,
            "--mode",
            mode,
            "--policy",
            "container",
            "--margin-ratio",
            POD_MARGIN_RATIO,
            "--containerd-sock",
            &sock,
            "--docker-containerd-sock",
            &missing,
            "--walk-interval",
            "3600",
            "--bpf-pin-dir",
            &pins,
            "--state-dir",
            state.path(),
        ],
        None,
    )
    .map_err(|e| e.to_string())?;
    agent
        .wait_armed(&pod, Duration::from_secs(10))
        .ok_or("the agent did not arm the pod within 10 s")?;
    let mut row = ContainerLatencyRow {
        mode: mode.to_string(),
        trials: 0,
        guarded_via_containerd: 0,
        kernel_kills: 0,
        signal_to_kill_request_p50_us: 0,
        signal_to_kill_request_p99_us: 0,
        signal_to_kill_request_max_us: 0,
        signal_to_stopped_p50_us: 0,
        signal_to_stopped_p99_us: 0,
        signal_to_stopped_max_us: 0,
    };
    let (mut request, mut stopped) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let app = container_id();
        ctrd.install(&app, memhog, "oomguard-memhog")?;
        let before = pod_cg.subtree_oom_kills();
        run(
            &app,
            "container",
            "app",
            &[
                "/bin/oomguard-memhog",
                "--rate",
                APP_RATE,
                "--total",
                "512M",
                "--hold",
                "3600",
            ],
        )?;
        let d = agent.wait_for(Duration::from_secs(30), |v| {
            v["message"] == "decision" && (v["action"] == "kill" || v["action"] == "kill-failed")
        });
        ctrd.remove(NS, &app);
        let _ = std::fs::remove_dir(pod.join(&app));
        row.trials += 1;
        let kernel = pod_cg.subtree_oom_kills() - before;
        row.kernel_kills += kernel;
        let Some(d) = d else {
            progress("    no kill decision within 30 s");
            continue;
        };
        let c: serde_json::Value = d["container"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if d["action"] != "kill" || c["id"] != app.as_str() || c["via"] != "containerd" {
            progress(&format!(
                "    unexpected decision: action {}, container {}, via {}",
                d["action"], c["id"], c["via"]
            ));
            continue;
        }
        if let (Some(w), Some(g)) = (d["wake_to_kill_us"].as_u64(), c["gone_us"].as_u64()) {
            request.push(w);
            stopped.push(w + g);
        }
        if kernel == 0 {
            row.guarded_via_containerd += 1;
        }
        // The agent's cooldown (1 s) ends early once usage is below the threshold again;
        // the next app starts from an empty pod either way.
    }
    request.sort_unstable();
    stopped.sort_unstable();
    row.signal_to_kill_request_p50_us = percentile(&request, 0.5);
    row.signal_to_kill_request_p99_us = percentile(&request, 0.99);
    row.signal_to_kill_request_max_us = request.last().copied().unwrap_or(0);
    row.signal_to_stopped_p50_us = percentile(&stopped, 0.5);
    row.signal_to_stopped_p99_us = percentile(&stopped, 0.99);
    row.signal_to_stopped_max_us = stopped.last().copied().unwrap_or(0);
    drop(agent);
    Ok(row)
}

fn wait_children(children: &mut [Child], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for c in children.iter_mut() {
        loop {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One avoidance row: `trials` trials of scenario `sc` in `mode`.
fn avoid(
    sc: &Scenario,
    mode: &str,
    trials: u32,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<(AvoidanceRow, Vec<(u64, u64)>), String> {
    let sb = Sandbox::new("bench").map_err(|e| e.to_string())?;
    let root = sb.path().display().to_string();
    let margins = Margins {
        ratio: sc.margin_ratio,
        min: sc
            .min_margin
            .parse::<oomguard::size::Size>()
            .map_or(M, |s| s.bytes()),
        max: 50 * M,
    };
    let th = margins.thresholds(sc.limit).ok_or("limit too small")?;
    let pins = format!("/sys/fs/bpf/oomguard-bench-{}", std::process::id());
    let agent = if mode != "kernel-only" {
        let ratio = sc.margin_ratio.to_string();
        Some(
            Agent::start(
                agent_exe,
                &[
                    "--root",
                    &root,
                    "--policy",
                    "process",
                    "--margin-ratio",
                    &ratio,
                    "--min-margin",
                    sc.min_margin,
                    "--walk-interval",
                    "3600",
                    "--mode",
                    mode,
                    "--bpf-pin-dir",
                    &pins,
                ],
                None,
            )
            .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let _burners = if sc.burners {
        Some(Burners::start(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )?)
    } else {
        None
    };
    let mut row = AvoidanceRow {
        scenario: sc.name.to_string(),
        mode: mode.to_string(),
        trials: 0,
        guarded: 0,
        limit_untouched: 0,
        kernel_kills: 0,
        overshoot_p50_kib: 0,
        overshoot_p99_kib: 0,
        kills_per_trial: 0.0,
    };
    let mut overshoots = Vec::new();
    let mut lat = Vec::new();
    let mut total_kills = 0u64;
    for t in 0..trials {
        let mut cgs: Vec<MemCgroup> = Vec::new();
        for c in 0..sc.cgroups {
            let cg = sb.child(&format!("t{t}-{c}")).map_err(|e| e.to_string())?;
            cg.set_limit(sc.limit).map_err(|e| e.to_string())?;
            if let Some(a) = &agent
                && a.wait_armed(&cg.path, Duration::from_secs(10)).is_none()
            {
                return Err(format!("{} was not armed", cg.path.display()));
            }
            cgs.push(cg);
        }
        let per_proc_total = sc.limit * 2 / sc.procs as u64;
        let mut children = Vec::new();
        for cg in &cgs {
            for _ in 0..sc.procs {
                let mut cmd = Command::new(memhog);
                cmd.args([
                    "--rate",
                    &format!("{}B", sc.rate),
                    "--total",
                    &format!("{per_proc_total}B"),
                    "--hold",
                    "0",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
                let child = in_cgroup(&mut cmd, cg)
                    .and_then(|c| c.spawn())
                    .map_err(|e| e.to_string())?;
                children.push(child);
            }
        }
        wait_children(&mut children, Duration::from_secs(60));
        // Let the agent's decision records arrive.
        std::thread::sleep(Duration::from_millis(100));
        for cg in &cgs {
            row.trials += 1;
            let kernel = cg.subtree_oom_kills();
            row.kernel_kills += kernel;
            let path = cg.path.display().to_string();
            let kills: Vec<serde_json::Value> = agent
                .as_ref()
                .map(|a| {
                    a.decisions("kill")
                        .into_iter()
                        .filter(|d| d["oomcgroup"] == path.as_str())
                        .collect()
                })
                .unwrap_or_default();
            total_kills += kills.len() as u64;
            for d in &kills {
                let killed: Vec<serde_json::Value> =
                    serde_json::from_str(d["killed"].as_str().unwrap_or("[]")).unwrap_or_default();
                let gone = killed
                    .iter()
                    .find(|k| k["outcome"] == "exited")
                    .and_then(|k| k["exit_us"].as_u64());
                if let (Some(w), Some(g)) = (d["wake_to_kill_us"].as_u64(), gone) {
                    lat.push((w, w + g.saturating_sub(k_signal(&killed))));
                }
            }
            if kernel == 0 && !kills.is_empty() {
                row.guarded += 1;
            }
            if cg.failcnt().unwrap_or(1) == 0 {
                row.limit_untouched += 1;
            }
            let peak = cg.max_usage().unwrap_or(0);
            overshoots.push(peak.saturating_sub(th.kill) / 1024);
        }
        for cg in cgs.iter().rev() {
            let _ = std::fs::remove_dir(&cg.path);
        }
    }
    overshoots.sort_unstable();
    row.overshoot_p50_kib = percentile(&overshoots, 0.5);
    row.overshoot_p99_kib = percentile(&overshoots, 0.99);
    row.kills_per_trial = total_kills as f64 / f64::from(row.trials.max(1));
    Ok((row, lat))
}

/// Microseconds from the start of the first kill attempt to its signal.
fn k_signal(killed: &[serde_json::Value]) -> u64 {
    killed
        .iter()
        .find(|k| k["outcome"] == "exited")
        .and_then(|k| k["signal_us"].as_u64())
        .unwrap_or(0)
}

fn latency_row(mode: &str, samples: &[(u64, u64)]) -> LatencyRow {
    let mut kill: Vec<u64> = samples.iter().map(|s| s.0).collect();
    let mut gone: Vec<u64> = samples.iter().map(|s| s.1).collect();
    kill.sort_unstable();
    gone.sort_unstable();
    LatencyRow {
        mode: mode.to_string(),
        samples: samples.len(),
        signal_to_sigkill_p50_us: percentile(&kill, 0.5),
        signal_to_sigkill_p99_us: percentile(&kill, 0.99),
        signal_to_sigkill_max_us: kill.last().copied().unwrap_or(0),
        signal_to_gone_p50_us: percentile(&gone, 0.5),
        signal_to_gone_p99_us: percentile(&gone, 0.99),
        signal_to_gone_max_us: gone.last().copied().unwrap_or(0),
    }
}

/// CPU time of every thread of `pid` in nanoseconds (the first field of each thread's
/// `schedstat`): utime/stime count 10 ms ticks, too coarse for an idle agent.
fn proc_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Left to the agent after its first walk before the idle window starts (the guard
/// registers the reclaim eventfds, the state thread records the arming).
const SETTLE: Duration = Duration::from_secs(2);

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An agent guarding `n` idle cgroups: time to arm them all, then RSS and CPU over
/// `window_s`; with `kills`, then the RSS after it killed that many hogs.
fn footprint_row(
    n: usize,
    agent_exe: &Path,
    mode: &str,
    window_s: f64,
    kills: Option<(&Path, u64)>,
) -> Result<FootprintRow, String> {
    let sb = Sandbox::new("bench-idle").map_err(|e| e.to_string())?;
    let mut last = PathBuf::new();
    for i in 0..n {
        let cg = sb.child(&format!("c{i}")).map_err(|e| e.to_string())?;
        cg.set_limit(64 * M).map_err(|e| e.to_string())?;
        last = cg.path;
    }
    let root = sb.path().display().to_string();
    let t0 = Instant::now();
    let pins = format!("/sys/fs/bpf/oomguard-bench-idle-{}", std::process::id());
    let state = StateDir::new("idle")?;
    let mut flags = vec!["--root", &root, "--mode", mode, "--bpf-pin-dir", &pins];
    flags.extend(["--state-dir", state.path()]);
    // The soak's flags (process policy): nothing crosses a threshold while idle, and the
    // same agent can then kill.
    flags.extend_from_slice(soak::AGENT_ARGS);
    let agent = Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?;
    // Children are armed after the root, in walk order: the last one ends the arming.
    agent
        .wait_armed(&last, Duration::from_secs(60))
        .ok_or("not every cgroup was armed within 60 s")?;
    let start_to_armed_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let walk = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["message"] == "first walk done"
        })
        .ok_or("the agent did not log its first walk")?;
    let (Some(arm_all_ms), Some(guarded_ms)) =
        (walk["elapsed_ms"].as_f64(), walk["guarded_ms"].as_f64())
    else {
        return Err(format!("the first walk's record lacks its times: {walk}"));
    };
    std::thread::sleep(SETTLE);
    let c0 = proc_cpu_ns(agent.pid());
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(window_s));
    let cpu_ns = proc_cpu_ns(agent.pid()).saturating_sub(c0);
    let elapsed = w0.elapsed().as_secs_f64();
    let rss_kib = proc_rss_kib(agent.pid());
    let rss_after_1000_kills_kib = match kills {
        None => None,
        Some((memhog, n)) => {
            progress(&format!("footprint ({mode}): {n} kills"));
            let cgs =
                soak::kill_cgroups(&agent, &sb.cg, SOAK_CGROUPS).map_err(|e| e.to_string())?;
            let done = soak::kills(memhog, &cgs, n, SOAK_TIMEOUT, &mut |d| {
                progress(&format!("    {d}/{n} kills"))
            })
            .map_err(|e| oomguard::error_line(&e))?;
            progress(&format!(
                "    the agent killed {} hogs, the kernel {}",
                done.agent, done.kernel
            ));
            Some(proc_rss_kib(agent.pid()))
        }
    };
    Ok(FootprintRow {
        mode: mode.to_string(),
        cgroups: n,
        arm_all_ms,
        guarded_ms,
        start_to_armed_ms,
        rss_kib,
        cpu_percent_of_core: cpu_ns as f64 / 1e9 / elapsed * 100.0,
        window_s: elapsed,
        rss_after_1000_kills_kib,
    })
}

/// Cgroups the soak's hogs run in, one hog each at a time.
const SOAK_CGROUPS: usize = 4;
/// Bound on one phase of 1,000 kills.
const SOAK_TIMEOUT: Duration = Duration::from_secs(600);

/// A `--state-dir` of our own for an agent (so it never replaces the control socket of a
/// real agent), removed on drop.
struct StateDir(String);

impl StateDir {
    fn new(what: &str) -> Result<Self, String> {
        let dir =
            std::env::temp_dir().join(format!("oomguard-bench-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(StateDir(dir.display().to_string()))
    }

    fn path(&self) -> &str {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The soak in one mode: a warm-up, then `kills` kills and `cycles` cgroup create/delete
/// cycles against one agent, its footprint read before and after each phase.
fn soak_row(
    mode: &str,
    agent_exe: &Path,
    memhog: &Path,
    kills: u64,
    cycles: u64,
) -> Result<SoakRow, String> {
    let started = Instant::now();
    let sb = Sandbox::new("bench-soak").map_err(|e| e.to_string())?;
    let root = sb.path().display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-soak-{}", std::process::id());
    let state = StateDir::new("soak")?;
    let mut flags = vec!["--root", &root, "--mode", mode, "--bpf-pin-dir", &pins];
    flags.extend(["--state-dir", state.path()]);
    flags.extend_from_slice(soak::AGENT_ARGS);
    let agent = Agent::start(agent_exe, &flags, None).map_err(|e| e.to_string())?;
    let plan = soak::Plan {
        kill_cgroups: SOAK_CGROUPS,
        warmup_kills: SOAK_WARMUP_KILLS,
        warmup_cycles: 100,
        kills,
        cycles,
        cycle_batch: 10,
    };
    progress(&format!(
        "soak ({mode}): warm-up {} kills and {} cycles, then {kills} kills and {cycles} cycles",
        plan.warmup_kills, plan.warmup_cycles
    ));
    let outcome = soak::run(&agent, &sb.cg, memhog, &plan, SOAK_TIMEOUT, &mut |line| {
        progress(&format!("    {line}"))
    })
    .map_err(|e| oomguard::error_line(&e))?;
    let bpf_map_entries = if mode == "ebpf" {
        bpf_map_entries(agent_exe, &pins)
    } else {
        Default::default()
    };
    let guarded_cgroups = sb
        .cg
        .subtree()
        .iter()
        .filter(|c| c.finite_limit().is_ok_and(|l| l.is_some()))
        .count();
    let f = |x: &soak::Footprint| {
        format!(
            "{} fds, RSS {} KiB (anon {} KiB), {} threads",
            x.fds, x.rss_kib, x.rss_anon_kib, x.threads
        )
    };
    progress(&format!("    after warm-up: {}", f(&outcome.before)));
    progress(&format!("    after kills:   {}", f(&outcome.after_kills)));
    progress(&format!("    after cycles:  {}", f(&outcome.after_cycles)));
    Ok(SoakRow {
        mode: mode.to_string(),
        outcome,
        bpf_map_entries,
        guarded_cgroups,
        duration_s: started.elapsed().as_secs_f64(),
    })
}

/// Warm-up kills: more decisions than the agent's recent-events ring holds, so the ring is
/// full before the baseline.
const SOAK_WARMUP_KILLS: u64 = oomguard::state::RECENT_EVENTS as u64 + 88;

/// `oomguard bpf map show --json`: entries per pinned map.
fn bpf_map_entries(agent_exe: &Path, pins: &str) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new(agent_exe)
        .args(["bpf", "map", "show", "--json", "--bpf-pin-dir", pins])
        .output();
    let maps: Vec<serde_json::Value> = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    maps.iter()
        .filter_map(|m| Some((m["name"].as_str()?.to_string(), m["entries"].as_u64()?)))
        .collect()
}

fn selection_rows(n: usize, memhog: &Path) -> Result<Vec<SelectionRow>, String> {
    let sb = Sandbox::new("bench-select").map_err(|e| e.to_string())?;
    // The score map must see the tasks start (fork tracepoint), so load it first.
    let pins = format!("/sys/fs/bpf/oomguard-bench-select-{}", std::process::id());
    let bpf = match oomguard::bpf::capabilities().reason() {
        None => Some(oomguard::bpf::EbpfGuard::load(Path::new(&pins)).map_err(|e| e.to_string())?),
        Some(_) => None,
    };
    let mut children = Vec::new();
    for i in 0..n {
        let mut cmd = Command::new(memhog);
        // One task clearly biggest, so "the same victim" has one right answer.
        let kib = if i == n / 2 { 8192 } else { 64 + (i % 97) * 4 };
        cmd.args(["--total", &format!("{kib}K"), "--chunk", "4K"])
            .stdout(Stdio::null());
        children.push(
            in_cgroup(&mut cmd, &sb.cg)
                .and_then(|c| c.spawn())
                .map_err(|e| e.to_string())?,
        );
    }
    // Let every task fault in its memory.
    std::thread::sleep(Duration::from_millis(500 + n as u64));
    let rounds = (2000 / n).clamp(3, 200);
    let limit = 1u64 << 30;
    let t0 = Instant::now();
    let mut proc_top = None;
    for _ in 0..rounds {
        let c = oomguard::victim::candidates(&sb.cg, limit, -1);
        proc_top = c.first().map(|c| c.task.pid);
    }
    let per_proc = t0.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let mut rows = vec![SelectionRow {
        tasks: n,
        source: "/proc".into(),
        per_selection_us: per_proc,
        same_victim: None,
    }];
    if let Some(bpf) = &bpf {
        let t0 = Instant::now();
        let mut map_top = None;
        for _ in 0..rounds {
            let c = oomguard::victim::candidates_from_map(&sb.cg, limit, -1, 8, |pids| {
                bpf.task_scores(pids)
                    .iter()
                    .map(|(p, s)| (*p, oomguard::victim::MapScore::from(s)))
                    .collect()
            });
            map_top = c.first().map(|c| c.task.pid);
        }
        rows.push(SelectionRow {
            tasks: n,
            source: "score map".into(),
            per_selection_us: t0.elapsed().as_secs_f64() * 1e6 / rounds as f64,
            same_victim: Some(map_top == proc_top),
        });
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(bpf) = bpf {
        let _ = bpf.unpin();
    }
    Ok(rows)
}

fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "machine: {} cores, {:.1} GiB, kernel {}, {}{}",
        r.machine.cores,
        r.machine.memory_bytes as f64 / (1u64 << 30) as f64,
        r.machine.kernel,
        r.machine.cpu_model,
        if r.quick { " (quick run)" } else { "" }
    );
    if !r.differential.is_empty() {
        let _ = writeln!(
            s,
            "\n| scenario | mode | trials | kernel alone kills (N) | agent kills (M) | kernel kills with the agent | agent kills where the kernel killed nobody (K) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    }
    for d in &r.differential {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            d.scenario,
            d.mode,
            d.trials,
            d.kernel_alone_kills,
            d.agent_kills,
            d.kernel_kills_with_agent,
            d.agent_kills_where_kernel_killed_none
        );
    }
    if !r.avoidance.is_empty() {
        let _ = writeln!(
            s,
            "\n| scenario | mode | trials | guarded | limit untouched | kernel kills | overshoot p50/p99 KiB | kills/trial |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    }
    for a in &r.avoidance {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {}/{} | {:.1} |",
            a.scenario,
            a.mode,
            a.trials,
            a.guarded,
            a.limit_untouched,
            a.kernel_kills,
            a.overshoot_p50_kib,
            a.overshoot_p99_kib,
            a.kills_per_trial
        );
    }
    if !r.latency.is_empty() {
        let _ = writeln!(
            s,
            "\n| mode | samples | signal→SIGKILL p50/p99/max µs | signal→gone p50/p99/max µs |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
    }
    for l in &r.latency {
        let _ = writeln!(
            s,
            "| {} | {} | {}/{}/{} | {}/{}/{} |",
            l.mode,
            l.samples,
            l.signal_to_sigkill_p50_us,
            l.signal_to_sigkill_p99_us,
            l.signal_to_sigkill_max_us,
            l.signal_to_gone_p50_us,
            l.signal_to_gone_p99_us,
            l.signal_to_gone_max_us
        );
    }
    if !r.container_latency.is_empty() {
        let _ = writeln!(
            s,
            "\n| container policy, mode | trials | guarded via containerd | kernel kills | signal→kill request p50/p99/max µs | signal→container stopped p50/p99/max µs |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
    }
    for c in &r.container_latency {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}/{}/{} | {}/{}/{} |",
            c.mode,
            c.trials,
            c.guarded_via_containerd,
            c.kernel_kills,
            c.signal_to_kill_request_p50_us,
            c.signal_to_kill_request_p99_us,
            c.signal_to_kill_request_max_us,
            c.signal_to_stopped_p50_us,
            c.signal_to_stopped_p99_us,
            c.signal_to_stopped_max_us
        );
    }
    if let Some(why) = &r.container_latency_skipped {
        let _ = writeln!(s, "\ncontainer policy latency skipped: {why}");
    }
    if !r.footprint.is_empty() {
        let _ = writeln!(
            s,
            "\n| mode | idle cgroups | all guarded / all armed ms (start→armed) | RSS KiB | CPU % of a core | RSS after 1,000 kills KiB |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
    }
    for f in &r.footprint {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} / {:.0} ({:.0}) | {} | {:.3} | {} |",
            f.mode,
            f.cgroups,
            f.guarded_ms,
            f.arm_all_ms,
            f.start_to_armed_ms,
            f.rss_kib,
            f.cpu_percent_of_core,
            f.rss_after_1000_kills_kib
                .map_or_else(|| "-".to_string(), |k| k.to_string())
        );
    }
    if !r.victim_selection.is_empty() {
        let _ = writeln!(
            s,
            "\n| tasks | source | µs per selection | same victim as /proc |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
    }
    for v in &r.victim_selection {
        let same = match v.same_victim {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {same} |",
            v.tasks, v.source, v.per_selection_us
        );
    }
    if !r.overhead.is_empty() {
        let _ = writeln!(
            s,
            "\noverhead: a process faulting in anonymous memory, whole-process wall time; ratio = \
             median over blocks of (block median / same block's no-agent median)\n\n\
             | agent | cgroup | runs | wall median ms | ratio to no agent |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
    }
    for o in &r.overhead {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.3} |",
            o.agent,
            if o.guarded { "guarded" } else { "unguarded" },
            o.runs,
            o.wall_median_ms,
            o.ratio_median
        );
    }
    if !r.program_cost.is_empty() {
        let _ = writeln!(
            s,
            "\neBPF programs with kernel.bpf_stats_enabled=1 (same hog, guarded and unguarded)\n\n\
             | program | runs | mean ns per run | runs per page |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
    }
    for c in &r.program_cost {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.3} |",
            c.program, c.runs, c.mean_ns, c.runs_per_page
        );
    }
    if !r.soak.is_empty() {
        let _ = writeln!(
            s,
            "\nsoak: before = after the warm-up; after = after the kills / after the cycles\n\n\
             | mode | kills (kernel) | cycles | fds before/after/after | RSS KiB before/after/after | RssAnon KiB before/after/after | threads before/after/after | kills s | cycles s | total s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    }
    for k in &r.soak {
        let o = &k.outcome;
        let (b, a, c) = (&o.before, &o.after_kills, &o.after_cycles);
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {}/{}/{} | {}/{}/{} | {}/{}/{} | {}/{}/{} | {:.0} | {:.0} | {:.0} |",
            k.mode,
            o.kills.agent,
            o.kills.kernel,
            o.cycles,
            b.fds,
            a.fds,
            c.fds,
            b.rss_kib,
            a.rss_kib,
            c.rss_kib,
            b.rss_anon_kib,
            a.rss_anon_kib,
            c.rss_anon_kib,
            b.threads,
            a.threads,
            c.threads,
            o.kills_s,
            o.cycles_s,
            k.duration_s
        );
    }
    s
}

/// An SVG bar chart of avoidance: per scenario, the share of trials guarded (killed by the
/// agent, kernel OOM killer idle) and with the limit untouched, one bar group per mode.
fn chart(r: &Report) -> String {
    use std::fmt::Write;
    let scenarios: Vec<&str> = {
        let mut v: Vec<&str> = Vec::new();
        for a in &r.avoidance {
            if !v.contains(&a.scenario.as_str()) {
                v.push(&a.scenario);
            }
        }
        v
    };
    let modes = &r.machine.modes;
    let (bar_w, gap, left, top, h) = (14.0, 26.0, 60.0, 40.0, 220.0);
    let group_w = bar_w * 2.0 * modes.len() as f64 + gap;
    let width = left + group_w * scenarios.len() as f64 + 20.0;
    let height = top + h + 150.0;
    let colors = ["#9e9e9e", "#1e88e5", "#43a047", "#fb8c00"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">Kernel-OOM avoidance by scenario and mode (solid: guarded, light: limit untouched)</text>"#
    );
    for pct in [0, 50, 100] {
        let y = top + h - h * f64::from(pct) / 100.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{width:.0}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{pct}%</text>"##,
            left - 6.0,
            y + 4.0
        );
    }
    for (i, sc) in scenarios.iter().enumerate() {
        let x0 = left + group_w * i as f64 + gap / 2.0;
        for (j, mode) in modes.iter().enumerate() {
            let Some(a) = r
                .avoidance
                .iter()
                .find(|a| a.scenario == *sc && &a.mode == mode)
            else {
                continue;
            };
            let t = f64::from(a.trials.max(1));
            let color = colors[j % colors.len()];
            for (k, (v, op)) in [(a.guarded, 1.0), (a.limit_untouched, 0.45)]
                .iter()
                .enumerate()
            {
                let bh = h * f64::from(*v) / t;
                let x = x0 + (j * 2 + k) as f64 * bar_w;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}" fill-opacity="{op}"/>"#,
                    top + h - bh,
                    bar_w - 2.0
                );
            }
        }
        let lx = x0 + group_w / 2.0 - gap / 2.0;
        let ly = top + h + 12.0;
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" transform="rotate(35 {lx:.1} {ly:.1})">{}</text>"#,
            sc.replace('&', "&amp;").replace('<', "&lt;")
        );
    }
    for (j, mode) in modes.iter().enumerate() {
        let x = left + j as f64 * 110.0;
        let y = height - 12.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{y}">{mode}</text>"#,
            y - 10.0,
            colors[j % colors.len()],
            x + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// One scenario of the differential suite: run with the kernel alone, then with the agent,
/// and count who killed.
#[derive(Debug, Clone, Copy)]
enum Diff {
    /// One task holds this share (percent) of a 256 MiB limit in anonymous memory while a
    /// writer puts 400 MiB through the page cache at 100 MB/s (at 200 MB/s the kernel OOMs
    /// on v1 with dirty pages it cannot write back fast enough: another scenario).
    CacheHeavy(u64),
    /// A tmpfs file holds a 128 MiB cgroup just above its kill threshold (filled before the
    /// agent starts); three idle tasks start there one after another.
    TmpfsIdle,
    /// 150 MiB anonymous and a writer at the limit; eight bursts of 60 MiB that come and go.
    Bursty,
    /// 60 tasks growing to 5 MiB each at 1 MB/s in 256 MiB (300 MiB in all).
    ManySmall,
    /// One task growing to 1 GiB at 200 MB/s in 256 MiB.
    LargeVictim,
    /// A 240 MiB container inside a 256 MiB pod; an unthrottled task in the container, an
    /// 8 MiB bystander in the pod.
    Nested,
}

impl Diff {
    fn name(self) -> String {
        match self {
            Diff::CacheHeavy(p) => format!("{p}% anonymous + file I/O, 256MiB"),
            Diff::TmpfsIdle => "tmpfs above the threshold + 3 idle tasks, 128MiB".into(),
            Diff::Bursty => "bursts absorbed by reclaim, 256MiB".into(),
            Diff::ManySmall => "60 small tasks outgrowing 256MiB".into(),
            Diff::LargeVictim => "one large task outgrowing 256MiB".into(),
            Diff::Nested => "nested pod 256MiB / container 240MiB".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct DiffRow {
    scenario: String,
    mode: String,
    trials: u32,
    /// Kills by the kernel OOM killer in the kernel-alone runs.
    kernel_alone_kills: u64,
    /// Kills by the agent in the agent runs.
    agent_kills: u64,
    /// Kills by the kernel in the agent runs (the agent was too late).
    kernel_kills_with_agent: u64,
    /// Agent kills in trials whose kernel-alone twin killed nobody.
    agent_kills_where_kernel_killed_none: u64,
}

/// Kills the children on drop.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A private tmpfs, unmounted on drop.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new() -> Result<TmpfsMount, String> {
        let dir = std::env::temp_dir().join(format!("oomguard-bench-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512M", "oomguard-bench"])
            .arg(&dir)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("mount tmpfs on {}: {st}", dir.display()));
        }
        Ok(TmpfsMount(dir))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn spawn_in(cg: &MemCgroup, exe: &Path, args: &[&str]) -> Result<Child, String> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    in_cgroup(&mut cmd, cg)
        .map_err(|e| e.to_string())?
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))
}

fn wait_rss(child: &Child, bytes: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let rss = oomguard::victim::read_task(child.id() as i32, Path::new(""))
            .map_or(0, |t| t.rss_bytes);
        if rss >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_diff_agent(agent_exe: &Path, root: &Path, mode: &str) -> Result<Agent, String> {
    let root_s = root.display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-diff-{}", std::process::id());
    let agent = Agent::start(
        agent_exe,
        &[
            "--root",
            &root_s,
            "--policy",
            "process",
            "--walk-interval",
            "3600",
            "--mode",
            mode,
            "--bpf-pin-dir",
            &pins,
        ],
        None,
    )
    .map_err(|e| e.to_string())?;
    if agent.wait_armed(root, Duration::from_secs(20)).is_none() {
        return Err(format!("the agent did not arm {}", root.display()));
    }
    Ok(agent)
}

/// One trial: (kernel kills, agent kills).
fn diff_trial(sc: Diff, mode: &str, agent_exe: &Path, memhog: &Path) -> Result<(u64, u64), String> {
    let sb = Sandbox::new("bench-diff").map_err(|e| e.to_string())?;
    let limit = match sc {
        Diff::TmpfsIdle => 128 * M,
        _ => 256 * M,
    };
    sb.cg.set_limit(limit).map_err(|e| e.to_string())?;
    let with_agent = mode != "kernel-only";
    let mut kids = Kids(Vec::new());
    let mut agent = None;
    let mut tmpfs = None;
    if with_agent && !matches!(sc, Diff::TmpfsIdle | Diff::Nested) {
        agent = Some(start_diff_agent(agent_exe, sb.path(), mode)?);
    }
    let hog = |cg: &MemCgroup, args: &[&str]| spawn_in(cg, memhog, args);
    let file = std::env::temp_dir().join(format!("oomguard-bench-diff-{}", std::process::id()));
    let file_s = file.display().to_string();
    match sc {
        Diff::CacheHeavy(pct) => {
            // A bare number means MiB to memhog: say KiB.
            let total = format!("{}K", limit * pct / 100 / 1024);
            let anon = hog(&sb.cg, &["--total", &total, "--rate", "0"])?;
            wait_rss(&anon, limit * pct / 100 * 95 / 100, Duration::from_secs(30));
            kids.0.push(anon);
            let mut w = hog(
                &sb.cg,
                &[
                    "--file", &file_s, "--rate", "100M", "--total", "400M", "--hold", "0",
                ],
            )?;
            wait_children(std::slice::from_mut(&mut w), Duration::from_secs(60));
            kids.0.push(w);
        }
        Diff::TmpfsIdle => {
            let fs = TmpfsMount::new()?;
            let held = fs.0.join("held").display().to_string();
            // Default margin 2%: kill threshold 125.44 MiB; the file takes usage to ~126.
            let mut w = hog(&sb.cg, &["--file", &held, "--total", "125M", "--hold", "0"])?;
            wait_children(std::slice::from_mut(&mut w), Duration::from_secs(30));
            tmpfs = Some(fs);
            if with_agent {
                agent = Some(start_diff_agent(agent_exe, sb.path(), mode)?);
            }
            for _ in 0..3 {
                let mut cmd = Command::new("sleep");
                cmd.arg("60");
                kids.0.push(
                    in_cgroup(&mut cmd, &sb.cg)
                        .map_err(|e| e.to_string())?
                        .spawn()
                        .map_err(|e| e.to_string())?,
                );
                std::thread::sleep(Duration::from_secs(2));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Diff::Bursty => {
            let anon = hog(&sb.cg, &["--total", "150M", "--rate", "0"])?;
            wait_rss(&anon, 140 * M, Duration::from_secs(30));
            kids.0.push(anon);
            kids.0.push(hog(
                &sb.cg,
                &[
                    "--file", &file_s, "--rate", "100M", "--total", "300M", "--hold", "0",
                ],
            )?);
            for _ in 0..8 {
                let mut b = hog(&sb.cg, &["--total", "60M", "--rate", "0", "--hold", "0"])?;
                wait_children(std::slice::from_mut(&mut b), Duration::from_secs(20));
                kids.0.push(b);
            }
            let n = kids.0.len();
            wait_children(&mut kids.0[1..n], Duration::from_secs(60));
        }
        Diff::ManySmall => {
            let mut v = Vec::new();
            for _ in 0..60 {
                v.push(hog(
                    &sb.cg,
                    &[
                        "--total", "5M", "--rate", "1M", "--chunk", "256K", "--hold", "4",
                    ],
                )?);
            }
            wait_children(&mut v, Duration::from_secs(30));
            kids.0.extend(v);
        }
        Diff::LargeVictim => {
            let mut h = hog(&sb.cg, &["--total", "1G", "--rate", "200M"])?;
            wait_children(std::slice::from_mut(&mut h), Duration::from_secs(30));
            kids.0.push(h);
        }
        Diff::Nested => {
            let ctr = sb.child("ctr").map_err(|e| e.to_string())?;
            ctr.set_limit(240 * M).map_err(|e| e.to_string())?;
            if with_agent {
                let a = start_diff_agent(agent_exe, sb.path(), mode)?;
                if a.wait_armed(&ctr.path, Duration::from_secs(20)).is_none() {
                    return Err("the agent did not arm the container".into());
                }
                agent = Some(a);
            }
            let by = hog(&sb.cg, &["--total", "8M", "--rate", "0"])?;
            wait_rss(&by, 7 * M, Duration::from_secs(10));
            kids.0.push(by);
            let mut h = hog(&ctr, &["--total", "1G", "--rate", "0"])?;
            wait_children(std::slice::from_mut(&mut h), Duration::from_secs(30));
            kids.0.push(h);
        }
    }
    // Records of late decisions reach the log.
    std::thread::sleep(Duration::from_millis(500));
    let kernel = sb.cg.subtree_oom_kills();
    let agent_kills = agent
        .as_ref()
        .map_or(0, |a| a.decisions("kill").len() as u64);
    drop(kids);
    sb.kill_all();
    drop(agent);
    let _ = sb.cg.force_empty();
    drop(tmpfs);
    let _ = std::fs::remove_file(&file);
    Ok((kernel, agent_kills))
}

fn differential(
    modes: &[String],
    trials: u32,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<Vec<DiffRow>, String> {
    let list = [
        Diff::CacheHeavy(80),
        Diff::CacheHeavy(90),
        Diff::CacheHeavy(95),
        Diff::CacheHeavy(97),
        Diff::TmpfsIdle,
        Diff::Bursty,
        Diff::ManySmall,
        Diff::LargeVictim,
        Diff::Nested,
    ];
    let mut rows = Vec::new();
    for (i, sc) in list.iter().enumerate() {
        progress(&format!(
            "[{}/{}] differential: {}",
            i + 1,
            list.len(),
            sc.name()
        ));
        let mut alone = Vec::new();
        for _ in 0..trials {
            alone.push(diff_trial(*sc, "kernel-only", agent_exe, memhog)?.0);
        }
        for mode in modes.iter().filter(|m| m.as_str() != "kernel-only") {
            let mut row = DiffRow {
                scenario: sc.name(),
                mode: mode.clone(),
                trials,
                kernel_alone_kills: alone.iter().sum(),
                agent_kills: 0,
                kernel_kills_with_agent: 0,
                agent_kills_where_kernel_killed_none: 0,
            };
            for twin in &alone {
                let (kernel, agent) = diff_trial(*sc, mode, agent_exe, memhog)?;
                row.agent_kills += agent;
                row.kernel_kills_with_agent += kernel;
                if *twin == 0 {
                    row.agent_kills_where_kernel_killed_none += agent;
                }
            }
            progress(&format!(
                "    {mode}: kernel alone kills {}, agent kills {}, kernel kills with the agent {}, agent kills where the kernel killed nobody {}",
                row.kernel_alone_kills,
                row.agent_kills,
                row.kernel_kills_with_agent,
                row.agent_kills_where_kernel_killed_none
            ));
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The OOM storm (issue 13): cgroups of 64 MiB hitting their limits at once, a hog each at
/// 256 MB/s, process policy; storms per mode, the kernel alone beside each agent mode.
#[derive(Debug, Clone, Serialize)]
struct StormRow {
    mode: String,
    cgroups: usize,
    /// Per storm: killed by the agent with the kernel's count unchanged.
    guarded: Vec<u32>,
    /// Per storm: the kernel's own OOM kills.
    kernel_kills: Vec<u64>,
    wake_to_sigkill_p50_us: u64,
    wake_to_sigkill_p99_us: u64,
    wake_to_sigkill_max_us: u64,
}

const STORM_CGROUPS: usize = 40;
const STORMS: u32 = 3;

/// `--only storm`: the storm rows, written to their own report.
fn storm(
    machine: &Machine,
    agent: &Path,
    memhog: &Path,
    out: Option<PathBuf>,
) -> Result<(), String> {
    let sc = Scenario {
        name: "storm",
        limit: 64 * M,
        rate: 256_000_000,
        margin_ratio: 0.02,
        min_margin: "1M",
        burners: false,
        cgroups: STORM_CGROUPS,
        procs: 1,
    };
    let mut rows = Vec::new();
    for mode in &machine.modes {
        let mut row = StormRow {
            mode: mode.clone(),
            cgroups: STORM_CGROUPS,
            guarded: Vec::new(),
            kernel_kills: Vec::new(),
            wake_to_sigkill_p50_us: 0,
            wake_to_sigkill_p99_us: 0,
            wake_to_sigkill_max_us: 0,
        };
        let mut kills = Vec::new();
        for s in 1..=STORMS {
            progress(&format!(
                "OOM storm {s}/{STORMS} ({mode}): {STORM_CGROUPS} cgroups of 64 MiB at 256 MB/s"
            ));
            let (r, lat) = avoid(&sc, mode, 1, agent, memhog)?;
            progress(&format!(
                "    guarded {}/{}, kernel kills {}",
                r.guarded, r.trials, r.kernel_kills
            ));
            row.guarded.push(r.guarded);
            row.kernel_kills.push(r.kernel_kills);
            kills.extend(lat.iter().map(|l| l.0));
        }
        kills.sort_unstable();
        row.wake_to_sigkill_p50_us = percentile(&kills, 0.5);
        row.wake_to_sigkill_p99_us = percentile(&kills, 0.99);
        row.wake_to_sigkill_max_us = kills.last().copied().unwrap_or(0);
        rows.push(row);
    }
    let mut table = String::from(
        "| mode | guarded per storm | kernel kills per storm | wake→SIGKILL p50 | p99 | max |\n|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let list = |v: Vec<String>| v.join(", ");
        table.push_str(&format!(
            "| {} | {} of {} | {} | {} µs | {} µs | {} µs |\n",
            r.mode,
            list(r.guarded.iter().map(u32::to_string).collect()),
            r.cgroups,
            list(r.kernel_kills.iter().map(u64::to_string).collect()),
            r.wake_to_sigkill_p50_us,
            r.wake_to_sigkill_p99_us,
            r.wake_to_sigkill_max_us
        ));
    }
    write_rows(&rows, machine, &table, out, "bench-results/storm.json")
}

/// A "stuck neighbour": one cgroup's victim frozen (SIGKILL pending, never exiting, its
/// wait held for a minute) while hogs in other cgroups cross one after another.
#[derive(Debug, Clone, Serialize)]
struct NeighbourRow {
    mode: String,
    trials: u32,
    guarded: u32,
    kernel_kills: u64,
    /// The frozen victim was still there (signalled, not gone) after the last trial.
    victim_still_stuck: bool,
    wake_to_sigkill_p50_us: u64,
    wake_to_sigkill_p99_us: u64,
    wake_to_sigkill_max_us: u64,
}

const NEIGHBOUR_TRIALS: u32 = 10;

/// A cgroup v1 freezer cgroup for the bench's stuck victim; thawed and removed on drop.
struct FreezerCg(PathBuf);

impl FreezerCg {
    fn make() -> Result<FreezerCg, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let rel = own
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':').skip(1);
                f.next().zip(f.next())
            })
            .find(|(c, _)| c.split(',').any(|c| c == "freezer"))
            .map(|(_, p)| p.trim_start_matches('/').to_string())
            .ok_or("no cgroup v1 freezer hierarchy")?;
        let dir = Path::new("/sys/fs/cgroup/freezer")
            .join(rel)
            .join(format!("oomguard-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(FreezerCg(dir))
    }

    fn freeze(&self, pid: u32) -> Result<(), String> {
        let w =
            |f: &str, v: &str| std::fs::write(self.0.join(f), v).map_err(|e| format!("{f}: {e}"));
        w("cgroup.procs", &pid.to_string())?;
        w("freezer.state", "FROZEN")?;
        for _ in 0..500 {
            let s = std::fs::read_to_string(self.0.join("freezer.state")).unwrap_or_default();
            if s.trim() == "FROZEN" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("the freezer never froze the victim".into())
    }
}

impl Drop for FreezerCg {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sigkill_pending(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("ShdPnd:"))
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .any(|mask| mask & (1 << (libc::SIGKILL - 1)) != 0)
}

/// `--only neighbour`: per agent mode, a frozen victim and then hogs in other cgroups.
fn neighbour(
    machine: &Machine,
    agent_exe: &Path,
    memhog: &Path,
    out: Option<PathBuf>,
) -> Result<(), String> {
    let mut rows = Vec::new();
    for mode in machine.modes.iter().filter(|m| m.as_str() != "kernel-only") {
        progress(&format!(
            "stuck neighbour ({mode}): a frozen victim, then {NEIGHBOUR_TRIALS} hogs in other cgroups"
        ));
        let freezer = FreezerCg::make()?;
        let sb = Sandbox::new("bench-neighbour").map_err(|e| e.to_string())?;
        let root = sb.path().display().to_string();
        let pins = format!("/sys/fs/bpf/oomguard-bench-{}", std::process::id());
        let a = Agent::start(
            agent_exe,
            &[
                "--root",
                &root,
                "--policy",
                "process",
                "--margin-ratio",
                "0.1",
                "--kill-timeout-ms",
                "60000",
                "--walk-interval",
                "3600",
                "--mode",
                mode,
                "--bpf-pin-dir",
                &pins,
            ],
            None,
        )
        .map_err(|e| e.to_string())?;
        let stuck = sb.child("stuck").map_err(|e| e.to_string())?;
        stuck.set_limit(128 * M).map_err(|e| e.to_string())?;
        if a.wait_armed(&stuck.path, Duration::from_secs(10)).is_none() {
            return Err("the stuck cgroup was not armed".into());
        }
        let mut kids = Kids(Vec::new());
        kids.0.push(spawn_in(&stuck, memhog, &["--total", "70M"])?);
        let victim = kids.0[0].id();
        wait_rss(&kids.0[0], 70 * M, Duration::from_secs(10));
        freezer.freeze(victim)?;
        kids.0.push(spawn_in(
            &stuck,
            memhog,
            &["--rate", "20M", "--total", "52M"],
        )?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sigkill_pending(victim) {
            if Instant::now() > deadline {
                return Err("the frozen victim was never signalled".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut row = NeighbourRow {
            mode: mode.clone(),
            trials: 0,
            guarded: 0,
            kernel_kills: 0,
            victim_still_stuck: false,
            wake_to_sigkill_p50_us: 0,
            wake_to_sigkill_p99_us: 0,
            wake_to_sigkill_max_us: 0,
        };
        let mut lat = Vec::new();
        for t in 0..NEIGHBOUR_TRIALS {
            let cg = sb.child(&format!("n{t}")).map_err(|e| e.to_string())?;
            cg.set_limit(128 * M).map_err(|e| e.to_string())?;
            if a.wait_armed(&cg.path, Duration::from_secs(10)).is_none() {
                return Err(format!("{} was not armed", cg.path.display()));
            }
            let mut hog = [spawn_in(
                &cg,
                memhog,
                &["--rate", "256M", "--total", "256M", "--hold", "0"],
            )?];
            wait_children(&mut hog, Duration::from_secs(30));
            let path = cg.path.display().to_string();
            let d = a.wait_for(Duration::from_secs(5), |v| {
                v["message"] == "decision"
                    && v["action"] == "kill"
                    && v["oomcgroup"] == path.as_str()
            });
            row.trials += 1;
            let kernel = cg.subtree_oom_kills();
            row.kernel_kills += kernel;
            if let Some(d) = d {
                if kernel == 0 {
                    row.guarded += 1;
                }
                lat.extend(d["wake_to_kill_us"].as_u64());
            }
            let _ = std::fs::remove_dir(&cg.path);
        }
        row.victim_still_stuck = sigkill_pending(victim);
        lat.sort_unstable();
        row.wake_to_sigkill_p50_us = percentile(&lat, 0.5);
        row.wake_to_sigkill_p99_us = percentile(&lat, 0.99);
        row.wake_to_sigkill_max_us = lat.last().copied().unwrap_or(0);
        progress(&format!(
            "    guarded {}/{}, kernel kills {}, wake→SIGKILL p50 {} µs p99 {} µs",
            row.guarded,
            row.trials,
            row.kernel_kills,
            row.wake_to_sigkill_p50_us,
            row.wake_to_sigkill_p99_us
        ));
        drop(freezer);
        drop(kids);
        rows.push(row);
    }
    let mut table = String::from(
        "| mode | neighbours guarded | kernel kills | victim still stuck | wake→SIGKILL p50 | p99 | max |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {}/{} | {} | {} | {} µs | {} µs | {} µs |\n",
            r.mode,
            r.guarded,
            r.trials,
            r.kernel_kills,
            r.victim_still_stuck,
            r.wake_to_sigkill_p50_us,
            r.wake_to_sigkill_p99_us,
            r.wake_to_sigkill_max_us
        ));
    }
    write_rows(&rows, machine, &table, out, "bench-results/neighbour.json")
}

/// Writes one kind of row with the machine it ran on (JSON) and prints its table.
fn write_rows<T: Serialize>(
    rows: &[T],
    machine: &Machine,
    table: &str,
    out: Option<PathBuf>,
    default: &str,
) -> Result<(), String> {
    let out = out.unwrap_or_else(|| PathBuf::from(default));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::json!({ "machine": machine, "rows": rows });
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
    print!("{table}");
    progress(&format!("wrote {}", out.display()));
    Ok(())
}
