//! Forwarding: one call to a worker serving a model, with replica choice,
//! retries on another replica within the retry budget, the caller's
//! deadline, and outlier ejection. This is the bottom of the router's
//! request path: it knows workers, not rollouts, admission or shadows, and
//! both the inference pipeline (`pipeline`) and its shadow copies
//! (`shadow`) call into it.
//!
//! The retry loop is hand-written rather than `tower::retry::Retry`: each
//! retry must go to a replica not tried yet, a worker's NOT_FOUND makes the
//! router forget that worker holds the version, and a deadline is mapped to
//! DEADLINE_EXCEEDED however it surfaces; a tower retry policy would have
//! to carry all of that state in the request. The budget it draws on is
//! tower's (`TpsBudget`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use shamal_error::{ErrorKind, Retry};
use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};

use crate::metrics::RouterMetrics;
use crate::outlier::{counts_as_failure, now_ms};
use crate::pool::{InflightGuard, PickError, Upstream, UpstreamClient, WorkerPool};
use crate::residency::{self, RegionPolicy};

/// How long a request's deposit in the retry budget counts: ten seconds,
/// as in Finagle and linkerd, so that a burst of failures is paid for by
/// the traffic of the last few seconds, not of an hour ago.
const RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);

/// The retry budget: every request deposits, every retry withdraws; at
/// most `ratio` retries per request over the last ten seconds, plus
/// `min_per_second` retries a second that even a quiet router may make.
pub fn retry_budget(ratio: f64, min_per_second: u32) -> TpsBudget {
    // TpsBudget asserts its bounds; configuration validation keeps the
    // ratio within 0..=1, the clamps keep a library caller from a panic.
    let ratio = if ratio.is_finite() {
        ratio.clamp(0.0, 1000.0)
    } else {
        0.0
    };
    TpsBudget::new(
        RETRY_BUDGET_TTL,
        min_per_second.min(i32::MAX as u32 - 1),
        ratio as f32,
    )
}

/// Attempts per request: the first try plus retries on other workers
/// (each retry also needs the retry budget's leave).
const MAX_ATTEMPTS: usize = 3;

/// Per-call context: who is asking and until when.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub request_id: String,
    pub deadline: Instant,
    pub protocol: &'static str,
    /// The caller's headers (gRPC metadata), where a rollout's sticky key
    /// may be found; filled for inference calls only, empty otherwise.
    pub headers: HeaderMap,
    /// The identity in the caller's client certificate, when it sent one
    /// over mTLS; filled for inference calls only.
    pub peer: Option<shamal_tls::PeerIdentity>,
}

impl CallContext {
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A request to a worker carrying this call's id and the time it has
    /// left (as `grpc-timeout`).
    pub fn outgoing<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        shamal_rpc::set_request_id(request.metadata_mut(), &self.request_id);
        request.set_timeout(self.remaining());
        request
    }
}

/// The status for a replica choice that found no worker.
pub(crate) fn pick_status(error: PickError, model: &str, version: &str) -> Status {
    match error {
        PickError::UnknownModel if version.is_empty() => {
            Status::not_found(format!("unknown model '{model}'"))
        }
        PickError::UnknownModel => {
            Status::not_found(format!("unknown version '{version}' of model '{model}'"))
        }
        PickError::NoneHealthy => {
            Status::unavailable(format!("no worker is available for model '{model}'"))
        }
        // Only reachable with a policy (see `forward_to`).
        PickError::NoneInRegion => Status::failed_precondition(format!(
            "data residency: no worker for model '{model}' in an allowed region"
        )),
    }
}

/// Failures worth another worker: the error table says another replica
/// may serve it (`Retry::Elsewhere`: UNAVAILABLE), or the call failed in
/// the transport (connection refused or reset, the
/// worker died mid-request: tonic reports these as UNKNOWN or CANCELLED with
/// the transport error as source, unlike statuses a worker sends). The
/// request may have run, but inference is idempotent, so running it again
/// elsewhere is safe.
fn retriable(status: &Status) -> bool {
    ErrorKind::from_code(status.code()).retry() == Retry::Elsewhere || transport_failure(status)
}

fn transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Where a call goes: a model (and version), the regions it may be
/// processed in, and the budget its retries draw on (`None`: no retries).
pub(crate) struct Route<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub regions: Option<&'a RegionPolicy>,
    pub retry_budget: Option<&'a TpsBudget>,
    /// The call's audit record, told which worker (and region) it went to.
    pub audit: Option<&'a crate::audit::AuditNote>,
}

