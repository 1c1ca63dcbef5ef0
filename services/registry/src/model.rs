//! The registry's data model, as stored and as served over REST (JSON).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// A named model: the unit that clients address and rollouts act on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Model {
    pub name: String,
    pub description: String,
    pub created_by: String,
    pub created_at: Millis,
    /// Highest version number registered so far (0 when none).
    pub latest_version: u64,
}

/// Artifact file formats the workers can load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Onnx,
    Safetensors,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Onnx => "onnx",
            Format::Safetensors => "safetensors",
        }
    }

    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "onnx" => Some(Format::Onnx),
            "safetensors" => Some(Format::Safetensors),
            _ => None,
        }
    }
}

/// Content-addressed artifact bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    /// Lowercase hex sha256 of the bytes.
    pub sha256: String,
    pub size_bytes: u64,
    pub format: Format,
}

/// Where a version came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_commit: Option<String>,
}

/// Lifecycle of a model version: registered -> ready | failed -> archived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Recorded; no worker has loaded it yet.
    Registered,
    /// Loaded and warm on at least one worker.
    Ready,
    /// Every worker that tried failed to load it (see `reason`).
    Failed,
    /// Retired: workers unload it and no rollout may use it.
    Archived,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Registered => "registered",
            Lifecycle::Ready => "ready",
            Lifecycle::Failed => "failed",
            Lifecycle::Archived => "archived",
        }
    }

    pub fn parse(text: &str) -> Option<Lifecycle> {
        match text {
            "registered" => Some(Lifecycle::Registered),
            "ready" => Some(Lifecycle::Ready),
            "failed" => Some(Lifecycle::Failed),
            "archived" => Some(Lifecycle::Archived),
            _ => None,
        }
    }
}

/// One immutable version of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Version {
    pub model: String,
    pub version: u64,
    pub artifact: Artifact,
    /// Input/output signature as the first worker that loaded it read it
    /// from the artifact (null until then).
    #[schema(value_type = Option<Object>)]
    pub signature: Option<serde_json::Value>,
    /// Free-form key/value metadata.
    pub metadata: BTreeMap<String, String>,
    pub lineage: Lineage,
    pub lifecycle: Lifecycle,
    /// Why the version failed or was archived.
    pub reason: String,
    pub created_by: String,
    pub created_at: Millis,
}

/// A named pointer to a version (e.g. `production`), movable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Alias {
    pub model: String,
    pub alias: String,
    pub version: u64,
    pub updated_by: String,
    pub updated_at: Millis,
}

/// State of a model's rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Traffic is split by the weights.
    Active,
    /// All traffic on the stable version; weights kept for resume.
    Paused,
    /// The candidate took all traffic and became `production`.
    Promoted,
    /// Traffic returned to the stable version (by a person or by the
    /// canary analysis).
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<RolloutState> {
        match text {
            "active" => Some(RolloutState::Active),
            "paused" => Some(RolloutState::Paused),
            "promoted" => Some(RolloutState::Promoted),
            "rolled_back" => Some(RolloutState::RolledBack),
            _ => None,
        }
    }

    /// Whether the rollout is still in progress (a new one cannot start).
    pub fn in_progress(self) -> bool {
        matches!(self, RolloutState::Active | RolloutState::Paused)
    }
}

/// A version and its share of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub version: u64,
    /// Percent of traffic, 0..=100; the splits of a rollout sum to 100.
    pub weight: u32,
}

/// Copies of a share of requests sent to a version whose answers are
/// recorded, never returned.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: u64,
    /// Percent of requests copied, (0, 100].
    pub percent: f64,
}

/// Limits beyond which the canary analysis rolls a rollout back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardRails {
    /// Highest tolerated server-side error rate of a canary, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Highest tolerated ratio of canary p99 latency to stable p99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Requests a canary must have served before it is judged (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
}

impl GuardRails {
    pub const DEFAULT_MIN_REQUESTS: u64 = 100;

    pub fn enabled(&self) -> bool {
        self.max_error_rate.is_some() || self.max_p99_ratio.is_some()
    }

    pub fn min_requests(&self) -> u64 {
        self.min_requests.unwrap_or(Self::DEFAULT_MIN_REQUESTS)
    }
}

