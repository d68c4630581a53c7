//! Without any runtime, a pod's cgroup still yields the right victim (the `pause` rule keeps
//! the sandbox out even when it holds the most memory) and the fallback kills exactly that
//! container cgroup's tasks, quickly, leaving the sandbox alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use oomguard_dev::fixture;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fixture::TempDir;
use oomguard::cgroup::MemCgroup;
use oomguard::runtime::{
    Endpoint, RuntimeClient, RuntimeConfig, RuntimeError, fallback_kill_cgroup_tasks,
};
use oomguard_dev::sandbox::{Sandbox, in_cgroup};

const M: u64 = 1 << 20;

struct Kids(Vec<Child>);
impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_in(cg: &MemCgroup, prog: &Path, args: &[&str]) -> Child {
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    in_cgroup(&mut cmd, cg).unwrap().spawn().unwrap()
}

#[test]
fn without_a_runtime_the_pause_container_is_spared_and_the_fallback_kills_the_app() {
    if !fixture::require(
        (rustix::process::geteuid().as_raw() != 0)
            .then(|| "not root: the test makes cgroups".into()),
    ) || !fixture::require(
        (!Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists())
            .then(|| "no cgroup v1 memory hierarchy".into()),
    ) {
        return;
    }
    let sb = Sandbox::new("rt-fallback").unwrap();
    let dir = TempDir::new("fallback");
    let uid = "7d1e2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
    let pod = sb.path().join(format!("kubepods/besteffort/pod{uid}"));
    std::fs::create_dir_all(&pod).unwrap();
    let (pause_id, app_id) = ("a".repeat(64), "b".repeat(64));
    let pause_cg = MemCgroup::new(pod.join(&pause_id));
    let app_cg = MemCgroup::new(pod.join(&app_id));
    std::fs::create_dir(&pause_cg.path).unwrap();
    std::fs::create_dir(&app_cg.path).unwrap();
    // The "pause" container: page cache charged to it first (the biggest), then a process
    // whose comm is `pause` (the kernel names it after the executed file).
    let pause = dir.path().join("pause");
    symlink("/bin/sleep", &pause).unwrap();
    let fill = dir.path().join("fill");
    let mut dd = spawn_in(
        &pause_cg,
        Path::new("/bin/dd"),
        &[
            "if=/dev/zero",
            &format!("of={}", fill.display()),
            "bs=1M",
            "count=24",
        ],
    );
    assert!(dd.wait().unwrap().success());
    let mut kids = Kids(vec![spawn_in(&pause_cg, &pause, &["1000"])]);
    for _ in 0..3 {
        kids.0
            .push(spawn_in(&app_cg, Path::new("/bin/sleep"), &["1000"]));
    }
    assert!(pause_cg.usage().unwrap() > app_cg.usage().unwrap() + 16 * M);

    let rt = RuntimeClient::new(RuntimeConfig {
        endpoints: vec![Endpoint::containerd(dir.path().join("missing.sock"))],
        docker_root: dir.path().to_path_buf(),
        call_timeout: Duration::from_secs(1),
        unhealthy: Default::default(),
    })
    .unwrap();
    let t = Instant::now();
    let target = rt.plan_blocking(&pod, Duration::from_secs(1)).unwrap();
    // No call is made: well below the 1 s call timeout, with slack for a loaded machine.
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(target.id, app_id, "{target:#?}");
    assert!(target.info.is_none(), "no runtime: nothing identified");
    let err = rt
        .kill_container_blocking(&target, Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    assert!(matches!(
        rt.plan_blocking(&pause_cg.path, Duration::from_secs(1)),
        Err(RuntimeError::NoContainer { .. })
    ));

    let fb = fallback_kill_cgroup_tasks(
        &target.cgroup,
        Path::new("/sys/fs/cgroup/memory"),
        Duration::from_secs(2),
    );
    eprintln!(
        "fallback: {} task(s) signalled, last process gone after {:?} us",
        fb.killed.len(),
        fb.gone_us
    );
    assert!(fb.took_effect(), "{fb:#?}");
    assert_eq!(fb.killed.len(), 3);
    assert!(fb.gone_us.unwrap() < 500_000);
    assert!(app_cg.procs().unwrap().is_empty());
    assert_eq!(pause_cg.procs().unwrap().len(), 1, "the sandbox lives");
}
