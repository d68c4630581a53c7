use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use oomguard::bpf::{self, EbpfGuard};
use oomguard::cli::args::{Cli, Command};
use oomguard::config::{Config, Mode, RunArgs};
use oomguard::discovery::Discovery;
use oomguard::events::{EventSink, EventsOptions};
use oomguard::metrics::Metrics;
use oomguard::runtime::{RuntimeClient, RuntimeConfig};
use oomguard::{cgroup, guard, reclaim, report, sys};

fn main() -> ExitCode {
    let cli = match Cli::parse_or_exit_code() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Doctor(args) => oomguard::cli::doctor::main(args),
        Command::Bpf(args) => oomguard::cli::bpf::main(args),
        Command::Cgroups(args) => oomguard::cli::cgroups::main(args),
        Command::Events(args) => oomguard::cli::events::main(args),
    }
}

/// `args` is the command line, parsed once; it is kept so that SIGHUP can lay the flags
/// file over it again.
fn run(args: RunArgs) -> ExitCode {
    sys::limit_malloc_arenas();
    let config = match args.config(&sys::hostname()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oomguard: {e}");
            return ExitCode::from(2);
        }
    };
    oomguard::telemetry::init(config.log_format);
    match agent(config, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn agent(config: Config, cmdline: &RunArgs) -> anyhow::Result<()> {
    let layout = cgroup::Layout::read().context("reading mountinfo")?;
    let node = cgroup::layout::node_summary(&layout);
    let (memory_mount, version) = layout.hierarchy_of(&config.root.path).with_context(|| {
        format!(
            "{} is not inside a memory cgroup hierarchy; {node}",
            config.root.path.display()
        )
    })?;
    tracing::info!(
        layout = layout.kind().as_str(),
        hierarchy = version.as_str(),
        mount = %memory_mount.display(),
        kernel = %cgroup::layout::kernel_release(),
        "{node}"
    );
    let listener = match config.metrics_addr {
        Some(addr) => Some(
            oomguard::metrics::bind(addr)
                .with_context(|| format!("cannot serve --metrics-addr {addr}"))?,
        ),
        None => None,
    };
    let ebpf = load_ebpf(&config, version)?;
    if ebpf.is_some() {
        sys::trim_heap();
    }
    // Every policy uses the runtime client: the container policy to kill, all of them to
    // put Events on the right pod. It dials lazily; a node without a runtime is normal.
    let runtime = match RuntimeClient::new(RuntimeConfig::new(
        &config.docker_containerd_sock,
        &config.containerd_sock,
        &config.docker_root,
    )) {
        Ok(rt) => Some(Arc::new(rt)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the runtime client: no container policy, Events on the node");
            None
        }
    };
    if let Err(e) = sys::protect_from_oom_killer() {
        tracing::warn!(error = %e, "cannot set our oom_score_adj to -1000");
    }
    match sys::raise_fd_limit() {
        Ok(Some((old, new))) => {
            tracing::info!(old, new, "raised the soft fd limit to the hard limit")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the soft fd limit"),
    }
    if let Err(e) = sys::lock_memory() {
        tracing::warn!(error = %e, "mlockall failed; the kill path may page-fault under pressure");
    }
    let config = Arc::new(config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(512 * 1024)
        .on_thread_stop(sys::unlock_own_stack)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut events = EventsOptions::new(config.node_name.clone());
    events.kubeconfig = config.kubeconfig.clone();
    let sink = EventSink::spawn(rt.handle(), events);
    let (reporter, reports) = report::channel(1024);
    let metrics = config.metrics_addr.map(|_| {
        let mode = if ebpf.is_some() { "ebpf" } else { "eventfd" };
        let m = Metrics::new(mode, config.watchdog);
        m.watch_sink(sink.clone());
        m.watch_decisions_dropped(reporter.dropped_counter());
        if let Some(r) = &runtime {
            m.watch_runtime(r.clone());
        }
        m
    });
    let state = oomguard::state::AgentState::new();
    let reports = oomguard::state::tee(state.clone(), metrics.clone(), reports)
        .context("starting the state thread")?;
    let control = match oomguard::control::ControlServer::start(state.clone(), &config.state_dir) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %oomguard::cli::error_line(&e), "no control socket: `oomguard cgroups`/`events` will not work");
            None
        }
    };
    let logger = report::spawn_reporter(reports, Some(sink), runtime.clone())
        .context("starting the report thread")?;
    let pinned = ebpf.is_some();
    let (created_tx, created_rx) = tokio::sync::mpsc::unbounded_channel();
    let reclaimer =
        reclaim::spawn(config.reclaim_timeout, 64).context("starting the reclaim worker")?;
    let guard = Arc::new(
        guard::spawn(guard::Deps {
            config: config.clone(),
            reporter: reporter.clone(),
            reclaimer: Some(reclaimer),
            memory_mount: memory_mount.clone(),
            runtime: runtime.clone(),
            ebpf,
            created: Some(created_tx),
            state: Some(state.clone()),
            metrics: metrics.as_ref().map(|m| m.guard_counters()),
        })
        .context("starting the guard thread")?,
    );
    if let Some(m) = &metrics {
        m.watch_guard(guard.stats.clone());
    }
    // cgroup v2 has no threshold eventfd: the fallback watcher signals crossings (beside
    // eBPF's records when they load).
    let watcher = if version == cgroup::Version::V2 {
        let w = oomguard::headroom::Watcher::spawn(
            guard.sender(),
            oomguard::headroom::Options {
                above_interval: config.guard_interval,
                throttle: config.v2_throttle,
                // The benchmark's same-run baseline turns the tripwires off.
                mount: std::env::var_os("OOMGUARD_TEST_NO_TRIPWIRE")
                    .is_none()
                    .then(|| memory_mount.clone()),
            },
        )
        .context("starting the cgroup v2 fallback watcher")?;
        tracing::info!(
            throttle = config.v2_throttle,
            "cgroup v2: crossings from memory.events, PSI triggers and headroom-adaptive polling of memory.current"
        );
        Some(Arc::new(w))
    } else {
        if config.v2_throttle {
            tracing::warn!("--v2-throttle has no effect on a cgroup v1 hierarchy");
        }
        None
    };
    tracing::info!(
        root = %config.root.path.display(),
        policy = config.policy.as_str(),
        node = %config.node_name,
        margin_ratio = config.margins.ratio,
        min_margin = config.margins.min,
        max_margin = config.margins.max,
        "oomguard starting"
    );
    rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
        let mut server = None;
        if let (Some(listener), Some(m)) = (listener, &metrics) {
            let addr = listener.local_addr().ok();
            server = Some(
                oomguard::metrics::serve(listener, m.clone(), stop_rx.clone())
                    .context("serving --metrics-addr")?,
            );
            tracing::info!(addr = ?addr, "serving /metrics, /healthz and /readyz");
            let health = m.health();
            tokio::spawn(async move {
                if ready_rx.wait_for(|r| *r).await.is_ok() {
                    health.set_ready();
                }
            });
        }
        let discovery =
            Discovery::new(config.clone(), guard.clone(), ready_tx)
                .context("starting inotify")?
                .with_runtime(runtime)
                .with_watcher(watcher.clone());
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(discovery.run(stop_rx, created_rx, reload_rx));
        use tokio::signal::unix::{SignalKind, signal};
        let mut term =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let watched = guard.stats.clone();
        let guard_died = async move {
            while watched.alive() {
                watched.stopped_notify.notified().await;
            }
        };
        tokio::pin!(guard_died);
        let mut current = config.clone();
        let result = loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: stopping");
                    break Ok(());
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT: stopping");
                    break Ok(());
                }
                _ = &mut guard_died => break Err(anyhow::anyhow!("the guard thread stopped; exiting so that it is restarted")),
                _ = hup.recv() => reload(&mut current, cmdline, &guard, &reload_tx),
            }
        };
        let _ = stop_tx.send(true);
        let _ = task.await;
        if let Some(server) = server {
            let _ = server.await;
        }
        result
    })?;
    drop(rt);
    // Stops the watcher, which gives back any memory.high --v2-throttle set.
    drop(watcher);
    if let Ok(g) = Arc::try_unwrap(guard) {
        g.shutdown();
    }
    if pinned {
        // The guard thread owned the programs; its exit dropped them. Clean exit: none of
        // our pins are left (anything else in the directory is not ours to remove).
        match oomguard::bpf::remove_pins(&config.bpf_pin_dir) {
            Ok(0) => {}
            Ok(_) => tracing::info!(pin_dir = %config.bpf_pin_dir.display(), "eBPF pins removed"),
            Err(e) => tracing::warn!(error = %e, "cannot remove the eBPF pins"),
        }
    }
    if reporter.dropped() > 0 {
        tracing::warn!(
            dropped = reporter.dropped(),
            "decision records dropped (queue full)"
        );
    }
    drop(reporter);
    drop(control);
    let _ = logger;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: lays the flags file over the command line again and hands the new flags to the
