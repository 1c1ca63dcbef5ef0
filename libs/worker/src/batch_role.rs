//! The batch role: the worker scores shards of batch inference jobs taken
//! from the batch queue, on instances of its models of their own, so that a
//! shard is never queued behind or in front of real-time requests.
//!
//! # The queue
//!
//! The batch queue is an async queue ([`JobQueue`]) of its own (Redis key
//! prefix `shamal:batch` by default, or the `MemoryQueue` an embedding
//! program shares). The worker consumes, with [`run_consumer`], the streams
//! of the models it has ready whose region is its own or a region set
//! holding it (`eu+uae`, [`shamal_async_queue::region_set`]): a shard is
//! never taken outside the regions its job allows, since the coordinator
//! queues a job's shards on the stream of exactly its region set.
//!
//! An entry's payload is a protobuf [`ShardTask`]; its result is a protobuf
//! [`ShardResult`] (`Outcome::Ok`), or the gRPC code and a message naming the
//! shard (`Outcome::Err`):
//!
//! - a payload that does not decode, or whose `shard_json` is not a shard:
//!   `INVALID_ARGUMENT`;
//! - a model or version the worker does not have ready (version 0: the
//!   newest ready one), or `encrypt` set on a worker without a key ring
//!   (`batch.key_file`; nothing is written unencrypted), or a `key_id` its
//!   ring does not hold: `FAILED_PRECONDITION`;
//! - bad data (a missing column, a corrupt file, a row that does not fit
//!   its input, naming column and row): `INVALID_ARGUMENT`; the input that
//!   cannot be read: `UNAVAILABLE`; the part that cannot be written, the
//!   model failing: `INTERNAL`.
//!
//! The part (`part-<shard_index>.parquet` in the task's `output`, the key
//! columns then the model's outputs; `part-<shard_index>.parquet.enc`
//! encrypted under the ring's active key, or the task's `key_id`, when the
//! task asks) is written under a temporary name and renamed into place, or
//! uploaded whole, by [`PartWriter`], so a shard run again replaces its
//! part and a failed run leaves nothing. A part is never put into a
//! finished output (one with `_SUCCESS`): such a run, a duplicate the
//! coordinator does not follow, answers `FAILED_PRECONDITION` and leaves
//! the listed part as it is.
//!
//! # Long shards and dead workers
//!
//! [`run_consumer`] touches the entries it holds every third of the queue's
//! `min_idle` while their shards run (its loop and the shards' tasks are
//! asynchronous; the model computes on the instance's own thread), so a
//! shard running for minutes is not reclaimed from a live worker. A worker
//! that dies stops touching: after `min_idle` another worker reclaims the
//! entry and scores the shard again, replacing any part; after the queue's
//! `max_attempts` deliveries the queue answers `ABORTED`.
//!
//! # Instances
//!
//! Shards never go through the dynamic batcher of the gRPC service. A
//! version's batch instance is created from the version's model file on the
//! version's first shard (with the model's parameters, overridden by
//! [`BatchRole::instance_parameters`]: the cpu-worker's intra-op threads),
//! computes on a thread of its own, and is dropped once it has been idle
//! for [`BatchRole::idle_unload`] (or its version is unloaded), so an idle
//! worker holds no memory for batch. Up to `concurrency` shards run at once,
//! each on an instance of its own.
//!
//! # Audit
//!
//! Every shard run is recorded (action `batch.shard`, `request_id`
//! `<job_id>/<shard_index>`, model, version, region, worker, outcome, run
//! time, reason on failure, `after_json` `{"rows", "part", "sha256"}`), fail
//! closed as the async consumer's jobs: a shard waits while the audit spool
//! is at its bound, and a result whose record cannot be written is withheld
//! (`RESOURCE_EXHAUSTED`, the coordinator tries the shard again).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::ArrayRef;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use prost::Message;
use shamal_async_queue::{Job, JobQueue, Outcome, codes};
use shamal_audit_client::{AuditEvent, sha256_hex};
use shamal_batch_io::{
    KeyRing, ModelInput, Output, PartEncryption, PartInfo, PartWriter, RowOrigin, SUCCESS_FILE,
    Shard, input_tensors, read_shard, tensors_to_columns,
};
use shamal_error::code_label;
use shamal_proto::shamal::batch::v1::{ShardResult, ShardTask};
use shamal_telemetry::MetricsRegistry;
use shamal_tensor::{Tensor, TensorData};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::async_consumer::{
    InFlight, JobAudit, QueueSource, Streams, admitted, connect, consume_ready_models,
    outcome_name, pause, stopping, truncate,
};
use crate::backend::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime};
use crate::repository::{Lookup, ModelVersion};
use crate::service::{WorkerState, prepare_inputs};

/// The action of a shard's run in the audit log.
pub const BATCH_SHARD: &str = "batch.shard";

/// Default prefix of the batch queue's Redis keys.
pub const DEFAULT_KEY_PREFIX: &str = "shamal:batch";

/// Default time a batch instance is kept after its last shard.
pub const DEFAULT_IDLE_UNLOAD: Duration = Duration::from_secs(60);

/// Rows per execution when the task names none.
const DEFAULT_BATCH_SIZE: usize = 256;

/// The batch role's settings.
#[derive(Clone)]
pub struct BatchRole {
    pub queue: QueueSource,
    /// Region whose streams the worker consumes; `None`: the region of the
    /// registry follow settings, `local` without a registry.
    pub region: Option<String>,
    /// Consumer name, unique per live worker; `None`: as the async
    /// consumer's (the registry worker id, else `<server name>-<host
    /// name>-<gRPC port>`).
    pub consumer_id: Option<String>,
    /// Shards scored at once (at least 1), each on an instance of its own.
    pub concurrency: usize,
    /// Parameters of the batch instances, over the model's own (the
    /// cpu-worker sets `intra_op_thread_count` from `batch.threads`).
    pub instance_parameters: HashMap<String, String>,
    /// A batch instance unused this long is dropped.
    pub idle_unload: Duration,
    /// S3 settings over the environment's for `s3://` inputs and outputs
    /// (`batch.s3_*`); `None`: the environment's (or the embedding
    /// program's).
    pub s3: Option<shamal_batch_io::S3Options>,
    /// The key ring output parts are encrypted under when a task asks
    /// (`batch.key_file`); `None`: such tasks are refused.
    pub keys: Option<Arc<KeyRing>>,
}

