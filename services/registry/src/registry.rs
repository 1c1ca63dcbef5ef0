//! The registry's operations: what the REST and gRPC APIs both call.
//!
//! Every mutation runs in one database transaction that also appends to the
//! change log (`changes`), whose sequence number is the registry revision
//! that Watch subscribers resume from. Rollout writes name the rollout
//! revision they change; a stale one is refused with a conflict.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use shamal_proto::shamal::registry::v1 as proto;
use sqlx::{Any, Row, Transaction};
use tokio::sync::watch;

use crate::artifacts::{ArtifactStore, ByteStream, validate_sha256};
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::store::*;

/// Who the canary analysis acts as in the rollout history.
pub const ANALYSIS_ACTOR: &str = "canary-analysis";

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

    // ----- models -------------------------------------------------------

    pub async fn create_model(&self, name: &str, description: &str, actor: &str) -> Result<Model> {
        validate_model_name(name)?;
        let mut tx = self.store.begin_write().await?;
        let model = Model {
            name: name.to_owned(),
            description: description.to_owned(),
            created_by: actor_or_anonymous(actor),
            created_at: now_millis(),
            latest_version: 0,
        };
        insert_model(&mut tx, &model).await?;
        let revision = record_change(&mut tx, name).await?;
        tx.commit().await?;
        self.notify(revision);
        Ok(model)
    }

    pub async fn get_model(&self, name: &str) -> Result<Model> {
        let row = sqlx::query("SELECT name, description, created_by, created_at, latest_version FROM models WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.store.pool)
            .await?;
        match row {
            Some(row) => model_from_row(&row),
            None => Err(RegistryError::NotFound(format!(
                "model '{name}' does not exist"
            ))),
        }
    }

    pub async fn list_models(
        &self,
        page_size_requested: Option<u32>,
        token: Option<&str>,
    ) -> Result<Page<Model>> {
        let limit = page_size(page_size_requested)?;
        let after = token.map(decode_token).transpose()?.unwrap_or_default();
        let rows = sqlx::query("SELECT name, description, created_by, created_at, latest_version FROM models WHERE name > $1 ORDER BY name LIMIT $2")
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(model_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, limit, |model| model.name.clone()))
    }

    // ----- artifacts ----------------------------------------------------

    /// Streams an upload into the artifact store, verified against the
    /// declared digest; idempotent for the same bytes.
    pub async fn put_artifact(
        &self,
        sha256: &str,
        body: BoxStream<'_, io::Result<Bytes>>,
    ) -> Result<u64> {
        validate_sha256("sha256", sha256)?;
        let size = self
            .artifacts
            .put(sha256, body, self.max_artifact_bytes)
            .await?;
        let mut tx = self.store.begin_write().await?;
        sqlx::query("INSERT INTO artifacts (sha256, size_bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(sha256)
            .bind(size as i64)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(size)
    }

    pub async fn open_artifact(&self, sha256: &str) -> Result<(u64, ByteStream)> {
        validate_sha256("sha256", sha256)?;
        self.artifacts.open(sha256).await?.ok_or_else(|| {
            RegistryError::NotFound(format!("artifact sha256:{sha256} does not exist"))
        })
    }

    // ----- versions -----------------------------------------------------

    /// Registers a new version of `model` (created on the way unless
    /// `create_model` is false) for an artifact uploaded before.
    pub async fn register_version(
        &self,
        model: &str,
        new: NewVersion,
        actor: &str,
    ) -> Result<Version> {
        validate_model_name(model)?;
        validate_sha256("sha256", &new.sha256)?;
        let format = Format::parse(&new.format)
            .ok_or_else(|| RegistryError::invalid("format", "must be onnx or safetensors"))?;
        for key in new.metadata.keys() {
            if key.is_empty() || key.len() > 128 {
                return Err(RegistryError::invalid(
                    "metadata",
                    "keys are 1-128 characters",
                ));
            }
        }
        let actor = actor_or_anonymous(actor);
        let Some(size) = self.artifacts.size(&new.sha256).await? else {
            return Err(RegistryError::FailedPrecondition(format!(
                "artifact sha256:{} has not been uploaded (PUT /v1/artifacts/{})",
                new.sha256, new.sha256
            )));
        };
        let mut tx = self.store.begin_write().await?;
        sqlx::query("INSERT INTO artifacts (sha256, size_bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(&new.sha256)
            .bind(size as i64)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        let existing = sqlx::query("SELECT latest_version FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&mut *tx)
            .await?;
        let latest = match existing {
            Some(row) => row.try_get::<i64, _>("latest_version")?,
            None if new.create_model.unwrap_or(true) => {
                insert_model(
                    &mut tx,
                    &Model {
                        name: model.to_owned(),
                        description: String::new(),
                        created_by: actor.clone(),
                        created_at: now_millis(),
                        latest_version: 0,
                    },
                )
                .await?;
                0
            }
            None => {
                return Err(RegistryError::NotFound(format!(
                    "model '{model}' does not exist"
                )));
            }
        };
        let version = Version {
            model: model.to_owned(),
            version: latest as u64 + 1,
            artifact: Artifact {
                sha256: new.sha256.clone(),
                size_bytes: size,
                format,
            },
            signature: None,
            metadata: new.metadata,
            lineage: new.lineage,
            lifecycle: Lifecycle::Registered,
            reason: String::new(),
            created_by: actor,
            created_at: now_millis(),
        };
        sqlx::query(&format!(
            "INSERT INTO versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8, '', $9, $10)"
        ))
        .bind(&version.model)
        .bind(version.version as i64)
        .bind(&version.artifact.sha256)
        .bind(size as i64)
        .bind(format.as_str())
        .bind(json_text(&version.metadata)?)
        .bind(json_text(&version.lineage)?)
        .bind(version.lifecycle.as_str())
        .bind(&version.created_by)
        .bind(version.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                RegistryError::Conflict {
                    message: format!("another version of '{model}' was registered at the same time; retry"),
                    current_revision: latest as u64,
                }
            } else {
                error.into()
            }
        })?;
        let updated = sqlx::query(
            "UPDATE models SET latest_version = $1 WHERE name = $2 AND latest_version = $3",
        )
        .bind(version.version as i64)
        .bind(model)
        .bind(latest)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(RegistryError::Conflict {
                message: format!(
                    "another version of '{model}' was registered at the same time; retry"
                ),
                current_revision: latest as u64,
            });
        }
        // A model's first version becomes `production`: later versions take
        // traffic only through a rollout or an explicit alias move.
        if fetch_alias(&mut tx, model, "production").await?.is_none() {
            upsert_alias(
                &mut tx,
                &Alias {
                    model: model.to_owned(),
                    alias: "production".to_owned(),
                    version: version.version,
                    updated_by: version.created_by.clone(),
                    updated_at: version.created_at,
                },
            )
            .await?;
        }
        // A `weighted` model's new version gets its workers in the same
        // change: published without them, every worker would load it.
        self.plan_in(&mut tx, model).await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, version = version.version, sha256 = %version.artifact.sha256, "version registered");
        Ok(version)
    }

    pub async fn get_version(&self, model: &str, version: u64) -> Result<Version> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version = $2"
        ))
        .bind(model)
        .bind(version as i64)
        .fetch_optional(&self.store.pool)
        .await?;
        match row {
            Some(row) => version_from_row(&row),
            None => {
                self.get_model(model).await?;
                Err(RegistryError::NotFound(format!(
                    "model '{model}' has no version {version}"
                )))
            }
        }
    }

    pub async fn list_versions(
        &self,
        model: &str,
        page_size_requested: Option<u32>,
        token: Option<&str>,
    ) -> Result<Page<Version>> {
        let limit = page_size(page_size_requested)?;
        let after = token.map(decode_number_token).transpose()?.unwrap_or(0);
        self.get_model(model).await?;
        let rows = sqlx::query(&format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version > $2 ORDER BY version LIMIT $3"))
            .bind(model)
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(version_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, limit, |version| version.version.to_string()))
    }

    /// Retires a version: workers unload it. Refused while a rollout in
    /// progress or an alias uses it.
    pub async fn archive_version(&self, model: &str, version: u64, actor: &str) -> Result<Version> {
        let mut tx = self.store.begin_write().await?;
        let current = fetch_version(&mut tx, model, version).await?;
        if current.lifecycle == Lifecycle::Archived {
            tx.rollback().await?;
            return Ok(current);
        }
        let alias = sqlx::query("SELECT alias FROM aliases WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version as i64)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(alias) = alias {
            let alias: String = alias.try_get("alias")?;
            return Err(RegistryError::FailedPrecondition(format!(
                "alias '{alias}' points to version {version}; move it first"
            )));
        }
        if let Some(rollout) = fetch_rollout(&mut tx, model).await? {
            let used = rollout.stable_version == version
                || rollout
                    .splits
                    .iter()
                    .any(|split| split.version == version && split.weight > 0)
                || rollout
                    .shadow
                    .is_some_and(|shadow| shadow.version == version);
            if rollout.state.in_progress() && used || rollout.stable_version == version {
                return Err(RegistryError::FailedPrecondition(format!(
                    "the rollout of '{model}' (revision {}) routes traffic to version {version}",
                    rollout.revision
                )));
            }
        }
        sqlx::query("UPDATE versions SET lifecycle = 'archived', reason = $1 WHERE model = $2 AND version = $3")
            .bind(format!("archived by {}", actor_or_anonymous(actor)))
            .bind(model)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, model).await?;
        let archived = fetch_version(&mut tx, model, version).await?;
        tx.commit().await?;
        self.notify(revision);
        Ok(archived)
    }

    /// Gives a failed version another chance: its failed placements are
    /// forgotten and it goes back to `registered`, so workers load it again
    /// (after the cause — a worker short of memory, a registry outage during
    /// a fetch — is fixed).
    pub async fn retry_version(&self, model: &str, version: u64, actor: &str) -> Result<Version> {
        let mut tx = self.store.begin_write().await?;
        let current = fetch_version(&mut tx, model, version).await?;
        if current.lifecycle != Lifecycle::Failed {
            return Err(RegistryError::FailedPrecondition(format!(
                "version {version} of '{model}' is {}, not failed",
                current.lifecycle.as_str()
            )));
        }
        sqlx::query(
            "DELETE FROM placements WHERE model = $1 AND version = $2 AND state = 'failed'",
        )
        .bind(model)
        .bind(version as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE versions SET lifecycle = 'registered', reason = '' WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?;
        self.plan_in(&mut tx, model).await?;
        let revision = record_change(&mut tx, model).await?;
        let retried = fetch_version(&mut tx, model, version).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, version, actor = %actor_or_anonymous(actor), previous_reason = %current.reason, "failed version retried");
        Ok(retried)
    }

    // ----- aliases ------------------------------------------------------

    pub async fn set_alias(
        &self,
        model: &str,
        alias: &str,
        version: u64,
        actor: &str,
    ) -> Result<Alias> {
        validate_alias(alias)?;
        let mut tx = self.store.begin_write().await?;
        let target = fetch_version(&mut tx, model, version).await?;
        if matches!(target.lifecycle, Lifecycle::Archived | Lifecycle::Failed) {
            return Err(RegistryError::FailedPrecondition(format!(
                "version {version} of '{model}' is {}",
                target.lifecycle.as_str()
            )));
        }
        let entry = Alias {
            model: model.to_owned(),
            alias: alias.to_owned(),
            version,
            updated_by: actor_or_anonymous(actor),
            updated_at: now_millis(),
        };
        upsert_alias(&mut tx, &entry).await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        Ok(entry)
    }

    pub async fn delete_alias(&self, model: &str, alias: &str) -> Result<()> {
        let mut tx = self.store.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM aliases WHERE model = $1 AND alias = $2")
            .bind(model)
            .bind(alias)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "model '{model}' has no alias '{alias}'"
            )));
        }
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        Ok(())
    }

    pub async fn list_aliases(&self, model: &str) -> Result<Vec<Alias>> {
        self.get_model(model).await?;
        let rows = sqlx::query("SELECT model, alias, version, updated_by, updated_at FROM aliases WHERE model = $1 ORDER BY alias")
            .bind(model)
            .fetch_all(&self.store.pool)
            .await?;
        rows.iter().map(alias_from_row).collect()
    }

    // ----- rollouts -----------------------------------------------------

    pub async fn get_rollout(&self, model: &str) -> Result<Option<Rollout>> {
        self.get_model(model).await?;
        let row = sqlx::query("SELECT revision, policy FROM rollouts WHERE model = $1")
            .bind(model)
            .fetch_optional(&self.store.pool)
            .await?;
        row.as_ref().map(rollout_from_row).transpose()
    }

    /// The rollout with the traffic figures the canary analysis judges.
    pub async fn rollout_status(&self, model: &str) -> Result<RolloutStatus> {
        let rollout = self
            .get_rollout(model)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("model '{model}' has no rollout")))?;
        let analysis = self
            .traffic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .analysis(model, rollout.revision);
        Ok(RolloutStatus { rollout, analysis })
    }

    /// Starts a canary: `weight`% to the candidate, the rest to the stable
    /// version.
    pub async fn start_rollout(
        &self,
        model: &str,
        start: StartRollout,
        actor: &str,
    ) -> Result<Rollout> {
        if start.weight > 100 {
            return Err(RegistryError::invalid(
                "weight",
                "must be between 0 and 100",
            ));
        }
        validate_extras(
            start.sticky_key.as_deref(),
            start.shadow.as_ref(),
            &start.guard_rails,
        )?;
        self.write_rollout(model, start.expected_revision, "start", actor, "", |tx, current| {
            let model = model.to_owned();
            Box::pin(async move {
                if let Some(current) = &current
                    && current.state.in_progress()
                {
                    return Err(RegistryError::FailedPrecondition(format!(
                        "a rollout of '{model}' is already {} (revision {}); shift, promote or roll it back",
                        current.state.as_str(),
                        current.revision
                    )));
                }
                let stable = match start.stable {
                    Some(stable) => stable,
                    None => match fetch_alias(tx, &model, "production").await? {
                        Some(version) => version,
                        None => match &current {
                            Some(previous) => previous.stable_version,
                            None => {
                                return Err(RegistryError::invalid(
                                    "stable",
                                    "no production alias to take it from: name the stable version",
                                ));
                            }
                        },
                    },
                };
                if stable == start.candidate {
                    return Err(RegistryError::invalid("candidate", "must differ from the stable version"));
                }
                ensure_routable(tx, &model, stable, "stable").await?;
                ensure_routable(tx, &model, start.candidate, "candidate").await?;
                if let Some(shadow) = &start.shadow {
                    ensure_routable(tx, &model, shadow.version, "shadow.version").await?;
                }
                Ok(Rollout {
                    model: model.to_owned(),
                    revision: 0,
                    state: RolloutState::Active,
                    stable_version: stable,
                    splits: canary_splits(start.candidate, start.weight, stable),
                    sticky_key: start.sticky_key,
                    shadow: start.shadow,
                    guard_rails: start.guard_rails,
                    updated_by: String::new(),
                    updated_at: 0,
                    reason: String::new(),
                })
            })
        })
        .await
    }

    /// Writes a complete policy: any number of weighted versions.
    pub async fn set_policy(&self, model: &str, policy: SetPolicy, actor: &str) -> Result<Rollout> {
        if policy.splits.is_empty() {
            return Err(RegistryError::invalid(
                "splits",
                "must list at least one version",
            ));
        }
        // Summed wide: weights are u32 and a request may send values whose
        // u32 sum overflows (found by schemathesis).
        let total: u64 = policy
            .splits
            .iter()
            .map(|split| u64::from(split.weight))
            .sum();
        if total != 100 {
            return Err(RegistryError::invalid(
                "splits",
                format!("weights must sum to 100, not {total}"),
            ));
        }
        let distinct: BTreeSet<u64> = policy.splits.iter().map(|split| split.version).collect();
        if distinct.len() != policy.splits.len() {
            return Err(RegistryError::invalid("splits", "lists a version twice"));
        }
        validate_extras(
            policy.sticky_key.as_deref(),
            policy.shadow.as_ref(),
            &policy.guard_rails,
        )?;
        self.write_rollout(
            model,
            policy.expected_revision,
            "set_policy",
            actor,
            "",
            |tx, _current| {
                let model = model.to_owned();
                Box::pin(async move {
                    ensure_routable(tx, &model, policy.stable, "stable").await?;
                    for split in &policy.splits {
                        ensure_routable(tx, &model, split.version, "splits").await?;
                    }
                    if let Some(shadow) = &policy.shadow {
                        ensure_routable(tx, &model, shadow.version, "shadow.version").await?;
                    }
                    Ok(Rollout {
                        model: model.to_owned(),
                        revision: 0,
                        state: RolloutState::Active,
                        stable_version: policy.stable,
                        splits: policy.splits,
                        sticky_key: policy.sticky_key,
                        shadow: policy.shadow,
                        guard_rails: policy.guard_rails,
                        updated_by: String::new(),
                        updated_at: 0,
                        reason: String::new(),
                    })
                })
            },
        )
        .await
    }

    /// Changes the candidate's share of traffic.
    pub async fn shift(
        &self,
        model: &str,
        expected_revision: u64,
        weight: u32,
        actor: &str,
    ) -> Result<Rollout> {
        if weight > 100 {
            return Err(RegistryError::invalid(
                "weight",
                "must be between 0 and 100",
            ));
        }
        self.write_rollout(
            model,
            expected_revision,
            "shift",
            actor,
            "",
            |_tx, current| {
                let model = model.to_owned();
                Box::pin(async move {
                    let mut rollout = in_progress(&model, current)?;
                    let candidate = single_candidate(&rollout)?;
                    rollout.splits = canary_splits(candidate, weight, rollout.stable_version);
                    Ok(rollout)
                })
            },
        )
        .await
    }

    /// The candidate takes all traffic and the `production` alias.
    pub async fn promote(
        &self,
        model: &str,
        expected_revision: u64,
        actor: &str,
    ) -> Result<Rollout> {
        let actor_name = actor_or_anonymous(actor);
        self.write_rollout(
            model,
            expected_revision,
            "promote",
            actor,
            "",
            |tx, current| {
                let model = model.to_owned();
                Box::pin(async move {
                    let mut rollout = in_progress(&model, current)?;
                    let candidate = single_candidate(&rollout)?;
                    ensure_routable(tx, &model, candidate, "candidate").await?;
                    rollout.state = RolloutState::Promoted;
                    rollout.stable_version = candidate;
                    rollout.splits = vec![Split {
                        version: candidate,
                        weight: 100,
                    }];
                    rollout.shadow = None;
                    upsert_alias(
                        tx,
                        &Alias {
                            model: model.to_owned(),
                            alias: "production".to_owned(),
                            version: candidate,
                            updated_by: actor_name,
                            updated_at: now_millis(),
                        },
                    )
                    .await?;
                    Ok(rollout)
                })
            },
        )
        .await
    }

    /// All traffic back to the stable version.
    pub async fn rollback(
        &self,
        model: &str,
        expected_revision: u64,
        reason: &str,
        actor: &str,
    ) -> Result<Rollout> {
        self.transition(
            model,
            expected_revision,
            "rollback",
            actor,
            reason,
            RolloutState::RolledBack,
        )
        .await
    }

    /// All traffic to the stable version for now; the weights are kept.
    pub async fn pause(&self, model: &str, expected_revision: u64, actor: &str) -> Result<Rollout> {
        self.transition(
            model,
            expected_revision,
            "pause",
            actor,
            "",
            RolloutState::Paused,
        )
        .await
    }

    /// Back to the weights of a paused rollout.
    pub async fn resume(
        &self,
        model: &str,
        expected_revision: u64,
        actor: &str,
    ) -> Result<Rollout> {
        self.transition(
            model,
            expected_revision,
            "resume",
            actor,
            "",
            RolloutState::Active,
        )
        .await
    }

    async fn transition(
        &self,
        model: &str,
        expected_revision: u64,
        action: &'static str,
        actor: &str,
        reason: &str,
        to: RolloutState,
    ) -> Result<Rollout> {
        self.write_rollout(
            model,
            expected_revision,
            action,
            actor,
            reason,
            |_tx, current| {
                let model = model.to_owned();
                Box::pin(async move {
                    let mut rollout = in_progress(&model, current)?;
                    match (rollout.state, to) {
                        (RolloutState::Active, RolloutState::Active) => {
                            return Err(RegistryError::FailedPrecondition(format!(
                                "the rollout of '{model}' is not paused"
                            )));
                        }
                        (RolloutState::Paused, RolloutState::Paused) => {
                            return Err(RegistryError::FailedPrecondition(format!(
                                "the rollout of '{model}' is already paused"
                            )));
                        }
                        _ => {}
                    }
                    rollout.state = to;
                    Ok(rollout)
                })
            },
        )
        .await
    }

    pub async fn history(
        &self,
        model: &str,
        page_size_requested: Option<u32>,
        token: Option<&str>,
    ) -> Result<Page<HistoryEntry>> {
        let limit = page_size(page_size_requested)?;
        let after = token.map(decode_number_token).transpose()?.unwrap_or(0);
        self.get_model(model).await?;
        let rows = sqlx::query("SELECT id, model, revision, action, actor, reason, at, policy FROM rollout_history WHERE model = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(model)
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(history_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, limit, |entry| entry.id.to_string()))
    }

    /// The one path every rollout change takes: check the expected
    /// revision, build the new rollout, store it with a history entry and a
    /// change record, all in one transaction.
    async fn write_rollout<F>(
        &self,
        model: &str,
        expected_revision: u64,
        action: &str,
        actor: &str,
        reason: &str,
        build: F,
    ) -> Result<Rollout>
    where
        F: for<'t> FnOnce(
            &'t mut Transaction<'static, Any>,
            Option<Rollout>,
        ) -> futures::future::BoxFuture<'t, Result<Rollout>>,
    {
        let mut tx = self.store.begin_write().await?;
        let exists = sqlx::query("SELECT name FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(RegistryError::NotFound(format!(
                "model '{model}' does not exist"
            )));
        }
        let current = fetch_rollout(&mut tx, model).await?;
        let current_revision = current.as_ref().map_or(0, |rollout| rollout.revision);
        if expected_revision != current_revision {
            return Err(RegistryError::Conflict {
                message: format!(
                    "the rollout of '{model}' is at revision {current_revision}, not the expected {expected_revision}: reload and retry"
                ),
                current_revision,
            });
        }
        let mut rollout = build(&mut tx, current).await?;
        rollout.model = model.to_owned();
        rollout.revision = current_revision + 1;
        rollout.updated_by = actor_or_anonymous(actor);
        rollout.updated_at = now_millis();
        rollout.reason = reason.to_owned();
        let policy = json_text(&rollout)?;
        let written = if current_revision == 0 {
            sqlx::query("INSERT INTO rollouts (model, revision, policy) VALUES ($1, $2, $3)")
                .bind(model)
                .bind(rollout.revision as i64)
                .bind(&policy)
                .execute(&mut *tx)
                .await
        } else {
            sqlx::query(
                "UPDATE rollouts SET revision = $1, policy = $2 WHERE model = $3 AND revision = $4",
            )
            .bind(rollout.revision as i64)
            .bind(&policy)
            .bind(model)
            .bind(current_revision as i64)
            .execute(&mut *tx)
            .await
        };
        let conflict = || RegistryError::Conflict {
            message: format!("the rollout of '{model}' changed concurrently: reload and retry"),
            current_revision,
        };
        match written {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => return Err(conflict()),
            Err(error) if is_unique_violation(&error) => return Err(conflict()),
            Err(error) => return Err(error.into()),
        }
        sqlx::query("INSERT INTO rollout_history (model, revision, action, actor, reason, at, policy) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(model)
            .bind(rollout.revision as i64)
            .bind(action)
            .bind(&rollout.updated_by)
            .bind(reason)
            .bind(rollout.updated_at)
            .bind(&policy)
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(
            model,
            rollout_revision = rollout.revision,
            action,
            actor = %rollout.updated_by,
            state = rollout.state.as_str(),
            splits = ?rollout.effective_splits(),
            reason,
            "rollout changed"
        );
        Ok(rollout)
    }

    // ----- workers and placements ----------------------------------------

    pub async fn list_placements(&self, model: &str) -> Result<Vec<Placement>> {
        let rows = sqlx::query("SELECT worker_id, model, version, state, reason, updated_at FROM placements WHERE model = $1 ORDER BY version, worker_id")
            .bind(model)
            .fetch_all(&self.store.pool)
            .await?;
        rows.iter().map(placement_from_row).collect()
    }

    /// A worker's report on a version it holds; moves the version's
    /// lifecycle (ready once any worker has it ready; failed when every
    /// worker that tried failed).
    pub async fn report_placement(
        &self,
        worker_id: &str,
        model: &str,
        version: u64,
        state: &str,
        reason: &str,
        signature_json: &str,
    ) -> Result<()> {
        if !matches!(state, "loading" | "ready" | "failed" | "unloaded") {
            return Err(RegistryError::invalid(
                "state",
                "must be loading, ready, failed or unloaded",
            ));
        }
        let signature = if signature_json.is_empty() {
            None
        } else {
            let value: serde_json::Value = serde_json::from_str(signature_json)
                .map_err(|error| RegistryError::invalid("signature_json", error.to_string()))?;
            Some(json_text(&value)?)
        };
        let mut tx = self.store.begin_write().await?;
        let known = sqlx::query("SELECT state FROM workers WHERE id = $1")
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
        let known_state = known
            .map(|row| row.try_get::<String, _>("state"))
            .transpose()?;
        if known_state.is_none_or(|state| state == MemberState::Gone.as_str()) {
            return Err(RegistryError::FailedPrecondition(format!(
                "worker '{worker_id}' is not registered; call RegisterWorker first"
            )));
        }
        let current = fetch_version(&mut tx, model, version).await?;
        sqlx::query("INSERT INTO placements (worker_id, model, version, state, reason, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (worker_id, model, version) DO UPDATE SET state = excluded.state, reason = excluded.reason, updated_at = excluded.updated_at")
            .bind(worker_id)
            .bind(model)
            .bind(version as i64)
            .bind(state)
            .bind(reason)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        if let Some(signature) = &signature
            && current.signature.is_none()
        {
            sqlx::query("UPDATE versions SET signature = $1 WHERE model = $2 AND version = $3")
                .bind(signature)
                .bind(model)
                .bind(version as i64)
                .execute(&mut *tx)
                .await?;
        }
        if current.lifecycle != Lifecycle::Archived {
            let rows = sqlx::query("SELECT state, reason FROM placements WHERE model = $1 AND version = $2 ORDER BY updated_at DESC")
                .bind(model)
                .bind(version as i64)
                .fetch_all(&mut *tx)
                .await?;
            let states: Vec<(String, String)> = rows
                .iter()
                .map(|row| Ok((row.try_get("state")?, row.try_get("reason")?)))
                .collect::<Result<_>>()?;
            let (lifecycle, why) = if states.iter().any(|(state, _)| state == "ready") {
                (Lifecycle::Ready, String::new())
            } else if !states.is_empty() && states.iter().all(|(state, _)| state == "failed") {
                (Lifecycle::Failed, states[0].1.clone())
            } else {
                (current.lifecycle, current.reason.clone())
            };
            if lifecycle != current.lifecycle || why != current.reason {
                sqlx::query("UPDATE versions SET lifecycle = $1, reason = $2 WHERE model = $3 AND version = $4")
                    .bind(lifecycle.as_str())
                    .bind(&why)
                    .bind(model)
                    .bind(version as i64)
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(model, version, lifecycle = lifecycle.as_str(), reason = %why, "version lifecycle changed");
            }
        }
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        Ok(())
    }

    // ----- watch --------------------------------------------------------

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
            "SELECT allowed_regions, placement_mode, placement_min_replicas FROM models WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await?;
        let Some(exists) = exists else {
            return Ok(None);
        };
        let allowed_regions: String = exists.try_get("allowed_regions")?;
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
            placement_policy: Some(proto::PlacementPolicy {
                mode: mode.as_str().to_owned(),
                min_replicas,
            }),
        }))
    }

    // ----- canary analysis ----------------------------------------------

    /// Adds a router's traffic report, then judges the active rollouts it
    /// touches against their guard rails; a canary that breaks one is
    /// rolled back at once. Returns the models rolled back.
    pub async fn report_traffic(
        &self,
        report: &proto::ReportTrafficRequest,
    ) -> Result<Vec<String>> {
        let models: BTreeSet<String> = {
            let mut book = self
                .traffic
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
            for entry in &report.traffic {
                book.add(entry);
                let seen = newest.entry(entry.model.as_str()).or_default();
                *seen = (*seen).max(entry.rollout_revision);
            }
            for (model, revision) in newest {
                book.prune(model, revision);
            }
            report
                .traffic
                .iter()
                .map(|entry| entry.model.clone())
                .collect()
        };
        let mut rolled_back = Vec::new();
        for model in models {
            let row = sqlx::query("SELECT revision, policy FROM rollouts WHERE model = $1")
                .bind(&model)
                .fetch_optional(&self.store.pool)
                .await?;
            let Some(rollout) = row.as_ref().map(rollout_from_row).transpose()? else {
                continue;
            };
            if rollout.state != RolloutState::Active || !rollout.guard_rails.enabled() {
                continue;
            }
            let verdict = self
                .traffic
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .judge(&rollout);
            if let Some(reason) = verdict {
                tracing::warn!(model = %model, rollout_revision = rollout.revision, %reason, "canary broke its guard rails: rolling back");
                match self
                    .write_rollout(
                        &model,
                        rollout.revision,
                        "auto_rollback",
                        ANALYSIS_ACTOR,
                        &reason,
                        |_tx, current| {
                            Box::pin(async move {
                                let mut rollout = in_progress(&rollout.model, current)?;
                                rollout.state = RolloutState::RolledBack;
                                Ok(rollout)
                            })
                        },
                    )
                    .await
                {
                    Ok(_) => rolled_back.push(model),
                    // Someone changed the rollout meanwhile: their change wins.
                    Err(RegistryError::Conflict { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(rolled_back)
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

/// One page of `items`, fetched with one row more than `limit`: that extra
/// row only says whether a next page exists, and the token is the key of
/// the page's last item.
pub(crate) fn page_of<T>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Page<T> {
    let next_page_token = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| encode_token(&key(last)))
    } else {
        None
    };
    Page {
        items,
        next_page_token,
    }
}

fn validate_extras(
    sticky_key: Option<&str>,
    shadow: Option<&Shadow>,
    rails: &GuardRails,
) -> Result<()> {
    if let Some(key) = sticky_key
        && (key.is_empty()
            || key.len() > 64
            || !key
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-')))
    {
        return Err(RegistryError::invalid(
            "sticky_key",
            "1-64 characters of letters, digits, '_' and '-'",
        ));
    }
    if let Some(shadow) = shadow
        && !(shadow.percent > 0.0 && shadow.percent <= 100.0)
    {
        return Err(RegistryError::invalid(
            "shadow.percent",
            "must be in (0, 100]",
        ));
    }
    if let Some(rate) = rails.max_error_rate
        && !(0.0..=1.0).contains(&rate)
    {
        return Err(RegistryError::invalid(
            "guard_rails.max_error_rate",
            "must be between 0 and 1",
        ));
    }
    if let Some(ratio) = rails.max_p99_ratio
        && !(ratio.is_finite() && ratio >= 1.0)
    {
        return Err(RegistryError::invalid(
            "guard_rails.max_p99_ratio",
            "must be a number >= 1",
        ));
    }
    Ok(())
}

fn canary_splits(candidate: u64, weight: u32, stable: u64) -> Vec<Split> {
    vec![
        Split {
            version: candidate,
            weight,
        },
        Split {
            version: stable,
            weight: 100 - weight,
        },
    ]
}

fn in_progress(model: &str, current: Option<Rollout>) -> Result<Rollout> {
    match current {
        Some(rollout) if rollout.state.in_progress() => Ok(rollout),
        Some(rollout) => Err(RegistryError::FailedPrecondition(format!(
            "the rollout of '{model}' is {}; start a new one",
            rollout.state.as_str()
        ))),
        None => Err(RegistryError::FailedPrecondition(format!(
            "model '{model}' has no rollout"
        ))),
    }
}

fn single_candidate(rollout: &Rollout) -> Result<u64> {
    let candidates: Vec<u64> = rollout
        .splits
        .iter()
        .filter(|split| split.version != rollout.stable_version)
        .map(|split| split.version)
        .collect();
    match candidates.as_slice() {
        [candidate] => Ok(*candidate),
        [] => Err(RegistryError::FailedPrecondition(
            "the rollout has no candidate version".to_owned(),
        )),
        _ => Err(RegistryError::FailedPrecondition(
            "the rollout has several candidate versions; write the whole policy instead".to_owned(),
        )),
    }
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

async fn insert_model(tx: &mut Transaction<'static, Any>, model: &Model) -> Result<()> {
    sqlx::query("INSERT INTO models (name, description, created_by, created_at, latest_version) VALUES ($1, $2, $3, $4, 0)")
        .bind(&model.name)
        .bind(&model.description)
        .bind(&model.created_by)
        .bind(model.created_at)
        .execute(&mut **tx)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                RegistryError::AlreadyExists(format!("model '{}' already exists", model.name))
            } else {
                error.into()
            }
        })?;
    Ok(())
}

async fn upsert_alias(tx: &mut Transaction<'static, Any>, alias: &Alias) -> Result<()> {
    sqlx::query("INSERT INTO aliases (model, alias, version, updated_by, updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_by = excluded.updated_by, updated_at = excluded.updated_at")
        .bind(&alias.model)
        .bind(&alias.alias)
        .bind(alias.version as i64)
        .bind(&alias.updated_by)
        .bind(alias.updated_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn fetch_alias(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    alias: &str,
) -> Result<Option<u64>> {
    let row = sqlx::query("SELECT version FROM aliases WHERE model = $1 AND alias = $2")
        .bind(model)
        .bind(alias)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|row| Ok(row.try_get::<i64, _>("version")? as u64))
        .transpose()
}

async fn fetch_version(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    version: u64,
) -> Result<Version> {
    let row = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version = $2"
    ))
    .bind(model)
    .bind(version as i64)
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some(row) => version_from_row(&row),
        None => Err(RegistryError::NotFound(format!(
            "model '{model}' has no version {version}"
        ))),
    }
}

async fn fetch_rollout(tx: &mut Transaction<'static, Any>, model: &str) -> Result<Option<Rollout>> {
    let row = sqlx::query("SELECT revision, policy FROM rollouts WHERE model = $1")
        .bind(model)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

/// A version may take traffic once a worker has it ready.
async fn ensure_routable(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    version: u64,
    field: &str,
) -> Result<()> {
    let found = match fetch_version(tx, model, version).await {
        Ok(found) => found,
        Err(RegistryError::NotFound(message)) => {
            return Err(RegistryError::invalid(field, message));
        }
        Err(error) => return Err(error),
    };
    match found.lifecycle {
        Lifecycle::Ready => Ok(()),
        Lifecycle::Registered => Err(RegistryError::FailedPrecondition(format!(
            "version {version} of '{model}' is registered but no worker has loaded it yet"
        ))),
        other => Err(RegistryError::FailedPrecondition(format!(
            "version {version} of '{model}' is {}: {}",
            other.as_str(),
            found.reason
        ))),
    }
}

/// Traffic figures per (model, rollout revision, version, role), summed
/// over every router's reports. Kept in memory: a registry restart starts
/// the analysis window afresh.
#[derive(Default)]
struct TrafficBook {
    entries: BTreeMap<(String, u64, u64, String), Tally>,
}

#[derive(Clone, Default)]
struct Tally {
    requests: u64,
    errors: u64,
    buckets: Vec<u64>,
}

impl TrafficBook {
    fn add(&mut self, entry: &proto::VersionTraffic) {
        let key = (
            entry.model.clone(),
            entry.rollout_revision,
            entry.version,
            entry.role.clone(),
        );
        let tally = self.entries.entry(key).or_default();
        tally.requests += entry.requests;
        tally.errors += entry.errors.min(entry.requests);
        let count = shamal_registry_client::latency_bucket_count();
        if tally.buckets.len() < count {
            tally.buckets.resize(count, 0);
        }
        for (total, add) in tally.buckets.iter_mut().zip(&entry.latency_buckets) {
            *total += add;
        }
    }

    /// Forgets the windows of rollout revisions older than the previous
    /// one: they are no longer judged.
    fn prune(&mut self, model: &str, revision: u64) {
        self.entries.retain(|(other, other_revision, _, _), _| {
            other != model || *other_revision + 1 >= revision
        });
    }

    fn tally(&self, model: &str, revision: u64, version: u64, role: &str) -> Option<&Tally> {
        self.entries
            .get(&(model.to_owned(), revision, version, role.to_owned()))
    }

    fn analysis(&self, model: &str, revision: u64) -> Vec<VersionAnalysis> {
        self.entries
            .iter()
            .filter(|((other, other_revision, _, _), _)| {
                other == model && *other_revision == revision
            })
            .map(|((_, _, version, role), tally)| VersionAnalysis {
                version: *version,
                role: role.clone(),
                requests: tally.requests,
                errors: tally.errors,
                error_rate: if tally.requests == 0 {
                    0.0
                } else {
                    tally.errors as f64 / tally.requests as f64
                },
                p50_ms: shamal_registry_client::latency_quantile_ms(&tally.buckets, 0.5),
                p99_ms: shamal_registry_client::latency_quantile_ms(&tally.buckets, 0.99),
            })
            .collect()
    }

    /// Why the rollout must be rolled back, if it must.
    fn judge(&self, rollout: &Rollout) -> Option<String> {
        let rails = &rollout.guard_rails;
        let min_requests = rails.min_requests();
        let stable = self.tally(
            &rollout.model,
            rollout.revision,
            rollout.stable_version,
            "primary",
        );
        for canary in rollout.canaries() {
            let Some(tally) = self.tally(&rollout.model, rollout.revision, canary, "primary")
            else {
                continue;
            };
            if tally.requests < min_requests {
                continue;
            }
            let error_rate = tally.errors as f64 / tally.requests as f64;
            if let Some(max) = rails.max_error_rate
                && error_rate > max
            {
                return Some(format!(
                    "version {canary} error rate {:.2}% over {} requests exceeds the guard rail of {:.2}%",
                    error_rate * 100.0,
                    tally.requests,
                    max * 100.0
                ));
            }
            if let Some(max_ratio) = rails.max_p99_ratio
                && let Some(stable) = stable.filter(|stable| stable.requests >= min_requests)
                && let (Some(canary_p99), Some(stable_p99)) = (
                    shamal_registry_client::latency_quantile_ms(&tally.buckets, 0.99),
                    shamal_registry_client::latency_quantile_ms(&stable.buckets, 0.99),
                )
                && canary_p99 > stable_p99 * max_ratio
            {
                return Some(format!(
                    "version {canary} p99 {canary_p99:.2} ms is more than {max_ratio}x the stable version's {stable_p99:.2} ms"
                ));
            }
        }
        None
    }
}
