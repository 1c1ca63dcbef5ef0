//! The router's audit trail: one record per inference call (online, and
//! async submissions), refusals included, through the audit client's
//! durable spool (`shamal-audit-client`). Metadata only: the request and
//! response are recorded as SHA-256 digests of their v2 protobuf
//! encodings, never as payloads.
//!
//! The pipeline's [`AuditStep`] (step 2, right inside observation) opens an
//! [`AuditNote`] for the call; the steps below fill it in as they learn
//! who the caller is (authentication), its tenant (residency) and which
//! worker in which region answered (forwarding); the step records the
//! event when the answer is known. Fail closed: when the spool is at its
//! bound the call is refused before any work (`RESOURCE_EXHAUSTED` naming
//! the audit backlog), and an answer whose record cannot be written is
//! not given.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prost::Message;
use sha2::{Digest, Sha256};
use shamal_audit_client::{AuditEvent, Auditor};
use shamal_auth::Principal;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use tonic::{Code, Status};

/// The action of an online inference call.
pub const INFERENCE: &str = "inference";
/// The action of an async job's submission (the job itself runs on a
/// worker).
pub const ASYNC_SUBMIT: &str = "inference.async_submit";

/// What the steps of one call learn for its audit record.
#[derive(Debug, Default)]
pub struct AuditNote {
    fields: Mutex<NoteFields>,
}

#[derive(Debug, Default)]
struct NoteFields {
    actor: String,
    client_id: String,
    tenant: String,
    worker: String,
    region: String,
}

