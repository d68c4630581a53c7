//! `cargo xtask test --fuzz`: every cargo-fuzz target in `fuzz/` for a bounded time each, on
//! the nightly toolchain (cargo-fuzz needs it for the sanitizer flags). Installs cargo-fuzz
//! the first time. A target that crashes (panic, failed assertion, sanitizer report, timeout,
//! out of memory) fails the run, naming the input libFuzzer saved.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{exec, step};

/// libFuzzer's limit on one input: slower counts as a hang (a crash).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// `cargo +nightly …`, through rustup's proxy: the `cargo` that runs xtask is stable.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        // A RUSTC/RUSTDOC inherited from a stable cargo would build with the stable compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        // The fuzz targets never load eBPF: build the library without the eBPF object (an empty
        // placeholder stands in, see oomguard/build.rs), so neither bpf-linker nor a second
        // eBPF build in the fuzz target directory is needed.
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn has_cargo_fuzz() -> bool {
    nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly {
        bail!("fuzzing needs rustup's nightly toolchain (`rustup run nightly rustc` fails)");
    }
    if has_cargo_fuzz() {
        return Ok(());
    }
    step("installing cargo-fuzz (cargo install cargo-fuzz --locked; about two minutes)");
    exec(crate::cargo().args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")?;
    if !has_cargo_fuzz() {
        bail!(
            "cargo-fuzz was installed but `cargo +nightly fuzz` does not run: is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

/// The fuzz targets (`cargo fuzz list`), keeping those whose name contains one of `filters`.
fn targets(filters: &[String]) -> Result<Vec<String>> {
    let out = nightly_cargo()
        .args(["fuzz", "list"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed: {}", out.status);
    }
    let all: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let chosen: Vec<String> = all
        .iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.contains(f.as_str())))
        .cloned()
        .collect();
    if chosen.is_empty() {
        bail!(
            "no fuzz target matches {}; there are: {}",
            filters.join(" "),
            all.join(" ")
        );
    }
    Ok(chosen)
}

/// What one target's run did.
struct Outcome {
    target: String,
    seconds: f64,
    execs: Option<u64>,
    corpus: Option<u64>,
    /// The input libFuzzer saved when the target crashed.
    crash: Option<String>,
    failed: bool,
    log: PathBuf,
}

/// Runs every target (or those matching `filters`) for `seconds` each.
pub fn run(root: &Path, seconds: u64, filters: &[String]) -> Result<()> {
    ensure_cargo_fuzz()?;
    let targets = targets(filters)?;
    step(&format!(
        "building {} fuzz targets (cargo +nightly fuzz build: release, debug assertions, ASan)",
        targets.len()
    ));
    exec(nightly_cargo().args(["fuzz", "build"]))?;
    let logs = root.join("fuzz/logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot make {}", logs.display()))?;
    step(&format!(
        "fuzzing {} targets for {seconds} s each (seeds: fuzz/seeds/<target>, corpus: fuzz/corpus/<target>, logs: fuzz/logs)",
        targets.len()
    ));
    let mut outcomes = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let outcome = run_target(root, target, seconds, &logs)?;
        println!(
            "fuzz [{}/{}] {target}: {} in {:.0} s, corpus {}: {}",
            i + 1,
            targets.len(),
            outcome
                .execs
                .map_or_else(|| "? execs".into(), |n| format!("{n} execs")),
            outcome.seconds,
            outcome.corpus.map_or_else(|| "?".into(), |n| n.to_string()),
            if outcome.failed { "FAILED" } else { "ok" }
        );
        outcomes.push(outcome);
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed).collect();
    let execs: u64 = outcomes.iter().filter_map(|o| o.execs).sum();
    println!(
        "fuzz: {} targets, {} crashed, {execs} execs in total",
        outcomes.len(),
        failed.len()
    );
    for o in &failed {
        match &o.crash {
            Some(artifact) => println!(
                "fuzz: {} crashed on {artifact} (reproduce: cargo +nightly fuzz run {} {artifact}; log: {})",
                o.target,
                o.target,
                o.log.display()
            ),
            None => println!(
                "fuzz: {} failed without saving an input (log: {})",
                o.target,
                o.log.display()
            ),
        }
    }
    if !failed.is_empty() {
        bail!("{} fuzz target(s) crashed", failed.len());
    }
    Ok(())
}

fn run_target(root: &Path, target: &str, seconds: u64, logs: &Path) -> Result<Outcome> {
    let corpus = root.join("fuzz/corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("cannot make {}", corpus.display()))?;
    let seeds = root.join("fuzz/seeds").join(target);
    let log = logs.join(format!("{target}.log"));
    let log_file = File::create(&log).with_context(|| format!("cannot write {}", log.display()))?;
    let mut cmd = nightly_cargo();
    // New inputs go to the first directory; the committed seeds are only read.
    cmd.args(["fuzz", "run", target]).arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log).unwrap_or_default();
    Ok(Outcome {
        target: target.to_string(),
        seconds,
        execs: stat(&text, "stat::number_of_executed_units:"),
        corpus: corpus_size(&text),
        crash: artifact(&text),
        failed: !status.success(),
        log,
    })
}

/// A `stat::name: N` line of `-print_final_stats`.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|n| n.trim().parse().ok())
}

/// The corpus size of libFuzzer's last status line (`#1234 DONE cov: 56 ft: 78 corp: 9/120b …`).
fn corpus_size(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let rest = l.split(" corp: ").nth(1)?;
        rest.split('/').next()?.parse().ok()
    })
}

/// The input libFuzzer saved on a crash (`Test unit written to ./fuzz/artifacts/…`).
fn artifact(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| p.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRASH_LOG: &str = "\
#2048\tpulse  cov: 310 ft: 702 corp: 41/1820b lim: 21 exec/s: 1024 rss: 48Mb
thread '<unnamed>' panicked at oomguard/src/victim.rs:108:13:
attempt to multiply with overflow
==4242== ERROR: libFuzzer: deadly signal
MS: 1 InsertRepeatedBytes-; base unit: 0000
artifact_prefix='/w/fuzz/artifacts/proc_status/'; Test unit written to /w/fuzz/artifacts/proc_status/crash-da39a3ee
Base64: Vm1Td2FwOjk5OTk5
stat::number_of_executed_units: 2100
stat::average_exec_per_sec:     1050
";

    #[test]
    fn reads_libfuzzer_output() {
        assert_eq!(
            artifact(CRASH_LOG).as_deref(),
            Some("/w/fuzz/artifacts/proc_status/crash-da39a3ee")
        );
        assert_eq!(
            stat(CRASH_LOG, "stat::number_of_executed_units:"),
            Some(2100)
        );
        assert_eq!(corpus_size(CRASH_LOG), Some(41));
        assert_eq!(artifact("#1 INITED cov: 2 corp: 1/1b\n"), None);
    }
}