/// Calls one worker serving the route's model in an allowed region,
/// retrying on another worker when the chosen one is unreachable or no
/// longer holds the version (within the retry budget and the call's
/// deadline). Every worker tried is in an allowed region: `pick` offers no
/// other.
pub(crate) async fn forward_to<T, F, Fut>(
    pool: &WorkerPool,
    metrics: &RouterMetrics,
    route: &Route<'_>,
    context: &CallContext,
    call: F,
) -> Result<T, Status>
where
    F: Fn(UpstreamClient) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let Route { model, version, .. } = *route;
    if model.is_empty() {
        return Err(Status::invalid_argument("model name must not be empty"));
    }
    let outlier = &pool.settings().outlier;
    let mut tried: Vec<Arc<Upstream>> = Vec::new();
    let mut last_error: Option<Status> = None;
    for attempt in 0..MAX_ATTEMPTS {
        let remaining = context.remaining();
        if remaining.is_zero() {
            return Err(Status::deadline_exceeded("deadline exceeded in the router"));
        }
        let upstream = match pool.pick(model, version, &tried, route.regions) {
            Ok(picked) => picked,
            Err(PickError::NoneInRegion) if last_error.is_none() => {
                return Err(match route.regions {
                    Some(policy) => residency::no_worker_in_region(model, policy),
                    None => pick_status(PickError::NoneInRegion, model, version),
                });
            }
            Err(error) => {
                return Err(last_error.unwrap_or_else(|| pick_status(error, model, version)));
            }
        };
        if attempt > 0 {
            if !route.retry_budget.is_some_and(Budget::withdraw) {
                metrics.retries_refused.inc();
                return Err(last_error.unwrap_or_else(|| {
                    Status::unavailable(format!("no worker is available for model '{model}'"))
                }));
            }
            metrics.retries.inc();
        }
        if let Some(note) = route.audit {
            note.worker(&upstream.meta.id, &upstream.meta.region);
        }
        tried.push(upstream.clone());
        let _inflight = InflightGuard::new(upstream.clone());
        let sent = Instant::now();
        let attempt = tokio::time::timeout(remaining, call(upstream.client())).await;
        match attempt {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "deadline exceeded waiting for the worker",
                ));
            }
            Ok(Ok(response)) => {
                upstream.outlier.record_success(model, sent.elapsed());
                return Ok(response.into_inner());
            }
            // tonic's client enforces the propagated deadline itself and
            // reports it as CANCELLED; the caller asked for a deadline.
            Ok(Err(status))
                if status.code() == Code::Cancelled && context.remaining().is_zero() =>
            {
                return Err(Status::deadline_exceeded(
                    "deadline exceeded waiting for the worker",
                ));
            }
            Ok(Err(status)) => {
                if counts_as_failure(status.code()) || transport_failure(&status) {
                    if upstream.outlier.record_failure(outlier, now_ms()) {
                        tracing::warn!(worker = %upstream.meta.address, "worker ejected after repeated failures");
                    }
                } else {
                    // The worker answered: the request, not the worker, failed.
                    upstream.outlier.record_success(model, sent.elapsed());
                }
                if status.code() == Code::NotFound {
                    // It was picked because its last repository index
                    // listed the model (version); it no longer holds it
                    // (the registry moved the version to other workers).
                    // Another worker that holds it may answer.
                    upstream.forget(model, version);
                    last_error = Some(status);
                    continue;
                }
                if !retriable(&status) {
                    return Err(status);
                }
                tracing::warn!(request_id = %context.request_id, worker = %upstream.meta.address, %status, "worker unavailable, trying another");
                upstream.mark_unhealthy();
                last_error = Some(Status::unavailable(format!(
                    "worker for model '{model}' is unavailable: {}",
                    status.message()
                )));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        Status::unavailable(format!("no worker is available for model '{model}'"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn withdrawals(budget: &TpsBudget) -> usize {
        let mut retries = 0;
        while budget.withdraw() {
            retries += 1;
        }
        retries
    }

    #[test]
    fn retries_are_capped_at_the_ratio_of_requests() {
        // No time-based reserve: only deposits count.
        let budget = retry_budget(0.2, 0);
        assert_eq!(withdrawals(&budget), 0, "nothing deposited yet");
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(
            withdrawals(&budget),
            20,
            "100 requests at 20% buy 20 retries"
        );
    }

    #[test]
    fn a_quiet_router_keeps_a_reserve_of_min_per_second_over_the_window() {
        let budget = retry_budget(0.2, 5);
        assert_eq!(
            withdrawals(&budget),
            50,
            "5 retries a second over the 10 s window, without any request"
        );
    }

    #[test]
    fn out_of_range_settings_do_not_panic() {
        for ratio in [f64::NAN, -1.0, 5_000.0] {
            let budget = retry_budget(ratio, u32::MAX);
            budget.deposit();
            let _ = budget.withdraw();
        }
    }
}
