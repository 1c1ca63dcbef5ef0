//! The routing table the registry drives: per model, its aliases and its
//! rollout (effective weighted splits, sticky key, shadow copy), and the
//! version choice for each inference request.
//!
//! The table is immutable; every Watch event builds a new one that replaces
//! the old under a short lock, so a request sees either the whole event or
//! none of it.
//!
//! Version choice for a request of a model the registry knows:
//! 1. an explicit numeric `model_version` is honoured as is; any other
//!    explicit value is an alias (e.g. `production`), resolved through the
//!    table, and NOT_FOUND when the model has no such alias;
//! 2. else, when the model has a rollout: a weighted choice over its
//!    effective splits (the splits while `active`, all traffic on
//!    `stable_version` in any other state). With a sticky key and a value
//!    for it in the request, the choice is a stable hash of model and value,
//!    so one caller keeps one version across requests, restarts and
//!    replicas; without, it is random by weight;
//! 3. else the version the `production` alias names;
//! 4. else none: the worker serves its latest ready version.
//!
//! The sticky value is the request parameter named exactly as the key
//! (string, integer, unsigned, bool or double, hashed as its text), else
//! the header / gRPC metadata entry of that name in any case.
//!
//! Shadow: when the rollout names a shadow version, each request of the
//! model (whatever version it asked for, except the shadow version itself)
//! is copied to it with probability `shadow_percent / 100`.
//!
//! Models the registry does not know are routed as without a registry.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};

use http::{HeaderMap, HeaderName};
use shamal_proto::inference::InferParameter;
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_registry_client::proto::{ModelState, Rollout, WatchEvent};
use tonic::Status;

/// Sticky and weighted choices map onto this many buckets; a weight of `w`
/// percent owns `w * 100` of them.
pub const BUCKETS: u32 = 10_000;

/// The alias that names the default version when no rollout is in place.
pub const PRODUCTION_ALIAS: &str = "production";

/// One version's share of the buckets: `[previous upper, upper)`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BucketRange {
    upper: u32,
    version: u64,
}

/// The key whose value pins a caller to a version: a request parameter of
/// that name, else the header (gRPC metadata) of that name, any case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyKey {
    pub name: String,
    /// The name as a header name; `None` when it cannot be one.
    header: Option<HeaderName>,
}

impl StickyKey {
    fn new(name: &str) -> StickyKey {
        StickyKey {
            name: name.to_owned(),
            header: HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok(),
        }
    }

    /// The bucket of the caller this request comes from, when it says who
    /// it is (parameter first, then header).
    pub fn bucket(
        &self,
        model: &str,
        parameters: &HashMap<String, InferParameter>,
        headers: &HeaderMap,
    ) -> Option<u32> {
        let mut hasher = StableHasher::for_model(model);
        if let Some(choice) = parameters
            .get(&self.name)
            .and_then(|parameter| parameter.parameter_choice.as_ref())
        {
            // Numbers and flags hash as their decimal text, so that a value
            // sent as a string and as a number pins the same caller.
            let _ = match choice {
                ParameterChoice::StringParam(text) => hasher.write_str(text),
                ParameterChoice::Int64Param(value) => write!(hasher, "{value}"),
                ParameterChoice::Uint64Param(value) => write!(hasher, "{value}"),
                ParameterChoice::BoolParam(value) => write!(hasher, "{value}"),
                ParameterChoice::DoubleParam(value) => write!(hasher, "{value}"),
            };
            return Some(hasher.bucket());
        }
        let value = headers.get(self.header.as_ref()?)?;
        hasher.write(value.as_bytes());
        Some(hasher.bucket())
    }
}

/// A version that receives copies of a share of requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shadow {
    pub version: u64,
    /// Share of requests copied, 0..=100.
    pub percent: f64,
}

/// What the router applies of a model's rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutRoute {
    pub revision: u64,
    /// active | paused | promoted | rolled_back
    pub state: String,
    pub stable_version: u64,
    /// Effective splits in bucket order: canaries by ascending version in
    /// the low buckets, the stable version on top. Raising a canary's
    /// weight only moves callers into that canary (or, with several
    /// canaries, from the next canary into it), never out of a canary back
    /// to stable.
    ranges: Vec<BucketRange>,
    pub sticky_key: Option<StickyKey>,
    pub shadow: Option<Shadow>,
}

