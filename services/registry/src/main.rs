//! shamal-registry: model versions, artifacts, aliases and rollouts.

use clap::Parser;
use shamal_registry::{RegistryArgs, RegistryConfig, RegistryListeners};

#[derive(Parser)]
#[command(
    version,
    about = "Shamal registry (models, versions, artifacts, rollouts)"
)]
struct Cli {
    #[command(flatten)]
    args: RegistryArgs,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shamal_telemetry::init_tracing();
    let cli = Cli::parse();
    let config = match RegistryConfig::load(&cli.args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal-registry: invalid configuration: {error}");
            return std::process::ExitCode::from(64);
        }
    };
    if cli.print_config {
        println!("{}", toml::to_string_pretty(&config).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    let listeners = match RegistryListeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("shamal-registry: {error}");
            return std::process::ExitCode::from(71);
        }
    };
    tracing::info!(http = %config.http_listen, grpc = %config.grpc_listen, "registry listening");
    let metrics = shamal_telemetry::Registry::new();
    match shamal_registry::run(
        config,
        listeners,
        metrics,
        shamal_telemetry::shutdown_signal(),
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "registry failed");
            std::process::ExitCode::FAILURE
        }
    }
}
