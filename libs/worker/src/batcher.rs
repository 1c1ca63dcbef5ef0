//! The dynamic batcher.
//!
//! Each model version has one queue, shared by its instances. An instance
//! thread that is free takes the oldest request, adds every queued request
//! with the same non-batch shapes (up to the maximum batch size, waiting at
//! most the configured queue delay for more), runs the batch and answers each
//! caller with its own rows. Batches are therefore formed only when an
//! instance can run them: while all instances are busy the queue fills and
//! the next batch is larger. Requests with different non-batch shapes are
//! never mixed; requests whose caller left or whose deadline passed are
//! dropped before they run. Waiting happens on a condition variable, so
//! sub-millisecond delays are honoured (tokio timers round up to 1 ms), and a
//! request reaches its instance with a single thread hand-off.
//!
//! Two hooks of the [`Backend`] refine this. [`Backend::check`] judges each
//! request on its own before it runs, so one bad request in a batch is
//! refused alone instead of failing its neighbours. [`Backend::ragged_axes`]
//! names input axes whose size may differ within a batch (token sequences of
//! different lengths): such requests do share a batch, those inputs being
//! zero-padded to the longest, which the backend reads as absent through
//! its attention mask. Padding was preferred to bucketing by length: with
//! real text nearly every request has its own length, so exact-length
//! buckets would rarely hold more than one request, and coarse buckets need
//! the same masking anyway; padding to the longest of a batch fills batches
//! as well as fixed shapes do, at the cost of computing the padded
//! positions (bounded by the model's longest sequence).
//!
//! One shortcut skips the queue. When a model version is idle (no other
//! request of it in flight and none seen in the last 10 ms, nothing queued,
//! an instance free), its backend may run on any thread
//! ([`Backend::runs_on_any_thread`]), and its last single-request job took
//! at most [`BatcherConfig::inline_max`], the request runs at once on the
//! caller's thread. There is nothing to batch with then, and the two thread
//! hand-offs (to the instance thread and back) cost more than such a job
//! itself: on a 2-vCPU VM the demo model's concurrency-1 latency fell by
//! 50-90 µs, and a 1 ms model's by about 170 µs. The caller's thread is an
//! async runtime's, so two bounds keep inline work from starving its I/O:
//! `inline_max` keeps long jobs off it, and [`InlineSlots`] caps how many
//! requests run inline at once across all models (by default one fewer than
//! the runtime's worker threads), so at least one runtime thread is always
//! free. Under concurrency, or for a model whose single requests take
//! longer, every request goes through the queue as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use shamal_tensor::{Tensor, TensorData, concat_batch, split_batch};
use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError, InstanceDevice, RaggedAxis};
use crate::keep_awake::KeepAwake;
use crate::stats::{ExecutionRecord, ModelStats};

/// How a batcher forms batches.
#[derive(Clone, Debug)]
pub struct BatcherConfig {
    /// Largest batch in rows; 0 runs each request on its own, unchanged.
    pub max_batch_size: usize,
    /// How long the oldest request may wait for the batch to fill.
    pub max_queue_delay: Duration,
    /// Batch sizes at which the batcher stops waiting for more.
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests that may wait; beyond, submissions fail at once.
    pub max_queue_size: usize,
    /// An idle model whose last single request ran within this time runs
    /// the next one on the caller's thread (see the module documentation);
    /// zero always queues.
    pub inline_max: Duration,
    /// Shared by the model versions of a process: how many requests may
    /// run inline at once.
    pub inline_slots: InlineSlots,
}

/// Caps how many requests run inline (on async runtime threads) at once,
/// across every batcher that shares it.
#[derive(Clone, Debug)]
pub struct InlineSlots(Arc<SlotCounter>);

#[derive(Debug)]
struct SlotCounter {
    running: AtomicUsize,
    limit: usize,
}

impl InlineSlots {
    /// Slots for at most `limit` inline runs at once (at least one).
    pub fn new(limit: usize) -> InlineSlots {
        InlineSlots(Arc::new(SlotCounter {
            running: AtomicUsize::new(0),
            limit: limit.max(1),
        }))
    }

