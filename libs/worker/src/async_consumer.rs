//! Asynchronous inference: the worker consumes the async queue's streams
//! of its own region, for the models it serves, and runs each job on its own
//! in-process service (same validation, batcher, statistics and metrics as a
//! gRPC call).
//!
//! A job's payload is an encoded v2 `ModelInferRequest` (queued by a
//! router); its result is the encoded `ModelInferResponse`, or the gRPC code
//! and message of the failure. Jobs the worker cannot take right now
//! (`RESOURCE_EXHAUSTED` from a full batcher queue, `UNAVAILABLE` while a
//! version loads) are retried for a while within the job's deadline.
//!
//! The set of streams follows the models the worker has ready: when it
//! changes, the consumer loop stops taking entries, finishes those it holds
//! and starts again on the new set. When the worker starts draining, the
//! loop stops taking entries and finishes those it holds; the worker waits
//! for it before unloading its models. Only this region's streams are ever
//! read, so a job never runs outside the regions its router allowed.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{IntCounterVec, Opts};
use prost::Message;
use shamal_async_queue::{
    ConsumerConfig, Job, JobQueue, Outcome, QueueConfig, RedisOptions, RedisQueue, StreamKey,
    StreamSelector, codes, run_consumer,
};
use shamal_backoff::Backoff;
use shamal_error::{ErrorKind, Retry, code_label};
use shamal_proto::inference::ModelInferRequest;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_telemetry::MetricsRegistry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::repository::VersionState;
use crate::service::{WorkerService, WorkerState};

/// How long a job the worker cannot take yet (queue full, version loading)
/// is retried before its failure becomes the result.
const RETRY_WINDOW: Duration = Duration::from_secs(30);

/// How often the served models are compared with the consumed streams.
const MODELS_CHECK: Duration = Duration::from_secs(1);

/// Where the worker's async queue comes from.
#[derive(Clone)]
pub enum QueueSource {
    /// A queue built by the embedding program and shared in process (the
    /// `MemoryQueue` of `shamal up`).
    Shared(Arc<dyn JobQueue>),
    /// Redis, connected by the worker (retried until it answers).
    Redis {
        options: RedisOptions,
        config: QueueConfig,
    },
}

impl fmt::Debug for QueueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueSource::Shared(_) => f.write_str("Shared(..)"),
            QueueSource::Redis { options, config } => f
                .debug_struct("Redis")
                .field("key_prefix", &options.key_prefix)
                .field("config", config)
                .finish_non_exhaustive(),
        }
    }
}

/// Async inference settings of a worker.
#[derive(Clone, Debug)]
pub struct AsyncInference {
    pub queue: QueueSource,
    /// Region whose streams the worker consumes; `None`: the region of the
    /// registry follow settings, `local` without a registry.
    pub region: Option<String>,
    /// Consumer name, unique per live worker; `None`: the registry worker
    /// id, `<server name>-<host name>-<gRPC port>` without a registry.
    pub consumer_id: Option<String>,
    /// Jobs run at once; 0: the worker's capacity (`instances ×
    /// max_batch_size` of the model defaults).
    pub concurrency: usize,
}

impl AsyncInference {
    pub fn new(queue: QueueSource) -> AsyncInference {
        AsyncInference {
            queue,
            region: None,
            consumer_id: None,
            concurrency: 0,
        }
    }
}

/// Who the consumer is, resolved when the worker starts serving.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub region: String,
    pub consumer_id: String,
    pub concurrency: usize,
}

#[derive(Clone)]
struct JobMetrics {
    jobs: IntCounterVec,
}

impl JobMetrics {
    /// Carries the worker's backend as a constant label, as the worker's
    /// other metrics do (see `WorkerMetrics`).
    fn new(registry: &MetricsRegistry, backend: &str) -> prometheus::Result<JobMetrics> {
        let jobs = IntCounterVec::new(
            Opts::new(
                "shamal_worker_async_jobs_total",
                "Async inference jobs run by this worker, by model and gRPC code of the result.",
            )
            .const_label("backend", backend),
            &["model", "code"],
        )?;
        Ok(JobMetrics {
            jobs: shamal_telemetry::register(registry, jobs)?,
        })
    }
}

/// Everything the consumer needs from the worker.
pub(crate) struct Consumer {
    pub settings: AsyncInference,
    pub identity: Identity,
    pub state: Arc<WorkerState>,
    /// The worker's in-flight count (heartbeat load): jobs count too.
    pub inflight: Arc<AtomicUsize>,
}

