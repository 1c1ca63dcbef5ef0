//! The cpu-worker: ONNX models on ONNX Runtime behind Shamal's worker
//! framework (KServe v2 gRPC, dynamic batching, Triton model repository).

pub mod config;
pub mod onnx;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use shamal_async_queue::JobQueue;

use shamal_telemetry::MetricsRegistry;
use shamal_worker::{Worker, WorkerListeners};

pub use config::{CpuWorkerArgs, CpuWorkerConfig, bundled_onnxruntime};
pub use onnx::{OnnxRuntime, Optimization, SessionOptions};

/// Builds a cpu-worker (loads ONNX Runtime) without serving it yet.
pub fn build(
    config: &CpuWorkerConfig,
    metrics_registry: MetricsRegistry,
) -> anyhow::Result<Worker> {
    build_with_batch_queue(config, metrics_registry, None)
}

/// As [`build`], with the embedding program's in-process batch queue for a
/// `[batch]` queue of `memory` (`shamal up`).
pub fn build_with_batch_queue(
    config: &CpuWorkerConfig,
    metrics_registry: MetricsRegistry,
    batch_queue: Option<Arc<dyn JobQueue>>,
) -> anyhow::Result<Worker> {
    let library = config
        .onnxruntime_library
        .clone()
        .ok_or_else(|| anyhow::anyhow!("onnxruntime_library is not set"))?;
    let runtime =
        OnnxRuntime::new(&library, config.session_options()).map_err(anyhow::Error::msg)?;
    let worker = Worker::new(config.worker_config(), Arc::new(runtime), metrics_registry);
    let worker = config.node.with_async_inference(worker);
    // The batch instances' ONNX Runtime sessions get `batch.threads`
    // intra-op threads, whatever the model's own setting.
    let parameters = HashMap::from([(
        "intra_op_thread_count".to_owned(),
        config.node.batch.threads.to_string(),
    )]);
    Ok(config
        .node
        .with_batch_role(worker, batch_queue, parameters)?)
}

/// Runs a cpu-worker until `shutdown` completes, then drains.
pub async fn run(
    config: CpuWorkerConfig,
    listeners: WorkerListeners,
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    build(&config, metrics_registry)?
        .serve(listeners, shutdown)
        .await
}
