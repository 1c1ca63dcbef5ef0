//! The audit log: appends (validated, deduplicated by event id, chained and
//! written in one serialised transaction), signed checkpoints of the head,
//! queries, and retention that removes only whole checkpointed ranges,
//! leaving a signed tombstone. Export and Verify walk it in `walk.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shamal_audit::{Checkpoint, Digest, Event, PublicKey, Record, Signer, Tombstone};
use sqlx::{Any, Row, Transaction};
use tokio::sync::{Mutex, Notify, RwLock};

use crate::error::{AuditError, Result};
use crate::metrics::AuditMetrics;
use crate::rows::{RECORD_COLUMN_COUNT, RECORD_COLUMNS, record_from_row, seq_of, seq_value};
use crate::store::{Backend, Store};

/// Most events one Append may carry.
pub const MAX_APPEND_EVENTS: usize = 10_000;
/// Most records one Query page may hold.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// A Query page's size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Records per INSERT and event ids per duplicate lookup. Each statement
/// binds its rows as one JSON array (SQLite's `json_each`, Postgres's
/// `json_array_elements`) rather than one parameter per value: sqlx's
/// SQLite driver looks every parameter up by name, a cost that grew with
/// the statement (`perf`: `sqlite3_bind_parameter_name` first in the
/// profile with 240 values per statement), and Postgres pays a round trip
/// per statement, so both want few statements of one fixed text.
const STATEMENT_ROWS: usize = 1000;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The end of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// The last sequence number (0 for an empty log).
    pub seq: u64,
    /// The hash of record `seq` ([`Digest::ZERO`] for an empty log).
    pub hash: Digest,
    /// When record `seq` was recorded (0 when it was removed or there is
    /// none): new records are never recorded earlier.
    pub recorded_at_ms: i64,
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: Digest::ZERO,
        recorded_at_ms: 0,
    };
}

/// What an Append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Appended {
    /// Events written.
    pub appended: u32,
    /// Events skipped: already recorded, or repeated within the batch.
    pub duplicates: u32,
    /// The chain's last sequence number afterwards.
    pub head_seq: u64,
}

/// Query's filters (ANDed; an empty string matches anything) and page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub actor: String,
    pub tenant: String,
    pub model: String,
    pub version: String,
    pub action: String,
    pub outcome: String,
    pub region: String,
    /// Inclusive lower bound on `occurred_at_ms`; 0 = open.
    pub since_ms: i64,
    /// Exclusive upper bound on `occurred_at_ms`; 0 = open.
    pub until_ms: i64,
    /// 1 to [`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// Records after this sequence number (the page token).
    pub after_seq: u64,
}

/// One page of a Query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub records: Vec<Record>,
    /// The page token of the next page; `None` on the last page.
    pub next_after: Option<u64>,
}

/// The service's timing of checkpoints.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    /// After this many records...
    pub every: u64,
    /// ... or this long, when the head moved.
    pub interval: Duration,
}

/// The audit log over a store, with its signing key.
pub struct AuditLog {
    pub(crate) store: Store,
    pub(crate) signer: Signer,
    pub(crate) public_key: PublicKey,
    pub(crate) metrics: AuditMetrics,
    /// Serialises this process's appends and retention passes (the
    /// database serialises them across processes: `Store::begin_append`).
    append_lock: Mutex<()>,
    /// Export and Verify hold it shared, retention exclusively, so that a
    /// walk never meets a range removed under it.
    pub(crate) walk_guard: RwLock<()>,
    checkpoints: CheckpointPolicy,
    /// Records appended since the last checkpoint this process signed.
    since_checkpoint: AtomicU64,
    checkpoint_due: Notify,
}

