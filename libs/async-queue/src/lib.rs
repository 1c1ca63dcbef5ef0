//! Queue of asynchronous inference jobs.
//!
//! A client submits a job (an encoded v2 `ModelInferRequest`, opaque to this
//! crate) and gets its id at once. Workers take jobs from one queue per
//! (model, region), run them and write the result, which is kept for a
//! configurable time and can be fetched by id or awaited.
//!
//! Two backends implement [`JobQueue`] with the same semantics:
//!
//! - [`RedisQueue`]: Redis Streams with a consumer group, `XAUTOCLAIM` to
//!   reclaim the entries of dead consumers, results written once (`SET NX`)
//!   with an expiry, pub/sub to wake waiters. For production.
//! - [`MemoryQueue`]: the same on tokio primitives, for the embedded mode.
//!
//! Processing is at least once; results are idempotent (the first write wins),
//! so every job has exactly one visible result. [`run_consumer`] is the worker
//! loop: take, reclaim, run with bounded concurrency, write results, ack.
//!
//! See `docs/async-inference.md` for keys, semantics and configuration.

mod codec;
mod consumer;
mod memory;
mod redis_queue;
mod settings;
mod wait;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;

pub use consumer::{ConsumerConfig, ConsumerReport, StreamSelector, run_consumer};
pub use memory::MemoryQueue;
pub use redis_queue::{RedisOptions, RedisQueue};
pub use settings::{SettingError, check_shared_settings, is_redis_url};

/// gRPC status codes used in error outcomes written by the queue itself.
pub mod codes {
    /// The job's deadline passed before a worker took it.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// The job could not be decoded from the queue.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The job was delivered more than `max_attempts` times without a
    /// result (each worker that took it died or failed to finish it).
    pub const ABORTED: i32 = 10;
    /// Internal error.
    pub const INTERNAL: i32 = 13;
    /// The job was cancelled before a consumer finished it.
    pub const CANCELLED: i32 = 1;
}

/// Errors of queue operations.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// An argument (model or region name, job id, configuration) is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Data read from the backend is not what this crate wrote.
    #[error("corrupt queue data ({0})")]
    Corrupt(String),
}

impl QueueError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        QueueError::Invalid {
            what,
            reason: reason.into(),
        }
    }

    /// True when the error means the backend is unreachable or timed out
    /// (worth retrying later), as opposed to a bad argument or bad data.
    pub fn is_unavailable(&self) -> bool {
        match self {
            QueueError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
            }
            _ => false,
        }
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// Id of a job: 26 characters of Crockford base32 (48-bit millisecond
/// timestamp, 80 random bits, ULID layout). URL safe.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// A new, unique id.
    pub fn generate() -> Self {
        JobId(codec::new_ulid(now_ms(), rand::random::<u128>()))
    }

    /// Validates an id received from outside (1 to 64 characters of
    /// `[A-Za-z0-9_-]`). Any such id can be looked up; ids this crate
    /// generates always pass.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > 64 {
            return Err(QueueError::invalid("job id", "must be 1 to 64 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(QueueError::invalid(
                "job id",
                "only letters, digits, '-' and '_' are allowed",
            ));
        }
        Ok(JobId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

/// Joins region names into the region of a stream that a worker of any of
/// them may take (`eu+uae`): sorted, without repeats, joined by
/// [`REGION_SET_SEPARATOR`]. One region is its own name; none is `""`.
/// Region names must not contain the separator.
pub fn region_set<S: AsRef<str>>(regions: &[S]) -> String {
    let mut names: Vec<&str> = regions.iter().map(AsRef::as_ref).collect();
    names.sort_unstable();
    names.dedup();
    names.join(&REGION_SET_SEPARATOR.to_string())
}

/// Whether the region `set` (a name or names joined by
/// [`REGION_SET_SEPARATOR`]) holds `region`.
pub fn region_set_holds(set: &str, region: &str) -> bool {
    set.split(REGION_SET_SEPARATOR)
        .any(|member| member == region)
}

/// Separates the regions of a region set.
pub const REGION_SET_SEPARATOR: char = '+';

/// One queue: the jobs of one model in one region.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct StreamKey {
    model: String,
    region: String,
}

impl StreamKey {
    /// Model and region names may be any non-empty string of up to 256
    /// bytes; characters outside `[A-Za-z0-9._-]` are escaped in keys.
    pub fn new(model: impl Into<String>, region: impl Into<String>) -> Result<Self> {
        let model = model.into();
        let region = region.into();
        codec::validate_name("model name", &model)?;
        codec::validate_name("region name", &region)?;
        Ok(StreamKey { model, region })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn region(&self) -> &str {
        &self.region
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.model, self.region)
    }
}

/// What a client submits.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub stream: StreamKey,
    /// Opaque request bytes (an encoded v2 `ModelInferRequest`).
    pub payload: Bytes,
    /// Absolute deadline: a job taken after it is answered
    /// `DEADLINE_EXCEEDED` without running.
    pub deadline: Option<SystemTime>,
    /// Carried to the worker; does not change the order of the queue.
    pub priority: Option<u8>,
}

