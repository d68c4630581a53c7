//! The client's side of endpoint health ([`super::health`] is the pure state machine): what
//! a call's result says about its endpoint, the transitions logged once each, and the
//! background probe of an unhealthy endpoint.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::health::{Health, Transition};
use super::{Inner, RuntimeError, containerd};

pub(super) struct EndpointState {
    pub(super) health: Health,
    /// A probe task is running for this endpoint.
    pub(super) probing: bool,
}

/// What a call's result says about its endpoint.
pub(super) enum Seen {
    Answered,
    Failed { why: String, timeout: bool },
    Nothing,
}

impl Seen {
    /// `judged`: the call had long enough for a timeout to mean the endpoint is hung.
    pub(super) fn of<T>(r: &Result<T, RuntimeError>, judged: bool) -> Seen {
        match r {
            Ok(_) | Err(RuntimeError::Rpc { .. }) => Seen::Answered,
            Err(RuntimeError::Unreachable { socket, source }) => Seen::Failed {
                // tonic's status carries the OS error in its message; its full chain
                // repeats it three times.
                why: format!(
                    "cannot reach containerd at {}: {}",
                    socket.display(),
                    source
                        .downcast_ref::<tonic::Status>()
                        .map(|s| s.message().to_string())
                        .unwrap_or_else(|| crate::error_line(source.as_ref()))
                ),
                timeout: false,
            },
            Err(e @ RuntimeError::Timeout { .. }) if judged => Seen::Failed {
                why: e.to_string(),
                timeout: true,
            },
            Err(_) => Seen::Nothing,
        }
    }
}

impl Inner {
    /// `Some` when endpoint `idx` is marked unhealthy: the call is not made.
    pub(super) fn unhealthy(&self, idx: usize) -> Option<RuntimeError> {
        let eps = self.endpoints.lock().ok()?;
        match &eps.get(idx)?.health {
            Health::Healthy => None,
            Health::Unhealthy { why, .. } => Some(RuntimeError::Unhealthy {
                socket: self.cfg.endpoints[idx].socket.clone(),
                why: why.clone(),
            }),
        }
    }

    /// Records what a call to endpoint `idx` showed; logs a change of health once and
    /// starts the probe of an endpoint that just became unhealthy.
    pub(super) fn note(self: &Arc<Self>, idx: usize, seen: Seen) {
        let now = Instant::now();
        let why = match &seen {
            Seen::Failed { why, timeout } => {
                let counter = if *timeout {
                    &self.stats.timeouts
                } else {
                    &self.stats.unreachable
                };
                counter.fetch_add(1, Ordering::Relaxed);
                why.clone()
            }
            _ => String::new(),
        };
        let (transition, start_probe) = {
            let Ok(mut eps) = self.endpoints.lock() else {
                return;
            };
            let Some(ep) = eps.get_mut(idx) else {
                return;
            };
            match seen {
                Seen::Nothing => return,
                Seen::Answered => (ep.health.answered(now), false),
                Seen::Failed { why, .. } => {
                    let t = ep.health.failed(now, why, self.cfg.unhealthy);
                    let start = t.is_some() && !ep.probing;
                    if start {
                        ep.probing = true;
                    }
                    (t, start)
                }
            }
        };
        let ep = &self.cfg.endpoints[idx];
        match transition {
            Some(Transition::BecameUnhealthy { backoff }) => {
                self.forget_channel(idx);
                tracing::warn!(
                    socket = %ep.socket.display(),
                    namespace = %ep.namespace,
                    error = %why,
                    probe_in_s = backoff.as_secs(),
                    "containerd endpoint unhealthy: not asked until a background probe gets an answer; container kills go straight to the direct fallback"
                );
            }
            Some(Transition::Recovered { after, failures }) => {
                tracing::info!(
                    socket = %ep.socket.display(),
                    namespace = %ep.namespace,
                    unhealthy_ms = after.as_millis() as u64,
                    failures,
                    "containerd endpoint answers again: container kills go through it"
                );
            }
            None => {}
        }
        if start_probe {
            self.handle.spawn(self.clone().probe(idx));
        }
    }

    /// Asks an unhealthy endpoint for its version each time its back-off ends, until it
    /// answers. Runs on the client thread; the runtime's shutdown ends it.
    async fn probe(self: Arc<Self>, idx: usize) {
        loop {
            let due = {
                let Ok(mut eps) = self.endpoints.lock() else {
                    return;
                };
                let Some(ep) = eps.get_mut(idx) else {
                    return;
                };
                match ep.health.probe_due() {
                    Some(due) => due,
                    None => {
                        ep.probing = false;
                        return;
                    }
                }
            };
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
                continue;
            }
            self.stats.probes.fetch_add(1, Ordering::Relaxed);
            let ep = &self.cfg.endpoints[idx];
            let t = self.cfg.call_timeout;
            let r = match self.channel(idx) {
                Ok(ch) => tokio::time::timeout(t, containerd::version(ch, &ep.socket))
                    .await
                    .unwrap_or_else(|_| {
                        Err(RuntimeError::Timeout {
                            what: format!("probe at {}", ep.socket.display()),
                            after: t,
                        })
                    }),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) | Err(RuntimeError::Rpc { .. }) => self.note(idx, Seen::Answered),
                Err(e) => {
                    self.forget_channel(idx);
                    let why = match Seen::of::<()>(&Err(e), true) {
                        Seen::Failed { why, .. } => why,
                        _ => "no answer".into(),
                    };
                    let wait = {
                        let Ok(mut eps) = self.endpoints.lock() else {
                            return;
                        };
                        let Some(s) = eps.get_mut(idx) else {
                            return;
                        };
                        s.health
                            .probe_failed(Instant::now(), why.clone(), self.cfg.unhealthy)
                    };
                    tracing::debug!(
                        socket = %ep.socket.display(),
                        error = %why,
                        next_probe_s = wait.as_secs(),
                        "containerd endpoint still unhealthy"
                    );
                }
            }
        }
    }
}