    /// Slots for one fewer than the current async runtime's worker threads
    /// (than the CPUs outside a runtime), at least one.
    pub fn for_current_runtime() -> InlineSlots {
        let threads = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .unwrap_or_else(|_| std::thread::available_parallelism().map_or(1, |cpus| cpus.get()));
        InlineSlots::new(threads.saturating_sub(1))
    }

    /// The process's slots, shared by every model it loads, sized by
    /// [`InlineSlots::for_current_runtime`] on first use.
    pub fn shared() -> InlineSlots {
        static SHARED: OnceLock<InlineSlots> = OnceLock::new();
        SHARED.get_or_init(InlineSlots::for_current_runtime).clone()
    }

    /// How many requests may run inline at once.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    fn try_take(&self) -> Option<SlotTaken<'_>> {
        let counter = &*self.0;
        counter
            .running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < counter.limit).then_some(running + 1)
            })
            .ok()
            .map(|_| SlotTaken(&counter.running))
    }
}

/// One inline run in progress; gives its slot back when dropped.
struct SlotTaken<'a>(&'a AtomicUsize);

impl Drop for SlotTaken<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a request did not produce outputs.
#[derive(Clone, Debug, thiserror::Error)]
pub enum InferError {
    #[error("queue of model '{0}' is full")]
    QueueFull(String),
    #[error("deadline exceeded before the request could run")]
    DeadlineExceeded,
    #[error("model '{0}' is unloading")]
    Unavailable(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for InferError {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::InvalidInput(message) => InferError::InvalidInput(message),
            BackendError::Internal(message) => InferError::Internal(message),
        }
    }
}

/// A request waiting in the queue.
struct Pending {
    inputs: Vec<Tensor>,
    rows: usize,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<Tensor>, InferError>>,
}

impl Pending {
    /// Requests with equal keys may share a batch: same datatypes and the
    /// same dimensions after the batch dimension, input by input, except
    /// along the backend's ragged axes (of fixed-size inputs), where sizes
    /// may differ.
    fn compatible(&self, other: &Pending, ragged: &[RaggedAxis]) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .enumerate()
                .all(|(input, (a, b))| {
                    let paddable = |axis: usize| {
                        a.datatype.element_size().is_some()
                            && ragged.contains(&RaggedAxis { input, axis })
                    };
                    a.datatype == b.datatype
                        && a.shape.len() == b.shape.len()
                        && (1..a.shape.len())
                            .all(|axis| a.shape[axis] == b.shape[axis] || paddable(axis))
                })
    }

    fn abandoned(&self, now: Instant) -> bool {
        self.reply.is_closed() || self.deadline.is_some_and(|deadline| deadline <= now)
    }
}

/// The queue shared by a model version's instances.
struct Shared {
    state: Mutex<QueueState>,
    changed: Condvar,
}

struct QueueState {
    /// Waiting requests, oldest first.
    queue: VecDeque<Pending>,
    /// Set when every `Batcher` handle is gone: instances finish the queue
    /// and exit.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Instance threads never panic while holding the lock (backends run
        // outside it), so a poisoned lock still guards a consistent queue.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes the queue when the last `Batcher` handle is dropped.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.changed.notify_all();
    }
}

/// Handle to a model version's batcher. Dropping every handle lets the
/// instance threads finish the queued work and exit.
#[derive(Clone)]
pub struct Batcher {
    model: Arc<str>,
    shared: Arc<Shared>,
    /// Present when requests may run on the caller's thread.
    inline: Option<Arc<Inline>>,
    depth: Arc<AtomicUsize>,
    max_queue_size: usize,
    max_batch_size: usize,
    device: InstanceDevice,
    _closer: Arc<Closer>,
}

