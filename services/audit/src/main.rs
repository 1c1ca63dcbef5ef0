//! shamal-audit: the append-only, hash-chained audit log.

use std::process::ExitCode;

use shamal_audit_service::config::{EXPOSURE, SERVICE};
use shamal_audit_service::{AuditConfig, AuditListeners};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match SERVICE.configure(AuditConfig::load) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Not open by accident: TLS, or --insecure.
    if let Err(code) = shamal_auth::security::require(SERVICE.name, &config.security, EXPOSURE) {
        return code;
    }
    let listeners = AuditListeners::bind(&config).await;
    SERVICE
        .serve(listeners, |listeners, metrics, shutdown| {
            let grpc = listeners
                .grpc
                .local_addr()
                .map_or(config.grpc_listen, |bound| bound);
            let metrics_address = listeners
                .metrics
                .as_ref()
                .and_then(|listener| listener.local_addr().ok());
            tracing::info!(%grpc, metrics = ?metrics_address, "audit service listening");
            shamal_audit_service::run(config, listeners, metrics, shutdown)
        })
        .await
}
