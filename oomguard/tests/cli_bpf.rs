//! `oomguard bpf prog show`, `bpf map show`, `bpf map dump`: against a real agent in eBPF
//! mode, the pins decode into what the test set up (the thresholds of its cgroup, the memhog
//! it started); without pins, one clear line and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::path::PathBuf;
use std::time::Duration;

use fixture::{M, hog, oomguard, sandbox, wait_rss};
use oomguard::threshold::Margins;

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = oomguard(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The message of `{"error": "..."}`, the one JSON object a failed `--json` command prints.
fn json_error(out: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON: {e}: {out:?}"));
    let object = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {out}"));
    assert_eq!(object.len(), 1, "{out}");
    object["error"]
        .as_str()
        .expect("error is a string")
        .to_string()
}

fn pin_dir(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/oomguard-test-cli-{name}-{}",
        std::process::id()
    ))
}

#[test]
fn pins_decode_into_the_cgroup_and_task_the_test_made() {
    let _serial = fixture::serial();
    if !fixture::kernel_ready() || !fixture::ebpf_ready() {
        return;
    }
    let limit = 256 * M;
    let sb = sandbox("oomguard-cli-bpf", limit);
    let pins = pin_dir("dump");
    let pins_s = pins.display().to_string();
    let root = sb.path().display().to_string();
    let _agent = fixture::launch(sb.path())
        .args(&[
            "--mode",
            "ebpf",
            "--policy",
            "noop",
            "--margin-ratio",
            "0.1",
            "--bpf-pin-dir",
            &pins_s,
        ])
        .start();
    let mut memhog = hog(&sb.cg, &["--total", "32M"]);
    wait_rss(&memhog, 30 * M, Duration::from_secs(10));

    // Maps: the three pins, with their kinds.
    let maps = json(&["bpf", "map", "show", "--json", "--bpf-pin-dir", &pins_s]);
    let maps = maps.as_array().unwrap();
    let kinds: Vec<(&str, &str)> = maps
        .iter()
        .map(|m| (m["pin"].as_str().unwrap(), m["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("THRESHOLDS", "hash"),
            ("TASKS", "lru_hash"),
            ("EVENTS", "ringbuf")
        ]
    );
    assert!(maps[0]["entries"].as_u64().unwrap() >= 1);

    // THRESHOLDS: our cgroup, by inode, at the thresholds the flags give.
    let want = Margins {
        ratio: 0.1,
        ..Margins::default()
    }
    .thresholds(limit)
    .unwrap();
    let entries = json(&[
        "bpf",
        "map",
        "dump",
        "THRESHOLDS",
        "--json",
        "--bpf-pin-dir",
        &pins_s,
    ]);
    let ours = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cgroup"].as_str() == Some(root.as_str()))
        .unwrap_or_else(|| panic!("{root} not in {entries:#}"));
    assert_eq!(ours["cgroup_id"], sb.cg.id().unwrap());
    assert_eq!(ours["kill_bytes"], want.kill);
    assert_eq!(ours["reclaim_bytes"], want.reclaim);
    assert_eq!(ours["above_kill"], false);

    // TASKS: the memhog, by pid, with its comm and its anonymous memory. /proc's rss above
    // counts the binary's file pages too, so the hog may still be touching its last
    // megabytes: read the map until its anon reaches 30 MiB (bounded), then check the range.
    let deadline = std::time::Instant::now() + fixture::patience(Duration::from_secs(10));
    let task = loop {
        let tasks = json(&[
            "bpf",
            "map",
            "dump",
            "TASKS",
            "--json",
            "--bpf-pin-dir",
            &pins_s,
        ]);
        let task = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["pid"] == memhog.id())
            .cloned();
        let anon = task
            .as_ref()
            .and_then(|t| t["rss_anon"].as_u64())
            .unwrap_or(0);
        if anon >= 30 * M || std::time::Instant::now() >= deadline {
            break task.unwrap_or_else(|| panic!("pid {} not in TASKS", memhog.id()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(task["comm"], "oomguard-memhog");
    let anon = task["rss_anon"].as_u64().unwrap();
    assert!((30 * M..64 * M).contains(&anon), "rss_anon {anon}");

    // Programs: every one attached, named, at its hook.
    let progs = json(&["bpf", "prog", "show", "--json", "--bpf-pin-dir", &pins_s]);
    let progs = progs.as_array().unwrap();
    let attach = |name: &str| {
        progs
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no program {name} in {progs:#?}"))["attach"]
            .clone()
    };
    // Every program this kernel can run (per-program checks: 6.1/6.12 have no
    // count_memcg_events, so memcg_pressure is not among them there).
    // One loaded program per hook: rss_stat's program also does rss_pressure's job.
    let caps = oomguard::bpf::capabilities();
    let wanted: Vec<&str> = caps
        .programs
        .iter()
        .filter(|p| p.wanted())
        .map(|p| p.program)
        .collect();
    let hooks: std::collections::BTreeSet<&str> = caps
        .programs
        .iter()
        .filter(|p| p.wanted())
        .map(|p| p.hook)
        .collect();
    assert_eq!(progs.len(), hooks.len(), "want {wanted:?}: {progs:#?}");
    // The charge program attached on demand is loaded, and attached only while a guarded
    // cgroup is near its thresholds (this one is far from them): no attach point or its hook.
    let on_demand = caps
        .programs
        .iter()
        .any(|p| p.program == "memcg_pressure" && p.wanted() && p.on_demand);
    if wanted.contains(&"memcg_pressure") {
        let got = attach("memcg_pressure");
        assert!(
            got == "raw_tp:count_memcg_events" || (on_demand && got.is_null()),
            "memcg_pressure: {got}"
        );
    }
    // A classic tracepoint's attach point comes from its perf-event link's info, which
    // kernels before 6.6 do not give (6.1: null, shown as "-"); from 6.6 on it is exact.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let perf_link_info = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 6);
    for (prog, want) in [
        ("at_limit", "tracepoint:mm_vmscan_memcg_reclaim_begin"),
        ("cgroup_mkdir", "tracepoint:cgroup_mkdir"),
    ] {
        let got = attach(prog);
        assert!(
            (got.is_null() && !perf_link_info) || got == want,
            "{prog}: {got} (want {want})"
        );
    }

    // Human output to a pipe: aligned tables, nothing cut.
    for args in [
        &["bpf", "prog", "show"][..],
        &["bpf", "map", "show"],
        &["bpf", "map", "dump", "THRESHOLDS"],
        &["bpf", "map", "dump", "TASKS"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--bpf-pin-dir", pins_s.as_str()]);
        let (code, out, err) = oomguard(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.lines().count() >= 2 && !out.contains('…'), "{out}");
    }
    // The ring buffer has nothing to dump: one line, non-zero; with --json, that line is
    // JSON on stdout (as bpftool answers).
    let (code, _, err) = oomguard(&["bpf", "map", "dump", "EVENTS", "--bpf-pin-dir", &pins_s]);
    assert_ne!(code, 0);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (json_code, out, err) = oomguard(&[
        "bpf",
        "map",
        "dump",
        "EVENTS",
        "--json",
        "--bpf-pin-dir",
        &pins_s,
    ]);
    assert_eq!(json_code, code, "--json keeps the exit status");
    assert!(err.is_empty(), "{err}");
    let error = json_error(&out);
    assert!(error.contains("EVENTS is a ring buffer"), "{error}");

    let _ = memhog.kill();
    let _ = memhog.wait();
}

#[test]
fn a_missing_pin_dir_is_one_clear_line() {
    let missing = "/sys/fs/bpf/oomguard-test-cli-none";
    for args in [
        &["bpf", "prog", "show"][..],
        &["bpf", "map", "show"],
        &["bpf", "map", "dump", "TASKS"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--bpf-pin-dir", missing]);
        let (code, out, err) = oomguard(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(missing), "{err}");
    }
}

#[test]
fn json_answers_json_when_it_fails() {
    let missing = "/sys/fs/bpf/oomguard-test-cli-none";
    for args in [
        &["bpf", "prog", "show", "--json"][..],
        &["bpf", "map", "show", "--json"],
        &["bpf", "map", "dump", "TASKS", "--json"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--bpf-pin-dir", missing]);
        let (code, out, err) = oomguard(&args);
        assert_eq!(code, 1, "{args:?}: {out} {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
        let error = json_error(&out);
        assert!(error.contains(missing), "{args:?}: {error}");
    }
}
