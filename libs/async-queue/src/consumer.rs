//! The worker loop: take, reclaim, run with bounded concurrency, write
//! results, acknowledge.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use shamal_backoff::Backoff;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::codec::validate_name;
use crate::{Delivery, Job, JobQueue, Outcome, QueueError, Result, StreamKey, deadline_outcome};

/// Which streams a consumer serves: an exact (model, region), or every
/// stream of a model, of a region, or all streams (`None` = any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSelector {
    pub model: Option<String>,
    pub region: Option<String>,
    /// Also the streams whose region is a set of regions (see
    /// [`region_set`](crate::region_set)) that holds `region`: the entries
    /// any of several regions may take.
    pub region_sets: bool,
}

impl StreamSelector {
    pub fn exact(stream: &StreamKey) -> Self {
        StreamSelector {
            model: Some(stream.model().to_owned()),
            region: Some(stream.region().to_owned()),
            region_sets: false,
        }
    }

    /// The streams of `model` that a consumer of `region` may take: its
    /// region's own, and those of every region set holding `region`.
    pub fn member(model: impl Into<String>, region: impl Into<String>) -> Self {
        StreamSelector {
            model: Some(model.into()),
            region: Some(region.into()),
            region_sets: true,
        }
    }

    pub fn model(model: impl Into<String>) -> Self {
        StreamSelector {
            model: Some(model.into()),
            region: None,
            region_sets: false,
        }
    }

    pub fn region(region: impl Into<String>) -> Self {
        StreamSelector {
            model: None,
            region: Some(region.into()),
            region_sets: false,
        }
    }

    pub fn any() -> Self {
        StreamSelector {
            model: None,
            region: None,
            region_sets: false,
        }
    }

    pub fn matches(&self, stream: &StreamKey) -> bool {
        self.model.as_deref().is_none_or(|m| m == stream.model())
            && self.region.as_deref().is_none_or(|r| {
                r == stream.region()
                    || (self.region_sets && crate::region_set_holds(stream.region(), r))
            })
    }

    /// Whether the streams it selects must be found by listing the queue's.
    fn needs_listing(&self) -> bool {
        self.region_sets || self.as_exact().is_none()
    }

    fn as_exact(&self) -> Option<StreamKey> {
        match (&self.model, &self.region) {
            (Some(m), Some(r)) => StreamKey::new(m.clone(), r.clone()).ok(),
            _ => None,
        }
    }
}

/// Configuration of [`run_consumer`].
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Name of this consumer in the group; unique per live worker process.
    pub consumer_id: String,
    pub streams: Vec<StreamSelector>,
    /// Jobs run at the same time (at least 1).
    pub concurrency: usize,
    /// Longest wait of one read for new entries; also bounds how long a
    /// shutdown waits for an ongoing read.
    pub read_block: Duration,
    /// How often abandoned entries are looked for.
    pub reclaim_interval: Duration,
    /// How often selectors with wildcards are resolved to streams again.
    pub refresh_interval: Duration,
}

impl ConsumerConfig {
    pub fn new(consumer_id: impl Into<String>, streams: Vec<StreamSelector>) -> Self {
        ConsumerConfig {
            consumer_id: consumer_id.into(),
            streams,
            concurrency: 1,
            read_block: Duration::from_millis(500),
            reclaim_interval: Duration::from_secs(1),
            refresh_interval: Duration::from_secs(2),
        }
    }

    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }
}

/// What a consumer did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Handler invocations.
    pub executed: u64,
    /// Results this consumer wrote (first write).
    pub written: u64,
    /// Results not written because the job already had one.
    pub duplicates: u64,
    /// Handler panics (the entry is left to be reclaimed).
    pub panicked: u64,
    /// Results that could not be written (backend errors).
    pub failed_writes: u64,
}

#[derive(Default)]
struct Counters {
    executed: AtomicU64,
    written: AtomicU64,
    duplicates: AtomicU64,
    panicked: AtomicU64,
    failed_writes: AtomicU64,
}

impl Counters {
    fn report(&self) -> ConsumerReport {
        ConsumerReport {
            executed: self.executed.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            panicked: self.panicked.load(Ordering::Relaxed),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
        }
    }
}

type Held = Arc<Mutex<HashMap<(StreamKey, String), Delivery>>>;

fn held_key(d: &Delivery) -> (StreamKey, String) {
    (d.job.stream.clone(), d.entry_id.clone())
}

