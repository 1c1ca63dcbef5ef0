//! The dynamic batcher.
//!
//! One thread owns a model version's queue (a thread, not an async task, so
//! that sub-millisecond queue delays are honoured precisely: tokio timers
//! round up to whole milliseconds). When a model instance is free it
//! takes the oldest request, adds every queued request with the same
//! non-batch shapes (up to the maximum batch size, waiting at most the
//! configured queue delay for more), and hands the batch to the instance's
//! thread. Requests with different non-batch shapes are never mixed; requests
//! whose caller left or whose deadline passed are dropped before they run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
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

/// Marks one instance busy; dropping it (when the batch is done) hands the
/// instance back to the queue owner.
struct InstanceToken(Sender<()>);

impl Drop for InstanceToken {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A batch handed to an instance thread.
struct Job {
    requests: Vec<Pending>,
    _token: InstanceToken,
}

/// Handle to a model version's batcher. Dropping every handle stops the
/// batcher after it has finished the queued work; instance threads exit when
/// their channel closes.
#[derive(Clone)]
pub struct Batcher {
    model: Arc<str>,
    queue: Sender<Pending>,
    depth: Arc<AtomicUsize>,
    max_queue_size: usize,
    max_batch_size: usize,
}

impl Batcher {
    /// Starts the batcher thread and one thread per backend instance.
    pub fn start(
        model: &str,
        config: BatcherConfig,
        instances: Vec<Box<dyn Backend>>,
        stats: Arc<ModelStats>,
    ) -> Batcher {
        let (queue, receiver) = crossbeam_channel::unbounded();
        let depth = Arc::new(AtomicUsize::new(0));
        let (job_sender, job_receiver) = crossbeam_channel::unbounded::<Job>();
        let (token_sender, free_instances) = crossbeam_channel::unbounded();
        for _ in 0..instances.len() {
            let _ = token_sender.send(());
        }
        for (index, backend) in instances.into_iter().enumerate() {
            let jobs = job_receiver.clone();
            let stats = stats.clone();
            let batching = config.max_batch_size > 0;
            let spawned = std::thread::Builder::new()
                .name(format!("infer-{model}-{index}"))
                .spawn(move || instance_loop(backend, jobs, stats, batching));
            if let Err(error) = spawned {
                tracing::error!(%model, %error, "cannot start instance thread");
            }
        }
        let owner = QueueOwner {
            config: config.clone(),
            receiver,
            local: VecDeque::new(),
            depth: depth.clone(),
            free_instances,
            token_sender,
            jobs: job_sender,
            stats,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("batch-{model}"))
            .spawn(move || owner.run());
        if let Err(error) = spawned {
            tracing::error!(%model, %error, "cannot start batcher thread");
        }
        Batcher {
            model: Arc::from(model),
            queue,
            depth,
            max_queue_size: config.max_queue_size,
            max_batch_size: config.max_batch_size,
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
        let pending = Pending {
            inputs,
            rows,
            deadline,
            enqueued: Instant::now(),
            reply,
        };
        if self.queue.send(pending).is_err() {
            self.depth.fetch_sub(1, Ordering::AcqRel);
            return Err(InferError::Unavailable(self.model.to_string()));
        }
        outputs
            .await
            .unwrap_or_else(|_| Err(InferError::Unavailable(self.model.to_string())))
    }
}

/// The single owner of a model version's queue.
struct QueueOwner {
    config: BatcherConfig,
    receiver: Receiver<Pending>,
    /// Requests taken off the channel but not yet batched, oldest first.
    local: VecDeque<Pending>,
    depth: Arc<AtomicUsize>,
    /// One message per idle instance.
    free_instances: Receiver<()>,
    token_sender: Sender<()>,
    jobs: Sender<Job>,
    stats: Arc<ModelStats>,
}

impl QueueOwner {
    fn run(mut self) {
        loop {
            if self.local.is_empty() {
                match self.receiver.recv() {
                    Ok(pending) => self.local.push_back(pending),
                    // Every handle dropped: the model was unloaded.
                    Err(_) => return,
                }
            }
            // Form the batch only once an instance is free: while all are
            // busy, the queue keeps filling and the next batch is larger.
            if self.free_instances.recv().is_err() {
                return;
            }
            let token = InstanceToken(self.token_sender.clone());
            self.drain_channel();
            self.drop_abandoned();
            if self.local.is_empty() {
                continue;
            }
            let selected = self.collect_batch();
            let requests = self.take(selected);
            if requests.is_empty() {
                continue;
            }
            self.depth.fetch_sub(requests.len(), Ordering::AcqRel);
            if self
                .jobs
                .send(Job {
                    requests,
                    _token: token,
                })
                .is_err()
            {
                tracing::error!("every instance thread of a model has stopped");
                return;
            }
        }
    }

    fn drain_channel(&mut self) {
        while let Ok(pending) = self.receiver.try_recv() {
            self.local.push_back(pending);
        }
    }

    /// Answers and removes requests whose deadline passed or whose caller
    /// left, so they never reach a model instance.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let before = self.local.len();
        let mut kept = VecDeque::with_capacity(before);
        for pending in self.local.drain(..) {
            if pending.abandoned(now) {
                self.stats.record_dropped();
                let _ = pending.reply.send(Err(InferError::DeadlineExceeded));
            } else {
                kept.push_back(pending);
            }
        }
        self.local = kept;
        let dropped = before - self.local.len();
        if dropped > 0 {
            self.depth.fetch_sub(dropped, Ordering::AcqRel);
        }
    }

    /// Picks the indexes (in `local`) of the next batch: the oldest request
    /// and the compatible ones after it, waiting up to the queue delay.
    fn collect_batch(&mut self) -> Vec<usize> {
        let max_rows = self.config.max_batch_size;
        if max_rows == 0 {
            return vec![0];
        }
        let mut selected = vec![0];
        let mut rows = self.local[0].rows;
        let mut scanned = 1;
        let close_at = self.local[0].enqueued + self.config.max_queue_delay;
        loop {
            while scanned < self.local.len() && rows < max_rows {
                let candidate = &self.local[scanned];
                if candidate.compatible(&self.local[0]) && rows + candidate.rows <= max_rows {
                    rows += candidate.rows;
                    selected.push(scanned);
                }
                scanned += 1;
            }
            if rows >= max_rows || self.config.preferred_batch_sizes.contains(&rows) {
                break;
            }
            let wait = close_at.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            match self.receiver.recv_timeout(wait) {
                Ok(pending) => self.local.push_back(pending),
                // Delay over or channel closed: run what we have.
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        selected
    }

    fn take(&mut self, selected: Vec<usize>) -> Vec<Pending> {
        let mut requests = Vec::with_capacity(selected.len());
        // Remove from the back so earlier indexes stay valid, then restore
        // arrival order.
        for &index in selected.iter().rev() {
            if let Some(pending) = self.local.remove(index) {
                requests.push(pending);
            }
        }
        requests.reverse();
        requests
    }
}

fn instance_loop(
    mut backend: Box<dyn Backend>,
    jobs: Receiver<Job>,
    stats: Arc<ModelStats>,
    batching: bool,
) {
    while let Ok(job) = jobs.recv() {
        run_job(backend.as_mut(), job, &stats, batching);
    }
}

fn run_job(backend: &mut dyn Backend, job: Job, stats: &ModelStats, batching: bool) {
    let started = Instant::now();
    // A caller may have left while the batch was handed over.
    let (live, gone): (Vec<Pending>, Vec<Pending>) = job
        .requests
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