impl Batcher {
    /// Starts one thread per backend instance.
    pub fn start(
        model: &str,
        config: BatcherConfig,
        instances: Vec<Box<dyn Backend>>,
        stats: Arc<ModelStats>,
    ) -> Batcher {
        let shared = Arc::new(Shared {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                closed: false,
            }),
            changed: Condvar::new(),
        });
        let depth = Arc::new(AtomicUsize::new(0));
        let device = instances
            .first()
            .map(|backend| backend.device())
            .unwrap_or_default();
        let executor = Arc::new(Executor {
            ragged: instances
                .first()
                .map(|backend| backend.ragged_axes())
                .unwrap_or_default(),
            stats,
            batching: config.max_batch_size > 0,
            last_single_ns: AtomicU64::new(u64::MAX),
        });
        let may_inline = !config.inline_max.is_zero()
            && !instances.is_empty()
            && instances.iter().all(|backend| backend.runs_on_any_thread());
        let backends: Vec<Arc<Mutex<Box<dyn Backend>>>> = instances
            .into_iter()
            .map(|backend| Arc::new(Mutex::new(backend)))
            .collect();
        let inline = may_inline.then(|| {
            Arc::new(Inline {
                backends: backends.clone(),
                executor: executor.clone(),
                max_ns: u64::try_from(config.inline_max.as_nanos()).unwrap_or(u64::MAX),
                slots: config.inline_slots.clone(),
                active: AtomicUsize::new(0),
                epoch: Instant::now(),
                queue_until_ns: AtomicU64::new(0),
            })
        });
        for (index, backend) in backends.into_iter().enumerate() {
            let instance = Instance {
                executor: executor.clone(),
                backend,
                shared: shared.clone(),
                depth: depth.clone(),
                config: config.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("infer-{model}-{index}"))
                .spawn(move || instance.run());
            if let Err(error) = spawned {
                tracing::error!(%model, %error, "cannot start instance thread");
            }
        }
        Batcher {
            model: Arc::from(model),
            shared: shared.clone(),
            inline,
            depth,
            max_queue_size: config.max_queue_size,
            max_batch_size: config.max_batch_size,
            device,
            _closer: Arc::new(Closer(shared)),
        }
    }

    /// Where the model's instances compute (as the first one reports it).
    pub fn device(&self) -> InstanceDevice {
        self.device
    }

    /// Requests waiting to run.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Queues a request and waits for its outputs. Inputs must already be
    /// validated against the model signature; `rows` is the batch dimension
    /// (1 for models that do not batch). Fails at once when the queue is
    /// full.
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<Tensor>, InferError> {
        if self.max_batch_size > 0 && rows > self.max_batch_size {
            return Err(InferError::InvalidInput(format!(
                "batch size {rows} exceeds the model's max_batch_size {}",
                self.max_batch_size
            )));
        }
        let _awake = KeepAwake::process_request();
        let _active = self.inline.as_deref().map(Active::enter);
        let (reply, outputs) = oneshot::channel();
        let pending = Pending {
            inputs,
            rows,
            deadline,
            enqueued: Instant::now(),
            reply,
        };
        if let Err(pending) = self.run_inline(pending) {
            // Reserve a queue slot first, so the bound holds under races.
            let reserved = self
                .depth
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                    (depth < self.max_queue_size).then_some(depth + 1)
                });
            if reserved.is_err() {
                return Err(InferError::QueueFull(self.model.to_string()));
            }
            self.shared.lock().queue.push_back(pending);
            // Wake every instance: an idle one may take the request, and one
            // that waits out a queue delay must see the batch grow.
            self.shared.changed.notify_all();
        }
        outputs
            .await
            .unwrap_or_else(|_| Err(InferError::Unavailable(self.model.to_string())))
    }

    /// Runs the request on this thread when the model is idle and its
    /// single requests are short (the module documentation says why); gives
    /// it back otherwise. The reply is sent before this returns.
    fn run_inline(&self, pending: Pending) -> Result<(), Pending> {
        let Some(inline) = self.inline.as_deref() else {
            return Err(pending);
        };
        // This request is the one counted: any other means concurrency,
        // where the queue batches better and instance threads keep the
        // computation off the RPC threads. Concurrency seen keeps every
        // request queued for a while, so that a busy model's passing lulls
        // do not pull single requests out of its batches.
        let now = elapsed_ns(inline.epoch);
        if inline.active.load(Ordering::Acquire) > 1 {
            inline
                .queue_until_ns
                .store(now.saturating_add(CONCURRENCY_MEMORY_NS), Ordering::Relaxed);
            return Err(pending);
        }
        if now < inline.queue_until_ns.load(Ordering::Relaxed)
            || inline.executor.last_single_ns.load(Ordering::Relaxed) > inline.max_ns
        {
            return Err(pending);
        }
        // Other models' requests may hold the runtime threads that inline
        // runs may take.
        let Some(_slot) = inline.slots.try_take() else {
            return Err(pending);
        };
        // Checked under the queue's lock: nothing queued may be overtaken.
        let state = self.shared.lock();
        if !state.queue.is_empty() {
            return Err(pending);
        }
        // A free instance: its thread is waiting for work, not computing.
        let Some(backend) = inline
            .backends
            .iter()
            .find_map(|backend| backend.try_lock().ok())
        else {
            return Err(pending);
        };
        drop(state);
        inline.executor.run(backend, vec![pending]);
        Ok(())
    }
}

