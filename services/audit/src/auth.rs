//! Who may call what on the audit service: the access of each gRPC method,
//! enforced by `shamal_auth::layer::GrpcAuthLayer`. A method missing here
//! is refused whether auth is on or off.

use std::sync::Arc;

use shamal_audit::Event;
use shamal_audit_client::RefusalRecorder;
use shamal_auth::layer::Access;
use shamal_auth::{Permission, Refusal, RefusalObserver};
use tokio::sync::mpsc;

use crate::log::{AuditLog, now_ms};

/// Refusals waiting to be appended; past that they are dropped (counted).
const REFUSAL_QUEUE: usize = 4096;
/// Most refusals appended in one call.
const REFUSAL_BATCH: usize = 500;

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

/// The audit service's own refusals, appended to its own log as
/// `auth.refused` records (the other services send theirs through their
/// auditor's spool; this service is the log). Bounded: a flood of refused
/// calls fills a queue of [`REFUSAL_QUEUE`] and the rest are counted in
/// `shamal_audit_refusals_dropped_total`, never blocking a call.
pub struct OwnRefusals {
    queue: mpsc::Sender<Event>,
    log: Arc<AuditLog>,
    instance: String,
}

impl OwnRefusals {
    /// The observer, and the task appending what it queues (it ends when
    /// the observer is dropped, after appending what is left).
    pub fn start(
        log: Arc<AuditLog>,
        instance: String,
    ) -> (Arc<OwnRefusals>, tokio::task::JoinHandle<()>) {
        let (queue, mut queued) = mpsc::channel::<Event>(REFUSAL_QUEUE);
        let appender = log.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(REFUSAL_BATCH);
            while queued.recv_many(&mut batch, REFUSAL_BATCH).await > 0 {
                let events = std::mem::take(&mut batch);
                let count = events.len();
                if let Err(error) = appender.append(events).await {
                    appender.metrics().refusals_dropped.inc_by(count as u64);
                    tracing::warn!(%error, count, "cannot record refused calls in the audit log");
                }
            }
        });
        (
            Arc::new(OwnRefusals {
                queue,
                log,
                instance,
            }),
            task,
        )
    }
}

impl RefusalObserver for OwnRefusals {
    fn refused(&self, refusal: Refusal<'_>) {
        let mut event = Event::from(RefusalRecorder::event(refusal));
        event.event_id = uuid::Uuid::new_v4().to_string();
        event.occurred_at_ms = now_ms();
        event.service = "audit".to_owned();
        event.instance.clone_from(&self.instance);
        if self.queue.try_send(event).is_err() {
            self.log.metrics().refusals_dropped.inc();
        }
    }
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
        assert!(append(ServiceRole::Worker));
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
