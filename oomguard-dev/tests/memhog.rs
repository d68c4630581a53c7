//! oomguard-memhog, the workload of the tests and benchmarks: it paces, holds, writes page
//! cache and rejects bad input. Also what makes `cargo test --workspace` (and the kernel
//! matrix's `--no-run`) build it: cargo builds a package's binaries for its integration
//! tests, and the agent's tests find it through [`oomguard_dev::sandbox::memhog`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEMHOG: &str = env!("CARGO_BIN_EXE_oomguard-memhog");

/// Runs memhog to its end, bounded: a hung memhog is killed and fails the test.
fn run(args: &[&str]) -> (std::process::ExitStatus, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(MEMHOG)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("memhog {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err, started.elapsed())
}

#[test]
fn the_fixture_finds_the_memhog_cargo_built() {
    let found = oomguard_dev::sandbox::memhog();
    assert_eq!(
        found.canonicalize().unwrap(),
        Path::new(MEMHOG).canonicalize().unwrap()
    );
}

#[test]
fn memhog_paces_its_allocation_and_exits_after_holding() {
    // 16 MiB at 64 MiB/s: at least 3/16 of a second (the first chunk is not waited for).
    let (status, err, took) = run(&["--total", "16M", "--rate", "64M", "--hold", "0"]);
    assert!(status.success(), "{status}: {err}");
    assert!(took >= Duration::from_millis(180), "too fast: {took:?}");
}

#[test]
fn memhog_writes_page_cache_to_a_file() {
    let file =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("memhog-file-{}", std::process::id()));
    let (status, err, _) = run(&[
        "--file",
        file.to_str().unwrap(),
        "--total",
        "3M",
        "--hold",
        "0",
    ]);
    let len = std::fs::metadata(&file).map(|m| m.len());
    let _ = std::fs::remove_file(&file);
    assert!(status.success(), "{status}: {err}");
    assert_eq!(len.unwrap(), 3 << 20);
}

#[test]
fn memhog_rejects_bad_input_with_status_2() {
    for args in [
        &["--rate", "fast"][..],
        &["--adj", "-5000", "--total", "1M"],
    ] {
        let (status, err, _) = run(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?}: no error text");
    }
}