fn elapsed_ns(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Runs jobs of one model version, on instance threads and inline alike.
struct Executor {
    /// The backend's ragged axes, asked once.
    ragged: Vec<RaggedAxis>,
    stats: Arc<ModelStats>,
    batching: bool,
    /// How long the last job of a single request took, wherever it ran
    /// (unknown, so too long, until the first one).
    last_single_ns: AtomicU64,
}

impl Executor {
    /// Runs `requests` on the locked backend and answers them. The backend
    /// is released and the job's time recorded before any caller hears
    /// back, so one that sends its next request at once finds the model
    /// idle.
    fn run(&self, mut backend: MutexGuard<'_, Box<dyn Backend>>, requests: Vec<Pending>) {
        let single = requests.len() == 1;
        let started = Instant::now();
        let replies = run_job(
            backend.as_mut(),
            requests,
            &self.stats,
            self.batching,
            &self.ragged,
        );
        if single {
            self.last_single_ns
                .store(elapsed_ns(started), Ordering::Relaxed);
        }
        drop(backend);
        for (pending, reply) in replies {
            let _ = pending.reply.send(reply);
        }
    }
}

/// What running requests on the caller's thread needs.
struct Inline {
    /// The instances' backends, shared with their threads.
    backends: Vec<Arc<Mutex<Box<dyn Backend>>>>,
    executor: Arc<Executor>,
    /// `BatcherConfig::inline_max`.
    max_ns: u64,
    /// `BatcherConfig::inline_slots`.
    slots: InlineSlots,
    /// Requests of this version between submission and answer.
    active: AtomicUsize,
    /// Time base of `queue_until_ns`.
    epoch: Instant,
    /// No request runs inline before this time: concurrency was seen.
    queue_until_ns: AtomicU64,
}

/// How long concurrency seen keeps requests in the queue (longer in tests,
/// which check that it does, whatever the machine's speed).
#[cfg(not(test))]
const CONCURRENCY_MEMORY_NS: u64 = 10_000_000;
#[cfg(test)]
const CONCURRENCY_MEMORY_NS: u64 = 600_000_000_000;

/// Counts a request as active until dropped.
struct Active<'a>(&'a AtomicUsize);

impl Active<'_> {
    fn enter(inline: &Inline) -> Active<'_> {
        inline.active.fetch_add(1, Ordering::AcqRel);
        Active(&inline.active)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One model instance on its own thread, pulling batches from the queue.
struct Instance {
    /// Locked by this thread for each job, and by a caller running a
    /// request inline.
    backend: Arc<Mutex<Box<dyn Backend>>>,
    executor: Arc<Executor>,
    shared: Arc<Shared>,
    depth: Arc<AtomicUsize>,
    config: BatcherConfig,
}

impl Instance {
    fn run(self) {
        while let Some(requests) = self.next_batch() {
            // Poisoned when a request run inline panicked: backends keep no
            // state between jobs that the panic could have broken, so the
            // instance goes on with it.
            let backend = self
                .backend
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.executor.run(backend, requests);
        }
    }

