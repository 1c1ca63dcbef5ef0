//! The cpu-worker: ONNX models on ONNX Runtime behind Shamal's worker
//! framework (KServe v2 gRPC, dynamic batching, Triton model repository).

pub mod config;
pub mod onnx;

use std::future::Future;
use std::sync::Arc;

use shamal_telemetry::MetricsRegistry;
use shamal_worker::{Worker, WorkerListeners};

pub use config::{CpuWorkerArgs, CpuWorkerConfig, bundled_onnxruntime};
pub use onnx::{OnnxRuntime, Optimization, SessionOptions};

/// Builds a cpu-worker (loads ONNX Runtime) without serving it yet.
pub fn build(
    config: &CpuWorkerConfig,
    metrics_registry: MetricsRegistry,
) -> anyhow::Result<Worker> {
    let library = config
        .onnxruntime_library
        .clone()
        .ok_or_else(|| anyhow::anyhow!("onnxruntime_library is not set"))?;
    let runtime =
        OnnxRuntime::new(&library, config.session_options()).map_err(anyhow::Error::msg)?;
    let worker = Worker::new(config.worker_config(), Arc::new(runtime), metrics_registry);
    Ok(config.node.with_async_inference(worker))
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
