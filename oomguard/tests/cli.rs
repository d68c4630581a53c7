//! Bad input: one clear line on stderr and exit status 2, nothing started.

#![allow(clippy::unwrap_used, clippy::expect_used)]

fn run(args: &[&str]) -> (i32, String) {
    let (code, _, err) = oomguard_dev::fixture::oomguard(args);
    (code, err)
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
fn help_and_version_exit_0() {
    assert_eq!(run(&["--help"]).0, 0);
    assert_eq!(run(&["--version"]).0, 0);
    assert_eq!(run(&["run", "--help"]).0, 0);
}