    /// Waits for work and takes the next batch; `None` once the queue is
    /// closed and empty.
    fn next_batch(&self) -> Option<Vec<Pending>> {
        let mut state = self.shared.lock();
        loop {
            self.drop_abandoned(&mut state.queue);
            if !state.queue.is_empty() {
                break;
            }
            if state.closed {
                return None;
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let close_at = state.queue[0].enqueued + self.config.max_queue_delay;
        let mut first = state.queue[0].enqueued;
        loop {
            let (selected, rows) = self.select(&state.queue);
            let full = self.config.max_batch_size == 0
                || rows >= self.config.max_batch_size
                || self.config.preferred_batch_sizes.contains(&rows);
            let wait = close_at.saturating_duration_since(Instant::now());
            if full || wait.is_zero() || state.closed {
                let requests = take(&mut state.queue, &selected);
                drop(state);
                self.depth.fetch_sub(requests.len(), Ordering::AcqRel);
                return Some(requests);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, wait)
                .map(|(state, _)| state)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            self.drop_abandoned(&mut state.queue);
            // Another instance may have taken the head meanwhile: start over
            // from the new head's own deadline.
            match state.queue.front() {
                Some(head) if head.enqueued == first => {}
                Some(_) | None => {
                    drop(state);
                    return self.next_batch();
                }
            }
            first = state.queue[0].enqueued;
        }
    }

    /// Indexes of the oldest request and the compatible ones after it, up to
    /// the maximum batch size, with their total rows.
    fn select(&self, queue: &VecDeque<Pending>) -> (Vec<usize>, usize) {
        let max_rows = self.config.max_batch_size;
        let mut selected = vec![0];
        let mut rows = queue[0].rows;
        if max_rows == 0 {
            return (selected, rows);
        }
        for (index, candidate) in queue.iter().enumerate().skip(1) {
            if rows >= max_rows {
                break;
            }
            if candidate.compatible(&queue[0], &self.executor.ragged)
                && rows + candidate.rows <= max_rows
            {
                rows += candidate.rows;
                selected.push(index);
            }
        }
        (selected, rows)
    }

    /// Answers and removes requests whose deadline passed or whose caller
    /// left, so they never reach the model.
    fn drop_abandoned(&self, queue: &mut VecDeque<Pending>) {
        let now = Instant::now();
        if !queue.iter().any(|pending| pending.abandoned(now)) {
            return;
        }
        let before = queue.len();
        let mut kept = VecDeque::with_capacity(before);
        for pending in queue.drain(..) {
            if pending.abandoned(now) {
                self.executor.stats.record_dropped();
                let _ = pending.reply.send(Err(InferError::DeadlineExceeded));
            } else {
                kept.push_back(pending);
            }
        }
        *queue = kept;
        self.depth.fetch_sub(before - queue.len(), Ordering::AcqRel);
    }
}

/// Removes `selected` (ascending indexes) from the queue, in arrival order.
fn take(queue: &mut VecDeque<Pending>, selected: &[usize]) -> Vec<Pending> {
    let mut requests = Vec::with_capacity(selected.len());
    for &index in selected.iter().rev() {
        if let Some(pending) = queue.remove(index) {
            requests.push(pending);
        }
    }
    requests.reverse();
    requests
}

fn run_job(
    backend: &mut dyn Backend,
    requests: Vec<Pending>,
    stats: &ModelStats,
    batching: bool,
    ragged: &[RaggedAxis],
) -> Replies {
    let started = Instant::now();
    // A caller may have left while the batch was formed.
    let (live, gone): (Vec<Pending>, Vec<Pending>) = requests
        .into_iter()
        .partition(|pending| !pending.abandoned(started));
    for pending in gone {
        stats.record_dropped();
        let _ = pending.reply.send(Err(InferError::DeadlineExceeded));
    }
    // The backend refuses bad requests one by one, before they can fail a
    // batch.
    let live: Vec<Pending> = live
        .into_iter()
        .filter_map(|pending| match backend.check(&pending.inputs) {
            Ok(()) => Some(pending),
            Err(error) => {
                let _ = pending.reply.send(Err(InferError::from(error)));
                None
            }
        })
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let queue_ns: u128 = live
        .iter()
        .map(|pending| started.duration_since(pending.enqueued).as_nanos())
        .sum();
    let rows: Vec<usize> = live.iter().map(|pending| pending.rows).collect();
    let total_rows: usize = rows.iter().sum();

    let mut requests = live;
    let input_started = Instant::now();
    let inputs = if batching && requests.len() > 1 {
        match merge_inputs(&requests, ragged) {
            Ok(inputs) => inputs,
            Err(error) => {
                fail_all(requests, &error);
                return Vec::new();
            }
        }
    } else {
        // Without batching a job holds exactly one request.
        std::mem::take(&mut requests[0].inputs)
    };
    let compute_input = input_started.elapsed();

    let compute_started = Instant::now();
    let result = backend.infer(inputs);
    let compute = compute_started.elapsed();
    let mut record = ExecutionRecord {
        batch_rows: total_rows,
        requests: requests.len(),
        queue_ns,
        compute_input,
        compute,
        compute_output: Duration::ZERO,
        success: false,
    };
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(error) => {
            stats.record_execution(record);
            fail_all(requests, &InferError::from(error));
            return Vec::new();
        }
    };
    let output_started = Instant::now();
    let replies: Vec<(Pending, Result<Vec<Tensor>, InferError>)> = if requests.len() == 1 {
        let mut outputs = Some(outputs);
        requests
            .into_iter()
            .map(|pending| (pending, Ok(outputs.take().unwrap_or_default())))
            .collect()
    } else {
        match split_outputs(&outputs, &rows) {
            Ok(per_request) => requests
                .into_iter()
                .zip(per_request.into_iter().map(Ok))
                .collect(),
            Err(error) => requests
                .into_iter()
                .map(|pending| (pending, Err(error.clone())))
                .collect(),
        }
    };
    record.compute_output = output_started.elapsed();
    record.success = replies.iter().all(|(_, reply)| reply.is_ok());
    stats.record_execution(record);
    replies
}

/// Answers of a job, sent once its backend is free again.
type Replies = Vec<(Pending, Result<Vec<Tensor>, InferError>)>;

fn merge_inputs(requests: &[Pending], ragged: &[RaggedAxis]) -> Result<Vec<Tensor>, InferError> {
    let input_count = requests[0].inputs.len();
    (0..input_count)
        .map(|index| {
            let parts: Vec<&Tensor> = requests
                .iter()
                .map(|pending| &pending.inputs[index])
                .collect();
            let padded;
            let parts = if ragged.iter().any(|axis| axis.input == index)
                && parts.iter().any(|part| part.shape != parts[0].shape)
            {
                padded = pad_to_largest(&parts)?;
                padded.iter().collect()
            } else {
                parts
            };
            concat_batch(&parts).map_err(|error| InferError::Internal(error.to_string()))
        })
        .collect()
}

/// Zero-pads every part, at the end of each axis after the first, to the
/// largest size among the parts (the batch axis keeps each part's rows).
fn pad_to_largest(parts: &[&Tensor]) -> Result<Vec<Tensor>, InferError> {
    let rank = parts[0].shape.len();
    let mut target = parts[0].shape.clone();
    for part in parts {
        if part.shape.len() != rank {
            return Err(InferError::Internal(format!(
                "cannot pad '{}': ranks differ within the batch",
                part.name
            )));
        }
        for (size, &dim) in target.iter_mut().zip(&part.shape).skip(1) {
            *size = (*size).max(dim);
        }
    }
    parts
        .iter()
        .map(|part| {
            let mut shape = target.clone();
            shape[0] = part.shape[0];
            pad_zeros(part, &shape)
        })
        .collect()
}

/// Copies `tensor` into a zero-filled tensor of shape `target` (same rank,
/// no dimension smaller), keeping every element at its index.
fn pad_zeros(tensor: &Tensor, target: &[i64]) -> Result<Tensor, InferError> {
    if tensor.shape == target {
        return Ok(tensor.clone());
    }
    let refuse = |why: &str| InferError::Internal(format!("cannot pad '{}': {why}", tensor.name));
    let (TensorData::Fixed(bytes), Some(size)) = (&tensor.data, tensor.datatype.element_size())
    else {
        return Err(refuse("only fixed-size datatypes are padded"));
    };
    let dims = |shape: &[i64]| -> Option<Vec<usize>> {
        shape.iter().map(|&dim| usize::try_from(dim).ok()).collect()
    };
    let (Some(from), Some(to)) = (dims(&tensor.shape), dims(target)) else {
        return Err(refuse("negative dimension"));
    };
    if from.len() != to.len() || from.is_empty() || from.iter().zip(&to).any(|(f, t)| f > t) {
        return Err(refuse("target shape is smaller"));
    }
    let last = from.len() - 1;
    let row_in = from[last] * size;
    let row_out = to[last] * size;
    let total: usize = to.iter().product::<usize>() * size;
    let mut out = vec![0u8; total];
    let rows: usize = from[..last].iter().product();
    for row in 0..rows {
        // The row's index in the source, re-linearised in the target.
        let mut rest = row;
        let mut target_row = 0;
        let mut stride = 1;
        for axis in (0..last).rev() {
            target_row += (rest % from[axis]) * stride;
            rest /= from[axis];
            stride *= to[axis];
        }
        let start = target_row * row_out;
        out[start..start + row_in].copy_from_slice(&bytes[row * row_in..(row + 1) * row_in]);
    }
    Ok(Tensor {
        name: tensor.name.clone(),
        datatype: tensor.datatype,
        shape: target.to_vec(),
        data: TensorData::Fixed(bytes::Bytes::from(out)),
    })
}

/// Splits every output by request rows: result[request][output].
fn split_outputs(outputs: &[Tensor], rows: &[usize]) -> Result<Vec<Vec<Tensor>>, InferError> {
    let mut per_request: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in outputs {
        let pieces = split_batch(output, rows).map_err(|error| {
            InferError::Internal(format!("model output cannot be split per request: {error}"))
        })?;
        for (request_outputs, piece) in per_request.iter_mut().zip(pieces) {
            request_outputs.push(piece);
        }
    }
    Ok(per_request)
}

fn fail_all(requests: Vec<Pending>, error: &InferError) {
    for pending in requests {
        let _ = pending.reply.send(Err(error.clone()));
    }
}

#[cfg(test)]
#[path = "batcher_tests.rs"]
mod tests;

#[cfg(test)]
mod ragged_tests {
    //! The batcher's backend hooks: per-request checks and ragged axes.
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use shamal_tensor::DataType;

