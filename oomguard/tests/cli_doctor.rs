//! `oomguard doctor`: the capability report agrees with what the tests probe themselves, and
//! its exit status says whether the agent can run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

fn doctor(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::agent_exe())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run oomguard doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn json_report_agrees_with_the_kernel() {
    if !common::kernel_ready() {
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
    if !common::kernel_ready() {
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

/// Runs `oomguard doctor` with stdout on a pseudo-terminal (stderr discarded) and returns
/// what the terminal showed; `env` goes to the child.
fn doctor_on_a_terminal(env: &[(&str, &str)]) -> (i32, String) {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new fds into the out-pointers; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = Command::new(common::agent_exe())
        .arg("doctor")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::from(slave))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run oomguard doctor");
    // The reader ends when the child's side closes (EIO); bounded by the receive below.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut master = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(out);
    });
    let out = rx.recv_timeout(std::time::Duration::from_secs(60));
    if out.is_err() {
        let _ = child.kill();
    }
    let code = child.wait().expect("wait for doctor").code().unwrap_or(-1);
    let out = out.expect("doctor ended within 60 s");
    (code, String::from_utf8_lossy(&out).replace('\r', ""))
}

#[test]
fn human_report_on_a_terminal_fits_its_width_and_cuts_at_the_end() {
    if !common::kernel_ready() {
        return;
    }
    let (code, out) = doctor_on_a_terminal(&[("COLUMNS", "72"), ("NO_COLOR", "1")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 72), "{out}");
    // Some detail is longer than the 72 columns left: its beginning stays, its end goes.
    let cut: Vec<&str> = out.lines().filter(|l| l.contains('…')).collect();
    assert!(!cut.is_empty(), "{out}");
    assert!(cut.iter().all(|l| l.ends_with('…')), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("GROUP ")),
        "the header is whole: {out}"
    );
}