impl RolloutRoute {
    pub fn from_proto(rollout: &Rollout) -> RolloutRoute {
        let mut weights: BTreeMap<u64, u64> = BTreeMap::new();
        if rollout.state == "active" {
            for split in rollout.splits.iter().filter(|split| split.weight > 0) {
                *weights.entry(split.version).or_default() += u64::from(split.weight);
            }
        } else if rollout.stable_version > 0 {
            weights.insert(rollout.stable_version, 100);
        }
        let stable_weight = weights.remove(&rollout.stable_version);
        let ordered: Vec<(u64, u64)> = weights
            .into_iter()
            .chain(stable_weight.map(|weight| (rollout.stable_version, weight)))
            .collect();
        let total: u64 = ordered.iter().map(|(_, weight)| weight).sum();
        let mut ranges = Vec::with_capacity(ordered.len());
        let mut cumulative = 0u64;
        for (version, weight) in ordered {
            cumulative += weight;
            // Exact (weight * 100) when the weights sum to 100, as they do;
            // proportional otherwise.
            let upper = (cumulative * u64::from(BUCKETS) / total) as u32;
            ranges.push(BucketRange { upper, version });
        }
        let shadow = (rollout.shadow_version > 0 && rollout.shadow_percent > 0.0).then(|| Shadow {
            version: rollout.shadow_version,
            percent: rollout.shadow_percent.min(100.0),
        });
        RolloutRoute {
            revision: rollout.revision,
            state: rollout.state.clone(),
            stable_version: rollout.stable_version,
            ranges,
            sticky_key: (!rollout.sticky_key.is_empty())
                .then(|| StickyKey::new(&rollout.sticky_key)),
            shadow,
        }
    }

    /// The version owning `bucket` (0..BUCKETS); `None` when no split has
    /// weight.
    pub fn version_for_bucket(&self, bucket: u32) -> Option<u64> {
        self.ranges
            .iter()
            .find(|range| bucket < range.upper)
            .map(|range| range.version)
    }

    /// Effective splits as `(version, weight in percent)`, in bucket order.
    pub fn effective_splits(&self) -> Vec<(u64, f64)> {
        let mut lower = 0u32;
        self.ranges
            .iter()
            .map(|range| {
                let share = f64::from(range.upper - lower) / f64::from(BUCKETS) * 100.0;
                lower = range.upper;
                (range.version, share)
            })
            .collect()
    }
}

/// What the registry says about one model, as the router applies it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelRoute {
    pub aliases: BTreeMap<String, u64>,
    pub rollout: Option<RolloutRoute>,
    /// Data residency: regions the model's requests may be processed in
    /// (empty: no model-level restriction).
    pub allowed_regions: Vec<String>,
    /// Model access: the tenants and groups whose users may call the model
    /// (both empty: no limit beyond the roles).
    pub allowed_tenants: Vec<String>,
    pub allowed_groups: Vec<String>,
}

/// Random numbers a choice may need, drawn by the caller (tests fix them).
#[derive(Clone, Copy, Debug)]
pub struct Draws {
    /// Uniform in 0..BUCKETS: the weighted choice without a sticky value.
    pub bucket: u32,
    /// Uniform in [0, 1): whether this request is copied to the shadow.
    pub shadow: f64,
}

impl Draws {
    pub fn random() -> Draws {
        let bits = crate::rng::random_u64();
        Draws {
            bucket: ((bits >> 32) % u64::from(BUCKETS)) as u32,
            shadow: (bits & 0xffff_ffff) as f64 / (1u64 << 32) as f64,
        }
    }
}

/// The routing decision for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// The version chosen, when known (`None`: the worker's latest, or an
    /// explicit version too large to be a registry version).
    pub version: Option<u64>,
    /// Whether the request's `model_version` must be replaced by `version`
    /// (false when the caller named the number itself).
    pub rewrite: bool,
    /// Revision of the model's rollout at the time (0 without one).
    pub rollout_revision: u64,
    /// Version to send a copy of the request to, off the request path.
    pub shadow: Option<u64>,
}

impl ModelRoute {
    pub fn from_proto(state: &ModelState) -> ModelRoute {
        ModelRoute {
            aliases: state
                .aliases
                .iter()
                .map(|(alias, version)| (alias.clone(), *version))
                .collect(),
            rollout: state.rollout.as_ref().map(RolloutRoute::from_proto),
            allowed_regions: state.allowed_regions.clone(),
            allowed_tenants: state.allowed_tenants.clone(),
            allowed_groups: state.allowed_groups.clone(),
        }
    }

    /// Resolves an explicit `model_version`: numbers as they are (`None`
    /// when not a `u64`), anything else as an alias of this model.
    pub fn resolve_explicit(&self, model: &str, requested: &str) -> Result<Option<u64>, Status> {
        if requested.bytes().all(|byte| byte.is_ascii_digit()) {
            return Ok(requested.parse().ok());
        }
        match self.aliases.get(requested) {
            Some(version) => Ok(Some(*version)),
            None => Err(Status::not_found(format!(
                "unknown alias '{requested}' of model '{model}'"
            ))),
        }
    }