    use super::*;
    use crate::stats::{ModelStats, WorkerMetrics};

    fn int64(name: &str, rows: &[Vec<i64>]) -> Tensor {
        let width = rows[0].len();
        assert!(rows.iter().all(|row| row.len() == width));
        let data: Vec<u8> = rows
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        Tensor::from_raw(
            name,
            DataType::Int64,
            vec![rows.len() as i64, width as i64],
            Bytes::from(data),
        )
        .unwrap()
    }

    fn int64_values(tensor: &Tensor) -> Vec<i64> {
        let TensorData::Fixed(bytes) = &tensor.data else {
            unreachable!()
        };
        bytes
            .chunks_exact(8)
            .map(|chunk| i64::from_le_bytes(chunk.try_into().unwrap()))
            .collect()
    }

    /// Per row: the sum of `x` where `mask` is 1 (a masked model, as an
    /// encoder is). Refuses negative values in `check`.
    struct MaskedSum {
        seen: Arc<Mutex<Vec<Vec<i64>>>>,
        ragged: bool,
    }

    impl Backend for MaskedSum {
        fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
            self.seen.lock().unwrap().push(inputs[0].shape.clone());
            let width = inputs[0].shape[1] as usize;
            let x = int64_values(&inputs[0]);
            let mask = int64_values(&inputs[1]);
            let sums: Vec<u8> = x
                .chunks(width.max(1))
                .zip(mask.chunks(width.max(1)))
                .flat_map(|(x, mask)| {
                    let sum: i64 = x.iter().zip(mask).map(|(x, m)| x * m).sum();
                    sum.to_le_bytes()
                })
                .collect();
            let rows = inputs[0].shape[0];
            Ok(vec![
                Tensor::from_raw("sum", DataType::Int64, vec![rows, 1], Bytes::from(sums)).unwrap(),
            ])
        }

