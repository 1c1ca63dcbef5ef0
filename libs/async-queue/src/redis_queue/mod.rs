//! Redis Streams backend.
//!
//! Keys (prefix `shamal:async` by default; model and region percent-escaped):
//!
//! | key | type | content |
//! |---|---|---|
//! | `{prefix}:stream:{model}:{region}` | stream | queued jobs, consumer group `workers` |
//! | `{prefix}:job:{id}` | hash | `state`, `attempts`, `consumer`, `entry`; expires |
//! | `{prefix}:result:{id}` | string | encoded [`JobResult`], written once (`SET NX PX`) |
//! | `{prefix}:streams` | set | `{model}:{region}` of every stream |
//! | `{prefix}:done` | pub/sub channel | id of each job whose result was just written |
//!
//! Every multi-key step (submit, mark delivered, complete, touch, backlog) is
//! one Lua script, so it is atomic and a crash cannot leave half of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{Client, RedisError, Value};
use tokio::task::AbortHandle;

mod entries;
mod notify;
mod scripts;

use self::entries::{BadEntry, member, parse_entry, parse_member};
use self::notify::subscriber;
use self::scripts::{
    BACKLOG, BACKLOG_SCRIPT, COMPLETE, COMPLETE_SCRIPT, MARK_DELIVERED, MARK_SCRIPT, SUBMIT,
    SUBMIT_SCRIPT, TOUCH, TOUCH_SCRIPT, script,
};
use crate::codec::{decode_result, encode_result, validate_name};
use crate::wait::{Waiters, wait_for};
use crate::{
    Backlog, Delivery, Job, JobId, JobQueue, JobResult, JobStatus, NewJob, Outcome, QueueConfig,
    QueueError, Result, StreamKey, codes, dur_ms, from_ms, screen, to_ms,
};

/// Where and how to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key (default `shamal:async`); lets several
    /// deployments or tests share one Redis.
    pub key_prefix: String,
    /// Consumer group of the workers (default `workers`).
    pub group: String,
    /// Time limit of one non-blocking command (default 5 s).
    pub command_timeout: Duration,
}

impl RedisOptions {
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            key_prefix: "shamal:async".into(),
            group: "workers".into(),
            command_timeout: Duration::from_secs(5),
        }
    }

    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }
}

/// [`JobQueue`] on Redis Streams. Cheap to clone (clones share connections).
/// Reconnects by itself after Redis restarts; commands issued while Redis is
/// unreachable fail with [`QueueError::Redis`].
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: QueueConfig,
    opts: RedisOptions,
    client: Client,
    conn: ConnectionManager,
    /// Connections for blocking reads (a blocked command would stall every
    /// other command multiplexed on the shared connection).
    blocking: Mutex<Vec<ConnectionManager>>,
    waiters: Arc<Waiters>,
    subscriber: OnceLock<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.subscriber.get() {
            task.abort();
        }
    }
}

fn validate_consumer(consumer: &str) -> Result<()> {
    validate_name("consumer id", consumer)
}

fn is_code(e: &RedisError, code: &str) -> bool {
    e.code() == Some(code)
}

