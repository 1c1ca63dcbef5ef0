//! Who may call a worker: only Shamal services (routers, batch
//! coordinators) over mTLS, each method checked against its policy.

use std::sync::Arc;

use shamal_auth::Authenticator;
use shamal_auth::Permission;
use shamal_auth::layer::Access;
use shamal_auth::metrics::AuthMetrics;
use shamal_auth::security::{Exposure, SecurityConfig};
use shamal_telemetry::MetricsRegistry;
use shamal_tls::{ClientAuth, ClientTls, ServerTls, TlsMetrics};

/// The API label of a worker's refusals.
pub const API: &str = "worker";

/// Access of each method a worker serves.
pub fn grpc_access(path: &str) -> Option<Access> {
    use Access::{Needs, Public};
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Public,
        ("inference.GRPCInferenceService", "ModelInfer" | "ModelStreamInfer") => {
            Needs(Permission::InferenceCall)
        }
        (
            "inference.GRPCInferenceService",
            "ServerLive" | "ServerReady" | "ModelReady" | "ServerMetadata" | "ModelMetadata"
            | "ModelConfig" | "ModelStatistics" | "RepositoryIndex",
        ) => Needs(Permission::MetadataRead),
        ("inference.GRPCInferenceService", _) => Needs(Permission::Admin),
        _ => return None,
    })
}

/// A worker's TLS and authentication, from its security settings.
pub(crate) struct WorkerSecurity {
    pub auth: Arc<Authenticator>,
    /// Client certificates required (only services call a worker).
    pub server: Option<ServerTls>,
    /// This worker's certificate towards the registry.
    pub client: Option<ClientTls>,
}

impl WorkerSecurity {
    pub fn start(
        config: &SecurityConfig,
        metrics: &MetricsRegistry,
    ) -> anyhow::Result<WorkerSecurity> {
        config.announce("worker", Exposure::Internal, metrics);
        let Some(files) = config.tls_files() else {
            return Ok(WorkerSecurity {
                auth: Authenticator::off(),
                server: None,
                client: None,
            });
        };
        // In `shamal up` another service of the process may have registered
        // the counters already; refusals are still logged then.
        let auth_metrics = AuthMetrics::new(metrics).ok();
        let tls_metrics = TlsMetrics::new(metrics).ok();
        let mut server = ServerTls::new(&files, ClientAuth::Required)?;
        let mut client = ClientTls::new(&files)?.expect_service("registry");
        if let Some(tls_metrics) = tls_metrics {
            server = server.with_metrics(tls_metrics.clone());
            client = client.with_metrics(tls_metrics);
        }
        Ok(WorkerSecurity {
            auth: Authenticator::new(None, Some(config.trust_domain.clone()), auth_metrics),
            server: Some(server),
            client: Some(client),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_inference_method_has_a_policy() {
        let pool =
            prost_reflect::DescriptorPool::decode(shamal_proto::INFERENCE_DESCRIPTOR_SET).unwrap();
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(grpc_access(&path).is_some(), "{path} has no access policy");
            }
        }
        assert_eq!(
            grpc_access("/inference.GRPCInferenceService/ModelInfer"),
            Some(Access::Needs(Permission::InferenceCall))
        );
    }
}
