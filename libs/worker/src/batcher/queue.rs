//! The queue shared by a model version's instances: waiting requests,
//! which of them may share a batch, and taking a batch out.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use shamal_tensor::Tensor;
use tokio::sync::oneshot;

use super::InferError;
use crate::backend::RaggedAxis;

/// A request waiting in the queue.
pub(super) struct Pending {
    pub(super) inputs: Vec<Tensor>,
    pub(super) rows: usize,
    pub(super) deadline: Option<Instant>,
    pub(super) enqueued: Instant,
    pub(super) reply: oneshot::Sender<Result<Vec<Tensor>, InferError>>,
}

impl Pending {
    /// Requests with equal keys may share a batch: same datatypes and the
    /// same dimensions after the batch dimension, input by input, except
    /// along the backend's ragged axes (of fixed-size inputs), where sizes
    /// may differ.
    pub(super) fn compatible(&self, other: &Pending, ragged: &[RaggedAxis]) -> bool {
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

    pub(super) fn abandoned(&self, now: Instant) -> bool {
        self.reply.is_closed() || self.deadline.is_some_and(|deadline| deadline <= now)
    }
}

/// The queue shared by a model version's instances.
pub(super) struct Shared {
    state: Mutex<QueueState>,
    pub(super) changed: Condvar,
}

pub(super) struct QueueState {
    /// Waiting requests, oldest first.
    pub(super) queue: VecDeque<Pending>,
    /// Set when every `Batcher` handle is gone: instances finish the queue
    /// and exit.
    pub(super) closed: bool,
}

impl Shared {
    /// An empty, open queue.
    pub(super) fn new() -> Shared {
        Shared {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Instance threads never panic while holding the lock (backends run
        // outside it), so a poisoned lock still guards a consistent queue.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes the queue when the last `Batcher` handle is dropped.
pub(super) struct Closer(pub(super) Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.changed.notify_all();
    }
}

/// Removes `selected` (ascending indexes) from the queue, in arrival order.
pub(super) fn take(queue: &mut VecDeque<Pending>, selected: &[usize]) -> Vec<Pending> {
    let mut requests = Vec::with_capacity(selected.len());
    for &index in selected.iter().rev() {
        if let Some(pending) = queue.remove(index) {
            requests.push(pending);
        }
    }
    requests.reverse();
    requests
}
