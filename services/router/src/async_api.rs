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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use prost::Message;
use serde_json::json;
use shamal_async_queue::{
    JobId, JobQueue, JobResult, JobStatus, NewJob, Outcome, QueueConfig, QueueError, RedisOptions,
    RedisQueue, StreamKey,
};
use shamal_error::ErrorKind;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse, ModelMetadataResponse};
use shamal_proto::shamal::r#async::v1::async_inference_server::AsyncInference;
use shamal_proto::shamal::r#async::v1::{AsyncResult, GetRequest, JobState, SubmitResponse};
use shamal_telemetry::register;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use crate::admission::Priority;
use crate::config::{AUTO_REGION, MEMORY_QUEUE, RouterConfig};
use crate::frontend::{CallContext, Frontend, pick_status};
use crate::http::{ModelPath, decode_infer_body, error_response};
use crate::http_json::{OutputEncoding, render_infer_response};
use crate::metrics::code_label;
use crate::pool::{PickError, RegionServing};
use crate::residency::{self, RegionPolicy};

/// How long a model's signature, read from a worker, is trusted for
/// checking submissions.
const SIGNATURE_TTL: Duration = Duration::from_secs(5);

/// Response header naming the state of a fetched job.
pub const STATE_HEADER: &str = "x-shamal-async-state";
/// Response header naming the worker that ran a finished job.
pub const WORKER_HEADER: &str = "x-shamal-async-worker";
/// Response header with the deliveries a finished job took.
pub const ATTEMPTS_HEADER: &str = "x-shamal-async-attempts";

/// Async settings of a router (from [`RouterConfig`]).
#[derive(Clone, Debug)]
pub struct AsyncSettings {
    pub result_ttl: Duration,
    pub job_timeout: Duration,
    /// Region of jobs without a residency policy; `None`: by capacity.
    pub default_region: Option<String>,
    pub max_backlog: u64,
    pub max_wait: Duration,
}

impl AsyncSettings {
    pub fn from_config(config: &RouterConfig) -> AsyncSettings {
        AsyncSettings {
            result_ttl: Duration::from_millis(config.async_result_ttl_ms),
            job_timeout: Duration::from_millis(config.async_job_timeout_ms),
            default_region: (config.async_region != AUTO_REGION)
                .then(|| config.async_region.clone()),
            max_backlog: config.max_async_backlog,
            max_wait: Duration::from_millis(config.async_max_wait_ms),
        }
    }

    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            result_ttl: self.result_ttl,
            ..QueueConfig::default()
        }
    }
}

#[derive(Clone)]
struct AsyncMetrics {
    submitted: IntCounterVec,
    refused: IntCounterVec,
    backlog: IntGaugeVec,
    fetched: IntCounterVec,
}

impl AsyncMetrics {
    fn new(registry: &Registry) -> AsyncMetrics {
        let build = || -> prometheus::Result<AsyncMetrics> {
            Ok(AsyncMetrics {
                submitted: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_async_submitted_total",
                            "Async inference jobs queued by this router, per model.",
                        ),
                        &["model"],
                    )?,
                ),
                refused: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_async_backlog_full_total",
                            "Async submissions refused because the stream's backlog was at max_async_backlog.",
                        ),
                        &["model"],
                    )?,
                ),
                backlog: register(
                    registry,
                    IntGaugeVec::new(
                        Opts::new(
                            "shamal_router_async_backlog",
                            "Async jobs waiting or running (lag + pending) per stream, refreshed every second.",
                        ),
                        &["model", "region"],
                    )?,
                ),
                fetched: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_async_results_fetched_total",
                            "Finished async jobs answered to a fetch, by the job's gRPC code.",
                        ),
                        &["code"],
                    )?,
                ),
            })
        };
        match build() {
            Ok(metrics) => metrics,
            Err(error) => panic!("invalid async metric definition: {error}"),
        }
    }
}

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

/// A model (version)'s metadata and when it was read.
type CachedSignature = (Instant, Arc<ModelMetadataResponse>);

/// The async inference service of a router.
pub struct AsyncApi {
    frontend: Arc<Frontend>,
    queue: QueueSlot,
    settings: AsyncSettings,
    metrics: AsyncMetrics,
    signatures: Mutex<HashMap<(String, String), CachedSignature>>,
    /// Set when the router shuts down: long polls answer at once.
    stop: watch::Receiver<bool>,
}

