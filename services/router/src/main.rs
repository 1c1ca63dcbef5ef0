//! shamal-router: the public KServe v2 front door.

use std::net::SocketAddr;
use std::process::ExitCode;

use shamal_auth::security::Exposure;
use shamal_router::config::SERVICE;
use shamal_router::{RouterConfig, RouterListeners};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match SERVICE.configure(RouterConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Not open by accident: TLS (and OIDC on public APIs), or --insecure.
    if let Err(code) =
        shamal_auth::security::require(SERVICE.name, &config.security, Exposure::Public)
    {
        return code;
    }
    let listeners = bind(
        config.grpc_listen,
        config.http_listen,
        config.metrics_listen,
    )
    .await;
    SERVICE
        .serve(listeners, |listeners, metrics, shutdown| {
            tracing::info!(grpc = %config.grpc_listen, http = %config.http_listen, "router listening");
            shamal_router::run(config, listeners, metrics, shutdown)
        })
        .await
}

async fn bind(
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: Option<SocketAddr>,
) -> std::io::Result<RouterListeners> {
    let grpc = tokio::net::TcpListener::bind(grpc).await?;
    let http = tokio::net::TcpListener::bind(http).await?;
    let metrics = match metrics {
        Some(address) => Some(tokio::net::TcpListener::bind(address).await?),
        None => None,
    };
    Ok(RouterListeners {
        grpc,
        http,
        metrics,
    })
}
