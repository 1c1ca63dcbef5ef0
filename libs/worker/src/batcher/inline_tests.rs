//! The inline path: when an idle model's requests run on the caller's
//! thread, and when concurrency or busy slots keep them on the queue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shamal_tensor::Tensor;

use super::tests::{config, tensor, values};
use super::*;
use crate::backend::BackendError;
use crate::stats::{ModelStats, WorkerMetrics};

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
    let config = BatcherConfig {
        inline_max,
        inline_slots,
        ..config(8, Duration::ZERO)
    };
    start_where_with(model, config, takes, any_thread, gated)
}

/// A batcher of one `WhereRun` instance, with `config`.
fn start_where_with(
    model: &str,
    config: BatcherConfig,
    takes: Duration,
    any_thread: bool,
    gated: bool,
) -> WhereHarness {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let (release, gate) = crossbeam_channel::unbounded();
    let backend = WhereRun {
        threads: threads.clone(),
        gate: gated.then_some(gate),
        takes,
        any_thread,
    };
    let metrics = WorkerMetrics::new(&shamal_telemetry::MetricsRegistry::new(), "test");
    let stats = Arc::new(ModelStats::new(model, "1", metrics));
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

/// Runs one request (its time is then known), then two that overlap: the
/// first runs inline and holds the only instance, blocked at the gate, while
/// the second arrives, is queued and runs on the instance thread once the
/// first releases the backend. Checks that the instance waited its turn.
async fn overlap(harness: &Arc<WhereHarness>) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrency_requests_queue_and_the_instance_waits_its_turn() {
    // Concurrency is remembered far longer than the test takes, whatever
    // the machine's speed, so the last request is sure to be queued.
    let config = BatcherConfig {
        inline_max: Duration::from_secs(1),
        concurrency_memory: Duration::from_secs(600),
        ..config(8, Duration::ZERO)
    };
    let harness = Arc::new(start_where_with("m", config, Duration::ZERO, true, true));
    overlap(&harness).await;
    // Alone again, but concurrency was just seen: still queued.
    harness.release.send(()).unwrap();
    harness.call().await;
    assert_eq!(harness.threads()[3], INSTANCE_THREAD);
}

/// With the production default, concurrency keeps requests queued only
/// briefly: a model alone again for longer than the window runs inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_concurrency_is_forgotten_requests_run_inline_again() {
    let harness = Arc::new(start_where(
        Duration::from_secs(1),
        Duration::ZERO,
        true,
        true,
    ));
    assert_eq!(
        harness.batcher.inline.as_ref().unwrap().memory_ns,
        10_000_000,
        "the production default, 10 ms"
    );
    overlap(&harness).await;
    tokio::time::sleep(DEFAULT_CONCURRENCY_MEMORY * 5).await;
    harness.release.send(()).unwrap();
    harness.call().await;
    let threads = harness.threads();
    assert_ne!(
        threads[3], INSTANCE_THREAD,
        "the window passed: inline again: {threads:?}"
    );
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