impl AuditLog {
    pub fn new(
        store: Store,
        signer: Signer,
        metrics: AuditMetrics,
        checkpoints: CheckpointPolicy,
    ) -> AuditLog {
        AuditLog {
            store,
            public_key: signer.public_key(),
            signer,
            metrics,
            append_lock: Mutex::new(()),
            walk_guard: RwLock::new(()),
            checkpoints: CheckpointPolicy {
                every: checkpoints.every.max(1),
                interval: checkpoints.interval.max(Duration::from_millis(10)),
            },
            since_checkpoint: AtomicU64::new(0),
            checkpoint_due: Notify::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    /// The key checkpoints, tombstones and seals are signed with.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// Validates and appends `events`: each must pass
    /// [`Event::validate`] (INVALID_ARGUMENT naming `events[i].field`
    /// otherwise), at most [`MAX_APPEND_EVENTS`] per call. Events whose
    /// `event_id` is already recorded, or repeats one earlier in the batch,
    /// are skipped as duplicates; the rest get the next sequence numbers,
    /// chained, in one transaction.
    pub async fn append(&self, events: Vec<Event>) -> Result<Appended> {
        let started = Instant::now();
        if events.len() > MAX_APPEND_EVENTS {
            return Err(AuditError::invalid(
                "events",
                format!(
                    "{} events, at most {MAX_APPEND_EVENTS} per call",
                    events.len()
                ),
            ));
        }
        for (index, event) in events.iter().enumerate() {
            event.validate().map_err(|error| {
                AuditError::invalid(format!("events[{index}].{}", error.field), error.message)
            })?;
        }
        let submitted = events.len();
        self.metrics.batch_size.observe(submitted as f64);
        let mut seen = HashSet::with_capacity(events.len());
        let unique: Vec<Event> = events
            .into_iter()
            .filter(|event| seen.insert(event.event_id.clone()))
            .collect();
        let outcome = {
            let _serialised = self.append_lock.lock().await;
            let mut tx = self.store.begin_append().await?;
            let head = head_in(&mut tx).await?;
            let backend = self.store.backend;
            let stored = stored_event_ids(&mut tx, backend, &unique).await?;
            let fresh: Vec<Event> = unique
                .into_iter()
                .filter(|event| !stored.contains(&event.event_id))
                .collect();
            // Never earlier than the record before: Export's time bounds
            // then cut the chain in one contiguous range.
            let recorded_at_ms = now_ms().max(head.recorded_at_ms);
            let mut prev = head.hash;
            let mut seq = head.seq;
            let mut records = Vec::with_capacity(fresh.len());
            for event in fresh {
                seq += 1;
                let record = Record::append(&prev, seq, recorded_at_ms, event);
                prev = record.hash;
                records.push(record);
            }
            insert_records(&mut tx, backend, &records).await?;
            tx.commit().await?;
            let appended = records.len();
            Appended {
                appended: u32::try_from(appended).unwrap_or(u32::MAX),
                duplicates: u32::try_from(submitted - appended).unwrap_or(u32::MAX),
                head_seq: seq,
            }
        };
        self.metrics.appended.inc_by(u64::from(outcome.appended));
        self.metrics
            .duplicates
            .inc_by(u64::from(outcome.duplicates));
        self.metrics
            .head_seq
            .set(i64::try_from(outcome.head_seq).unwrap_or(i64::MAX));
        self.metrics
            .append_latency
            .observe(started.elapsed().as_secs_f64());
        if outcome.appended > 0 {
            let pending = self
                .since_checkpoint
                .fetch_add(u64::from(outcome.appended), Ordering::SeqCst)
                + u64::from(outcome.appended);
            if pending >= self.checkpoints.every {
                self.checkpoint_due.notify_one();
            }
        }
        Ok(outcome)
    }

    /// The end of the chain now.
    pub async fn head(&self) -> Result<Head> {
        let mut connection = self.store.pool.acquire().await?;
        head_of(&mut connection).await
    }

    /// The newest checkpoint's sequence number (0 when there is none).
    pub async fn last_checkpoint_seq(&self) -> Result<u64> {
        let row = sqlx::query("SELECT MAX(seq) AS seq FROM audit_checkpoints")
            .fetch_one(&self.store.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("seq")?.map_or(0, seq_of))
    }

    /// Signs and stores a checkpoint of the current head, unless the head
    /// is already checkpointed (or the log is empty).
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>> {
        // Counted from here: records appended meanwhile are either in this
        // checkpoint or counted towards the next.
        let pending = self.since_checkpoint.swap(0, Ordering::SeqCst);
        let head = self.head().await?;
        if head.seq == 0 || head.seq <= self.last_checkpoint_seq().await? {
            return Ok(None);
        }
        let checkpoint = self.signer.checkpoint(head.seq, head.hash, now_ms());
        let inserted = sqlx::query(
            "INSERT INTO audit_checkpoints (seq, head_hash, signed_at_ms, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(seq_value(checkpoint.seq))
        .bind(checkpoint.head_hash.to_hex())
        .bind(checkpoint.signed_at_ms)
        .bind(checkpoint.key_id.clone())
        .bind(checkpoint.signature.clone())
        .execute(&self.store.pool)
        .await;
        match inserted {
            Ok(result) if result.rows_affected() == 1 => {
                self.metrics.checkpoints.inc();
                tracing::debug!(seq = checkpoint.seq, head = %checkpoint.head_hash, "checkpoint signed");
                Ok(Some(checkpoint))
            }
            // Another replica checkpointed the same head first.
            Ok(_) => Ok(None),
            Err(error) => {
                self.since_checkpoint.fetch_add(pending, Ordering::SeqCst);
                Err(error.into())
            }
        }
    }

    /// Signs checkpoints in the background: after `every` records or every
    /// `interval` (when the head moved), until `stop` turns true; a last
    /// one on the way out.
    pub fn spawn_checkpointer(
        self: &Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(log.checkpoints.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = log.checkpoint_due.notified() => {}
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                if let Err(error) = log.checkpoint().await {
                    tracing::warn!(%error, "checkpoint failed; retrying at the next interval");
                }
            }
            if let Err(error) = log.checkpoint().await {
                tracing::warn!(%error, "final checkpoint failed");
            }
        })
    }

    /// Records matching `query`, oldest first, one page.
    pub async fn query(&self, query: &Query) -> Result<Page> {
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                return Err(AuditError::invalid(
                    "page_size",
                    format!("{size} is above the maximum of {MAX_PAGE_SIZE}"),
                ));
            }
            size => size,
        };
        if query.since_ms < 0 {
            return Err(AuditError::invalid(
                "since_ms",
                "must not be negative (0 means open)",
            ));
        }
        if query.until_ms < 0 {
            return Err(AuditError::invalid(
                "until_ms",
                "must not be negative (0 means open)",
            ));
        }
        if query.since_ms > 0 && query.until_ms > 0 && query.until_ms <= query.since_ms {
            return Err(AuditError::invalid(
                "until_ms",
                "must be after since_ms (the range is since_ms inclusive to until_ms exclusive)",
            ));
        }
        let mut sql = format!("SELECT {RECORD_COLUMNS} FROM audit_records WHERE seq > $1");
        let mut texts: Vec<&str> = Vec::new();
        for (column, value) in [
            ("actor", &query.actor),
            ("tenant", &query.tenant),
            ("model", &query.model),
            ("version", &query.version),
            ("action", &query.action),
            ("outcome", &query.outcome),
            ("region", &query.region),
        ] {
            if !value.is_empty() {
                texts.push(value);
                sql.push_str(&format!(" AND {column} = ${}", texts.len() + 1));
            }
        }
        let mut next = texts.len() + 2;
        if query.since_ms > 0 {
            sql.push_str(&format!(" AND occurred_at_ms >= ${next}"));
            next += 1;
        }
        if query.until_ms > 0 {
            sql.push_str(&format!(" AND occurred_at_ms < ${next}"));
            next += 1;
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT ${next}"));
        let mut statement = sqlx::query(&sql).bind(seq_value(query.after_seq));
        for text in texts {
            statement = statement.bind(text.to_owned());
        }
        if query.since_ms > 0 {
            statement = statement.bind(query.since_ms);
        }
        if query.until_ms > 0 {
            statement = statement.bind(query.until_ms);
        }
        let rows = statement
            .bind(i64::from(page_size) + 1)
            .fetch_all(&self.store.pool)
            .await?;
        let mut records = rows
            .iter()
            .map(record_from_row)
            .collect::<Result<Vec<_>>>()?;
        let next_after = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records.last().map(|record| record.seq)
        } else {
            None
        };
        Ok(Page {
            records,
            next_after,
        })
    }

    /// Removes the oldest range of records recorded before `cutoff_ms` that
    /// ends exactly at a checkpoint (the newest such checkpoint), after
    /// writing a signed tombstone of it, in one transaction. Returns the
    /// tombstone, or `None` when no whole checkpointed range is that old.
    pub async fn retain(&self, cutoff_ms: i64) -> Result<Option<Tombstone>> {
        let _walks = self.walk_guard.write().await;
        let _serialised = self.append_lock.lock().await;
        let mut tx = self.store.begin_append().await?;
        let row = sqlx::query("SELECT MIN(seq) AS seq FROM audit_records")
            .fetch_one(&mut *tx)
            .await?;
        let Some(first) = row.try_get::<Option<i64>, _>("seq")?.map(seq_of) else {
            return Ok(None);
        };
        // recorded_at_ms never decreases along the chain, so every record
        // up to the checkpoint's is older than the cutoff too.
        let row = sqlx::query(
            "SELECT c.seq AS seq, c.head_hash AS head_hash, r.hash AS hash \
             FROM audit_checkpoints c JOIN audit_records r ON r.seq = c.seq \
             WHERE c.seq >= $1 AND r.recorded_at_ms < $2 \
             ORDER BY c.seq DESC LIMIT 1",
        )
        .bind(seq_value(first))
        .bind(cutoff_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let last = seq_of(row.try_get::<i64, _>("seq")?);
        let head_hash: String = row.try_get("head_hash")?;
        let hash: String = row.try_get("hash")?;
        if head_hash != hash {
            return Err(AuditError::Corrupt {
                seq: last,
                message: format!(
                    "the checkpoint says the chain ends in {head_hash}, the record's hash is {hash}: \
                     retention refuses to remove records whose checkpoint disagrees (run Verify)"
                ),
            });
        }
        let last_hash = Digest::from_hex(&hash).map_err(|error| AuditError::Corrupt {
            seq: last,
            message: format!("hash: {error}"),
        })?;
        let tombstone = self.signer.tombstone(first, last, last_hash, now_ms());
        sqlx::query(
            "INSERT INTO audit_tombstones \
             (first_seq, last_seq, last_hash, removed_at_ms, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(seq_value(tombstone.first_seq))
        .bind(seq_value(tombstone.last_seq))
        .bind(tombstone.last_hash.to_hex())
        .bind(tombstone.removed_at_ms)
        .bind(tombstone.key_id.clone())
        .bind(tombstone.signature.clone())
        .execute(&mut *tx)
        .await?;
        let removed = sqlx::query("DELETE FROM audit_records WHERE seq >= $1 AND seq <= $2")
            .bind(seq_value(first))
            .bind(seq_value(last))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        self.metrics.retention_removed.inc_by(removed);
        tracing::info!(
            first_seq = first,
            last_seq = last,
            removed,
            "retention removed a checkpointed range, leaving a signed tombstone"
        );
        Ok(Some(tombstone))
    }

    /// Runs retention every `interval` while `retention` is set, until
    /// `stop` turns true.
    pub fn spawn_retention(
        self: &Arc<Self>,
        retention: Duration,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
                let keep_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                let cutoff = now_ms().saturating_sub(keep_ms);
                if let Err(error) = log.retain(cutoff).await {
                    tracing::error!(%error, "retention failed");
                }
            }
        })
    }
}

