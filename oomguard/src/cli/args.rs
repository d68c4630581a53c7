//! The `oomguard` command line: one clap tree holding every subcommand's arguments. The binary
//! parses it once; each subcommand's module only runs what it is given. `run`'s flags are the
//! agent's configuration, so they live (and are validated) in [`crate::config`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{DEFAULT_STATE_DIR, RunArgs, clap_error_line};

#[derive(Debug, Parser)]
#[command(
    name = "oomguard",
    version,
    about = "Kill a memory cgroup's offender before the kernel's memcg OOM killer has to"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's command line, once. Bad input is one line and exit status 2:
    /// `{"error": "..."}` on stdout when `--json` was asked for, else plain text on stderr
    /// (clap's usage block left out). `--help` and `--version` print and exit 0.
    pub fn parse_or_exit_code() -> Result<Cli, ExitCode> {
        let argv: Vec<OsString> = std::env::args_os().collect();
        Cli::try_parse_from(&argv).map_err(|e| {
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let line = clap_error_line(&e);
            if asks_for_json(&argv) {
                println!("{}", serde_json::json!({ "error": line }));
            } else {
                eprintln!("oomguard: {line} (see --help)");
            }
            ExitCode::from(2)
        })
    }
}

/// Whether a command line that did not parse asked for JSON: `--json` before any `--`, on a
/// subcommand that has it (not `run`).
fn asks_for_json(argv: &[OsString]) -> bool {
    let mut words = argv.iter().skip(1).take_while(|a| *a != "--");
    let subcommand = argv
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'));
    subcommand.is_some_and(|s| s != "run") && words.any(|a| a == "--json")
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Guard every memory cgroup with a limit below --root.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Check what this node offers the agent; exit 0 when it can run.
    Doctor(DoctorArgs),
    /// Inspect the agent's pinned eBPF programs and maps (bpftool-style).
    Bpf(BpfArgs),
    /// The cgroups the running agent guards, with thresholds, usage and state.
    Cgroups(CgroupsArgs),
    /// The running agent's recent decisions and signals; --follow streams them.
    Events(EventsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// containerd socket of the docker runtime.
    #[arg(long, default_value = "/run/docker/containerd/docker-containerd.sock")]
    pub docker_containerd_sock: PathBuf,
    /// containerd socket of the containerd runtime.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_sock: PathBuf,
    /// The kubeconfig the agent would be given (default: in-cluster, else $KUBECONFIG,
    /// else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// One JSON object: kernel, checks (group, name, status, required, detail), can_run,
    /// auto_mode, auto_reason.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BpfArgs {
    /// Where the agent pins its maps (the agent's --bpf-pin-dir).
    #[arg(long, global = true, default_value = crate::bpf::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// JSON output (a list of objects; {"error": "..."} when it fails).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: BpfCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BpfCommand {
    /// The agent's eBPF programs.
    Prog {
        #[command(subcommand)]
        command: ProgCommand,
    },
    /// The agent's pinned eBPF maps.
    Map {
        #[command(subcommand)]
        command: MapCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ProgCommand {
    /// id, type, name, attach point, and run count/time when BPF stats are on.
    Show,
}

#[derive(Debug, Clone, Subcommand)]
pub enum MapCommand {
    /// id, type, name, key/value sizes, capacity and entries of each pinned map.
    Show,
    /// Every entry of a pinned map (THRESHOLDS, TASKS), decoded.
    Dump {
        /// The pin's file name.
        name: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CgroupsArgs {
    /// The agent's --state-dir (where control.sock is).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// A JSON list of objects: path, limit, usage, margin, threshold, reclaim_threshold,
    /// cache (bytes), state, since, last_action.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// The agent's --state-dir (where control.sock is).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// After the recent events, print new ones as they happen.
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object per line: seq, timestamp, cgroup, kind ("decision" or "signal") and
    /// the decision record or the signal.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn bad_input_asks_for_json_only_where_json_exists() {
        let argv = |words: &[&str]| -> Vec<OsString> {
            std::iter::once("oomguard")
                .chain(words.iter().copied())
                .map(OsString::from)
                .collect()
        };
        assert!(asks_for_json(&argv(&["bpf", "map", "dump", "--json"])));
        assert!(asks_for_json(&argv(&["cgroups", "--json", "--state-dir"])));
        assert!(!asks_for_json(&argv(&["cgroups", "--state-dir"])));
        assert!(!asks_for_json(&argv(&["run", "--json"])));
        assert!(!asks_for_json(&argv(&[
            "bpf", "map", "dump", "--", "--json"
        ])));
    }

    #[test]
    fn the_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_parses_into_its_flags() {
        let cli =
            Cli::try_parse_from(["oomguard", "run", "--policy=noop", "--policy=process"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            run.policy,
            crate::config::Policy::Process,
            "the last one wins"
        );
    }
}
