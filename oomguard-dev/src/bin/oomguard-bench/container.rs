//! The container policy's latency through a private containerd: signal → kill request,
//! signal → the container stopped.

use std::path::Path;
use std::time::Duration;

use oomguard::cgroup::MemCgroup;
use oomguard_dev::sandbox::{Agent, Sandbox};
use serde::Serialize;

use crate::avoid::percentile;
use crate::footprint::StateDir;
use crate::{M, progress};

/// The container policy through a private containerd: signal → kill request sent, and
/// signal → the container's cgroup holding no task (the container stopped).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ContainerLatencyRow {
    pub(crate) mode: String,
    pub(crate) trials: u32,
    /// Killed through containerd (not the direct fallback), the kernel's count unchanged.
    pub(crate) guarded_via_containerd: u32,
    pub(crate) kernel_kills: u64,
    pub(crate) signal_to_kill_request_p50_us: u64,
    pub(crate) signal_to_kill_request_p99_us: u64,
    pub(crate) signal_to_kill_request_max_us: u64,
    pub(crate) signal_to_stopped_p50_us: u64,
    pub(crate) signal_to_stopped_p99_us: u64,
    pub(crate) signal_to_stopped_max_us: u64,
}

/// The pod of the container-policy rows: its limit, the app's growth rate and the margin.
/// With a 10% margin (12.8 MiB) the app grows at most ~8 MiB during the slowest kill
/// through containerd measured in the tests (121 ms), so the kernel stays out of it.
pub(crate) const POD_LIMIT: u64 = 128 * M;
pub(crate) const APP_RATE: &str = "64M";
pub(crate) const POD_MARGIN_RATIO: &str = "0.1";

/// `trials` app containers, one at a time, outgrowing a pod (laid out like kubelet's
/// cgroupfs driver, with a `pause` sandbox container) against the agent's container policy
/// on a private containerd; each app is removed before the next starts.
pub(crate) fn container_latency_row(
    mode: &str,
    trials: u32,
    agent_exe: &Path,
    memhog: &Path,
) -> Result<ContainerLatencyRow, String> {
    use oomguard::runtime::labels;
    use oomguard_dev::sandbox::containerd::{Containerd, container_id};
    const NS: &str = "k8s.io";
    const UID: &str = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
    let sb = Sandbox::new("bench-ctr").map_err(|e| e.to_string())?;
    let kubepods = sb.path().join("kubepods");
    let pod = kubepods.join("burstable").join(format!("pod{UID}"));
    std::fs::create_dir_all(&pod).map_err(|e| format!("{}: {e}", pod.display()))?;
    let pod_cg = MemCgroup::new(&pod);
    pod_cg.set_limit(POD_LIMIT).map_err(|e| e.to_string())?;
    // Dropped before `sb`: containers and containerd go before the cgroups.
    let ctrd = Containerd::start("bench")?;
    let run = |id: &str, kind: &str, name: &str, cmd: &[&str]| {
        let l = [
            (labels::POD_NAME, "bench-0"),
            (labels::POD_NAMESPACE, "bench"),
            (labels::POD_UID, UID),
            (labels::CONTAINER_NAME, name),
            (labels::CRI_KIND, kind),
        ];
        ctrd.run(NS, id, &pod.join(id), 0, &l, cmd)
    };
    let sandbox = container_id();
    ctrd.install(&sandbox, memhog, "pause")?;
    run(
        &sandbox,
        "sandbox",
        "POD",
        &["/bin/pause", "--total", "0", "--hold", "100000"],
    )?;
    let pins = format!("/sys/fs/bpf/oomguard-bench-ctr-{}", std::process::id());
    let state = StateDir::new("ctr")?;
    let root = kubepods.display().to_string();
    let sock = ctrd.socket.display().to_string();
    let missing = ctrd.dir.join("no-docker.sock").display().to_string();
    let agent = Agent::start(
        agent_exe,
        &[
            "--root",
            &root,
            "--mode",
            mode,
            "--policy",
            "container",
            "--margin-ratio",
            POD_MARGIN_RATIO,
            "--containerd-sock",
            &sock,
            "--docker-containerd-sock",
            &missing,
            "--walk-interval",
            "3600",
            "--bpf-pin-dir",
            &pins,
            "--state-dir",
            state.path(),
        ],
        None,
    )
    .map_err(|e| e.to_string())?;
    agent
        .wait_armed(&pod, Duration::from_secs(10))
        .ok_or("the agent did not arm the pod within 10 s")?;
    let mut row = ContainerLatencyRow {
        mode: mode.to_string(),
        trials: 0,
        guarded_via_containerd: 0,
        kernel_kills: 0,
        signal_to_kill_request_p50_us: 0,
        signal_to_kill_request_p99_us: 0,
        signal_to_kill_request_max_us: 0,
        signal_to_stopped_p50_us: 0,
        signal_to_stopped_p99_us: 0,
        signal_to_stopped_max_us: 0,
    };
    let (mut request, mut stopped) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let app = container_id();
        ctrd.install(&app, memhog, "oomguard-memhog")?;
        let before = pod_cg.subtree_oom_kills();
        run(
            &app,
            "container",
            "app",
            &[
                "/bin/oomguard-memhog",
                "--rate",
                APP_RATE,
                "--total",
                "512M",
                "--hold",
                "3600",
            ],
        )?;
        let d = agent.wait_for(Duration::from_secs(30), |v| {
            v["message"] == "decision" && (v["action"] == "kill" || v["action"] == "kill-failed")
        });
        ctrd.remove(NS, &app);
        let _ = std::fs::remove_dir(pod.join(&app));
        row.trials += 1;
        let kernel = pod_cg.subtree_oom_kills() - before;
        row.kernel_kills += kernel;
        let Some(d) = d else {
            progress("    no kill decision within 30 s");
            continue;
        };
        let c: serde_json::Value = d["container"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if d["action"] != "kill" || c["id"] != app.as_str() || c["via"] != "containerd" {
            progress(&format!(
                "    unexpected decision: action {}, container {}, via {}",
                d["action"], c["id"], c["via"]
            ));
            continue;
        }
        if let (Some(w), Some(g)) = (d["wake_to_kill_us"].as_u64(), c["gone_us"].as_u64()) {
            request.push(w);
            stopped.push(w + g);
        }
        if kernel == 0 {
            row.guarded_via_containerd += 1;
        }
        // The agent's cooldown (1 s) ends early once usage is below the threshold again;
        // the next app starts from an empty pod either way.
    }
    request.sort_unstable();
    stopped.sort_unstable();
    row.signal_to_kill_request_p50_us = percentile(&request, 0.5);
    row.signal_to_kill_request_p99_us = percentile(&request, 0.99);
    row.signal_to_kill_request_max_us = request.last().copied().unwrap_or(0);
    row.signal_to_stopped_p50_us = percentile(&stopped, 0.5);
    row.signal_to_stopped_p99_us = percentile(&stopped, 0.99);
    row.signal_to_stopped_max_us = stopped.last().copied().unwrap_or(0);
    drop(agent);
    Ok(row)
}