        fn check(&self, inputs: &[Tensor]) -> Result<(), BackendError> {
            if int64_values(&inputs[0]).iter().any(|&v| v < 0) {
                return Err(BackendError::InvalidInput("negative value in 'x'".into()));
            }
            Ok(())
        }

        fn ragged_axes(&self) -> Vec<RaggedAxis> {
            if self.ragged {
                vec![
                    RaggedAxis { input: 0, axis: 1 },
                    RaggedAxis { input: 1, axis: 1 },
                ]
            } else {
                Vec::new()
            }
        }
    }

    fn start(ragged: bool, preferred: usize) -> (Batcher, Arc<Mutex<Vec<Vec<i64>>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backend = Box::new(MaskedSum {
            seen: seen.clone(),
            ragged,
        });
        let metrics = WorkerMetrics::new(&prometheus::Registry::new());
        let stats = Arc::new(ModelStats::new("m", "1", metrics));
        let config = BatcherConfig {
            max_batch_size: 16,
            max_queue_delay: Duration::from_secs(2),
            preferred_batch_sizes: vec![preferred],
            max_queue_size: 64,
            inline_max: Duration::ZERO,
            inline_slots: InlineSlots::new(1),
        };
        (Batcher::start("m", config, vec![backend], stats), seen)
    }

