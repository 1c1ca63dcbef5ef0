//! The caller of an API: a service, a user (or application), or nobody.

use std::sync::Arc;
use std::time::SystemTime;

use shamal_tls::PeerIdentity;

use crate::rbac::{self, Permission, Role};

/// Who is making a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Auth is off (`shamal up` on loopback, or a service started
    /// `--insecure`): every permission is granted and writes are attributed
    /// to `anonymous`.
    Anonymous,
    /// Another Shamal service, identified by its mTLS certificate.
    Service {
        role: ServiceRole,
        identity: PeerIdentity,
    },
    /// A person or an application, identified by a validated access token.
    User(Arc<User>),
}

impl Default for Principal {
    /// Anonymous: what a call is when auth is off.
    fn default() -> Principal {
        Principal::Anonymous
    }
}

/// The kinds of Shamal service a certificate can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceRole {
    Router,
    Worker,
    Registry,
    Batch,
    Audit,
}

impl ServiceRole {
    pub const ALL: [ServiceRole; 5] = [
        ServiceRole::Router,
        ServiceRole::Worker,
        ServiceRole::Registry,
        ServiceRole::Batch,
        ServiceRole::Audit,
    ];

    /// The service segment of a SPIFFE URI (`spiffe://td/<service>/<id>`).
    pub fn name(self) -> &'static str {
        match self {
            ServiceRole::Router => "router",
            ServiceRole::Worker => "worker",
            ServiceRole::Registry => "registry",
            ServiceRole::Batch => "batch",
            ServiceRole::Audit => "audit",
        }
    }

    pub fn from_name(name: &str) -> Option<ServiceRole> {
        ServiceRole::ALL
            .into_iter()
            .find(|role| role.name() == name)
    }
}

/// What a validated access token says about its bearer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// `sub`.
    pub subject: String,
    /// The OAuth client the token was issued to (`client_id`, or `azp`).
    pub client_id: Option<String>,
    /// The tenant claim (configurable), which residency policies key on.
    pub tenant: Option<String>,
    /// The built-in roles among the roles claim's values (unknown values
    /// are ignored: deny by default).
    pub roles: Vec<Role>,
    /// The groups claim, for models limited to listed groups.
    pub groups: Vec<String>,
    /// `exp`: the validation cache forgets the token then.
    pub expires_at: SystemTime,
}

impl Principal {
    /// A service principal for a certificate's identity; `None` when its
    /// service segment names no Shamal service, or its trust domain is not
    /// `trust_domain`.
    pub fn service(identity: PeerIdentity, trust_domain: &str) -> Option<Principal> {
        if identity.trust_domain != trust_domain {
            return None;
        }
        let role = ServiceRole::from_name(&identity.service)?;
        Some(Principal::Service { role, identity })
    }

    /// Whether the principal holds `permission`.
    pub fn allows(&self, permission: Permission) -> bool {
        match self {
            Principal::Anonymous => true,
            Principal::Service { role, .. } => rbac::service_allows(*role, permission),
            Principal::User(user) => user.roles.iter().any(|role| role.allows(permission)),
        }
    }

    /// `Ok` when the principal holds `permission`, PERMISSION_DENIED naming
    /// it otherwise.
    pub fn require(&self, permission: Permission) -> Result<(), AuthErrorRef> {
        if self.allows(permission) {
            Ok(())
        } else {
            Err(crate::AuthError::Forbidden {
                permission,
                who: self.describe(),
                actor: self.actor(),
            })
        }
    }

    /// Who a change is attributed to in the registry's history: the token's
    /// subject (with its client when that differs), the certificate's URI,
    /// or `anonymous`.
    pub fn actor(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Service { identity, .. } => identity.uri(),
            Principal::User(user) => match &user.client_id {
                Some(client) if *client != user.subject => {
                    format!("{} (client {client})", user.subject)
                }
                _ => user.subject.clone(),
            },
        }
    }

    /// The tenant of a user's token; `None` for services and anonymous
    /// callers.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::User(user) => user.tenant.as_deref(),
            _ => None,
        }
    }

    /// Whether this principal may use a model limited to `tenants` and
    /// `groups` (both empty: no limit). Services and anonymous callers are
    /// not limited: the limit is on people and applications.
    pub fn within(&self, tenants: &[String], groups: &[String]) -> bool {
        if tenants.is_empty() && groups.is_empty() {
            return true;
        }
        match self {
            Principal::Anonymous | Principal::Service { .. } => true,
            Principal::User(user) => {
                user.roles.contains(&Role::Admin)
                    || user
                        .tenant
                        .as_ref()
                        .is_some_and(|tenant| tenants.contains(tenant))
                    || user.groups.iter().any(|group| groups.contains(group))
            }
        }
    }

    /// A short description for logs and refusals.
    pub fn describe(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Service { identity, .. } => identity.uri(),
            Principal::User(user) => format!("subject '{}'", user.subject),
        }
    }
}

type AuthErrorRef = crate::AuthError;

#[cfg(test)]
mod tests {
    use super::*;

    fn user(roles: &[Role], tenant: Option<&str>, groups: &[&str]) -> Principal {
        Principal::User(Arc::new(User {
            subject: "alice".into(),
            client_id: Some("cli".into()),
            tenant: tenant.map(str::to_owned),
            roles: roles.to_vec(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            expires_at: SystemTime::now(),
        }))
    }

    #[test]
    fn services_need_their_own_trust_domain_and_a_known_service() {
        let worker = PeerIdentity::new("shamal.local", "worker", "w1");
        assert!(Principal::service(worker.clone(), "shamal.local").is_some());
        assert!(Principal::service(worker, "other.domain").is_none());
        let stranger = PeerIdentity::new("shamal.local", "printer", "p1");
        assert!(Principal::service(stranger, "shamal.local").is_none());
    }

    #[test]
    fn actors_name_the_subject_and_client() {
        assert_eq!(user(&[], None, &[]).actor(), "alice (client cli)");
        assert_eq!(Principal::Anonymous.actor(), "anonymous");
    }

    #[test]
    fn model_limits_admit_listed_tenants_groups_and_admins_only() {
        let tenants = vec!["acme".to_owned()];
        let groups = vec!["risk".to_owned()];
        assert!(user(&[], Some("acme"), &[]).within(&tenants, &groups));
        assert!(user(&[], None, &["risk"]).within(&tenants, &groups));
        assert!(user(&[Role::Admin], None, &[]).within(&tenants, &groups));
        assert!(!user(&[Role::Inference], Some("other"), &["ops"]).within(&tenants, &groups));
        assert!(user(&[], None, &[]).within(&[], &[]));
    }

    #[test]
    fn refusals_name_the_permission() {
        let error = user(&[Role::Viewer], None, &[])
            .require(Permission::RolloutsManage)
            .unwrap_err();
        assert!(error.to_string().contains("rollouts:manage"), "{error}");
    }
}
