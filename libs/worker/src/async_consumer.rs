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
//!
//! Audit: with an `[audit]` endpoint, every job the consumer runs is
//! recorded (action `inference.async_run`: outcome, model, the version
//! that answered, region, this consumer, the job id as `request_id`, run
//! time, SHA-256 of the payload and of the encoded response; never the
//! payloads). Fail closed: while the audit spool is at its bound a job is
//! not run; it waits, holding its entry (touched, so not reclaimed), for up
//! to [`RETRY_WINDOW`] within its deadline, then is answered
//! `RESOURCE_EXHAUSTED` naming the audit backlog; and a result whose
//! record cannot be written is not given (the same answer). Jobs the queue
//! answers itself (expired before delivery, abandoned after too many
//! deliveries) never reach the worker and are not recorded here.

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
use shamal_audit_client::{AuditEvent, Auditor, Backlog, sha256_hex};
use shamal_backoff::Backoff;
use shamal_error::{ErrorKind, Retry, code_label};
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
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

/// The action of an async job's run on a worker (its submission through
/// a router is `inference.async_submit`).
pub const ASYNC_RUN: &str = "inference.async_run";

/// How the consumer records the jobs it runs.
#[derive(Clone, Debug)]
pub(crate) struct JobAudit {
    /// Disabled when no audit endpoint is configured.
    pub auditor: Auditor,
    /// Who runs the jobs: the worker's SPIFFE URI with TLS, else
    /// `service:<cpu-worker|gpu-worker>`.
    pub actor: String,
}

impl JobAudit {
    #[cfg(test)]
    fn disabled() -> JobAudit {
        JobAudit {
            auditor: Auditor::disabled(),
            actor: String::new(),
        }
    }
}

