//! shamal-registry: model versions, artifacts, aliases and rollouts.

use std::process::ExitCode;

use shamal_auth::security::Exposure;
use shamal_registry::config::SERVICE;
use shamal_registry::{RegistryConfig, RegistryListeners};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match SERVICE.configure(RegistryConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Not open by accident: TLS (and OIDC on public APIs), or --insecure.
    if let Err(code) =
        shamal_auth::security::require(SERVICE.name, &config.security, Exposure::Public)
    {
        return code;
    }
    let listeners = RegistryListeners::bind(&config).await;
    SERVICE
        .serve(listeners, |listeners, metrics, shutdown| {
            tracing::info!(http = %config.http_listen, grpc = %config.grpc_listen, "registry listening");
            shamal_registry::run(config, listeners, metrics, shutdown)
        })
        .await
}
