//! The gpu-worker: safetensors models on candle (CUDA when built with the
//! `cuda` feature and a GPU is present, the CPU otherwise) behind Shamal's
//! worker framework (KServe v2 gRPC, dynamic batching, Triton model
//! repository). See [`spec`] for the model format.

pub mod bert;
pub mod candle;
pub mod config;
pub mod cpu_threads;
pub mod device;
pub mod encoder;
pub mod mlp;
pub mod spec;
pub mod weights;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use candle_core::Device;
use shamal_async_queue::JobQueue;
use shamal_telemetry::MetricsRegistry;
use shamal_worker::{Worker, WorkerListeners};

pub use candle::{CandleRuntime, MlpBackend};
pub use config::{GpuWorkerArgs, GpuWorkerConfig};
pub use encoder::EncoderBackend;
pub use spec::{DevicePreference, ModelSpec};

/// Registers `shamal_gpu_worker_device_info{device="cpu"|"cuda:N"} 1`.
pub fn register_device_metric(
    metrics_registry: &MetricsRegistry,
    device: &str,
) -> anyhow::Result<()> {
    let gauge = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "shamal_gpu_worker_device_info",
            "Compute device of the gpu-worker (always 1; the device is the label).",
        ),
        &["device"],
    )?;
    shamal_telemetry::register(metrics_registry, gauge)?
        .with_label_values(&[device])
        .set(1);
    Ok(())
}

/// Builds a gpu-worker (selects its device) without serving it yet; with
/// `async_queue` set it also runs the async jobs of its region.
pub fn build(
    config: &GpuWorkerConfig,
    metrics_registry: MetricsRegistry,
) -> anyhow::Result<Worker> {
    build_with_device(config, metrics_registry).map(|(worker, _)| worker)
}

/// Like [`build`], also returning the label of the device chosen (`cpu`,
/// `cuda:N`), for programs that embed the worker (`shamal up`).
///
/// candle's CPU threads are left as the process found them (see
/// [`cpu_threads`]): the gpu-worker's `main` sets them while it is still
/// single-threaded, with [`cpu_threads::select_device`], and builds with
/// [`build_on`].
pub fn build_with_device(
    config: &GpuWorkerConfig,
    metrics_registry: MetricsRegistry,
) -> anyhow::Result<(Worker, String)> {
    let device = device::select(config.device, config.cuda_device).map_err(anyhow::Error::msg)?;
    let label = device::label(&device);
    Ok((build_on(config, device, metrics_registry)?, label))
}

/// Builds a gpu-worker computing on `device` (from
/// [`cpu_threads::select_device`]).
pub fn build_on(
    config: &GpuWorkerConfig,
    device: Device,
    metrics_registry: MetricsRegistry,
) -> anyhow::Result<Worker> {
    build_on_with_batch_queue(config, device, metrics_registry, None)
}

/// As [`build_on`], with the embedding program's in-process batch queue
/// for a `[batch]` queue of `memory` (`shamal up`).
pub fn build_on_with_batch_queue(
    config: &GpuWorkerConfig,
    device: Device,
    metrics_registry: MetricsRegistry,
    batch_queue: Option<Arc<dyn JobQueue>>,
) -> anyhow::Result<Worker> {
    let label = device::label(&device);
    let worker_config = config.worker_config(&label);
    tracing::info!(
        device = %label,
        cuda_compiled = device::CUDA_COMPILED,
        cpu_threads = cpu_threads::current(),
        instances = worker_config.defaults.instances,
        "gpu-worker compute device selected"
    );
    register_device_metric(&metrics_registry, &label)?;
    let worker = Worker::new(
        worker_config,
        Arc::new(CandleRuntime::new(device)),
        metrics_registry,
    );
    // Consumes the async queue of its region when `async_queue` is set, as
    // the cpu-worker does; and the batch queue when `[batch]` has a queue
    // (candle's threads are per process: `batch.threads` does not apply).
    let worker = config.node.with_async_inference(worker);
    Ok(config
        .node
        .with_batch_role(worker, batch_queue, HashMap::new())?)
}

/// Runs a gpu-worker until `shutdown` completes, then drains.
pub async fn run(
    config: GpuWorkerConfig,
    listeners: WorkerListeners,
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    build(&config, metrics_registry)?
        .serve(listeners, shutdown)
        .await
}

/// Like [`run`], on a device already selected (with candle's CPU threads)
/// by [`cpu_threads::select_device`].
pub async fn run_on(
    config: GpuWorkerConfig,
    device: Device,
    listeners: WorkerListeners,
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    build_on(&config, device, metrics_registry)?
        .serve(listeners, shutdown)
        .await
}
