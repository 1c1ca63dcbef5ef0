//! Membership: registration, heartbeats and the two drain notices.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shamal_backoff::Backoff;
use shamal_registry_client::proto::registry_client::RegistryClient;
use shamal_registry_client::proto::{
    DeregisterWorkerRequest, HeartbeatRequest, RegisterWorkerRequest,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::settings::RegistryAgentSettings;
use super::{CALL_TIMEOUT, stopped};
use crate::repository::VersionState;
use crate::service::WorkerState;

/// Time allowed for a drain notice (DeregisterWorker): shutdown does not
/// wait longer on an unreachable registry.
const DRAIN_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Repeated heartbeat failures are logged at most this often.
const HEARTBEAT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Heartbeat timings the registry answered at registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub heartbeat_interval: Duration,
    pub lease: Duration,
}

/// Why one RegisterWorker call failed (logged, then retried).
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    /// The registry answered with an error status.
    #[error("{0}")]
    Refused(tonic::Status),
    /// No answer within [`CALL_TIMEOUT`].
    #[error("the registry did not answer RegisterWorker")]
    NoAnswer,
}

/// A worker's membership in the registry: registration, heartbeats and the
/// two drain notices. Shared by the reconcile loop (which registers), the
/// heartbeat task and the server's shutdown path.
pub(crate) struct Membership {
    pub channel: Channel,
    registration: RegisterWorkerRequest,
    /// Timings of the last successful registration; `None` before one.
    timings: watch::Sender<Option<Timings>>,
    /// Set when the worker starts draining: it no longer registers.
    draining: AtomicBool,
    state: Arc<WorkerState>,
    /// Requests the worker's gRPC service is handling now.
    inflight: Arc<AtomicUsize>,
}

impl Membership {
    pub fn new(
        settings: &RegistryAgentSettings,
        worker_id: String,
        address: String,
        formats: &[&str],
        capacity: u32,
        state: Arc<WorkerState>,
        inflight: Arc<AtomicUsize>,
    ) -> Result<Arc<Membership>, shamal_registry_client::Error> {
        let channel =
            shamal_registry_client::channel_with(&settings.address, settings.tls.as_ref())?;
        Ok(Arc::new(Membership {
            channel,
            registration: RegisterWorkerRequest {
                worker_id,
                address,
                region: settings.region.clone(),
                formats: formats.iter().map(|format| (*format).to_owned()).collect(),
                device: settings.device.clone(),
                capacity,
            },
            timings: watch::Sender::new(None),
            draining: AtomicBool::new(false),
            state,
            inflight,
        }))
    }

    fn client(&self) -> RegistryClient<Channel> {
        shamal_registry_client::client(self.channel.clone())
    }

    /// Whether the registry has accepted a registration of this worker.
    pub fn registered(&self) -> bool {
        self.timings.borrow().is_some()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// One RegisterWorker call; keeps the timings the registry answers.
    async fn register_once(&self) -> Result<(), RegisterError> {
        let mut client = self.client();
        match tokio::time::timeout(
            CALL_TIMEOUT,
            client.register_worker(self.registration.clone()),
        )
        .await
        {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                // A registry that predates leases answers zeros: heartbeat
                // every second then.
                let heartbeat_interval = match response.heartbeat_interval_ms {
                    0 => Duration::from_secs(1),
                    ms => Duration::from_millis(ms),
                };
                let lease = Duration::from_millis(response.lease_ms)
                    .max(heartbeat_interval.saturating_mul(2));
                self.timings.send_replace(Some(Timings {
                    heartbeat_interval,
                    lease,
                }));
                let request = &self.registration;
                tracing::info!(worker_id = %request.worker_id, address = %request.address, region = %request.region, capacity = request.capacity, formats = ?request.formats, heartbeat_interval_ms = heartbeat_interval.as_millis() as u64, lease_ms = lease.as_millis() as u64, "registered with the registry");
                Ok(())
            }
            Ok(Err(status)) => Err(RegisterError::Refused(status)),
            Err(_) => Err(RegisterError::NoAnswer),
        }
    }

