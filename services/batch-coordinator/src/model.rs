//! Jobs as the store, the REST API and the gRPC API see them, and the
//! conversions between them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shamal_proto::shamal::batch::v1 as proto;
use utoipa::ToSchema;

/// What a job asks for (`JobSpec` of `shamal.batch.v1`): the REST body of a
/// submit, and what the store keeps (`batch_jobs.spec_json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    /// The model, as the registry names it.
    pub model: String,
    /// A version number; 0 with `alias` empty: the newest ready version.
    pub version: u64,
    /// An alias of the model, exclusive with `version`.
    pub alias: String,
    /// A local path: a file, or a directory of files of one format.
    pub input: String,
    /// `parquet`, `jsonl` or `csv`; empty: from the file extension.
    pub input_format: String,
    /// A local directory that is empty or absent.
    pub output: String,
    /// Columns copied to the output before the model's outputs.
    pub key_columns: Vec<String>,
    /// Regions the job's data may be processed in; empty: the model's.
    pub regions: Vec<String>,
    /// 0 (lowest) to 9 (highest).
    pub priority: u32,
    /// The tenant; with auth on, the caller's token's tenant.
    pub tenant: String,
    /// Encrypt output parts at rest (not supported yet: refused).
    pub encrypt: bool,
    /// Rows per shard, approximately (0: the coordinator's default).
    pub rows_per_shard: u64,
    /// Model input name -> dataset column.
    pub input_columns: BTreeMap<String, String>,
}

impl From<proto::JobSpec> for JobSpec {
    fn from(spec: proto::JobSpec) -> JobSpec {
        JobSpec {
            model: spec.model,
            version: spec.version,
            alias: spec.alias,
            input: spec.input,
            input_format: spec.input_format,
            output: spec.output,
            key_columns: spec.key_columns,
            regions: spec.regions,
            priority: spec.priority,
            tenant: spec.tenant,
            encrypt: spec.encrypt,
            rows_per_shard: spec.rows_per_shard,
            input_columns: spec.input_columns.into_iter().collect(),
        }
    }
}

impl From<JobSpec> for proto::JobSpec {
    fn from(spec: JobSpec) -> proto::JobSpec {
        proto::JobSpec {
            model: spec.model,
            version: spec.version,
            alias: spec.alias,
            input: spec.input,
            input_format: spec.input_format,
            output: spec.output,
            key_columns: spec.key_columns,
            regions: spec.regions,
            priority: spec.priority,
            tenant: spec.tenant,
            encrypt: spec.encrypt,
            rows_per_shard: spec.rows_per_shard,
            input_columns: spec.input_columns.into_iter().collect(),
        }
    }
}

/// A job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name stored and shown (`QUEUED`, ...).
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL
            .into_iter()
            .find(|state| state.name().eq_ignore_ascii_case(name))
    }

    /// Whether the job has ended (nothing changes it any more).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn to_proto(self) -> proto::JobState {
        match self {
            JobState::Queued => proto::JobState::Queued,
            JobState::Running => proto::JobState::Running,
            JobState::Succeeded => proto::JobState::Succeeded,
            JobState::Failed => proto::JobState::Failed,
            JobState::Cancelled => proto::JobState::Cancelled,
        }
    }

    pub fn from_proto(state: proto::JobState) -> Option<JobState> {
        match state {
            proto::JobState::Unspecified => None,
            proto::JobState::Queued => Some(JobState::Queued),
            proto::JobState::Running => Some(JobState::Running),
            proto::JobState::Succeeded => Some(JobState::Succeeded),
            proto::JobState::Failed => Some(JobState::Failed),
            proto::JobState::Cancelled => Some(JobState::Cancelled),
        }
    }
}

/// A job and its progress (`Job` of `shamal.batch.v1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// `job-` followed by a UUID.
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// The version every shard is scored with.
    pub version: u64,
    /// Input rows (estimated for JSONL / CSV until every shard is done).
    pub total_rows: u64,
    /// Rows whose output part is written.
    pub done_rows: u64,
    pub shards_total: u32,
    pub shards_done: u32,
    /// Shard attempts that failed (retried or not).
    pub shard_failures: u32,
    /// Why the job waits, or why it failed.
    pub message: String,
    pub created_at_ms: i64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Who submitted it.
    pub actor: String,
    /// Rows per second over the last minute.
    pub rows_per_second: f64,
    /// The manifest's location once the job succeeded.
    pub manifest: String,
    /// The regions its shards may be scored in (`*`: any).
    pub regions: Vec<String>,
}

impl From<Job> for proto::Job {
    fn from(job: Job) -> proto::Job {
        proto::Job {
            id: job.id,
            spec: Some(job.spec.into()),
            state: job.state.to_proto() as i32,
            version: job.version,
            total_rows: job.total_rows,
            done_rows: job.done_rows,
            shards_total: job.shards_total,
            shards_done: job.shards_done,
            shard_failures: job.shard_failures,
            message: job.message,
            created_at_ms: job.created_at_ms,
            started_at_ms: job.started_at_ms,
            finished_at_ms: job.finished_at_ms,
            actor: job.actor,
            rows_per_second: job.rows_per_second,
            manifest: job.manifest,
            regions: job.regions,
        }
    }
}

/// A shard's state in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardState {
    /// Planned, not on the queue (yet, or again).
    Pending,
    /// On the queue under `queue_id`.
    Queued,
    Done,
    Failed,
}

impl ShardState {
    pub fn name(self) -> &'static str {
        match self {
            ShardState::Pending => "pending",
            ShardState::Queued => "queued",
            ShardState::Done => "done",
            ShardState::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<ShardState> {
        [
            ShardState::Pending,
            ShardState::Queued,
            ShardState::Done,
            ShardState::Failed,
        ]
        .into_iter()
        .find(|state| state.name() == name)
    }
}

/// One shard's row.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRow {
    pub job_id: String,
    pub index: u32,
    pub shard_json: String,
    pub state: ShardState,
    pub attempts: u32,
    pub failures: u32,
    pub queue_id: String,
    pub planned_rows: u64,
    pub rows: u64,
    pub part: String,
    pub sha256: String,
    pub bytes: u64,
    pub worker: String,
    pub region: String,
    pub last_error: String,
}

/// The region of the stream a job's shards go on: the region set of its
/// regions (`eu+uae`, see [`shamal_async_queue::region_set`]; one region
/// is its own name), or `default_region` when any region may score them.
/// A worker of region `R` takes the streams `(model, R)` and those of the
/// region sets holding `R` only, so a shard is never taken outside its
/// job's regions (see `docs/batch.md`, "Residency").
pub fn stream_region(regions: &[String], default_region: &str) -> String {
    if regions.is_empty() {
        default_region.to_owned()
    } else {
        shamal_async_queue::region_set(regions)
    }
}

/// Whether a batch worker of `region` may take entries of a stream whose
/// region is `stream_region`: its own region's, and those of the region
/// sets that hold it (the rule the workers' batch role follows).
pub fn region_may_take(stream_region: &str, region: &str) -> bool {
    shamal_async_queue::region_set_holds(stream_region, region)
}

/// The regions of a stream region, for messages: `[eu, uae]`.
pub fn region_list(stream_region: &str) -> String {
    let members: Vec<&str> = stream_region
        .split(shamal_async_queue::REGION_SET_SEPARATOR)
        .collect();
    format!("[{}]", members.join(", "))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
