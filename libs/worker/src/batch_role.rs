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

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use prost::Message;
use shamal_async_queue::{Job, JobQueue, Outcome, codes};
use shamal_audit_client::{AuditEvent, sha256_hex};
use shamal_batch_io::KeyRing;
use shamal_error::code_label;
use shamal_proto::shamal::batch::v1::{ShardResult, ShardTask};
use shamal_telemetry::MetricsRegistry;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::async_consumer::{
    InFlight, JobAudit, QueueSource, Streams, admitted, connect, consume_ready_models,
    outcome_name, pause, stopping, truncate,
};
use crate::backend::{Backend, BackendError, InstanceOptions, Runtime};
use crate::repository::ModelVersion;
use crate::service::WorkerState;

mod shard;

use shard::score;

/// The action of a shard's run in the audit log.
pub const BATCH_SHARD: &str = "batch.shard";

/// Default prefix of the batch queue's Redis keys.
pub const DEFAULT_KEY_PREFIX: &str = "shamal:batch";

/// Default time a batch instance is kept after its last shard.
pub const DEFAULT_IDLE_UNLOAD: Duration = Duration::from_secs(60);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::async_consumer::selectors;
    use shamal_async_queue::StreamKey;
    use std::collections::BTreeSet;

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
