//! Batcher tests with a small arithmetic backend standing in for a model.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shamal_tensor::{DataType, Tensor, TensorData};

use super::*;
use crate::stats::{ModelStats, WorkerMetrics};

/// What the fake model saw: one entry per execution, the input shape.
type Seen = Arc<Mutex<Vec<Vec<i64>>>>;

/// out = 3 * in + 1, elementwise on FP32 — row-independent, as a correct
/// batched model is. Optionally waits on a gate before each execution.
struct Affine {
    seen: Seen,
    gate: Option<crossbeam_channel::Receiver<()>>,
}

impl Backend for Affine {
    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        let input = &inputs[0];
        self.seen.lock().unwrap().push(input.shape.clone());
        let TensorData::Fixed(bytes) = &input.data else {
            return Err(BackendError::Internal("expected FP32".into()));
        };
        let out: Vec<u8> = bytes
            .chunks_exact(4)
            .flat_map(|chunk| {
                let value = f32::from_le_bytes(chunk.try_into().unwrap());
                (3.0 * value + 1.0).to_le_bytes()
            })
            .collect();
        Ok(vec![
            Tensor::from_raw("y", DataType::Fp32, input.shape.clone(), Bytes::from(out)).unwrap(),
        ])
    }
}

pub(super) fn tensor(rows: usize, width: usize, start: f32) -> Tensor {
    let data: Vec<u8> = (0..rows * width)
        .flat_map(|i| (start + i as f32).to_le_bytes())
        .collect();
    Tensor::from_raw(
        "x",
        DataType::Fp32,
        vec![rows as i64, width as i64],
        Bytes::from(data),
    )
    .unwrap()
}

fn expected(input: &Tensor) -> Vec<f32> {
    let TensorData::Fixed(bytes) = &input.data else {
        unreachable!()
    };
    bytes
        .chunks_exact(4)
        .map(|chunk| 3.0 * f32::from_le_bytes(chunk.try_into().unwrap()) + 1.0)
        .collect()
}

