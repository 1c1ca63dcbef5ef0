//! The database: `batch_jobs` and `batch_shards`, one set of queries for
//! PostgreSQL and SQLite (sqlx's `Any` driver), migrations per engine.
//!
//! A job row is written at submit with its shards, in one transaction, and
//! then changes only on state transitions (each a conditional UPDATE, so
//! that a transition from a final state never happens). A job's progress
//! (shards done, rows done, failures) is derived from its shards.

use sqlx::{AnyPool, Row};

use crate::error::{BatchError, Result};
use crate::model::{Job, JobSpec, JobState, ShardRow, ShardState, now_ms};

pub use shamal_sql::Backend;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A job as submitted (what `batch_jobs` holds besides its progress).
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: String,
    pub request_id: Option<String>,
    pub spec: JobSpec,
    pub version: u64,
    pub regions: Vec<String>,
    pub stream_region: String,
    pub tenant: String,
    pub actor: String,
    pub total_rows: u64,
    pub message: String,
}

/// A planned shard.
#[derive(Clone, Debug)]
pub struct NewShard {
    pub index: u32,
    pub shard_json: String,
    pub rows: u64,
}

/// What a worker reported for a shard.
#[derive(Clone, Debug, Default)]
pub struct ShardDone {
    pub rows: u64,
    pub part: String,
    pub sha256: String,
    pub bytes: u64,
    pub worker: String,
    pub region: String,
}

/// Where a job's shards go on the queue.
#[derive(Clone, Debug)]
pub struct JobRouting {
    pub stream_region: String,
}

#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

const JOB_COLUMNS: &str = "j.seq, j.id, j.spec_json, j.version, j.regions_json, j.state, \
     j.total_rows, j.message, j.manifest, j.created_at_ms, j.started_at_ms, j.finished_at_ms, \
     j.actor, \
     (SELECT COUNT(*) FROM batch_shards s WHERE s.job_id = j.id) AS shards_total, \
     (SELECT COUNT(*) FROM batch_shards s WHERE s.job_id = j.id AND s.state = 'done') AS shards_done, \
     (SELECT CAST(COALESCE(SUM(s.rows_done), 0) AS BIGINT) FROM batch_shards s \
        WHERE s.job_id = j.id AND s.state = 'done') AS done_rows, \
     (SELECT CAST(COALESCE(SUM(s.failures), 0) AS BIGINT) FROM batch_shards s \
        WHERE s.job_id = j.id) AS shard_failures";

