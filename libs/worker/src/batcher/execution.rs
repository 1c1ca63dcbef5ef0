//! Execution: instance threads that pull batches from the queue, and the
//! job that runs a batch on a backend and answers each request with its
//! own rows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shamal_tensor::{Tensor, concat_batch, concat_batch_padded, split_batch};

use super::queue::{Pending, Shared, take};
use super::{BatcherConfig, InferError, elapsed_ns};
use crate::backend::{Backend, RaggedAxis};
use crate::stats::{ExecutionRecord, ModelStats};

/// Runs jobs of one model version, on instance threads and inline alike.
pub(super) struct Executor {
    /// The backend's ragged axes, asked once.
    pub(super) ragged: Vec<RaggedAxis>,
    pub(super) stats: Arc<ModelStats>,
    pub(super) batching: bool,
    /// How long the last job of a single request took, wherever it ran
    /// (unknown, so too long, until the first one).
    pub(super) last_single_ns: AtomicU64,
}

impl Executor {
    /// Runs `requests` on the locked backend and answers them. The backend
    /// is released and the job's time recorded before any caller hears
    /// back, so one that sends its next request at once finds the model
    /// idle.
    pub(super) fn run(
        &self,
        mut backend: MutexGuard<'_, Box<dyn Backend>>,
        requests: Vec<Pending>,
    ) {
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

/// One model instance on its own thread, pulling batches from the queue.
pub(super) struct Instance {
    /// Locked by this thread for each job, and by a caller running a
    /// request inline.
    pub(super) backend: Arc<Mutex<Box<dyn Backend>>>,
    pub(super) executor: Arc<Executor>,
    pub(super) shared: Arc<Shared>,
    pub(super) depth: Arc<AtomicUsize>,
    pub(super) config: BatcherConfig,
}

impl Instance {
    pub(super) fn run(self) {
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

/// Merges the requests' inputs into one batch, input by input: zero-padded
/// to the largest where the backend declared the input ragged and sizes
/// differ (see the batcher's documentation).
fn merge_inputs(requests: &[Pending], ragged: &[RaggedAxis]) -> Result<Vec<Tensor>, InferError> {
    let input_count = requests[0].inputs.len();
    (0..input_count)
        .map(|index| {
            let parts: Vec<&Tensor> = requests
                .iter()
                .map(|pending| &pending.inputs[index])
                .collect();
            let merged = if ragged.iter().any(|axis| axis.input == index) {
                concat_batch_padded(&parts)
            } else {
                concat_batch(&parts)
            };
            merged.map_err(|error| InferError::Internal(error.to_string()))
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
