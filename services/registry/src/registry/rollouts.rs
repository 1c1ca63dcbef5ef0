//! Rollouts: the traffic policy of a model and its state machine (start,
//! shift, promote, roll back, pause, resume, whole policies), every change
//! written through [`ModelRegistry::write_rollout`] with its history.

use std::collections::BTreeSet;

use sqlx::{Any, Transaction};

use super::sql::{ensure_routable, fetch_alias, fetch_rollout, upsert_alias};
use super::{Change, ModelRegistry, actor_or_anonymous, audit_json, audit_json_opt};
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::paging::PageRequest;
use crate::store::*;

impl ModelRegistry {
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
        let page = PageRequest::<i64>::new(page_size_requested, token)?;
        self.get_model(model).await?;
        let rows = sqlx::query("SELECT id, model, revision, action, actor, reason, at, policy FROM rollout_history WHERE model = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(model)
            .bind(page.after)
            .bind(page.fetch_limit())
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(history_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page.page(items, |entry| entry.id.to_string()))
    }

    /// The one path every rollout change takes: check the expected
    /// revision, build the new rollout, store it with a history entry and a
    /// change record, all in one transaction.
    pub(super) async fn write_rollout<F>(
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
        let audit_action = audit_action(action);
        // The canary analysis's rollback is a safety action: never refused
        // for the audit backlog (its event is still recorded).
        if audit_action != "rollout.auto_rollback" {
            self.admit()?;
        }
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
        let before = audit_json_opt(current.as_ref());
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
        self.audit(Change {
            action: audit_action,
            actor,
            model,
            version: audited_version(&rollout),
            before,
            after: audit_json(&rollout),
            reason,
            ..Change::default()
        });
        Ok(rollout)
    }
}

/// The audit action of a rollout history action.
fn audit_action(action: &str) -> &'static str {
    match action {
        "start" => "rollout.start",
        "shift" => "rollout.shift",
        "promote" => "rollout.promote",
        "rollback" => "rollout.rollback",
        "auto_rollback" => "rollout.auto_rollback",
        "pause" => "rollout.pause",
        "resume" => "rollout.resume",
        _ => "rollout.policy",
    }
}

/// The version a rollout change is about: its one candidate, else its
/// stable version (after a promotion, the promoted one).
fn audited_version(rollout: &Rollout) -> Option<u64> {
    Some(single_candidate(rollout).unwrap_or(rollout.stable_version))
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

pub(super) fn in_progress(model: &str, current: Option<Rollout>) -> Result<Rollout> {
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
