//! The report: the machine it ran on, the JSON written, and the markdown tables and SVG
//! chart printed beside it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::md::{Table, cells};
use crate::{Report, progress};

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Machine {
    pub(crate) kernel: String,
    pub(crate) cores: usize,
    pub(crate) memory_bytes: u64,
    pub(crate) cpu_model: String,
    pub(crate) modes: Vec<String>,
}

/// Writes the JSON to `out`, the tables beside it (`.md`) and, when there are avoidance
/// rows, the chart (`.svg`); prints the tables.
pub(crate) fn write_report(report: &Report, out: &Path) -> Result<(), String> {
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

pub(crate) fn machine() -> Machine {
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

pub(crate) fn render(r: &Report) -> String {
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
    let mut t = Table::new(&[
        "scenario",
        "mode",
        "trials",
        "kernel alone kills (N)",
        "agent kills (M)",
        "kernel kills with the agent",
        "agent kills where the kernel killed nobody (K)",
    ]);
    for d in &r.differential {
        t.row(cells![
            d.scenario,
            d.mode,
            d.trials,
            d.kernel_alone_kills,
            d.agent_kills,
            d.kernel_kills_with_agent,
            d.agent_kills_where_kernel_killed_none
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&[
        "scenario",
        "mode",
        "trials",
        "guarded",
        "limit untouched",
        "kernel kills",
        "overshoot p50/p99 KiB",
        "kills/trial",
    ]);
    for a in &r.avoidance {
        t.row(cells![
            a.scenario,
            a.mode,
            a.trials,
            a.guarded,
            a.limit_untouched,
            a.kernel_kills,
            format!("{}/{}", a.overshoot_p50_kib, a.overshoot_p99_kib),
            format!("{:.1}", a.kills_per_trial)
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&[
        "mode",
        "samples",
        "signal→SIGKILL p50/p99/max µs",
        "signal→gone p50/p99/max µs",
    ]);
    for l in &r.latency {
        t.row(cells![
            l.mode,
            l.samples,
            format!(
                "{}/{}/{}",
                l.signal_to_sigkill_p50_us, l.signal_to_sigkill_p99_us, l.signal_to_sigkill_max_us
            ),
            format!(
                "{}/{}/{}",
                l.signal_to_gone_p50_us, l.signal_to_gone_p99_us, l.signal_to_gone_max_us
            )
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&[
        "container policy, mode",
        "trials",
        "guarded via containerd",
        "kernel kills",
        "signal→kill request p50/p99/max µs",
        "signal→container stopped p50/p99/max µs",
    ]);
    for c in &r.container_latency {
        t.row(cells![
            c.mode,
            c.trials,
            c.guarded_via_containerd,
            c.kernel_kills,
            format!(
                "{}/{}/{}",
                c.signal_to_kill_request_p50_us,
                c.signal_to_kill_request_p99_us,
                c.signal_to_kill_request_max_us
            ),
            format!(
                "{}/{}/{}",
                c.signal_to_stopped_p50_us, c.signal_to_stopped_p99_us, c.signal_to_stopped_max_us
            )
        ]);
    }
    s += &t.to_string();
    if let Some(why) = &r.container_latency_skipped {
        let _ = writeln!(s, "\ncontainer policy latency skipped: {why}");
    }
    let mut t = Table::new(&[
        "mode",
        "idle cgroups",
        "all guarded / all armed ms (start→armed)",
        "RSS KiB",
        "CPU % of a core",
        "RSS after 1,000 kills KiB",
    ]);
    for f in &r.footprint {
        t.row(cells![
            f.mode,
            f.cgroups,
            format!(
                "{:.0} / {:.0} ({:.0})",
                f.guarded_ms, f.arm_all_ms, f.start_to_armed_ms
            ),
            f.rss_kib,
            format!("{:.3}", f.cpu_percent_of_core),
            f.rss_after_1000_kills_kib
                .map_or_else(|| "-".to_string(), |k| k.to_string())
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&[
        "tasks",
        "source",
        "µs per selection",
        "same victim as /proc",
    ]);
    for v in &r.victim_selection {
        let same = match v.same_victim {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        t.row(cells![
            v.tasks,
            v.source,
            format!("{:.0}", v.per_selection_us),
            same
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&[
        "agent",
        "cgroup",
        "runs",
        "wall median ms",
        "ratio to no agent",
    ])
    .caption(
        "overhead: a process faulting in anonymous memory, whole-process wall time; ratio = \
         median over blocks of (block median / same block's no-agent median)",
    );
    for o in &r.overhead {
        t.row(cells![
            o.agent,
            if o.guarded { "guarded" } else { "unguarded" },
            o.runs,
            format!("{:.0}", o.wall_median_ms),
            format!("{:.3}", o.ratio_median)
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&["program", "runs", "mean ns per run", "runs per page"])
        .caption("eBPF programs with kernel.bpf_stats_enabled=1 (same hog, guarded and unguarded)");
    for c in &r.program_cost {
        t.row(cells![
            c.program,
            c.runs,
            format!("{:.0}", c.mean_ns),
            format!("{:.3}", c.runs_per_page)
        ]);
    }
    s += &t.to_string();
    let mut t = Table::new(&[
        "mode",
        "kills (kernel)",
        "cycles",
        "fds before/after/after",
        "RSS KiB before/after/after",
        "RssAnon KiB before/after/after",
        "threads before/after/after",
        "kills s",
        "cycles s",
        "total s",
    ])
    .caption("soak: before = after the warm-up; after = after the kills / after the cycles");
    for k in &r.soak {
        let o = &k.outcome;
        let (b, a, c) = (&o.before, &o.after_kills, &o.after_cycles);
        t.row(cells![
            k.mode,
            format!("{} ({})", o.kills.agent, o.kills.kernel),
            o.cycles,
            format!("{}/{}/{}", b.fds, a.fds, c.fds),
            format!("{}/{}/{}", b.rss_kib, a.rss_kib, c.rss_kib),
            format!("{}/{}/{}", b.rss_anon_kib, a.rss_anon_kib, c.rss_anon_kib),
            format!("{}/{}/{}", b.threads, a.threads, c.threads),
            format!("{:.0}", o.kills_s),
            format!("{:.0}", o.cycles_s),
            format!("{:.0}", k.duration_s)
        ]);
    }
    s += &t.to_string();
    s
}

/// An SVG bar chart of avoidance: per scenario, the share of trials guarded (killed by the
/// agent, kernel OOM killer idle) and with the limit untouched, one bar group per mode.
pub(crate) fn chart(r: &Report) -> String {
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

/// Writes one kind of row with the machine it ran on (JSON) and prints its table.
pub(crate) fn write_rows<T: Serialize>(
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
