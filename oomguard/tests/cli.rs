//! Bad input: one clear line on stderr and exit status 2, nothing started; with `--json`, the
//! line is `{"error": ...}` on stdout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_oomguard"))
        .args(args)
        .output()
        .expect("run oomguard")
}

fn run(args: &[&str]) -> (i32, String) {
    let out = output(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--policy", "reboot"], "reboot"),
        (&["run", "--margin-ratio", "0"], "--margin-ratio"),
        (&["run", "--margin-ratio", "1.5"], "--margin-ratio"),
        (&["run", "--margin-ratio", "abc"], "abc"),
        (
            &["run", "--min-margin", "60M", "--max-margin", "50M"],
            "--min-margin",
        ),
        (&["run", "--max-margin", "12Q"], "12Q"),
        (
            &["run", "--root", "/nonexistent/memory"],
            "/nonexistent/memory",
        ),
        (&["run", "--mode", "magic"], "magic"),
        (&["run", "--walk-interval", "0"], "--walk-interval"),
        (&["run", "--no-such-flag"], "--no-such-flag"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, needle) in cases {
        let (code, err) = run(args);
        assert_eq!(code, 2, "{args:?}: exit {code}, stderr {err:?}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} does not name {needle:?}"
        );
    }
}

#[test]
fn bad_input_with_json_is_json_on_stdout() {
    for (args, needle) in [
        (&["bpf", "map", "dump", "--json"][..], "<NAME>"),
        (&["cgroups", "--json", "--no-such-flag"], "--no-such-flag"),
        (&["events", "--json", "--state-dir"], "--state-dir"),
    ] {
        let out = output(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}");
        assert!(out.stderr.is_empty(), "{args:?}: {:?}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON: {e}: {stdout}"));
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{args:?}: {stdout}");
    }
    // `run` has no --json: its bad input stays plain text.
    let (code, err) = run(&["run", "--json"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("oomguard: ") && err.contains("--json"),
        "{err}"
    );
}

#[test]
fn help_and_version_exit_0() {
    assert_eq!(run(&["--help"]).0, 0);
    assert_eq!(run(&["--version"]).0, 0);
    assert_eq!(run(&["run", "--help"]).0, 0);
}
