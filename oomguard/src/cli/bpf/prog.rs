//! `oomguard bpf prog show`: the agent's programs. Program pins under `<pin-dir>/programs/`
//! are used when the agent makes them; otherwise the kernel's loaded programs are walked and
//! those using one of the pinned maps are the agent's.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use aya::maps::MapInfo;
use aya::programs::{ProgramInfo, loaded_programs};

use super::{BpfCliError, pinned_maps, stats_enabled, type_name};
use crate::cli::{Align, Table, or_dash};

/// One program in `bpf prog show --json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProgView {
    pub id: u32,
    /// bpftool's type name (`raw_tracepoint`, `tracepoint`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The kernel's name (the function name, cut to 15 bytes).
    pub name: String,
    /// `raw_tp:NAME` or `tracepoint:NAME`; `null` when no link names it.
    pub attach: Option<String>,
    pub tag: String,
    pub loaded_at: Option<String>,
    pub map_ids: Vec<u32>,
    /// Runs and total run time since stats were turned on; `null` while
    /// `kernel.bpf_stats_enabled` is 0.
    pub run_count: Option<u64>,
    pub run_time_ns: Option<u64>,
    pub verified_insns: Option<u32>,
}

pub fn show(pin_dir: &Path, json: bool) -> Result<ExitCode, BpfCliError> {
    let progs = programs(pin_dir)?;
    if json {
        return Ok(crate::cli::print_json(&progs));
    }
    let stats = progs.iter().any(|p| p.run_count.is_some());
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("TYPE", Align::Left),
        ("NAME", Align::Left),
        ("ATTACH", Align::Left),
        ("RUNS", Align::Right),
        ("AVG NS", Align::Right),
        ("MAPS", Align::Left),
    ]);
    for p in &progs {
        let avg = match (p.run_count, p.run_time_ns) {
            (Some(n), Some(t)) if n > 0 => Some(t / n),
            _ => None,
        };
        let maps: Vec<String> = p.map_ids.iter().map(u32::to_string).collect();
        t.row(vec![
            p.id.to_string(),
            p.kind.clone(),
            p.name.clone(),
            or_dash(p.attach.clone()),
            or_dash(p.run_count),
            or_dash(avg),
            maps.join(","),
        ]);
    }
    t.print();
    if !stats {
        println!("(run counts need BPF stats: sysctl -w kernel.bpf_stats_enabled=1)");
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's programs, by id.
pub fn programs(pin_dir: &Path) -> Result<Vec<ProgView>, BpfCliError> {
    let maps = pinned_maps(pin_dir)?;
    let map_ids: BTreeSet<u32> = maps
        .iter()
        .filter_map(|(_, path)| MapInfo::from_pin(path).ok().map(|m| m.id()))
        .collect();
    let pinned = pin_dir.join("programs");
    let infos: Vec<ProgramInfo> = if pinned.is_dir() {
        std::fs::read_dir(&pinned)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| ProgramInfo::from_pin(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        let mut infos = Vec::new();
        for info in loaded_programs() {
            // A program unloaded during the walk is simply not listed.
            let Ok(info) = info else { continue };
            let uses_ours = info
                .map_ids()
                .map_err(BpfCliError::Program)?
                .unwrap_or_default()
                .iter()
                .any(|id| map_ids.contains(id));
            if uses_ours {
                infos.push(info);
            }
        }
        infos
    };
    let attach = super::link::attach_points();
    let stats = stats_enabled();
    let mut progs: Vec<ProgView> = infos
        .iter()
        .map(|info| ProgView {
            id: info.id(),
            kind: type_name(&format!("{:?}", info.program_type())),
            name: info.name_as_str().unwrap_or("?").to_string(),
            attach: attach.get(&info.id()).cloned(),
            tag: format!("{:016x}", info.tag()),
            loaded_at: info
                .loaded_at()
                .and_then(|t| jiff::Timestamp::try_from(t).ok().map(|t| t.to_string())),
            map_ids: info.map_ids().ok().flatten().unwrap_or_default(),
            run_count: stats.then(|| info.run_count()),
            run_time_ns: stats.then(|| info.run_time().as_nanos() as u64),
            verified_insns: info.verified_instruction_count(),
        })
        .collect();
    progs.sort_by_key(|p| p.id);
    Ok(progs)
}
