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
}
