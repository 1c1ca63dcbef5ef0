//! The coordinator: accepts jobs (every check before any work), plans and
//! queues their shards, follows them to completion, and resumes the jobs
//! of the store after a restart.
//!
//! Each active job has one driver task in this process. As soon as one of
//! the job's queued entries has a result (the queue's `wait`), and at
//! least every `poll_interval`, it reads the job's shards from the store
//! and, for each shard not done, acts on what the queue knows of its
//! entry: a result is recorded (a success marks the shard done, a failure
//! sends it back to `pending` or, after `max_shard_attempts`, fails the
//! job); an entry the queue does not know (lost queue data) is queued
//! again; a `pending` shard is queued. The same loop is what a restarted
//! coordinator runs, so resuming needs nothing of its own. When every shard
//! is done, the parts' checksums are verified and the manifest is written,
//! last.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use shamal_async_queue::{JobId, JobQueue, JobStatus, NewJob as QueueJob, Outcome, StreamKey};
use shamal_audit_client::{AuditEvent, Auditor};
use shamal_auth::Principal;
use shamal_batch_io::{
    CommitFence, Dataset, Format, Manifest, ModelInput, Output, PartInfo, encrypted_part_name,
    part_name, remove_temporary_parts,
};
use shamal_proto::shamal::batch::v1 as proto;
use shamal_proto::shamal::registry::v1::ModelState;
use tokio::sync::watch;

use crate::catalog::{MetadataSource, ModelCatalog};
use crate::error::{BatchError, Result};
use crate::metrics::BatchMetrics;
use crate::model::{
    Job, JobSpec, JobState, ShardRow, ShardState, now_ms, region_list, stream_region,
};
use crate::store::{NewJob, NewShard, ShardDone, Store};

/// Rows per shard when the job does not say.
pub const DEFAULT_ROWS_PER_SHARD: u64 = 100_000;
/// Most characters of a request id.
const MAX_REQUEST_ID: usize = 128;
/// Least time between two steps of a job's driver, per shard of the job
/// (a step reads them all): at most about 20,000 shard rows a second.
const STEP_GAP_PER_SHARD: Duration = Duration::from_micros(50);
/// Window of `rows_per_second`.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How the coordinator runs jobs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Rows per shard when a job does not say.
    pub default_rows_per_shard: u64,
    /// Attempts of a shard (each a queue entry) before its job fails.
    pub max_shard_attempts: u32,
    /// How often a job's shards are checked.
    pub poll_interval: Duration,
    /// Rows per model execution, told to the workers.
    pub batch_size: u32,
    /// After this long without any shard taken, a QUEUED job's message
    /// says that no worker of its regions takes its shards.
    pub wait_warning_after: Duration,
    /// The region of the shards of jobs any region may score.
    pub default_region: String,
    /// Policy: every job's output is encrypted at rest, whatever its
    /// `encrypt` says.
    pub encrypt_outputs: bool,
    /// Entries of a stream that wait for a worker at most: the rest of the
    /// shards stay pending in the store and are queued, higher priority
    /// first, as workers take entries.
    pub queue_window: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            default_rows_per_shard: DEFAULT_ROWS_PER_SHARD,
            max_shard_attempts: 3,
            poll_interval: Duration::from_millis(500),
            batch_size: 1024,
            wait_warning_after: Duration::from_secs(30),
            default_region: "local".to_owned(),
            encrypt_outputs: false,
            queue_window: DEFAULT_QUEUE_WINDOW,
        }
    }
}

/// Default of [`Settings::queue_window`].
pub const DEFAULT_QUEUE_WINDOW: u64 = 16;

/// What a submit carries besides the spec.
#[derive(Clone, Debug, Default)]
pub struct Submit {
    pub spec: JobSpec,
    pub request_id: String,
}

