//! `cargo xtask`: the project's own build tool. Every command that needs the eBPF toolchain
//! installs it first when something is missing (idempotent), saying what it does.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod fuzz;
mod matrix;
mod setup;
mod vm;
mod vmbench;

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
    /// Benchmarks: kernel-OOM avoidance (agent vs the kernel alone, same run), reaction
    /// latency, footprint, victim-selection cost. Writes JSON and a Markdown table.
    Bench {
        /// About 4 minutes instead of about 15.
        #[arg(long)]
        quick: bool,
        /// Only the avoidance scenarios whose name contains this.
        #[arg(long)]
        only: Option<String>,
        /// Only the "no growth" soak: 1,000 kills and 1,000 cgroup create/delete cycles
        /// per mode, the agent's fds, RSS and threads before and after.
        #[arg(long, conflicts_with_all = ["quick", "only"])]
        soak: bool,
        /// Where the JSON goes (the table goes beside it, .md) [default:
        /// bench-results/latest.json, or bench-results/soak.json with --soak, or
        /// target/vm/bench/latest.json with --vm].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The avoidance scenarios in the kernel matrix's qemu guests instead (kernel alone,
        /// eBPF, and eventfd on v1 / the fallback alone on v2, side by side in each guest):
        /// counts, not times.
        #[arg(long, conflicts_with_all = ["quick", "soak"])]
        vm: bool,
        /// With --vm: only these kernels (default: the whole matrix).
        #[arg(long, value_enum, requires = "vm")]
        kernel: Vec<vm::Series>,
        /// With --vm: only these layouts.
        #[arg(long = "cgroup", value_enum, requires = "vm")]
        layout: Vec<vm::Layout>,
        /// With --vm: trials per scenario and mode.
        #[arg(long, default_value_t = 20, requires = "vm",
              value_parser = clap::value_parser!(u32).range(1..=100))]
        trials: u32,
        /// With --vm: also the fallback's idle CPU with this many guarded cgroups (v2 guests).
        #[arg(long, requires = "vm", value_parser = clap::value_parser!(u32).range(1..=5000))]
        idle_cgroups: Option<u32>,
    },
    /// Boot a Debian kernel in a throw-away qemu guest, run COMMAND there (busybox sh),
    /// print its output and exit with its status.
    Vm {
        /// The kernel series (the newest package of it is fetched and cached).
        #[arg(long, value_enum, default_value = "6.1")]
        kernel: vm::Series,
        /// The cgroup layout the guest mounts.
        #[arg(long = "cgroup", value_enum, default_value = "v2")]
        layout: vm::Layout,
        /// Copy the guest's /out directory here afterwards.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Files to carry into the guest, at the same paths (an ext4 disk; their shared
        /// libraries are carried too).
        #[arg(long = "carry")]
        carry: Vec<PathBuf>,
        /// Seconds from boot to power-off before the guest is stopped.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 1536)]
        mem: u32,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// The shell command to run in the guest.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Format check, clippy, and every test (root integration tests run one at a time),
    /// then the integration tests in the kernel matrix's guests.
    Test {
        /// Only the kernel matrix: the integration tests that exercise the kernel, in
        /// qemu guests of each kernel and cgroup layout.
        #[arg(long, conflicts_with = "fuzz")]
        vm: bool,
        /// Only the host: skip the kernel matrix.
        #[arg(long, conflicts_with_all = ["fuzz", "vm"])]
        host: bool,
        /// With --vm: only these kernels (default: the whole matrix).
        #[arg(long, value_enum, requires = "vm")]
        kernel: Vec<vm::Series>,
        /// With --vm: only these layouts.
        #[arg(long = "cgroup", value_enum, requires = "vm")]
        layout: Vec<vm::Layout>,
        /// With --vm: only these test binaries of the matrix (e.g. `--binary ebpf --binary
        /// guard`; default: all of them).
        #[arg(long = "binary", requires = "vm")]
        binaries: Vec<String>,
        /// Instead of the suite: every fuzz target in fuzz/ (cargo-fuzz, nightly) for a while.
        #[arg(long)]
        fuzz: bool,
        /// With --fuzz: how long each target runs (libFuzzer takes 0 as "forever").
        #[arg(long, default_value_t = 20, requires = "fuzz",
              value_parser = clap::value_parser!(u64).range(1..))]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test` (e.g. a test name filter); with --fuzz, the
        /// targets to run (names containing one of them).
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
            let release = target_dir(&root).join("release");
            let mut cmd = if args.is_empty() {
                build_with_dev_tools()?;
                step("running the demo: oomguard-demo");
                Command::new(release.join("oomguard-demo"))
            } else {
                build()?;
                step(&format!(
                    "running the agent: oomguard run {}",
                    args.join(" ")
                ));
                let mut cmd = Command::new(release.join("oomguard"));
                cmd.arg("run").args(&args);
                cmd
            };
            exec(&mut cmd)
        }
        Cmd::Bench {
            vm: true,
            kernel,
            layout,
            trials,
            only,
            idle_cgroups,
            out,
            ..
        } => {
            setup::run(false)?;
            build_with_dev_tools()?;
            let target = target_dir(&root);
            let out = match out {
                Some(p) if p.is_absolute() => p,
                Some(p) => root.join(p),
                None => target.join("vm/bench/latest.json"),
            };
            vmbench::run(
                &target,
                &vmbench::Plan {
                    kernels: kernel,
                    layouts: layout,
                    trials,
                    only,
                    idle: idle_cgroups,
                    out,
                },
            )
        }
        Cmd::Bench {
            quick,
            only,
            soak,
            out,
            ..
        } => {
            setup::run(false)?;
            build_with_dev_tools()?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from(if soak {
                    "bench-results/soak.json"
                } else {
                    "bench-results/latest.json"
                })
            });
            let out = if out.is_absolute() {
                out
            } else {
                root.join(out)
            };
            step(&format!("benchmarking (results: {})", out.display()));
            let mut cmd = Command::new(target_dir(&root).join("release/oomguard-bench"));
            cmd.arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            if soak {
                cmd.arg("--soak");
            }
            if let Some(only) = only {
                cmd.arg("--only").arg(only);
            }
            exec(&mut cmd)
        }
        Cmd::Vm {
            kernel,
            layout,
            out,
            carry,
            timeout,
            mem,
            cpus,
            command,
        } => {
            setup::run(false)?;
            let target = target_dir(&root);
            let kernel = vm::kernel(&target, kernel)?;
            if let Some(why) = vm::unsupported(&kernel, layout) {
                eprintln!("xtask: {why}");
                std::process::exit(2);
            }
            let disk = if carry.is_empty() {
                None
            } else {
                step(&format!("carrying {} file(s) on a disk image", carry.len()));
                Some(vm::Disk::build(&target, &carry, &[], 256)?)
            };
            let guest = vm::Guest {
                kernel,
                layout,
                mem_mib: mem,
                cpus,
                timeout: std::time::Duration::from_secs(timeout),
                disk,
                env: Vec::new(),
                echo: Some(String::new()),
            };
            step(&format!(
                "booting {} ({}, cgroup {layout})",
                guest.kernel.release,
                guest.kernel.image.display()
            ));
            let outcome = vm::run(&target, &guest, &command.join(" "), out.as_deref())?;
            match outcome.status {
                Some(rc) => {
                    step(&format!(
                        "guest exited {rc} after {:.1} s",
                        outcome.elapsed.as_secs_f64()
                    ));
                    std::process::exit(rc)
                }
                None => {
                    eprintln!("{}", outcome.console_tail(40));
                    bail!(
                        "the guest reported no exit status (boot failure, panic or timeout after {:.0} s); its console's tail is above",
                        outcome.elapsed.as_secs_f64()
                    )
                }
            }
        }
        Cmd::Test {
            fuzz: true,
            fuzz_seconds,
            args,
            ..
        } => fuzz::run(&root, fuzz_seconds, &args),
        Cmd::Test {
            vm: true,
            kernel,
            layout,
            binaries,
            args,
            ..
        } => {
            setup::run(false)?;
            matrix::run(&target_dir(&root), &kernel, &layout, &binaries, &args)
        }
        Cmd::Test { host, args, .. } => {
            setup::run(false)?;
            test(&args)?;
            if host {
                return Ok(());
            }
            matrix::run(&target_dir(&root), &[], &[], &[], &[])
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

/// Where cargo builds: `$CARGO_TARGET_DIR` (relative to the workspace) or `target/`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
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
    exec(cargo().args(["build", "--release", "--package", "oomguard", "--bins"]))
}

/// The agent and, beside it, the dev-only binaries that drive it (oomguard-dev: the demo,
/// the benchmark, memhog); they find the agent next to themselves.
fn build_with_dev_tools() -> Result<()> {
    step("building the agent and the dev tools (release; oomguard, oomguard-dev)");
    exec(cargo().args([
        "build",
        "--release",
        "--package",
        "oomguard",
        "--package",
        "oomguard-dev",
        "--bins",
    ]))
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
    let mut child = cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .args(["--", "--test-threads=1"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    // One closing line for the whole run: cargo's own last line is a doc-test binary's.
    println!(
        "oomguard: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() || totals.failed > 0 {
        bail!("tests failed");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 40 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("test result: FAILED. 9 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 49,
                failed: 1,
                ignored: 2
            }
        );
    }
}