impl RedisQueue {
    /// Connects (fails if Redis is unreachable now; later outages are
    /// survived by reconnecting).
    pub async fn connect(opts: RedisOptions, config: QueueConfig) -> Result<Self> {
        config.validate()?;
        if opts.key_prefix.is_empty() || opts.key_prefix.chars().any(char::is_whitespace) {
            return Err(QueueError::invalid(
                "key prefix",
                "must be non-empty without whitespace",
            ));
        }
        validate_name("consumer group", &opts.group)?;
        let client = Client::open(opts.url.as_str())?;
        let conn = ConnectionManager::new_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(opts.command_timeout))
                .set_connection_timeout(Some(opts.command_timeout))
                .set_number_of_retries(4)
                .set_max_delay(Duration::from_secs(2)),
        )
        .await?;
        Ok(RedisQueue {
            inner: Arc::new(Inner {
                config,
                opts,
                client,
                conn,
                blocking: Mutex::new(Vec::new()),
                waiters: Arc::new(Waiters::default()),
                subscriber: OnceLock::new(),
            }),
        })
    }

    pub fn options(&self) -> &RedisOptions {
        &self.inner.opts
    }

    fn prefix(&self) -> &str {
        &self.inner.opts.key_prefix
    }

    fn group(&self) -> &str {
        &self.inner.opts.group
    }

    /// Redis key of a stream.
    pub fn stream_key(&self, stream: &StreamKey) -> String {
        format!("{}:stream:{}", self.prefix(), member(stream))
    }

    fn job_key(&self, id: &JobId) -> String {
        format!("{}:job:{id}", self.prefix())
    }

    fn result_key(&self, id: &JobId) -> String {
        format!("{}:result:{id}", self.prefix())
    }

    fn streams_key(&self) -> String {
        format!("{}:streams", self.prefix())
    }

    fn channel(&self) -> String {
        format!("{}:done", self.prefix())
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    async fn blocking_conn(&self) -> Result<ConnectionManager> {
        let pooled = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        Ok(ConnectionManager::new_with_config(
            self.inner.client.clone(),
            ConnectionManagerConfig::new()
                .set_response_timeout(None)
                .set_connection_timeout(Some(self.inner.opts.command_timeout))
                .set_number_of_retries(2),
        )
        .await?)
    }

    fn return_blocking_conn(&self, conn: ConnectionManager) {
        let mut pool = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pool.len() < 16 {
            pool.push(conn);
        }
    }

    async fn ensure_groups(&self, keys: &[String]) -> Result<()> {
        let mut conn = self.conn();
        for key in keys {
            let created: std::result::Result<Value, RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(self.group())
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(_) => {}
                Err(e) if is_code(&e, "BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn read_group(
        &self,
        keys: &[String],
        consumer: &str,
        max: usize,
        block: Duration,
    ) -> Result<Option<StreamReadReply>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.group())
            .arg(consumer)
            .arg("COUNT")
            .arg(max);
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(dur_ms(block));
        }
        cmd.arg("STREAMS").arg(keys);
        for _ in keys {
            cmd.arg(">");
        }
        if block.is_zero() {
            return Ok(cmd.query_async(&mut self.conn()).await?);
        }
        let mut conn = self.blocking_conn().await?;
        let limit = block + self.inner.opts.command_timeout;
        match tokio::time::timeout(limit, cmd.query_async(&mut conn)).await {
            Ok(Ok(reply)) => {
                self.return_blocking_conn(conn);
                Ok(reply)
            }
            Ok(Err(e)) => {
                if !e.is_unrecoverable_error() {
                    self.return_blocking_conn(conn);
                }
                Err(e.into())
            }
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "blocking XREADGROUP timed out",
            ))
            .into()),
        }
    }

    /// Turns raw stream entries of one stream into deliveries: marks them
    /// delivered (attempt count), drops those already finished, answers
    /// undecodable ones.
    async fn deliver(
        &self,
        stream: &StreamKey,
        entries: &[StreamId],
        consumer: &str,
    ) -> Result<Vec<Delivery>> {
        let stream_key = self.stream_key(stream);
        let mut jobs = Vec::with_capacity(entries.len());
        for entry in entries {
            match parse_entry(stream, entry) {
                Ok(job) => jobs.push((entry.id.clone(), job)),
                Err(bad) => {
                    self.drop_bad_entry(stream, &stream_key, consumer, bad)
                        .await?
                }
            }
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = script(&MARK_SCRIPT, MARK_DELIVERED).prepare_invoke();
        inv.key(&stream_key);
        for (_, job) in &jobs {
            inv.key(self.job_key(&job.id));
            inv.key(self.result_key(&job.id));
        }
        inv.arg(self.group())
            .arg(consumer)
            .arg(dur_ms(self.inner.config.result_ttl));
        for (entry_id, _) in &jobs {
            inv.arg(entry_id);
        }
        let attempts: Vec<i64> = inv.invoke_async(&mut self.conn()).await?;
        if attempts.len() != jobs.len() {
            return Err(QueueError::Corrupt(
                "unexpected reply of mark script".into(),
            ));
        }
        Ok(jobs
            .into_iter()
            .zip(attempts)
            .filter(|(_, a)| *a > 0)
            .map(|((entry_id, job), a)| Delivery {
                job,
                consumer: consumer.to_owned(),
                attempts: u32::try_from(a).unwrap_or(u32::MAX),
                entry_id,
            })
            .collect())
    }

    async fn drop_bad_entry(
        &self,
        stream: &StreamKey,
        stream_key: &str,
        consumer: &str,
        bad: BadEntry,
    ) -> Result<()> {
        tracing::error!(stream = %stream, entry = %bad.entry_id, reason = %bad.reason, "undecodable async job entry");
        match bad.id {
            Some(id) => {
                let delivery = Delivery {
                    job: Job {
                        id,
                        stream: stream.clone(),
                        payload: Bytes::new(),
                        submitted_at: SystemTime::now(),
                        deadline: None,
                        priority: None,
                    },
                    consumer: consumer.to_owned(),
                    attempts: 1,
                    entry_id: bad.entry_id,
                };
                let outcome = Outcome::error(
                    codes::INVALID_ARGUMENT,
                    format!("queued job cannot be decoded: {}", bad.reason),
                );
                self.complete_inner(&delivery, outcome).await?;
            }
            None => {
                let _: Value = redis::pipe()
                    .cmd("XACK")
                    .arg(stream_key)
                    .arg(self.group())
                    .arg(&bad.entry_id)
                    .cmd("XDEL")
                    .arg(stream_key)
                    .arg(&bad.entry_id)
                    .query_async(&mut self.conn())
                    .await?;
            }
        }
        Ok(())
    }

    async fn status_now(&self, id: &JobId) -> Result<JobStatus> {
        let (result, record): (Option<Vec<u8>>, HashMap<String, String>) = redis::pipe()
            .cmd("GET")
            .arg(self.result_key(id))
            .cmd("HGETALL")
            .arg(self.job_key(id))
            .query_async(&mut self.conn())
            .await?;
        if let Some(data) = result {
            return Ok(JobStatus::Done(decode_result(id, &data)?));
        }
        Ok(match record.get("state").map(String::as_str) {
            Some("running") => JobStatus::Running {
                consumer: record.get("consumer").cloned().unwrap_or_default(),
                attempts: record
                    .get("attempts")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0),
            },
            Some("queued") => JobStatus::Queued,
            // "done" without a result: the result expired first.
            _ => JobStatus::Unknown,
        })
    }

    async fn cancel_inner(&self, stream: &StreamKey, id: &JobId, outcome: Outcome) -> Result<bool> {
        let attempts = match self.status_now(id).await? {
            JobStatus::Queued => 0,
            JobStatus::Running { attempts, .. } => attempts,
            JobStatus::Done(_) | JobStatus::Unknown => return Ok(false),
        };
        let result = JobResult {
            id: id.clone(),
            outcome,
            worker_id: String::new(),
            finished_at: SystemTime::now(),
            attempts,
        };
        // No entry to acknowledge: a consumer reading it later
        // acknowledges and drops it (MARK_DELIVERED).
        self.write_result(stream, &result, "").await
    }

    /// Writes `result` unless the job has one (COMPLETE: the result, the
    /// job's state, the notification), acknowledging and deleting stream
    /// entry `entry_id` unless it is empty. Returns whether it was written.
    async fn write_result(
        &self,
        stream: &StreamKey,
        result: &JobResult,
        entry_id: &str,
    ) -> Result<bool> {
        let won: i64 = script(&COMPLETE_SCRIPT, COMPLETE)
            .key(self.result_key(&result.id))
            .key(self.job_key(&result.id))
            .key(self.stream_key(stream))
            .arg(encode_result(result))
            .arg(dur_ms(self.inner.config.result_ttl))
            .arg(self.group())
            .arg(entry_id)
            .arg(self.channel())
            .arg(result.id.as_str())
            .invoke_async(&mut self.conn())
            .await?;
        if won == 1 {
            // Local waiters need not wait for the round trip through pub/sub.
            self.inner.waiters.notify(&result.id);
        }
        Ok(won == 1)
    }

    async fn complete_inner(&self, delivery: &Delivery, outcome: Outcome) -> Result<bool> {
        let result = JobResult {
            id: delivery.job.id.clone(),
            outcome,
            worker_id: delivery.consumer.clone(),
            finished_at: SystemTime::now(),
            attempts: delivery.attempts,
        };
        self.write_result(&delivery.job.stream, &result, &delivery.entry_id)
            .await
    }

    fn ensure_subscriber(&self) {
        self.inner.subscriber.get_or_init(|| {
            let client = self.inner.client.clone();
            let channel = self.channel();
            let waiters = Arc::clone(&self.inner.waiters);
            let timeout = self.inner.opts.command_timeout;
            tokio::spawn(subscriber(client, channel, waiters, timeout)).abort_handle()
        });
    }
}