/// A model's traffic policy. There is at most one per model; each change
/// bumps `revision`, and writers must name the revision they change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    pub model: String,
    pub revision: u64,
    pub state: RolloutState,
    /// The version traffic returns to on rollback or pause.
    pub stable_version: u64,
    /// Weighted versions (all traffic goes to `stable_version` unless
    /// `state` is `active`).
    pub splits: Vec<Split>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    pub guard_rails: GuardRails,
    pub updated_by: String,
    pub updated_at: Millis,
    /// Why the last change was made (always set for automatic rollbacks).
    pub reason: String,
}

impl Rollout {
    /// The splits the router applies now: the weights when active, all
    /// traffic on the stable version otherwise (or on the promoted one).
    pub fn effective_splits(&self) -> Vec<Split> {
        match self.state {
            RolloutState::Active => self.splits.clone(),
            RolloutState::Paused | RolloutState::RolledBack | RolloutState::Promoted => {
                vec![Split {
                    version: self.stable_version,
                    weight: 100,
                }]
            }
        }
    }

    /// Versions taking traffic other than the stable one.
    pub fn canaries(&self) -> Vec<u64> {
        self.splits
            .iter()
            .filter(|split| split.version != self.stable_version && split.weight > 0)
            .map(|split| split.version)
            .collect()
    }
}

/// One recorded change of a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    pub id: u64,
    pub model: String,
    pub revision: u64,
    /// start | set_policy | shift | promote | rollback | pause | resume |
    /// auto_rollback
    pub action: String,
    pub actor: String,
    pub reason: String,
    pub at: Millis,
    /// The rollout as it was after the change.
    pub rollout: Rollout,
}

/// A worker known to the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerInfo {
    pub id: String,
    pub address: String,
    pub region: String,
    pub formats: Vec<String>,
    pub device: String,
    pub last_seen: Millis,
}

/// What a worker holds of a model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Placement {
    pub worker_id: String,
    pub model: String,
    pub version: u64,
    /// loading | ready | failed | unloaded
    pub state: String,
    pub reason: String,
    pub updated_at: Millis,
}

/// One page of a list; pass `next_page_token` back to get the next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Input of version registration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVersion {
    /// sha256 of an artifact already uploaded with `PUT /v1/artifacts/{sha256}`.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    /// onnx or safetensors.
    #[schema(value_type = Format)]
    pub format: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub lineage: Lineage,
    /// Creates the model when it does not exist yet (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_model: Option<bool>,
}

/// Input of rollout start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRollout {
    /// The rollout revision the writer last saw (0 when the model never had
    /// one).
    pub expected_revision: u64,
    /// The version to canary.
    pub candidate: u64,
    /// Percent of traffic for the candidate, 0..=100.
    pub weight: u32,
    /// The version the rest goes to: default the `production` alias, else
    /// the version that took all traffic before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    #[serde(default)]
    pub guard_rails: GuardRails,
}

/// Input of a full policy write (any number of weighted versions).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    pub expected_revision: u64,
    pub stable: u64,
    pub splits: Vec<Split>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    #[serde(default)]
    pub guard_rails: GuardRails,
}

/// Per-version figures collected from the routers since the rollout's
/// current revision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionAnalysis {
    pub version: u64,
    /// primary or shadow
    pub role: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A rollout with its live canary analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutStatus {
    pub rollout: Rollout,
    pub analysis: Vec<VersionAnalysis>,
}

/// Membership state of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Registered and heartbeating: routers may send it requests.
    Serving,
    /// Leaving on purpose: finishes what it holds, takes nothing new.
    Draining,
    /// Its lease expired without a heartbeat.
    Lost,
    /// Left (drained and deregistered); forgotten by Watch snapshots.
    Gone,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Serving => "serving",
            MemberState::Draining => "draining",
            MemberState::Lost => "lost",
            MemberState::Gone => "gone",
        }
    }

    pub fn parse(text: &str) -> Option<MemberState> {
        match text {
            "serving" => Some(MemberState::Serving),
            "draining" => Some(MemberState::Draining),
            "lost" => Some(MemberState::Lost),
            "gone" => Some(MemberState::Gone),
            _ => None,
        }
    }

    /// Serving and draining workers hold a lease that heartbeats renew.
    pub fn leased(self) -> bool {
        matches!(self, MemberState::Serving | MemberState::Draining)
    }
}

