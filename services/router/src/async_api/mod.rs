//! Asynchronous inference: submit a v2 inference request, get an id at once,
//! fetch (or long-poll) the answer later.
//!
//! A submission is checked like a synchronous ModelInfer call (request
//! parameters, data residency, version choice, tensors against the model's
//! signature), then queued on the stream of its model in one region the
//! request may be processed in (`shamal-async-queue`). Workers of that
//! region consume the stream, run the request on their own service and write
//! the result, which the router reads back by id.
//!
//! Front doors: HTTP `POST /v2/models/{m}[/versions/{v}]/infer/async` and
//! `GET /v2/async/{id}[?wait_ms=N]` (routes in `http`), and gRPC
//! `shamal.async.v1.AsyncInference` (Submit, Get). Without `async_queue`
//! both answer UNIMPLEMENTED / 501.
//!
//! Region: the stream's region is one the request's policy allows (its own
//! list, its tenant's and its model's, see `residency`) where a worker
//! serving the model is known, preferring the one with the most healthy
//! capacity; without a policy, `async_region` (`auto`: by capacity). Workers
//! consume only the streams of their own region, so a job never runs outside
//! the regions it allows.
//!
//! By concern: [`AsyncApi`] (here) submits and fetches; `settings` reads
//! the router's configuration; `region` chooses a job's region; `signature`
//! checks tensors against the model's signature; `tasks` runs the
//! background work (connecting to Redis, exporting backlogs); `http` and
//! `grpc` are the two front doors; `metrics` are the async API's own.

mod grpc;
mod http;
mod metrics;
mod region;
mod settings;
mod signature;
mod tasks;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost::Message;
use shamal_async_queue::{
    JobId, JobQueue, JobResult, JobStatus, NewJob, Outcome, QueueError, RedisOptions, StreamKey,
};
use shamal_error::ErrorKind;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use shamal_telemetry::MetricsRegistry;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::admission::Priority;
use crate::config::{MEMORY_QUEUE, RouterConfig};
use crate::forward::CallContext;
use crate::metrics::code_label;
use crate::routing::RoutingCore;
use metrics::AsyncMetrics;
use settings::redacted;
use signature::SignatureCache;

pub use grpc::AsyncService;
pub use http::{ATTEMPTS_HEADER, AsyncHttp, STATE_HEADER, WORKER_HEADER, routes};
pub use region::choose_region;
pub use settings::AsyncSettings;
pub use tasks::AsyncTasks;

/// What a fetch found.
#[derive(Debug)]
pub enum Fetched {
    /// Queued (`running` false) or taken by a worker.
    Pending {
        running: bool,
        worker: String,
        attempts: u32,
    },
    /// Finished: the response or the job's error.
    Done {
        outcome: Result<ModelInferResponse, Status>,
        worker: String,
        attempts: u32,
    },
}

/// The queue, once reachable (Redis is connected in the background, so that
/// a Redis outage at start-up does not keep the router from serving).
struct QueueSlot {
    queue: OnceLock<Arc<dyn JobQueue>>,
    description: String,
}

impl QueueSlot {
    fn get(&self) -> Result<&Arc<dyn JobQueue>, Status> {
        self.queue.get().ok_or_else(|| {
            Status::unavailable(format!(
                "the async queue ({}) is not reachable yet, retry later",
                self.description
            ))
        })
    }
}

/// The async inference service of a router.
pub struct AsyncApi {
    core: Arc<RoutingCore>,
    queue: QueueSlot,
    settings: AsyncSettings,
    metrics: AsyncMetrics,
    signatures: SignatureCache,
    /// Set when the router shuts down: long polls answer at once.
    stop: watch::Receiver<bool>,
}

/// A queue error's answer, by the one error table: a bad argument is the
/// caller's; anything else (Redis unreachable or failing, data it cannot
/// read) means the async API cannot serve now.
/// A queue error as the caller sees it. Bad arguments are the caller's and
/// say what was wrong; backend failures are logged with a fresh error id
/// and answered UNAVAILABLE naming only that id, so that Redis's own error
/// text (addresses, commands, server messages) never reaches a caller.
fn queue_status(error: &QueueError) -> Status {
    match error {
        QueueError::Invalid { .. } => ErrorKind::InvalidArgument.status(error.to_string()),
        _ => {
            let error_id = uuid::Uuid::new_v4().simple().to_string();
            tracing::warn!(%error_id, %error, "async queue request failed");
            ErrorKind::Unavailable.status(format!(
                "async queue unavailable (error id {error_id}); the router log has the details"
            ))
        }
    }
}

