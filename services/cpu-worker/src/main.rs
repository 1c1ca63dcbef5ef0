//! shamal-cpu-worker: serves the ONNX models of a model repository.

use std::process::ExitCode;

use shamal_auth::security::Exposure;
use shamal_cpu_worker::CpuWorkerConfig;
use shamal_cpu_worker::config::SERVICE;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match SERVICE.configure(CpuWorkerConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Not open by accident: TLS (and OIDC on public APIs), or --insecure.
    if let Err(code) =
        shamal_auth::security::require(SERVICE.name, &config.node.security, Exposure::Internal)
    {
        return code;
    }
    let listeners = config.node.bind().await;
    SERVICE
        .serve(listeners, |listeners, metrics, shutdown| {
            tracing::info!(grpc = %config.node.grpc_listen, "cpu-worker listening");
            shamal_cpu_worker::run(config, listeners, metrics, shutdown)
        })
        .await
}
