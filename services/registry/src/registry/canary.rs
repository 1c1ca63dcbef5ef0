//! Canary analysis: routers' traffic reports summed per rollout revision
//! and judged against the rollout's guard rails; a canary that breaks one
//! is rolled back at once.

use std::collections::{BTreeMap, BTreeSet};

use shamal_proto::shamal::registry::v1 as proto;

use super::ModelRegistry;
use super::rollouts::in_progress;
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::store::*;

/// Who the canary analysis acts as in the rollout history.
pub const ANALYSIS_ACTOR: &str = "canary-analysis";

impl ModelRegistry {
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

/// Traffic figures per (model, rollout revision, version, role), summed
/// over every router's reports. Kept in memory: a registry restart starts
/// the analysis window afresh.
#[derive(Default)]
pub(super) struct TrafficBook {
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

    pub(super) fn analysis(&self, model: &str, revision: u64) -> Vec<VersionAnalysis> {
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
