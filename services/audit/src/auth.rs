//! Who may call what on the audit service: the access of each gRPC method,
//! enforced by `shamal_auth::layer::GrpcAuthLayer`. A method missing here
//! is refused whether auth is on or off.

use shamal_auth::Permission;
use shamal_auth::layer::Access;

/// The API label of the audit service's refusals.
pub const GRPC_API: &str = "audit_grpc";

/// Access of each `shamal.audit.v1.AuditService` method and of the health
/// service: producers (the registry, routers, batch coordinators and
/// admins) append; admins query, export and verify; anyone may fetch the
/// public key checkpoints are signed with.
pub fn grpc_access(path: &str) -> Option<Access> {
    use Access::{Needs, Public};
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Public,
        ("shamal.audit.v1.AuditService", method) => match method {
            "Append" => Needs(Permission::AuditAppend),
            "Query" | "Export" | "Verify" => Needs(Permission::AuditRead),
            "PublicKey" => Public,
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shamal_auth::ServiceRole;
    use shamal_auth::rbac::service_allows;

    /// Every method of the audit protocol, read from its descriptor: a
    /// method added without a policy fails here.
    #[test]
    fn every_grpc_method_has_a_policy() {
        let pool = prost_reflect::DescriptorPool::decode(shamal_proto::AUDIT_DESCRIPTOR_SET)
            .unwrap_or_else(|error| panic!("{error}"));
        let mut methods = 0;
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(grpc_access(&path).is_some(), "{path} has no access policy");
                methods += 1;
            }
        }
        assert!(methods >= 5, "{methods}");
        assert_eq!(grpc_access("/shamal.audit.v1.AuditService/Bogus"), None);
        assert_eq!(grpc_access("/shamal.registry.v1.Registry/Watch"), None);
    }

    #[test]
    fn producers_append_and_only_admins_read() {
        let append = |role| service_allows(role, Permission::AuditAppend);
        assert!(append(ServiceRole::Registry));
        assert!(append(ServiceRole::Router));
        assert!(append(ServiceRole::Batch));
        assert!(!append(ServiceRole::Worker));
        for role in ServiceRole::ALL {
            assert!(!service_allows(role, Permission::AuditRead), "{role:?}");
        }
        for role in shamal_auth::Role::ALL {
            assert_eq!(
                role.allows(Permission::AuditRead),
                role == shamal_auth::Role::Admin
            );
        }
        assert_eq!(
            grpc_access("/shamal.audit.v1.AuditService/PublicKey"),
            Some(Access::Public)
        );
    }
}