/// The coordinator of batch jobs.
pub struct Coordinator {
    store: Store,
    queue: Arc<dyn JobQueue>,
    catalog: Arc<dyn ModelCatalog>,
    metadata: Arc<dyn MetadataSource>,
    auditor: Auditor,
    settings: Settings,
    metrics: BatchMetrics,
    /// Bumped on every change of any job (WatchJob waits on it).
    changes: watch::Sender<u64>,
    /// Samples of (time, rows done) per job, for rows_per_second.
    progress: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
    /// Jobs with a driver task in this process.
    driven: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// One dispatch at a time; when the last one ran.
    dispatched: tokio::sync::Mutex<Option<Instant>>,
    stop: watch::Receiver<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Coordinator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        queue: Arc<dyn JobQueue>,
        catalog: Arc<dyn ModelCatalog>,
        metadata: Arc<dyn MetadataSource>,
        auditor: Auditor,
        settings: Settings,
        metrics: BatchMetrics,
        stop: watch::Receiver<bool>,
    ) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            store,
            queue,
            catalog,
            metadata,
            auditor,
            settings,
            metrics,
            changes: watch::channel(0).0,
            progress: Mutex::new(HashMap::new()),
            driven: Mutex::new(HashMap::new()),
            dispatched: tokio::sync::Mutex::new(None),
            stop,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn queue(&self) -> &Arc<dyn JobQueue> {
        &self.queue
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts a driver for every job of the store still QUEUED or RUNNING
    /// (after a restart). Returns how many.
    pub async fn resume(self: &Arc<Self>) -> Result<usize> {
        let jobs = self.store.active_jobs().await?;
        for id in &jobs {
            tracing::info!(job = %id, "resuming batch job");
            self.drive(id.clone());
        }
        Ok(jobs.len())
    }

    /// Waits for every driver task to end (after the stop signal).
    pub async fn join(&self) {
        let tasks: Vec<_> = lock(&self.driven).drain().map(|(_, task)| task).collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|version| *version += 1);
    }

    /// A receiver woken on every change of any job.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A job with its progress; NOT_FOUND naming it.
    pub async fn get(&self, id: &str) -> Result<Job> {
        let mut job = self
            .store
            .job(id)
            .await?
            .ok_or_else(|| BatchError::NotFound(format!("job '{id}' not found")))?;
        job.rows_per_second = self.rate(&job);
        Ok(job)
    }

    /// A page of jobs, newest first, and the next page's token.
    pub async fn list(
        &self,
        page_size: u32,
        page_token: &str,
        state: Option<JobState>,
        model: Option<&str>,
    ) -> Result<(Vec<Job>, String)> {
        let size = match page_size {
            0 => 100,
            1..=1000 => page_size,
            _ => {
                return Err(BatchError::invalid("page_size", "must be 0 to 1000"));
            }
        };
        let before = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse::<i64>()
                .ok()
                .filter(|seq| *seq > 0)
                .ok_or_else(|| {
                    BatchError::invalid(
                        "page_token",
                        "not a page token of this service (the next_page_token of an earlier page)",
                    )
                })?
        };
        let mut rows = self.store.list(before, state, model, size + 1).await?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next = if more {
            rows.last()
                .map(|(seq, _)| seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((
            rows.into_iter()
                .map(|(_, mut job)| {
                    job.rows_per_second = self.rate(&job);
                    job
                })
                .collect(),
            next,
        ))
    }

    fn rate(&self, job: &Job) -> f64 {
        if job.state.is_final() {
            return 0.0;
        }
        let progress = lock(&self.progress);
        let Some(samples) = progress.get(&job.id) else {
            return 0.0;
        };
        let now = Instant::now();
        let Some((first_at, first_rows)) = samples
            .iter()
            .find(|(at, _)| now.duration_since(*at) <= RATE_WINDOW)
            .or(samples.back())
        else {
            return 0.0;
        };
        let elapsed = now.duration_since(*first_at).as_secs_f64();
        if elapsed < 0.001 {
            return 0.0;
        }
        job.done_rows.saturating_sub(*first_rows) as f64 / elapsed
    }

    fn sample(&self, job_id: &str, done_rows: u64) {
        let mut progress = lock(&self.progress);
        let samples = progress.entry(job_id.to_owned()).or_default();
        let now = Instant::now();
        if samples.back().is_some_and(|(_, rows)| *rows == done_rows) && !samples.is_empty() {
            return;
        }
        samples.push_back((now, done_rows));
        // Keep one sample older than the window as its baseline.
        while samples.len() > 2
            && samples
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Checks and accepts a job: every field, the model and version (the
    /// registry), the caller's tenant and the model's access limits, the
    /// regions, the model's signature (the inference endpoint) against the
    /// dataset's columns, the output location; then plans the shards,
    /// stores the job and queues its shards. Nothing is written (no job,
    /// no output directory) when a check fails.
    pub async fn submit(self: &Arc<Self>, submit: Submit, principal: &Principal) -> Result<Job> {
        let result = self.try_submit(submit, principal).await;
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(BatchError::Invalid { .. }) => "invalid",
            Err(BatchError::NotFound(_)) => "not_found",
            Err(BatchError::PermissionDenied(_)) => "refused",
            Err(BatchError::FailedPrecondition(_)) => "failed_precondition",
            Err(_) => "error",
        };
        self.metrics.submits.with_label_values(&[outcome]).inc();
        result
    }

    async fn try_submit(self: &Arc<Self>, submit: Submit, principal: &Principal) -> Result<Job> {
        let Submit {
            mut spec,
            request_id,
        } = submit;
        validate(&spec, &request_id)?;
        // The tenant: the token's, with auth on.
        if let Principal::User(user) = principal {
            match (&user.tenant, spec.tenant.is_empty()) {
                (Some(tenant), true) => spec.tenant.clone_from(tenant),
                (Some(tenant), false) if *tenant != spec.tenant => {
                    return Err(BatchError::PermissionDenied(format!(
                        "spec.tenant: {} belongs to tenant '{tenant}' and cannot submit for '{}'",
                        principal.describe(),
                        spec.tenant
                    )));
                }
                (None, false) => {
                    return Err(BatchError::PermissionDenied(format!(
                        "spec.tenant: {}'s token names no tenant and cannot submit for '{}'",
                        principal.describe(),
                        spec.tenant
                    )));
                }
                _ => {}
            }
        }
        if !request_id.is_empty()
            && let Some(existing) = self.store.job_of_request(&request_id).await?
        {
            return self.get(&existing).await;
        }
        if self.auditor.admit().is_err() {
            return Err(BatchError::Unavailable(
                "the audit backlog is full: no job is accepted until it drains".to_owned(),
            ));
        }
        let model = self.catalog.model(&spec.model).await?.ok_or_else(|| {
            BatchError::NotFound(format!("spec.model: model '{}' not found", spec.model))
        })?;
        if !principal.within(&model.allowed_tenants, &model.allowed_groups) {
            return Err(BatchError::PermissionDenied(format!(
                "spec.model: model '{}' is limited to listed tenants or groups, and {} is in none of them",
                spec.model,
                principal.describe()
            )));
        }
        let version = resolve_version(&model, &spec)?;
        let regions = job_regions(&model, &spec.regions)?;
        let regions = if spec.tenant.is_empty() {
            regions
        } else {
            match self.catalog.tenant_regions(&spec.tenant).await? {
                Some(allowed) => tenant_regions(regions, &spec, &model, &allowed)?,
                None => regions,
            }
        };
        let signature = self.metadata.signature(&spec.model, version).await?;
        // Inputs as the dataset names them.
        let mut columns = Vec::with_capacity(signature.inputs.len());
        for name in spec.input_columns.keys() {
            if !signature.inputs.iter().any(|input| &input.name == name) {
                return Err(BatchError::invalid(
                    format!("spec.input_columns[{name}]"),
                    format!(
                        "model '{}' version {version} has no input '{name}'; its inputs are: {}",
                        spec.model,
                        signature
                            .inputs
                            .iter()
                            .map(|input| input.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let mut input_columns = std::collections::BTreeMap::new();
        for input in &signature.inputs {
            let column = spec
                .input_columns
                .get(&input.name)
                .cloned()
                .unwrap_or_else(|| input.name.clone());
            input_columns.insert(input.name.clone(), column.clone());
            columns.push(
                ModelInput::new(input.name.clone(), &input.datatype, input.shape.clone())
                    .with_column(column),
            );
        }
        for (index, key) in spec.key_columns.iter().enumerate() {
            if signature.outputs.contains(key) {
                return Err(BatchError::invalid(
                    format!("spec.key_columns[{index}]"),
                    format!(
                        "'{key}' is also the name of an output of model '{}'; output columns follow the keys and must not repeat their names",
                        spec.model
                    ),
                ));
            }
        }
        let format = if spec.input_format.is_empty() {
            None
        } else {
            Some(Format::parse(&spec.input_format).ok_or_else(|| {
                BatchError::invalid(
                    "spec.input_format",
                    format!("'{}' is not parquet, jsonl or csv", spec.input_format),
                )
            })?)
        };
        let dataset = Dataset::open(&spec.input, format)
            .await
            .map_err(|error| BatchError::invalid("spec.input", error.to_string()))?;
        dataset
            .check(&columns, &spec.key_columns)
            .map_err(|error| BatchError::invalid("spec.input", error.to_string()))?;
        let output = Output::new(&spec.output)
            .map_err(|error| BatchError::invalid("spec.output", error.to_string()))?;
        output
            .check_empty()
            .await
            .map_err(|error| BatchError::invalid("spec.output", error.to_string()))?;
        let rows_per_shard = if spec.rows_per_shard == 0 {
            self.settings.default_rows_per_shard
        } else {
            spec.rows_per_shard
        };
        let plan = dataset.plan_shards(rows_per_shard);
        let mut shards = Vec::with_capacity(plan.len());
        for shard in &plan {
            shards.push(NewShard {
                index: u32::try_from(shard.index).map_err(|_| {
                    BatchError::invalid("spec.rows_per_shard", "too many shards; raise it")
                })?,
                shard_json: serde_json::to_string(shard)
                    .map_err(|error| BatchError::Internal(error.to_string()))?,
                rows: shard.rows,
            });
        }
        spec.input_columns = input_columns;
        // The policy forces encryption on; the stored spec says what runs.
        spec.encrypt |= self.settings.encrypt_outputs;
        let job = NewJob {
            id: format!("job-{}", uuid::Uuid::new_v4()),
            request_id: (!request_id.is_empty()).then(|| request_id.clone()),
            stream_region: stream_region(&regions, &self.settings.default_region),
            regions,
            spec,
            version,
            tenant: String::new(),
            actor: principal.actor(),
            total_rows: plan.iter().map(|shard| shard.rows).sum(),
            message: "queued: waiting for a batch worker of its regions".to_owned(),
        };
        let job = NewJob {
            tenant: job.spec.tenant.clone(),
            ..job
        };
        output
            .create()
            .await
            .map_err(|error| BatchError::invalid("spec.output", error.to_string()))?;
        if !self.store.insert_job(&job, &shards).await? {
            // A submit with the same request id committed first.
            let existing = self
                .store
                .job_of_request(&request_id)
                .await?
                .ok_or_else(|| BatchError::Internal("request id conflict".to_owned()))?;
            return self.get(&existing).await;
        }
        tracing::info!(
            job = %job.id, model = %job.spec.model, version, shards = shards.len(),
            regions = %job.stream_region, actor = %job.actor, "batch job accepted"
        );
        self.audit(AuditEvent {
            action: "batch.submit".to_owned(),
            outcome: "ok".to_owned(),
            actor: job.actor.clone(),
            tenant: job.tenant.clone(),
            model: job.spec.model.clone(),
            version: version.to_string(),
            request_id: job.id.clone(),
            after_json: serde_json::to_string(&job.spec).unwrap_or_default(),
            ..Default::default()
        });
        self.metrics.active.inc();
        // Queue what the stream has room for now, so that a job returned
        // is on the queue unless others come first.
        self.dispatch(true).await?;
        self.sample(&job.id, 0);
        self.changed();
        self.drive(job.id.clone());
        self.get(&job.id).await
    }

    /// Cancels a job: CANCELLED at once; its shards' results are ignored
    /// from now on and no manifest is written. FAILED_PRECONDITION for a
    /// job already final.
    pub async fn cancel(&self, id: &str, principal: &Principal) -> Result<Job> {
        let job = self.get(id).await?;
        self.check_tenant(&job, principal)?;
        if job.state.is_final() {
            return Err(BatchError::FailedPrecondition(format!(
                "job '{id}' is {} already",
                job.state.name()
            )));
        }
        if !self
            .store
            .finish(
                id,
                JobState::Cancelled,
                &format!("cancelled by {}", principal.actor()),
                "",
            )
            .await?
        {
            let job = self.get(id).await?;
            return Err(BatchError::FailedPrecondition(format!(
                "job '{id}' is {} already",
                job.state.name()
            )));
        }
        self.metrics.active.dec();
        self.metrics
            .finished
            .with_label_values(&["CANCELLED"])
            .inc();
        self.cancel_queued(&job, principal).await;
        self.audit(AuditEvent {
            action: "batch.cancel".to_owned(),
            outcome: "ok".to_owned(),
            actor: principal.actor(),
            tenant: job.spec.tenant.clone(),
            model: job.spec.model.clone(),
            version: job.version.to_string(),
            request_id: id.to_owned(),
            ..Default::default()
        });
        self.changed();
        self.get(id).await
    }

    /// Answers the queued entries of a cancelled job, so that no worker
    /// scores their shards (one already scoring a shard finishes its
    /// part). Best effort: the job is cancelled in the store already, and
    /// an entry left on the queue costs only a worker's time.
    async fn cancel_queued(&self, job: &Job, principal: &Principal) {
        let entries = async {
            let routing = self.store.routing(&job.id).await?;
            let stream = self.stream(&job.spec.model, &routing.stream_region)?;
            let shards = self.store.shards(&job.id).await?;
            Ok::<_, BatchError>((stream, shards))
        };
        let (stream, shards) = match entries.await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "the cancelled job's queued shards stay queued");
                return;
            }
        };
        let outcome = Outcome::error(
            shamal_async_queue::codes::CANCELLED,
            format!("job '{}' cancelled by {}", job.id, principal.actor()),
        );
        for shard in shards
            .iter()
            .filter(|shard| shard.state == ShardState::Queued)
        {
            let Ok(id) = JobId::parse(&shard.queue_id) else {
                continue;
            };
            if let Err(error) = self.queue.cancel(&stream, &id, outcome.clone()).await {
                tracing::warn!(job = %job.id, shard = shard.index, %error,
                    "a cancelled job's queued shard stays queued");
            }
        }
    }

    /// A user of a tenant sees and cancels only that tenant's jobs.
    pub fn check_tenant(&self, job: &Job, principal: &Principal) -> Result<()> {
        if let Principal::User(user) = principal
            && !user.roles.contains(&shamal_auth::Role::Admin)
            && let Some(tenant) = &user.tenant
            && !job.spec.tenant.is_empty()
            && *tenant != job.spec.tenant
        {
            return Err(BatchError::NotFound(format!("job '{}' not found", job.id)));
        }
        Ok(())
    }

    /// Records `event`, its fields cut to what the audit service accepts
    /// (see [`bounded`]), so that a long failure reason does not get the
    /// whole event set aside as invalid.
    fn audit(&self, event: AuditEvent) {
        if let Err(error) = self.auditor.record(bounded(event)) {
            tracing::warn!(%error, "batch audit event not recorded");
        }
    }

    /// Starts the driver of a job unless one runs.
    fn drive(self: &Arc<Self>, id: String) {
        let mut driven = lock(&self.driven);
        if driven.get(&id).is_some_and(|task| !task.is_finished()) {
            return;
        }
        let coordinator = self.clone();
        let key = id.clone();
        let task = tokio::spawn(async move {
            let mut stop = coordinator.stop.clone();
            loop {
                if *stop.borrow() {
                    return;
                }
                let stepped = Instant::now();
                let (watched, shards) = match coordinator.step(&id).await {
                    Ok(Step::Active { watched, shards }) => (watched, shards),
                    Ok(Step::Final) => break,
                    Err(error) => {
                        tracing::warn!(job = %id, %error, "batch job step failed; retrying");
                        (Vec::new(), 0)
                    }
                };
                // A step reads all of the job's shards: however fast
                // results come, the next one waits in proportion to them
                // (a 10-shard job not at all, one of 10,000 shards up to
                // the poll interval).
                let gap = (STEP_GAP_PER_SHARD * u32::try_from(shards).unwrap_or(u32::MAX))
                    .min(coordinator.settings.poll_interval);
                let next = async {
                    coordinator.first_result(&watched).await;
                    tokio::time::sleep_until((stepped + gap).into()).await;
                };
                tokio::select! {
                    _ = next => {}
                    _ = stop.changed() => return,
                }
            }
            lock(&coordinator.progress).remove(&id);
        });
        driven.insert(key, task);
    }

    /// Returns when one of `entries` has a result, or after a poll
    /// interval (at once for an entry the queue does not know), so a
    /// finished shard is recorded, and the next one queued, as soon as its
    /// worker answers rather than at the next poll.
    async fn first_result(&self, entries: &[JobId]) {
        let poll = self.settings.poll_interval;
        if entries.is_empty() {
            tokio::time::sleep(poll).await;
            return;
        }
        let mut waits: futures::stream::FuturesUnordered<_> =
            entries.iter().map(|id| self.queue.wait(id, poll)).collect();
        let deadline = tokio::time::sleep(poll);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                next = waits.next() => match next {
                    // A result, an entry lost, or the queue failing: the
                    // step sees which.
                    Some(Ok(JobStatus::Done(_) | JobStatus::Unknown)) | None => return,
                    // Still waiting, or the queue failing (the step
                    // retries after the poll interval).
                    Some(_) => {}
                }
            }
        }
    }

    fn stream(&self, model: &str, stream_region: &str) -> Result<StreamKey> {
        StreamKey::new(model, stream_region)
            .map_err(|error| BatchError::Internal(format!("stream of the job: {error}")))
    }

    /// Queues pending shards of the active jobs, stream by stream, while
    /// fewer than `queue_window` entries of the stream wait for a worker:
    /// jobs of higher priority first, then older jobs, each job's shards
    /// by index. So a job submitted later with a higher priority overtakes
    /// the rest of a running one, and a cancelled job's pending shards are
    /// never queued. Unless `force`, does nothing when a dispatch ran less
    /// than half a poll interval ago (every job's driver asks for one).
    async fn dispatch(&self, force: bool) -> Result<()> {
        let mut last = self.dispatched.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < self.settings.poll_interval / 2) {
            return Ok(());
        }
        *last = Some(Instant::now());
        let mut jobs = Vec::new();
        for id in self.store.active_jobs().await? {
            let Some(job) = self.store.job(&id).await? else {
                continue;
            };
            if job.state.is_final() || job.shards_done >= job.shards_total {
                continue;
            }
            let routing = self.store.routing(&id).await?;
            jobs.push((job, routing.stream_region));
        }
        // Stable: among equals, the store's order (submission) holds.
        jobs.sort_by_key(|(job, _)| (std::cmp::Reverse(job.spec.priority), job.created_at_ms));
        let mut room: HashMap<StreamKey, u64> = HashMap::new();
        let mut queued = false;
        for (job, stream_region) in &jobs {
            let stream = self.stream(&job.spec.model, stream_region)?;
            let free = match room.get(&stream) {
                Some(free) => *free,
                None => {
                    let backlog = self.queue.backlog(&stream).await?;
                    self.settings.queue_window.saturating_sub(backlog.lag)
                }
            };
            if free == 0 {
                room.insert(stream, 0);
                continue;
            }
            let shards = self.store.shards(&job.id).await?;
            let mut left = free;
            for shard in shards
                .iter()
                .filter(|shard| shard.state == ShardState::Pending)
            {
                if left == 0 {
                    break;
                }
                self.queue_shard(job, stream_region, shard, shard.attempts + 1)
                    .await?;
                left -= 1;
                queued = true;
            }
            room.insert(stream, left);
        }
        if queued {
            self.changed();
        }
        Ok(())
    }

    async fn queue_shard(
        &self,
        job: &Job,
        stream_region: &str,
        shard: &ShardRow,
        attempts: u32,
    ) -> Result<()> {
        let task = proto::ShardTask {
            job_id: job.id.clone(),
            shard_index: shard.index,
            shard_json: shard.shard_json.clone(),
            model: job.spec.model.clone(),
            version: job.version,
            output: job.spec.output.clone(),
            key_columns: job.spec.key_columns.clone(),
            input_columns: job.spec.input_columns.clone().into_iter().collect(),
            batch_size: self.settings.batch_size,
            // The worker's active key: the manifest records the key id of
            // each part from its header.
            encrypt: job.spec.encrypt,
            key_id: String::new(),
            tenant: job.spec.tenant.clone(),
        };
        let entry = QueueJob::new(
            self.stream(&job.spec.model, stream_region)?,
            task.encode_to_vec(),
        )
        .with_priority(u8::try_from(job.spec.priority).unwrap_or(9));
        let queued = self.queue.submit(entry).await?;
        self.store
            .shard_queued(&job.id, shard.index, queued.id.as_str(), attempts)
            .await?;
        self.metrics.shards_queued.inc();
        Ok(())
    }

    /// One pass over a job.
    async fn step(&self, job_id: &str) -> Result<Step> {
        let Some(job) = self.store.job(job_id).await? else {
            return Ok(Step::Final);
        };
        if job.state.is_final() {
            return Ok(Step::Final);
        }
        let routing = self.store.routing(job_id).await?;
        let shards = self.store.shards(job_id).await?;
        let mut changed = false;
        let mut taken = job.state == JobState::Running;
        let mut done = 0usize;
        let mut pending = 0usize;
        let mut queued = 0usize;
        // Entries to wait on until the next step; whether a result was
        // recorded (room on the stream: the next shards are queued now).
        let mut watched = Vec::new();
        let mut recorded = false;
        for shard in &shards {
            match shard.state {
                ShardState::Done => done += 1,
                ShardState::Failed => {
                    return self.fail(&job, shard).await.map(|()| Step::Final);
                }
                ShardState::Pending => pending += 1,
                ShardState::Queued => {
                    queued += 1;
                    let id = JobId::parse(&shard.queue_id).map_err(|error| {
                        BatchError::Internal(format!("stored queue id: {error}"))
                    })?;
                    match self.queue.status(&id).await? {
                        JobStatus::Unknown => {
                            tracing::warn!(job = %job.id, shard = shard.index, entry = %id,
                                "the batch queue does not know the shard's entry; queuing it again");
                            self.metrics.shards_requeued.inc();
                            self.queue_shard(&job, &routing.stream_region, shard, shard.attempts)
                                .await?;
                            changed = true;
                        }
                        JobStatus::Queued => watched.push(id),
                        JobStatus::Running { .. } => {
                            taken = true;
                            watched.push(id);
                        }
                        JobStatus::Done(result) => {
                            taken = true;
                            changed = true;
                            recorded = true;
                            match self.record_result(&job, shard, result.outcome).await? {
                                Recorded::Done => done += 1,
                                Recorded::Retry => pending += 1,
                                Recorded::Failed(failed) => {
                                    return self.fail(&job, &failed).await.map(|()| Step::Final);
                                }
                            }
                        }
                    }
                }
            }
        }
        if done == shards.len() {
            return self.complete(&job).await.map(|()| Step::Final);
        }
        if pending > 0 {
            self.dispatch(recorded).await?;
        }
        if !taken && job.state == JobState::Queued && queued == 0 && pending > 0 {
            // Every shard waits for room on the stream: others come first.
            let message = format!(
                "queued: waiting behind other jobs' shards for model '{}' in {} \
                 (higher priority, or submitted earlier)",
                job.spec.model,
                region_list(&routing.stream_region)
            );
            changed |= self.store.set_message(&job.id, &message).await?;
        } else if !taken && job.state == JobState::Queued {
            let waited = Duration::from_millis(
                u64::try_from(now_ms().saturating_sub(job.created_at_ms)).unwrap_or(0),
            );
            if waited >= self.settings.wait_warning_after {
                let stream = self.stream(&job.spec.model, &routing.stream_region)?;
                let backlog = self.queue.backlog(&stream).await?;
                let members = region_list(&routing.stream_region);
                let regions = if routing
                    .stream_region
                    .contains(shamal_async_queue::REGION_SET_SEPARATOR)
                {
                    format!("regions {members}")
                } else {
                    format!("region {members}")
                };
                let message = format!(
                    "waiting: no batch worker of {regions} has taken a shard for {} s \
                     ({} shards queued on stream {stream})",
                    waited.as_secs(),
                    backlog.lag
                );
                changed |= self.store.set_message(&job.id, &message).await?;
            }
        }
        if changed {
            if let Some(now) = self.store.job(job_id).await? {
                self.sample(job_id, now.done_rows);
            }
            self.changed();
        }
        Ok(Step::Active {
            watched,
            shards: shards.len(),
        })
    }

    async fn record_result(
        &self,
        job: &Job,
        shard: &ShardRow,
        outcome: Outcome,
    ) -> Result<Recorded> {
        let failure = match outcome {
            Outcome::Ok(bytes) => match proto::ShardResult::decode(bytes) {
                Ok(result) if result.part == expected_part(job, shard.index) => {
                    let done = ShardDone {
                        rows: result.rows,
                        part: result.part,
                        sha256: result.sha256,
                        bytes: result.bytes,
                        worker: result.worker,
                        region: result.region,
                    };
                    if self
                        .store
                        .shard_done(&job.id, shard.index, &shard.queue_id, &done)
                        .await?
                    {
                        self.metrics.shards_done.inc();
                        self.metrics.rows_done.inc_by(done.rows);
                        return Ok(Recorded::Done);
                    }
                    return Ok(Recorded::Retry);
                }
                Ok(result) => format!(
                    "the worker reported part '{}' for shard {} (expected '{}')",
                    result.part,
                    shard.index,
                    expected_part(job, shard.index)
                ),
                Err(error) => {
                    format!("the worker's result does not decode as a ShardResult: {error}")
                }
            },
            Outcome::Err { code, message } => {
                format!("{} ({})", message, tonic::Code::from(code).description())
            }
        };
        self.shard_attempt_failed(job, shard, &failure).await
    }

    async fn shard_attempt_failed(
        &self,
        job: &Job,
        shard: &ShardRow,
        error: &str,
    ) -> Result<Recorded> {
        self.metrics.shard_failures.inc();
        let retry = shard.attempts < self.settings.max_shard_attempts;
        tracing::warn!(job = %job.id, shard = shard.index, attempt = shard.attempts, retry, error, "shard attempt failed");
        self.store
            .shard_failed(&job.id, shard.index, &shard.queue_id, error, retry)
            .await?;
        if retry {
            Ok(Recorded::Retry)
        } else {
            Ok(Recorded::Failed(Box::new(ShardRow {
                last_error: error.to_owned(),
                ..shard.clone()
            })))
        }
    }

    async fn fail(&self, job: &Job, shard: &ShardRow) -> Result<()> {
        let message = format!(
            "shard {} ({}) failed after {} attempts: {}",
            shard.index,
            expected_part(job, shard.index),
            shard.attempts,
            shard.last_error
        );
        if self
            .store
            .finish(&job.id, JobState::Failed, &message, "")
            .await?
        {
            tracing::warn!(job = %job.id, %message, "batch job failed");
            self.metrics.active.dec();
            self.metrics.finished.with_label_values(&["FAILED"]).inc();
            let done = self.store.job(&job.id).await?;
            self.audit(AuditEvent {
                action: "batch.fail".to_owned(),
                outcome: "failed".to_owned(),
                actor: job.actor.clone(),
                tenant: job.spec.tenant.clone(),
                model: job.spec.model.clone(),
                version: job.version.to_string(),
                request_id: job.id.clone(),
                after_json: serde_json::json!({
                    "rows": done.as_ref().map_or(0, |job| job.done_rows),
                    "parts": done.as_ref().map_or(0, |job| job.shards_done),
                    "shard": shard.index,
                })
                .to_string(),
                reason: message,
                ..Default::default()
            });
            self.changed();
        }
        Ok(())
    }

    /// Every shard is done: checks each part against what its worker
    /// reported, writes the manifest last, and marks the job SUCCEEDED. A
    /// part that does not match is scored again (a failed attempt).
    async fn complete(&self, job: &Job) -> Result<()> {
        let shards = self.store.shards(&job.id).await?;
        let output = match Output::new(&job.spec.output) {
            Ok(output) => output,
            Err(error) => {
                let message = format!("output: {error}");
                if self
                    .store
                    .finish(&job.id, JobState::Failed, &message, "")
                    .await?
                {
                    self.metrics.active.dec();
                    self.metrics.finished.with_label_values(&["FAILED"]).inc();
                    self.changed();
                }
                return Ok(());
            }
        };
        // A shard can be scored by two queue entries: a coordinator that
        // died between queuing a shard and recording the entry queues it
        // again on resume, and the unrecorded entry is never followed. Its
        // part must not replace one the manifest lists (an encrypted part
        // differs at every run: a fresh nonce). So workers commit only
        // while the output has no `_SUCCESS`
        // (`StagedPart::commit_unless_finished`), and in a local directory
        // under a shared lock that this fence holds off from the checks
        // below until the manifest is written: a late duplicate finds
        // `_SUCCESS` and drops its part.
        let fence = match CommitFence::take(&output).await {
            Ok(fence) => fence,
            Err(error) => {
                return Err(BatchError::Internal(format!(
                    "cannot hold the output's commits: {error}"
                )));
            }
        };
        let mut parts = Vec::with_capacity(shards.len());
        for shard in &shards {
            let path = output.file(&shard.part);
            let mut key_id = None;
            let mut mismatch = match output.hash(&shard.part).await {
                Ok((sha256, bytes)) if sha256 == shard.sha256 && bytes == shard.bytes => None,
                Ok((sha256, bytes)) => Some(format!(
                    "part '{path}' has {bytes} bytes and SHA-256 {sha256}; its worker reported {} bytes and {}",
                    shard.bytes, shard.sha256
                )),
                Err(error) => Some(format!("part '{path}': {error}")),
            };
            if mismatch.is_none() && job.spec.encrypt {
                // The key id, from the part's own header.
                match output.blob_key_id(&shard.part).await {
                    Ok(Some(id)) => key_id = Some(id),
                    Ok(None) => {
                        mismatch = Some(format!(
                            "part '{path}' of a job with encryption on is not encrypted"
                        ));
                    }
                    Err(error) => mismatch = Some(format!("part '{path}': {error}")),
                }
            }
            if let Some(error) = mismatch {
                // Score it again: back to pending as a failed attempt.
                let requeue = ShardRow {
                    state: ShardState::Queued,
                    ..shard.clone()
                };
                self.store.reopen_shard(&job.id, shard.index).await?;
                if let Recorded::Failed(failed) =
                    self.shard_attempt_failed(job, &requeue, &error).await?
                {
                    return self.fail(job, &failed).await;
                }
                self.changed();
                return Ok(());
            }
            parts.push(PartInfo {
                name: shard.part.clone(),
                rows: shard.rows,
                sha256: shard.sha256.clone(),
                bytes: shard.bytes,
                key_id,
            });
        }
        let manifest = Manifest::new(&job.id, &job.spec.model, job.version.to_string(), parts);
        let total_rows = manifest.total_rows;
        if let Err(error) = manifest.write(output.location()).await {
            let message = format!("cannot write the manifest: {error}");
            if self
                .store
                .finish(&job.id, JobState::Failed, &message, "")
                .await?
            {
                self.metrics.active.dec();
                self.metrics.finished.with_label_values(&["FAILED"]).inc();
                self.changed();
            }
            return Ok(());
        }
        drop(fence);
        // Temporary part files of writers killed mid-shard. Removed after
        // the manifest: a writer still running then never commits, and
        // removes its own temporary file (a write to a file removed here
        // fails, or lands in a file that is gone).
        match remove_temporary_parts(&output).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(job = %job.id, removed = ?removed, "removed temporary part files left by dead writers");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "cannot remove temporary part files");
            }
        }
        let manifest_path = output.file(shamal_batch_io::MANIFEST_FILE);
        if self
            .store
            .finish(
                &job.id,
                JobState::Succeeded,
                &format!("{total_rows} rows in {} parts", shards.len()),
                &manifest_path,
            )
            .await?
        {
            tracing::info!(job = %job.id, rows = total_rows, parts = shards.len(), "batch job succeeded");
            self.metrics.active.dec();
            self.metrics
                .finished
                .with_label_values(&["SUCCEEDED"])
                .inc();
            self.audit(AuditEvent {
                action: "batch.complete".to_owned(),
                outcome: "ok".to_owned(),
                actor: job.actor.clone(),
                tenant: job.spec.tenant.clone(),
                model: job.spec.model.clone(),
                version: job.version.to_string(),
                request_id: job.id.clone(),
                after_json: serde_json::json!({
                    "rows": total_rows,
                    "parts": shards.len(),
                    "manifest": manifest_path,
                })
                .to_string(),
                ..Default::default()
            });
        } else {
            // Cancelled while the manifest was written: an output without
            // a manifest, as cancelling promises.
            let _ = output.delete(shamal_batch_io::SUCCESS_FILE).await;
            let _ = output.delete(shamal_batch_io::MANIFEST_FILE).await;
        }
        self.changed();
        Ok(())
    }
}