/// Everything the consumer needs from the worker.
pub(crate) struct Consumer {
    pub settings: AsyncInference,
    pub identity: Identity,
    pub state: Arc<WorkerState>,
    /// The worker's in-flight count (heartbeat load): jobs count too.
    pub inflight: Arc<AtomicUsize>,
    pub audit: JobAudit,
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
pub(crate) fn ready_models(state: &WorkerState) -> BTreeSet<String> {
    state
        .store
        .index()
        .into_iter()
        .filter(|(_, _, version)| matches!(version, VersionState::Ready(_)))
        .map(|(model, ..)| model)
        .collect()
}

pub(crate) fn stopping(state: &WorkerState, stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || state.draining.load(Ordering::SeqCst)
}

async fn supervise(consumer: Consumer, metrics: JobMetrics, mut stop: watch::Receiver<bool>) {
    let Consumer {
        settings,
        identity,
        state,
        inflight,
        audit,
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
        let state = state.clone();
        let stop = stop.clone();
        let consumer_id = identity.consumer_id.clone();
        move |job: Job| {
            let service = service.clone();
            let metrics = metrics.clone();
            let audit = audit.clone();
            let state = state.clone();
            let stop = stop.clone();
            let consumer_id = consumer_id.clone();
            let guard = InFlight::start(inflight.clone());
            async move {
                let _guard = guard;
                let model = job.model().to_owned();
                let outcome = if audit.auditor.is_enabled() {
                    run_audited(&service, &audit, &consumer_id, job, || {
                        stopping(&state, &stop)
                    })
                    .await
                } else {
                    run_job(&service, job).await
                };
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
    let streams = Streams {
        consumer_id: &identity.consumer_id,
        region: &identity.region,
        concurrency: identity.concurrency,
        role: "async consumer",
        region_sets: false,
    };
    consume_ready_models(queue, &state, &mut stop, streams, handler).await;
}

/// Who consumes which streams, for [`consume_ready_models`].
pub(crate) struct Streams<'a> {
    pub consumer_id: &'a str,
    pub region: &'a str,
    pub concurrency: usize,
    /// For the logs: `async consumer`, `batch role`.
    pub role: &'a str,
    /// Also the streams of region sets holding `region` (a batch job that
    /// several regions may score).
    pub region_sets: bool,
}

/// The streams of `models` in `region`: only this region's (and, with
/// `region_sets`, those of the region sets that hold it), so a job (or
/// shard) is never taken outside the regions it allows.
pub(crate) fn selectors(
    models: &BTreeSet<String>,
    region: &str,
    region_sets: bool,
) -> Vec<StreamSelector> {
    models
        .iter()
        .filter_map(|model| StreamKey::new(model.clone(), region.to_owned()).ok())
        .map(|stream| {
            if region_sets {
                StreamSelector::member(stream.model(), stream.region())
            } else {
                StreamSelector::exact(&stream)
            }
        })
        .collect()
}

/// Runs `handler` on the entries of `queue`'s streams of the models the
/// worker has ready, in its region, until the worker stops or drains; when
/// the set of ready models changes, the consumer finishes the entries it
/// holds and starts again on the new set. Shared by the async consumer and
/// the batch role.
pub(crate) async fn consume_ready_models<H, Fut>(
    queue: Arc<dyn JobQueue>,
    state: &Arc<WorkerState>,
    stop: &mut watch::Receiver<bool>,
    streams: Streams<'_>,
    handler: Arc<H>,
) where
    H: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let Streams {
        consumer_id,
        region,
        concurrency,
        role,
        region_sets,
    } = streams;
    loop {
        if stopping(state, stop) {
            return;
        }
        let models = ready_models(state);
        let selectors = selectors(&models, region, region_sets);
        if selectors.is_empty() {
            // Nothing served yet: look again soon.
            pause(stop, MODELS_CHECK).await;
            continue;
        }
        tracing::info!(
            consumer = %consumer_id,
            region = %region,
            models = ?models,
            concurrency,
            "{role} serving"
        );
        let config = ConsumerConfig::new(consumer_id.to_owned(), selectors)
            .with_concurrency(concurrency.max(1));
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
                tracing::debug!(consumer = %consumer_id, ?report, "{role} loop ended")
            }
            Err(error) => {
                tracing::error!(consumer = %consumer_id, %error, "{role} cannot run");
                pause(stop, Duration::from_secs(5)).await;
            }
        }
    }
}

/// Connects to Redis, retrying until it answers; `None` if the worker stops
/// first.
pub(crate) async fn connect(
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
                tracing::info!(key_prefix = %options.key_prefix, "queue connected");
                return Some(Arc::new(queue));
            }
            Err(error) => {
                tracing::warn!(key_prefix = %options.key_prefix, %error, "cannot connect to the queue; retrying");
            }
        }
        pause(stop, backoff.next_delay()).await;
    }
}

/// Sleeps for `duration`, or until `stop` changes.
pub(crate) async fn pause(stop: &mut watch::Receiver<bool>, duration: Duration) {
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

/// What running one job gave: the response or the failure (gRPC code and
/// message), and the version the request asked for ("" when it could not be
/// decoded).
struct Ran {
    result: Result<ModelInferResponse, (i32, String)>,
    requested_version: String,
}

/// Runs one job on the worker's own service.
pub(crate) async fn run_job(service: &WorkerService, job: Job) -> Outcome {
    match execute(service, &job).await.result {
        Ok(response) => Outcome::Ok(response.encode_to_vec().into()),
        Err((code, message)) => Outcome::error(code, message),
    }
}

async fn execute(service: &WorkerService, job: &Job) -> Ran {
    let failed = |code: i32, message: String, requested_version: &str| Ran {
        result: Err((code, message)),
        requested_version: requested_version.to_owned(),
    };
    let request = match ModelInferRequest::decode(job.payload.clone()) {
        Ok(request) => request,
        Err(error) => {
            return failed(
                codes::INVALID_ARGUMENT,
                format!("the job is not an encoded inference request: {error}"),
                "",
            );
        }
    };
    let requested_version = request.model_version.clone();
    if request.model_name != job.model() {
        return failed(
            codes::INVALID_ARGUMENT,
            format!(
                "the job on the stream of model '{}' asks for model '{}'",
                job.model(),
                request.model_name
            ),
            &requested_version,
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
                    return failed(
                        codes::DEADLINE_EXCEEDED,
                        "deadline exceeded before the worker could run the job".to_owned(),
                        &requested_version,
                    );
                }
            }
        }
        match service.model_infer(call).await {
            Ok(response) => {
                return Ran {
                    result: Ok(response.into_inner()),
                    requested_version,
                };
            }
            Err(status) if retriable(status.code()) && started.elapsed() < RETRY_WINDOW => {
                tracing::debug!(job = %job.id, %status, "async job deferred");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(status) => {
                return failed(
                    status.code() as i32,
                    status.message().to_owned(),
                    &requested_version,
                );
            }
        }
    }
}

