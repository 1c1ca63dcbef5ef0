//! shamal-cpu-worker: serves the ONNX models of a model repository.

use clap::Parser;
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_worker::WorkerListeners;

#[derive(Parser)]
#[command(version, about = "Shamal CPU worker (ONNX Runtime)")]
struct Cli {
    #[command(flatten)]
    args: CpuWorkerArgs,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shamal_telemetry::init_tracing();
    let cli = Cli::parse();
    let config = match CpuWorkerConfig::load(&cli.args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal-cpu-worker: invalid configuration: {error}");
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
            eprintln!("shamal-cpu-worker: {error}");
            return std::process::ExitCode::from(71);
        }
    };
    tracing::info!(grpc = %config.grpc_listen, "cpu-worker listening");
    let registry = shamal_telemetry::Registry::new();
    match shamal_cpu_worker::run(
        config,
        listeners,
        registry,
        shamal_telemetry::shutdown_signal(),
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "cpu-worker failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bind(config: &CpuWorkerConfig) -> std::io::Result<WorkerListeners> {
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen).await?;
    let metrics = match config.metrics_listen {
        Some(address) => Some(tokio::net::TcpListener::bind(address).await?),
        None => None,
    };
    Ok(WorkerListeners { grpc, metrics })
}
