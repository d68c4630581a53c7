//! `cargo xtask test --vm`: the integration tests that exercise the kernel, run in a qemu
//! guest per kernel and cgroup layout, with a summary of what ran, passed, failed and was
//! skipped (a test that does not apply to a guest says so through `OOMGUARD_SKIP_LOG`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::step;
use crate::vm::{self, Layout, Series};

/// The guests: Debian 12's 6.1 with each layout, and 6.12 (no v1 memory controller).
pub const CELLS: &[(Series, Layout)] = &[
    (Series::V6_1, Layout::V1),
    (Series::V6_1, Layout::V2),
    (Series::V6_12, Layout::V2),
];

/// The integration test binaries that exercise the kernel. The runtime (containerd), events
/// (kubectl), deploy and soak tests need what the guests do not carry, or no kernel at all.
pub const TESTS: &[&str] = &[
    "cli",
    "cli_doctor",
    "guard",
    "cgroup_v2",
    "degraded",
    "ebpf",
    "cli_bpf",
    "cli_control",
    "faults_node",
    "metrics",
    "reload",
];

/// How much longer the tests' waits may take in a guest (`OOMGUARD_TEST_PATIENCE`).
const PATIENCE: &str = "10";

/// Upper bound for one test binary in a guest (TCG is 10–50× slower than the host).
const PER_BINARY: Duration = Duration::from_secs(900);

#[derive(Debug, Default, Clone)]
struct Count {
    passed: u32,
    failed: u32,
    skipped: u32,
    failures: Vec<String>,
}

impl Count {
    fn add(&mut self, o: &Count) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
        self.failures.extend(o.failures.iter().cloned());
    }
}

/// Counts one binary's libtest log; a test that returned after recording a skip counts as
/// skipped, not passed.
fn count(log: &str, skips: &str) -> Count {
    let skipped: BTreeSet<&str> = skips
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|n| !n.is_empty())
        .collect();
    let mut c = Count::default();
    for line in log.lines() {
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, verdict)) = rest.rsplit_once(" ... ") else {
            continue;
        };
        match verdict.trim() {
            "ok" if skipped.contains(name) => c.skipped += 1,
            "ok" => c.passed += 1,
            "FAILED" => {
                c.failed += 1;
                c.failures.push(name.to_owned());
            }
            v if v.starts_with("ignored") => c.skipped += 1,
            _ => {}
        }
    }
    // A child's stderr (not captured by libtest) can split a `test NAME ... ok` line; the
    // closing `test result:` line's counts then say what the per-test lines missed.
    let (mut passed, mut failed) = (0, 0);
    for line in log.lines().filter(|l| l.starts_with("test result: ")) {
        for part in line.split([';', '.']) {
            let mut w = part.split_whitespace();
            match (w.next().and_then(|n| n.parse::<u32>().ok()), w.next()) {
                (Some(n), Some("passed")) => passed += n,
                (Some(n), Some("failed")) => failed += n,
                _ => {}
            }
        }
    }
    if failed > c.failed {
        c.failures
            .push(format!("{} more (see the log)", failed - c.failed));
        c.failed = failed;
    }
    if passed > c.passed + c.skipped {
        c.passed = passed - c.skipped;
    }
    c
}

/// The named test binaries and the agent's binaries, built for the host (debug, as
/// `cargo test` builds them).
/// Test binaries by name, and the agent's binaries.
type Built = (Vec<(String, PathBuf)>, Vec<PathBuf>);

fn build(filter_tests: &[&str]) -> Result<Built> {
    step("building the integration tests for the kernel matrix");
    // The same selection as the host's `cargo test --workspace`, so what it built is reused
    // (a narrower one resolves features differently and rebuilds half the dependencies).
    let mut cmd = crate::cargo();
    cmd.args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test --no-run")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut tests = Vec::new();
    let mut bins = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let kinds = msg["target"]["kind"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if kinds.iter().any(|k| k == "test") && filter_tests.contains(&name) {
            tests.push((name.to_owned(), PathBuf::from(exe)));
        } else if kinds.iter().any(|k| k == "bin")
            && (name == "oomguard" || name == "oomguard-memhog")
        {
            bins.push(PathBuf::from(exe));
        }
    }
    if !child.wait()?.success() {
        bail!("building the integration tests failed");
    }
    tests.sort_by_key(|(n, _)| filter_tests.iter().position(|t| t == n));
    Ok((tests, bins))
}

