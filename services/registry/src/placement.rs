//! Placement: which workers hold which versions of a model.
//!
//! In mode `all` (the default) every capable worker holds every active
//! version (lifecycle `registered` or `ready`) and there is nothing to
//! compute. In mode `weighted` the registry assigns each active version to
//! workers of its own, so that each version's dynamic batcher sees all of
//! that version's traffic on a few workers instead of a slice of it on
//! every worker. This module is the pure part: given the model's versions,
//! their traffic weights, the workers and what they report, it computes the
//! assignment. The registry stores it and publishes it on Watch
//! (`VersionState.assigned_workers`); see `planner.rs`.
//!
//! The rule, separately in each region that has serving workers (and that
//! the model's residency allows), over that region's capable workers
//! (serving, loading the version's format, not having failed to load it):
//!
//! - each version with traffic gets workers in proportion to its weight,
//!   and at least `min(min_replicas, capable workers)`; versions without
//!   traffic get just that minimum, placed on the least busy workers (they
//!   take no requests, so they cost memory, not batching);
//! - when there are fewer workers than that, versions share workers;
//! - current holders are kept where the counts allow, and new holders are
//!   the least loaded workers (ties by worker id), so a small shift of
//!   weights moves as few versions as it can; the result is deterministic;
//! - make-before-break: a worker that loses a version it has ready keeps
//!   it (`releasing`) until every worker the version is assigned to in that
//!   region reports it ready and has done so for the grace period (longer
//!   than routers take to notice a new holder). A new holder that fails to
//!   load the version is no longer capable of it, so the next plan falls
//!   back on the holders that have it, the releasing one first.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Lifecycle, Millis, Rollout, RolloutState, Version};

/// Traffic weights are in basis points: exact for split weights (whole
/// percents) and fine enough for shadow shares.
pub const FULL_WEIGHT: u64 = 10_000;
/// Default and bounds of a policy's `min_replicas`.
pub const DEFAULT_MIN_REPLICAS: u32 = 1;
pub const MAX_MIN_REPLICAS: u32 = 64;

/// Versions that workers hold: registered or ready.
pub fn is_active(lifecycle: Lifecycle) -> bool {
    matches!(lifecycle, Lifecycle::Registered | Lifecycle::Ready)
}

/// Each active version's share of the model's traffic, in basis points, as
/// routers send it: with a rollout, its effective splits (all on the stable
/// version unless active) plus the shadow's share while active; without,
/// everything on the `production` alias, else on the latest ready version
/// (what workers answer when no version is named). Versions taking no
/// traffic are listed with 0.
pub fn traffic_weights(
    versions: &[Version],
    rollout: Option<&Rollout>,
    production: Option<u64>,
) -> BTreeMap<u64, u64> {
    let mut weights: BTreeMap<u64, u64> = versions
        .iter()
        .filter(|version| is_active(version.lifecycle))
        .map(|version| (version.version, 0))
        .collect();
    let mut add = |version: u64, weight: u64| {
        if let Some(total) = weights.get_mut(&version) {
            *total += weight;
        }
    };
    match rollout {
        Some(rollout) => {
            for split in rollout.effective_splits() {
                add(split.version, u64::from(split.weight) * 100);
            }
            if rollout.state == RolloutState::Active
                && let Some(shadow) = rollout.shadow
            {
                add(shadow.version, (shadow.percent * 100.0).round() as u64);
            }
        }
        None => {
            let latest_ready = versions
                .iter()
                .filter(|version| version.lifecycle == Lifecycle::Ready)
                .map(|version| version.version)
                .max();
            let default = production
                .filter(|version| {
                    versions
                        .iter()
                        .any(|found| found.version == *version && is_active(found.lifecycle))
                })
                .or(latest_ready);
            if let Some(version) = default {
                add(version, FULL_WEIGHT);
            }
        }
    }
    weights
}

/// A worker as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    pub region: String,
    pub formats: Vec<String>,
    /// Serving (not draining, lost or gone): it may hold versions.
    pub serving: bool,
}

/// An active version to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    pub version: u64,
    /// Its artifact's format: only workers that load it can hold it.
    pub format: String,
    /// Share of traffic in basis points (0: none).
    pub weight: u64,
}

/// What a worker last reported of a version (its placement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Loaded and warm since then (when the report arrived).
    Ready { since: Millis },
    /// It could not load it.
    Failed,
    /// Loading, or unloaded.
    Other,
}

/// A worker's part in holding a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// It should hold the version.
    Assigned,
    /// It is losing the version and keeps it until the new holders have it
    /// ready (make-before-break).
    Releasing,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Assigned => "assigned",
            Role::Releasing => "releasing",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "assigned" => Some(Role::Assigned),
            "releasing" => Some(Role::Releasing),
            _ => None,
        }
    }
}