impl NewJob {
    pub fn new(stream: StreamKey, payload: impl Into<Bytes>) -> Self {
        NewJob {
            stream,
            payload: payload.into(),
            deadline: None,
            priority: None,
        }
    }

    pub fn with_deadline(mut self, deadline: SystemTime) -> Self {
        self.deadline = Some(deadline);
        self
    }

    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.with_deadline(SystemTime::now() + timeout)
    }

    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }
}

/// A queued job, as a worker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub stream: StreamKey,
    pub payload: Bytes,
    /// Millisecond precision.
    pub submitted_at: SystemTime,
    /// Millisecond precision.
    pub deadline: Option<SystemTime>,
    pub priority: Option<u8>,
}

impl Job {
    pub fn model(&self) -> &str {
        self.stream.model()
    }

    pub fn region(&self) -> &str {
        self.stream.region()
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

/// Result of running a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Opaque response bytes (an encoded v2 `ModelInferResponse`).
    Ok(Bytes),
    /// A gRPC status code and message.
    Err { code: i32, message: String },
}

impl Outcome {
    pub fn error(code: i32, message: impl Into<String>) -> Self {
        Outcome::Err {
            code,
            message: message.into(),
        }
    }
}

/// The stored result of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobResult {
    pub id: JobId,
    pub outcome: Outcome,
    /// Consumer id of the worker that wrote it.
    pub worker_id: String,
    /// Millisecond precision.
    pub finished_at: SystemTime,
    /// Deliveries of the job up to and including the one that finished it.
    pub attempts: u32,
}

/// What is known about a job id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Never submitted, or its record and result expired.
    Unknown,
    /// Submitted, not yet taken by a worker.
    Queued,
    /// Taken by `consumer` (the `attempts`-th delivery), no result yet.
    Running { consumer: String, attempts: u32 },
    /// Finished.
    Done(JobResult),
}

impl JobStatus {
    pub fn is_done(&self) -> bool {
        matches!(self, JobStatus::Done(_))
    }

    pub fn into_result(self) -> Option<JobResult> {
        match self {
            JobStatus::Done(r) => Some(r),
            _ => None,
        }
    }
}

/// Entries of one stream, for autoscaling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Submitted, not yet delivered to any worker.
    pub lag: u64,
    /// Delivered to a worker, not yet finished (acknowledged).
    pub pending: u64,
}

/// A job handed to a consumer. Finish it with [`JobQueue::complete`]; until
/// then it stays pending for that consumer and is reclaimed by another one
/// once it has been idle for `min_idle`.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub job: Job,
    /// The consumer it was delivered to.
    pub consumer: String,
    /// How many times the job has been delivered, this time included.
    pub attempts: u32,
    /// Backend position of the entry (Redis stream entry id).
    pub entry_id: String,
}

/// Behaviour shared by both backends.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// How long results (and the records of finished jobs) are kept. A
    /// job's record is kept at least this long after submission (plus the
    /// time to its deadline, if any) so that queued jobs are not reported
    /// unknown; set it above the longest expected queueing time.
    pub result_ttl: Duration,
    /// A delivered entry idle (not finished, not touched) for this long is
    /// considered abandoned and may be reclaimed by another consumer.
    pub min_idle: Duration,
    /// Deliveries after which a job that still has no result is answered
    /// `ABORTED` instead of being delivered again (poison message).
    pub max_attempts: u32,
    /// Waiters re-check the result at least this often, in case a
    /// notification was lost (e.g. while reconnecting).
    pub wait_recheck: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            result_ttl: Duration::from_secs(24 * 3600),
            min_idle: Duration::from_secs(60),
            max_attempts: 3,
            wait_recheck: Duration::from_secs(5),
        }
    }
}

impl QueueConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.result_ttl < Duration::from_millis(1) {
            return Err(QueueError::invalid(
                "config",
                "result_ttl must be at least 1 ms",
            ));
        }
        if self.min_idle < Duration::from_millis(1) {
            return Err(QueueError::invalid(
                "config",
                "min_idle must be at least 1 ms",
            ));
        }
        if self.max_attempts == 0 {
            return Err(QueueError::invalid(
                "config",
                "max_attempts must be at least 1",
            ));
        }
        if self.wait_recheck < Duration::from_millis(10) {
            return Err(QueueError::invalid(
                "config",
                "wait_recheck must be at least 10 ms",
            ));
        }
        Ok(())
    }

    /// Lifetime of a job record created at submission.
    pub(crate) fn record_ttl(&self, deadline: Option<SystemTime>, now: SystemTime) -> Duration {
        let until_deadline = deadline
            .and_then(|d| d.duration_since(now).ok())
            .unwrap_or_default();
        self.result_ttl.saturating_add(until_deadline)
    }
}