    /// Registers until it succeeds; false when stopped or draining first.
    pub async fn register(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut attempt = 0u32;
        loop {
            if *stop.borrow() || self.draining() {
                return false;
            }
            attempt += 1;
            match self.register_once().await {
                Ok(()) => return true,
                Err(error) if attempt == 1 || attempt.is_multiple_of(10) => {
                    tracing::warn!(%error, attempt, "cannot register with the registry yet; retrying");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stopped(stop) => return false,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// The load reported with each heartbeat: requests in the worker's gRPC
    /// service now, and requests waiting in its batch queues.
    pub fn load(&self) -> (u32, u32) {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let queued: usize = self
            .state
            .store
            .index()
            .iter()
            .map(|(_, _, state)| match state {
                VersionState::Ready(model) => model.batcher.queue_depth(),
                _ => 0,
            })
            .sum();
        (
            u32::try_from(inflight).unwrap_or(u32::MAX),
            u32::try_from(queued).unwrap_or(u32::MAX),
        )
    }

    /// Heartbeats at the registry's interval until `stop` flips (after the
    /// final deregistration). A registry that no longer knows the worker
    /// gets a new registration (unless the worker is draining). Failures are
    /// logged, at most every 10 s, and never stop the worker.
    pub async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut timings = self.timings.subscribe();
        let mut failures = 0u64;
        let mut last_warning: Option<Instant> = None;
        loop {
            let current = *timings.borrow_and_update();
            let Some(current) = current else {
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    changed = timings.changed() => if changed.is_err() { return },
                }
                continue;
            };
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(current.heartbeat_interval) => {}
            }
            let (inflight, queue_depth) = self.load();
            let request = HeartbeatRequest {
                worker_id: self.registration.worker_id.clone(),
                inflight,
                queue_depth,
            };
            let mut client = self.client();
            let sent =
                tokio::time::timeout(current.lease.min(CALL_TIMEOUT), client.heartbeat(request))
                    .await;
            let failure = match sent {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        tracing::info!(failures, "heartbeats reach the registry again");
                    }
                    failures = 0;
                    last_warning = None;
                    if !response.into_inner().registered {
                        if self.draining() {
                            tracing::debug!("the registry no longer knows this draining worker");
                        } else {
                            tracing::info!(
                                "the registry does not know this worker (lost or restarted); registering again"
                            );
                            if let Err(error) = self.register_once().await {
                                tracing::warn!(%error, "cannot register again; retrying at the next heartbeat");
                            }
                        }
                    }
                    continue;
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(%status, "the registry does not take heartbeats; not sending any");
                    return;
                }
                Ok(Err(status)) => status.to_string(),
                Err(_) => format!(
                    "no answer within {} ms",
                    current.lease.min(CALL_TIMEOUT).as_millis()
                ),
            };
            failures += 1;
            if last_warning.is_none_or(|at| at.elapsed() >= HEARTBEAT_LOG_EVERY) {
                last_warning = Some(Instant::now());
                tracing::warn!(error = %failure, failures, "heartbeat to the registry failed; still serving");
            }
        }
    }

    /// First drain notice: the registry marks the worker `draining`, so
    /// routers stop sending it new requests. True when the registry
    /// accepted it (the worker then waits its drain grace); the worker
    /// stops registering either way.
    pub async fn drain_notice(&self, reason: &str) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        if !self.registered() {
            return false;
        }
        self.deregister(false, reason).await
    }

    /// Last drain notice: the worker has finished and leaves (`gone`).
    pub async fn leave(&self, reason: &str) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        if !self.registered() {
            return false;
        }
        self.deregister(true, reason).await
    }

    async fn deregister(&self, done: bool, reason: &str) -> bool {
        let mut client = self.client();
        let request = DeregisterWorkerRequest {
            worker_id: self.registration.worker_id.clone(),
            done,
            reason: reason.to_owned(),
        };
        match tokio::time::timeout(DRAIN_CALL_TIMEOUT, client.deregister_worker(request)).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    state = if done { "gone" } else { "draining" },
                    "drain notice accepted by the registry"
                );
                true
            }
            Ok(Err(status)) => {
                tracing::warn!(%status, done, "the registry refused the drain notice");
                false
            }
            Err(_) => {
                tracing::warn!(done, "the registry did not answer the drain notice in time");
                false
            }
        }
    }
}
