//! The change feed: the registry revision, the changes after one, and the
//! routed state of a model as Watch sends it.

use std::collections::{BTreeSet, HashMap};

use shamal_proto::shamal::registry::v1 as proto;
use sqlx::Row;
use tokio::sync::watch;

use super::ModelRegistry;
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::store::*;

impl ModelRegistry {
    pub(crate) fn notify(&self, revision: u64) {
        self.revision.send_if_modified(|current| {
            if revision > *current {
                *current = revision;
                true
            } else {
                false
            }
        });
    }

    /// Wakes on every committed change of this registry process.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub async fn current_revision(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS latest FROM changes")
            .fetch_one(&self.store.pool)
            .await?;
        Ok(row.try_get::<i64, _>("latest")? as u64)
    }

    /// Models changed after `revision`, and the revision that brings a
    /// subscriber up to date.
    pub async fn changes_since(&self, revision: u64) -> Result<(Vec<String>, u64)> {
        let changes = self.change_set_since(revision).await?;
        Ok((changes.models, changes.latest))
    }

    /// Everything changed after `revision`: models, workers and whether the
    /// tenant policies changed, with the revision that brings a subscriber
    /// up to date.
    pub async fn change_set_since(&self, revision: u64) -> Result<ChangeSet> {
        let rows = sqlx::query(
            "SELECT revision, model, kind FROM changes WHERE revision > $1 ORDER BY revision",
        )
        .bind(revision as i64)
        .fetch_all(&self.store.pool)
        .await?;
        let mut latest = revision;
        let mut models = BTreeSet::new();
        let mut workers = BTreeSet::new();
        let mut tenant_policies = false;
        for row in &rows {
            latest = latest.max(row.try_get::<i64, _>("revision")? as u64);
            let subject = row.try_get::<String, _>("model")?;
            match row.try_get::<String, _>("kind")?.as_str() {
                change_kind::WORKER => {
                    workers.insert(subject);
                }
                change_kind::TENANTS => tenant_policies = true,
                // `model`, `placement`, and kinds of later registries: a
                // model's state is the safe thing to send again.
                _ => {
                    models.insert(subject);
                }
            }
        }
        Ok(ChangeSet {
            models: models.into_iter().collect(),
            workers: workers.into_iter().collect(),
            tenant_policies,
            latest,
        })
    }

    pub async fn model_names(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM models ORDER BY name")
            .fetch_all(&self.store.pool)
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("name").map_err(Into::into))
            .collect()
    }

    /// The routed state of a model as Watch carries it; `None` when the
    /// model does not exist.
    pub async fn model_state(&self, name: &str) -> Result<Option<proto::ModelState>> {
        let pool = &self.store.pool;
        let exists = sqlx::query(
            "SELECT allowed_regions, allowed_tenants, allowed_groups, placement_mode, placement_min_replicas FROM models WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await?;
        let Some(exists) = exists else {
            return Ok(None);
        };
        let allowed_regions: String = exists.try_get("allowed_regions")?;
        let (allowed_tenants, allowed_groups) = crate::access::access_lists(&exists)?;
        let mode: String = exists.try_get("placement_mode")?;
        let mode = PlacementMode::parse(&mode).ok_or_else(|| {
            RegistryError::Internal(format!("unknown stored placement mode {mode}"))
        })?;
        let min_replicas =
            u32::try_from(exists.try_get::<i64, _>("placement_min_replicas")?).unwrap_or(1);
        let mut assigned = self.assigned_workers(name, mode).await?;
        let versions = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 ORDER BY version"
        ))
        .bind(name)
        .fetch_all(pool)
        .await?;
        let versions = versions
            .iter()
            .map(version_from_row)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .map(|version| proto::VersionState {
                version: version.version,
                lifecycle: version.lifecycle.as_str().to_owned(),
                reason: version.reason,
                artifact: Some(proto::Artifact {
                    sha256: version.artifact.sha256,
                    size_bytes: version.artifact.size_bytes,
                    format: version.artifact.format.as_str().to_owned(),
                }),
                assigned_workers: assigned.remove(&version.version).unwrap_or_default(),
            })
            .collect();
        let aliases = sqlx::query(
            "SELECT model, alias, version, updated_by, updated_at FROM aliases WHERE model = $1",
        )
        .bind(name)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| alias_from_row(row).map(|alias| (alias.alias, alias.version)))
        .collect::<Result<HashMap<_, _>>>()?;
        let rollout = sqlx::query("SELECT revision, policy FROM rollouts WHERE model = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(rollout_from_row)
            .transpose()?
            .map(|rollout| rollout_to_proto(&rollout));
        let placements = sqlx::query("SELECT p.worker_id AS worker_id, w.address AS address, w.region AS region, p.version AS version, p.state AS state, p.reason AS reason FROM placements p JOIN workers w ON w.id = p.worker_id WHERE p.model = $1 ORDER BY p.version, p.worker_id")
            .bind(name)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| {
                Ok(proto::Placement {
                    worker_id: row.try_get("worker_id")?,
                    address: row.try_get("address")?,
                    region: row.try_get("region")?,
                    version: row.try_get::<i64, _>("version")? as u64,
                    state: row.try_get("state")?,
                    reason: row.try_get("reason")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(proto::ModelState {
            name: name.to_owned(),
            versions,
            aliases,
            rollout,
            placements,
            allowed_regions: regions_from_text(&allowed_regions)?,
            allowed_tenants,
            allowed_groups,
            placement_policy: Some(proto::PlacementPolicy {
                mode: mode.as_str().to_owned(),
                min_replicas,
            }),
        }))
    }
}

/// What changed after a revision (see [`ModelRegistry::change_set_since`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Models whose routed state changed (they may since be deleted).
    pub models: Vec<String>,
    /// Workers whose membership changed.
    pub workers: Vec<String>,
    /// Whether the tenant residency policies changed.
    pub tenant_policies: bool,
    /// The revision that brings a subscriber up to date.
    pub latest: u64,
}

pub fn rollout_to_proto(rollout: &Rollout) -> proto::Rollout {
    let active = rollout.state == RolloutState::Active;
    proto::Rollout {
        revision: rollout.revision,
        state: rollout.state.as_str().to_owned(),
        stable_version: rollout.stable_version,
        splits: rollout
            .effective_splits()
            .iter()
            .map(|split| proto::Split {
                version: split.version,
                weight: split.weight,
            })
            .collect(),
        sticky_key: rollout.sticky_key.clone().unwrap_or_default(),
        // Shadow copies only while the rollout is live.
        shadow_version: rollout
            .shadow
            .filter(|_| active)
            .map_or(0, |shadow| shadow.version),
        shadow_percent: rollout
            .shadow
            .filter(|_| active)
            .map_or(0.0, |shadow| shadow.percent),
        guard_rails: Some(proto::GuardRails {
            max_error_rate: rollout.guard_rails.max_error_rate.unwrap_or(0.0),
            max_p99_ratio: rollout.guard_rails.max_p99_ratio.unwrap_or(0.0),
            min_requests: rollout.guard_rails.min_requests(),
        }),
    }
}