/// A queue of asynchronous jobs. Object safe: use `Arc<dyn JobQueue>`.
pub trait JobQueue: Send + Sync + 'static {
    fn config(&self) -> &QueueConfig;

    /// Queues a job and returns it (with its id) once it is durably queued.
    fn submit(&self, job: NewJob) -> BoxFuture<'_, Result<Job>>;

    /// What is known about `id` now.
    fn status<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<JobStatus>>;

    /// Waits until the job has a result or `timeout` passes, then returns
    /// its status. Returns at once for unknown ids. Any number of waiters
    /// may wait on the same id.
    fn wait<'a>(&'a self, id: &'a JobId, timeout: Duration) -> BoxFuture<'a, Result<JobStatus>>;

    /// Takes new entries from `streams` for `consumer`, waiting up to `block`
    /// when there are none. Returns at most `max` entries per stream (the
    /// in-process backend: in all). Jobs past their deadline and jobs
    /// delivered more than `max_attempts` times are answered by the queue
    /// and not returned.
    fn take<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
        block: Duration,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>>;

    /// Claims for `consumer` up to `max` entries of `streams` that other (or
    /// this) consumers took and left idle for at least `min_idle`. Same
    /// screening as [`take`](Self::take).
    fn reclaim<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>>;

    /// Resets the idle time of entries still held by their consumer, so that
    /// long-running jobs are not reclaimed while their worker is alive.
    fn touch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Result<()>>;

    /// Writes the result of a delivery (unless the job already has one),
    /// then acknowledges the entry. Returns whether this call's result is
    /// the one kept.
    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Answers job `id` of `stream` with `outcome` unless it has a result
    /// already, without a consumer: a consumer that reads its entry later
    /// drops it, and waiters wake with this result. A consumer already
    /// running the job may finish it, but its result is not kept. Returns
    /// whether `outcome` is the job's result (false for a job with a result
    /// already, or one the queue does not know).
    fn cancel<'a>(
        &'a self,
        stream: &'a StreamKey,
        id: &'a JobId,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Lag and pending counts of one stream.
    fn backlog<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, Result<Backlog>>;

    /// Every stream a job was ever submitted to (while the backend's data
    /// lives).
    fn streams(&self) -> BoxFuture<'_, Result<Vec<StreamKey>>>;
}

impl<Q: JobQueue + ?Sized> JobQueue for Arc<Q> {
    fn config(&self) -> &QueueConfig {
        (**self).config()
    }
    fn submit(&self, job: NewJob) -> BoxFuture<'_, Result<Job>> {
        (**self).submit(job)
    }
    fn status<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<JobStatus>> {
        (**self).status(id)
    }
    fn wait<'a>(&'a self, id: &'a JobId, timeout: Duration) -> BoxFuture<'a, Result<JobStatus>> {
        (**self).wait(id, timeout)
    }
    fn take<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
        block: Duration,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        (**self).take(streams, consumer, max, block)
    }
    fn reclaim<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        (**self).reclaim(streams, consumer, max)
    }
    fn touch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Result<()>> {
        (**self).touch(deliveries)
    }
    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>> {
        (**self).complete(delivery, outcome)
    }
    fn cancel<'a>(
        &'a self,
        stream: &'a StreamKey,
        id: &'a JobId,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>> {
        (**self).cancel(stream, id, outcome)
    }
    fn backlog<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, Result<Backlog>> {
        (**self).backlog(stream)
    }
    fn streams(&self) -> BoxFuture<'_, Result<Vec<StreamKey>>> {
        (**self).streams()
    }
}

/// Answers the deliveries that must not run (delivered too often, or past
/// their deadline) and returns the others.
pub(crate) async fn screen<Q: JobQueue + ?Sized>(
    queue: &Q,
    deliveries: Vec<Delivery>,
) -> Result<Vec<Delivery>> {
    let max_attempts = queue.config().max_attempts;
    let now = SystemTime::now();
    let mut keep = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        if d.attempts > max_attempts {
            tracing::warn!(job = %d.job.id, attempts = d.attempts, "async job abandoned: too many attempts");
            let outcome = Outcome::error(
                codes::ABORTED,
                format!(
                    "job abandoned after {} deliveries without a result (max_attempts {max_attempts})",
                    d.attempts - 1
                ),
            );
            queue.complete(&d, outcome).await?;
        } else if d.job.is_expired(now) {
            queue.complete(&d, deadline_outcome()).await?;
        } else {
            keep.push(d);
        }
    }
    Ok(keep)
}

pub(crate) fn deadline_outcome() -> Outcome {
    Outcome::error(
        codes::DEADLINE_EXCEEDED,
        "deadline exceeded before a worker took the job",
    )
}

pub(crate) fn now_ms() -> u64 {
    to_ms(SystemTime::now())
}

pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Milliseconds of a duration for Redis, at least 1.
pub(crate) fn dur_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