impl JobQueue for RedisQueue {
    fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    fn submit(&self, new: NewJob) -> BoxFuture<'_, Result<Job>> {
        async move {
            let now = SystemTime::now();
            let job = Job {
                id: JobId::generate(),
                stream: new.stream,
                payload: new.payload,
                submitted_at: from_ms(to_ms(now)),
                deadline: new.deadline.map(|d| from_ms(to_ms(d))),
                priority: new.priority,
            };
            let ttl = self.inner.config.record_ttl(job.deadline, now);
            let mut inv = script(&SUBMIT_SCRIPT, SUBMIT).prepare_invoke();
            inv.key(self.stream_key(&job.stream))
                .key(self.job_key(&job.id))
                .key(self.streams_key())
                .arg(self.group())
                .arg(dur_ms(ttl))
                .arg(member(&job.stream))
                .arg("id")
                .arg(job.id.as_str())
                .arg("submitted")
                .arg(to_ms(job.submitted_at));
            if let Some(d) = job.deadline {
                inv.arg("deadline").arg(to_ms(d));
            }
            if let Some(p) = job.priority {
                inv.arg("priority").arg(p);
            }
            inv.arg("payload").arg(job.payload.as_ref());
            let _entry: String = inv.invoke_async(&mut self.conn()).await?;
            Ok(job)
        }
        .boxed()
    }

    fn status<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<JobStatus>> {
        self.status_now(id).boxed()
    }

    fn wait<'a>(&'a self, id: &'a JobId, timeout: Duration) -> BoxFuture<'a, Result<JobStatus>> {
        async move {
            self.ensure_subscriber();
            wait_for(
                &self.inner.waiters,
                id,
                timeout,
                self.inner.config.wait_recheck,
                || self.status_now(id),
            )
            .await
        }
        .boxed()
    }

    fn take<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
        block: Duration,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        async move {
            validate_consumer(consumer)?;
            if max == 0 || streams.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = streams.iter().map(|s| self.stream_key(s)).collect();
            let reply = match self.read_group(&keys, consumer, max, block).await {
                Err(QueueError::Redis(e)) if is_code(&e, "NOGROUP") => {
                    // A stream nobody submitted to yet, or Redis lost its data.
                    self.ensure_groups(&keys).await?;
                    self.read_group(&keys, consumer, max, block).await?
                }
                other => other?,
            };
            let by_key: HashMap<&str, &StreamKey> = keys
                .iter()
                .map(String::as_str)
                .zip(streams.iter())
                .collect();
            let mut out = Vec::new();
            for read in reply.map(|r| r.keys).unwrap_or_default() {
                let Some(stream) = by_key.get(read.key.as_str()) else {
                    continue;
                };
                out.extend(self.deliver(stream, &read.ids, consumer).await?);
            }
            screen(self, out).await
        }
        .boxed()
    }

    fn reclaim<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        async move {
            validate_consumer(consumer)?;
            let min_idle = dur_ms(self.inner.config.min_idle);
            let mut out = Vec::new();
            for stream in streams {
                let key = self.stream_key(stream);
                let mut cursor = "0-0".to_owned();
                // XAUTOCLAIM scans a bounded part of the pending list per
                // call; follow the cursor a few times.
                for _ in 0..8 {
                    if out.len() >= max {
                        break;
                    }
                    let reply: std::result::Result<StreamAutoClaimReply, RedisError> =
                        redis::cmd("XAUTOCLAIM")
                            .arg(&key)
                            .arg(self.group())
                            .arg(consumer)
                            .arg(min_idle)
                            .arg(&cursor)
                            .arg("COUNT")
                            .arg(max - out.len())
                            .query_async(&mut self.conn())
                            .await;
                    let reply = match reply {
                        Err(e) if is_code(&e, "NOGROUP") => break,
                        other => other?,
                    };
                    out.extend(self.deliver(stream, &reply.claimed, consumer).await?);
                    if reply.next_stream_id == "0-0" {
                        break;
                    }
                    cursor = reply.next_stream_id;
                }
            }
            screen(self, out).await
        }
        .boxed()
    }

    fn touch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut by_stream: HashMap<(&StreamKey, &str), Vec<&str>> = HashMap::new();
            for d in deliveries {
                by_stream
                    .entry((&d.job.stream, d.consumer.as_str()))
                    .or_default()
                    .push(d.entry_id.as_str());
            }
            for ((stream, consumer), ids) in by_stream {
                let mut inv = script(&TOUCH_SCRIPT, TOUCH).prepare_invoke();
                inv.key(self.stream_key(stream))
                    .arg(self.group())
                    .arg(consumer)
                    .arg(ids);
                let _: Value = inv.invoke_async(&mut self.conn()).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>> {
        self.complete_inner(delivery, outcome).boxed()
    }

    fn cancel<'a>(
        &'a self,
        stream: &'a StreamKey,
        id: &'a JobId,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>> {
        self.cancel_inner(stream, id, outcome).boxed()
    }

    fn backlog<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, Result<Backlog>> {
        async move {
            let (len, pending): (u64, u64) = script(&BACKLOG_SCRIPT, BACKLOG)
                .key(self.stream_key(stream))
                .arg(self.group())
                .invoke_async(&mut self.conn())
                .await?;
            Ok(Backlog {
                lag: len.saturating_sub(pending),
                pending,
            })
        }
        .boxed()
    }

    fn streams(&self) -> BoxFuture<'_, Result<Vec<StreamKey>>> {
        async move {
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.streams_key())
                .query_async(&mut self.conn())
                .await?;
            let mut streams: Vec<StreamKey> =
                members.iter().filter_map(|m| parse_member(m)).collect();
            streams.sort();
            Ok(streams)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip() {
        let s = StreamKey::new("my:model v2", "eu-west/1").expect("valid");
        let m = member(&s);
        assert_eq!(m.matches(':').count(), 1);
        assert_eq!(parse_member(&m), Some(s));
        assert_eq!(parse_member("no-separator"), None);
    }
}