impl AuditNote {
    fn with<R>(&self, edit: impl FnOnce(&mut NoteFields) -> R) -> R {
        edit(&mut self.fields.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The caller, as authentication admitted (or refused) it.
    pub fn caller(&self, principal: &Principal) {
        let (actor, client_id, tenant) = who(principal);
        self.with(|fields| {
            fields.actor = actor;
            fields.client_id = client_id;
            if !tenant.is_empty() {
                fields.tenant = tenant;
            }
        });
    }

    /// The tenant the residency step settled on.
    pub fn tenant(&self, tenant: &str) {
        self.with(|fields| fields.tenant = tenant.to_owned());
    }

    /// The tenant a request names, unless the caller's token gave one.
    pub fn tenant_if_unset(&self, tenant: &str) {
        self.with(|fields| {
            if fields.tenant.is_empty() {
                fields.tenant = tenant.to_owned();
            }
        });
    }

    /// The worker a call was sent to (the last one tried answers).
    pub fn worker(&self, id: &str, region: &str) {
        self.with(|fields| {
            fields.worker = id.to_owned();
            fields.region = region.to_owned();
        });
    }
}

/// Actor, client id and tenant of a principal.
pub fn who(principal: &Principal) -> (String, String, String) {
    match principal {
        Principal::Anonymous => ("anonymous".to_owned(), String::new(), String::new()),
        Principal::Service { identity, .. } => (identity.uri(), String::new(), String::new()),
        Principal::User(user) => (
            user.subject.clone(),
            user.client_id.clone().unwrap_or_default(),
            user.tenant.clone().unwrap_or_default(),
        ),
    }
}

/// Lower-case hex SHA-256 of a message's protobuf encoding.
pub fn digest<M: Message>(message: &M) -> String {
    hex::encode(Sha256::digest(message.encode_to_vec()))
}

/// `OK` -> `ok`, `PermissionDenied` -> `permission_denied`: the outcome
/// field of a record.
pub fn outcome(code: Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (index, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if index > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The refusal of a call when the spool is full (fail closed).
pub fn backlog_status(backlog: &shamal_audit_client::Backlog) -> Status {
    Status::resource_exhausted(backlog.to_string())
}

/// One call's record in the making: what is known before the call runs.
pub struct Pending {
    pub note: Arc<AuditNote>,
    started: Instant,
    request_id: String,
    model: String,
    requested_version: String,
    request_sha256: String,
}

impl Pending {
    pub fn open(request: &ModelInferRequest, request_id: &str) -> Pending {
        Pending {
            note: Arc::new(AuditNote::default()),
            started: Instant::now(),
            request_id: request_id.to_owned(),
            model: request.model_name.clone(),
            requested_version: request.model_version.clone(),
            request_sha256: digest(request),
        }
    }

    /// The event of the call's answer.
    pub fn event(
        &self,
        action: &str,
        result: Result<(&str, Option<&ModelInferResponse>), &Status>,
    ) -> AuditEvent {
        let (outcome_name, version, response_sha256, reason) = match result {
            Ok((version, response)) => (
                "ok".to_owned(),
                version.to_owned(),
                response.map(digest).unwrap_or_default(),
                String::new(),
            ),
            Err(status) => (
                outcome(status.code()),
                self.requested_version.clone(),
                String::new(),
                truncate(status.message(), 256),
            ),
        };
        self.note.with(|fields| AuditEvent {
            action: action.to_owned(),
            outcome: outcome_name,
            actor: if fields.actor.is_empty() {
                "anonymous".to_owned()
            } else {
                fields.actor.clone()
            },
            client_id: fields.client_id.clone(),
            tenant: fields.tenant.clone(),
            model: truncate(&self.model, 256),
            version: truncate(&version, 256),
            region: fields.region.clone(),
            worker: fields.worker.clone(),
            request_id: truncate(&self.request_id, 256),
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            request_sha256: self.request_sha256.clone(),
            response_sha256,
            reason,
            ..AuditEvent::default()
        })
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Records `event`; in fail-closed mode a full spool turns the answer into
/// a refusal (no answer leaves without its record).
pub fn record<T>(
    auditor: &Auditor,
    event: AuditEvent,
    answer: Result<T, Status>,
) -> Result<T, Status> {
    match auditor.record(event) {
        Ok(()) => answer,
        Err(backlog) => Err(backlog_status(&backlog)),
    }
}

/// How long the router waits at shutdown for its spooled records to reach
/// the audit service (what is left is shipped by the next start).
pub const DRAIN_AT_SHUTDOWN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_snake_case_code_names() {
        assert_eq!(outcome(Code::Ok), "ok");
        assert_eq!(outcome(Code::PermissionDenied), "permission_denied");
        assert_eq!(outcome(Code::FailedPrecondition), "failed_precondition");
        assert_eq!(outcome(Code::Unauthenticated), "unauthenticated");
    }

    #[test]
    fn digests_change_with_the_payload() {
        let mut request = ModelInferRequest {
            model_name: "demo".into(),
            ..Default::default()
        };
        let first = digest(&request);
        assert_eq!(first.len(), 64);
        assert_eq!(first, digest(&request));
        request.raw_input_contents.push(vec![1u8, 2, 3].into());
        assert_ne!(first, digest(&request));
    }

    #[test]
    fn the_note_fills_the_event() {
        let request = ModelInferRequest {
            model_name: "demo".into(),
            model_version: "2".into(),
            ..Default::default()
        };
        let pending = Pending::open(&request, "req-1");
        pending.note.tenant("acme");
        pending.note.worker("w-1", "uae-north");
        let event = pending.event(INFERENCE, Err(&Status::failed_precondition("no region")));
        assert_eq!(event.outcome, "failed_precondition");
        assert_eq!(event.version, "2");
        assert_eq!(event.actor, "anonymous");
        assert_eq!(
            (
                event.tenant.as_str(),
                event.worker.as_str(),
                event.region.as_str()
            ),
            ("acme", "w-1", "uae-north")
        );
        assert_eq!(event.reason, "no region");
        assert!(event.response_sha256.is_empty());
        let response = ModelInferResponse::default();
        let event = pending.event(INFERENCE, Ok(("3", Some(&response))));
        assert_eq!(
            (event.outcome.as_str(), event.version.as_str()),
            ("ok", "3")
        );
        assert_eq!(event.response_sha256, digest(&response));
    }
}
