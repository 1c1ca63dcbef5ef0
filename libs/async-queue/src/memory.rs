//! In-process backend (embedded mode): the semantics of the Redis backend on
//! tokio primitives. Nothing survives the process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::wait::{Waiters, wait_for};
use crate::{
    Backlog, Delivery, Job, JobId, JobQueue, JobResult, JobStatus, NewJob, Outcome, QueueConfig,
    QueueError, Result, StreamKey, from_ms, screen, to_ms,
};

/// In-process [`JobQueue`]. Cheap to clone (clones share the queue).
#[derive(Clone)]
pub struct MemoryQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: QueueConfig,
    state: Mutex<State>,
    new_entries: Notify,
    waiters: Waiters,
}

struct State {
    streams: BTreeMap<StreamKey, MemStream>,
    records: HashMap<JobId, Record>,
    results: HashMap<JobId, (JobResult, Instant)>,
    next_seq: u64,
    last_sweep: Instant,
}

#[derive(Default)]
struct MemStream {
    waiting: VecDeque<(u64, Job)>,
    pending: BTreeMap<u64, Pending>,
}

struct Pending {
    job: Job,
    consumer: String,
    last_delivery: Instant,
}

struct Record {
    running: Option<String>,
    attempts: u32,
    expires: Instant,
}

const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl MemoryQueue {
    pub fn new(config: QueueConfig) -> Result<Self> {
        config.validate()?;
        Ok(MemoryQueue {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    streams: BTreeMap::new(),
                    records: HashMap::new(),
                    results: HashMap::new(),
                    next_seq: 0,
                    last_sweep: Instant::now(),
                }),
                new_entries: Notify::new(),
                waiters: Waiters::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(state.last_sweep) >= SWEEP_EVERY {
            state.last_sweep = now;
            state.records.retain(|_, r| r.expires > now);
            state.results.retain(|_, (_, expires)| *expires > now);
        }
        state
    }

    fn status_now(&self, id: &JobId) -> JobStatus {
        let state = self.lock();
        let now = Instant::now();
        if let Some((result, expires)) = state.results.get(id)
            && *expires > now
        {
            return JobStatus::Done(result.clone());
        }
        match state.records.get(id) {
            Some(r) if r.expires > now => match &r.running {
                Some(consumer) => JobStatus::Running {
                    consumer: consumer.clone(),
                    attempts: r.attempts,
                },
                None => JobStatus::Queued,
            },
            _ => JobStatus::Unknown,
        }
    }

    /// Marks a job delivered to `consumer`; returns its attempt count.
    fn delivered(&self, state: &mut State, job: &Job, consumer: &str, now: Instant) -> u32 {
        let ttl = self.inner.config.result_ttl;
        let record = state.records.entry(job.id.clone()).or_insert(Record {
            running: None,
            attempts: 0,
            expires: now + ttl,
        });
        if record.expires <= now {
            record.attempts = 0;
        }
        record.attempts += 1;
        record.running = Some(consumer.to_owned());
        record.expires = record.expires.max(now + ttl);
        record.attempts
    }

    /// Stores a job's result (for `ttl`) and marks it no longer running.
    fn keep_result(state: &mut State, result: JobResult, now: Instant, ttl: Duration) {
        if let Some(r) = state.records.get_mut(&result.id) {
            r.running = None;
            r.expires = now + ttl;
        }
        state.results.insert(result.id.clone(), (result, now + ttl));
    }

    fn has_result(state: &State, id: &JobId, now: Instant) -> bool {
        state.results.get(id).is_some_and(|(_, e)| *e > now)
    }

    fn take_now(&self, streams: &[StreamKey], consumer: &str, max: usize) -> Vec<Delivery> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        // Round robin over the streams, one entry at a time.
        loop {
            let mut progressed = false;
            for key in streams {
                if out.len() >= max {
                    return out;
                }
                let Some(stream) = state.streams.get_mut(key) else {
                    continue;
                };
                let Some((seq, job)) = stream.waiting.pop_front() else {
                    continue;
                };
                progressed = true;
                if Self::has_result(&state, &job.id, now) {
                    continue;
                }
                if let Some(stream) = state.streams.get_mut(key) {
                    stream.pending.insert(
                        seq,
                        Pending {
                            job: job.clone(),
                            consumer: consumer.to_owned(),
                            last_delivery: now,
                        },
                    );
                }
                let attempts = self.delivered(&mut state, &job, consumer, now);
                out.push(Delivery {
                    job,
                    consumer: consumer.to_owned(),
                    attempts,
                    entry_id: seq.to_string(),
                });
            }
            if !progressed || out.len() >= max {
                return out;
            }
        }
    }

    fn reclaim_now(&self, streams: &[StreamKey], consumer: &str, max: usize) -> Vec<Delivery> {
        let mut state = self.lock();
        let now = Instant::now();
        let min_idle = self.inner.config.min_idle;
        let mut claimed = Vec::new();
        for key in streams {
            let Some(stream) = state.streams.get_mut(key) else {
                continue;
            };
            for (seq, p) in stream.pending.iter_mut() {
                if claimed.len() >= max {
                    break;
                }
                if now.duration_since(p.last_delivery) >= min_idle {
                    p.consumer = consumer.to_owned();
                    p.last_delivery = now;
                    claimed.push((*seq, p.job.clone()));
                }
            }
        }
        claimed
            .into_iter()
            .map(|(seq, job)| {
                let attempts = self.delivered(&mut state, &job, consumer, now);
                Delivery {
                    job,
                    consumer: consumer.to_owned(),
                    attempts,
                    entry_id: seq.to_string(),
                }
            })
            .collect()
    }
}

