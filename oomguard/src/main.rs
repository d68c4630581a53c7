use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use oomguard::config::{Cli, Command, Config, LogFormat, Mode, Policy, RunArgs};
use oomguard::discovery::Discovery;
use oomguard::{cgroup, guard, reclaim, report, sys};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One clear line for bad input, not clap's usage block.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("oomguard: {line} (see --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => oomguard::demo::main(args),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match args.validate(&sys::hostname()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oomguard: {e}");
            return ExitCode::from(2);
        }
    };
    if config.mode == Mode::Ebpf {
        eprintln!(
            "oomguard: --mode ebpf: the eBPF-assisted guard is not part of this build; use --mode auto or eventfd"
        );
        return ExitCode::from(2);
    }
    init_tracing(config.log_format);
    match agent(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn agent(config: Config) -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let memory_mount =
        cgroup::memory_mount_for(&mountinfo, &config.root.path).with_context(|| {
            format!(
                "{} is not inside a cgroup v1 memory hierarchy",
                config.root.path.display()
            )
        })?;
    if config.mode == Mode::Auto {
        tracing::info!(
            mode = "eventfd",
            "eBPF-assisted signals are not part of this build; guarding with threshold eventfds"
        );
    }
    if config.policy == Policy::Container {
        tracing::warn!(
            "the container policy needs the containerd client, which is not part of this build: \
             it kills the top-scoring task of the cgroup, as the process policy does"
        );
    }
    if let Err(e) = sys::protect_from_oom_killer() {
        tracing::warn!(error = %e, "cannot set our oom_score_adj to -1000");
    }
    if let Err(e) = sys::lock_memory() {
        tracing::warn!(error = %e, "mlockall failed; the kill path may page-fault under pressure");
    }
    let config = Arc::new(config);
    let (reporter, reports) = report::channel(1024);
    let logger = report::spawn_logger(reports).context("starting the report thread")?;
    let reclaimer =
        reclaim::spawn(config.reclaim_timeout, 64).context("starting the reclaim worker")?;
    let guard = Arc::new(
        guard::spawn(guard::Deps {
            config: config.clone(),
            reporter: reporter.clone(),
            reclaimer: Some(reclaimer),
            memory_mount,
        })
        .context("starting the guard thread")?,
    );
    tracing::info!(
        root = %config.root.path.display(),
        policy = config.policy.as_str(),
        node = %config.node_name,
        margin_ratio = config.margins.ratio,
        min_margin = config.margins.min,
        max_margin = config.margins.max,
        "oomguard starting"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, _ready_rx) = tokio::sync::watch::channel(false);
        let discovery =
            Discovery::new(config.clone(), guard.clone(), ready_tx).context("starting inotify")?;
        let task = tokio::spawn(discovery.run(stop_rx));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let watched = guard.clone();
        let guard_died = async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            while watched.is_alive() {
                tick.tick().await;
            }
        };
        let result = tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                Ok(())
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: stopping");
                Ok(())
            }
            _ = guard_died => Err(anyhow::anyhow!("the guard thread stopped; exiting so that it is restarted")),
        };
        let _ = stop_tx.send(true);
        let _ = task.await;
        result
    })?;
    drop(rt);
    if let Ok(g) = Arc::try_unwrap(guard) {
        g.shutdown();
    }
    if reporter.dropped() > 0 {
        tracing::warn!(
            dropped = reporter.dropped(),
            "decision records dropped (queue full)"
        );
    }
    drop(reporter);
    let _ = logger;
    tracing::info!("stopped");
    Ok(())
}