/// The guest's script: each test binary in turn, bounded, its log and skips in /out.
fn script(tests: &[(String, PathBuf)], extra: &[String]) -> String {
    let extra: String = extra.iter().map(|a| format!(" '{a}'")).collect();
    let mut s = String::from("cd /disk/tmp 2>/dev/null || cd /tmp\n");
    for (name, exe) in tests {
        let _ = writeln!(
            s,
            "echo \"{name}: running\"\n\
             t0=$(date +%s)\n\
             OOMGUARD_SKIP_LOG=/out/{name}.skips timeout -s KILL {secs} {exe} --test-threads=1{extra} \
             > /out/{name}.log 2>&1\n\
             rc=$?\n\
             echo $rc > /out/{name}.rc\n\
             echo \"{name}: exit $rc in $(( $(date +%s) - t0 )) s; $(grep '^test result' /out/{name}.log | tail -1)\"",
            exe = exe.display(),
            secs = PER_BINARY.as_secs(),
        );
    }
    s
}

struct Cell {
    series: Series,
    layout: Layout,
    release: String,
    count: Count,
    seconds: f64,
    /// Why the guest itself failed (no exit status, a binary killed by its bound).
    trouble: Vec<String>,
}

/// The guests of `kernels` and `layouts` (empty: all), each running the test binaries named in
/// `binaries` (empty: all of [`TESTS`]) with `extra` arguments.
pub fn run(
    target: &Path,
    kernels: &[Series],
    layouts: &[Layout],
    binaries: &[String],
    extra: &[String],
) -> Result<()> {
    let cells: Vec<(Series, Layout)> = CELLS
        .iter()
        .copied()
        .filter(|(k, l)| {
            (kernels.is_empty() || kernels.contains(k))
                && (layouts.is_empty() || layouts.contains(l))
        })
        .collect();
    if cells.is_empty() {
        bail!("no guest of the matrix matches (the matrix: 6.1/v1, 6.1/v2, 6.12/v2)");
    }
    if let Some(unknown) = binaries.iter().find(|b| !TESTS.contains(&b.as_str())) {
        bail!(
            "no test binary {unknown} in the matrix (it has {})",
            TESTS.join(", ")
        );
    }
    let wanted: Vec<&str> = TESTS
        .iter()
        .copied()
        .filter(|t| binaries.is_empty() || binaries.iter().any(|b| b == t))
        .collect();
    let (tests, bins) = build(&wanted)?;
    if tests.len() != wanted.len() || bins.len() < 2 {
        bail!(
            "cargo built {} of {} test binaries and {} of 2 agent binaries",
            tests.len(),
            wanted.len(),
            bins.len()
        );
    }
    let mut files: Vec<PathBuf> = tests.iter().map(|(_, p)| p.clone()).collect();
    files.extend(bins);
    step(&format!(
        "making the guests' disk ({} binaries, and room for page cache)",
        files.len()
    ));
    // The tests' CARGO_TARGET_TMPDIR, compiled in: on the disk, so files written there are
    // page cache on a real filesystem.
    let tmp = fs::canonicalize(target)?.join("tmp");
    let disk = vm::Disk::build(target, &files, &[tmp], 512)?;
    let results_dir = target.join("vm/results");
    let _ = fs::remove_dir_all(&results_dir);
    let mut done = Vec::new();
    for (series, layout) in cells {
        let kernel = vm::kernel(target, series)?;
        let release = kernel.release.clone();
        let tag = format!("{series}/{layout}");
        step(&format!(
            "[{tag}] booting {release} with the {} test binaries",
            tests.len()
        ));
        let guest = vm::Guest {
            kernel,
            layout,
            mem_mib: 2048,
            cpus: 2,
            timeout: PER_BINARY * tests.len() as u32 + Duration::from_secs(120),
            disk: Some(disk.clone()),
            env: vec![
                ("RUST_BACKTRACE".into(), "1".into()),
                // Emulation is 10–50× slower: waits for what should happen may take longer.
                ("OOMGUARD_TEST_PATIENCE".into(), PATIENCE.into()),
            ],
            echo: Some(format!("[{tag}] ")),
        };
        let out = results_dir.join(format!("{series}-{layout}"));
        let outcome = vm::run(target, &guest, &script(&tests, extra), Some(&out))?;
        let mut cell = Cell {
            series,
            layout,
            release,
            count: Count::default(),
            seconds: outcome.elapsed.as_secs_f64(),
            trouble: Vec::new(),
        };
        if outcome.status.is_none() {
            cell.trouble.push(format!(
                "the guest reported no exit status; console tail:\n{}",
                outcome.console_tail(30)
            ));
        }
        for (name, _) in &tests {
            let log = fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
            let skips = fs::read_to_string(out.join(format!("{name}.skips"))).unwrap_or_default();
            let rc = fs::read_to_string(out.join(format!("{name}.rc"))).unwrap_or_default();
            let c = count(&log, &skips);
            match rc.trim() {
                "0" => {}
                "" => cell.trouble.push(format!("{name}: did not run to the end")),
                "137" => cell.trouble.push(format!(
                    "{name}: killed after {} s (hung?); log tail:\n{}",
                    PER_BINARY.as_secs(),
                    tail(&log, 20)
                )),
                rc if c.failed == 0 => cell
                    .trouble
                    .push(format!("{name}: exit {rc}; log tail:\n{}", tail(&log, 20))),
                _ => {}
            }
            for f in &c.failures {
                println!("[{tag}] FAILED {name}::{f}:\n{}", failure_text(&log, f));
            }
            for line in skips.lines() {
                println!("[{tag}] skipped {name}::{}", line.replace('\t', ": "));
            }
            cell.count.add(&c);
        }
        done.push(cell);
    }
    let table = summary(&done);
    println!("\n{table}");
    fs::create_dir_all(&results_dir)?;
    fs::write(results_dir.join("summary.md"), &table)?;
    let bad: Vec<String> =
        done.iter()
            .flat_map(|c| {
                let tag = format!("{}/{}", c.series, c.layout);
                c.trouble.iter().map(move |t| format!("[{tag}] {t}")).chain(
                    (c.count.failed > 0).then(|| {
                        format!(
                            "[{}/{}] {} test(s) failed",
                            c.series, c.layout, c.count.failed
                        )
                    }),
                )
            })
            .collect();
    if !bad.is_empty() {
        for b in &bad {
            eprintln!("{b}");
        }
        bail!("the kernel matrix failed");
    }
    Ok(())
}

