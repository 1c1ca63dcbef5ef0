//! The inline path: an idle model's short requests run on the caller's
//! thread (the batcher's documentation says when and why), within the
//! process's [`InlineSlots`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::elapsed_ns;
use super::execution::Executor;
use super::queue::{Pending, Shared};
use crate::backend::Backend;

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

/// What running requests on the caller's thread needs.
pub(super) struct Inline {
    /// The instances' backends, shared with their threads.
    pub(super) backends: Vec<Arc<Mutex<Box<dyn Backend>>>>,
    pub(super) executor: Arc<Executor>,
    /// `BatcherConfig::inline_max`.
    pub(super) max_ns: u64,
    /// `BatcherConfig::inline_slots`.
    pub(super) slots: InlineSlots,
    /// Requests of this version between submission and answer.
    pub(super) active: AtomicUsize,
    /// `BatcherConfig::concurrency_memory`.
    pub(super) memory_ns: u64,
    /// Time base of `queue_until_ns`.
    pub(super) epoch: Instant,
    /// No request runs inline before this time: concurrency was seen.
    pub(super) queue_until_ns: AtomicU64,
}

impl Inline {
    /// Runs the request on this thread when the model is idle and its
    /// single requests are short (the batcher's documentation says why); gives
    /// it back otherwise. The reply is sent before this returns.
    pub(super) fn run(&self, shared: &Shared, pending: Pending) -> Result<(), Pending> {
        // This request is the one counted: any other means concurrency,
        // where the queue batches better and instance threads keep the
        // computation off the RPC threads. Concurrency seen keeps every
        // request queued for a while, so that a busy model's passing lulls
        // do not pull single requests out of its batches.
        let now = elapsed_ns(self.epoch);
        if self.active.load(Ordering::Acquire) > 1 {
            self.queue_until_ns
                .store(now.saturating_add(self.memory_ns), Ordering::Relaxed);
            return Err(pending);
        }
        if now < self.queue_until_ns.load(Ordering::Relaxed)
            || self.executor.last_single_ns.load(Ordering::Relaxed) > self.max_ns
        {
            return Err(pending);
        }
        // Other models' requests may hold the runtime threads that inline
        // runs may take.
        let Some(_slot) = self.slots.try_take() else {
            return Err(pending);
        };
        // Checked under the queue's lock: nothing queued may be overtaken.
        let state = shared.lock();
        if !state.queue.is_empty() {
            return Err(pending);
        }
        // A free instance: its thread is waiting for work, not computing.
        let Some(backend) = self
            .backends
            .iter()
            .find_map(|backend| backend.try_lock().ok())
        else {
            return Err(pending);
        };
        drop(state);
        self.executor.run(backend, vec![pending]);
        Ok(())
    }
}

/// Counts a request as active until dropped.
pub(super) struct Active<'a>(&'a AtomicUsize);

impl Active<'_> {
    pub(super) fn enter(inline: &Inline) -> Active<'_> {
        inline.active.fetch_add(1, Ordering::AcqRel);
        Active(&inline.active)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
