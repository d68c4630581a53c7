//! `oomguard-bench` (run it through `cargo xtask bench`): kernel-OOM avoidance, reaction
//! latency, footprint and victim-selection cost, measured side by side in one run on real
//! cgroups beneath our own memory cgroup. Writes JSON and prints a table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use oomguard_dev::sandbox::sibling_binary;
use serde::Serialize;

pub(crate) mod avoid;
mod container;
mod differential;
mod footprint;
mod md;
mod overhead;
mod report;
mod storm;
mod vm;

use crate::avoid::{AvoidanceRow, LatencyRow, Scenario, avoid, latency_row, scenarios};
use crate::container::{ContainerLatencyRow, container_latency_row};
use crate::differential::{DiffRow, differential};
use crate::footprint::{
    FootprintRow, SelectionRow, SoakRow, footprint_row, selection_rows, soak_row,
};
use crate::overhead::{OverheadRow, ProgramCost, overhead_rows};
use crate::report::{Machine, machine, write_report};
use crate::storm::{neighbour, storm};

pub(crate) const M: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "oomguard-bench",
    about = "Measure oomguard against the kernel, side by side"
)]
pub(crate) struct Args {
    /// Fewer trials and scenarios (about 4 minutes instead of about 15).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Only the avoidance scenarios whose name contains this (no footprint or selection);
    /// `container` runs only the container policy's latency, `footprint` only the footprint,
    /// `storm` only the OOM storm, `neighbour` only the stuck neighbour.
    #[arg(long)]
    pub(crate) only: Option<String>,
    /// Only the "no growth" soak: kills and cgroup create/delete cycles against a running
    /// agent in each mode, with its fds, RSS and threads before and after.
    #[arg(long, conflicts_with_all = ["quick", "only"])]
    pub(crate) soak: bool,
    /// Only the per-fault overhead: a process faulting in --overhead-size of anonymous memory,
    /// with no agent, the eventfd agent and the eBPF agent in alternating blocks, in a guarded
    /// and an unguarded cgroup; then the eBPF programs' mean run time with BPF stats on.
    #[arg(long, conflicts_with_all = ["quick", "only", "soak"])]
    pub(crate) overhead: bool,
    /// Alternating blocks of the overhead run (each: every mode, every placement, 3 runs).
    #[arg(long, default_value_t = 5, requires = "overhead")]
    pub(crate) overhead_blocks: usize,
    /// Anonymous memory each overhead run faults in.
    #[arg(long, default_value = "1G", requires = "overhead")]
    pub(crate) overhead_size: oomguard::size::Size,
    /// Kills in the soak (after its warm-up).
    #[arg(long, default_value_t = 1000, requires = "soak")]
    pub(crate) soak_kills: u64,
    /// Cgroup create/delete cycles in the soak (after its warm-up).
    #[arg(long, default_value_t = 1000, requires = "soak")]
    pub(crate) soak_cycles: u64,
    /// Only the differential suite: every scenario with the kernel alone, then with the
    /// agent in each mode ("kernel kills N, agent kills M, agent kills where the kernel
    /// killed nobody K").
    #[arg(long, conflicts_with_all = ["quick", "only", "soak"])]
    pub(crate) differential: bool,
    /// Trials per scenario and side in the differential suite.
    #[arg(long, default_value_t = 3, requires = "differential")]
    pub(crate) differential_trials: u32,
    /// Where to write the JSON results [default: bench-results/latest.json, or
    /// bench-results/soak.json with --soak, bench-results/differential.json with
    /// --differential].
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// What `cargo xtask bench --vm` runs in a kernel-matrix guest: the unthrottled 32 MiB
    /// and the 256 MiB at 64 and 200 MB/s scenarios, every mode side by side, `--trials`
    /// each (`--only` filters them); with `--idle-cgroups N`, then the agent without eBPF
    /// guarding N idle cgroups (its CPU).
    #[arg(long, conflicts_with_all = ["quick", "soak", "overhead", "differential"])]
    pub(crate) vm: bool,
    /// With --vm: trials per scenario and mode.
    #[arg(long, default_value_t = 20, requires = "vm")]
    pub(crate) trials: u32,
    /// With --vm: also the idle row with this many guarded 256 MiB cgroups.
    #[arg(long, requires = "vm")]
    pub(crate) idle_cgroups: Option<usize>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    pub(crate) quick: bool,
    pub(crate) avoidance: Vec<AvoidanceRow>,
    pub(crate) latency: Vec<LatencyRow>,
    /// Empty when containerd is not installed (see `container_latency_skipped`).
    pub(crate) container_latency: Vec<ContainerLatencyRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) container_latency_skipped: Option<String>,
    pub(crate) footprint: Vec<FootprintRow>,
    pub(crate) victim_selection: Vec<SelectionRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) soak: Vec<SoakRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) overhead: Vec<OverheadRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) program_cost: Vec<ProgramCost>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) differential: Vec<DiffRow>,
    /// `--vm --idle-cgroups N`: the agent without eBPF guarding N idle cgroups.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) idle: Vec<vm::IdleRow>,
    pub(crate) duration_s: f64,
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

pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
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
            differential: rows,
            duration_s: started.elapsed().as_secs_f64(),
            ..Default::default()
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
            soak: rows,
            duration_s: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        return write_report(&report, &out);
    }
    if args.overhead {
        let bytes = args.overhead_size.bytes();
        let (overhead, program_cost) =
            overhead_rows(&machine.modes, args.overhead_blocks, bytes, &agent)?;
        let report = Report {
            machine,
            overhead,
            program_cost,
            duration_s: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("bench-results/overhead.json"));
        return write_report(&report, &out);
    }
    if args.vm {
        // On v2, the fallback also with `--v2-throttle` (opt-in, measured beside it).
        let mut modes = machine.modes.clone();
        if oomguard::cgroup::Layout::read()
            .ok()
            .and_then(|l| l.memory_version())
            == Some(oomguard::cgroup::Version::V2)
        {
            modes.push("eventfd+throttle".into());
        }
        let avoidance = vm::avoidance(&modes, args.trials, args.only.as_deref(), &agent, &memhog)?;
        let mut idle = Vec::new();
        if let Some(n) = args.idle_cgroups {
            // Without the tripwires (the same-run baseline), then with them.
            for tripwire in [false, true] {
                progress(&format!(
                    "idle: the agent without eBPF guarding {n} idle 256 MiB cgroups, tripwires {}",
                    if tripwire { "on" } else { "off" }
                ));
                let row = vm::idle_row(
                    n,
                    256 * M,
                    &agent,
                    "eventfd",
                    tripwire,
                    std::time::Duration::from_secs(15),
                    std::time::Duration::from_secs(60),
                )?;
                progress(&format!(
                    "    CPU {:.3}% of a core, {:?} reads/s",
                    row.cpu_percent_of_core, row.reads_per_s
                ));
                idle.push(row);
            }
        }
        let report = Report {
            machine,
            avoidance,
            idle,
            duration_s: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
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
        duration_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    write_report(&report, &out)
}