fn summary(cells: &[Cell]) -> String {
    let mut s = String::from(
        "| kernel | layout | release | ran | passed | failed | skipped | wall time |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            c.series,
            c.layout,
            c.release,
            c.count.passed + c.count.failed,
            c.count.passed,
            c.count.failed,
            c.count.skipped,
            c.seconds
        );
    }
    s
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `---- NAME stdout ----` section libtest prints for a failed test.
fn failure_text(log: &str, name: &str) -> String {
    let head = format!("---- {name} stdout ----");
    let Some(start) = log.find(&head) else {
        return String::from("(no output captured)");
    };
    let body = &log[start..];
    let rest = &body[head.len()..];
    let end = rest
        .find("\n---- ")
        .or_else(|| rest.find("\nfailures:\n"))
        .map_or(body.len(), |i| i + head.len());
    tail(&body[..end], 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_are_not_passes() {
        let log = "running 3 tests\n\
                   test a ... ok\n\
                   test b ... ok\n\
                   test c ... FAILED\n\
                   test d ... ignored, needs root\n\
                   test result: FAILED. 2 passed; 1 failed; 1 ignored\n";
        let c = count(log, "b\tno cgroup v1 memory controller\n");
        assert_eq!((c.passed, c.failed, c.skipped), (1, 1, 2));
        assert_eq!(c.failures, vec!["c".to_string()]);
        // A line split by a child's stderr: the result line still counts the failure.
        let split = "test x ... child says hi\nFAILED\ntest result: FAILED. 0 passed; 1 failed;\n";
        assert_eq!(count(split, "").failed, 1);
    }

    #[test]
    fn failure_section_is_cut_out() {
        let log = "failures:\n\n---- a stdout ----\nboom\n\n---- b stdout ----\nbang\n\nfailures:\n    a\n";
        assert!(failure_text(log, "a").contains("boom"));
        assert!(!failure_text(log, "a").contains("bang"));
        assert!(failure_text(log, "b").contains("bang"));
    }
}
