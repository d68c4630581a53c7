//! `oomguard bpf map show` and `bpf map dump NAME`: the pinned maps, and their entries
//! decoded (THRESHOLDS: memcg id → cgroup path and thresholds; TASKS: pid → comm and what
//! `oom_badness` reads).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapInfo};
use oomguard_common::{TaskScore, Thresholds, state};

use super::{BpfCliError, pinned_maps, type_name};
use crate::cli::{Align, Table, bytes, or_dash, short_cgroup};

/// One map in `bpf map show --json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MapView {
    pub id: u32,
    /// The pin's file name (what `bpf map dump` takes).
    pub pin: String,
    pub name: String,
    /// bpftool's type name (`hash`, `lru_hash`, `ringbuf`).
    #[serde(rename = "type")]
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Entries now (hash maps); `null` for a ring buffer.
    pub entries: Option<usize>,
}

/// One entry of `bpf map dump THRESHOLDS --json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ThresholdEntry {
    /// The memcg id: the cgroup directory's inode number.
    pub cgroup_id: u64,
    /// The cgroup directory with that inode under the memory hierarchy; `null` if none.
    pub cgroup: Option<String>,
    pub reclaim_bytes: u64,
    pub kill_bytes: u64,
    /// Usage is above the reclaim (kill) threshold as the pressure program last saw it.
    pub above_reclaim: bool,
    pub above_kill: bool,
    /// `CLOCK_MONOTONIC` ns of the last at-limit record (0: none).
    pub last_at_limit_ns: u64,
}

/// One entry of `bpf map dump TASKS --json`. Bytes throughout.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskEntry {
    pub pid: u32,
    /// `/proc/PID/comm`; `null` when the process is gone.
    pub comm: Option<String>,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
    pub swap: u64,
    pub pgtables: u64,
    pub oom_score_adj: i32,
    /// `CLOCK_MONOTONIC` ns of the last update by a program (0: seeded from /proc).
    pub updated_ns: u64,
}

fn open(path: &Path) -> Result<Map, BpfCliError> {
    let error = |source| BpfCliError::Map {
        path: path.to_path_buf(),
        source,
    };
    Map::from_map_data(MapData::from_pin(path).map_err(error)?).map_err(error)
}

fn map_error(path: &Path) -> impl Fn(aya::maps::MapError) -> BpfCliError + '_ {
    move |source| BpfCliError::Map {
        path: path.to_path_buf(),
        source,
    }
}

/// Entries of the hash maps this build knows the key and value types of.
fn count(pin: &str, path: &Path) -> Result<Option<usize>, BpfCliError> {
    Ok(match pin {
        "THRESHOLDS" => {
            let map: BpfHashMap<MapData, u64, Thresholds> =
                BpfHashMap::try_from(open(path)?).map_err(map_error(path))?;
            Some(map.keys().filter(Result::is_ok).count())
        }
        "TASKS" => {
            let map: BpfHashMap<MapData, u32, TaskScore> =
                BpfHashMap::try_from(open(path)?).map_err(map_error(path))?;
            Some(map.keys().filter(Result::is_ok).count())
        }
        _ => None,
    })
}

