//! The registry's operations: what the REST and gRPC APIs both call.
//!
//! Every mutation runs in one database transaction that also appends to the
//! change log (`changes`), whose sequence number is the registry revision
//! that Watch subscribers resume from. Rollout writes name the rollout
//! revision they change; a stale one is refused with a conflict.
//!
//! [`ModelRegistry`] is one type whose operations are spread over one file
//! per concern: `models`, `artifacts`, `versions`, `aliases`, `rollouts`,
//! `placements`, the `change_feed` that Watch reads, the `canary` analysis,
//! and the `sql` helpers the writes share. Worker membership, placement
//! planning and residency add theirs from the crate's `membership`,
//! `planner` and `residency` modules.

mod aliases;
mod artifacts;
mod canary;
mod change_feed;
mod models;
mod placements;
mod rollouts;
mod sql;
mod versions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use shamal_audit_client::{AuditEvent, Auditor};
use tokio::sync::watch;

use crate::artifacts::ArtifactStore;
use crate::error::{RegistryError, Result};
use crate::store::Store;

pub use canary::ANALYSIS_ACTOR;
use canary::TrafficBook;
pub use change_feed::{ChangeSet, rollout_to_proto};

/// The registry: database, artifact store, change notifications and the
/// canary analysis.
pub struct ModelRegistry {
    pub(crate) store: Store,
    artifacts: Arc<dyn ArtifactStore>,
    max_artifact_bytes: u64,
    revision: watch::Sender<u64>,
    traffic: Mutex<TrafficBook>,
    /// Heartbeat interval and lease handed to workers.
    pub(crate) membership: MembershipSettings,
    /// Live liveness figures of serving and draining workers.
    pub(crate) members: Mutex<HashMap<String, crate::membership::Member>>,
    /// Serialises membership state changes (register, deregister, sweep).
    pub(crate) member_writes: tokio::sync::Mutex<()>,
    /// Make-before-break timing of `weighted` placement.
    pub(crate) placement: crate::planner::PlacementSettings,
    /// Where every mutation is reported (disabled unless configured).
    auditor: Auditor,
}

/// One committed mutation, as reported to the audit log by
/// [`ModelRegistry::audit`]. Empty strings mean "not applicable".
#[derive(Debug, Default)]
pub(crate) struct Change<'a> {
    /// Stable dotted name: `version.register`, `rollout.shift`, ...
    pub action: &'static str,
    /// The actor as the registry records it (`subject (client id)`,
    /// a service URI, or empty for anonymous).
    pub actor: &'a str,
    pub model: &'a str,
    pub version: Option<u64>,
    pub tenant: &'a str,
    pub worker: &'a str,
    pub region: &'a str,
    /// JSON of the object before (`""` when it did not exist).
    pub before: String,
    /// JSON of the object after (`""` when it no longer exists).
    pub after: String,
    pub reason: &'a str,
}

/// Who the registry's own changes (a worker's lease expiring) are
/// attributed to in the audit trail.
pub const SYSTEM_ACTOR: &str = "registry";

/// The audit service's limits on an event's text fields and JSON (an event
/// over them would be refused by Append, and block the shipper).
const AUDIT_MAX_TEXT_CHARS: usize = 256;
const AUDIT_MAX_JSON_BYTES: usize = 64 * 1024;

fn clip(text: &str) -> String {
    text.chars().take(AUDIT_MAX_TEXT_CHARS).collect()
}

/// `value` as JSON for `before_json` / `after_json`.
pub(crate) fn audit_json<T: Serialize + ?Sized>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(text) if text.len() <= AUDIT_MAX_JSON_BYTES => text,
        Ok(text) => format!(r#"{{"truncated":true,"bytes":{}}}"#, text.len()),
        Err(error) => serde_json::json!({ "unserializable": error.to_string() }).to_string(),
    }
}

/// `value` as JSON, `""` when there is none.
pub(crate) fn audit_json_opt<T: Serialize>(value: Option<&T>) -> String {
    value.map(audit_json).unwrap_or_default()
}