impl Store {
    /// Connects (creating a SQLite file and its directory) and applies
    /// pending migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        let (pool, backend) = shamal_sql::open(
            url,
            shamal_sql::Migrations {
                postgres: &POSTGRES_MIGRATIONS,
                sqlite: &SQLITE_MIGRATIONS,
            },
        )
        .await
        .map_err(|error| match error {
            shamal_sql::OpenError::Url => BatchError::invalid("database_url", shamal_sql::URL_RULE),
            other => BatchError::Unavailable(other.to_string()),
        })?;
        Ok(Store { pool, backend })
    }

    /// The id of the job submitted with `request_id`, if any.
    pub async fn job_of_request(&self, request_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT id FROM batch_jobs WHERE request_id = $1")
            .bind(request_id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get::<String, _>("id")?),
            None => None,
        })
    }

    /// Inserts a job and its shards (all `pending`) in one transaction.
    /// Returns false, writing nothing, when a job with the same
    /// `request_id` exists (a concurrent submit won).
    pub async fn insert_job(&self, job: &NewJob, shards: &[NewShard]) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if let Some(request_id) = &job.request_id {
            let existing = sqlx::query("SELECT id FROM batch_jobs WHERE request_id = $1")
                .bind(request_id.clone())
                .fetch_optional(&mut *tx)
                .await?;
            if existing.is_some() {
                return Ok(false);
            }
        }
        let spec = serde_json::to_string(&job.spec)
            .map_err(|error| BatchError::Internal(error.to_string()))?;
        let regions = serde_json::to_string(&job.regions)
            .map_err(|error| BatchError::Internal(error.to_string()))?;
        let inserted = sqlx::query(
            "INSERT INTO batch_jobs (id, request_id, spec_json, model, version, regions_json, \
             stream_region, tenant, actor, state, total_rows, message, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(job.id.clone())
        .bind(job.request_id.clone())
        .bind(spec)
        .bind(job.spec.model.clone())
        .bind(to_i64(job.version))
        .bind(regions)
        .bind(job.stream_region.clone())
        .bind(job.tenant.clone())
        .bind(job.actor.clone())
        .bind(JobState::Queued.name())
        .bind(to_i64(job.total_rows))
        .bind(job.message.clone())
        .bind(now_ms())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // The unique request_id: another submit committed first.
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => return Ok(false),
            Err(error) => return Err(error.into()),
        }
        for shard in shards {
            sqlx::query(
                "INSERT INTO batch_shards (job_id, shard_index, shard_json, state, planned_rows) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(job.id.clone())
            .bind(i64::from(shard.index))
            .bind(shard.shard_json.clone())
            .bind(ShardState::Pending.name())
            .bind(to_i64(shard.rows))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    fn job_of_row(row: &sqlx::any::AnyRow) -> Result<(i64, Job)> {
        let spec_json: String = row.try_get("spec_json")?;
        let spec: JobSpec = serde_json::from_str(&spec_json)
            .map_err(|error| BatchError::Internal(format!("stored job spec: {error}")))?;
        let regions_json: String = row.try_get("regions_json")?;
        let regions: Vec<String> = serde_json::from_str(&regions_json)
            .map_err(|error| BatchError::Internal(format!("stored job regions: {error}")))?;
        let state_name: String = row.try_get("state")?;
        let state = JobState::parse(&state_name)
            .ok_or_else(|| BatchError::Internal(format!("stored job state '{state_name}'")))?;
        let shards_total = to_u32(row.try_get::<i64, _>("shards_total")?);
        let shards_done = to_u32(row.try_get::<i64, _>("shards_done")?);
        let done_rows = to_u64(row.try_get::<i64, _>("done_rows")?);
        let planned = to_u64(row.try_get::<i64, _>("total_rows")?);
        Ok((
            row.try_get("seq")?,
            Job {
                id: row.try_get("id")?,
                spec,
                state,
                version: to_u64(row.try_get::<i64, _>("version")?),
                // Exact once every shard is done (JSONL / CSV plans are
                // estimates).
                total_rows: if shards_total > 0 && shards_done == shards_total {
                    done_rows
                } else {
                    planned
                },
                done_rows,
                shards_total,
                shards_done,
                shard_failures: to_u32(row.try_get::<i64, _>("shard_failures")?),
                message: row.try_get("message")?,
                created_at_ms: row.try_get("created_at_ms")?,
                started_at_ms: row.try_get("started_at_ms")?,
                finished_at_ms: row.try_get("finished_at_ms")?,
                actor: row.try_get("actor")?,
                rows_per_second: 0.0,
                manifest: row.try_get("manifest")?,
                regions,
            },
        ))
    }

    /// A job with its progress.
    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM batch_jobs j WHERE j.id = $1"
        ))
        .bind(id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(Store::job_of_row(&row)?.1)),
            None => Ok(None),
        }
    }

    /// Newest first: at most `limit` jobs older than `before_seq` (0: from
    /// the newest), filtered; with the sequence number of each.
    pub async fn list(
        &self,
        before_seq: i64,
        state: Option<JobState>,
        model: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(i64, Job)>> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM batch_jobs j WHERE j.seq < $1");
        let mut texts = Vec::new();
        if let Some(state) = state {
            texts.push(state.name().to_owned());
            sql.push_str(&format!(" AND j.state = ${}", texts.len() + 1));
        }
        if let Some(model) = model {
            texts.push(model.to_owned());
            sql.push_str(&format!(" AND j.model = ${}", texts.len() + 1));
        }
        sql.push_str(&format!(" ORDER BY j.seq DESC LIMIT {limit}"));
        let mut query = sqlx::query(&sql).bind(if before_seq <= 0 {
            i64::MAX
        } else {
            before_seq
        });
        for text in texts {
            query = query.bind(text);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(Store::job_of_row).collect()
    }

    /// Ids of the jobs not yet final (to resume after a restart).
    pub async fn active_jobs(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM batch_jobs WHERE state IN ($1, $2) ORDER BY seq")
            .bind(JobState::Queued.name())
            .bind(JobState::Running.name())
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("id").map_err(BatchError::from))
            .collect()
    }

    /// Where a job's shards are queued.
    pub async fn routing(&self, id: &str) -> Result<JobRouting> {
        let row = sqlx::query("SELECT stream_region FROM batch_jobs WHERE id = $1")
            .bind(id.to_owned())
            .fetch_one(&self.pool)
            .await?;
        Ok(JobRouting {
            stream_region: row.try_get("stream_region")?,
        })
    }

    /// Every shard of a job, by index.
    pub async fn shards(&self, job_id: &str) -> Result<Vec<ShardRow>> {
        let rows = sqlx::query(
            "SELECT job_id, shard_index, shard_json, state, attempts, failures, queue_id, \
             planned_rows, rows_done, part, sha256, bytes, worker, region, last_error \
             FROM batch_shards WHERE job_id = $1 ORDER BY shard_index",
        )
        .bind(job_id.to_owned())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                Ok(ShardRow {
                    job_id: row.try_get("job_id")?,
                    index: to_u32(row.try_get::<i64, _>("shard_index")?),
                    shard_json: row.try_get("shard_json")?,
                    state: ShardState::parse(&state).ok_or_else(|| {
                        BatchError::Internal(format!("stored shard state '{state}'"))
                    })?,
                    attempts: to_u32(row.try_get::<i64, _>("attempts")?),
                    failures: to_u32(row.try_get::<i64, _>("failures")?),
                    queue_id: row.try_get("queue_id")?,
                    planned_rows: to_u64(row.try_get::<i64, _>("planned_rows")?),
                    rows: to_u64(row.try_get::<i64, _>("rows_done")?),
                    part: row.try_get("part")?,
                    sha256: row.try_get("sha256")?,
                    bytes: to_u64(row.try_get::<i64, _>("bytes")?),
                    worker: row.try_get("worker")?,
                    region: row.try_get("region")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Records that a shard's attempt `attempts` is on the queue as
    /// `queue_id`.
    pub async fn shard_queued(
        &self,
        job_id: &str,
        index: u32,
        queue_id: &str,
        attempts: u32,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE batch_shards SET state = $1, queue_id = $2, attempts = $3, queued_at_ms = $4 \
             WHERE job_id = $5 AND shard_index = $6 AND state IN ('pending', 'queued')",
        )
        .bind(ShardState::Queued.name())
        .bind(queue_id.to_owned())
        .bind(i64::from(attempts))
        .bind(now_ms())
        .bind(job_id.to_owned())
        .bind(i64::from(index))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a shard done with what its worker reported, and the job
    /// RUNNING (with its start time) if it was QUEUED, in one transaction.
    /// Only the queue entry the shard waits on counts: returns false for
    /// a stale entry or a job no longer active.
    pub async fn shard_done(
        &self,
        job_id: &str,
        index: u32,
        queue_id: &str,
        done: &ShardDone,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let updated = sqlx::query(
            "UPDATE batch_shards SET state = 'done', rows_done = $1, part = $2, sha256 = $3, \
             bytes = $4, worker = $5, region = $6, finished_at_ms = $7, last_error = '' \
             WHERE job_id = $8 AND shard_index = $9 AND state = 'queued' AND queue_id = $10 \
             AND EXISTS (SELECT 1 FROM batch_jobs j WHERE j.id = $8 AND j.state IN ('QUEUED', 'RUNNING'))",
        )
        .bind(to_i64(done.rows))
        .bind(done.part.clone())
        .bind(done.sha256.clone())
        .bind(to_i64(done.bytes))
        .bind(done.worker.clone())
        .bind(done.region.clone())
        .bind(now)
        .bind(job_id.to_owned())
        .bind(i64::from(index))
        .bind(queue_id.to_owned())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE batch_jobs SET state = 'RUNNING', started_at_ms = $1, message = '' \
             WHERE id = $2 AND state = 'QUEUED'",
        )
        .bind(now)
        .bind(job_id.to_owned())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a failed attempt of a shard: back to `pending` (to be
    /// queued again) or `failed`.
    pub async fn shard_failed(
        &self,
        job_id: &str,
        index: u32,
        queue_id: &str,
        error: &str,
        retry: bool,
    ) -> Result<bool> {
        let state = if retry {
            ShardState::Pending
        } else {
            ShardState::Failed
        };
        let updated = sqlx::query(
            "UPDATE batch_shards SET state = $1, failures = failures + 1, last_error = $2, \
             finished_at_ms = $3 WHERE job_id = $4 AND shard_index = $5 AND state = 'queued' \
             AND queue_id = $6",
        )
        .bind(state.name())
        .bind(error.to_owned())
        .bind(now_ms())
        .bind(job_id.to_owned())
        .bind(i64::from(index))
        .bind(queue_id.to_owned())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated > 0)
    }

    /// Takes a done shard back (its part does not match what its worker
    /// reported), so that its attempt can be recorded as failed.
    pub async fn reopen_shard(&self, job_id: &str, index: u32) -> Result<()> {
        sqlx::query(
            "UPDATE batch_shards SET state = 'queued' WHERE job_id = $1 AND shard_index = $2 \
             AND state = 'done'",
        )
        .bind(job_id.to_owned())
        .bind(i64::from(index))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves a job from an active state (QUEUED, RUNNING) to `to`, with
    /// its message (and manifest); false when it was not active.
    pub async fn finish(
        &self,
        job_id: &str,
        to: JobState,
        message: &str,
        manifest: &str,
    ) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE batch_jobs SET state = $1, message = $2, manifest = $3, finished_at_ms = $4 \
             WHERE id = $5 AND state IN ('QUEUED', 'RUNNING')",
        )
        .bind(to.name())
        .bind(message.to_owned())
        .bind(manifest.to_owned())
        .bind(now_ms())
        .bind(job_id.to_owned())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated > 0)
    }

    /// Sets the message of an active job; true when it changed.
    pub async fn set_message(&self, job_id: &str, message: &str) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE batch_jobs SET message = $1 WHERE id = $2 AND message <> $1 \
             AND state IN ('QUEUED', 'RUNNING')",
        )
        .bind(message.to_owned())
        .bind(job_id.to_owned())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated > 0)
    }
}
