//! shamal-batch: the batch coordinator.

use std::process::ExitCode;

use shamal_batch_coordinator::config::{EXPOSURE, SERVICE};
use shamal_batch_coordinator::{BatchConfig, BatchListeners};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match SERVICE.configure(BatchConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Not open by accident: TLS and OIDC, or --insecure.
    if let Err(code) = shamal_auth::security::require(SERVICE.name, &config.security, EXPOSURE) {
        return code;
    }
    let listeners = BatchListeners::bind(&config).await;
    SERVICE
        .serve(listeners, |listeners, metrics, shutdown| {
            tracing::info!(
                grpc = %config.grpc_listen, http = %config.http_listen,
                metrics = ?config.metrics_listen, "batch coordinator listening"
            );
            shamal_batch_coordinator::run(config, listeners, metrics, shutdown)
        })
        .await
}
