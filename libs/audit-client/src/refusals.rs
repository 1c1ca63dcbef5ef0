//! Auth refusals in the audit trail: a [`RefusalObserver`] that records
//! every refusal an authenticator reports as an `auth.refused` event.
//!
//! Set on a service's authenticator once its auditor runs
//! (`auth.observe_refusals(RefusalRecorder::new(auditor))`), it covers every
//! refused call of that service, gRPC and HTTP alike, whatever the layer
//! that refused it. The event says who was refused (the principal named by
//! a PERMISSION_DENIED; `anonymous` when the caller could not be
//! identified), what (`reason`: the API, the method or route, the
//! refusal's message) and the outcome (`unauthenticated`,
//! `permission_denied`). When the spool is full the refusal's record is
//! not taken (counted in `shamal_audit_refused_total` or
//! `shamal_audit_dropped_total`, as any other): the call is refused anyway.

use std::sync::Arc;

use shamal_auth::{AuthError, Refusal, RefusalObserver};

use crate::{AuditEvent, Auditor};

/// The action of an auth refusal's record.
pub const AUTH_REFUSED: &str = "auth.refused";

/// Most characters of a refusal's `reason`.
const MAX_REASON_CHARS: usize = 512;

/// Records refusals through an auditor.
pub struct RefusalRecorder {
    auditor: Auditor,
}

impl RefusalRecorder {
    pub fn new(auditor: Auditor) -> Arc<RefusalRecorder> {
        Arc::new(RefusalRecorder { auditor })
    }

    /// The record of one refusal.
    pub fn event(refusal: Refusal<'_>) -> AuditEvent {
        let (outcome, actor) = match refusal.error {
            AuthError::Unauthenticated { .. } => ("unauthenticated", "anonymous".to_owned()),
            AuthError::Forbidden { actor, .. } if !actor.is_empty() => {
                ("permission_denied", actor.clone())
            }
            AuthError::Forbidden { .. } => ("permission_denied", "anonymous".to_owned()),
        };
        let reason = format!("{} {}: {}", refusal.api, refusal.method, refusal.error);
        AuditEvent {
            action: AUTH_REFUSED.to_owned(),
            outcome: outcome.to_owned(),
            actor: actor.chars().take(256).collect(),
            reason: reason.chars().take(MAX_REASON_CHARS).collect(),
            ..AuditEvent::default()
        }
    }
}

impl RefusalObserver for RefusalRecorder {
    fn refused(&self, refusal: Refusal<'_>) {
        // A full spool refuses nothing more here: the call is refused
        // already, and the auditor counts what it could not take.
        let _ = self.auditor.record(RefusalRecorder::event(refusal));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shamal_auth::Permission;

    #[test]
    fn refusals_name_who_what_and_why() {
        let error = AuthError::Forbidden {
            permission: Permission::MetadataRead,
            who: "subject 'client:globex-inference'".to_owned(),
            actor: "client:globex-inference".to_owned(),
        };
        let event = RefusalRecorder::event(Refusal {
            api: "router",
            method: "/inference.GRPCInferenceService/ModelMetadata",
            error: &error,
        });
        assert_eq!(event.action, AUTH_REFUSED);
        assert_eq!(event.outcome, "permission_denied");
        assert_eq!(event.actor, "client:globex-inference");
        assert!(
            event.reason.starts_with(
                "router /inference.GRPCInferenceService/ModelMetadata: permission denied"
            ),
            "{}",
            event.reason
        );
        let error = AuthError::missing("no credentials");
        let event = RefusalRecorder::event(Refusal {
            api: "registry-rest",
            method: "POST /v1/models",
            error: &error,
        });
        assert_eq!(
            (event.outcome.as_str(), event.actor.as_str()),
            ("unauthenticated", "anonymous")
        );
        let long = AuthError::missing("x".repeat(2000));
        let event = RefusalRecorder::event(Refusal {
            api: "router",
            method: "GET /v2",
            error: &long,
        });
        assert_eq!(event.reason.chars().count(), MAX_REASON_CHARS);
    }
}