/// Aborts a spawned task when dropped (so a stopped consumer leaves no
/// handler running).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a worker: takes jobs of the selected streams (and reclaims
/// abandoned ones), runs `handler` on at most `concurrency` at a time, writes
/// each outcome as the job's result and acknowledges the entry. Entries held
/// by this consumer are touched so they are not reclaimed while running.
///
/// When `shutdown` completes it stops taking entries, finishes those it
/// holds, and returns. A handler that panics leaves its entry unacknowledged:
/// it is reclaimed after `min_idle` and, after `max_attempts` deliveries,
/// answered `ABORTED` by the queue. Backend errors are logged and retried
/// with backoff; only an invalid configuration is an error.
pub async fn run_consumer<Q, H, Fut, S>(
    queue: Arc<Q>,
    config: ConsumerConfig,
    handler: H,
    shutdown: S,
) -> Result<ConsumerReport>
where
    Q: JobQueue + ?Sized,
    H: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
    S: Future<Output = ()> + Send,
{
    validate_name("consumer id", &config.consumer_id)?;
    if config.concurrency == 0 {
        return Err(QueueError::invalid(
            "consumer config",
            "concurrency must be at least 1",
        ));
    }
    if config.streams.is_empty() {
        return Err(QueueError::invalid(
            "consumer config",
            "no streams selected",
        ));
    }
    let handler = Arc::new(handler);
    let consumer = config.consumer_id.clone();
    let semaphore = Arc::new(Semaphore::new(config.concurrency));
    let counters = Arc::new(Counters::default());
    let held: Held = Arc::default();
    let mut buffer: VecDeque<Delivery> = VecDeque::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let touch_interval = (queue.config().min_idle / 3).max(Duration::from_millis(10));
    let has_patterns = config.streams.iter().any(StreamSelector::needs_listing);

    let mut shutdown = std::pin::pin!(shutdown.fuse());
    let mut stopping = false;
    let mut streams: Vec<StreamKey> = Vec::new();
    let mut next_refresh = Instant::now();
    let mut next_reclaim = Instant::now();
    let mut next_touch = Instant::now() + touch_interval;
    let mut backoff = backoff();

    let spawn = |tasks: &mut JoinSet<()>, d: Delivery, permit: OwnedSemaphorePermit| {
        tasks.spawn(run_one(
            Arc::clone(&queue),
            Arc::clone(&handler),
            d,
            permit,
            Arc::clone(&counters),
            Arc::clone(&held),
        ));
    };

    loop {
        while let Some(joined) = tasks.try_join_next() {
            log_join(joined);
        }
        if stopping {
            break;
        }
        let now = Instant::now();
        if now >= next_refresh {
            match resolve(queue.as_ref(), &config.streams, has_patterns).await {
                Ok(s) => streams = s,
                Err(e) => tracing::warn!(error = %e, "async consumer: cannot list streams"),
            }
            next_refresh = now + config.refresh_interval;
        }
        if now >= next_touch {
            touch_held(queue.as_ref(), &held).await;
            next_touch = now + touch_interval;
        }
        while !buffer.is_empty() {
            let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() else {
                break;
            };
            if let Some(d) = buffer.pop_front() {
                spawn(&mut tasks, d, permit);
            }
        }
        let free = semaphore.available_permits();
        if buffer.is_empty() && free > 0 && !streams.is_empty() && now >= next_reclaim {
            next_reclaim = now + config.reclaim_interval;
            match queue.reclaim(&streams, &consumer, free).await {
                Ok(got) => {
                    backoff.reset();
                    hold(&held, &mut buffer, got);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "async consumer: reclaim failed");
                }
            }
            continue;
        }
        if !buffer.is_empty() || free == 0 || streams.is_empty() {
            // Nothing to take or reclaim until a handler finishes (it wakes
            // the select) or streams appear: sleep until the next touch or
            // refresh. Not until `next_reclaim`: once passed, it stays in
            // the past while every permit is taken, and the loop would
            // spin a core for as long as the handlers run.
            let mut wake = next_touch;
            if streams.is_empty() {
                wake = wake.min(next_refresh);
            }
            tokio::select! {
                _ = &mut shutdown => stopping = true,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
                _ = tokio::time::sleep_until(wake) => {}
            }
            continue;
        }
        // Not raced with shutdown: a read is bounded by `read_block`, and
        // dropping it could leave entries delivered to us unseen.
        streams.rotate_left(1);
        let block = config.read_block.min(
            next_touch
                .min(next_reclaim)
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        );
        match queue.take(&streams, &consumer, free, block).await {
            Ok(got) => {
                backoff.reset();
                hold(&held, &mut buffer, got);
            }
            Err(e) => {
                tracing::warn!(error = %e, "async consumer: read failed");
                tokio::select! {
                    _ = &mut shutdown => stopping = true,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
        if (&mut shutdown).now_or_never().is_some() {
            stopping = true;
        }
    }

    // Shutting down: no new entries; finish the ones held.
    while !buffer.is_empty() || !tasks.is_empty() {
        while !buffer.is_empty() {
            let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() else {
                break;
            };
            if let Some(d) = buffer.pop_front() {
                spawn(&mut tasks, d, permit);
            }
        }
        tokio::select! {
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
            _ = tokio::time::sleep_until(next_touch) => {
                touch_held(queue.as_ref(), &held).await;
                next_touch = Instant::now() + touch_interval;
            }
        }
    }
    Ok(counters.report())
}

fn hold(held: &Held, buffer: &mut VecDeque<Delivery>, got: Vec<Delivery>) {
    let mut map = held.lock().unwrap_or_else(|e| e.into_inner());
    for d in got {
        map.insert(held_key(&d), d.clone());
        buffer.push_back(d);
    }
}

async fn touch_held<Q: JobQueue + ?Sized>(queue: &Q, held: &Held) {
    let list: Vec<Delivery> = held
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    if list.is_empty() {
        return;
    }
    if let Err(e) = queue.touch(&list).await {
        tracing::warn!(error = %e, "async consumer: cannot touch held entries");
    }
}

async fn resolve<Q: JobQueue + ?Sized>(
    queue: &Q,
    selectors: &[StreamSelector],
    has_patterns: bool,
) -> Result<Vec<StreamKey>> {
    let mut out: Vec<StreamKey> = selectors.iter().filter_map(|s| s.as_exact()).collect();
    if has_patterns {
        let known = queue.streams().await?;
        out.extend(
            known
                .into_iter()
                .filter(|k| selectors.iter().any(|s| s.matches(k))),
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn log_join(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && !e.is_cancelled()
    {
        tracing::error!(error = %e, "async consumer task failed");
    }
}

async fn run_one<Q, H, Fut>(
    queue: Arc<Q>,
    handler: Arc<H>,
    delivery: Delivery,
    _permit: OwnedSemaphorePermit,
    counters: Arc<Counters>,
    held: Held,
) where
    Q: JobQueue + ?Sized,
    H: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let outcome = if delivery.job.is_expired(SystemTime::now()) {
        Some(deadline_outcome())
    } else {
        counters.executed.fetch_add(1, Ordering::Relaxed);
        // A task of its own, to survive (and report) a panicking handler.
        let task = tokio::spawn(handler(delivery.job.clone()));
        let _guard = AbortOnDrop(task.abort_handle());
        match task.await {
            Ok(outcome) => Some(outcome),
            Err(e) => {
                counters.panicked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(job = %delivery.job.id, error = %e, "async job handler failed; entry left for reclaim");
                None
            }
        }
    };
    if let Some(outcome) = outcome {
        let mut backoff = backoff();
        let mut tries = 0;
        loop {
            tries += 1;
            match queue.complete(&delivery, outcome.clone()).await {
                Ok(true) => {
                    counters.written.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(false) => {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if tries < 8 && e.is_unavailable() => {
                    tracing::warn!(job = %delivery.job.id, error = %e, "async consumer: cannot write result, retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(job = %delivery.job.id, error = %e, "async consumer: result not written; entry left for reclaim");
                    break;
                }
            }
        }
    }
    held.lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&held_key(&delivery));
}

/// The consumer's backoff after a queue error: 50 ms doubling to 2 s.
fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match() {
        let s = StreamKey::new("bert", "eu").expect("valid");
        let other = StreamKey::new("bert", "us").expect("valid");
        assert!(StreamSelector::any().matches(&s));
        assert!(StreamSelector::model("bert").matches(&other));
        assert!(StreamSelector::region("eu").matches(&s));
        assert!(!StreamSelector::region("eu").matches(&other));
        assert!(StreamSelector::exact(&s).matches(&s));
        assert!(!StreamSelector::exact(&s).matches(&other));
        assert_eq!(StreamSelector::exact(&s).as_exact(), Some(s));
        assert_eq!(StreamSelector::model("bert").as_exact(), None);
    }

    #[test]
    fn member_selectors_take_the_region_sets_holding_their_region() {
        let set = StreamKey::new("bert", crate::region_set(&["us", "eu"])).expect("valid");
        assert_eq!(set.region(), "eu+us");
        let own = StreamKey::new("bert", "eu").expect("valid");
        let other = StreamKey::new("bert", "uae+us").expect("valid");
        let prefix = StreamKey::new("bert", "eu-west+us").expect("valid");
        let member = StreamSelector::member("bert", "eu");
        assert!(member.matches(&set) && member.matches(&own));
        assert!(!member.matches(&other) && !member.matches(&prefix));
        assert!(member.needs_listing());
        // A plain selector never takes a set's entries.
        assert!(!StreamSelector::exact(&own).matches(&set));
        assert!(!StreamSelector::region("eu").matches(&set));
        assert!(!StreamSelector::exact(&own).needs_listing());
        assert!(!StreamSelector::member("other", "eu").matches(&set));
    }
}
