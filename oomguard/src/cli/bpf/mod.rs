//! `oomguard bpf prog show`, `bpf map show`, `bpf map dump NAME`: bpftool-style views of the
//! agent's eBPF objects, read straight from the pins under `--bpf-pin-dir` (so they work when
//! the agent's control socket does not), with keys and values decoded into meaning.

pub mod link;
pub mod map;
pub mod prog;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use thiserror::Error;

use crate::cli::args::{BpfArgs, BpfCommand, MapCommand, ProgCommand};

#[derive(Debug, Error)]
pub enum BpfCliError {
    #[error("no eBPF pins in {0} (is the agent running in eBPF mode with this --bpf-pin-dir?)")]
    NoPins(PathBuf),
    #[error("no pinned map {name} in {dir} (pinned: {pinned})")]
    NoSuchMap {
        name: String,
        dir: PathBuf,
        pinned: String,
    },
    #[error(
        "{0} is a ring buffer: the agent consumes its records (see `oomguard events --follow`)"
    )]
    RingBuffer(String),
    #[error("{0} is not a map this build can decode")]
    Unknown(String),
    #[error("reading the pinned map {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading eBPF programs")]
    Program(#[source] aya::programs::ProgramError),
}

pub fn main(args: BpfArgs) -> ExitCode {
    let result = match &args.command {
        BpfCommand::Prog {
            command: ProgCommand::Show,
        } => prog::show(&args.bpf_pin_dir, args.json),
        BpfCommand::Map {
            command: MapCommand::Show,
        } => map::show(&args.bpf_pin_dir, args.json),
        BpfCommand::Map {
            command: MapCommand::Dump { name },
        } => map::dump(&args.bpf_pin_dir, name, args.json),
    };
    match result {
        Ok(code) => code,
        Err(e) => super::fail(&e, args.json),
    }
}

/// The map pins present under `dir`, by name; an error when there are none.
pub fn pinned_maps(dir: &Path) -> Result<Vec<(String, PathBuf)>, BpfCliError> {
    let pins: Vec<(String, PathBuf)> = crate::bpf::PINNED_MAPS
        .iter()
        .map(|name| (name.to_string(), dir.join(name)))
        .filter(|(_, path)| path.exists())
        .collect();
    if pins.is_empty() {
        return Err(BpfCliError::NoPins(dir.to_path_buf()));
    }
    Ok(pins)
}

/// bpftool's name for a program or map type's `Debug` form: `BPF_PROG_TYPE_RAW_TRACEPOINT` →
/// `raw_tracepoint`, `LruHash` → `lru_hash`, `RingBuf` → `ringbuf`.
pub fn type_name(debug: &str) -> String {
    if let Some(rest) = debug
        .strip_prefix("BPF_PROG_TYPE_")
        .or_else(|| debug.strip_prefix("BPF_MAP_TYPE_"))
    {
        return rest.to_lowercase();
    }
    if debug == "RingBuf" {
        return "ringbuf".into();
    }
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Whether the kernel counts program runs (`kernel.bpf_stats_enabled`).
pub fn stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_follow_bpftool() {
        assert_eq!(type_name("BPF_PROG_TYPE_RAW_TRACEPOINT"), "raw_tracepoint");
        assert_eq!(type_name("LruHash"), "lru_hash");
        assert_eq!(type_name("Hash"), "hash");
        assert_eq!(type_name("RingBuf"), "ringbuf");
    }

    #[test]
    fn a_missing_pin_dir_is_one_clear_error() {
        let err = pinned_maps(Path::new("/nonexistent/pins")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/pins"));
    }
}