impl fmt::Debug for BatchRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchRole")
            .field("queue", &self.queue)
            .field("region", &self.region)
            .field("consumer_id", &self.consumer_id)
            .field("concurrency", &self.concurrency)
            .field("instance_parameters", &self.instance_parameters)
            .field("idle_unload", &self.idle_unload)
            .field("s3", &self.s3)
            .field("keys", &self.keys)
            .finish()
    }
}

impl BatchRole {
    pub fn new(queue: QueueSource) -> BatchRole {
        BatchRole {
            queue,
            region: None,
            consumer_id: None,
            concurrency: 1,
            instance_parameters: HashMap::new(),
            idle_unload: DEFAULT_IDLE_UNLOAD,
            s3: None,
            keys: None,
        }
    }
}

/// Who the batch consumer is, resolved when the worker starts serving.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub region: String,
    pub consumer_id: String,
}

#[derive(Clone)]
struct BatchMetrics {
    shards: IntCounterVec,
    rows: IntCounterVec,
    duration: HistogramVec,
    instances: IntGauge,
}

impl BatchMetrics {
    fn new(registry: &MetricsRegistry, backend: &str) -> prometheus::Result<BatchMetrics> {
        let shards = IntCounterVec::new(
            Opts::new(
                "shamal_worker_batch_shards_total",
                "Batch shards run by this worker, by model and gRPC code of the result.",
            )
            .const_label("backend", backend),
            &["model", "code"],
        )?;
        let rows = IntCounterVec::new(
            Opts::new(
                "shamal_worker_batch_rows_total",
                "Rows scored and written by this worker's batch role, by model.",
            )
            .const_label("backend", backend),
            &["model"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "shamal_worker_batch_shard_duration_seconds",
                "Time a shard took on this worker (reading, scoring, writing), by model and code.",
            )
            .const_label("backend", backend)
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
            &["model", "code"],
        )?;
        let instances = IntGauge::with_opts(
            Opts::new(
                "shamal_worker_batch_instances",
                "Model instances this worker holds for batch shards (dropped when idle).",
            )
            .const_label("backend", backend),
        )?;
        Ok(BatchMetrics {
            shards: shamal_telemetry::register(registry, shards)?,
            rows: shamal_telemetry::register(registry, rows)?,
            duration: shamal_telemetry::register(registry, duration)?,
            instances: shamal_telemetry::register(registry, instances)?,
        })
    }
}

/// Everything the batch consumer needs from the worker.
pub(crate) struct Consumer {
    pub settings: BatchRole,
    pub identity: Identity,
    pub state: Arc<WorkerState>,
    pub runtime: Arc<dyn Runtime>,
    /// The worker's in-flight count (heartbeat load): shards count too.
    pub inflight: Arc<AtomicUsize>,
    pub audit: JobAudit,
}

/// Starts the batch consumer; it returns once `stop` is set (or the worker
/// drains) and the shards it held are finished.
pub(crate) fn spawn(
    consumer: Consumer,
    registry: &MetricsRegistry,
    backend: &str,
    stop: watch::Receiver<bool>,
) -> prometheus::Result<JoinHandle<()>> {
    let metrics = BatchMetrics::new(registry, backend)?;
    if let Some(options) = &consumer.settings.s3 {
        shamal_batch_io::configure_s3(options.clone());
    }
    Ok(tokio::spawn(supervise(consumer, metrics, stop)))
}

/// What a shard needs besides its task.
struct Context {
    state: Arc<WorkerState>,
    pool: Arc<Pool>,
    identity: Identity,
    keys: Option<Arc<KeyRing>>,
}

async fn supervise(consumer: Consumer, metrics: BatchMetrics, mut stop: watch::Receiver<bool>) {
    let Consumer {
        settings,
        identity,
        state,
        runtime,
        inflight,
        audit,
    } = consumer;
    let queue: Arc<dyn JobQueue> = match settings.queue {
        QueueSource::Shared(queue) => queue,
        QueueSource::Redis { options, config } => {
            match connect(options, config, &state, &mut stop).await {
                Some(queue) => queue,
                None => return,
            }
        }
    };
    let pool = Arc::new(Pool {
        runtime,
        parameters: settings.instance_parameters.clone(),
        idle: Mutex::new(HashMap::new()),
        instances: metrics.instances.clone(),
    });
    let janitor = tokio::spawn(janitor(
        pool.clone(),
        state.clone(),
        settings.idle_unload,
        stop.clone(),
    ));
    let context = Arc::new(Context {
        state: state.clone(),
        pool: pool.clone(),
        identity: identity.clone(),
        keys: settings.keys.clone(),
    });
    let handler = {
        let metrics = metrics.clone();
        let state = state.clone();
        let stop = stop.clone();
        move |job: Job| {
            let context = context.clone();
            let metrics = metrics.clone();
            let audit = audit.clone();
            let state = state.clone();
            let stop = stop.clone();
            let guard = InFlight::start(inflight.clone());
            async move {
                let _guard = guard;
                let model = job.model().to_owned();
                let started = Instant::now();
                let outcome = if audit.auditor.is_enabled() {
                    run_audited(&context, &audit, job, || stopping(&state, &stop)).await
                } else {
                    run_shard(&context, &job).await.outcome()
                };
                let code = match &outcome {
                    Outcome::Ok(_) => Code::Ok,
                    Outcome::Err { code, .. } => Code::from(*code),
                };
                let labels = [model.as_str(), code_label(code)];
                metrics.shards.with_label_values(&labels).inc();
                metrics
                    .duration
                    .with_label_values(&labels)
                    .observe(started.elapsed().as_secs_f64());
                if let Outcome::Ok(bytes) = &outcome
                    && let Ok(result) = ShardResult::decode(bytes.clone())
                {
                    metrics
                        .rows
                        .with_label_values(&[model.as_str()])
                        .inc_by(result.rows);
                }
                outcome
            }
        }
    };
    let handler = Arc::new(handler);
    let streams = Streams {
        consumer_id: &identity.consumer_id,
        region: &identity.region,
        concurrency: settings.concurrency,
        role: "batch role",
        region_sets: true,
    };
    consume_ready_models(queue, &state, &mut stop, streams, handler).await;
    janitor.abort();
    pool.clear();
}

