//! `cargo xtask bench --vm`: the avoidance benchmark in the kernel matrix's guests. The
//! host bench's own binary (`oomguard-bench --vm`, release, with the agent and memhog
//! beside it) runs in each guest: the kernel alone, the agent with eBPF, and the agent
//! without it (v1: threshold eventfds; v2: the fallback watcher alone) on the same
//! scenarios, one after another in the same guest run. TCG guests are 10–50× slower than a
//! node, so what is compared is counts (who killed), never times.
//!
//! Each guest's report comes back as JSON; the per-kernel results are put together in one
//! JSON file and one Markdown table (`target/vm/bench/latest.{json,md}` or `--out`).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::matrix::CELLS;
use crate::step;
use crate::vm::{self, Layout, Series};

/// What to run in each guest.
pub struct Plan {
    pub kernels: Vec<Series>,
    pub layouts: Vec<Layout>,
    /// Trials per scenario and mode.
    pub trials: u32,
    /// Only the scenarios whose name contains this.
    pub only: Option<String>,
    /// Also the fallback's idle CPU with this many guarded cgroups (v2 guests).
    pub idle: Option<u32>,
    pub out: PathBuf,
}

/// Upper bound for one trial in a guest (a 256 MiB hog at 64 MB/s takes 4–8 s of TCG time,
/// plus arming and the agent's records).
const PER_TRIAL: Duration = Duration::from_secs(30);
/// Per mode of a guest: starting the agent (loading eBPF takes tens of seconds in TCG).
const PER_MODE: Duration = Duration::from_secs(120);
/// Scenarios the guest's bench runs with `--vm` (kept in step with oomguard-bench).
const SCENARIOS: usize = 3;
const MODES: usize = 3;

