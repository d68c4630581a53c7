//! Prometheus metrics and health on `--metrics-addr`: `/metrics` (OpenMetrics text),
//! `/healthz` (the guard loop still turns) and `/readyz` (the first walk armed everything).
//!
//! Counters the guard thread bumps are resolved to plain atomic handles up front, so the
//! real-time thread never takes a lock for them. Everything derived from decision records
//! is counted on the state thread; values other parts of the agent already keep (guarded
//! cgroups, the Event queue) are read when scraped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::counters::{GuardCounters, GuardStats};
use crate::events::EventSink;
use crate::report::{Action, Decision};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    source: &'static str,
    threshold: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KillLabels {
    policy: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The `oomguard_kills_total` series each policy can produce, exported from the start.
const KILL_SERIES: [(&str, &str); 5] = [
    ("container", "killed"),
    ("container", "failed"),
    ("process", "killed"),
    ("process", "failed"),
    ("noop", "dry_run"),
];

/// Where scraped values come from, set once the parts exist.
#[derive(Debug, Default)]
struct Sources {
    guard: std::sync::OnceLock<Arc<GuardStats>>,
    sink: std::sync::OnceLock<SinkHandle>,
    decisions_dropped: std::sync::OnceLock<Arc<AtomicU64>>,
    runtime: std::sync::OnceLock<RuntimeHandle>,
}

struct RuntimeHandle(Arc<crate::runtime::RuntimeClient>);

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuntimeClient")
    }
}

struct SinkHandle(EventSink);

impl std::fmt::Debug for SinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// Agent-wide metrics and health state.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    guard: GuardCounters,
    kills: Family<KillLabels, Counter>,
    fallbacks: Counter,
    kernel_ooms: Counter,
    latency: Histogram,
    health: Arc<Health>,
    sources: Arc<Sources>,
}

/// Readiness and the guard-loop watchdog.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    /// The guard's tick count when last seen changing, and when.
    last_tick: AtomicU64,
    last_change: std::sync::Mutex<Instant>,
    stall: Duration,
    mode: &'static str,
}

impl Health {
    /// Ready once the first walk armed every cgroup with a limit.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Compares the guard's tick count with the last one seen: healthy while it changed
    /// within the stall window (idle, the loop turns four times per window).
    pub fn check(&self, ticks: u64, alive: bool) -> Result<(), String> {
        let now = Instant::now();
        let mut last = match self.last_change.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if self.last_tick.swap(ticks, Ordering::AcqRel) != ticks {
            *last = now;
        }
        if !alive {
            return Err("the guard thread has stopped".into());
        }
        let stalled = now.duration_since(*last);
        if stalled > self.stall {
            return Err(format!(
                "the guard loop has not turned for {} ms (limit {} ms)",
                stalled.as_millis(),
                self.stall.as_millis()
            ));
        }
        Ok(())
    }
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(name, help, c.clone());
    c
}