/// Background tasks of the async service; abort them on shutdown.
pub struct AsyncTasks(Vec<JoinHandle<()>>);

impl AsyncTasks {
    pub fn abort(self) {
        for task in self.0 {
            task.abort();
        }
    }
}

/// A queue error's answer, by the one error table: a bad argument is the
/// caller's; anything else (Redis unreachable or failing, data it cannot
/// read) means the async API cannot serve now.
fn queue_status(error: &QueueError) -> Status {
    match error {
        QueueError::Invalid { .. } => ErrorKind::InvalidArgument.status(error.to_string()),
        _ => ErrorKind::Unavailable.status(format!("async queue: {error}")),
    }
}

impl AsyncApi {
    /// Starts the async service when `provided` (a queue shared with
    /// in-process workers) is given or `async_queue` is configured; `None`
    /// otherwise.
    pub fn start(
        config: &RouterConfig,
        frontend: Arc<Frontend>,
        registry: &Registry,
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
            frontend,
            queue: slot,
            settings,
            metrics: AsyncMetrics::new(registry),
            signatures: Mutex::new(HashMap::new()),
            stop,
        });
        let mut tasks = Vec::new();
        if let Some(options) = redis {
            tasks.push(tokio::spawn(connect(api.clone(), options)));
        }
        tasks.push(tokio::spawn(export_backlog(api.clone())));
        Ok(Some((api, AsyncTasks(tasks))))
    }

    pub fn settings(&self) -> &AsyncSettings {
        &self.settings
    }

    /// Checks and queues an inference request; returns the job's id.
    pub async fn submit(
        &self,
        mut request: ModelInferRequest,
        context: &CallContext,
    ) -> Result<JobId, Status> {
        if request.model_name.is_empty() {
            return Err(Status::invalid_argument("model name must not be empty"));
        }
        let priority = Priority::of(&request.parameters)?;
        let policy = self.frontend.region_policy(&request, context)?;
        if let Some(routing) = self.frontend.registry() {
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
        let mut job =
            NewJob::new(stream, request.encode_to_vec()).with_timeout(self.settings.job_timeout);
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
        Ok(queued.id)
    }

    /// The region whose stream a job of `model` goes to.
    fn choose_region(
        &self,
        model: &str,
        version: &str,
        policy: Option<&RegionPolicy>,
    ) -> Result<String, Status> {
        let serving = self.frontend.pool.regions_serving(model, version);
        choose_region(
            &serving,
            policy,
            self.settings.default_region.as_deref(),
            model,
            version,
        )
    }

    /// Decodes the request's tensors and checks them against the model's
    /// signature (as a worker would: names, datatypes, shapes), so that a
    /// malformed request is refused now rather than failing later in the
    /// queue. A signature that cannot be read skips the second check (the
    /// worker still makes it).
    async fn check_tensors(
        &self,
        request: &ModelInferRequest,
        context: &CallContext,
    ) -> Result<(), Status> {
        let tensors = shamal_tensor::decode_inputs(
            request.inputs.clone(),
            request.raw_input_contents.clone(),
        )
        .map_err(|error| shamal_rpc::codec_status(&error))?;
        let signature = match self
            .signature(&request.model_name, &request.model_version, context)
            .await
        {
            Ok(signature) => signature,
            Err(status) if status.code() == Code::NotFound => return Err(status),
            Err(status) => {
                tracing::debug!(model = %request.model_name, %status, "signature unavailable; tensors checked by the worker");
                return Ok(());
            }
        };
        let inputs: Vec<InputShape<'_>> = tensors
            .iter()
            .map(|tensor| {
                (
                    tensor.name.as_str(),
                    tensor.datatype.as_str(),
                    tensor.shape.as_slice(),
                )
            })
            .collect();
        let outputs: Vec<&str> = request
            .outputs
            .iter()
            .map(|output| output.name.as_str())
            .collect();
        check_signature(&signature, &request.model_name, &inputs, &outputs)
    }

    async fn signature(
        &self,
        model: &str,
        version: &str,
        context: &CallContext,
    ) -> Result<Arc<ModelMetadataResponse>, Status> {
        let key = (model.to_owned(), version.to_owned());
        if let Some((read, signature)) = self
            .signatures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            && read.elapsed() < SIGNATURE_TTL
        {
            return Ok(signature.clone());
        }
        let metadata = Arc::new(
            self.frontend
                .model_metadata(model, version, context)
                .await?,
        );
        let mut cache = self
            .signatures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Bounded by the models and versions workers serve; stale entries
        // are dropped as they are replaced or when the cache grows.
        if cache.len() > 1024 {
            cache.retain(|_, (read, _)| read.elapsed() < SIGNATURE_TTL);
        }
        cache.insert(key, (Instant::now(), metadata.clone()));
        Ok(metadata)
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

/// Hides a password in a Redis URL for logs and messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Connects to Redis, retrying until it answers (or the router stops).
async fn connect(api: Arc<AsyncApi>, options: RedisOptions) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match RedisQueue::connect(options.clone(), api.settings.queue_config()).await {
            Ok(queue) => {
                tracing::info!(queue = %api.queue.description, "async queue connected");
                let _ = api.queue.queue.set(Arc::new(queue));
                return;
            }
            Err(error) => {
                tracing::warn!(queue = %api.queue.description, %error, "cannot connect to the async queue; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Exports every stream's backlog (lag + pending) each second.
async fn export_backlog(api: Arc<AsyncApi>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(queue) = api.queue.queue.get() else {
            continue;
        };
        let streams = match queue.streams().await {
            Ok(streams) => streams,
            Err(error) => {
                tracing::debug!(%error, "async backlog: cannot list streams");
                continue;
            }
        };
        for stream in streams {
            match queue.backlog(&stream).await {
                Ok(backlog) => api
                    .metrics
                    .backlog
                    .with_label_values(&[stream.model(), stream.region()])
                    .set(i64::try_from(backlog.lag + backlog.pending).unwrap_or(i64::MAX)),
                Err(error) => {
                    tracing::debug!(%error, %stream, "async backlog: cannot read");
                }
            }
        }
    }
}

/// Chooses a job's region among those where workers serve the model (see
/// the module documentation). NOT_FOUND when no worker serves the model
/// (or version); FAILED_PRECONDITION, naming the policy, when none does in
/// a region the policy allows (or in `async_region`).
pub fn choose_region(
    serving: &BTreeMap<String, RegionServing>,
    policy: Option<&RegionPolicy>,
    default_region: Option<&str>,
    model: &str,
    version: &str,
) -> Result<String, Status> {
    if serving.is_empty() {
        return Err(pick_status(PickError::UnknownModel, model, version));
    }
    let allowed: Vec<(&String, &RegionServing)> = serving
        .iter()
        .filter(|(region, _)| policy.is_none_or(|policy| policy.allows(region)))
        .collect();
    if let Some(policy) = policy
        && allowed.is_empty()
    {
        return Err(residency::no_worker_in_region(model, policy));
    }
    if let Some(region) = default_region {
        if allowed
            .iter()
            .any(|(candidate, _)| candidate.as_str() == region)
        {
            return Ok(region.to_owned());
        }
        if policy.is_none() {
            return Err(Status::failed_precondition(format!(
                "no worker serves model '{model}' in region '{region}' (the router's async_region)"
            )));
        }
    }
    // Most healthy capacity, then most workers; ties go to the first name.
    let best = allowed.iter().fold(
        None,
        |best: Option<&(&String, &RegionServing)>, candidate| match best {
            Some(current)
                if (current.1.healthy_capacity, current.1.workers)
                    >= (candidate.1.healthy_capacity, candidate.1.workers) =>
            {
                Some(current)
            }
            _ => Some(candidate),
        },
    );
    best.map(|(region, _)| (*region).clone())
        .ok_or_else(|| pick_status(PickError::UnknownModel, model, version))
}

/// An input as the signature check sees it: name, datatype, shape.
pub type InputShape<'a> = (&'a str, &'a str, &'a [i64]);

/// Checks decoded inputs and requested outputs against a model's metadata,
/// with the worker's messages. Never stricter than the worker: the first
/// dimension is not compared (the metadata does not say whether the model
/// batches).
pub fn check_signature(
    signature: &ModelMetadataResponse,
    model: &str,
    inputs: &[InputShape<'_>],
    outputs: &[&str],
) -> Result<(), Status> {
    for spec in &signature.inputs {
        let Some((_, datatype, shape)) = inputs.iter().find(|(name, ..)| *name == spec.name) else {
            return Err(Status::invalid_argument(format!(
                "missing input '{}' for model '{model}'",
                spec.name
            )));
        };
        if *datatype != spec.datatype {
            return Err(Status::invalid_argument(format!(
                "input '{}': datatype {datatype} does not match the model's {}",
                spec.name, spec.datatype
            )));
        }
        let shape_ok = shape.len() == spec.shape.len()
            && shape
                .iter()
                .zip(&spec.shape)
                .skip(1)
                .all(|(&got, &want)| want < 0 || got == want);
        if !shape_ok {
            return Err(Status::invalid_argument(format!(
                "input '{}': shape {shape:?} does not match the model's {:?}",
                spec.name, spec.shape
            )));
        }
    }
    if let Some((extra, ..)) = inputs
        .iter()
        .find(|(name, ..)| !signature.inputs.iter().any(|spec| spec.name == *name))
    {
        let expected: Vec<&str> = signature
            .inputs
            .iter()
            .map(|spec| spec.name.as_str())
            .collect();
        return Err(Status::invalid_argument(format!(
            "unknown input '{extra}' for model '{model}' (inputs: {})",
            expected.join(", ")
        )));
    }
    if let Some(extra) = outputs
        .iter()
        .find(|name| !signature.outputs.iter().any(|spec| spec.name == **name))
    {
        return Err(Status::invalid_argument(format!(
            "unknown output '{extra}' for model '{model}'"
        )));
    }
    Ok(())
}

fn not_configured() -> Status {
    Status::unimplemented(
        "async inference is not enabled on this router (set async_queue to a redis:// URL)",
    )
}

// ----- HTTP -----------------------------------------------------------

/// State of the async HTTP routes.
#[derive(Clone)]
pub struct AsyncHttp {
    pub frontend: Arc<Frontend>,
    pub api: Option<Arc<AsyncApi>>,
}

/// `POST /v2/models/{m}[/versions/{v}]/infer/async` and
/// `GET /v2/async/{id}`.
pub fn routes(state: AsyncHttp) -> Router {
    use axum::routing::{get, post};
    Router::new()
        .route("/v2/models/{model}/infer/async", post(submit_http))
        .route(
            "/v2/models/{model}/versions/{version}/infer/async",
            post(submit_http),
        )
        .route("/v2/async/{id}", get(fetch_http))
        .with_state(state)
}

async fn submit_http(
    State(state): State<AsyncHttp>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(api) = &state.api else {
        return error_response(&not_configured());
    };
    let (request, _encoding) = match decode_infer_body(&model, &version, &headers, body) {
        Ok(decoded) => decoded,
        Err(response) => return response,
    };
    let mut context = crate::http::context(&state.frontend, &headers);
    // Residency and sticky-routing headers travel along.
    context.headers = headers;
    match api.submit(request, &context).await {
        Ok(id) => {
            let status_url = format!("/v2/async/{id}");
            let mut response = (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id.as_str(), "status_url": status_url })),
            )
                .into_response();
            if let Ok(location) = HeaderValue::from_str(&status_url) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(status) => error_response(&status),
    }
}

fn query_flag(query: &HashMap<String, String>, name: &str) -> Result<bool, Status> {
    match query.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(Status::invalid_argument(format!(
            "query parameter '{name}' must be true or false, not '{other}'"
        ))),
    }
}

async fn fetch_http(
    State(state): State<AsyncHttp>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(api) = &state.api else {
        return error_response(&not_configured());
    };
    let wait = match query.get("wait_ms").map(|text| text.trim().parse::<u64>()) {
        None => Duration::ZERO,
        Some(Ok(ms)) => Duration::from_millis(ms),
        Some(Err(_)) => {
            return error_response(&Status::invalid_argument(
                "query parameter 'wait_ms' must be a number of milliseconds",
            ));
        }
    };
    let binary = match query_flag(&query, "binary_data_output") {
        Ok(binary) => binary,
        Err(status) => return error_response(&status),
    };
    let fetched = match api.fetch(&id, wait).await {
        Ok(fetched) => fetched,
        Err(status) => return error_response(&status),
    };
    let (mut response, state_label, worker, attempts) = match fetched {
        Fetched::Pending {
            running,
            worker,
            attempts,
        } => {
            let label = if running { "running" } else { "queued" };
            let response = (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "status": label })),
            )
                .into_response();
            (response, label, worker, attempts)
        }
        Fetched::Done {
            outcome,
            worker,
            attempts,
        } => {
            let response = match outcome {
                Ok(inference) => render(inference, &OutputEncoding::uniform(binary)),
                Err(status) => error_response(&status),
            };
            (response, "done", worker, attempts)
        }
    };
    let headers = response.headers_mut();
    headers.insert(STATE_HEADER, HeaderValue::from_static(state_label));
    if !worker.is_empty()
        && let Ok(value) = HeaderValue::from_str(&worker)
    {
        headers.insert(WORKER_HEADER, value);
    }
    if attempts > 0 {
        headers.insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
    }
    response
}