pub fn run(target: &Path, plan: &Plan) -> Result<()> {
    let started = Instant::now();
    // v2 first (issue 16's targets), then the v1 guest.
    let mut order: Vec<(Series, Layout)> = CELLS.to_vec();
    order.sort_by_key(|&(k, l)| (l == Layout::V1, k == Series::V6_1));
    let cells: Vec<(Series, Layout)> = order
        .into_iter()
        .filter(|(k, l)| {
            (plan.kernels.is_empty() || plan.kernels.contains(k))
                && (plan.layouts.is_empty() || plan.layouts.contains(l))
        })
        .collect();
    if cells.is_empty() {
        bail!("no guest of the matrix matches (the matrix: 6.1/v1, 6.1/v2, 6.12/v2)");
    }
    let release = target.join("release");
    let files: Vec<PathBuf> = ["oomguard", "oomguard-bench", "oomguard-memhog"]
        .iter()
        .map(|b| release.join(b))
        .collect();
    for f in &files {
        if !f.is_file() {
            bail!(
                "{} is missing (the release build did not make it)",
                f.display()
            );
        }
    }
    step("making the guests' disk (the agent, the bench and memhog, release builds)");
    let disk = vm::Disk::build(target, &files, &[], 256)?;
    let bench = fs::canonicalize(&files[1])?;
    let results = target.join("vm/bench");
    fs::create_dir_all(&results)?;
    let mut done = Vec::new();
    for (series, layout) in cells {
        let kernel = vm::kernel(target, series)?;
        let tag = format!("{series}/{layout}");
        let idle = plan.idle.filter(|_| layout == Layout::V2);
        let mut args = format!("--vm --trials {}", plan.trials);
        if let Some(only) = &plan.only {
            args.push_str(&format!(" --only {}", sh_quote(only)));
        }
        if let Some(n) = idle {
            args.push_str(&format!(" --idle-cgroups {n}"));
        }
        let trials = u64::from(plan.trials);
        let timeout = PER_TRIAL * (trials * (SCENARIOS * MODES) as u64) as u32
            + PER_MODE * (SCENARIOS * MODES) as u32
            + idle.map_or(Duration::ZERO, |_| Duration::from_secs(600));
        step(&format!(
            "[{tag}] booting {} for the avoidance scenarios ({} trials per row; bounded at {} min)",
            kernel.release,
            plan.trials,
            timeout.as_secs() / 60
        ));
        let guest = vm::Guest {
            kernel: kernel.clone(),
            layout,
            mem_mib: 2048,
            cpus: 2,
            timeout,
            disk: Some(disk.clone()),
            env: vec![("OOMGUARD_TEST_PATIENCE".into(), "10".into())],
            echo: Some(format!("[{tag}] ")),
        };
        let out = results.join(format!("{series}-{layout}"));
        let _ = fs::remove_dir_all(&out);
        let cmd = format!(
            "cd /disk/tmp && {} {args} --out /out/bench.json",
            bench.display()
        );
        let outcome = vm::run(target, &guest, &cmd, Some(&out))?;
        let report: Value = fs::read_to_string(out.join("bench.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let trouble = match outcome.status {
            Some(0) if !report.is_null() => None,
            Some(rc) => Some(format!("the bench exited {rc} in the guest")),
            None => Some(format!(
                "the guest reported no exit status (timeout after {:.0} s?); console tail:\n{}",
                outcome.elapsed.as_secs_f64(),
                outcome.console_tail(20)
            )),
        };
        if let Some(t) = &trouble {
            eprintln!("[{tag}] {t}");
        }
        done.push(json!({
            "kernel": series.to_string(),
            "layout": layout.to_string(),
            "release": kernel.release,
            "wall_s": outcome.elapsed.as_secs_f64().round(),
            "trouble": trouble,
            "report": report,
        }));
        // What is done so far, in case a later guest never finishes.
        write(plan, started, &done)?;
    }
    let all = write(plan, started, &done)?;
    let table = render(&all);
    println!("\n{table}");
    step(&format!(
        "wrote {} and {} in {:.0} s",
        plan.out.display(),
        plan.out.with_extension("md").display(),
        started.elapsed().as_secs_f64()
    ));
    let failed: Vec<&Value> = all["guests"]
        .as_array()
        .map(|g| g.iter().filter(|g| !g["trouble"].is_null()).collect())
        .unwrap_or_default();
    if !failed.is_empty() {
        bail!("{} guest(s) did not finish the bench", failed.len());
    }
    Ok(())
}

/// Writes the guests' results so far (JSON and the Markdown table beside it).
fn write(plan: &Plan, started: Instant, done: &[Value]) -> Result<Value> {
    let all = json!({
        "date": utc_now(),
        "commit": commit(),
        "host_loadavg": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "trials": plan.trials,
        "wall_s": started.elapsed().as_secs_f64().round(),
        "guests": done,
    });
    if let Some(dir) = plan.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&plan.out, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("{}", plan.out.display()))?;
    fs::write(plan.out.with_extension("md"), render(&all))?;
    Ok(all)
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The mode a guest's row was run in, as the table names it.
fn mode_name(mode: &str, layout: &str) -> &'static str {
    match (mode, layout) {
        ("kernel-only", _) => "kernel alone",
        ("ebpf", _) => "eBPF",
        ("eventfd", "v2") => "fallback alone",
        ("eventfd", _) => "eventfd",
        ("eventfd+throttle", _) => "fallback + --v2-throttle",
        _ => "?",
    }
}

