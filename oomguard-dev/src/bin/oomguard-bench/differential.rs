//! The differential suite: each scenario with the kernel alone, then with the agent; the
//! kernel is the oracle for which kills were needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oomguard::cgroup::MemCgroup;
use oomguard_dev::sandbox::{Agent, Sandbox, in_cgroup};
use serde::Serialize;

use crate::avoid::wait_children;
use crate::{M, progress};

/// One scenario of the differential suite: run with the kernel alone, then with the agent,
/// and count who killed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Diff {
    /// One task holds this share (percent) of a 256 MiB limit in anonymous memory while a
    /// writer puts 400 MiB through the page cache at 100 MB/s (at 200 MB/s the kernel OOMs
    /// on v1 with dirty pages it cannot write back fast enough: another scenario).
    CacheHeavy(u64),
    /// A tmpfs file holds a 128 MiB cgroup just above its kill threshold (filled before the
    /// agent starts); three idle tasks start there one after another.
    TmpfsIdle,
    /// 150 MiB anonymous and a writer at the limit; eight bursts of 60 MiB that come and go.
    Bursty,
    /// 60 tasks growing to 5 MiB each at 1 MB/s in 256 MiB (300 MiB in all).
    ManySmall,
    /// One task growing to 1 GiB at 200 MB/s in 256 MiB.
    LargeVictim,
    /// A 240 MiB container inside a 256 MiB pod; an unthrottled task in the container, an
    /// 8 MiB bystander in the pod.
    Nested,
}