/// A worker as the registry sees it: what it registered, its membership
/// state and its last heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerStatus {
    pub id: String,
    /// gRPC address routers reach it at.
    pub address: String,
    /// Region it processes data in.
    pub region: String,
    pub formats: Vec<String>,
    /// cpu | cuda
    pub device: String,
    /// Requests it is sized to run concurrently.
    pub capacity: u32,
    pub state: MemberState,
    /// Why it is in that state (e.g. the drain reason, the expired lease).
    pub state_reason: String,
    pub state_changed_at: Millis,
    /// Last heartbeat (the registration counts as one); 0 when unknown.
    pub last_heartbeat: Millis,
    /// Requests it held at its last heartbeat.
    pub inflight: u32,
    /// Requests waiting in its batch queues at its last heartbeat.
    pub queue_depth: u32,
    pub registered_at: Millis,
}

/// Regions a model's requests may be processed in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelResidency {
    pub model: String,
    /// Empty: no model-level restriction.
    pub allowed_regions: Vec<String>,
    /// Who set it last (empty when never set).
    pub updated_by: String,
    pub updated_at: Millis,
}

/// Regions a tenant's requests may be processed in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantPolicy {
    pub tenant: String,
    /// Never empty.
    pub allowed_regions: Vec<String>,
    pub updated_by: String,
    pub updated_at: Millis,
}

/// Input of a residency write.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetResidency {
    /// Region names: 1-64 characters of letters, digits, `-`, `_` and
    /// `.`, starting with a letter or digit; at most 64, no duplicates.
    pub allowed_regions: Vec<String>,
}

/// Who may call a model, beyond the roles: callers whose token names one
/// of `allowed_tenants` (the tenant claim) or one of `allowed_groups` (the
/// groups claim). Both empty: no limit. Admins and service identities are
/// never limited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelAccess {
    pub model: String,
    pub allowed_tenants: Vec<String>,
    pub allowed_groups: Vec<String>,
    /// Who set it last (empty when never set).
    pub updated_by: String,
    pub updated_at: Millis,
}

/// Input of a model access write.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAccess {
    /// Tenant names (the rule of residency policies); at most 64, no
    /// duplicates.
    #[serde(default)]
    pub allowed_tenants: Vec<String>,
    /// Group names as the identity provider puts them in the groups claim
    /// (1-256 characters, no whitespace or control characters); at most
    /// 64, no duplicates.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
}

/// One recorded residency change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResidencyChange {
    pub id: u64,
    /// model | tenant
    pub scope: String,
    /// The model or tenant name.
    pub subject: String,
    /// The regions after the change; null when a tenant policy was deleted.
    pub allowed_regions: Option<Vec<String>>,
    pub actor: String,
    pub at: Millis,
}

/// How a model's versions are spread over the workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    /// Every capable worker holds every active version (the default).
    #[default]
    All,
    /// Each active version on workers of its own, in every region, as
    /// many as its share of the model's traffic and at least
    /// `min_replicas`.
    Weighted,
}

impl PlacementMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementMode::All => "all",
            PlacementMode::Weighted => "weighted",
        }
    }

    pub fn parse(text: &str) -> Option<PlacementMode> {
        match text {
            "all" => Some(PlacementMode::All),
            "weighted" => Some(PlacementMode::Weighted),
            _ => None,
        }
    }
}

/// A model's placement policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlacementPolicy {
    pub mode: PlacementMode,
    /// Fewest workers per region that hold each active version (`weighted`).
    pub min_replicas: u32,
    /// Who set it last (empty when never set).
    pub updated_by: String,
    pub updated_at: Millis,
}

/// Input of a placement policy write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPlacement {
    pub mode: PlacementMode,
    /// Fewest workers per region that hold each active version, 1-64
    /// (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub min_replicas: Option<u32>,
}

/// Where one active version of a model is held.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionPlacement {
    pub version: u64,
    pub lifecycle: Lifecycle,
    /// Its share of the model's traffic, in percent (shadow copies count
    /// with their share).
    pub weight: f64,
    /// The workers that should hold it. In mode `all`, every serving
    /// worker that loads its format.
    pub workers: Vec<String>,
    /// Workers it is leaving that keep it until every new holder has
    /// reported it ready and the grace period has passed
    /// (make-before-break).
    pub releasing: Vec<String>,
    /// The workers (of both lists) that report it ready.
    pub ready: Vec<String>,
}

/// A model's placement policy and where its active versions are held.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelPlacement {
    pub model: String,
    pub policy: PlacementPolicy,
    /// Active versions (registered or ready), by version.
    pub versions: Vec<VersionPlacement>,
}
