//! shamal-cpu-worker: serves the ONNX models of a model repository.

use std::process::ExitCode;

use shamal_cpu_worker::CpuWorkerConfig;
use shamal_cpu_worker::config::SERVICE;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match SERVICE.configure(CpuWorkerConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let listeners = config.node.bind().await;
    SERVICE
        .serve(listeners, |listeners, metrics, shutdown| {
            tracing::info!(grpc = %config.node.grpc_listen, "cpu-worker listening");
            shamal_cpu_worker::run(config, listeners, metrics, shutdown)
        })
        .await
}