/// A worker holding a version, in a role since a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holding {
    pub role: Role,
    pub since: Millis,
}

/// (version, worker id).
pub type Slot = (u64, String);

/// Everything one plan of a `weighted` model depends on.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub min_replicas: u32,
    /// The model's residency (empty: any region).
    pub allowed_regions: &'a [String],
    /// The active versions.
    pub demands: &'a [Demand],
    /// Every known worker.
    pub workers: &'a [Worker],
    /// The assignment planned last.
    pub current: &'a BTreeMap<Slot, Holding>,
    /// The workers' placement reports.
    pub reports: &'a BTreeMap<Slot, Report>,
    pub now: Millis,
    /// How long a new holder must have reported a version ready before a
    /// worker that loses it may let it go.
    pub grace: Millis,
}

/// A planned assignment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub holdings: BTreeMap<Slot, Holding>,
    /// When a pending release can complete (a new holder's grace period
    /// ends): plan again then.
    pub next_check: Option<Millis>,
}

impl Assignment {
    /// The workers holding `version` (either role), by id.
    pub fn holders(&self, version: u64) -> Vec<String> {
        self.holdings
            .range((version, String::new())..)
            .take_while(|((held, _), _)| *held == version)
            .map(|((_, worker), _)| worker.clone())
            .collect()
    }
}

/// Plans the assignment of a `weighted` model.
pub fn assign(inputs: &Inputs<'_>) -> Assignment {
    let regions = planned_regions(inputs);
    let mut targets: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for region in &regions {
        let mut workers: Vec<&Worker> = inputs
            .workers
            .iter()
            .filter(|worker| worker.serving && worker.region == *region)
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        for (version, chosen) in assign_region(inputs, &workers) {
            targets.entry(version).or_default().extend(chosen);
        }
    }
    let mut holdings = BTreeMap::new();
    for (version, workers) in &targets {
        for worker in workers {
            let slot = (*version, worker.clone());
            let since = match inputs.current.get(&slot) {
                Some(held) if held.role == Role::Assigned => held.since,
                _ => inputs.now,
            };
            holdings.insert(
                slot,
                Holding {
                    role: Role::Assigned,
                    since,
                },
            );
        }
    }
    let mut next_check: Option<Millis> = None;
    for (slot, previous) in previous_holders(inputs) {
        if holdings.contains_key(&slot) {
            continue;
        }
        if let Release::Keep(check) = release(inputs, &regions, &targets, &slot) {
            let since = if previous.role == Role::Releasing {
                previous.since
            } else {
                inputs.now
            };
            holdings.insert(
                slot,
                Holding {
                    role: Role::Releasing,
                    since,
                },
            );
            if let Some(check) = check {
                next_check = Some(next_check.map_or(check, |earliest| earliest.min(check)));
            }
        }
    }
    Assignment {
        holdings,
        next_check,
    }
}

/// Regions with serving workers, within the model's residency.
fn planned_regions(inputs: &Inputs<'_>) -> BTreeSet<String> {
    inputs
        .workers
        .iter()
        .filter(|worker| worker.serving)
        .filter(|worker| {
            inputs.allowed_regions.is_empty() || inputs.allowed_regions.contains(&worker.region)
        })
        .map(|worker| worker.region.clone())
        .collect()
}

/// The holders a new plan starts from: the stored assignment, and for a
/// version that has none yet (the model just switched to `weighted`), the
/// workers that report it ready, so that they keep it until its new
/// holders have it.
fn previous_holders(inputs: &Inputs<'_>) -> BTreeMap<Slot, Holding> {
    let planned: BTreeSet<u64> = inputs.current.keys().map(|(version, _)| *version).collect();
    let mut previous = inputs.current.clone();
    for (slot, report) in inputs.reports {
        if !planned.contains(&slot.0) && matches!(report, Report::Ready { .. }) {
            previous.insert(
                slot.clone(),
                Holding {
                    role: Role::Assigned,
                    since: inputs.now,
                },
            );
        }
    }
    previous
}

/// What becomes of a previous holder the new plan leaves out.
enum Release {
    /// It keeps the version; plan again at that time, if known (otherwise
    /// a new holder's report will trigger the next plan).
    Keep(Option<Millis>),
    Drop,
}

