//! shamal-gpu-worker: serves the safetensors models of a model repository on candle.

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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shamal_telemetry::init_tracing();
    let cli = Cli::parse();
    let config = match GpuWorkerConfig::load(&cli.args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal-gpu-worker: invalid configuration: {error}");
            return std::process::ExitCode::from(64);
        }
    };
    if cli.print_config {
        println!("{}", toml::to_string_pretty(&config).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    let listeners = match bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("shamal-gpu-worker: {error}");
            return std::process::ExitCode::from(71);
        }
    };
    tracing::info!(grpc = %config.grpc_listen, "gpu-worker listening");
    let registry = shamal_telemetry::Registry::new();
    match shamal_gpu_worker::run(
        config,
        listeners,
        registry,
        shamal_telemetry::shutdown_signal(),
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gpu-worker failed");
            std::process::ExitCode::FAILURE
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
