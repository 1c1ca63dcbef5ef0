//! shamal-gpu-worker: serves the safetensors models of a model repository on candle.

use std::process::ExitCode;

use shamal_auth::security::Exposure;
use shamal_gpu_worker::GpuWorkerConfig;
use shamal_gpu_worker::config::SERVICE;

// No `#[tokio::main]`: candle's CPU thread count lives in the environment,
// which may only be written while this is the process's one thread.
#[allow(unsafe_code)]
fn main() -> ExitCode {
    let config = match SERVICE.configure(GpuWorkerConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Not open by accident: TLS (and OIDC on public APIs), or --insecure.
    if let Err(code) =
        shamal_auth::security::require(SERVICE.name, &config.node.security, Exposure::Internal)
    {
        return code;
    }
    // SAFETY: no other thread exists yet; the async runtime starts below.
    let device = match unsafe { shamal_gpu_worker::cpu_threads::select_device(&config) } {
        Ok(device) => device,
        Err(error) => {
            eprintln!("{}: {error}", SERVICE.name);
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{}: cannot start the async runtime: {error}", SERVICE.name);
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listeners = config.node.bind().await;
        SERVICE
            .serve(listeners, |listeners, metrics, shutdown| {
                tracing::info!(grpc = %config.node.grpc_listen, "gpu-worker listening");
                shamal_gpu_worker::run_on(config, device, listeners, metrics, shutdown)
            })
            .await
    })
}