/// guard and discovery, or changes nothing (with one line saying why).
fn reload(
    current: &mut Arc<Config>,
    cmdline: &RunArgs,
    guard: &guard::GuardHandle,
    discovery: &tokio::sync::mpsc::UnboundedSender<Arc<Config>>,
) {
    if current.flags_file.is_none() {
        tracing::info!("SIGHUP ignored: no --flags-file to reload");
        return;
    }
    let new = match cmdline.config(&sys::hostname()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP: nothing reloaded; the running flags stay");
            return;
        }
    };
    let fixed = current.restart_only_changes(&new);
    if !fixed.is_empty() {
        tracing::warn!(
            flags = %fixed.join(", "),
            "SIGHUP: nothing reloaded; these flags change only with a restart"
        );
        return;
    }
    let changes = current.reload_summary(&new);
    if changes.is_empty() {
        tracing::info!("SIGHUP: the flags file changes nothing");
        return;
    }
    let new = Arc::new(new);
    guard.send(guard::Cmd::Reload(new.clone()));
    let _ = discovery.send(new.clone());
    tracing::info!(changes = %changes.join("; "), "SIGHUP: flags reloaded");
    *current = new;
}

/// `--mode`: eventfd loads nothing; ebpf must load a crossing program or the agent does not
/// start; auto loads every program that can load here (one warning per program that cannot,
/// from [`EbpfGuard::load`]), and falls back with one warning when none can. Without eBPF a
/// v1 hierarchy is guarded by threshold eventfds, a v2 one by the fallback watcher.
fn load_ebpf(config: &Config, version: cgroup::Version) -> anyhow::Result<Option<EbpfGuard>> {
    let without = match version {
        cgroup::Version::V1 => "threshold eventfds only",
        cgroup::Version::V2 => "the cgroup v2 fallback watcher only",
    };
    if config.mode == Mode::Eventfd {
        tracing::info!(mode = "eventfd", "guarding with {without} (--mode eventfd)");
        return Ok(None);
    }
    let caps = bpf::capabilities();
    let loaded = if config.mode == Mode::Ebpf
        && let Some(why) = caps.reason()
    {
        Err(why)
    } else if caps.loadable() {
        EbpfGuard::load(&config.bpf_pin_dir).map_err(|e| oomguard::error_line(&e))
    } else {
        Err(caps.reason().unwrap_or_default())
    };
    match (loaded, config.mode) {
        (Ok(g), Mode::Ebpf) if !g.has_crossing() => {
            let why: Vec<String> = g
                .programs()
                .iter()
                .filter(|p| p.role == bpf::Role::Crossing)
                .filter_map(|p| Some(format!("{}: {}", p.program, p.problem.as_ref()?)))
                .collect();
            let _ = g.unpin();
            anyhow::bail!(
                "--mode ebpf: eBPF cannot be used: no crossing program could be attached ({})",
                why.join("; ")
            )
        }
        (Ok(g), _) => {
            if g.has_scores()
                && let Err(e) = g.seed_tasks_from_proc()
            {
                tracing::warn!(error = %e, "cannot seed the eBPF task map from /proc");
            }
            tracing::info!(mode = "ebpf", pin_dir = %config.bpf_pin_dir.display(), crossing = g.has_crossing(), scores = g.has_scores(), "eBPF programs loaded and attached; threshold eventfds stay armed as the backstop");
            Ok(Some(g))
        }
        (Err(why), Mode::Ebpf) => anyhow::bail!("--mode ebpf: eBPF cannot be used: {why}"),
        (Err(why), _) => {
            tracing::warn!(mode = "eventfd", reason = %why, "eBPF unavailable; guarding with {without}");
            Ok(None)
        }
    }
}
