//! The batcher's backend hooks: per-request checks and ragged axes.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shamal_tensor::{DataType, TensorData};

use super::*;
use crate::backend::RaggedAxis;
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
    let metrics = WorkerMetrics::new(&shamal_telemetry::MetricsRegistry::new(), "test");
    let stats = Arc::new(ModelStats::new("m", "1", metrics));
    let config = BatcherConfig {
        max_batch_size: 16,
        max_queue_delay: Duration::from_secs(2),
        preferred_batch_sizes: vec![preferred],
        max_queue_size: 64,
        inline_max: Duration::ZERO,
        inline_slots: InlineSlots::new(1),
        concurrency_memory: DEFAULT_CONCURRENCY_MEMORY,
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
