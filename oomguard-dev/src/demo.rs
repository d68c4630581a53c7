//! The demo (`cargo xtask run`, binary `oomguard-demo`): the guard at work on a throw-away
//! sandbox. Makes a cgroup beneath our own memory cgroup with a limit, starts the agent
//! (`oomguard`, next to this binary) guarding it, runs a memory hog that outgrows the limit,
//! reports what happened, and removes everything.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::sandbox::{Agent, Echo, Sandbox, in_cgroup, sibling_binary};
use oomguard::size::{Size, human};
use oomguard::threshold::Margins;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "oomguard-demo",
    about = "Show the guard at work on a throw-away sandbox cgroup, then clean up"
)]
pub struct DemoArgs {
    /// Memory limit of the sandbox cgroup.
    #[arg(long, default_value = "256M")]
    pub limit: Size,
    /// Allocation rate of the workload, per second (0 = as fast as it can).
    #[arg(long, default_value = "200M")]
    pub rate: Size,
    /// Policy of the agent: process or noop (noop shows the kernel's OOM killer instead).
    #[arg(long, default_value = "process")]
    pub policy: String,
}

fn say(msg: &str) {
    println!("demo: {msg}");
}

pub fn main(args: DemoArgs) -> ExitCode {
    match demo(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("oomguard-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(args: &DemoArgs) -> Result<bool, String> {
    if !matches!(args.policy.as_str(), "process" | "noop") {
        return Err(format!(
            "--policy {}: the demo runs process or noop",
            args.policy
        ));
    }
    let exe = sibling_binary("oomguard").ok_or(
        "the agent (oomguard) is not next to oomguard-demo (cargo build -p oomguard -p oomguard-dev)",
    )?;
    let memhog = sibling_binary("oomguard-memhog")
        .ok_or("oomguard-memhog is not next to oomguard-demo (cargo build -p oomguard-dev)")?;
    let sb =
        Sandbox::new("oomguard-demo").map_err(|e| format!("making the sandbox cgroup: {e}"))?;
    let limit = args.limit.bytes();
    sb.cg.set_limit(limit).map_err(|e| e.to_string())?;
    let t = Margins::default()
        .thresholds(limit)
        .ok_or("the limit is too small for a margin")?;
    say(&format!(
        "sandbox cgroup {} with limit {}",
        sb.path().display(),
        human(limit)
    ));
    say(&format!(
        "thresholds: reclaim at {}, kill at {} (margin {})",
        human(t.reclaim),
        human(t.kill),
        human(t.margin)
    ));
    let root = sb.path().display().to_string();
    let echo: Echo = Box::new(|v| {
        if v["message"] == "decision" {
            println!(
                "agent: decision {} (usage {}, threshold {})",
                v["action"].as_str().unwrap_or("?"),
                v["usage"],
                v["threshold"]
            );
        } else if v["level"] == "WARN" || v["level"] == "ERROR" {
            println!(
                "agent: {} {}",
                v["level"].as_str().unwrap_or(""),
                v["message"]
            );
        }
    });
    // Pins of our own: never disturb the pins of an agent that guards this node.
    let pins = format!("/sys/fs/bpf/oomguard-demo-{}", std::process::id());
    let agent = Agent::start(
        &exe,
        &[
            "--root",
            &root,
            "--policy",
            &args.policy,
            "--bpf-pin-dir",
            &pins,
        ],
        Some(echo),
    )
    .map_err(|e| format!("starting the agent: {e}"))?;
    agent
        .wait_armed(sb.path(), Duration::from_secs(10))
        .ok_or("the agent did not arm the sandbox within 10 s")?;
    say(&format!(
        "agent (pid {}) is guarding the sandbox",
        agent.pid()
    ));
    say(&format!(
        "starting a workload that allocates {}/s up to {}",
        human(args.rate.bytes()),
        human(limit * 2)
    ));
    let mut cmd = Command::new(&memhog);
    cmd.args([
        "--rate",
        &format!("{}B", args.rate.bytes()),
        "--total",
        &format!("{}B", limit * 2),
    ])
    .stdout(Stdio::null());
    let started = Instant::now();
    let mut hog = in_cgroup(&mut cmd, &sb.cg)
        .and_then(|c| c.spawn())
        .map_err(|e| format!("starting the workload: {e}"))?;
    let hog_pid = hog.id() as i64;
    let status = loop {
        if let Ok(Some(st)) = hog.try_wait() {
            break Some(st);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = hog.kill();
            break hog.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ran = started.elapsed();
    // Give the agent a moment to log its decision before reading the report.
    let decision = agent.wait_for(Duration::from_secs(3), |v| {
        v["message"] == "decision"
            && matches!(
                v["action"].as_str(),
                Some("kill" | "would-kill" | "kernel-oom")
            )
    });
    std::thread::sleep(Duration::from_millis(300));
    let oom_kills = sb.cg.subtree_oom_kills();
    let peak = sb.cg.max_usage().unwrap_or(0);
    let failcnt = sb.cg.failcnt().unwrap_or(0);
    use std::os::unix::process::ExitStatusExt;
    let signal = status.and_then(|s| s.signal());
    println!();
    println!("=== oomguard demo report ===");
    println!("limit              {}", human(limit));
    println!("kill threshold     {}", human(t.kill));
    println!(
        "peak usage         {} ({} below the limit)",
        human(peak),
        human(limit.saturating_sub(peak))
    );
    println!("limit hits         {failcnt} (memory.failcnt)");
    println!(
        "workload           pid {hog_pid}, ran {:.2} s, ended by {}",
        ran.as_secs_f64(),
        match signal {
            Some(9) => "SIGKILL".to_string(),
            Some(s) => format!("signal {s}"),
            None => "exit".to_string(),
        }
    );
    let kills = agent.decisions("kill");
    let mut ok = false;
    if let Some(d) = kills.first() {
        let killed: serde_json::Value =
            serde_json::from_str(d["killed"].as_str().unwrap_or("[]")).unwrap_or_default();
        let k = &killed[0];
        println!(
            "victim             pid {} ({}), score {}, rss {}",
            k["pid"],
            k["comm"].as_str().unwrap_or("?"),
            k["score"],
            human(k["rss_bytes"].as_u64().unwrap_or(0))
        );
        println!("wake-up to SIGKILL {} us", d["wake_to_kill_us"]);
        ok = oom_kills == 0 && k["pid"].as_i64() == Some(hog_pid);
    } else if let Some(d) = &decision {
        println!("agent decision     {}", d["action"].as_str().unwrap_or("?"));
        ok = args.policy == "noop";
    } else {
        println!("agent decision     none");
    }
    println!(
        "kernel OOM killer  {}",
        if oom_kills == 0 {
            "did not have to act (oom_kill 0)".to_string()
        } else {
            format!("acted: oom_kill {}", oom_kills)
        }
    );
    drop(agent);
    drop(sb);
    say("sandbox removed");
    Ok(ok)
}
