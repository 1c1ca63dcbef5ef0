//! The registry's side of placement: each model's policy (stored with the
//! model; every change is a change-log record of kind `placement`), the
//! assignment of `weighted` models (computed by [`crate::placement`],
//! stored in `placement_assignments`, published on Watch as
//! `VersionState.assigned_workers`), and the planner task that keeps it
//! current.
//!
//! The planner plans every `weighted` model again after each committed
//! change (a worker joining, draining or lost, a rollout or alias change, a
//! version's lifecycle, a placement report), when a make-before-break grace
//! period ends, and every second; it writes (and records a change) only
//! when the assignment differs from the stored one. Writes that create
//! versions nobody holds yet (a new version, a retried one, a switch to
//! `weighted`) plan in their own transaction, so that Watch never shows
//! such a version without its workers: an empty list means every worker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyConnection;
use sqlx::{Any, Row, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::placement::{self, Assignment, Holding, Report, Role, Slot};
use crate::registry::{ModelRegistry, actor_or_anonymous, validate_model_name};
use crate::store::*;

/// How placement moves are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacementSettings {
    /// How long every new holder of a version must have had it ready before
    /// a worker that loses it lets it go: longer than routers take to
    /// notice a new holder (they poll workers every `refresh_interval_ms`,
    /// 1 s by default, besides asking again on every registry change).
    pub grace: Duration,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        PlacementSettings {
            grace: Duration::from_secs(3),
        }
    }
}

/// How often the planner looks again without a local change (changes
/// written by another registry replica).
const PLAN_POLL: Duration = Duration::from_secs(1);

/// Everything placement needs to know of a model, read in one go.
struct ModelFacts {
    policy: PlacementPolicy,
    allowed_regions: Vec<String>,
    versions: Vec<Version>,
    rollout: Option<Rollout>,
    production: Option<u64>,
    workers: Vec<placement::Worker>,
    reports: BTreeMap<Slot, Report>,
    current: BTreeMap<Slot, Holding>,
}

impl ModelFacts {
    fn weights(&self) -> BTreeMap<u64, u64> {
        placement::traffic_weights(&self.versions, self.rollout.as_ref(), self.production)
    }

    fn plan(&self, now: Millis, grace: Duration) -> Assignment {
        let weights = self.weights();
        let demands: Vec<placement::Demand> = self
            .versions
            .iter()
            .filter(|version| placement::is_active(version.lifecycle))
            .map(|version| placement::Demand {
                version: version.version,
                format: version.artifact.format.as_str().to_owned(),
                weight: weights.get(&version.version).copied().unwrap_or(0),
            })
            .collect();
        placement::assign(&placement::Inputs {
            min_replicas: self.policy.min_replicas,
            allowed_regions: &self.allowed_regions,
            demands: &demands,
            workers: &self.workers,
            current: &self.current,
            reports: &self.reports,
            now,
            grace: i64::try_from(grace.as_millis()).unwrap_or(i64::MAX),
        })
    }
}