impl Diff {
    fn name(self) -> String {
        match self {
            Diff::CacheHeavy(p) => format!("{p}% anonymous + file I/O, 256MiB"),
            Diff::TmpfsIdle => "tmpfs above the threshold + 3 idle tasks, 128MiB".into(),
            Diff::Bursty => "bursts absorbed by reclaim, 256MiB".into(),
            Diff::ManySmall => "60 small tasks outgrowing 256MiB".into(),
            Diff::LargeVictim => "one large task outgrowing 256MiB".into(),
            Diff::Nested => "nested pod 256MiB / container 240MiB".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DiffRow {
    pub(crate) scenario: String,
    pub(crate) mode: String,
    pub(crate) trials: u32,
    /// Kills by the kernel OOM killer in the kernel-alone runs.
    pub(crate) kernel_alone_kills: u64,
    /// Kills by the agent in the agent runs.
    pub(crate) agent_kills: u64,
    /// Kills by the kernel in the agent runs (the agent was too late).
    pub(crate) kernel_kills_with_agent: u64,
    /// Agent kills in trials whose kernel-alone twin killed nobody.
    pub(crate) agent_kills_where_kernel_killed_none: u64,
}

/// Kills the children on drop.
pub(crate) struct Kids(pub(crate) Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A private tmpfs, unmounted on drop.
pub(crate) struct TmpfsMount(pub(crate) PathBuf);

impl TmpfsMount {
    pub(crate) fn new() -> Result<TmpfsMount, String> {
        let dir = std::env::temp_dir().join(format!("oomguard-bench-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512M", "oomguard-bench"])
            .arg(&dir)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("mount tmpfs on {}: {st}", dir.display()));
        }
        Ok(TmpfsMount(dir))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

pub(crate) fn spawn_in(cg: &MemCgroup, exe: &Path, args: &[&str]) -> Result<Child, String> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    in_cgroup(&mut cmd, cg)
        .map_err(|e| e.to_string())?
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))
}

pub(crate) fn wait_rss(child: &Child, bytes: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let rss = oomguard::victim::read_task(child.id() as i32, Path::new(""))
            .map_or(0, |t| t.rss_bytes);
        if rss >= bytes {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn start_diff_agent(agent_exe: &Path, root: &Path, mode: &str) -> Result<Agent, String> {
    let root_s = root.display().to_string();
    let pins = format!("/sys/fs/bpf/oomguard-bench-diff-{}", std::process::id());
    let agent = Agent::start(
        agent_exe,
        &[
            "--root",
            &root_s,
            "--policy",
            "process",
            "--walk-interval",
            "3600",
            "--mode",
            mode,
            "--bpf-pin-dir",
            &pins,
        ],
        None,
    )
    .map_err(|e| e.to_string())?;
    if agent.wait_armed(root, Duration::from_secs(20)).is_none() {
        return Err(format!("the agent did not arm {}", root.display()));
    }
    Ok(agent)
}

/// One trial: (kernel kills, agent kills).
pub(crate) fn diff_trial(
    sc: Diff,
    mode: &str,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<(u64, u64), String> {
    let sb = Sandbox::new("bench-diff").map_err(|e| e.to_string())?;
    let limit = match sc {
        Diff::TmpfsIdle => 128 * M,
        _ => 256 * M,
    };
    sb.cg.set_limit(limit).map_err(|e| e.to_string())?;
    let with_agent = mode != "kernel-only";
    let mut kids = Kids(Vec::new());
    let mut agent = None;
    let mut tmpfs = None;
    if with_agent && !matches!(sc, Diff::TmpfsIdle | Diff::Nested) {
        agent = Some(start_diff_agent(agent_exe, sb.path(), mode)?);
    }
    let hog = |cg: &MemCgroup, args: &[&str]| spawn_in(cg, memhog, args);
    let file = std::env::temp_dir().join(format!("oomguard-bench-diff-{}", std::process::id()));
    let file_s = file.display().to_string();
    match sc {
        Diff::CacheHeavy(pct) => {
            // A bare number means MiB to memhog: say KiB.
            let total = format!("{}K", limit * pct / 100 / 1024);
            let anon = hog(&sb.cg, &["--total", &total, "--rate", "0"])?;
            wait_rss(&anon, limit * pct / 100 * 95 / 100, Duration::from_secs(30));
            kids.0.push(anon);
            let mut w = hog(
                &sb.cg,
                &[
                    "--file", &file_s, "--rate", "100M", "--total", "400M", "--hold", "0",
                ],
            )?;
            wait_children(std::slice::from_mut(&mut w), Duration::from_secs(60));
            kids.0.push(w);
        }
        Diff::TmpfsIdle => {
            let fs = TmpfsMount::new()?;
            let held = fs.0.join("held").display().to_string();
            // Default margin 2%: kill threshold 125.44 MiB; the file takes usage to ~126.
            let mut w = hog(&sb.cg, &["--file", &held, "--total", "125M", "--hold", "0"])?;
            wait_children(std::slice::from_mut(&mut w), Duration::from_secs(30));
            tmpfs = Some(fs);
            if with_agent {
                agent = Some(start_diff_agent(agent_exe, sb.path(), mode)?);
            }
            for _ in 0..3 {
                let mut cmd = Command::new("sleep");
                cmd.arg("60");
                kids.0.push(
                    in_cgroup(&mut cmd, &sb.cg)
                        .map_err(|e| e.to_string())?
                        .spawn()
                        .map_err(|e| e.to_string())?,
                );
                std::thread::sleep(Duration::from_secs(2));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Diff::Bursty => {
            let anon = hog(&sb.cg, &["--total", "150M", "--rate", "0"])?;
            wait_rss(&anon, 140 * M, Duration::from_secs(30));
            kids.0.push(anon);
            kids.0.push(hog(
                &sb.cg,
                &[
                    "--file", &file_s, "--rate", "100M", "--total", "300M", "--hold", "0",
                ],
            )?);
            for _ in 0..8 {
                let mut b = hog(&sb.cg, &["--total", "60M", "--rate", "0", "--hold", "0"])?;
                wait_children(std::slice::from_mut(&mut b), Duration::from_secs(20));
                kids.0.push(b);
            }
            let n = kids.0.len();
            wait_children(&mut kids.0[1..n], Duration::from_secs(60));
        }
        Diff::ManySmall => {
            let mut v = Vec::new();
            for _ in 0..60 {
                v.push(hog(
                    &sb.cg,
                    &[
                        "--total", "5M", "--rate", "1M", "--chunk", "256K", "--hold", "4",
                    ],
                )?);
            }
            wait_children(&mut v, Duration::from_secs(30));
            kids.0.extend(v);
        }
        Diff::LargeVictim => {
            let mut h = hog(&sb.cg, &["--total", "1G", "--rate", "200M"])?;
            wait_children(std::slice::from_mut(&mut h), Duration::from_secs(30));
            kids.0.push(h);
        }
        Diff::Nested => {
            let ctr = sb.child("ctr").map_err(|e| e.to_string())?;
            ctr.set_limit(240 * M).map_err(|e| e.to_string())?;
            if with_agent {
                let a = start_diff_agent(agent_exe, sb.path(), mode)?;
                if a.wait_armed(&ctr.path, Duration::from_secs(20)).is_none() {
                    return Err("the agent did not arm the container".into());
                }
                agent = Some(a);
            }
            let by = hog(&sb.cg, &["--total", "8M", "--rate", "0"])?;
            wait_rss(&by, 7 * M, Duration::from_secs(10));
            kids.0.push(by);
            let mut h = hog(&ctr, &["--total", "1G", "--rate", "0"])?;
            wait_children(std::slice::from_mut(&mut h), Duration::from_secs(30));
            kids.0.push(h);
        }
    }
    // Records of late decisions reach the log.
    std::thread::sleep(Duration::from_millis(500));
    let kernel = sb.cg.subtree_oom_kills();
    let agent_kills = agent
        .as_ref()
        .map_or(0, |a| a.decisions("kill").len() as u64);
    drop(kids);
    sb.kill_all();
    drop(agent);
    let _ = sb.cg.force_empty();
    drop(tmpfs);
    let _ = std::fs::remove_file(&file);
    Ok((kernel, agent_kills))
}

pub(crate) fn differential(
    modes: &[String],
    trials: u32,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<Vec<DiffRow>, String> {
    let list = [
        Diff::CacheHeavy(80),
        Diff::CacheHeavy(90),
        Diff::CacheHeavy(95),
        Diff::CacheHeavy(96),
        Diff::CacheHeavy(97),
        Diff::TmpfsIdle,
        Diff::Bursty,
        Diff::ManySmall,
        Diff::LargeVictim,
        Diff::Nested,
    ];
    let mut rows = Vec::new();
    for (i, sc) in list.iter().enumerate() {
        progress(&format!(
            "[{}/{}] differential: {}",
            i + 1,
            list.len(),
            sc.name()
        ));
        let mut alone = Vec::new();
        for _ in 0..trials {
            alone.push(diff_trial(*sc, "kernel-only", agent_exe, memhog)?.0);
        }
        for mode in modes.iter().filter(|m| m.as_str() != "kernel-only") {
            let mut row = DiffRow {
                scenario: sc.name(),
                mode: mode.clone(),
                trials,
                kernel_alone_kills: alone.iter().sum(),
                agent_kills: 0,
                kernel_kills_with_agent: 0,
                agent_kills_where_kernel_killed_none: 0,
            };
            for twin in &alone {
                let (kernel, agent) = diff_trial(*sc, mode, agent_exe, memhog)?;
                row.agent_kills += agent;
                row.kernel_kills_with_agent += kernel;
                if *twin == 0 {
                    row.agent_kills_where_kernel_killed_none += agent;
                }
            }
            progress(&format!(
                "    {mode}: kernel alone kills {}, agent kills {}, kernel kills with the agent {}, agent kills where the kernel killed nobody {}",
                row.kernel_alone_kills,
                row.agent_kills,
                row.kernel_kills_with_agent,
                row.agent_kills_where_kernel_killed_none
            ));
            rows.push(row);
        }
    }
    Ok(rows)
}