/// Starts the consumer; it returns once `stop` is set (or the worker
/// drains) and the jobs it held are finished.
pub(crate) fn spawn(
    consumer: Consumer,
    registry: &MetricsRegistry,
    backend: &str,
    stop: watch::Receiver<bool>,
) -> prometheus::Result<JoinHandle<()>> {
    let metrics = JobMetrics::new(registry, backend)?;
    Ok(tokio::spawn(supervise(consumer, metrics, stop)))
}

/// The models with a ready version, sorted.
fn ready_models(state: &WorkerState) -> BTreeSet<String> {
    state
        .store
        .index()
        .into_iter()
        .filter(|(_, _, version)| matches!(version, VersionState::Ready(_)))
        .map(|(model, ..)| model)
        .collect()
}

fn stopping(state: &WorkerState, stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || state.draining.load(Ordering::SeqCst)
}

async fn supervise(consumer: Consumer, metrics: JobMetrics, mut stop: watch::Receiver<bool>) {
    let Consumer {
        settings,
        identity,
        state,
        inflight,
    } = consumer;
    let queue = match settings.queue {
        QueueSource::Shared(queue) => queue,
        QueueSource::Redis { options, config } => {
            match connect(options, config, &state, &mut stop).await {
                Some(queue) => queue,
                None => return,
            }
        }
    };
    let service = WorkerService::new(state.clone());
    let handler = {
        let metrics = metrics.clone();
        move |job: Job| {
            let service = service.clone();
            let metrics = metrics.clone();
            let guard = InFlight::start(inflight.clone());
            async move {
                let _guard = guard;
                let model = job.model().to_owned();
                let outcome = run_job(&service, job).await;
                let code = match &outcome {
                    Outcome::Ok(_) => Code::Ok,
                    Outcome::Err { code, .. } => Code::from(*code),
                };
                metrics
                    .jobs
                    .with_label_values(&[model.as_str(), code_label(code)])
                    .inc();
                outcome
            }
        }
    };
    let handler = Arc::new(handler);
    loop {
        if stopping(&state, &stop) {
            return;
        }
        let models = ready_models(&state);
        let selectors: Vec<StreamSelector> = models
            .iter()
            .filter_map(|model| StreamKey::new(model.clone(), identity.region.clone()).ok())
            .map(|stream| StreamSelector::exact(&stream))
            .collect();
        if selectors.is_empty() {
            // Nothing served yet: look again soon.
            pause(&mut stop, MODELS_CHECK).await;
            continue;
        }
        tracing::info!(
            consumer = %identity.consumer_id,
            region = %identity.region,
            models = ?models,
            concurrency = identity.concurrency,
            "async consumer serving"
        );
        let config = ConsumerConfig::new(identity.consumer_id.clone(), selectors)
            .with_concurrency(identity.concurrency);
        // Ends the loop when the worker stops or drains, or its models change.
        let until_change = {
            let state = state.clone();
            let mut stop = stop.clone();
            async move {
                loop {
                    pause(&mut stop, MODELS_CHECK).await;
                    if stopping(&state, &stop) || ready_models(&state) != models {
                        return;
                    }
                }
            }
        };
        let handler = handler.clone();
        let result =
            run_consumer(queue.clone(), config, move |job| handler(job), until_change).await;
        match result {
            Ok(report) => {
                tracing::debug!(consumer = %identity.consumer_id, ?report, "async consumer loop ended")
            }
            Err(error) => {
                tracing::error!(consumer = %identity.consumer_id, %error, "async consumer cannot run");
                pause(&mut stop, Duration::from_secs(5)).await;
            }
        }
    }
}

/// Connects to Redis, retrying until it answers; `None` if the worker stops
/// first.
async fn connect(
    options: RedisOptions,
    config: QueueConfig,
    state: &WorkerState,
    stop: &mut watch::Receiver<bool>,
) -> Option<Arc<dyn JobQueue>> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        if stopping(state, stop) {
            return None;
        }
        let attempt = RedisQueue::connect(options.clone(), config.clone());
        let stopped = {
            let mut stop = stop.clone();
            async move {
                if stop.wait_for(|stopped| *stopped).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let connected = tokio::select! {
            connected = attempt => connected,
            () = stopped => return None,
        };
        match connected {
            Ok(queue) => {
                tracing::info!(key_prefix = %options.key_prefix, "async queue connected");
                return Some(Arc::new(queue));
            }
            Err(error) => {
                tracing::warn!(%error, "cannot connect to the async queue; retrying");
            }
        }
        pause(stop, backoff.next_delay()).await;
    }
}

/// Sleeps for `duration`, or until `stop` changes.
async fn pause(stop: &mut watch::Receiver<bool>, duration: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        Ok(()) = stop.changed() => {}
    }
}