/// Reads a model's facts; `None` when the model does not exist.
async fn load_facts(conn: &mut AnyConnection, model: &str) -> Result<Option<ModelFacts>> {
    let row = sqlx::query("SELECT allowed_regions, placement_mode, placement_min_replicas, placement_updated_by, placement_updated_at FROM models WHERE name = $1")
        .bind(model)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let policy = policy_from_row(&row)?;
    let allowed_regions = regions_from_text(&row.try_get::<String, _>("allowed_regions")?)?;
    let versions = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 ORDER BY version"
    ))
    .bind(model)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(version_from_row)
    .collect::<Result<Vec<_>>>()?;
    let rollout = sqlx::query("SELECT revision, policy FROM rollouts WHERE model = $1")
        .bind(model)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(rollout_from_row)
        .transpose()?;
    let production = sqlx::query("SELECT version FROM aliases WHERE model = $1 AND alias = $2")
        .bind(model)
        .bind("production")
        .fetch_optional(&mut *conn)
        .await?
        .map(|row| {
            row.try_get::<i64, _>("version")
                .map(|version| version as u64)
        })
        .transpose()?;
    let workers = sqlx::query(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers WHERE state <> 'gone' ORDER BY id"
    ))
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        let worker = worker_status_from_row(row)?;
        Ok(placement::Worker {
            serving: worker.state == MemberState::Serving,
            id: worker.id,
            region: worker.region,
            formats: worker.formats,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    let reports = sqlx::query(
        "SELECT worker_id, version, state, updated_at FROM placements WHERE model = $1",
    )
    .bind(model)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        let slot = (
            row.try_get::<i64, _>("version")? as u64,
            row.try_get::<String, _>("worker_id")?,
        );
        let report = match row.try_get::<String, _>("state")?.as_str() {
            "ready" => Report::Ready {
                since: row.try_get("updated_at")?,
            },
            "failed" => Report::Failed,
            _ => Report::Other,
        };
        Ok((slot, report))
    })
    .collect::<Result<BTreeMap<_, _>>>()?;
    let current = stored_assignment(conn, model).await?;
    Ok(Some(ModelFacts {
        policy,
        allowed_regions,
        versions,
        rollout,
        production,
        workers,
        reports,
        current,
    }))
}

fn policy_from_row(row: &sqlx::any::AnyRow) -> Result<PlacementPolicy> {
    let mode: String = row.try_get("placement_mode")?;
    Ok(PlacementPolicy {
        mode: PlacementMode::parse(&mode).ok_or_else(|| {
            RegistryError::Internal(format!("unknown stored placement mode {mode}"))
        })?,
        min_replicas: u32::try_from(row.try_get::<i64, _>("placement_min_replicas")?)
            .unwrap_or(placement::DEFAULT_MIN_REPLICAS),
        updated_by: row.try_get("placement_updated_by")?,
        updated_at: row.try_get("placement_updated_at")?,
    })
}

/// The assignment stored for a model.
async fn stored_assignment(
    conn: &mut AnyConnection,
    model: &str,
) -> Result<BTreeMap<Slot, Holding>> {
    sqlx::query(
        "SELECT version, worker_id, role, since FROM placement_assignments WHERE model = $1",
    )
    .bind(model)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        let role: String = row.try_get("role")?;
        Ok((
            (
                row.try_get::<i64, _>("version")? as u64,
                row.try_get::<String, _>("worker_id")?,
            ),
            Holding {
                role: Role::parse(&role).ok_or_else(|| {
                    RegistryError::Internal(format!("unknown stored placement role {role}"))
                })?,
                since: row.try_get("since")?,
            },
        ))
    })
    .collect()
}

