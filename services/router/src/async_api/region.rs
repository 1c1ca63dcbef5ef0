//! Which region's stream a job goes to (see the module documentation of
//! `async_api`).

use std::collections::BTreeMap;

use tonic::Status;

use super::AsyncApi;
use crate::forward::pick_status;
use crate::pool::{PickError, RegionServing};
use crate::residency::{self, RegionPolicy};

impl AsyncApi {
    /// The region whose stream a job of `model` goes to.
    pub(super) fn choose_region(
        &self,
        model: &str,
        version: &str,
        policy: Option<&RegionPolicy>,
    ) -> Result<String, Status> {
        let serving = self.core.pool.regions_serving(model, version);
        choose_region(
            &serving,
            policy,
            self.settings.default_region.as_deref(),
            model,
            version,
        )
    }
}

/// Chooses a job's region among those where workers serve the model (see
/// the module documentation). NOT_FOUND when no worker serves the model
/// (or version); FAILED_PRECONDITION, naming the policy, when none does in
/// a region the policy allows (or in `async_region`).
pub fn choose_region(
    serving: &BTreeMap<String, RegionServing>,
    policy: Option<&RegionPolicy>,
    default_region: Option<&str>,
    model: &str,
    version: &str,
) -> Result<String, Status> {
    if serving.is_empty() {
        return Err(pick_status(PickError::UnknownModel, model, version));
    }
    let allowed: Vec<(&String, &RegionServing)> = serving
        .iter()
        .filter(|(region, _)| policy.is_none_or(|policy| policy.allows(region)))
        .collect();
    if let Some(policy) = policy
        && allowed.is_empty()
    {
        return Err(residency::no_worker_in_region(model, policy));
    }
    if let Some(region) = default_region {
        if allowed
            .iter()
            .any(|(candidate, _)| candidate.as_str() == region)
        {
            return Ok(region.to_owned());
        }
        if policy.is_none() {
            return Err(Status::failed_precondition(format!(
                "no worker serves model '{model}' in region '{region}' (the router's async_region)"
            )));
        }
    }
    // Most healthy capacity, then most workers; ties go to the first name.
    let best = allowed.iter().fold(
        None,
        |best: Option<&(&String, &RegionServing)>, candidate| match best {
            Some(current)
                if (current.1.healthy_capacity, current.1.workers)
                    >= (candidate.1.healthy_capacity, candidate.1.workers) =>
            {
                Some(current)
            }
            _ => Some(candidate),
        },
    );
    best.map(|(region, _)| (*region).clone())
        .ok_or_else(|| pick_status(PickError::UnknownModel, model, version))
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn serving(regions: &[(&str, usize, u64)]) -> BTreeMap<String, RegionServing> {
        regions
            .iter()
            .map(|(region, workers, capacity)| {
                (
                    (*region).to_owned(),
                    RegionServing {
                        workers: *workers,
                        healthy_workers: *workers,
                        healthy_capacity: *capacity,
                    },
                )
            })
            .collect()
    }

    fn policy(regions: &[&str]) -> RegionPolicy {
        residency::combine(
            Some(regions.iter().map(|region| (*region).to_owned()).collect()),
            None,
            None,
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn region_follows_policy_then_capacity() {
        let regions = serving(&[("eu", 1, 8), ("me", 2, 64), ("us", 1, 32)]);
        // No policy: the most capacity.
        assert_eq!(choose_region(&regions, None, None, "m", "").unwrap(), "me");
        // A policy narrows, capacity decides among what it allows.
        let allowed = policy(&["eu", "us"]);
        assert_eq!(
            choose_region(&regions, Some(&allowed), None, "m", "").unwrap(),
            "us"
        );
        // A configured default region wins when allowed.
        assert_eq!(
            choose_region(&regions, Some(&allowed), Some("eu"), "m", "").unwrap(),
            "eu"
        );
        assert_eq!(
            choose_region(&regions, None, Some("eu"), "m", "").unwrap(),
            "eu"
        );
        // ... and is ignored for a policy that does not allow it.
        assert_eq!(
            choose_region(&regions, Some(&allowed), Some("me"), "m", "").unwrap(),
            "us"
        );
        // No worker in an allowed region: refused, naming the policy.
        let status = choose_region(&regions, Some(&policy(&["ap"])), None, "m", "").unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("request allows [ap]"), "{status}");
        // A default region without workers, and no policy: refused.
        let status = choose_region(&regions, None, Some("ap"), "m", "").unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("async_region"), "{status}");
        // No worker at all: unknown model.
        let status = choose_region(&BTreeMap::new(), None, None, "m", "").unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        // Ties go to the first name.
        let regions = serving(&[("b", 1, 8), ("a", 1, 8)]);
        assert_eq!(choose_region(&regions, None, None, "m", "").unwrap(), "a");
    }
}