/// Runs one job and records it (`inference.async_run`). Fail closed: the
/// job is not run while the spool is at its bound (see [`admitted`]), and
/// its result is not given when its record cannot be written.
async fn run_audited(
    service: &WorkerService,
    audit: &JobAudit,
    consumer_id: &str,
    job: Job,
    stopping: impl Fn() -> bool,
) -> Outcome {
    if let Err(backlog) = admitted(&audit.auditor, &job, stopping).await {
        tracing::warn!(job = %job.id, model = job.model(), %backlog, "async job not run: the audit backlog is full");
        return not_run(&backlog);
    }
    let started = Instant::now();
    let ran = execute(service, &job).await;
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let (outcome, event) = run_event(&audit.actor, consumer_id, &job, ran, latency_us);
    match audit.auditor.record(event) {
        Ok(()) => outcome,
        Err(backlog) => {
            tracing::warn!(job = %job.id, model = job.model(), %backlog, "async job result withheld: its audit record cannot be written");
            Outcome::error(
                Code::ResourceExhausted as i32,
                format!(
                    "the job's result is withheld: its audit record cannot be written ({backlog}); submit it again later"
                ),
            )
        }
    }
}

/// The answer of a job not run because the audit backlog is full.
fn not_run(backlog: &Backlog) -> Outcome {
    Outcome::error(
        Code::ResourceExhausted as i32,
        format!("the job was not run: {backlog}; submit it again later"),
    )
}

/// Waits until the auditor admits a job: at once unless the spool is at its
/// bound (fail closed). Meanwhile the job is held, not run: its entry stays
/// unacknowledged and touched, and the consumer's slot stays taken, so the
/// consumer takes no more jobs than it can record. Gives up (the backlog)
/// when the worker stops, or after [`RETRY_WINDOW`] or the job's deadline.
pub(crate) async fn admitted(
    auditor: &Auditor,
    job: &Job,
    stopping: impl Fn() -> bool,
) -> Result<(), Backlog> {
    let window = Instant::now() + RETRY_WINDOW;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let backlog = match auditor.admit() {
            Ok(()) => return Ok(()),
            Err(backlog) => backlog,
        };
        let delay = backoff.next_delay();
        let past_deadline = job
            .deadline
            .is_some_and(|deadline| SystemTime::now() + delay >= deadline);
        if stopping() || Instant::now() + delay >= window || past_deadline {
            return Err(backlog);
        }
        tokio::time::sleep(delay).await;
    }
}