/// Replaces a model's stored assignment.
async fn store_assignment(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    holdings: &BTreeMap<Slot, Holding>,
) -> Result<()> {
    sqlx::query("DELETE FROM placement_assignments WHERE model = $1")
        .bind(model)
        .execute(&mut **tx)
        .await?;
    for ((version, worker), holding) in holdings {
        sqlx::query("INSERT INTO placement_assignments (model, version, worker_id, role, since) VALUES ($1, $2, $3, $4, $5)")
            .bind(model)
            .bind(*version as i64)
            .bind(worker)
            .bind(holding.role.as_str())
            .bind(holding.since)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// `1=[w1 w2] 2=[w3, releasing w1]`, for the log.
fn describe(holdings: &BTreeMap<Slot, Holding>) -> String {
    let mut versions: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for ((version, worker), holding) in holdings {
        let entry = match holding.role {
            Role::Assigned => worker.clone(),
            Role::Releasing => format!("{worker} (releasing)"),
        };
        versions.entry(*version).or_default().push(entry);
    }
    versions
        .iter()
        .map(|(version, workers)| format!("{version}=[{}]", workers.join(" ")))
        .collect::<Vec<_>>()
        .join(" ")
}

impl ModelRegistry {
    /// Sets how placement moves are timed.
    pub fn with_placement(mut self, placement: PlacementSettings) -> ModelRegistry {
        self.placement = placement;
        self
    }

    pub fn placement_settings(&self) -> PlacementSettings {
        self.placement
    }

    pub async fn get_placement_policy(&self, model: &str) -> Result<PlacementPolicy> {
        let row = sqlx::query("SELECT placement_mode, placement_min_replicas, placement_updated_by, placement_updated_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&self.store.pool)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("model '{model}' does not exist")))?;
        policy_from_row(&row)
    }

    /// Sets a model's placement policy and plans it at once (a switch to
    /// `all` forgets the assignment: every capable worker loads every
    /// active version again).
    pub async fn set_placement_policy(
        &self,
        model: &str,
        input: SetPlacement,
        actor: &str,
    ) -> Result<ModelPlacement> {
        validate_model_name(model)?;
        let min_replicas = input
            .min_replicas
            .unwrap_or(placement::DEFAULT_MIN_REPLICAS);
        if !(1..=placement::MAX_MIN_REPLICAS).contains(&min_replicas) {
            return Err(RegistryError::invalid(
                "min_replicas",
                format!(
                    "must be between 1 and {}, not {min_replicas}",
                    placement::MAX_MIN_REPLICAS
                ),
            ));
        }
        let requested_by = actor;
        let actor = actor_or_anonymous(actor);
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let before = sqlx::query("SELECT placement_mode, placement_min_replicas, placement_updated_by, placement_updated_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(policy_from_row)
            .transpose()?;
        let updated = sqlx::query("UPDATE models SET placement_mode = $1, placement_min_replicas = $2, placement_updated_by = $3, placement_updated_at = $4 WHERE name = $5")
            .bind(input.mode.as_str())
            .bind(i64::from(min_replicas))
            .bind(&actor)
            .bind(now_millis())
            .bind(model)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "model '{model}' does not exist"
            )));
        }
        self.plan_in(&mut tx, model).await?;
        let revision = record_change_of(&mut tx, change_kind::PLACEMENT, model).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, mode = input.mode.as_str(), min_replicas, %actor, "placement policy set");
        let placement = self.placement(model).await?;
        self.audit(crate::registry::Change {
            action: "placement.policy",
            actor: requested_by,
            model,
            before: crate::registry::audit_json_opt(before.as_ref()),
            after: crate::registry::audit_json(&placement.policy),
            ..Default::default()
        });
        Ok(placement)
    }

    /// A model's policy and where its active versions are held, as stored
    /// (and published on Watch).
    pub async fn placement(&self, model: &str) -> Result<ModelPlacement> {
        let mut conn = self.store.pool.acquire().await?;
        let facts = load_facts(&mut conn, model)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("model '{model}' does not exist")))?;
        drop(conn);
        let weights = facts.weights();
        let versions = facts
            .versions
            .iter()
            .filter(|version| placement::is_active(version.lifecycle))
            .map(|version| {
                let held = |role: Role| -> Vec<String> {
                    facts
                        .current
                        .iter()
                        .filter(|((held, _), holding)| {
                            *held == version.version && holding.role == role
                        })
                        .map(|((_, worker), _)| worker.clone())
                        .collect()
                };
                let workers = match facts.policy.mode {
                    PlacementMode::Weighted => held(Role::Assigned),
                    PlacementMode::All => facts
                        .workers
                        .iter()
                        .filter(|worker| {
                            worker.serving
                                && worker
                                    .formats
                                    .iter()
                                    .any(|format| format == version.artifact.format.as_str())
                        })
                        .map(|worker| worker.id.clone())
                        .collect(),
                };
                let releasing = held(Role::Releasing);
                let ready = workers
                    .iter()
                    .chain(&releasing)
                    .filter(|worker| {
                        matches!(
                            facts.reports.get(&(version.version, (*worker).clone())),
                            Some(Report::Ready { .. })
                        )
                    })
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                VersionPlacement {
                    version: version.version,
                    lifecycle: version.lifecycle,
                    weight: weights.get(&version.version).copied().unwrap_or(0) as f64
                        / (placement::FULL_WEIGHT as f64 / 100.0),
                    workers,
                    releasing,
                    ready,
                }
            })
            .collect();
        Ok(ModelPlacement {
            model: model.to_owned(),
            policy: facts.policy,
            versions,
        })
    }

    /// The workers each version of a `weighted` model is published with
    /// (assigned and releasing, by id); empty for mode `all`.
    pub(crate) async fn assigned_workers(
        &self,
        model: &str,
        mode: PlacementMode,
    ) -> Result<BTreeMap<u64, Vec<String>>> {
        if mode == PlacementMode::All {
            return Ok(BTreeMap::new());
        }
        let mut conn = self.store.pool.acquire().await?;
        let mut workers: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (version, worker) in stored_assignment(&mut conn, model).await?.into_keys() {
            workers.entry(version).or_default().push(worker);
        }
        Ok(workers)
    }

    /// Plans `model` within a write transaction and stores the plan when it
    /// differs from the stored one (for a model in mode `all`, clears what
    /// is stored). Returns whether it changed, and when to plan again.
    pub(crate) async fn plan_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        model: &str,
    ) -> Result<(bool, Option<Millis>)> {
        let Some(facts) = load_facts(tx, model).await? else {
            return Ok((false, None));
        };
        let plan = match facts.policy.mode {
            PlacementMode::Weighted => facts.plan(now_millis(), self.placement.grace),
            PlacementMode::All => Assignment::default(),
        };
        if plan.holdings == facts.current {
            return Ok((false, plan.next_check));
        }
        store_assignment(tx, model, &plan.holdings).await?;
        tracing::info!(model, assignment = %describe(&plan.holdings), "placement changed");
        Ok((true, plan.next_check))
    }

    /// Plans one model again; returns when to plan it next.
    async fn replan(&self, model: &str) -> Result<Option<Millis>> {
        // Read first: most passes change nothing and need no write lock.
        let mut conn = self.store.pool.acquire().await?;
        let facts = load_facts(&mut conn, model).await?;
        drop(conn);
        let Some(facts) = facts.filter(|facts| facts.policy.mode == PlacementMode::Weighted) else {
            return Ok(None);
        };
        let plan = facts.plan(now_millis(), self.placement.grace);
        if plan.holdings == facts.current {
            return Ok(plan.next_check);
        }
        let mut tx = self.store.begin_write().await?;
        let (changed, next_check) = self.plan_in(&mut tx, model).await?;
        let revision = if changed {
            Some(record_change(&mut tx, model).await?)
        } else {
            None
        };
        tx.commit().await?;
        if let Some(revision) = revision {
            self.notify(revision);
        }
        Ok(next_check)
    }

    /// Plans every `weighted` model again; returns the earliest time one
    /// must be planned again (a make-before-break grace period ending).
    pub async fn plan_placements(&self) -> Result<Option<Millis>> {
        let models: Vec<String> =
            sqlx::query("SELECT name FROM models WHERE placement_mode = $1 ORDER BY name")
                .bind(PlacementMode::Weighted.as_str())
                .fetch_all(&self.store.pool)
                .await?
                .iter()
                .map(|row| row.try_get::<String, _>("name"))
                .collect::<std::result::Result<_, _>>()?;
        let mut next: Option<Millis> = None;
        for model in models {
            if let Some(at) = self.replan(&model).await? {
                next = Some(next.map_or(at, |earliest| earliest.min(at)));
            }
        }
        Ok(next)
    }

    /// Plans after every change, when a grace period ends and every second,
    /// until `stop` flips.
    pub fn spawn_planner(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(async move {
            let mut changes = registry.subscribe();
            let mut failures = 0u64;
            loop {
                // Seen before planning: a change committed meanwhile wakes
                // the next round.
                changes.borrow_and_update();
                let next = match registry.plan_placements().await {
                    Ok(next) => {
                        failures = 0;
                        next
                    }
                    Err(error) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(100) {
                            tracing::warn!(%error, failures, "cannot plan placements");
                        }
                        None
                    }
                };
                let wait = next.map_or(PLAN_POLL, |at| {
                    let millis = u64::try_from(at - now_millis()).unwrap_or(0);
                    Duration::from_millis(millis).min(PLAN_POLL)
                });
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => break,
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        })
    }
}