fn seq_of(d: &Delivery) -> Result<u64> {
    d.entry_id
        .parse()
        .map_err(|_| QueueError::invalid("delivery", "not from the in-process queue"))
}

/// Millisecond precision, as the Redis backend stores it.
fn truncate_ms(t: SystemTime) -> SystemTime {
    from_ms(to_ms(t))
}

impl JobQueue for MemoryQueue {
    fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    fn submit(&self, new: NewJob) -> BoxFuture<'_, Result<Job>> {
        async move {
            let submitted = SystemTime::now();
            let job = Job {
                id: JobId::generate(),
                stream: new.stream,
                payload: new.payload,
                submitted_at: truncate_ms(submitted),
                deadline: new.deadline.map(truncate_ms),
                priority: new.priority,
            };
            let ttl = self.inner.config.record_ttl(job.deadline, submitted);
            {
                let mut state = self.lock();
                let seq = state.next_seq;
                state.next_seq += 1;
                state.records.insert(
                    job.id.clone(),
                    Record {
                        running: None,
                        attempts: 0,
                        expires: Instant::now() + ttl,
                    },
                );
                state
                    .streams
                    .entry(job.stream.clone())
                    .or_default()
                    .waiting
                    .push_back((seq, job.clone()));
            }
            self.inner.new_entries.notify_waiters();
            Ok(job)
        }
        .boxed()
    }

    fn status<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<JobStatus>> {
        async move { Ok(self.status_now(id)) }.boxed()
    }

    fn wait<'a>(&'a self, id: &'a JobId, timeout: Duration) -> BoxFuture<'a, Result<JobStatus>> {
        async move {
            wait_for(
                &self.inner.waiters,
                id,
                timeout,
                self.inner.config.wait_recheck,
                || async { Ok(self.status_now(id)) },
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
            if max == 0 || streams.is_empty() {
                return Ok(Vec::new());
            }
            let deadline = Instant::now() + block;
            loop {
                let notified = self.inner.new_entries.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let got = self.take_now(streams, consumer, max);
                if !got.is_empty() || Instant::now() >= deadline {
                    return screen(self, got).await;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
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
            let claimed = self.reclaim_now(streams, consumer, max);
            screen(self, claimed).await
        }
        .boxed()
    }

    fn touch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Result<()>> {
        async move {
            let mut state = self.lock();
            let now = Instant::now();
            for d in deliveries {
                let seq = seq_of(d)?;
                if let Some(p) = state
                    .streams
                    .get_mut(&d.job.stream)
                    .and_then(|s| s.pending.get_mut(&seq))
                    && p.consumer == d.consumer
                {
                    p.last_delivery = now;
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn cancel<'a>(
        &'a self,
        stream: &'a StreamKey,
        id: &'a JobId,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            let won = {
                let mut state = self.lock();
                let now = Instant::now();
                let ttl = self.inner.config.result_ttl;
                let known = state.records.get(id).is_some_and(|r| r.expires > now);
                let won = known && !Self::has_result(&state, id, now);
                if won {
                    let attempts = state.records.get(id).map_or(0, |r| r.attempts);
                    let result = JobResult {
                        id: id.clone(),
                        outcome,
                        worker_id: String::new(),
                        finished_at: truncate_ms(SystemTime::now()),
                        attempts,
                    };
                    Self::keep_result(&mut state, result, now, ttl);
                    // Off the stream, so it no longer counts as lag.
                    if let Some(stream) = state.streams.get_mut(stream) {
                        stream.waiting.retain(|(_, job)| &job.id != id);
                    }
                }
                won
            };
            if won {
                self.inner.waiters.notify(id);
            }
            Ok(won)
        }
        .boxed()
    }

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: Outcome,
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            let seq = seq_of(delivery)?;
            let won = {
                let mut state = self.lock();
                let now = Instant::now();
                let ttl = self.inner.config.result_ttl;
                let won = !Self::has_result(&state, &delivery.job.id, now);
                if won {
                    let result = JobResult {
                        id: delivery.job.id.clone(),
                        outcome,
                        worker_id: delivery.consumer.clone(),
                        finished_at: truncate_ms(SystemTime::now()),
                        attempts: delivery.attempts,
                    };
                    Self::keep_result(&mut state, result, now, ttl);
                }
                if let Some(stream) = state.streams.get_mut(&delivery.job.stream) {
                    stream.pending.remove(&seq);
                }
                won
            };
            if won {
                self.inner.waiters.notify(&delivery.job.id);
            }
            Ok(won)
        }
        .boxed()
    }

    fn backlog<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, Result<Backlog>> {
        async move {
            let state = self.lock();
            Ok(state
                .streams
                .get(stream)
                .map(|s| Backlog {
                    lag: s.waiting.len() as u64,
                    pending: s.pending.len() as u64,
                })
                .unwrap_or_default())
        }
        .boxed()
    }

    fn streams(&self) -> BoxFuture<'_, Result<Vec<StreamKey>>> {
        async move { Ok(self.lock().streams.keys().cloned().collect()) }.boxed()
    }
}
