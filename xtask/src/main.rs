//! `cargo xtask`: the project's own build tool. Every command that needs the eBPF toolchain
//! installs it first when something is missing (idempotent), saying what it does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod setup;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, run and test oomguard")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (apt packages, rust-src, bpf-linker).
    Setup,
    /// Build the agent (release), its eBPF programs included.
    Build,
    /// Without arguments: the demo (a sandbox cgroup, a workload that outgrows its limit,
    /// the agent guarding it, a report). With arguments: `oomguard run <ARGS>` for real.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Format check, clippy, and every test (root integration tests run one at a time).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup::run(true),
        Cmd::Build => {
            setup::run(false)?;
            build()
        }
        Cmd::Run { args } => {
            setup::run(false)?;
            build()?;
            let exe = root.join("target/release/oomguard");
            let mut cmd = Command::new(&exe);
            if args.is_empty() {
                step("running the demo: oomguard demo");
                cmd.arg("demo");
            } else {
                step(&format!(
                    "running the agent: oomguard run {}",
                    args.join(" ")
                ));
                cmd.arg("run").args(&args);
            }
            exec(&mut cmd)
        }
        Cmd::Test { args } => {
            setup::run(false)?;
            test(&args)
        }
    }
}

pub fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

fn build() -> Result<()> {
    step("building the agent (release; the eBPF programs are built by oomguard/build.rs)");
    exec(cargo().args(["build", "--release", "--package", "oomguard"]))
}

fn test(extra: &[String]) -> Result<()> {
    step("checking formatting (cargo fmt --check)");
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    exec(
        cargo()
            .current_dir(Path::new("oomguard-ebpf"))
            .args(["fmt", "--check"]),
    )?;
    step("linting (cargo clippy --all-targets -- -D warnings)");
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("running every test; the root integration tests race the kernel, so one at a time");
    exec(
        cargo()
            .args(["test", "--workspace"])
            .args(extra)
            .args(["--", "--test-threads=1"]),
    )
}