/// The per-kernel table: one line per guest and scenario, the three modes side by side
/// (guarded/trials, and the kernel's kills), then every row in full.
pub fn render(all: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "`cargo xtask bench --vm`, {} at {}, {} trials per row, {:.0} s in all (host load average {}).\n",
        all["date"].as_str().unwrap_or("?"),
        all["commit"].as_str().unwrap_or("?"),
        all["trials"],
        all["wall_s"].as_f64().unwrap_or(0.0),
        all["host_loadavg"].as_str().unwrap_or("?"),
    );
    s.push_str(
        "| kernel | cgroup | scenario | kernel alone: kernel kills | eBPF: guarded | eventfd (v1) / fallback alone (v2): guarded |\n\
         |---|---|---|---|---|---|\n",
    );
    let guests = all["guests"].as_array().cloned().unwrap_or_default();
    let mut full = String::from(
        "| kernel | cgroup | scenario | mode | trials | guarded | limit untouched | kernel kills | overshoot p50/p99 KiB |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let mut notes = String::new();
    let mut idle = String::new();
    for g in &guests {
        let kernel = g["release"].as_str().unwrap_or("?");
        let layout = g["layout"].as_str().unwrap_or("?");
        if let Some(t) = g["trouble"].as_str() {
            let _ = writeln!(
                notes,
                "- {kernel}/{layout}: {}",
                t.lines().next().unwrap_or("")
            );
        }
        let rows = g["report"]["avoidance"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut scenarios: Vec<String> = Vec::new();
        for r in &rows {
            let sc = r["scenario"].as_str().unwrap_or("?").to_string();
            if !scenarios.contains(&sc) {
                scenarios.push(sc.clone());
            }
            let _ = writeln!(
                full,
                "| {kernel} | {layout} | {sc} | {} | {} | {} | {} | {} | {}/{} |",
                mode_name(r["mode"].as_str().unwrap_or(""), layout),
                r["trials"],
                r["guarded"],
                r["limit_untouched"],
                r["kernel_kills"],
                r["overshoot_p50_kib"],
                r["overshoot_p99_kib"],
            );
        }
        for sc in &scenarios {
            let cell = |mode: &str| -> String {
                let Some(r) = rows
                    .iter()
                    .find(|r| r["scenario"] == sc.as_str() && r["mode"] == mode)
                else {
                    return "–".into();
                };
                if mode == "kernel-only" {
                    format!("{} of {}", r["kernel_kills"], r["trials"])
                } else {
                    format!(
                        "{}/{} ({} kernel kills)",
                        r["guarded"], r["trials"], r["kernel_kills"]
                    )
                }
            };
            let _ = writeln!(
                s,
                "| {kernel} | {layout} | {sc} | {} | {} | {} |",
                cell("kernel-only"),
                cell("ebpf"),
                cell("eventfd")
            );
        }
        for f in g["report"]["idle"].as_array().into_iter().flatten() {
            let _ = writeln!(
                idle,
                "| {kernel} | {layout} | {}{} | {} × {} MiB | {} | {:.3} | {} | {:.0} |",
                mode_name(f["mode"].as_str().unwrap_or(""), layout),
                match f["tripwire"].as_bool() {
                    Some(true) => ", tripwires on",
                    Some(false) => ", tripwires off",
                    None => "",
                },
                f["cgroups"],
                f["limit_mib"],
                f["rss_kib"],
                f["cpu_percent_of_core"].as_f64().unwrap_or(0.0),
                f["reads_per_s"]
                    .as_f64()
                    .map_or("–".into(), |r| format!("{r:.0}")),
                f["window_s"].as_f64().unwrap_or(0.0),
            );
        }
        if let Some(why) = g["report"]["no_ebpf"].as_str() {
            let _ = writeln!(notes, "- {kernel}/{layout}: no eBPF rows: {why}");
        }
    }
    s.push('\n');
    s.push_str(&full);
    if !idle.is_empty() {
        s.push_str(
            "\nIdle guarded cgroups (the agent's CPU, every thread's schedstat, over the window):\n\n\
             | kernel | cgroup | mode | cgroups | RSS KiB | CPU % of a (TCG) core | reads of memory.current per s | window s |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        s.push_str(&idle);
    }
    if !notes.is_empty() {
        s.push('\n');
        s.push_str(&notes);
    }
    let _ = writeln!(s, "\nGuests:");
    for g in &guests {
        let _ = writeln!(
            s,
            "- {} ({}/{}): {:.0} s",
            g["release"].as_str().unwrap_or("?"),
            g["kernel"].as_str().unwrap_or("?"),
            g["layout"].as_str().unwrap_or("?"),
            g["wall_s"].as_f64().unwrap_or(0.0)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_modes_side_by_side() {
        let row = |mode: &str, guarded: u32, kk: u32| {
            json!({"scenario": "256MiB @64MB/s", "mode": mode, "trials": 5, "guarded": guarded,
                   "limit_untouched": guarded, "kernel_kills": kk,
                   "overshoot_p50_kib": 1, "overshoot_p99_kib": 2})
        };
        let all = json!({
            "date": "d", "commit": "c", "trials": 5, "wall_s": 1.0, "host_loadavg": "1",
            "guests": [{"kernel": "6.12", "layout": "v2", "release": "6.12.1", "wall_s": 1.0,
                        "trouble": null,
                        "report": {"avoidance": [row("kernel-only", 0, 5), row("ebpf", 5, 0),
                                                 row("eventfd", 4, 1)]}}]
        });
        let t = render(&all);
        assert!(
            t.contains("| 6.12.1 | v2 | 256MiB @64MB/s | 5 of 5 | 5/5 (0 kernel kills) | 4/5 (1 kernel kills) |"),
            "{t}"
        );
        assert!(t.contains("| fallback alone | 5 | 4 |"), "{t}");
    }
}