/// The job's answer and its audit record.
fn run_event(
    actor: &str,
    consumer_id: &str,
    job: &Job,
    ran: Ran,
    latency_us: u64,
) -> (Outcome, AuditEvent) {
    let mut event = AuditEvent {
        action: ASYNC_RUN.to_owned(),
        actor: actor.to_owned(),
        model: truncate(job.model(), 256),
        region: job.region().to_owned(),
        worker: truncate(consumer_id, 256),
        request_id: job.id.to_string(),
        latency_us,
        request_sha256: sha256_hex(&job.payload),
        ..AuditEvent::default()
    };
    let outcome = match ran.result {
        Ok(response) => {
            let version = if response.model_version.is_empty() {
                ran.requested_version
            } else {
                response.model_version.clone()
            };
            let encoded = response.encode_to_vec();
            event.outcome = outcome_name(Code::Ok);
            event.version = truncate(&version, 256);
            event.response_sha256 = sha256_hex(&encoded);
            Outcome::Ok(encoded.into())
        }
        Err((code, message)) => {
            event.outcome = outcome_name(Code::from(code));
            event.version = truncate(&ran.requested_version, 256);
            event.reason = truncate(&message, 256);
            Outcome::error(code, message)
        }
    };
    (outcome, event)
}

/// `OK` -> `ok`, `InvalidArgument` -> `invalid_argument`: a record's
/// outcome, as the router writes it.
pub(crate) fn outcome_name(code: Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (index, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if index > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Counts a job in the worker's in-flight requests while it runs.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(crate) fn start(count: Arc<AtomicUsize>) -> InFlight {
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

    #[test]
    fn outcomes_are_snake_case_code_names() {
        assert_eq!(outcome_name(Code::Ok), "ok");
        assert_eq!(outcome_name(Code::InvalidArgument), "invalid_argument");
        assert_eq!(outcome_name(Code::ResourceExhausted), "resource_exhausted");
        assert_eq!(outcome_name(Code::DeadlineExceeded), "deadline_exceeded");
    }

    /// A request with tensor contents, encoded as the router queues it
    /// (`NewJob::new(stream, request.encode_to_vec())`).
    fn full_request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".to_owned(),
            model_version: "2".to_owned(),
            id: "caller-id".to_owned(),
            raw_input_contents: vec![vec![1u8, 2, 3, 4].into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_run_record_names_the_job_and_digests_its_payload() {
        use sha2::Digest;
        let request = full_request();
        let job = job("m", request.encode_to_vec().into(), None);
        // The router's `request_sha256` of the submission: SHA-256 of the
        // request's protobuf encoding, i.e. of the job's payload.
        let submitted = hex::encode(sha2::Sha256::digest(request.encode_to_vec()));

        let response = ModelInferResponse {
            model_name: "m".to_owned(),
            model_version: "3".to_owned(),
            ..Default::default()
        };
        let ran = Ran {
            result: Ok(response.clone()),
            requested_version: "2".to_owned(),
        };
        let (outcome, event) = run_event("service:cpu-worker", "c-1", &job, ran, 1234);
        let Outcome::Ok(bytes) = outcome else {
            panic!("expected the response")
        };
        assert_eq!(bytes, Bytes::from(response.encode_to_vec()));
        assert_eq!(event.action, ASYNC_RUN);
        assert_eq!(event.outcome, "ok");
        assert_eq!(event.actor, "service:cpu-worker");
        assert_eq!(
            (event.model.as_str(), event.version.as_str()),
            ("m", "3"),
            "the version that answered"
        );
        assert_eq!(
            (event.region.as_str(), event.worker.as_str()),
            ("local", "c-1")
        );
        assert_eq!(event.request_id, job.id.to_string());
        assert_eq!(event.latency_us, 1234);
        assert_eq!(event.request_sha256, submitted);
        assert_eq!(
            event.response_sha256,
            hex::encode(sha2::Sha256::digest(response.encode_to_vec()))
        );
        assert!(event.reason.is_empty());
        assert!(
            event.service.is_empty() && event.instance.is_empty(),
            "filled by the auditor"
        );

        // Without a version in the response: the one asked for.
        let ran = Ran {
            result: Ok(ModelInferResponse::default()),
            requested_version: "2".to_owned(),
        };
        assert_eq!(run_event("a", "c-1", &job, ran, 0).1.version, "2");

        let long = "x".repeat(300);
        let ran = Ran {
            result: Err((codes::INVALID_ARGUMENT, long.clone())),
            requested_version: "2".to_owned(),
        };
        let (outcome, event) = run_event("a", "c-1", &job, ran, 0);
        assert_eq!(error(outcome), (Code::InvalidArgument, long));
        assert_eq!(event.outcome, "invalid_argument");
        assert_eq!(event.version, "2");
        assert_eq!(event.reason.chars().count(), 256, "truncated");
        assert!(event.response_sha256.is_empty());
        assert_eq!(event.request_sha256, submitted);
    }

    /// A real auditor whose audit service is unreachable, with room for a
    /// single record: after one, its spool is at the bound.
    fn full_auditor(dir: &std::path::Path, on_full: shamal_audit_client::OnFull) -> Auditor {
        let config = shamal_audit_client::AuditClientConfig {
            // Nothing listens on port 1.
            endpoint: Some("127.0.0.1:1".to_owned()),
            spool_dir: dir.to_owned(),
            max_spool_bytes: 1,
            on_full,
            retry_min_ms: 1000,
            ..Default::default()
        };
        let auditor = Auditor::start(
            config,
            None,
            "cpu-worker",
            "c-1",
            &prometheus::Registry::new(),
        )
        .unwrap();
        auditor.record(AuditEvent::default()).unwrap();
        auditor
    }

    #[tokio::test]
    async fn fail_closed_a_full_audit_spool_keeps_jobs_from_running() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = full_auditor(dir.path(), shamal_audit_client::OnFull::FailClosed);
        let audit = JobAudit {
            auditor: auditor.clone(),
            actor: "service:cpu-worker".to_owned(),
        };
        let state = Arc::new(WorkerState::new("test"));
        let service = WorkerService::new(state.clone());
        // Run, the job would fail NOT_FOUND (no model): it is held until
        // its deadline instead, then answered naming the audit backlog.
        let started = Instant::now();
        let deadline = SystemTime::now() + Duration::from_millis(600);
        let (code, message) = error(
            run_audited(
                &service,
                &audit,
                "c-1",
                job("m", request("m"), Some(deadline)),
                || false,
            )
            .await,
        );
        assert_eq!(code, Code::ResourceExhausted, "{message}");
        assert!(
            message.contains("not run") && message.contains("audit backlog"),
            "{message}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "held while the deadline allowed: {:?}",
            started.elapsed()
        );
        assert_eq!(auditor.stats().spool_events, 1, "nothing recorded");

        // A stopping worker does not hold it.
        let started = Instant::now();
        let (code, _) = error(
            run_audited(
                &service,
                &audit,
                "c-1",
                job("m", request("m"), None),
                || true,
            )
            .await,
        );
        assert_eq!(code, Code::ResourceExhausted);
        assert!(started.elapsed() < Duration::from_millis(500));
        auditor.shutdown().await;
    }

    #[tokio::test]
    async fn fail_open_a_full_audit_spool_runs_jobs_and_counts_the_drop() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = full_auditor(dir.path(), shamal_audit_client::OnFull::FailOpen);
        let audit = JobAudit {
            auditor: auditor.clone(),
            actor: "service:cpu-worker".to_owned(),
        };
        let service = WorkerService::new(Arc::new(WorkerState::new("test")));
        let (code, _) = error(
            run_audited(
                &service,
                &audit,
                "c-1",
                job("m", request("m"), None),
                || false,
            )
            .await,
        );
        assert_eq!(code, Code::NotFound, "run: the worker has no such model");
        assert_eq!(auditor.stats().dropped, 1);
        auditor.shutdown().await;
    }

    #[test]
    fn a_disabled_audit_admits_everything() {
        let audit = JobAudit::disabled();
        assert!(!audit.auditor.is_enabled());
        assert!(audit.auditor.admit().is_ok());
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