    /// `(x, mask)` requests of one row each, of different lengths.
    fn requests() -> Vec<(Vec<i64>, Vec<i64>)> {
        vec![
            (vec![1, 2], vec![1, 1]),
            (vec![10, 20, 30, 40, 50], vec![1, 1, 1, 0, 1]),
            (vec![7, 8, 9], vec![1, 1, 1]),
        ]
    }

    async fn run_all(
        batcher: &Batcher,
        requests: Vec<(Vec<i64>, Vec<i64>)>,
    ) -> Vec<Result<Vec<Tensor>, InferError>> {
        let calls = requests.into_iter().map(|(x, mask)| {
            let batcher = batcher.clone();
            async move {
                batcher
                    .infer(vec![int64("x", &[x]), int64("mask", &[mask])], 1, None)
                    .await
            }
        });
        futures::future::join_all(calls).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_of_different_lengths_share_a_zero_padded_batch() {
        let (batcher, seen) = start(true, 3);
        let results = run_all(&batcher, requests()).await;
        let sums: Vec<i64> = results
            .into_iter()
            .map(|result| int64_values(&result.unwrap()[0])[0])
            .collect();
        assert_eq!(sums, vec![3, 110, 24]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![vec![3, 5]],
            "one batch, padded to the longest"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_ragged_axes_lengths_are_never_mixed() {
        let (batcher, seen) = start(false, 3);
        // Nothing reaches the preferred size: each request waits out the
        // delay and runs alone.
        let results = run_all(&batcher, requests()).await;
        assert!(results.iter().all(Result::is_ok));
        let mut shapes = seen.lock().unwrap().clone();
        shapes.sort();
        assert_eq!(shapes, vec![vec![1, 2], vec![1, 3], vec![1, 5]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_refused_by_check_fails_alone() {
        let (batcher, seen) = start(true, 4);
        let mut requests = requests();
        requests.insert(1, (vec![1, -1, 1], vec![1, 1, 1]));
        let results = run_all(&batcher, requests).await;
        assert!(
            matches!(&results[1], Err(InferError::InvalidInput(message)) if message.contains("negative")),
            "{:?}",
            results[1]
        );
        let sums: Vec<i64> = [0, 2, 3]
            .iter()
            .map(|&index| int64_values(&results[index].as_ref().unwrap()[0])[0])
            .collect();
        assert_eq!(sums, vec![3, 110, 24]);
        assert_eq!(*seen.lock().unwrap(), vec![vec![3, 5]]);
    }

    #[test]
    fn padding_keeps_every_element_at_its_index() {
        // [2, 2, 3] -> [2, 3, 4]
        let values: Vec<i64> = (1..=12).collect();
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor =
            Tensor::from_raw("t", DataType::Int64, vec![2, 2, 3], Bytes::from(data)).unwrap();
        let padded = pad_zeros(&tensor, &[2, 3, 4]).unwrap();
        assert_eq!(padded.shape, vec![2, 3, 4]);
        #[rustfmt::skip]
        let expected = vec![
            1, 2, 3, 0,    4, 5, 6, 0,    0, 0, 0, 0,
            7, 8, 9, 0,    10, 11, 12, 0, 0, 0, 0, 0,
        ];
        assert_eq!(int64_values(&padded), expected);
        assert!(pad_zeros(&tensor, &[2, 1, 3]).is_err(), "never shrinks");
        let strings = Tensor {
            name: "s".into(),
            datatype: DataType::Bytes,
            shape: vec![1, 1],
            data: TensorData::Strings(vec![Bytes::new()]),
        };
        assert!(
            pad_zeros(&strings, &[1, 2]).is_err(),
            "BYTES are not padded"
        );
    }
}