pub fn show(pin_dir: &Path, json: bool) -> Result<ExitCode, BpfCliError> {
    let mut views = Vec::new();
    for (pin, path) in pinned_maps(pin_dir)? {
        let info = MapInfo::from_pin(&path).map_err(map_error(&path))?;
        let entries = count(&pin, &path)?;
        views.push(MapView {
            id: info.id(),
            pin,
            name: info.name_as_str().unwrap_or("?").to_string(),
            kind: info
                .map_type()
                .map_or_else(|_| "unknown".into(), |t| type_name(&format!("{t:?}"))),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            entries,
        });
    }
    if json {
        return Ok(crate::cli::print_json(&views));
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("PIN", Align::Left),
        ("TYPE", Align::Left),
        ("KEY", Align::Right),
        ("VALUE", Align::Right),
        ("MAX", Align::Right),
        ("ENTRIES", Align::Right),
    ]);
    for v in &views {
        t.row(vec![
            v.id.to_string(),
            v.pin.clone(),
            v.kind.clone(),
            v.key_size.to_string(),
            v.value_size.to_string(),
            v.max_entries.to_string(),
            or_dash(v.entries),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

pub fn dump(pin_dir: &Path, name: &str, json: bool) -> Result<ExitCode, BpfCliError> {
    let pins = pinned_maps(pin_dir)?;
    let Some((_, path)) = pins.iter().find(|(n, _)| n == name) else {
        return Err(BpfCliError::NoSuchMap {
            name: name.to_string(),
            dir: pin_dir.to_path_buf(),
            pinned: pins
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    match name {
        "THRESHOLDS" => {
            let entries = thresholds(path)?;
            if json {
                return Ok(crate::cli::print_json(&entries));
            }
            let mount = crate::cli::memory_mount();
            let mut t = Table::new(&[
                ("CGROUP ID", Align::Right),
                ("CGROUP", Align::Left),
                ("RECLAIM", Align::Right),
                ("KILL", Align::Right),
                ("ABOVE", Align::Left),
            ]);
            for e in &entries {
                let above = match (e.above_kill, e.above_reclaim) {
                    (true, _) => "kill",
                    (false, true) => "reclaim",
                    _ => "-",
                };
                t.row(vec![
                    e.cgroup_id.to_string(),
                    or_dash(
                        e.cgroup
                            .as_deref()
                            .map(|c| short_cgroup(c, mount.as_deref())),
                    ),
                    bytes(e.reclaim_bytes),
                    bytes(e.kill_bytes),
                    above.into(),
                ]);
            }
            t.print();
        }
        "TASKS" => {
            let entries = tasks(path)?;
            if json {
                return Ok(crate::cli::print_json(&entries));
            }
            let mut t = Table::new(&[
                ("PID", Align::Right),
                ("COMM", Align::Left),
                ("ANON", Align::Right),
                ("FILE", Align::Right),
                ("SHMEM", Align::Right),
                ("SWAP", Align::Right),
                ("PGTABLES", Align::Right),
                ("ADJ", Align::Right),
            ]);
            for e in &entries {
                t.row(vec![
                    e.pid.to_string(),
                    or_dash(e.comm.clone()),
                    bytes(e.rss_anon),
                    bytes(e.rss_file),
                    bytes(e.rss_shmem),
                    bytes(e.swap),
                    bytes(e.pgtables),
                    e.oom_score_adj.to_string(),
                ]);
            }
            t.print();
        }
        "EVENTS" => return Err(BpfCliError::RingBuffer(name.to_string())),
        other => return Err(BpfCliError::Unknown(other.to_string())),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every THRESHOLDS entry, with its cgroup found by inode.
pub fn thresholds(path: &Path) -> Result<Vec<ThresholdEntry>, BpfCliError> {
    let map: BpfHashMap<MapData, u64, Thresholds> =
        BpfHashMap::try_from(open(path)?).map_err(map_error(path))?;
    let raw: BTreeMap<u64, Thresholds> = map.iter().filter_map(Result::ok).collect();
    let paths = crate::cli::memory_mount()
        .map(|m| cgroups_by_inode(&m, raw.keys().copied().collect()))
        .unwrap_or_default();
    Ok(raw
        .into_iter()
        .map(|(id, t)| ThresholdEntry {
            cgroup_id: id,
            cgroup: paths.get(&id).map(|p| p.display().to_string()),
            reclaim_bytes: t.reclaim_bytes,
            kill_bytes: t.kill_bytes,
            above_reclaim: t.state & state::ABOVE_RECLAIM != 0,
            above_kill: t.state & state::ABOVE_KILL != 0,
            last_at_limit_ns: t.last_at_limit_ns,
        })
        .collect())
}

/// Every TASKS entry, by pid, with its comm.
pub fn tasks(path: &Path) -> Result<Vec<TaskEntry>, BpfCliError> {
    let map: BpfHashMap<MapData, u32, TaskScore> =
        BpfHashMap::try_from(open(path)?).map_err(map_error(path))?;
    let raw: BTreeMap<u32, TaskScore> = map.iter().filter_map(Result::ok).collect();
    Ok(raw
        .into_iter()
        .map(|(pid, s)| TaskEntry {
            pid,
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim_end().to_string()),
            rss_anon: s.rss_anon,
            rss_file: s.rss_file,
            rss_shmem: s.rss_shmem,
            swap: s.swap,
            pgtables: s.pgtables,
            oom_score_adj: s.oom_score_adj,
            updated_ns: s.updated_ns,
        })
        .collect())
}

/// The directories under `root` whose inode is one of `wanted`, walking until all are found.
pub fn cgroups_by_inode(root: &Path, mut wanted: Vec<u64>) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if wanted.is_empty() {
            break;
        }
        if let Ok(meta) = std::fs::metadata(&dir)
            && let Some(i) = wanted.iter().position(|&w| w == meta.ino())
        {
            wanted.swap_remove(i);
            found.insert(meta.ino(), dir.clone());
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_directories_by_inode() {
        let dir = std::env::temp_dir().join(format!("oomguard-ino-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        let ino = std::fs::metadata(dir.join("a/b")).unwrap().ino();
        let found = cgroups_by_inode(&dir, vec![ino, u64::MAX]);
        assert_eq!(found.get(&ino), Some(&dir.join("a/b")));
        assert_eq!(found.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
