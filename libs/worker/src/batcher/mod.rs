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
//! request of it in flight and none seen within
//! [`BatcherConfig::concurrency_memory`], nothing queued,
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
//!
//! The code is split by concern: `queue` (the waiting requests and their
//! batch compatibility), `inline` (the caller's-thread shortcut and its
//! slots) and `execution` (instance threads and running a job). Padding and
//! concatenation are tensor manipulation and live in `shamal_tensor`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shamal_tensor::Tensor;
use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError, InstanceDevice};
use crate::stats::ModelStats;
use shamal_idle_poll::KeepAwake;

mod execution;
mod inline;
mod queue;

use execution::{Executor, Instance};
pub use inline::InlineSlots;
use inline::{Active, Inline};
use queue::{Closer, Pending, Shared};

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
    /// How long recently seen concurrency keeps an idle model's requests on
    /// the queue instead of the inline path, so that a busy model's passing
    /// lulls do not pull single requests out of its batches;
    /// [`DEFAULT_CONCURRENCY_MEMORY`] in production.
    pub concurrency_memory: Duration,
}

/// Default of [`BatcherConfig::concurrency_memory`].
pub const DEFAULT_CONCURRENCY_MEMORY: Duration = Duration::from_millis(10);

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
        let shared = Arc::new(Shared::new());
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
                memory_ns: u64::try_from(config.concurrency_memory.as_nanos()).unwrap_or(u64::MAX),
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
        let queued = match self.inline.as_deref() {
            Some(inline) => inline.run(&self.shared, pending),
            None => Err(pending),
        };
        if let Err(pending) = queued {
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
}

fn elapsed_ns(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod inline_tests;

#[cfg(test)]
mod ragged_tests;