/// Splits the recorded actor `subject (client id)` into subject and
/// client id.
fn split_actor(actor: &str) -> (String, String) {
    let actor = actor_or_anonymous(actor);
    if let Some(inner) = actor.strip_suffix(')')
        && let Some((subject, client)) = inner.rsplit_once(" (client ")
    {
        return (clip(subject), clip(client));
    }
    (clip(&actor), String::new())
}

/// Worker membership timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipSettings {
    /// How often workers heartbeat.
    pub heartbeat_interval: std::time::Duration,
    /// Time without a heartbeat after which a worker is `lost`.
    pub lease: std::time::Duration,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        MembershipSettings {
            heartbeat_interval: std::time::Duration::from_millis(250),
            lease: std::time::Duration::from_millis(1000),
        }
    }
}

/// Validates a model name: what clients put in `model_name`.
pub fn validate_model_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
        && !name.starts_with('.');
    if valid {
        Ok(())
    } else {
        Err(RegistryError::invalid(
            "name",
            "model names are 1-128 characters of letters, digits, '_', '-' and '.', not starting with '.'",
        ))
    }
}

/// Validates an alias name: lowercase, not a number (numbers are versions).
pub fn validate_alias(alias: &str) -> Result<()> {
    let valid = !alias.is_empty()
        && alias.len() <= 63
        && alias.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'_' | b'-')
        })
        && !alias.bytes().all(|byte| byte.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(RegistryError::invalid(
            "alias",
            "aliases are 1-63 characters of a-z, 0-9, '_' and '-', and not only digits",
        ))
    }
}

pub(crate) fn actor_or_anonymous(actor: &str) -> String {
    if actor.trim().is_empty() {
        "anonymous".to_owned()
    } else {
        actor.trim().to_owned()
    }
}

impl ModelRegistry {
    pub async fn new(
        store: Store,
        artifacts: Arc<dyn ArtifactStore>,
        max_artifact_bytes: u64,
    ) -> Result<ModelRegistry> {
        let registry = ModelRegistry {
            store,
            artifacts,
            max_artifact_bytes,
            revision: watch::Sender::new(0),
            traffic: Mutex::new(TrafficBook::default()),
            membership: MembershipSettings::default(),
            members: Mutex::new(HashMap::new()),
            member_writes: tokio::sync::Mutex::new(()),
            placement: crate::planner::PlacementSettings::default(),
            auditor: Auditor::disabled(),
        };
        let current = registry.current_revision().await?;
        registry.revision.send_replace(current);
        registry.load_members().await?;
        Ok(registry)
    }

    /// Sets the heartbeat interval and lease handed to workers.
    pub fn with_membership(mut self, membership: MembershipSettings) -> ModelRegistry {
        self.membership = membership;
        self
    }

    pub fn membership(&self) -> MembershipSettings {
        self.membership
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Reports every mutation to `auditor` (see docs/registry.md, "Audit
    /// trail").
    pub fn with_auditor(mut self, auditor: Auditor) -> ModelRegistry {
        self.auditor = auditor;
        self
    }

    /// Where mutations are reported.
    pub fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// The check every mutation makes before it changes anything: with
    /// `on_full = "fail_closed"` and the audit backlog full, the mutation
    /// is refused (`RESOURCE_EXHAUSTED`, HTTP 429).
    pub(crate) fn admit(&self) -> Result<()> {
        self.auditor.admit().map_err(RegistryError::from)
    }

    /// Reports a committed mutation. Never fails: the change is made, so a
    /// backlog that filled since [`ModelRegistry::admit`] (concurrent
    /// events) is logged.
    pub(crate) fn audit(&self, change: Change<'_>) {
        if !self.auditor.is_enabled() {
            return;
        }
        let (actor, client_id) = split_actor(change.actor);
        let event = AuditEvent {
            action: change.action.to_owned(),
            outcome: "ok".to_owned(),
            actor,
            client_id,
            tenant: clip(change.tenant),
            model: clip(change.model),
            version: change.version.map(|v| v.to_string()).unwrap_or_default(),
            worker: clip(change.worker),
            region: clip(change.region),
            before_json: change.before,
            after_json: change.after,
            reason: clip(change.reason),
            ..AuditEvent::default()
        };
        if let Err(backlog) = self.auditor.record(event) {
            tracing::error!(action = change.action, model = change.model, %backlog, "a committed change was not audited");
        }
    }
}