/// The end of the chain as a transaction (or connection) sees it: its last
/// record, or, when retention removed every record, the last tombstone.
async fn head_in(tx: &mut Transaction<'static, Any>) -> Result<Head> {
    head_of(tx).await
}

async fn head_of(connection: &mut sqlx::AnyConnection) -> Result<Head> {
    let record = sqlx::query(
        "SELECT seq, hash, recorded_at_ms FROM audit_records ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *connection)
    .await?;
    let tombstone = sqlx::query(
        "SELECT last_seq, last_hash FROM audit_tombstones ORDER BY last_seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *connection)
    .await?;
    let mut head = Head::EMPTY;
    if let Some(row) = record {
        let seq = seq_of(row.try_get::<i64, _>("seq")?);
        head = Head {
            seq,
            hash: parse_digest(seq, "hash", &row.try_get::<String, _>("hash")?)?,
            recorded_at_ms: row.try_get("recorded_at_ms")?,
        };
    }
    if let Some(row) = tombstone {
        let seq = seq_of(row.try_get::<i64, _>("last_seq")?);
        if seq > head.seq {
            head = Head {
                seq,
                hash: parse_digest(seq, "last_hash", &row.try_get::<String, _>("last_hash")?)?,
                recorded_at_ms: 0,
            };
        }
    }
    Ok(head)
}

fn parse_digest(seq: u64, column: &str, text: &str) -> Result<Digest> {
    Digest::from_hex(text).map_err(|error| AuditError::Corrupt {
        seq,
        message: format!("{column}: {error}"),
    })
}

/// Which of `events`' ids are already recorded.
async fn stored_event_ids(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    events: &[Event],
) -> Result<HashSet<String>> {
    let sql = match backend {
        Backend::Sqlite => {
            "SELECT event_id FROM audit_records WHERE event_id IN (SELECT value FROM json_each($1))"
        }
        Backend::Postgres => {
            "SELECT event_id FROM audit_records \
             WHERE event_id IN (SELECT json_array_elements_text($1::json))"
        }
    };
    let mut stored = HashSet::new();
    for chunk in events.chunks(STATEMENT_ROWS) {
        let ids = serde_json::Value::Array(
            chunk
                .iter()
                .map(|event| serde_json::Value::String(event.event_id.clone()))
                .collect(),
        );
        for row in sqlx::query(sql)
            .bind(ids.to_string())
            .fetch_all(&mut **tx)
            .await?
        {
            stored.insert(row.try_get::<String, _>("event_id")?);
        }
    }
    Ok(stored)
}

/// The INSERT of a chunk of records, bound as one JSON array of rows (one
/// array of [`RECORD_COLUMNS`] values per record): one parameter whatever
/// the chunk's size, one prepared statement for every chunk.
fn insert_sql(backend: Backend) -> String {
    // SQLite: each reference to `json_each`'s `value` converts the row's
    // array to text again (`perf`: a quarter of the store's CPU with 24
    // columns); a materialised CTE converts it once per row, and the 24
    // extractions then share one parse.
    let (with, rows, cast) = match backend {
        Backend::Sqlite => (
            "WITH rows(value) AS MATERIALIZED (SELECT value FROM json_each($1)) ",
            "rows AS r",
            false,
        ),
        Backend::Postgres => ("", "json_array_elements($1::json) AS r(value)", true),
    };
    let integers = [0, 2, 3, 16];
    let values = (0..RECORD_COLUMN_COUNT)
        .map(|column| match (cast, integers.contains(&column)) {
            (true, true) => format!("(r.value->>{column})::bigint"),
            _ => format!("r.value->>{column}"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("{with}INSERT INTO audit_records ({RECORD_COLUMNS}) SELECT {values} FROM {rows}")
}

/// One row of [`insert_sql`]'s array, in [`RECORD_COLUMNS`] order.
fn record_row(record: &Record) -> serde_json::Value {
    use serde_json::Value;
    let event = &record.event;
    let text = |value: &str| Value::String(value.to_owned());
    Value::Array(vec![
        Value::from(seq_value(record.seq)),
        text(&event.event_id),
        Value::from(record.recorded_at_ms),
        Value::from(event.occurred_at_ms),
        text(&event.service),
        text(&event.instance),
        text(&event.action),
        text(&event.outcome),
        text(&event.actor),
        text(&event.client_id),
        text(&event.tenant),
        text(&event.model),
        text(&event.version),
        text(&event.region),
        text(&event.worker),
        text(&event.request_id),
        // Bit for bit (see the migrations).
        Value::from(event.latency_us as i64),
        text(&event.request_sha256),
        text(&event.response_sha256),
        text(&event.before_json),
        text(&event.after_json),
        text(&event.reason),
        Value::String(record.prev_hash.to_hex()),
        Value::String(record.hash.to_hex()),
    ])
}

/// Inserts `records`, [`STATEMENT_ROWS`] per statement.
async fn insert_records(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    records: &[Record],
) -> Result<()> {
    let sql = insert_sql(backend);
    for chunk in records.chunks(STATEMENT_ROWS) {
        let rows = serde_json::Value::Array(chunk.iter().map(record_row).collect());
        sqlx::query(&sql)
            .bind(rows.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}
