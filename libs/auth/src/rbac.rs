//! The RBAC table: which permissions each role holds. Deny by default: a
//! permission no row grants is refused to everyone but `admin`.
//!
//! | permission | viewer | inference | data-scientist | release-manager | admin |
//! |---|---|---|---|---|---|
//! | `metadata:read` (server and model metadata, readiness, statistics) | yes | yes | yes | yes | yes |
//! | `models:read` | yes | | yes | yes | yes |
//! | `inference:call` | | yes | | | yes |
//! | `models:write` (create models, push artifacts and versions, archive, retry) | | | yes | | yes |
//! | `rollouts:start` (start a canary) | | | yes | yes | yes |
//! | `rollouts:manage` (shift, promote, roll back, pause, resume, policy, aliases) | | | | yes | yes |
//! | `residency:write` (residency and placement policies) | | | | yes | yes |
//! | `access:write` (limit a model to listed tenants or groups) | | | | yes | yes |
//! | `workers:read` | | | | | yes |
//! | `workers:register` | | | | | yes |
//! | `registry:watch` | | | | | yes |
//! | `artifacts:fetch` | | | | | yes |
//! | `traffic:report` | | | | | yes |
//! | `audit:append` | | | | | yes |
//! | `audit:read` (query, export, verify the audit log) | | | | | yes |
//! | `batch:submit` (submit and cancel batch jobs) | | | yes | yes | yes |
//! | `batch:read` (batch jobs and their progress) | yes | | yes | yes | yes |
//! | `admin` (re-encrypt artifacts) | | | | | yes |
//!
//! Services (mTLS identities) hold what their job needs and nothing more:
//! workers register, heartbeat, report placement, watch and fetch
//! artifacts; routers watch, report traffic and call workers; the registry,
//! routers and batch coordinators append to the audit log; batch
//! coordinators also watch the registry (for the tenants' residency
//! policies).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::principal::ServiceRole;