/// Codes worth trying again after a pause (the batcher's queue is full, the
/// version is loading): anything the one error table does not mark
/// `Retry::Never`.
fn retriable(code: Code) -> bool {
    ErrorKind::from_code(code).retry() != Retry::Never
}

/// Runs one job on the worker's own service.
pub(crate) async fn run_job(service: &WorkerService, job: Job) -> Outcome {
    let request = match ModelInferRequest::decode(job.payload.clone()) {
        Ok(request) => request,
        Err(error) => {
            return Outcome::error(
                codes::INVALID_ARGUMENT,
                format!("the job is not an encoded inference request: {error}"),
            );
        }
    };
    if request.model_name != job.model() {
        return Outcome::error(
            codes::INVALID_ARGUMENT,
            format!(
                "the job on the stream of model '{}' asks for model '{}'",
                job.model(),
                request.model_name
            ),
        );
    }
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let mut call = tonic::Request::new(request.clone());
        shamal_rpc::set_request_id(call.metadata_mut(), job.id.as_str());
        if let Some(deadline) = job.deadline {
            match deadline.duration_since(SystemTime::now()) {
                Ok(left) if !left.is_zero() => call.set_timeout(left),
                _ => {
                    return Outcome::error(
                        codes::DEADLINE_EXCEEDED,
                        "deadline exceeded before the worker could run the job",
                    );
                }
            }
        }
        match service.model_infer(call).await {
            Ok(response) => return Outcome::Ok(response.into_inner().encode_to_vec().into()),
            Err(status) if retriable(status.code()) && started.elapsed() < RETRY_WINDOW => {
                tracing::debug!(job = %job.id, %status, "async job deferred");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(status) => return Outcome::error(status.code() as i32, status.message()),
        }
    }
}

/// Counts a job in the worker's in-flight requests while it runs.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shamal_async_queue::JobId;

    #[test]
    fn jobs_are_retried_for_load_and_loading_only() {
        assert!(retriable(Code::ResourceExhausted));
        assert!(retriable(Code::Unavailable));
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::DeadlineExceeded,
            Code::Internal,
        ] {
            assert!(!retriable(code), "{code:?}");
        }
        assert_eq!(code_label(Code::FailedPrecondition), "failed_precondition");
    }

    fn job(model: &str, payload: Bytes, deadline: Option<SystemTime>) -> Job {
        Job {
            id: JobId::generate(),
            stream: StreamKey::new(model, "local").unwrap(),
            payload,
            submitted_at: SystemTime::now(),
            deadline,
            priority: None,
        }
    }

    fn request(model: &str) -> Bytes {
        ModelInferRequest {
            model_name: model.to_owned(),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    fn error(outcome: Outcome) -> (Code, String) {
        match outcome {
            Outcome::Err { code, message } => (Code::from(code), message),
            Outcome::Ok(_) => panic!("expected an error"),
        }
    }

    #[tokio::test]
    async fn jobs_that_cannot_run_are_answered_with_their_reason() {
        let state = Arc::new(WorkerState::new("test"));
        let service = WorkerService::new(state.clone());
        assert!(ready_models(&state).is_empty());

        let garbage = job("m", Bytes::from_static(&[0xff, 0xff, 0xff]), None);
        let (code, message) = error(run_job(&service, garbage).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(
            message.contains("not an encoded inference request"),
            "{message}"
        );

        let (code, message) = error(run_job(&service, job("m", request("other"), None)).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(
            message.contains("'m'") && message.contains("'other'"),
            "{message}"
        );

        // Not retried: the worker does not know the model.
        let started = Instant::now();
        let (code, message) = error(run_job(&service, job("m", request("m"), None)).await);
        assert_eq!(code, Code::NotFound, "{message}");
        assert!(started.elapsed() < Duration::from_secs(1));

        let past = SystemTime::now() - Duration::from_secs(1);
        let (code, _) = error(run_job(&service, job("m", request("m"), Some(past))).await);
        assert_eq!(code, Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn a_loading_version_is_retried_within_the_deadline() {
        let state = Arc::new(WorkerState::new("test"));
        state.store.insert("m", 1, VersionState::Loading);
        let service = WorkerService::new(state.clone());
        assert!(ready_models(&state).is_empty(), "loading is not ready");
        let started = Instant::now();
        let deadline = SystemTime::now() + Duration::from_millis(300);
        let (code, _) = error(run_job(&service, job("m", request("m"), Some(deadline))).await);
        assert_eq!(code, Code::DeadlineExceeded);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "retried until the deadline: {:?}",
            started.elapsed()
        );
    }
}