impl Metrics {
    /// `stall`: how long the guard loop may stop turning before `/healthz` fails.
    pub fn new(mode: &'static str, stall: Duration) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let signals = Family::<SignalLabels, Counter>::default();
        registry.register(
            "oomguard_threshold_signals",
            "Threshold crossings signalled, by source (eventfd, ebpf) and threshold (kill, reclaim)",
            signals.clone(),
        );
        let skips = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "oomguard_skips",
            "Signals that did not lead to a kill, by reason (cache: reclaimable page cache is large; cooldown: acted on this cgroup moments ago; protected: only protected or exiting tasks)",
            skips.clone(),
        );
        let reclaims = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "oomguard_reclaim_runs",
            "Background memory.force_empty runs, by outcome (done, timed_out, failed)",
            reclaims.clone(),
        );
        let reclaim_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "oomguard_reclaim_duration_seconds",
            "How long each memory.force_empty run took",
            reclaim_seconds.clone(),
        );
        let kills = Family::<KillLabels, Counter>::default();
        registry.register(
            "oomguard_kills",
            "Kill decisions by policy and outcome (killed, failed, dry_run for the noop policy)",
            kills.clone(),
        );
        // Every series a kill can land in exists at 0 from the start: a series born at 1
        // hides the first kill from increase() and rate() (alerts, dashboards).
        for (policy, outcome) in KILL_SERIES {
            let _ = kills.get_or_create(&KillLabels { policy, outcome });
        }
        let fallbacks = counter(
            &mut registry,
            "oomguard_runtime_fallbacks",
            "Container kills done by killing the container's tasks directly because the runtime could not",
        );
        let kernel_ooms = counter(
            &mut registry,
            "oomguard_kernel_ooms",
            "Kernel OOM kills observed in guarded cgroups (the agent lost the race or was not asked)",
        );
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "oomguard_signal_to_kill_seconds",
            "From the threshold signal waking the guard to the first SIGKILL (or container kill request) sent",
            latency.clone(),
        );
        let signal = |source, threshold| {
            signals
                .get_or_create(&SignalLabels { source, threshold })
                .clone()
        };
        let skip = |reason| skips.get_or_create(&ReasonLabels { reason }).clone();
        let outcome = |outcome| reclaims.get_or_create(&OutcomeLabels { outcome }).clone();
        let guard = GuardCounters {
            kill_signal_eventfd: signal("eventfd", "kill"),
            kill_signal_ebpf: signal("ebpf", "kill"),
            kill_signal_fallback: signal("fallback", "kill"),
            reclaim_signal_eventfd: signal("eventfd", "reclaim"),
            reclaim_signal_ebpf: signal("ebpf", "reclaim"),
            reclaim_signal_fallback: signal("fallback", "reclaim"),
            skip_cache: skip("cache"),
            skip_cooldown: skip("cooldown"),
            skip_protected: skip("protected"),
            reclaim_done: outcome("done"),
            reclaim_timed_out: outcome("timed_out"),
            reclaim_failed: outcome("failed"),
            reclaim_seconds,
        };
        let health = Arc::new(Health {
            ready: AtomicBool::new(false),
            last_tick: AtomicU64::new(0),
            last_change: std::sync::Mutex::new(Instant::now()),
            stall,
            mode,
        });
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(Scraped {
            sources: sources.clone(),
            health: health.clone(),
        }));
        Arc::new(Metrics {
            registry,
            guard,
            kills,
            fallbacks,
            kernel_ooms,
            latency,
            health,
            sources,
        })
    }

    pub fn guard_counters(&self) -> GuardCounters {
        self.guard.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Read the guard's counters when scraped.
    pub fn watch_guard(&self, stats: Arc<GuardStats>) {
        let _ = self.sources.guard.set(stats);
    }

    /// Read the Event queue's depth and counters when scraped.
    pub fn watch_sink(&self, sink: EventSink) {
        let _ = self.sources.sink.set(SinkHandle(sink));
    }

    /// Read the runtime client's counters and endpoint health when scraped.
    pub fn watch_runtime(&self, runtime: Arc<crate::runtime::RuntimeClient>) {
        let _ = self.sources.runtime.set(RuntimeHandle(runtime));
    }

    /// Decision records the report queue had to drop.
    pub fn watch_decisions_dropped(&self, dropped: Arc<AtomicU64>) {
        let _ = self.sources.decisions_dropped.set(dropped);
    }

    /// Counts one decision record (called on the state thread, off the kill path).
    pub fn observe(&self, d: &Decision) {
        let policy = d.policy.as_str();
        let outcome = match d.action {
            Action::Kill => "killed",
            Action::KillFailed => "failed",
            Action::WouldKill => "dry_run",
            Action::KernelOom => {
                self.kernel_ooms.inc();
                return;
            }
            Action::SkipCache | Action::NoHelp | Action::NoCandidate | Action::Reclaim => {
                return;
            }
        };
        self.kills
            .get_or_create(&KillLabels { policy, outcome })
            .inc();
        if d.container.as_ref().is_some_and(|c| c.via == "fallback") {
            self.fallbacks.inc();
        }
        if let Some(us) = d.wake_to_kill_us {
            self.latency.observe(us as f64 / 1e6);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    /// `/healthz`: the guard loop turned within the stall window.
    pub fn healthz(&self) -> Result<(), String> {
        match self.sources.guard.get() {
            Some(g) => self
                .health
                .check(g.ticks.load(Ordering::Relaxed), g.alive()),
            None => Err("the guard thread has not started".into()),
        }
    }
}

/// Values kept elsewhere, read at scrape time.
#[derive(Debug)]
struct Scraped {
    sources: Arc<Sources>,
    health: Arc<Health>,
}

fn const_gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn const_counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scraped {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let h = &self.health;
        {
            let g = ConstGauge::new(1i64);
            let mut family = enc.encode_descriptor(
                "oomguard_mode",
                "The guard's mode: ebpf (tracepoints plus eventfds) or eventfd",
                None,
                g.metric_type(),
            )?;
            let labels = [("mode", h.mode)];
            g.encode(family.encode_family(&labels)?)?;
        }
        const_gauge(
            &mut enc,
            "oomguard_ready",
            "1 once the first walk armed every cgroup with a limit",
            i64::from(h.ready()),
        )?;
        if let Some(g) = self.sources.guard.get() {
            const_gauge(
                &mut enc,
                "oomguard_guarded_cgroups",
                "Memory cgroups with a limit whose thresholds are armed",
                g.guarded.load(Ordering::Relaxed) as i64,
            )?;
            const_counter(
                &mut enc,
                "oomguard_guard_loop_turns",
                "Turns of the guard loop (idle: four per --watchdog-ms): the health watchdog",
                g.ticks.load(Ordering::Relaxed),
            )?;
        }
        if let Some(SinkHandle(sink)) = self.sources.sink.get() {
            let s = sink.stats();
            const_gauge(
                &mut enc,
                "oomguard_event_queue_depth",
                "Kubernetes Events waiting to be posted",
                sink.queued() as i64,
            )?;
            const_counter(
                &mut enc,
                "oomguard_event_queue_drops",
                "Kubernetes Events dropped because the queue was full (the oldest goes)",
                s.dropped.load(Ordering::Relaxed),
            )?;
            const_counter(
                &mut enc,
                "oomguard_events_posted",
                "Kubernetes Events created or aggregated (count patched)",
                s.created.load(Ordering::Relaxed) + s.patched.load(Ordering::Relaxed),
            )?;
            const_counter(
                &mut enc,
                "oomguard_events_rejected",
                "Kubernetes Events the API server refused for good",
                s.rejected.load(Ordering::Relaxed),
            )?;
        }
        if let Some(RuntimeHandle(rt)) = self.sources.runtime.get() {
            let st = rt.stats();
            for (name, help, v) in [
                (
                    "oomguard_runtime_call_timeouts",
                    "Calls to the container runtime that did not answer within their bound",
                    &st.timeouts,
                ),
                (
                    "oomguard_runtime_unreachable",
                    "Calls to the container runtime that could not connect",
                    &st.unreachable,
                ),
                (
                    "oomguard_runtime_calls_skipped_unhealthy",
                    "Calls not made because their runtime endpoint was marked unhealthy",
                    &st.skipped_unhealthy,
                ),
                (
                    "oomguard_runtime_probes",
                    "Background probes of unhealthy runtime endpoints",
                    &st.probes,
                ),
                (
                    "oomguard_runtime_uncached_lookups",
                    "Containers a kill or a report waited for the runtime to describe (not prefetched)",
                    &st.uncached_lookups,
                ),
            ] {
                const_counter(&mut enc, name, help, v.load(Ordering::Relaxed))?;
            }
            let endpoints = rt.endpoints();
            if !endpoints.is_empty() {
                let mut family = enc.encode_descriptor(
                    "oomguard_runtime_endpoint_healthy",
                    "1 while the runtime endpoint answers; 0 while it is marked unhealthy",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                for e in endpoints {
                    let socket = e.endpoint.socket.display().to_string();
                    let labels = [
                        ("socket", socket.as_str()),
                        ("namespace", e.endpoint.namespace.as_str()),
                    ];
                    ConstGauge::new(i64::from(e.healthy)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        if let Some(d) = self.sources.decisions_dropped.get() {
            const_counter(
                &mut enc,
                "oomguard_decision_records_dropped",
                "Decision records dropped because the report queue was full",
                d.load(Ordering::Relaxed),
            )?;
        }
        Ok(())
    }
}

/// Binds `--metrics-addr` before anything else starts, so a taken port stops the agent at
/// once, with nothing armed, pinned or mounted yet.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` (from [`bind`]) until `stop`
/// turns true. Must run inside the tokio runtime.
pub fn serve(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let m = metrics.clone();
    let h = metrics.clone();
    let r = metrics;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = h.clone();
                async move {
                    match h.healthz() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.health.ready() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the first walk has not armed every cgroup yet\n",
                        )
                    }
                }
            }),
        );
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::report::ContainerKill;

    fn decision(action: Action) -> Decision {
        let mut d = Decision::new("node", Policy::Container, action, "/sys/fs/cgroup/memory/a");
        d.wake_to_kill_us = Some(300);
        d
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn decisions_are_counted_by_policy_and_outcome() {
        let m = Metrics::new("eventfd", Duration::from_secs(10));
        m.observe(&decision(Action::Kill));
        let mut fb = decision(Action::Kill);
        fb.container = Some(ContainerKill {
            id: "c".into(),
            via: "fallback",
            namespace: None,
            gone_us: None,
            error: Some("hung".into()),
        });
        m.observe(&fb);
        m.observe(&decision(Action::KillFailed));
        m.observe(&decision(Action::KernelOom));
        m.observe(&decision(Action::SkipCache));
        let g = m.guard_counters();
        g.kill_signal_ebpf.inc();
        g.skip_cooldown.inc();
        g.reclaimed(&crate::reclaim::ReclaimResult::TimedOut {
            freed: 0,
            took: Duration::from_millis(20),
        });
        let text = m.encode();
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v(r#"oomguard_kills_total{policy="container",outcome="killed"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(r#"oomguard_kills_total{policy="container",outcome="failed"}"#),
            Some(1.0)
        );
        assert_eq!(v("oomguard_runtime_fallbacks_total"), Some(1.0));
        assert_eq!(v("oomguard_kernel_ooms_total"), Some(1.0));
        assert_eq!(v("oomguard_signal_to_kill_seconds_count"), Some(3.0));
        assert_eq!(
            v(r#"oomguard_threshold_signals_total{source="ebpf",threshold="kill"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"oomguard_threshold_signals_total{source="eventfd",threshold="kill"}"#),
            Some(0.0)
        );
        assert_eq!(v(r#"oomguard_skips_total{reason="cooldown"}"#), Some(1.0));
        assert_eq!(
            v(r#"oomguard_reclaim_runs_total{outcome="timed_out"}"#),
            Some(1.0)
        );
        assert_eq!(v("oomguard_reclaim_duration_seconds_count"), Some(1.0));
        assert_eq!(v(r#"oomguard_mode{mode="eventfd"}"#), Some(1.0));
        assert_eq!(v("oomguard_ready"), Some(0.0));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_kill_series_is_exported_at_zero_before_the_first_kill() {
        let m = Metrics::new("eventfd", Duration::from_secs(10));
        let text = m.encode();
        for policy in [Policy::Container, Policy::Process] {
            for outcome in ["killed", "failed"] {
                let series = format!(
                    r#"oomguard_kills_total{{policy="{}",outcome="{outcome}"}}"#,
                    policy.as_str()
                );
                assert_eq!(value(&text, &series), Some(0.0), "{series}\n{text}");
            }
        }
        assert_eq!(
            value(
                &text,
                r#"oomguard_kills_total{policy="noop",outcome="dry_run"}"#
            ),
            Some(0.0)
        );
        m.observe(&decision(Action::Kill));
        assert_eq!(
            value(
                &m.encode(),
                r#"oomguard_kills_total{policy="container",outcome="killed"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn health_fails_when_the_tick_stops_and_recovers_when_it_moves() {
        let m = Metrics::new("ebpf", Duration::from_millis(30));
        let h = m.health();
        assert!(h.check(1, true).is_ok());
        std::thread::sleep(Duration::from_millis(60));
        let err = h.check(1, true).unwrap_err();
        assert!(err.contains("has not turned"), "{err}");
        assert!(h.check(2, true).is_ok());
        assert!(h.check(3, false).is_err());
    }
}