/// The built-in roles a token's roles claim can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Viewer,
    Inference,
    DataScientist,
    ReleaseManager,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Inference,
        Role::DataScientist,
        Role::ReleaseManager,
        Role::Admin,
    ];

    /// The value naming the role in a token's roles claim.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Inference => "inference",
            Role::DataScientist => "data-scientist",
            Role::ReleaseManager => "release-manager",
            Role::Admin => "admin",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }

    /// Whether the role holds `permission` (the table above).
    pub fn allows(self, permission: Permission) -> bool {
        use Permission as P;
        match self {
            Role::Admin => true,
            Role::Viewer => matches!(permission, P::MetadataRead | P::ModelsRead | P::BatchRead),
            Role::Inference => matches!(permission, P::MetadataRead | P::InferenceCall),
            Role::DataScientist => matches!(
                permission,
                P::MetadataRead
                    | P::ModelsRead
                    | P::ModelsWrite
                    | P::RolloutsStart
                    | P::BatchSubmit
                    | P::BatchRead
            ),
            Role::ReleaseManager => matches!(
                permission,
                P::MetadataRead
                    | P::ModelsRead
                    | P::RolloutsStart
                    | P::RolloutsManage
                    | P::ResidencyWrite
                    | P::AccessWrite
                    | P::BatchSubmit
                    | P::BatchRead
            ),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an API call needs. Every gRPC method and REST route is mapped to
/// exactly one (the route tables in the router and the registry; their
/// tests fail for a route without one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// The inference API's server and model metadata, readiness and
    /// statistics (what a client asks before calling).
    MetadataRead,
    /// Read models, versions, aliases, rollouts, placements, residency
    /// policies, model metadata.
    ModelsRead,
    /// Call a model (ModelInfer, async jobs).
    InferenceCall,
    /// Create models, push artifacts and versions, archive, retry.
    ModelsWrite,
    /// Start a rollout (a canary of a new version).
    RolloutsStart,
    /// Shift, promote, roll back, pause, resume, set rollout policy and
    /// aliases.
    RolloutsManage,
    /// Residency and placement policies.
    ResidencyWrite,
    /// Limit a model to listed tenants or groups.
    AccessWrite,
    /// List workers.
    WorkersRead,
    /// Register, heartbeat, deregister, report placement (workers).
    WorkersRegister,
    /// Follow the registry's change feed (routers, workers).
    RegistryWatch,
    /// Download artifacts over gRPC (workers).
    ArtifactsFetch,
    /// Report traffic counts for canary analysis (routers).
    TrafficReport,
    /// Append events to the audit log (the registry, routers, batch).
    AuditAppend,
    /// Query, export and verify the audit log.
    AuditRead,
    /// Submit and cancel batch jobs.
    BatchSubmit,
    /// Read batch jobs and their progress (get, list, watch).
    BatchRead,
    /// Administration: re-encrypt artifacts.
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 18] = [
        Permission::MetadataRead,
        Permission::ModelsRead,
        Permission::InferenceCall,
        Permission::ModelsWrite,
        Permission::RolloutsStart,
        Permission::RolloutsManage,
        Permission::ResidencyWrite,
        Permission::AccessWrite,
        Permission::WorkersRead,
        Permission::WorkersRegister,
        Permission::RegistryWatch,
        Permission::ArtifactsFetch,
        Permission::TrafficReport,
        Permission::AuditAppend,
        Permission::AuditRead,
        Permission::BatchSubmit,
        Permission::BatchRead,
        Permission::Admin,
    ];

    /// The name a refusal gives (`PERMISSION_DENIED: ... needs models:write`).
    pub fn name(self) -> &'static str {
        match self {
            Permission::MetadataRead => "metadata:read",
            Permission::ModelsRead => "models:read",
            Permission::InferenceCall => "inference:call",
            Permission::ModelsWrite => "models:write",
            Permission::RolloutsStart => "rollouts:start",
            Permission::RolloutsManage => "rollouts:manage",
            Permission::ResidencyWrite => "residency:write",
            Permission::AccessWrite => "access:write",
            Permission::WorkersRead => "workers:read",
            Permission::WorkersRegister => "workers:register",
            Permission::RegistryWatch => "registry:watch",
            Permission::ArtifactsFetch => "artifacts:fetch",
            Permission::TrafficReport => "traffic:report",
            Permission::AuditAppend => "audit:append",
            Permission::AuditRead => "audit:read",
            Permission::BatchSubmit => "batch:submit",
            Permission::BatchRead => "batch:read",
            Permission::Admin => "admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a service role holds `permission`.
pub fn service_allows(role: ServiceRole, permission: Permission) -> bool {
    use Permission as P;
    match role {
        // Workers append the records of the async jobs (and batch shards)
        // they run.
        ServiceRole::Worker => matches!(
            permission,
            P::WorkersRegister
                | P::RegistryWatch
                | P::ArtifactsFetch
                | P::ModelsRead
                | P::AuditAppend
        ),
        ServiceRole::Router => matches!(
            permission,
            P::RegistryWatch
                | P::TrafficReport
                | P::ModelsRead
                | P::MetadataRead
                | P::InferenceCall
                | P::AuditAppend
        ),
        // Batch coordinators call models like routers (issue 17), and read
        // the tenants' residency policies from the registry's Watch.
        ServiceRole::Batch => {
            matches!(
                permission,
                P::ModelsRead
                    | P::MetadataRead
                    | P::InferenceCall
                    | P::AuditAppend
                    | P::RegistryWatch
            )
        }
        ServiceRole::Registry => permission == P::AuditAppend,
        ServiceRole::Audit => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::from_name(role.name()), Some(role));
        }
        assert_eq!(Role::from_name("root"), None);
    }

    #[test]
    fn only_admins_hold_admin_and_worker_permissions() {
        for role in Role::ALL {
            let expected = role == Role::Admin;
            for permission in [
                Permission::Admin,
                Permission::WorkersRegister,
                Permission::WorkersRead,
            ] {
                assert_eq!(role.allows(permission), expected, "{role} {permission}");
            }
        }
    }

    #[test]
    fn batch_permissions_follow_the_table() {
        for role in Role::ALL {
            assert_eq!(
                role.allows(Permission::BatchSubmit),
                matches!(
                    role,
                    Role::DataScientist | Role::ReleaseManager | Role::Admin
                ),
                "{role}"
            );
            assert_eq!(
                role.allows(Permission::BatchRead),
                role != Role::Inference,
                "{role}"
            );
        }
        // The batch coordinator reads model metadata and calls models; no
        // service submits or reads jobs through its certificate.
        assert!(service_allows(ServiceRole::Batch, Permission::MetadataRead));
        assert!(service_allows(
            ServiceRole::Batch,
            Permission::InferenceCall
        ));
        assert!(service_allows(
            ServiceRole::Batch,
            Permission::RegistryWatch
        ));
        assert!(!service_allows(
            ServiceRole::Batch,
            Permission::WorkersRegister
        ));
        for role in ServiceRole::ALL {
            assert!(!service_allows(role, Permission::BatchSubmit), "{role:?}");
        }
        assert_eq!(Permission::ALL.len(), 18);
        let names: std::collections::HashSet<_> = Permission::ALL
            .iter()
            .map(|permission| permission.name())
            .collect();
        assert_eq!(names.len(), Permission::ALL.len());
    }

    #[test]
    fn only_workers_register_and_only_routers_workers_and_batch_watch() {
        for role in ServiceRole::ALL {
            assert_eq!(
                service_allows(role, Permission::WorkersRegister),
                role == ServiceRole::Worker
            );
            assert_eq!(
                service_allows(role, Permission::RegistryWatch),
                matches!(
                    role,
                    ServiceRole::Worker | ServiceRole::Router | ServiceRole::Batch
                )
            );
        }
    }
}
