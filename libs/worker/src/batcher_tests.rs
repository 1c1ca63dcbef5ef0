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

fn tensor(rows: usize, width: usize, start: f32) -> Tensor {
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

fn values(output: &Tensor) -> Vec<f32> {
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
    let metrics = WorkerMetrics::new(&prometheus::Registry::new());
    let stats = Arc::new(ModelStats::new("m", "1", metrics));
    let batcher = Batcher::start("m", config, backends, stats.clone());
    Harness {
        batcher,
        seen,
        release: gated.then_some(release),
        stats,
    }
}

fn config(max_batch_size: usize, delay: Duration) -> BatcherConfig {
    BatcherConfig {
        max_batch_size,
        max_queue_delay: delay,
        preferred_batch_sizes: Vec::new(),
        max_queue_size: 1024,
        inline_max: Duration::ZERO,
        inline_slots: InlineSlots::new(1),
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

/// Echoes its input and records the name of the thread it ran on; may wait
/// on a gate or take a fixed time.
struct WhereRun {
    threads: Arc<Mutex<Vec<String>>>,
    gate: Option<crossbeam_channel::Receiver<()>>,
    takes: Duration,
    any_thread: bool,
}

impl Backend for WhereRun {
    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        self.threads.lock().unwrap().push(name);
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        std::thread::sleep(self.takes);
        Ok(inputs)
    }

    fn runs_on_any_thread(&self) -> bool {
        self.any_thread
    }
}

struct WhereHarness {
    batcher: Batcher,
    threads: Arc<Mutex<Vec<String>>>,
    release: crossbeam_channel::Sender<()>,
}

fn start_where(
    inline_max: Duration,
    takes: Duration,
    any_thread: bool,
    gated: bool,
) -> WhereHarness {
    start_where_sharing(
        "m",
        inline_max,
        takes,
        any_thread,
        gated,
        InlineSlots::new(1),
    )
}

fn start_where_sharing(
    model: &str,
    inline_max: Duration,
    takes: Duration,
    any_thread: bool,
    gated: bool,
    inline_slots: InlineSlots,
) -> WhereHarness {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let (release, gate) = crossbeam_channel::unbounded();
    let backend = WhereRun {
        threads: threads.clone(),
        gate: gated.then_some(gate),
        takes,
        any_thread,
    };
    let metrics = WorkerMetrics::new(&prometheus::Registry::new());
    let stats = Arc::new(ModelStats::new(model, "1", metrics));
    let config = BatcherConfig {
        inline_max,
        inline_slots,
        ..config(8, Duration::ZERO)
    };
    WhereHarness {
        batcher: Batcher::start(model, config, vec![Box::new(backend)], stats),
        threads,
        release,
    }
}

impl WhereHarness {
    async fn call(&self) {
        let outputs = self
            .batcher
            .infer(vec![tensor(1, 2, 0.0)], 1, None)
            .await
            .unwrap();
        assert_eq!(values(&outputs[0]), vec![0.0, 1.0], "the input comes back");
    }

    fn threads(&self) -> Vec<String> {
        self.threads.lock().unwrap().clone()
    }
}

const INSTANCE_THREAD: &str = "infer-m-0";

#[tokio::test]
async fn an_idle_model_runs_short_requests_on_the_callers_thread() {
    let caller = std::thread::current().name().unwrap().to_owned();
    assert_ne!(caller, INSTANCE_THREAD);
    let harness = start_where(Duration::from_secs(1), Duration::ZERO, true, false);
    for _ in 0..3 {
        harness.call().await;
    }
    // The first request's time is unknown until it ran: it is queued.
    assert_eq!(harness.threads(), [INSTANCE_THREAD, &caller, &caller]);
    assert_eq!(harness.batcher.queue_depth(), 0);
}

#[tokio::test]
async fn requests_queue_when_inline_is_off_long_or_not_allowed() {
    let off = start_where(Duration::ZERO, Duration::ZERO, true, false);
    let long = start_where(
        Duration::from_millis(1),
        Duration::from_millis(5),
        true,
        false,
    );
    let bound = start_where(Duration::from_secs(1), Duration::ZERO, false, false);
    for harness in [&off, &long, &bound] {
        for _ in 0..3 {
            harness.call().await;
        }
        assert_eq!(harness.threads(), [INSTANCE_THREAD; 3]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrency_requests_queue_and_the_instance_waits_its_turn() {
    let harness = Arc::new(start_where(
        Duration::from_secs(1),
        Duration::ZERO,
        true,
        true,
    ));
    harness.release.send(()).unwrap();
    harness.call().await;
    assert_eq!(harness.threads(), [INSTANCE_THREAD]);
    // The model is idle: the next request runs inline (on a runtime thread)
    // and holds the only instance, blocked at the gate.
    let first = tokio::spawn({
        let harness = harness.clone();
        async move { harness.call().await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while harness.threads().len() < 2 {
        assert!(Instant::now() < deadline, "inline request did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Another request arrives while the first is in flight: it is queued
    // and runs on the instance thread once the first releases the backend.
    let second = tokio::spawn({
        let harness = harness.clone();
        async move { harness.call().await }
    });
    let active = || {
        let inline = harness.batcher.inline.as_ref().unwrap();
        inline.active.load(Ordering::Acquire)
    };
    while active() < 2 {
        assert!(Instant::now() < deadline, "second request did not arrive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        harness.threads().len(),
        2,
        "the instance waits for the backend"
    );
    harness.release.send(()).unwrap();
    harness.release.send(()).unwrap();
    first.await.unwrap();
    second.await.unwrap();
    let threads = harness.threads();
    assert_ne!(threads[1], INSTANCE_THREAD, "first ran inline: {threads:?}");
    assert_eq!(
        threads[2], INSTANCE_THREAD,
        "second was queued: {threads:?}"
    );
    // Alone again, but concurrency was just seen: still queued.
    harness.release.send(()).unwrap();
    harness.call().await;
    assert_eq!(harness.threads()[3], INSTANCE_THREAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_runs_across_models_are_capped_by_their_shared_slots() {
    let slots = InlineSlots::new(1);
    let first = Arc::new(start_where_sharing(
        "a",
        Duration::from_secs(1),
        Duration::ZERO,
        true,
        true,
        slots.clone(),
    ));
    let second = start_where_sharing(
        "b",
        Duration::from_secs(1),
        Duration::ZERO,
        true,
        false,
        slots.clone(),
    );
    // One queued request each makes their single-request times known.
    first.release.send(()).unwrap();
    first.call().await;
    second.call().await;
    assert_eq!(first.threads(), ["infer-a-0"]);
    assert_eq!(second.threads(), ["infer-b-0"]);
    // Model a's next request runs inline and holds the only slot, blocked
    // at its gate.
    let held = tokio::spawn({
        let first = first.clone();
        async move { first.call().await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.threads().len() < 2 {
        assert!(Instant::now() < deadline, "inline request did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_ne!(first.threads()[1], "infer-a-0", "a's request ran inline");
    // Model b is idle and short, but no slot is free: its request is queued.
    second.call().await;
    assert_eq!(second.threads()[1], "infer-b-0", "b's request was queued");
    // Once a's run gives the slot back, b runs inline again.
    first.release.send(()).unwrap();
    held.await.unwrap();
    second.call().await;
    assert_ne!(second.threads()[2], "infer-b-0", "b's request ran inline");
    assert_eq!(slots.limit(), 1);
}

#[test]
fn inline_slots_leave_a_runtime_thread_free() {
    for (workers, limit) in [(4, 3), (2, 1), (1, 1)] {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .build()
            .unwrap();
        let slots = runtime.block_on(async { InlineSlots::for_current_runtime() });
        assert_eq!(slots.limit(), limit, "{workers} worker threads");
    }
    assert_eq!(InlineSlots::new(0).limit(), 1, "at least one slot");
}
