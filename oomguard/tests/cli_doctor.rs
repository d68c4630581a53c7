//! `oomguard doctor`: the capability report agrees with what the tests probe themselves, and
//! its exit status says whether the agent can run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;

fn doctor(args: &[&str]) -> (i32, String) {
    let (code, out, _) = fixture::oomguard(&[&["doctor"], args].concat());
    (code, out)
}

#[test]
fn json_report_agrees_with_the_kernel() {
    if !fixture::kernel_ready() {
        return;
    }
    let (code, out) = doctor(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("doctor --json is JSON");
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(v["kernel"], osrelease.trim());
    let checks = v["checks"].as_array().unwrap();
    let status = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name} in {out}"))["status"]
            .clone()
    };
    // kernel_ready() saw these files in our own memory cgroup.
    for name in [
        "memory cgroup v1",
        "cgroup.event_control",
        "memory.force_empty",
        "memory.oom_control",
    ] {
        assert_eq!(status(name), "ok", "{name}");
    }
    assert_eq!(v["can_run"], true);
    assert_eq!(code, 0);
    // Swap accounting: on when the kernel made the memsw files for our cgroup, and the
    // node's swap as /proc/meminfo has it.
    let swap = checks
        .iter()
        .find(|c| c["name"] == "swap accounting")
        .unwrap_or_else(|| panic!("no swap accounting check in {out}"));
    assert_eq!(swap["status"], "ok");
    let own_memsw = oomguard::cgroup::cgroup_of_pid(
        std::path::Path::new(oomguard::cgroup::DEFAULT_MEMORY_ROOT),
        "self",
    )
    .unwrap()
    .file("memory.memsw.limit_in_bytes")
    .exists();
    let detail = swap["detail"].as_str().unwrap();
    assert_eq!(detail.starts_with("on"), own_memsw, "{detail}");
    if oomguard::cgroup::node_swap_total() == 0 {
        assert!(detail.contains("no swap"), "{detail}");
    }
    let caps = oomguard::bpf::capabilities();
    assert_eq!(
        v["auto_mode"],
        if caps.usable() { "ebpf" } else { "eventfd" }
    );
    // One line per program: usable (attached or standing by) or missing, with why.
    assert_eq!(caps.programs.len(), 10);
    for p in &caps.programs {
        let want = if p.problem.is_none() { "ok" } else { "missing" };
        assert_eq!(status(p.program), want, "{}", p.program);
    }
    // A socket that does not exist is "not present", never a failure.
    let (code, out) = doctor(&[
        "--json",
        "--containerd-sock",
        "/nonexistent/containerd.sock",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sock = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "containerd socket")
        .unwrap();
    assert_eq!(sock["status"], "not present");
    // The probe cgroup is gone.
    let own = oomguard::cgroup::cgroup_of_pid(
        std::path::Path::new(oomguard::cgroup::DEFAULT_MEMORY_ROOT),
        "self",
    )
    .unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&own.path)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("oomguard-doctor-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn human_report_to_a_pipe_is_whole_and_names_the_mode() {
    if !fixture::kernel_ready() {
        return;
    }
    let (code, out) = doctor(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains('…'),
        "nothing is cut when stdout is no terminal: {out}"
    );
    assert!(out.contains("--mode auto would use "), "{out}");
}
