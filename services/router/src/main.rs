//! shamal-router: the public KServe v2 front door.

use clap::Parser;
use shamal_router::{RouterArgs, RouterConfig, RouterListeners};

#[derive(Parser)]
#[command(version, about = "Shamal router (KServe v2 gRPC and HTTP front door)")]
struct Cli {
    #[command(flatten)]
    args: RouterArgs,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shamal_telemetry::init_tracing();
    let cli = Cli::parse();
    let config = match RouterConfig::load(&cli.args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal-router: invalid configuration: {error}");
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
            eprintln!("shamal-router: {error}");
            return std::process::ExitCode::from(71);
        }
    };
    tracing::info!(grpc = %config.grpc_listen, http = %config.http_listen, "router listening");
    let registry = shamal_telemetry::Registry::new();
    match shamal_router::run(
        config,
        listeners,
        registry,
        shamal_telemetry::shutdown_signal(),
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "router failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bind(config: &RouterConfig) -> std::io::Result<RouterListeners> {
    let grpc = tokio::net::TcpListener::bind(config.grpc_listen).await?;
    let http = tokio::net::TcpListener::bind(config.http_listen).await?;
    let metrics = match config.metrics_listen {
        Some(address) => Some(tokio::net::TcpListener::bind(address).await?),
        None => None,
    };
    Ok(RouterListeners {
        grpc,
        http,
        metrics,
    })
}