/// Drops batch instances idle for `idle_unload`, and those of versions no
/// longer ready.
async fn janitor(
    pool: Arc<Pool>,
    state: Arc<WorkerState>,
    idle_unload: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = (idle_unload / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        pause(&mut stop, every).await;
        pool.evict(idle_unload, &state);
        if *stop.borrow() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Instances

type Work = Box<dyn FnOnce(&mut dyn Backend) + Send>;

/// A batch instance: a backend on a thread of its own. The thread ends, and
/// the backend is dropped, when the instance is.
struct Instance {
    sender: std::sync::mpsc::Sender<Work>,
    /// Cleared when a piece of work panicked: the instance is not reused.
    healthy: Arc<AtomicBool>,
    gauge: IntGauge,
}

impl Instance {
    fn start(name: String, backend: Box<dyn Backend>, gauge: IntGauge) -> std::io::Result<Self> {
        let (sender, receiver) = std::sync::mpsc::channel::<Work>();
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            let mut backend = backend;
            while let Ok(work) = receiver.recv() {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    work(backend.as_mut())
                }));
                if ran.is_err() {
                    flag.store(false, Ordering::SeqCst);
                    return;
                }
            }
        })?;
        gauge.inc();
        Ok(Instance {
            sender,
            healthy,
            gauge,
        })
    }

    /// Runs `work` on the instance's thread.
    async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut dyn Backend) -> R + Send + 'static,
    ) -> Result<R, BackendError> {
        let (sender, receiver) = oneshot::channel();
        let stopped = || BackendError::Internal("the batch instance's thread stopped".to_owned());
        self.sender
            .send(Box::new(move |backend| {
                let _ = sender.send(work(backend));
            }))
            .map_err(|_| stopped())?;
        receiver.await.map_err(|_| stopped())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

type VersionKey = (String, u64);

/// The batch instances not in use, by version, with when each was last used.
struct Pool {
    runtime: Arc<dyn Runtime>,
    parameters: HashMap<String, String>,
    idle: Mutex<HashMap<VersionKey, Vec<(Instance, Instant)>>>,
    instances: IntGauge,
}

/// An instance lent to one shard; back to the pool when dropped.
struct Lease {
    pool: Arc<Pool>,
    key: VersionKey,
    instance: Option<Instance>,
}

impl Lease {
    fn instance(&self) -> &Instance {
        self.instance.as_ref().expect("held until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take()
            && instance.healthy.load(Ordering::SeqCst)
        {
            self.pool
                .lock()
                .entry(self.key.clone())
                .or_default()
                .push((instance, Instant::now()));
        }
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VersionKey, Vec<(Instance, Instant)>>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle instance of `version`, or a new one (created off the async
    /// threads).
    async fn checkout(self: &Arc<Self>, version: &ModelVersion) -> Result<Lease, BackendError> {
        let key = (version.name.clone(), version.version);
        let idle = self.lock().get_mut(&key).and_then(Vec::pop);
        let instance = match idle {
            Some((instance, _)) => instance,
            None => {
                let mut parameters = version.settings.parameters.clone();
                parameters.extend(self.parameters.clone());
                let options = InstanceOptions { parameters };
                let runtime = self.runtime.clone();
                let file: std::path::PathBuf = version.model_file.clone();
                let started = Instant::now();
                let backend =
                    tokio::task::spawn_blocking(move || runtime.instantiate(&file, &options))
                        .await
                        .map_err(|error| BackendError::Internal(error.to_string()))??;
                tracing::info!(
                    model = %version.name,
                    version = version.version,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "batch instance loaded"
                );
                Instance::start(
                    format!("batch-{}-{}", version.name, version.version),
                    backend,
                    self.instances.clone(),
                )
                .map_err(|error| BackendError::Internal(error.to_string()))?
            }
        };
        Ok(Lease {
            pool: self.clone(),
            key,
            instance: Some(instance),
        })
    }

    /// Drops idle instances unused for `idle_unload` or whose version is
    /// no longer ready.
    fn evict(&self, idle_unload: Duration, state: &WorkerState) {
        let mut dropped = Vec::new();
        {
            let mut idle = self.lock();
            idle.retain(|(model, version), instances| {
                let ready = state.store.is_ready(model, *version);
                instances.retain(|(_, last)| ready && last.elapsed() < idle_unload);
                if instances.is_empty() {
                    dropped.push((model.clone(), *version));
                }
                !instances.is_empty()
            });
        }
        for (model, version) in dropped {
            tracing::info!(%model, version, "batch instances unloaded (idle)");
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

// ---------------------------------------------------------------------------
// Shards

/// A shard's failure: its gRPC code and message.
type Failure = (i32, String);

/// What running one entry gave, with what its audit record needs.
struct Ran {
    result: Result<ShardResult, Failure>,
    /// `<job_id>/<shard_index>`; the entry's id when the task does not
    /// decode.
    request_id: String,
    tenant: String,
    /// The version that scored it (or the one asked for, `0`: newest).
    version: String,
}

impl Ran {
    fn outcome(self) -> Outcome {
        match self.result {
            Ok(result) => Outcome::Ok(result.encode_to_vec().into()),
            Err((code, message)) => Outcome::error(code, message),
        }
    }
}

async fn run_audited(
    context: &Context,
    audit: &JobAudit,
    job: Job,
    stopping: impl Fn() -> bool,
) -> Outcome {
    if let Err(backlog) = admitted(&audit.auditor, &job, stopping).await {
        tracing::warn!(entry = %job.id, model = job.model(), %backlog, "batch shard not run: the audit backlog is full");
        return Outcome::error(
            Code::ResourceExhausted as i32,
            format!("the shard was not run: {backlog}; it will be tried again"),
        );
    }
    let started = Instant::now();
    let ran = run_shard(context, &job).await;
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let (outcome, event) = shard_event(
        &audit.actor,
        &context.identity.consumer_id,
        &job,
        ran,
        latency_us,
    );
    match audit.auditor.record(event) {
        Ok(()) => outcome,
        Err(backlog) => {
            tracing::warn!(entry = %job.id, model = job.model(), %backlog, "batch shard result withheld: its audit record cannot be written");
            Outcome::error(
                Code::ResourceExhausted as i32,
                format!(
                    "the shard's result is withheld: its audit record cannot be written ({backlog}); it will be tried again"
                ),
            )
        }
    }
}

/// The shard's answer and its audit record.
fn shard_event(
    actor: &str,
    consumer_id: &str,
    job: &Job,
    ran: Ran,
    latency_us: u64,
) -> (Outcome, AuditEvent) {
    let mut event = AuditEvent {
        action: BATCH_SHARD.to_owned(),
        actor: actor.to_owned(),
        tenant: truncate(&ran.tenant, 256),
        model: truncate(job.model(), 256),
        version: truncate(&ran.version, 256),
        region: job.region().to_owned(),
        worker: truncate(consumer_id, 256),
        request_id: truncate(&ran.request_id, 256),
        latency_us,
        request_sha256: sha256_hex(&job.payload),
        ..AuditEvent::default()
    };
    match &ran.result {
        Ok(result) => {
            event.outcome = outcome_name(Code::Ok);
            event.after_json = serde_json::json!({
                "rows": result.rows,
                "part": result.part,
                "sha256": result.sha256,
            })
            .to_string();
        }
        Err((code, message)) => {
            event.outcome = outcome_name(Code::from(*code));
            event.reason = truncate(message, 256);
        }
    }
    (ran.outcome(), event)
}

/// Runs one entry of the batch queue.
async fn run_shard(context: &Context, job: &Job) -> Ran {
    let mut ran = Ran {
        result: Err((codes::INTERNAL, String::new())),
        request_id: job.id.to_string(),
        tenant: String::new(),
        version: String::new(),
    };
    let task = match ShardTask::decode(job.payload.clone()) {
        Ok(task) => task,
        Err(error) => {
            ran.result = Err((
                codes::INVALID_ARGUMENT,
                format!(
                    "batch entry {}: the payload is not an encoded ShardTask: {error}",
                    job.id
                ),
            ));
            return ran;
        }
    };
    ran.request_id = format!("{}/{}", task.job_id, task.shard_index);
    ran.tenant = task.tenant.clone();
    ran.version = task.version.to_string();
    let started = Instant::now();
    let result = score(context, job, &task, &mut ran.version).await;
    ran.result = result
        .map(|part| ShardResult {
            part: part.name,
            rows: part.rows,
            sha256: part.sha256,
            bytes: part.bytes,
            worker: context.identity.consumer_id.clone(),
            region: context.identity.region.clone(),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
        .map_err(|(code, message)| {
            (
                code,
                format!(
                    "shard {} of job '{}': {message}",
                    task.shard_index, task.job_id
                ),
            )
        });
    if let Err((code, message)) = &ran.result {
        tracing::warn!(job = %task.job_id, shard = task.shard_index, code = code_label(Code::from(*code)), %message, "batch shard failed");
    } else {
        tracing::debug!(job = %task.job_id, shard = task.shard_index, "batch shard done");
    }
    ran
}

fn failed<T>(code: Code, message: impl Into<String>) -> Result<T, Failure> {
    Err((code as i32, message.into()))
}

/// The gRPC code of a data failure.
fn data_code(error: &shamal_batch_io::Error) -> Code {
    use shamal_batch_io::Error as E;
    match error {
        E::UnreadablePath { .. } | E::Store { .. } => Code::Unavailable,
        E::Write { .. } | E::BadOutput { .. } | E::Verify { .. } | E::Encryption { .. } => {
            Code::Internal
        }
        E::Format { .. }
        | E::MissingColumn { .. }
        | E::WrongType { .. }
        | E::UnsupportedInput { .. }
        | E::BadRow { .. }
        | E::CorruptFile { .. } => Code::InvalidArgument,
    }
}

/// A data failure, naming the dataset's column where the error names the
/// model input it feeds.
fn data_failure(error: shamal_batch_io::Error, columns: &HashMap<String, String>) -> Failure {
    use shamal_batch_io::Error as E;
    let code = data_code(&error);
    let error = match error {
        E::BadRow {
            column,
            row,
            location,
            reason,
        } => E::BadRow {
            column: columns.get(&column).cloned().unwrap_or(column),
            row,
            location,
            reason,
        },
        E::WrongType {
            column,
            expected,
            found,
        } => E::WrongType {
            column: columns.get(&column).cloned().unwrap_or(column),
            expected,
            found,
        },
        other => other,
    };
    (code as i32, error.to_string())
}

fn backend_failure(error: BackendError) -> Failure {
    match error {
        BackendError::InvalidInput(message) => (Code::InvalidArgument as i32, message),
        BackendError::Internal(message) => (Code::Internal as i32, message),
    }
}

/// The output location of a task: a local path (or `file://` URL) or an
/// object-store prefix (`s3://bucket/prefix`); another scheme is
/// `FAILED_PRECONDITION`.
fn output_dir(output: &str) -> Result<Output, Failure> {
    if output.is_empty() {
        return failed(Code::InvalidArgument, "the task names no output location");
    }
    Output::new(output).map_err(|error| (Code::FailedPrecondition as i32, error.to_string()))
}

/// The model's inputs as batch inference reads them.
fn model_inputs(signature: &ModelSignature) -> Vec<ModelInput> {
    signature
        .inputs
        .iter()
        .map(|spec| ModelInput::new(spec.name.clone(), spec.datatype.as_str(), spec.dims.clone()))
        .collect()
}

/// Reads, scores and writes one shard; returns its part.
async fn score(
    context: &Context,
    job: &Job,
    task: &ShardTask,
    version_label: &mut String,
) -> Result<PartInfo, Failure> {
    if task.model != job.model() {
        return failed(
            Code::InvalidArgument,
            format!(
                "the task on the stream of model '{}' names model '{}'",
                job.model(),
                task.model
            ),
        );
    }
    // Encryption asked for: refused before anything is read or written
    // by a worker that cannot do it (the coordinator tries again, maybe
    // on a worker with keys, then fails the job with this message).
    let encryption = if task.encrypt {
        let Some(ring) = context.keys.clone() else {
            return failed(
                Code::FailedPrecondition,
                format!(
                    "output encryption is not supported by this worker ({}): it has no key \
                     ring; set batch.key_file to the key file of the batch outputs",
                    context.identity.consumer_id
                ),
            );
        };
        let key_id = (!task.key_id.is_empty()).then(|| task.key_id.clone());
        if let Some(id) = &key_id
            && !ring.contains(id)
        {
            return failed(
                Code::FailedPrecondition,
                format!(
                    "the task asks for key id '{id}', which this worker's key ring does not \
                     hold (its keys: {})",
                    ring.key_ids().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        Some(PartEncryption {
            ring,
            key_id,
            job_id: task.job_id.clone(),
        })
    } else {
        None
    };
    let shard: Shard = serde_json::from_str(&task.shard_json).map_err(|error| {
        (
            Code::InvalidArgument as i32,
            format!("shard_json is not a shard: {error}"),
        )
    })?;
    let requested = if task.version == 0 {
        String::new()
    } else {
        task.version.to_string()
    };
    let version = context
        .state
        .store
        .get(&task.model, &requested)
        .map_err(|lookup| {
            let what = if task.version == 0 {
                format!("model '{}'", task.model)
            } else {
                format!("model '{}' version {}", task.model, task.version)
            };
            let reason = match lookup {
                Lookup::UnknownModel | Lookup::UnknownVersion => {
                    format!("{what} is not served by this worker")
                }
                Lookup::NotReady(reason) => format!("{what} is not ready here: {reason}"),
            };
            (Code::FailedPrecondition as i32, reason)
        })?;
    *version_label = version.version_label();
    let dir = output_dir(&task.output)?;

    // Model input -> dataset column; every input must have one.
    let inputs = model_inputs(&version.signature);
    for name in task.input_columns.keys() {
        if !inputs.iter().any(|input| &input.name == name) {
            return failed(
                Code::InvalidArgument,
                format!(
                    "input_columns names '{name}', which is not an input of model '{}'",
                    task.model
                ),
            );
        }
    }
    let column_of: HashMap<String, String> = inputs
        .iter()
        .map(|input| {
            let column = task
                .input_columns
                .get(&input.name)
                .cloned()
                .unwrap_or_else(|| input.name.clone());
            (input.name.clone(), column)
        })
        .collect();
    let mut columns: Vec<String> = Vec::new();
    for column in inputs
        .iter()
        .map(|input| &column_of[&input.name])
        .chain(&task.key_columns)
    {
        if !columns.contains(column) {
            columns.push(column.clone());
        }
    }
    let lease = context
        .pool
        .checkout(&version)
        .await
        .map_err(backend_failure)
        .map_err(|(code, message)| (code, format!("cannot load the batch instance: {message}")))?;
    let pads = lease
        .instance()
        .run(|backend| !backend.ragged_axes().is_empty())
        .await
        .map_err(backend_failure)?;
    let batch_size = rows_per_execution(
        task.batch_size,
        version.settings.max_batch_size,
        version.signature.supports_batching() && !pads,
    );
    let mut stream = read_shard(&shard, &columns, rows_per_chunk(batch_size))
        .await
        .map_err(|error| data_failure(error, &column_of))?;
    // Reading runs ahead of scoring: the next chunks are fetched and
    // decoded (a local Parquet file on a blocking thread of its own,
    // other inputs on the runtime) while the instance's thread scores
    // this one. The reader stops at the first error, and when the shard
    // ends early: its next send fails once `batches` is dropped.
    let (sender, mut batches) = tokio::sync::mpsc::channel(READ_AHEAD);
    let reader = tokio::spawn(async move {
        while let Some(batch) = stream.next().await {
            let failed = batch.is_err();
            if sender.send(batch).await.is_err() || failed {
                break;
            }
        }
    });
    let shard_index = usize::try_from(task.shard_index).unwrap_or(usize::MAX);
    let scoring = Arc::new(Scoring {
        signature: version.signature.clone(),
        model: task.model.clone(),
        inputs,
        column_of: column_of.clone(),
        keys: task.key_columns.clone(),
        dir,
        shard_index,
        encryption,
        per_execution: batch_size,
    });
    // Writing runs behind scoring: a blocking thread encodes the scored
    // batches into the part while the instance scores the next ones, so
    // one shard keeps a second core busy (read, score and write overlap).
    // It stops at its first error; it ends when `parts` is dropped, and
    // returns the writer only then, so a shard that fails while scoring
    // drops its writer (and the part's temporary file) with the task.
    let (parts, mut scored) = tokio::sync::mpsc::channel::<Vec<RecordBatch>>(WRITE_BEHIND);
    let part_scoring = scoring.clone();
    let writing = tokio::task::spawn_blocking(move || {
        let mut writer: Option<PartWriter> = None;
        while let Some(outs) = scored.blocking_recv() {
            for out in &outs {
                part_scoring.write(out, &mut writer)?;
            }
        }
        Ok::<_, Failure>(writer)
    });
    while let Some(batch) = batches.recv().await {
        let batch = batch.map_err(|error| data_failure(error, &column_of))?;
        let scoring = scoring.clone();
        // Conversion and execution run on the instance's thread, off the
        // async threads that serve real-time requests.
        let outs = lease
            .instance()
            .run(move |backend| scoring.chunk(backend, batch))
            .await
            .map_err(backend_failure)??;
        // A send fails only once the writer has stopped at an error,
        // which its result below reports.
        if !outs.is_empty() && parts.send(outs).await.is_err() {
            break;
        }
    }
    drop(parts);
    let writer = writing.await.map_err(|error| {
        (
            Code::Internal as i32,
            format!("writing the part failed: {error}"),
        )
    })??;
    // The channel also ends when the reader panics: only a reader that
    // ended by itself has read every row.
    reader.await.map_err(|error| {
        (
            Code::Internal as i32,
            format!("reading the shard failed: {error}"),
        )
    })?;
    // The Parquet footer (and an encrypted part's sealing) on a blocking
    // thread; putting the part in place (a rename, or an upload) on the
    // runtime.
    let staged = tokio::task::spawn_blocking(move || match writer {
        Some(writer) => writer.close(),
        None => scoring.empty(&shard)?.close(),
    })
    .await
    .map_err(|error| {
        (
            Code::Internal as i32,
            format!("closing the part failed: {error}"),
        )
    })?
    .map_err(|error| data_failure(error, &column_of))?;
    // Never into a finished output: this entry may be a duplicate the
    // coordinator does not follow (it died between queuing the shard and
    // recording the entry, and queued it again on resume), and a part
    // committed after the manifest would replace the one it lists (an
    // encrypted part differs at every run). The check and the rename are
    // made under the lock the coordinator holds while it writes the
    // manifest (local outputs).
    match staged
        .commit_unless_finished()
        .await
        .map_err(|error| data_failure(error, &column_of))?
    {
        Some(part) => Ok(part),
        None => failed(
            Code::FailedPrecondition,
            format!(
                "the job's output '{}' is finished already (it has {SUCCESS_FILE}): the part \
                 of this duplicate run was not committed",
                task.output
            ),
        ),
    }
}

/// Rows per execution of a shard: the task's batch size (the
/// coordinator's `batch_size`). The model's `max_batch_size` sizes the
/// online batcher's batches; it caps a shard's batches too when the model
/// file has a fixed first dimension on an input or output (it cannot take
/// more rows) or the model pads inputs to the longest row of a batch (the
/// text encoders: a larger batch pads more and runs slower). Otherwise a
/// shard runs in the task's larger batches, which is what makes a cheap
/// tabular model fast in bulk.
///
/// `uncapped`: the model file takes any number of rows and the model does
/// not pad.
fn rows_per_execution(task_batch_size: u32, max_batch_size: usize, uncapped: bool) -> usize {
    let mut rows = usize::try_from(task_batch_size).unwrap_or(usize::MAX);
    if rows == 0 {
        rows = DEFAULT_BATCH_SIZE;
    }
    if max_batch_size > 0 && !uncapped {
        rows = rows.min(max_batch_size);
    }
    rows
}

/// Rows a shard's reader, instance and writer hand each other at once
/// (about): each hand-off wakes a thread, which costs tens of µs on a
/// virtual machine, so a chunk holds several executions' rows.
const CHUNK_ROWS: usize = 8192;

/// Rows per chunk: whole executions of `per_execution` rows, at least
/// [`CHUNK_ROWS`] (one execution when that is larger).
fn rows_per_chunk(per_execution: usize) -> usize {
    let per_execution = per_execution.max(1);
    per_execution.saturating_mul(CHUNK_ROWS.div_ceil(per_execution))
}

/// Chunks of a shard read ahead of the one being scored.
const READ_AHEAD: usize = 2;

/// Scored chunks of a shard waiting for the part's writer.
const WRITE_BEHIND: usize = 2;

/// What scoring one batch of a shard needs.
struct Scoring {
    model: String,
    signature: ModelSignature,
    inputs: Vec<ModelInput>,
    /// Model input -> dataset column.
    column_of: HashMap<String, String>,
    keys: Vec<String>,
    dir: Output,
    shard_index: usize,
    /// Encrypt the part at rest.
    encryption: Option<PartEncryption>,
    /// Rows per execution of the model ([`rows_per_execution`]).
    per_execution: usize,
}

impl Scoring {
    /// Scores a chunk of a shard's rows, `per_execution` rows at a time:
    /// the key columns and the model's outputs of each execution.
    fn chunk(
        &self,
        backend: &mut dyn Backend,
        shard_batch: shamal_batch_io::ShardBatch,
    ) -> Result<Vec<RecordBatch>, Failure> {
        let shamal_batch_io::ShardBatch { batch, origin } = shard_batch;
        let total = batch.num_rows();
        let per_execution = self.per_execution.max(1);
        let mut scored = Vec::with_capacity(total.div_ceil(per_execution));
        let mut offset = 0;
        while offset < total {
            let rows = per_execution.min(total - offset);
            let origin = RowOrigin {
                location: origin.location.clone(),
                first_row: origin.first_row + offset as u64,
            };
            scored.push(self.batch(backend, &batch.slice(offset, rows), &origin)?);
            offset += rows;
        }
        Ok(scored)
    }

    /// Scores one execution's rows (at least one): its key columns and the
    /// model's outputs.
    fn batch(
        &self,
        backend: &mut dyn Backend,
        batch: &RecordBatch,
        origin: &RowOrigin,
    ) -> Result<RecordBatch, Failure> {
        let data = |error| data_failure(error, &self.column_of);
        let rows = batch.num_rows();
        // Columns to tensors and back in process: no request to encode.
        let tensors =
            input_tensors(&self.input_batch(batch)?, &self.inputs, origin).map_err(data)?;
        let (ordered, _) = prepare_inputs(&self.model, &self.signature, 0, tensors)
            .map_err(|status| (status.code() as i32, status.message().to_owned()))?;
        backend
            .check(&ordered)
            .map_err(backend_failure)
            .map_err(|(code, message)| (code, rows_named(origin, rows, &message)))?;
        let outputs = backend
            .infer(ordered)
            .map_err(backend_failure)
            .map_err(|(code, message)| (code, rows_named(origin, rows, &message)))?;
        let columns = tensors_to_columns(&outputs, rows).map_err(data)?;
        PartWriter::batch(&self.key_batch(batch)?, columns).map_err(data)
    }

    /// Appends a scored batch to the part (created at the first).
    fn write(&self, out: &RecordBatch, writer: &mut Option<PartWriter>) -> Result<(), Failure> {
        let data = |error| data_failure(error, &self.column_of);
        if writer.is_none() {
            *writer = Some(self.writer(out.schema()).map_err(data)?);
        }
        if let Some(writer) = writer.as_mut() {
            writer.write(out).map_err(data)?;
        }
        Ok(())
    }

    /// The input columns, named after the model inputs they feed.
    fn input_batch(&self, batch: &RecordBatch) -> Result<RecordBatch, Failure> {
        let mut fields = Vec::with_capacity(self.inputs.len());
        let mut arrays = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            let column = &self.column_of[&input.name];
            let index = batch
                .schema()
                .index_of(column)
                .map_err(|error| (Code::Internal as i32, format!("column '{column}': {error}")))?;
            let field = batch.schema().field(index).clone();
            fields.push(field.with_name(input.name.clone()));
            arrays.push(batch.column(index).clone());
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|error| (Code::Internal as i32, error.to_string()))
    }

    /// The key columns of `batch`.
    fn key_batch(&self, batch: &RecordBatch) -> Result<RecordBatch, Failure> {
        let mut indices = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            indices.push(batch.schema().index_of(key).map_err(|error| {
                (
                    Code::Internal as i32,
                    format!("key column '{key}': {error}"),
                )
            })?);
        }
        batch
            .project(&indices)
            .map_err(|error| (Code::Internal as i32, error.to_string()))
    }

    /// The part of a shard without rows: the key columns' types from the
    /// shard's schema (text files), the outputs' from the model.
    fn empty(&self, shard: &Shard) -> shamal_batch_io::Result<PartWriter> {
        let bad = |reason: String| shamal_batch_io::Error::BadOutput {
            output: "*".to_owned(),
            reason,
        };
        let schema: Option<SchemaRef> = shard.schema.clone().map(Arc::new);
        let mut fields: Vec<Field> = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for key in &self.keys {
            let field = schema
                .as_ref()
                .and_then(|schema| schema.field_with_name(key).ok().cloned())
                .ok_or_else(|| {
                    bad(format!(
                        "the shard has no rows and its key column '{key}' has no known type"
                    ))
                })?;
            arrays.push(arrow::array::new_empty_array(field.data_type()));
            fields.push(field);
        }
        let keys = RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            arrays,
            &RecordBatchOptions::new().with_row_count(Some(0)),
        )
        .map_err(|error| bad(error.to_string()))?;
        let outputs: Vec<Tensor> = self
            .signature
            .outputs
            .iter()
            .map(|spec| {
                let mut shape: Vec<i64> = spec
                    .dims
                    .iter()
                    .map(|&dim| if dim < 0 { 1 } else { dim })
                    .collect();
                if let Some(first) = shape.first_mut() {
                    *first = 0;
                } else {
                    shape.push(0);
                }
                let data = match spec.datatype.element_size() {
                    Some(_) => TensorData::Fixed(bytes::Bytes::new()),
                    None => TensorData::Strings(Vec::new()),
                };
                Tensor {
                    name: spec.name.clone(),
                    datatype: spec.datatype,
                    shape,
                    data,
                }
            })
            .collect();
        let columns = tensors_to_columns(&outputs, 0)?;
        let out = PartWriter::batch(&keys, columns)?;
        let mut writer = self.writer(out.schema())?;
        writer.write(&out)?;
        Ok(writer)
    }

    /// The part's writer (encrypting when the task asks).
    fn writer(&self, schema: SchemaRef) -> shamal_batch_io::Result<PartWriter> {
        PartWriter::create_with(&self.dir, self.shard_index, schema, self.encryption.clone())
    }
}

/// `message`, saying which rows failed.
fn rows_named(origin: &RowOrigin, rows: usize, message: &str) -> String {
    format!(
        "rows {}..{} of {}: {message}",
        origin.first_row,
        origin.first_row + rows as u64,
        origin.location
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::async_consumer::selectors;
    use shamal_async_queue::StreamKey;
    use std::collections::BTreeSet;

    #[test]
    fn data_failures_have_the_code_that_fits_and_name_the_column() {
        let columns: HashMap<String, String> =
            [("INPUT0".to_owned(), "features".to_owned())].into();
        let (code, message) = data_failure(
            shamal_batch_io::Error::BadRow {
                column: "INPUT0".to_owned(),
                row: 7,
                location: "file '/d/a.parquet'".to_owned(),
                reason: "null".to_owned(),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::InvalidArgument);
        assert!(message.contains("column 'features', row 7"), "{message}");
        let (code, _) = data_failure(
            shamal_batch_io::Error::CorruptFile {
                file: "x".to_owned(),
                reason: "y".to_owned(),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::InvalidArgument);
        let (code, _) = data_failure(
            shamal_batch_io::Error::UnreadablePath {
                path: "x".to_owned(),
                source: std::io::Error::other("gone"),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::Unavailable);
        let (code, _) = data_failure(
            shamal_batch_io::Error::Write {
                path: "x".to_owned(),
                source: std::io::Error::other("full"),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::Internal);
    }

    #[test]
    fn a_shard_runs_in_the_tasks_batches_unless_the_model_pads_or_cannot_batch() {
        // demo: max_batch_size 64, a variable first dimension, no padding.
        assert_eq!(rows_per_execution(1024, 64, true), 1024);
        // A text encoder (pads) or a file with a fixed first dimension.
        assert_eq!(rows_per_execution(1024, 32, false), 32);
        // Below the cap, or no cap: the task's.
        assert_eq!(rows_per_execution(16, 32, false), 16);
        assert_eq!(rows_per_execution(1024, 0, false), 1024);
        // No batch size in the task: the default, capped alike.
        assert_eq!(rows_per_execution(0, 0, true), DEFAULT_BATCH_SIZE);
        assert_eq!(rows_per_execution(0, 64, false), 64);
    }

    #[test]
    fn a_chunk_is_whole_executions_of_at_least_chunk_rows() {
        assert_eq!(rows_per_chunk(1024), CHUNK_ROWS);
        assert_eq!(rows_per_chunk(1000), 9000);
        assert_eq!(rows_per_chunk(32), CHUNK_ROWS);
        assert_eq!(rows_per_chunk(20_000), 20_000);
        assert_eq!(rows_per_chunk(0), CHUNK_ROWS);
        for per_execution in [1, 7, 64, 1000, 5000, 9000] {
            let chunk = rows_per_chunk(per_execution);
            assert_eq!(chunk % per_execution, 0, "{per_execution}");
            assert!(chunk >= CHUNK_ROWS && chunk < CHUNK_ROWS + per_execution);
        }
    }

    #[test]
    fn local_and_s3_outputs_are_written_and_other_schemes_refused() {
        assert_eq!(
            output_dir("/out").unwrap().local_dir(),
            Some(std::path::Path::new("/out"))
        );
        assert_eq!(
            output_dir("file:///out").unwrap().local_dir(),
            Some(std::path::Path::new("/out"))
        );
        let s3 = output_dir("s3://bucket/out").unwrap();
        assert_eq!(s3.local_dir(), None);
        assert_eq!(
            s3.file("part-000001.parquet"),
            "s3://bucket/out/part-000001.parquet"
        );
        let (code, message) = output_dir("gs://bucket/out").unwrap_err();
        assert_eq!(Code::from(code), Code::FailedPrecondition);
        assert!(message.contains("gs://bucket/out"), "{message}");
        assert_eq!(
            Code::from(output_dir("").unwrap_err().0),
            Code::InvalidArgument
        );
    }

    #[test]
    fn only_this_regions_streams_are_selected() {
        let models: BTreeSet<String> = ["a".to_owned(), "b".to_owned()].into();
        let eu = StreamKey::new("a", "eu").unwrap();
        let us = StreamKey::new("a", "us").unwrap();
        let eu_us = StreamKey::new("a", "eu+us").unwrap();
        let us_uae = StreamKey::new("a", "uae+us").unwrap();
        for region_sets in [false, true] {
            let selected = selectors(&models, "eu", region_sets);
            assert_eq!(selected.len(), 2);
            assert!(selected.iter().any(|s| s.matches(&eu)));
            assert!(!selected.iter().any(|s| s.matches(&us)));
            assert!(!selected.iter().any(|s| s.matches(&us_uae)));
            // Only the batch role takes the entries several regions may take.
            assert_eq!(selected.iter().any(|s| s.matches(&eu_us)), region_sets);
        }
    }

    #[test]
    fn a_shard_record_names_the_shard_and_its_part() {
        let task = ShardTask {
            job_id: "job-7".to_owned(),
            shard_index: 3,
            model: "m".to_owned(),
            ..Default::default()
        };
        let job = Job {
            id: shamal_async_queue::JobId::generate(),
            stream: StreamKey::new("m", "eu").unwrap(),
            payload: task.encode_to_vec().into(),
            submitted_at: std::time::SystemTime::now(),
            deadline: None,
            priority: None,
        };
        let ran = Ran {
            result: Ok(ShardResult {
                part: "part-000003.parquet".to_owned(),
                rows: 10,
                sha256: "ab".to_owned(),
                ..Default::default()
            }),
            request_id: "job-7/3".to_owned(),
            tenant: "acme".to_owned(),
            version: "2".to_owned(),
        };
        let (outcome, event) = shard_event("service:cpu-worker", "w-1", &job, ran, 5);
        assert!(matches!(outcome, Outcome::Ok(_)));
        assert_eq!(event.action, BATCH_SHARD);
        assert_eq!(event.request_id, "job-7/3");
        assert_eq!(event.outcome, "ok");
        assert_eq!(
            (
                event.model.as_str(),
                event.version.as_str(),
                event.region.as_str()
            ),
            ("m", "2", "eu")
        );
        assert_eq!(
            (event.worker.as_str(), event.tenant.as_str()),
            ("w-1", "acme")
        );
        let after: serde_json::Value = serde_json::from_str(&event.after_json).unwrap();
        assert_eq!(after["rows"], 10);
        assert_eq!(after["part"], "part-000003.parquet");
        assert_eq!(after["sha256"], "ab");

        let ran = Ran {
            result: Err((
                codes::INVALID_ARGUMENT,
                "shard 3 of job 'job-7': bad".to_owned(),
            )),
            request_id: "job-7/3".to_owned(),
            tenant: String::new(),
            version: "0".to_owned(),
        };
        let (outcome, event) = shard_event("a", "w-1", &job, ran, 5);
        assert!(matches!(outcome, Outcome::Err { code: 3, .. }));
        assert_eq!(event.outcome, "invalid_argument");
        assert!(event.reason.contains("shard 3"));
        assert!(event.after_json.is_empty());
    }
}
