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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shamal_tensor::{Tensor, concat_batch, split_batch};
use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError};
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
    /// same dimensions after the batch dimension, input by input.
    fn compatible(&self, other: &Pending) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.datatype == b.datatype && a.shape.get(1..) == b.shape.get(1..))
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
    depth: Arc<AtomicUsize>,
    max_queue_size: usize,
    max_batch_size: usize,
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
        for (index, backend) in instances.into_iter().enumerate() {
            let instance = Instance {
                backend,
                shared: shared.clone(),
                depth: depth.clone(),
                config: config.clone(),
                stats: stats.clone(),
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
            depth,
            max_queue_size: config.max_queue_size,
            max_batch_size: config.max_batch_size,
            _closer: Arc::new(Closer(shared)),
        }
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
        // Reserve a queue slot first, so the bound holds under races.
        let reserved = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                (depth < self.max_queue_size).then_some(depth + 1)
            });
        if reserved.is_err() {
            return Err(InferError::QueueFull(self.model.to_string()));
        }
        let (reply, outputs) = oneshot::channel();
        self.shared.lock().queue.push_back(Pending {
            inputs,
            rows,
            deadline,
            enqueued: Instant::now(),
            reply,
        });
        // Wake every instance: an idle one may take the request, and one
        // that waits out a queue delay must see the batch grow.
        self.shared.changed.notify_all();
        outputs
            .await
            .unwrap_or_else(|_| Err(InferError::Unavailable(self.model.to_string())))
    }
}

/// One model instance on its own thread, pulling batches from the queue.
struct Instance {
    backend: Box<dyn Backend>,
    shared: Arc<Shared>,
    depth: Arc<AtomicUsize>,
    config: BatcherConfig,
    stats: Arc<ModelStats>,
}

impl Instance {
    fn run(mut self) {
        let batching = self.config.max_batch_size > 0;
        while let Some(requests) = self.next_batch() {
            run_job(self.backend.as_mut(), requests, &self.stats, batching);
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
            if candidate.compatible(&queue[0]) && rows + candidate.rows <= max_rows {
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
                self.stats.record_dropped();
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

fn run_job(backend: &mut dyn Backend, requests: Vec<Pending>, stats: &ModelStats, batching: bool) {
    let started = Instant::now();
    // A caller may have left while the batch was formed.
    let (live, gone): (Vec<Pending>, Vec<Pending>) = requests
        .into_iter()
        .partition(|pending| !pending.abandoned(started));
    for pending in gone {
        stats.record_dropped();
        let _ = pending.reply.send(Err(InferError::DeadlineExceeded));
    }
    if live.is_empty() {
        return;
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
        match merge_inputs(&requests) {
            Ok(inputs) => inputs,
            Err(error) => {
                fail_all(requests, &error);
                return;
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
            return;
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
    for (pending, reply) in replies {
        let _ = pending.reply.send(reply);
    }
}

fn merge_inputs(requests: &[Pending]) -> Result<Vec<Tensor>, InferError> {
    let input_count = requests[0].inputs.len();
    (0..input_count)
        .map(|index| {
            let parts: Vec<&Tensor> = requests
                .iter()
                .map(|pending| &pending.inputs[index])
                .collect();
            concat_batch(&parts).map_err(|error| InferError::Internal(error.to_string()))
        })
        .collect()
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
