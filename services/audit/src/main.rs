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
            tracing::info!(grpc = %config.grpc_listen, "audit service listening");
            shamal_audit_service::run(config, listeners, metrics, shutdown)
        })
        .await
}