/// What a job's driver does after a step.
enum Step {
    /// The job is final: the driver ends.
    Final,
    /// The job goes on; the next step comes when one of these queue
    /// entries has a result, or after the poll interval.
    Active { watched: Vec<JobId>, shards: usize },
}

enum Recorded {
    Done,
    Retry,
    Failed(Box<ShardRow>),
}

/// The part name a shard of `job` is written as.
/// Longest text field the audit service accepts, in characters
/// (`shamal_audit::event::MAX_TEXT_CHARS`: `reason`, `actor`, `tenant`,
/// `model`, `version`, `request_id`, ...).
const AUDIT_MAX_TEXT_CHARS: usize = 256;
/// Longest `before_json` / `after_json` the audit service accepts, in bytes
/// (`shamal_audit::event::MAX_JSON_BYTES`).
const AUDIT_MAX_JSON_BYTES: usize = 64 * 1024;

/// `event` with every free-text field the audit service bounds cut to its
/// bound: a longer text keeps its first characters and ends in `…`; a JSON
/// field over its bound becomes `{"truncated": true, "bytes": N}` (cut
/// JSON would not parse). Fields within their bounds are unchanged.
fn bounded(mut event: AuditEvent) -> AuditEvent {
    for field in [
        &mut event.instance,
        &mut event.outcome,
        &mut event.actor,
        &mut event.client_id,
        &mut event.tenant,
        &mut event.model,
        &mut event.version,
        &mut event.region,
        &mut event.worker,
        &mut event.request_id,
        &mut event.reason,
    ] {
        if let Some((cut, _)) = field.char_indices().nth(AUDIT_MAX_TEXT_CHARS) {
            // The first 255 characters and the ellipsis: 256 in all.
            let keep = field
                .char_indices()
                .nth(AUDIT_MAX_TEXT_CHARS - 1)
                .map_or(cut, |(at, _)| at);
            field.truncate(keep);
            field.push('…');
        }
    }
    for field in [&mut event.before_json, &mut event.after_json] {
        if field.len() > AUDIT_MAX_JSON_BYTES {
            *field = serde_json::json!({"truncated": true, "bytes": field.len()}).to_string();
        }
    }
    event
}