    /// Chooses the version for a request (see the module documentation).
    /// `sticky_bucket` is asked for the caller's bucket only when the
    /// rollout has a sticky key.
    pub fn decide(
        &self,
        model: &str,
        requested: &str,
        sticky_bucket: impl FnOnce(&StickyKey) -> Option<u32>,
        draws: Draws,
    ) -> Result<Decision, Status> {
        let rollout_revision = self.rollout.as_ref().map_or(0, |rollout| rollout.revision);
        let (version, rewrite) = if !requested.is_empty() {
            let version = self.resolve_explicit(model, requested)?;
            let is_number = requested.bytes().all(|byte| byte.is_ascii_digit());
            (version, !is_number)
        } else {
            let weighted = self.rollout.as_ref().and_then(|rollout| {
                let bucket = rollout
                    .sticky_key
                    .as_ref()
                    .and_then(sticky_bucket)
                    .unwrap_or(draws.bucket);
                rollout.version_for_bucket(bucket)
            });
            let version = weighted.or_else(|| self.aliases.get(PRODUCTION_ALIAS).copied());
            (version, version.is_some())
        };
        let shadow = self
            .rollout
            .as_ref()
            .and_then(|rollout| rollout.shadow)
            .filter(|shadow| Some(shadow.version) != version)
            .filter(|shadow| shadow_drawn(shadow.percent, draws.shadow))
            .map(|shadow| shadow.version);
        Ok(Decision {
            version,
            rewrite,
            rollout_revision,
            shadow,
        })
    }
}

/// Whether a request is copied to the shadow: `draw` uniform in [0, 1).
pub fn shadow_drawn(percent: f64, draw: f64) -> bool {
    draw * 100.0 < percent
}

/// All models the registry knows, at one registry revision.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    pub revision: u64,
    models: HashMap<String, Arc<ModelRoute>>,
}

impl RoutingTable {
    pub fn model(&self, name: &str) -> Option<&Arc<ModelRoute>> {
        self.models.get(name)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// One model whose routing an event changed.
#[derive(Clone, Debug)]
pub enum Change {
    /// New or changed route.
    Updated {
        model: String,
        route: Arc<ModelRoute>,
    },
    Removed {
        model: String,
    },
}

/// The current routing table, replaced whole by each event.
#[derive(Default)]
pub struct Routes {
    current: RwLock<Arc<RoutingTable>>,
    /// Serialises writers, so that readers wait only for the swap.
    apply: Mutex<()>,
}

impl Routes {
    /// The table now (a cheap `Arc` clone under a short read lock).
    pub fn current(&self) -> Arc<RoutingTable> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Applies a Watch event: a snapshot replaces the whole table;
    /// otherwise each listed model is replaced and each removed one
    /// deleted. Returns the models whose routing actually changed.
    pub fn apply(&self, event: &WatchEvent) -> Vec<Change> {
        let _writer = self
            .apply
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.current();
        let mut models = if event.snapshot {
            HashMap::with_capacity(event.models.len())
        } else {
            old.models.clone()
        };
        let mut changes = Vec::new();
        if !event.snapshot {
            for name in &event.removed {
                if models.remove(name).is_some() {
                    changes.push(Change::Removed {
                        model: name.clone(),
                    });
                }
            }
        }
        for state in &event.models {
            let route = ModelRoute::from_proto(state);
            match old.models.get(&state.name) {
                Some(previous) if **previous == route => {
                    models.insert(state.name.clone(), previous.clone());
                }
                _ => {
                    let route = Arc::new(route);
                    changes.push(Change::Updated {
                        model: state.name.clone(),
                        route: route.clone(),
                    });
                    models.insert(state.name.clone(), route);
                }
            }
        }
        if event.snapshot {
            for name in old.models.keys() {
                if !models.contains_key(name) {
                    changes.push(Change::Removed {
                        model: name.clone(),
                    });
                }
            }
        }
        let table = Arc::new(RoutingTable {
            revision: event.revision,
            models,
        });
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = table;
        changes
    }
}

/// FNV-1a 64 followed by a murmur3 finaliser (so that every input bit
/// reaches the low bits the bucket is taken from). Fixed forever: changing
/// it would move sticky callers between versions.
#[derive(Clone, Copy, Debug)]
pub struct StableHasher(u64);

impl StableHasher {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> StableHasher {
        StableHasher(Self::OFFSET)
    }

    /// A hasher that has taken `model` and a NUL separator.
    pub fn for_model(model: &str) -> StableHasher {
        let mut hasher = StableHasher::new();
        hasher.write(model.as_bytes());
        hasher.write(&[0]);
        hasher
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    pub fn finish(&self) -> u64 {
        let mut hash = self.0;
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^ (hash >> 33)
    }

    pub fn bucket(&self) -> u32 {
        (self.finish() % u64::from(BUCKETS)) as u32
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher::new()
    }
}

impl std::fmt::Write for StableHasher {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.write(text.as_bytes());
        Ok(())
    }
}

/// The sticky bucket of a caller value for a model.
pub fn sticky_bucket(model: &str, value: &str) -> u32 {
    let mut hasher = StableHasher::for_model(model);
    hasher.write(value.as_bytes());
    hasher.bucket()
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