pub(super) fn values(output: &Tensor) -> Vec<f32> {
    let TensorData::Fixed(bytes) = &output.data else {
        unreachable!()
    };
    bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

struct Harness {
    batcher: Batcher,
    seen: Seen,
    release: Option<crossbeam_channel::Sender<()>>,
    stats: Arc<ModelStats>,
}

fn start(config: BatcherConfig, instances: usize, gated: bool) -> Harness {
    let seen: Seen = Arc::default();
    let (release, gate) = crossbeam_channel::unbounded();
    let backends: Vec<Box<dyn Backend>> = (0..instances)
        .map(|_| {
            Box::new(Affine {
                seen: seen.clone(),
                gate: gated.then(|| gate.clone()),
            }) as Box<dyn Backend>
        })
        .collect();
    let metrics = WorkerMetrics::new(&shamal_telemetry::MetricsRegistry::new(), "test");
    let stats = Arc::new(ModelStats::new("m", "1", metrics));
    let batcher = Batcher::start("m", config, backends, stats.clone());
    Harness {
        batcher,
        seen,
        release: gated.then_some(release),
        stats,
    }
}

pub(super) fn config(max_batch_size: usize, delay: Duration) -> BatcherConfig {
    BatcherConfig {
        max_batch_size,
        max_queue_delay: delay,
        preferred_batch_sizes: Vec::new(),
        max_queue_size: 1024,
        inline_max: Duration::ZERO,
        inline_slots: InlineSlots::new(1),
        concurrency_memory: DEFAULT_CONCURRENCY_MEMORY,
    }
}

/// Waits until the fake model has run `count` executions.
async fn executions(seen: &Seen, count: usize) {
    for _ in 0..500 {
        if seen.lock().unwrap().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("model did not reach {count} executions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_answers_are_identical_to_unbatched_ones() {
    let harness = start(config(16, Duration::from_millis(20)), 1, false);
    let inputs: Vec<Tensor> = (0..40)
        .map(|i| tensor(1 + i % 4, 3, i as f32 * 10.0))
        .collect();
    let calls = inputs.iter().map(|input| {
        let batcher = harness.batcher.clone();
        let input = input.clone();
        async move {
            batcher
                .infer(vec![input.clone()], input.shape[0] as usize, None)
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    for (input, result) in inputs.iter().zip(results) {
        let outputs = result.unwrap();
        assert_eq!(
            outputs[0].shape, input.shape,
            "each caller gets exactly its rows back"
        );
        assert_eq!(values(&outputs[0]), expected(input));
    }
    let seen = harness.seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|shape| shape[0] > 4),
        "requests were batched: {seen:?}"
    );
    assert!(
        seen.iter().all(|shape| shape[0] <= 16),
        "max batch size holds: {seen:?}"
    );

    // The same requests one at a time give the same answers.
    let unbatched = start(config(0, Duration::ZERO), 1, false);
    for input in &inputs {
        let outputs = unbatched
            .batcher
            .infer(vec![input.clone()], input.shape[0] as usize, None)
            .await
            .unwrap();
        assert_eq!(values(&outputs[0]), expected(input));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_different_shapes_are_never_mixed() {
    let harness = start(config(32, Duration::from_millis(20)), 1, false);
    let inputs: Vec<Tensor> = (0..30)
        .map(|i| tensor(1, if i % 2 == 0 { 4 } else { 8 }, i as f32))
        .collect();
    let calls = inputs
        .iter()
        .map(|input| harness.batcher.infer(vec![input.clone()], 1, None));
    for (input, result) in inputs.iter().zip(futures::future::join_all(calls).await) {
        assert_eq!(values(&result.unwrap()[0]), expected(input));
    }
    let seen = harness.seen.lock().unwrap();
    assert!(seen.iter().all(|shape| shape[1] == 4 || shape[1] == 8));
    assert!(seen.len() >= 2, "two shapes need at least two executions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let mut queue = config(8, Duration::ZERO);
    queue.max_queue_size = 2;
    let harness = start(queue, 1, true);
    // One request occupies the only instance (blocked on the gate)...
    let running = tokio::spawn({
        let batcher = harness.batcher.clone();
        async move { batcher.infer(vec![tensor(1, 2, 0.0)], 1, None).await }
    });
    executions_started(&harness).await;
    // ...two more fill the queue...
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let batcher = harness.batcher.clone();
            tokio::spawn(async move { batcher.infer(vec![tensor(1, 2, i as f32)], 1, None).await })
        })
        .collect();
    while harness.batcher.queue_depth() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and the next is refused while the model is still blocked.
    let refused = harness
        .batcher
        .infer(vec![tensor(1, 2, 9.0)], 1, None)
        .await;
    assert!(
        matches!(refused, Err(InferError::QueueFull(_))),
        "{refused:?}"
    );

    let release = harness.release.as_ref().unwrap();
    for _ in 0..3 {
        release.send(()).unwrap();
    }
    assert!(running.await.unwrap().is_ok());
    for handle in queued {
        assert!(
            handle.await.unwrap().is_ok(),
            "queued requests are not lost"
        );
    }
}

/// Waits until the gated model has taken its first batch (the instance is
/// busy and the queue owner can no longer dispatch).
async fn executions_started(harness: &Harness) {
    for _ in 0..500 {
        if harness.batcher.queue_depth() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_abandoned_requests_are_dropped_not_run() {
    let harness = start(config(8, Duration::ZERO), 1, true);
    let first = tokio::spawn({
        let batcher = harness.batcher.clone();
        async move { batcher.infer(vec![tensor(1, 2, 0.0)], 1, None).await }
    });
    executions_started(&harness).await;
    // Expires while waiting behind the first request.
    let expiring = tokio::spawn({
        let batcher = harness.batcher.clone();
        async move {
            batcher
                .infer(
                    vec![tensor(5, 2, 0.0)],
                    5,
                    Some(Instant::now() + Duration::from_millis(30)),
                )
                .await
        }
    });
    // Its caller goes away while it waits.
    let abandoned = tokio::spawn({
        let batcher = harness.batcher.clone();
        async move { batcher.infer(vec![tensor(7, 2, 0.0)], 7, None).await }
    });
    // Both are queued behind the blocked instance...
    while harness.batcher.queue_depth() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...the first deadline passes, and the second caller leaves.
    tokio::time::sleep(Duration::from_millis(40)).await;
    abandoned.abort();
    let _ = abandoned.await;
    let release = harness.release.as_ref().unwrap();
    release.send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    let expired = expiring.await.unwrap();
    assert!(
        matches!(expired, Err(InferError::DeadlineExceeded)),
        "{expired:?}"
    );

    // A later request still runs, and the model never saw 5 or 7 rows.
    let later = tokio::spawn({
        let batcher = harness.batcher.clone();
        async move { batcher.infer(vec![tensor(2, 2, 0.0)], 2, None).await }
    });
    release.send(()).unwrap();
    assert!(later.await.unwrap().is_ok());
    let seen = harness.seen.lock().unwrap();
    assert!(
        seen.iter().all(|shape| shape[0] != 5 && shape[0] != 7),
        "dropped work ran: {seen:?}"
    );
    assert_eq!(harness.stats.dropped(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_arrival_order() {
    let harness = start(config(64, Duration::ZERO), 1, true);
    let blocker = tokio::spawn({
        let batcher = harness.batcher.clone();
        async move { batcher.infer(vec![tensor(1, 1, -1.0)], 1, None).await }
    });
    executions_started(&harness).await;
    let mut handles = Vec::new();
    for i in 0..10 {
        let batcher = harness.batcher.clone();
        handles.push(tokio::spawn(async move {
            batcher.infer(vec![tensor(1, 1, i as f32)], 1, None).await
        }));
        while harness.batcher.queue_depth() < i + 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let release = harness.release.as_ref().unwrap();
    release.send(()).unwrap();
    release.send(()).unwrap();
    assert!(blocker.await.unwrap().is_ok());
    for (i, handle) in handles.into_iter().enumerate() {
        assert_eq!(
            values(&handle.await.unwrap().unwrap()[0]),
            vec![3.0 * i as f32 + 1.0]
        );
    }
    executions(&harness.seen, 2).await;
    // The ten queued requests ran as one batch of ten, in arrival order.
    assert_eq!(harness.seen.lock().unwrap()[1], vec![10, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_batch_sizes_stop_the_wait() {
    let mut preferred = config(16, Duration::from_secs(60));
    preferred.preferred_batch_sizes = vec![4];
    let harness = start(preferred, 1, false);
    let calls = (0..4).map(|i| harness.batcher.infer(vec![tensor(1, 2, i as f32)], 1, None));
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(calls))
        .await
        .expect("a batch of the preferred size runs without waiting out the 60 s delay");
    assert!(results.iter().all(Result::is_ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_invalid() {
    let harness = start(config(4, Duration::ZERO), 1, false);
    let result = harness
        .batcher
        .infer(vec![tensor(5, 1, 0.0)], 5, None)
        .await;
    assert!(
        matches!(result, Err(InferError::InvalidInput(message)) if message.contains("max_batch_size"))
    );
}