fn expected_part(job: &Job, index: u32) -> String {
    if job.spec.encrypt {
        encrypted_part_name(index as usize)
    } else {
        part_name(index as usize)
    }
}

/// Field checks of a submit, each error naming its field.
pub fn validate(spec: &JobSpec, request_id: &str) -> Result<()> {
    if spec.model.trim().is_empty() {
        return Err(BatchError::invalid("spec.model", "is required"));
    }
    if spec.model.len() > 256 {
        return Err(BatchError::invalid(
            "spec.model",
            "is longer than 256 bytes",
        ));
    }
    if spec.version != 0 && !spec.alias.is_empty() {
        return Err(BatchError::invalid(
            "spec.alias",
            "version and alias are exclusive: name one",
        ));
    }
    if spec.input.trim().is_empty() {
        return Err(BatchError::invalid("spec.input", "is required"));
    }
    if !spec.input_format.is_empty() && Format::parse(&spec.input_format).is_none() {
        return Err(BatchError::invalid(
            "spec.input_format",
            format!("'{}' is not parquet, jsonl or csv", spec.input_format),
        ));
    }
    if spec.output.trim().is_empty() {
        return Err(BatchError::invalid("spec.output", "is required"));
    }
    shamal_batch_io::check_location(&spec.input)
        .map_err(|error| BatchError::invalid("spec.input", error.to_string()))?;
    shamal_batch_io::check_location(&spec.output)
        .map_err(|error| BatchError::invalid("spec.output", error.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for (index, key) in spec.key_columns.iter().enumerate() {
        if key.trim().is_empty() {
            return Err(BatchError::invalid(
                format!("spec.key_columns[{index}]"),
                "is empty",
            ));
        }
        if !seen.insert(key) {
            return Err(BatchError::invalid(
                format!("spec.key_columns[{index}]"),
                format!("'{key}' is listed twice"),
            ));
        }
    }
    for (index, region) in spec.regions.iter().enumerate() {
        if region.trim().is_empty() || region.contains([',', '+']) || region.len() > 64 {
            return Err(BatchError::invalid(
                format!("spec.regions[{index}]"),
                format!("'{region}' is not a region name"),
            ));
        }
    }
    if shamal_async_queue::region_set(&spec.regions).len() > 256 {
        return Err(BatchError::invalid(
            "spec.regions",
            "too many regions: their names together exceed 256 bytes",
        ));
    }
    if spec.priority > 9 {
        return Err(BatchError::invalid(
            "spec.priority",
            format!("{} is out of range 0..9", spec.priority),
        ));
    }
    for (input, column) in &spec.input_columns {
        if input.is_empty() || column.trim().is_empty() {
            return Err(BatchError::invalid(
                format!("spec.input_columns[{input}]"),
                "input and column names must not be empty",
            ));
        }
    }
    if request_id.len() > MAX_REQUEST_ID {
        return Err(BatchError::invalid(
            "request_id",
            format!("is longer than {MAX_REQUEST_ID} characters"),
        ));
    }
    Ok(())
}

/// The version a job is scored with: its alias's, its own, or the newest
/// ready one; it must be ready.
pub fn resolve_version(model: &ModelState, spec: &JobSpec) -> Result<u64> {
    let version = if !spec.alias.is_empty() {
        *model.aliases.get(&spec.alias).ok_or_else(|| {
            BatchError::NotFound(format!(
                "spec.alias: alias '{}' of model '{}' not found",
                spec.alias, spec.model
            ))
        })?
    } else if spec.version != 0 {
        spec.version
    } else {
        return model
            .versions
            .iter()
            .filter(|version| version.lifecycle == "ready")
            .map(|version| version.version)
            .max()
            .ok_or_else(|| {
                BatchError::FailedPrecondition(format!(
                    "spec.model: model '{}' has no ready version",
                    spec.model
                ))
            });
    };
    let state = model
        .versions
        .iter()
        .find(|candidate| candidate.version == version)
        .ok_or_else(|| {
            BatchError::NotFound(format!(
                "spec.version: version {version} of model '{}' not found",
                spec.model
            ))
        })?;
    if state.lifecycle != "ready" {
        return Err(BatchError::FailedPrecondition(format!(
            "spec.version: version {version} of model '{}' is {}, not ready{}",
            spec.model,
            state.lifecycle,
            if state.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", state.reason)
            }
        )));
    }
    Ok(version)
}

/// `regions` (the job's and the model's, empty: any) narrowed by the
/// residency policy of the job's tenant, which allows `allowed`.
pub fn tenant_regions(
    regions: Vec<String>,
    spec: &JobSpec,
    model: &ModelState,
    allowed: &[String],
) -> Result<Vec<String>> {
    let mut narrowed: Vec<String> = if regions.is_empty() {
        allowed.to_vec()
    } else {
        regions
            .into_iter()
            .filter(|region| allowed.contains(region))
            .collect()
    };
    narrowed.sort();
    narrowed.dedup();
    if narrowed.is_empty() {
        return Err(BatchError::FailedPrecondition(format!(
            "spec.regions: the job allows [{}], model '{}' allows [{}] and tenant '{}' allows \
             [{}]: no region is allowed by all three (empty: any)",
            spec.regions.join(", "),
            model.name,
            model.allowed_regions.join(", "),
            spec.tenant,
            allowed.join(", ")
        )));
    }
    Ok(narrowed)
}

/// The regions a job's shards may be scored in: its own list narrowed by
/// the model's residency policy (empty result: any region).
pub fn job_regions(model: &ModelState, requested: &[String]) -> Result<Vec<String>> {
    let mut regions: Vec<String> = if requested.is_empty() {
        model.allowed_regions.clone()
    } else if model.allowed_regions.is_empty() {
        requested.to_vec()
    } else {
        requested
            .iter()
            .filter(|region| model.allowed_regions.contains(region))
            .cloned()
            .collect()
    };
    regions.sort();
    regions.dedup();
    if regions.is_empty() && !(requested.is_empty() && model.allowed_regions.is_empty()) {
        return Err(BatchError::FailedPrecondition(format!(
            "spec.regions: the job allows [{}] and model '{}' allows [{}]: no region is allowed by both",
            requested.join(", "),
            model.name,
            model.allowed_regions.join(", ")
        )));
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_are_cut_to_the_audit_services_bounds() {
        let reason = format!("shard 3 of job-1 failed: {}", "é".repeat(400));
        let event = bounded(AuditEvent {
            action: "batch.fail".to_owned(),
            outcome: "failed".to_owned(),
            request_id: "job-1".to_owned(),
            model: "m".repeat(300),
            reason: reason.clone(),
            after_json: format!("[{}]", vec!["1"; 40_000].join(",")),
            before_json: "{\"rows\": 1}".to_owned(),
            ..Default::default()
        });
        assert_eq!(event.reason.chars().count(), AUDIT_MAX_TEXT_CHARS);
        assert!(event.reason.ends_with('…'), "{}", event.reason);
        let kept: String = reason.chars().take(AUDIT_MAX_TEXT_CHARS - 1).collect();
        assert!(event.reason.starts_with(&kept));
        assert_eq!(event.model.chars().count(), AUDIT_MAX_TEXT_CHARS);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&event.after_json).unwrap(),
            serde_json::json!({"truncated": true, "bytes": 80_001})
        );
        // Within bounds: unchanged.
        assert_eq!(event.action, "batch.fail");
        assert_eq!(event.outcome, "failed");
        assert_eq!(event.request_id, "job-1");
        assert_eq!(event.before_json, "{\"rows\": 1}");
        let exact = "x".repeat(AUDIT_MAX_TEXT_CHARS);
        let event = bounded(AuditEvent {
            reason: exact.clone(),
            ..Default::default()
        });
        assert_eq!(event.reason, exact);
    }
}