fn release(
    inputs: &Inputs<'_>,
    regions: &BTreeSet<String>,
    targets: &BTreeMap<u64, BTreeSet<String>>,
    slot: &Slot,
) -> Release {
    let (version, worker_id) = slot;
    let active = inputs
        .demands
        .iter()
        .any(|demand| demand.version == *version);
    let worker = inputs.workers.iter().find(|worker| worker.id == *worker_id);
    // Only a serving worker that has the version ready serves it to anyone.
    let Some(worker) = worker.filter(|worker| {
        active
            && worker.serving
            && regions.contains(&worker.region)
            && matches!(inputs.reports.get(slot), Some(Report::Ready { .. }))
    }) else {
        return Release::Drop;
    };
    let new_holders: Vec<&String> = targets
        .get(version)
        .into_iter()
        .flatten()
        .filter(|holder| {
            inputs
                .workers
                .iter()
                .any(|other| other.id == **holder && other.region == worker.region)
        })
        .collect();
    if new_holders.is_empty() {
        return Release::Drop;
    }
    // The release completes when the last new holder's grace period ends;
    // while one is not ready yet, its report will call for the next plan.
    let mut settles_at = Some(Millis::MIN);
    for holder in new_holders {
        settles_at = match inputs.reports.get(&(*version, holder.clone())) {
            Some(Report::Ready { since }) => settles_at.map(|at| at.max(since + inputs.grace)),
            _ => None,
        };
    }
    match settles_at {
        Some(at) if at <= inputs.now => Release::Drop,
        other => Release::Keep(other),
    }
}

/// How a candidate holder of a version ranks for keeping it: the workers
/// it is assigned to, then those releasing it, then those that report it
/// ready; `None`: it does not hold it.
fn rank(inputs: &Inputs<'_>, version: u64, worker: &str) -> Option<u8> {
    let slot = (version, worker.to_owned());
    match inputs.current.get(&slot).map(|held| held.role) {
        Some(Role::Assigned) => Some(0),
        Some(Role::Releasing) => Some(1),
        None => matches!(inputs.reports.get(&slot), Some(Report::Ready { .. })).then_some(2),
    }
}

const RANKS: [u8; 3] = [0, 1, 2];

/// The capable workers of `version` that hold it with rank `wanted`.
fn candidates<'w>(
    inputs: &Inputs<'_>,
    capable: &[&'w str],
    version: u64,
    wanted: u8,
) -> Vec<&'w str> {
    capable
        .iter()
        .copied()
        .filter(|id| rank(inputs, version, id) == Some(wanted))
        .collect()
}

/// The workers of one region that should hold each version.
fn assign_region(inputs: &Inputs<'_>, workers: &[&Worker]) -> BTreeMap<u64, BTreeSet<String>> {
    let capable: BTreeMap<u64, Vec<&str>> = inputs
        .demands
        .iter()
        .map(|demand| {
            let ids = workers
                .iter()
                .filter(|worker| {
                    worker.formats.contains(&demand.format)
                        && inputs.reports.get(&(demand.version, worker.id.clone()))
                            != Some(&Report::Failed)
                })
                .map(|worker| worker.id.as_str())
                .collect();
            (demand.version, ids)
        })
        .collect();
    let eligible: BTreeSet<&str> = capable.values().flatten().copied().collect();
    let mut chosen: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    if eligible.is_empty() {
        return chosen;
    }
    let floor = |version: u64| {
        let capable = capable.get(&version).map_or(0, Vec::len);
        capable.min(inputs.min_replicas as usize)
    };
    // Versions with traffic, heaviest first.
    let mut weighted: Vec<&Demand> = inputs
        .demands
        .iter()
        .filter(|demand| demand.weight > 0 && floor(demand.version) > 0)
        .collect();
    weighted.sort_by_key(|demand| (Reverse(demand.weight), demand.version));
    let counts = replica_counts(
        eligible.len(),
        &weighted
            .iter()
            .map(|demand| Want {
                version: demand.version,
                weight: demand.weight,
                floor: floor(demand.version),
                cap: capable[&demand.version].len(),
            })
            .collect::<Vec<_>>(),
    );
    let total: usize = counts.values().sum();
    // The most versions with traffic one worker holds while others hold
    // fewer: one each when there are enough workers.
    let per_worker = total.div_ceil(eligible.len()).max(1);
    let mut load: BTreeMap<&str, usize> = eligible.iter().map(|id| (*id, 0)).collect();

    // Keep current holders, rank by rank; within a rank, the versions with
    // the fewest candidates first (they have the least choice), each taking
    // its least loaded holders.
    for wanted in RANKS {
        let mut keep_order = weighted.clone();
        keep_order.sort_by_key(|demand| {
            (
                candidates(inputs, &capable[&demand.version], demand.version, wanted).len(),
                Reverse(demand.weight),
                demand.version,
            )
        });
        for demand in keep_order {
            let mut holders = candidates(inputs, &capable[&demand.version], demand.version, wanted);
            holders.sort_by_key(|id| (load[id], *id));
            for id in holders {
                let held = chosen.entry(demand.version).or_default();
                if held.len() < counts[&demand.version]
                    && load[id] < per_worker
                    && held.insert(id.to_owned())
                {
                    *load.entry(id).or_default() += 1;
                }
            }
        }
    }
    // Fill from the least loaded workers, the versions fewest workers can
    // hold first (so that they do not find those taken by versions that
    // could have gone elsewhere).
    let mut fill_order = weighted;
    fill_order.sort_by_key(|demand| {
        (
            capable[&demand.version].len(),
            Reverse(demand.weight),
            demand.version,
        )
    });
    for demand in fill_order {
        fill(
            &mut chosen,
            &mut load,
            demand.version,
            counts[&demand.version],
            &capable[&demand.version],
        );
    }

    // Versions without traffic: their minimum, on the workers holding the
    // fewest versions, current holders first.
    let mut idle: Vec<&Demand> = inputs
        .demands
        .iter()
        .filter(|demand| demand.weight == 0 && floor(demand.version) > 0)
        .collect();
    idle.sort_by_key(|demand| demand.version);
    for demand in idle {
        let count = floor(demand.version);
        for wanted in RANKS {
            let mut holders = candidates(inputs, &capable[&demand.version], demand.version, wanted);
            holders.sort_by_key(|id| (load[id], *id));
            for id in holders {
                let held = chosen.entry(demand.version).or_default();
                if held.len() < count && held.insert(id.to_owned()) {
                    *load.entry(id).or_default() += 1;
                }
            }
        }
        fill(
            &mut chosen,
            &mut load,
            demand.version,
            count,
            &capable[&demand.version],
        );
    }
    chosen
}