/// The answer of both front doors when the router has no async queue.
fn not_configured() -> Status {
    Status::unimplemented(
        "async inference is not enabled on this router (set async_queue to a redis:// URL)",
    )
}

/// A job as `submit_checked` queued it: what its audit record says.
struct Queued {
    id: JobId,
    /// Lower-case hex SHA-256 of the queued payload.
    payload_sha256: String,
    /// The version routing chose (empty: the worker's newest).
    version: String,
    region: String,
}

impl AsyncApi {
    /// Starts the async service when `provided` (a queue shared with
    /// in-process workers) is given or `async_queue` is configured; `None`
    /// otherwise.
    pub fn start(
        config: &RouterConfig,
        core: Arc<RoutingCore>,
        registry: &MetricsRegistry,
        provided: Option<Arc<dyn JobQueue>>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Option<(Arc<AsyncApi>, AsyncTasks)>> {
        let settings = AsyncSettings::from_config(config);
        let (slot, redis) = match (provided, config.async_queue.as_deref()) {
            (Some(queue), _) => {
                let slot = QueueSlot {
                    queue: OnceLock::new(),
                    description: "in-process queue".to_owned(),
                };
                let _ = slot.queue.set(queue);
                (slot, None)
            }
            (None, None) => return Ok(None),
            (None, Some(MEMORY_QUEUE)) => anyhow::bail!(
                "async_queue = \"memory\" needs the queue shared with in-process workers \
                 (RouterExtras::async_queue); set a redis:// URL otherwise"
            ),
            (None, Some(url)) => {
                let slot = QueueSlot {
                    queue: OnceLock::new(),
                    description: format!("redis at {}", redacted(url)),
                };
                let options =
                    RedisOptions::new(url).with_key_prefix(config.async_key_prefix.clone());
                (slot, Some(options))
            }
        };
        let api = Arc::new(AsyncApi {
            core,
            queue: slot,
            settings,
            metrics: AsyncMetrics::new(registry),
            signatures: SignatureCache::default(),
            stop,
        });
        let tasks = AsyncTasks::spawn(&api, redis);
        Ok(Some((api, tasks)))
    }

    pub fn settings(&self) -> &AsyncSettings {
        &self.settings
    }

    /// Checks and queues an inference request; returns the job's id. The
    /// submission is audited (`inference.async_submit`) when auditing is
    /// on: the record's `request_id` is the job id, as is that of the
    /// worker's `inference.async_run` record of the job, and its
    /// `request_sha256` the digest of the queued payload (the request with
    /// the version routing chose), as the worker's; the call's
    /// `x-request-id` is in `reason`. A full audit spool refuses the
    /// submission (fail closed).
    pub async fn submit(
        &self,
        request: ModelInferRequest,
        context: &CallContext,
        principal: &shamal_auth::Principal,
    ) -> Result<JobId, Status> {
        let auditor = self.core.auditor();
        if !auditor.is_enabled() {
            return Ok(self.submit_checked(request, context, principal).await?.id);
        }
        auditor
            .admit()
            .map_err(|backlog| crate::audit::backlog_status(&backlog))?;
        let pending = crate::audit::Pending::open(&request, &context.request_id);
        pending.note.caller(principal);
        if let Ok(Some(named)) = crate::residency::tenant(&request.parameters, &context.headers) {
            pending.note.tenant_if_unset(named);
        }
        let result = self.submit_checked(request, context, principal).await;
        let event = match &result {
            Ok(queued) => {
                let mut event =
                    pending.event(crate::audit::ASYNC_SUBMIT, Ok((&queued.version, None)));
                event.request_id = queued.id.to_string();
                event.request_sha256.clone_from(&queued.payload_sha256);
                event.region.clone_from(&queued.region);
                event.reason = format!("x-request-id {}", context.request_id);
                event
            }
            Err(status) => pending.event(crate::audit::ASYNC_SUBMIT, Err(status)),
        };
        crate::audit::record(auditor, event, result.map(|queued| queued.id))
    }

    async fn submit_checked(
        &self,
        mut request: ModelInferRequest,
        context: &CallContext,
        principal: &shamal_auth::Principal,
    ) -> Result<Queued, Status> {
        if request.model_name.is_empty() {
            return Err(Status::invalid_argument("model name must not be empty"));
        }
        let priority = Priority::of(&request.parameters)?;
        let policy = self.core.region_policy(&request, context, principal)?;
        if let Some(routing) = self.core.registry() {
            // Writes the rollout's (or alias's) version into the request.
            routing.plan(&mut request, &context.headers)?;
        }
        let model = request.model_name.clone();
        let version = request.model_version.clone();
        let region = self.choose_region(&model, &version, policy.as_ref())?;
        self.check_tensors(&request, context).await?;
        let stream = StreamKey::new(model.clone(), region)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let queue = self.queue.get()?;
        let backlog = queue
            .backlog(&stream)
            .await
            .map_err(|error| queue_status(&error))?;
        let held = backlog.lag + backlog.pending;
        if held >= self.settings.max_backlog {
            self.metrics.refused.with_label_values(&[&model]).inc();
            return Err(Status::resource_exhausted(format!(
                "the async backlog of model '{model}' in region '{}' is full ({held} jobs, max_async_backlog {}), retry later",
                stream.region(),
                self.settings.max_backlog
            )));
        }
        let payload = request.encode_to_vec();
        let payload_sha256 = shamal_audit_client::sha256_hex(&payload);
        let mut job = NewJob::new(stream, payload).with_timeout(self.settings.job_timeout);
        job.priority = match priority {
            Priority::High => Some(1),
            Priority::Normal => None,
            Priority::Low => Some(3),
        };
        let queued = queue
            .submit(job)
            .await
            .map_err(|error| queue_status(&error))?;
        self.metrics.submitted.with_label_values(&[&model]).inc();
        tracing::debug!(request_id = %context.request_id, job = %queued.id, stream = %queued.stream, "async job queued");
        Ok(Queued {
            region: queued.stream.region().to_owned(),
            id: queued.id,
            payload_sha256,
            version,
        })
    }

    /// The state of job `id`, waiting up to `wait` (capped by
    /// `async_max_wait_ms`, ended early by shutdown) for it to finish.
    pub async fn fetch(&self, id: &str, wait: Duration) -> Result<Fetched, Status> {
        let id = JobId::parse(id).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let queue = self.queue.get()?;
        let wait = wait.min(self.settings.max_wait);
        let status = if wait.is_zero() || *self.stop.borrow() {
            queue.status(&id).await
        } else {
            let mut stop = self.stop.clone();
            let stopping = async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            };
            tokio::select! {
                status = queue.wait(&id, wait) => status,
                () = stopping => queue.status(&id).await,
            }
        }
        .map_err(|error| queue_status(&error))?;
        match status {
            JobStatus::Unknown => Err(Status::not_found(format!(
                "unknown async job '{id}' (never submitted, or its result expired)"
            ))),
            JobStatus::Queued => Ok(Fetched::Pending {
                running: false,
                worker: String::new(),
                attempts: 0,
            }),
            JobStatus::Running { consumer, attempts } => Ok(Fetched::Pending {
                running: true,
                worker: consumer,
                attempts,
            }),
            JobStatus::Done(result) => Ok(self.finished(result)),
        }
    }

    fn finished(&self, result: JobResult) -> Fetched {
        let outcome = match result.outcome {
            Outcome::Ok(bytes) => ModelInferResponse::decode(bytes).map_err(|error| {
                Status::internal(format!(
                    "the result of async job '{}' is not an inference response: {error}",
                    result.id
                ))
            }),
            Outcome::Err { code, message } => Err(Status::new(Code::from(code), message)),
        };
        let code = match &outcome {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics
            .fetched
            .with_label_values(&[code_label(code)])
            .inc();
        Fetched::Done {
            outcome,
            worker: result.worker_id,
            attempts: result.attempts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_failures_name_an_error_id_not_the_backend_text() {
        let corrupt = QueueError::Corrupt("stream shamal:async:m:uae-north entry 17-0".to_owned());
        let status = queue_status(&corrupt);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("error id "), "{status:?}");
        assert!(!status.message().contains("shamal:async"), "{status:?}");
        assert!(!status.message().contains("corrupt"), "{status:?}");
    }
}
