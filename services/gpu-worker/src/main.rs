//! shamal-gpu-worker: serves the safetensors models of a model repository on candle.

use std::process::ExitCode;

use candle_core::Device;
use clap::Parser;
use shamal_gpu_worker::{GpuWorkerArgs, GpuWorkerConfig};
use shamal_worker::WorkerListeners;

#[derive(Parser)]
#[command(version, about = "Shamal GPU worker (candle; CUDA or CPU)")]
struct Cli {
    #[command(flatten)]
    args: GpuWorkerArgs,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

// No `#[tokio::main]`: candle's CPU thread count lives in the environment,
// which may only be written while this is the process's one thread.
#[allow(unsafe_code)]
fn main() -> ExitCode {
    shamal_telemetry::init_tracing();
    let cli = Cli::parse();
    let config = match GpuWorkerConfig::load(&cli.args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal-gpu-worker: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    if cli.print_config {
        println!("{}", toml::to_string_pretty(&config).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    // SAFETY: no other thread exists yet; the async runtime starts below.
    let device = match unsafe { shamal_gpu_worker::cpu_threads::select_device(&config) } {
        Ok(device) => device,
        Err(error) => {
            eprintln!("shamal-gpu-worker: {error}");
            return ExitCode::FAILURE;
        }
    };
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(serve(config, device)),
        Err(error) => {
            eprintln!("shamal-gpu-worker: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: GpuWorkerConfig, device: Device) -> ExitCode {
    let listeners = match bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("shamal-gpu-worker: {error}");
            return ExitCode::from(71);
        }
    };
    tracing::info!(grpc = %config.grpc_listen, "gpu-worker listening");
    let registry = shamal_telemetry::Registry::new();
    match shamal_gpu_worker::run_on(
        config,
        device,
        listeners,
        registry,
        shamal_telemetry::shutdown_signal(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gpu-worker failed");
            ExitCode::FAILURE
        }
    }
}

async fn bind(config: &GpuWorkerConfig) -> std::io::Result<WorkerListeners> {
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen).await?;
    let metrics = match config.metrics_listen {
        Some(address) => Some(tokio::net::TcpListener::bind(address).await?),
        None => None,
    };
    Ok(WorkerListeners { grpc, metrics })
}