/// An inference response as the synchronous HTTP endpoint renders it.
fn render(response: ModelInferResponse, encoding: &OutputEncoding) -> Response {
    match render_infer_response(response, encoding) {
        Ok((body, None)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Ok((body, Some(length))) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::HeaderName::from_static(crate::http::HEADER_LENGTH),
                    length.to_string(),
                ),
            ],
            body,
        )
            .into_response(),
        Err(message) => error_response(&Status::internal(format!(
            "malformed worker response: {message}"
        ))),
    }
}

// ----- gRPC -----------------------------------------------------------

/// `shamal.async.v1.AsyncInference`, served next to the inference service.
#[derive(Clone)]
pub struct AsyncService {
    frontend: Arc<Frontend>,
    api: Option<Arc<AsyncApi>>,
}

impl AsyncService {
    pub fn new(frontend: Arc<Frontend>, api: Option<Arc<AsyncApi>>) -> AsyncService {
        AsyncService { frontend, api }
    }

    fn api(&self) -> Result<&Arc<AsyncApi>, Status> {
        self.api.as_ref().ok_or_else(not_configured)
    }
}

#[tonic::async_trait]
impl AsyncInference for AsyncService {
    async fn submit(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<SubmitResponse>, Status> {
        let api = self.api()?;
        let (metadata, _, message) = request.into_parts();
        let context = CallContext {
            request_id: shamal_rpc::request_id(&metadata),
            deadline: self
                .frontend
                .deadline(Instant::now(), shamal_rpc::request_timeout(&metadata)),
            protocol: "grpc",
            headers: metadata.into_headers(),
        };
        let id = api.submit(message, &context).await?;
        let mut response = tonic::Response::new(SubmitResponse { id: id.to_string() });
        shamal_rpc::set_request_id(response.metadata_mut(), &context.request_id);
        Ok(response)
    }

    async fn get(
        &self,
        request: tonic::Request<GetRequest>,
    ) -> Result<tonic::Response<AsyncResult>, Status> {
        let api = self.api()?;
        // Answer before the caller's own deadline passes.
        let caller_timeout = shamal_rpc::request_timeout(request.metadata());
        let request = request.into_inner();
        let mut wait = Duration::from_millis(u64::from(request.wait_ms));
        if let Some(timeout) = caller_timeout {
            wait = wait.min(timeout.saturating_sub(Duration::from_millis(50)));
        }
        let mut result = AsyncResult {
            id: request.id.clone(),
            ..AsyncResult::default()
        };
        match api.fetch(&request.id, wait).await? {
            Fetched::Pending {
                running,
                worker,
                attempts,
            } => {
                result.set_state(if running {
                    JobState::Running
                } else {
                    JobState::Queued
                });
                result.worker = worker;
                result.attempts = attempts;
            }
            Fetched::Done {
                outcome,
                worker,
                attempts,
            } => {
                result.set_state(JobState::Done);
                result.worker = worker;
                result.attempts = attempts;
                match outcome {
                    Ok(response) => result.response = Some(response),
                    Err(status) => {
                        result.code = status.code() as i32;
                        result.message = status.message().to_owned();
                    }
                }
            }
        }
        Ok(tonic::Response::new(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shamal_proto::inference::model_metadata_response::TensorMetadata;

    fn serving(regions: &[(&str, usize, u64)]) -> BTreeMap<String, RegionServing> {
        regions
            .iter()
            .map(|(region, workers, capacity)| {
                (
                    (*region).to_owned(),
                    RegionServing {
                        workers: *workers,
                        healthy_workers: *workers,
                        healthy_capacity: *capacity,
                    },
                )
            })
            .collect()
    }

    fn policy(regions: &[&str]) -> RegionPolicy {
        residency::combine(
            Some(regions.iter().map(|region| (*region).to_owned()).collect()),
            None,
            None,
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn region_follows_policy_then_capacity() {
        let regions = serving(&[("eu", 1, 8), ("me", 2, 64), ("us", 1, 32)]);
        // No policy: the most capacity.
        assert_eq!(choose_region(&regions, None, None, "m", "").unwrap(), "me");
        // A policy narrows, capacity decides among what it allows.
        let allowed = policy(&["eu", "us"]);
        assert_eq!(
            choose_region(&regions, Some(&allowed), None, "m", "").unwrap(),
            "us"
        );
        // A configured default region wins when allowed.
        assert_eq!(
            choose_region(&regions, Some(&allowed), Some("eu"), "m", "").unwrap(),
            "eu"
        );
        assert_eq!(
            choose_region(&regions, None, Some("eu"), "m", "").unwrap(),
            "eu"
        );
        // ... and is ignored for a policy that does not allow it.
        assert_eq!(
            choose_region(&regions, Some(&allowed), Some("me"), "m", "").unwrap(),
            "us"
        );
        // No worker in an allowed region: refused, naming the policy.
        let status = choose_region(&regions, Some(&policy(&["ap"])), None, "m", "").unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("request allows [ap]"), "{status}");
        // A default region without workers, and no policy: refused.
        let status = choose_region(&regions, None, Some("ap"), "m", "").unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("async_region"), "{status}");
        // No worker at all: unknown model.
        let status = choose_region(&BTreeMap::new(), None, None, "m", "").unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        // Ties go to the first name.
        let regions = serving(&[("b", 1, 8), ("a", 1, 8)]);
        assert_eq!(choose_region(&regions, None, None, "m", "").unwrap(), "a");
    }

    #[test]
    fn signature_check_names_the_tensor_and_spares_the_batch_dimension() {
        let tensor = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape: shape.to_vec(),
        };
        let signature = ModelMetadataResponse {
            name: "simple".into(),
            versions: vec!["1".into()],
            platform: "onnxruntime_onnx".into(),
            inputs: vec![
                tensor("INPUT0", "INT32", &[1, 16]),
                tensor("INPUT1", "INT32", &[-1, 16]),
            ],
            outputs: vec![tensor("OUTPUT0", "INT32", &[-1, 16])],
        };
        let good: [(&str, &str, &[i64]); 2] =
            [("INPUT0", "INT32", &[4, 16]), ("INPUT1", "INT32", &[4, 16])];
        check_signature(&signature, "simple", &good, &["OUTPUT0"]).unwrap();
        type Case<'a> = (&'a [InputShape<'a>], &'a [&'a str], &'a str);
        let cases: [Case; 5] = [
            (&good[..1], &[], "missing input 'INPUT1'"),
            (
                &[("INPUT0", "FP32", &[1, 16]), good[1]],
                &[],
                "input 'INPUT0': datatype FP32",
            ),
            (
                &[("INPUT0", "INT32", &[1, 8]), good[1]],
                &[],
                "input 'INPUT0': shape [1, 8]",
            ),
            (
                &[good[0], good[1], ("EXTRA", "INT32", &[1])],
                &[],
                "unknown input 'EXTRA'",
            ),
            (&good, &["NOPE"], "unknown output 'NOPE'"),
        ];
        for (inputs, outputs, expected) in cases {
            let status = check_signature(&signature, "simple", inputs, outputs).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains(expected), "{status}");
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted("redis://user:secret@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(redacted("redis://redis:6379"), "redis://redis:6379");
    }
}