/// Adds the least loaded capable workers (ties by id) until `version` has
/// `count` holders.
fn fill<'w>(
    chosen: &mut BTreeMap<u64, BTreeSet<String>>,
    load: &mut BTreeMap<&'w str, usize>,
    version: u64,
    count: usize,
    capable: &[&'w str],
) {
    let held = chosen.entry(version).or_default();
    while held.len() < count {
        let next = capable
            .iter()
            .copied()
            .filter(|id| !held.contains(*id))
            .min_by_key(|id| (load.get(id).copied().unwrap_or(0), *id));
        let Some(id) = next else {
            return;
        };
        held.insert(id.to_owned());
        *load.entry(id).or_default() += 1;
    }
}

/// What a version with traffic asks of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Want {
    version: u64,
    weight: u64,
    /// At least this many workers.
    floor: usize,
    /// At most this many (the workers capable of it).
    cap: usize,
}

/// Splits `workers` among versions in proportion to their weights, each
/// within its floor and cap (largest remainder, exact integer shares). A
/// version whose share falls below its floor gets the floor and the others
/// share what is left; when the floors alone exceed the workers, every
/// version gets its floor and versions share workers.
fn replica_counts(workers: usize, wants: &[Want]) -> BTreeMap<u64, usize> {
    let mut fixed: BTreeMap<u64, usize> = BTreeMap::new();
    loop {
        let free: Vec<&Want> = wants
            .iter()
            .filter(|want| !fixed.contains_key(&want.version))
            .collect();
        if free.is_empty() {
            return fixed;
        }
        let budget = workers.saturating_sub(fixed.values().sum()) as u128;
        let total: u128 = free.iter().map(|want| u128::from(want.weight)).sum();
        let share = |want: &Want| budget * u128::from(want.weight);
        // Floors first: fixing one leaves less for the others, which may
        // then fall below theirs too.
        let below: Vec<&Want> = free
            .iter()
            .copied()
            .filter(|want| share(want) < want.floor as u128 * total)
            .collect();
        let limited = if below.is_empty() {
            free.iter()
                .copied()
                .filter(|want| share(want) > want.cap as u128 * total)
                .map(|want| (want.version, want.cap))
                .collect::<Vec<_>>()
        } else {
            below
                .iter()
                .map(|want| (want.version, want.floor))
                .collect()
        };
        if !limited.is_empty() {
            fixed.extend(limited);
            continue;
        }
        let mut counts: Vec<(&Want, usize, u128)> = free
            .iter()
            .map(|want| {
                let exact = share(want);
                (*want, (exact / total) as usize, exact % total)
            })
            .collect();
        let mut left = budget as usize - counts.iter().map(|(_, count, _)| count).sum::<usize>();
        counts.sort_by_key(|(want, _, remainder)| {
            (Reverse(*remainder), Reverse(want.weight), want.version)
        });
        for (want, count, remainder) in counts {
            let extra = usize::from(left > 0 && remainder > 0);
            left -= extra;
            fixed.insert(want.version, count + extra);
        }
        return fixed;
    }
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
