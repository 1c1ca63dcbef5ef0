//! Walking the stored chain in sequence order, a page at a time (never the
//! whole log in memory): records, the tombstones of removed ranges where
//! they were, and each checkpoint right after the record (or tombstone) it
//! covers. Export streams such a walk and seals it; Verify checks it.

use std::collections::VecDeque;

use shamal_audit::export::Line;
use shamal_audit::{ChainVerifier, Checkpoint, Digest, Record, Tombstone};
use sqlx::Row;
use tokio::sync::mpsc;

use crate::error::{AuditError, Result};
use crate::log::{AuditLog, now_ms};
use crate::rows::{
    CHECKPOINT_COLUMNS, RECORD_COLUMNS, TOMBSTONE_COLUMNS, checkpoint_from_row, record_from_row,
    seq_of, seq_value, tombstone_from_row,
};

/// Rows fetched per query of a walk.
pub const WALK_PAGE: i64 = 500;

/// One stored item, in walk order. Each is moved once, from its page to
/// the sink (like `shamal_audit::export::Line`): not worth a box.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
enum Item {
    Record(Record),
    Checkpoint(Checkpoint),
    Tombstone(Tombstone),
}

impl Item {
    /// Sort key: a record or tombstone at its (first) sequence number, a
    /// checkpoint right after the item ending at its sequence number.
    fn key(&self) -> (u64, u8) {
        match self {
            Item::Record(record) => (record.seq, 0),
            Item::Tombstone(tombstone) => (tombstone.first_seq, 0),
            Item::Checkpoint(checkpoint) => (checkpoint.seq, 1),
        }
    }
}

/// One table read a page at a time in sequence order.
struct Source<T> {
    buffer: VecDeque<T>,
    /// The sequence number read up to.
    after: u64,
    done: bool,
}

impl<T> Source<T> {
    fn new(after: u64) -> Source<T> {
        Source {
            buffer: VecDeque::new(),
            after,
            done: false,
        }
    }
}

/// A walk over sequence numbers `(after, upto]`, records limited to a
/// `recorded_at_ms` window.
struct Walker<'a> {
    log: &'a AuditLog,
    upto: u64,
    since_ms: i64,
    until_ms: i64,
    records: Source<Record>,
    checkpoints: Source<Checkpoint>,
    tombstones: Source<Tombstone>,
}

impl<'a> Walker<'a> {
    fn new(log: &'a AuditLog, after: u64, upto: u64, since_ms: i64, until_ms: i64) -> Walker<'a> {
        Walker {
            log,
            upto,
            since_ms,
            until_ms,
            records: Source::new(after),
            checkpoints: Source::new(after),
            tombstones: Source::new(after),
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let pool = &self.log.store.pool;
        if self.records.buffer.is_empty() && !self.records.done {
            let mut sql =
                format!("SELECT {RECORD_COLUMNS} FROM audit_records WHERE seq > $1 AND seq <= $2");
            let mut next = 3;
            if self.since_ms > 0 {
                sql.push_str(&format!(" AND recorded_at_ms >= ${next}"));
                next += 1;
            }
            if self.until_ms > 0 {
                sql.push_str(&format!(" AND recorded_at_ms < ${next}"));
                next += 1;
            }
            sql.push_str(&format!(" ORDER BY seq LIMIT ${next}"));
            let mut statement = sqlx::query(&sql)
                .bind(seq_value(self.records.after))
                .bind(seq_value(self.upto));
            if self.since_ms > 0 {
                statement = statement.bind(self.since_ms);
            }
            if self.until_ms > 0 {
                statement = statement.bind(self.until_ms);
            }
            let rows = statement.bind(WALK_PAGE).fetch_all(pool).await?;
            self.records.done = (rows.len() as i64) < WALK_PAGE;
            for row in &rows {
                let record = record_from_row(row)?;
                self.records.after = record.seq;
                self.records.buffer.push_back(record);
            }
        }
        if self.checkpoints.buffer.is_empty() && !self.checkpoints.done {
            let rows = sqlx::query(&format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints \
                 WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
            ))
            .bind(seq_value(self.checkpoints.after))
            .bind(seq_value(self.upto))
            .bind(WALK_PAGE)
            .fetch_all(pool)
            .await?;
            self.checkpoints.done = (rows.len() as i64) < WALK_PAGE;
            for row in &rows {
                let checkpoint = checkpoint_from_row(row)?;
                self.checkpoints.after = checkpoint.seq;
                self.checkpoints.buffer.push_back(checkpoint);
            }
        }
        if self.tombstones.buffer.is_empty() && !self.tombstones.done {
            let rows = sqlx::query(&format!(
                "SELECT {TOMBSTONE_COLUMNS} FROM audit_tombstones \
                 WHERE first_seq > $1 AND first_seq <= $2 ORDER BY first_seq LIMIT $3"
            ))
            .bind(seq_value(self.tombstones.after))
            .bind(seq_value(self.upto))
            .bind(WALK_PAGE)
            .fetch_all(pool)
            .await?;
            self.tombstones.done = (rows.len() as i64) < WALK_PAGE;
            for row in &rows {
                let tombstone = tombstone_from_row(row)?;
                self.tombstones.after = tombstone.first_seq;
                self.tombstones.buffer.push_back(tombstone);
            }
        }
        Ok(())
    }

    /// Whether every record of the walk has been taken.
    fn records_exhausted(&self) -> bool {
        self.records.done && self.records.buffer.is_empty()
    }

    /// The next item in order, `None` at the end.
    async fn next(&mut self) -> Result<Option<Item>> {
        self.fill().await?;
        let record = self.records.buffer.front().map(|record| (record.seq, 0));
        let tombstone = self
            .tombstones
            .buffer
            .front()
            .map(|tombstone| (tombstone.first_seq, 0));
        let checkpoint = self
            .checkpoints
            .buffer
            .front()
            .map(|checkpoint| (checkpoint.seq, 1));
        let smallest = [record, tombstone, checkpoint].into_iter().flatten().min();
        let item = match smallest {
            None => None,
            Some(key) if Some(key) == record => self.records.buffer.pop_front().map(Item::Record),
            Some(key) if Some(key) == tombstone => {
                self.tombstones.buffer.pop_front().map(Item::Tombstone)
            }
            Some(_) => self.checkpoints.buffer.pop_front().map(Item::Checkpoint),
        };
        debug_assert!(
            item.as_ref()
                .is_none_or(|item| Some(item.key()) == smallest)
        );
        Ok(item)
    }
}

/// The smallest sequence number of a record recorded at or after
/// `since_ms`, and the largest recorded before `until_ms` (0 = open: the
/// head), as bounds `(after, upto]` of a walk; `None` when the window
/// holds no record.
async fn export_bounds(
    log: &AuditLog,
    since_ms: i64,
    until_ms: i64,
    head: u64,
) -> Result<Option<(u64, u64)>> {
    let pool = &log.store.pool;
    let after = if since_ms > 0 {
        let row =
            sqlx::query("SELECT MIN(seq) AS seq FROM audit_records WHERE recorded_at_ms >= $1")
                .bind(since_ms)
                .fetch_one(pool)
                .await?;
        match row.try_get::<Option<i64>, _>("seq")? {
            Some(seq) => seq_of(seq).saturating_sub(1),
            None => return Ok(None),
        }
    } else {
        0
    };
    let upto = if until_ms > 0 {
        let row =
            sqlx::query("SELECT MAX(seq) AS seq FROM audit_records WHERE recorded_at_ms < $1")
                .bind(until_ms)
                .fetch_one(pool)
                .await?;
        match row.try_get::<Option<i64>, _>("seq")? {
            Some(seq) => seq_of(seq).min(head),
            None => return Ok(None),
        }
    } else {
        head
    };
    Ok((upto > after).then_some((after, upto)))
}

/// What an export covered, for its seal.
#[derive(Default)]
struct Covered {
    first_seq: u64,
    first_prev_hash: Digest,
    last_seq: u64,
    last_hash: Digest,
    records: u64,
    started: bool,
}

impl AuditLog {
    /// Streams the records recorded in `[since_ms, until_ms)` (0 = open)
    /// in sequence order into `sink`: each checkpoint right after the
    /// record it covers, the tombstones of removed ranges where they were
    /// (an export from the start, `since_ms` 0, begins with them), then a
    /// signed seal. Stops early, without error, when `sink` is closed.
    pub async fn export_into(
        &self,
        since_ms: i64,
        until_ms: i64,
        sink: &mpsc::Sender<Result<Line>>,
    ) -> Result<()> {
        if since_ms < 0 {
            return Err(AuditError::invalid(
                "since_ms",
                "must not be negative (0 means open)",
            ));
        }
        if until_ms < 0 {
            return Err(AuditError::invalid(
                "until_ms",
                "must not be negative (0 means open)",
            ));
        }
        if since_ms > 0 && until_ms > 0 && until_ms <= since_ms {
            return Err(AuditError::invalid(
                "until_ms",
                "must be after since_ms (the range is since_ms inclusive to until_ms exclusive)",
            ));
        }
        let _no_retention = self.walk_guard.read().await;
        // A snapshot: records appended during the export are not in it.
        let head = self.head().await?.seq;
        let mut covered = Covered::default();
        if let Some((after, upto)) = export_bounds(self, since_ms, until_ms, head).await? {
            let mut walker = Walker::new(self, after, upto, since_ms, until_ms);
            // The sequence number the last item sent ends at.
            let mut last_end = None;
            while let Some(item) = walker.next().await? {
                let line = match item {
                    Item::Record(record) => {
                        if !covered.started {
                            covered.started = true;
                            covered.first_seq = record.seq;
                            covered.first_prev_hash = record.prev_hash;
                        }
                        covered.last_seq = record.seq;
                        covered.last_hash = record.hash;
                        covered.records += 1;
                        last_end = Some(record.seq);
                        Line::Record(record)
                    }
                    Item::Tombstone(tombstone) => {
                        // Leading tombstones only from the start of the log;
                        // none after the window's last record.
                        let wanted = (since_ms == 0 || covered.started)
                            && !(until_ms > 0 && walker.records_exhausted());
                        if !wanted {
                            continue;
                        }
                        if !covered.started {
                            covered.started = true;
                            covered.first_seq = tombstone.first_seq;
                            // The chain starts at the log's beginning.
                            covered.first_prev_hash = Digest::ZERO;
                        }
                        covered.last_seq = tombstone.last_seq;
                        covered.last_hash = tombstone.last_hash;
                        last_end = Some(tombstone.last_seq);
                        Line::Tombstone(tombstone)
                    }
                    Item::Checkpoint(checkpoint) => {
                        if last_end != Some(checkpoint.seq) {
                            continue;
                        }
                        Line::Checkpoint(checkpoint)
                    }
                };
                if sink.send(Ok(line)).await.is_err() {
                    return Ok(());
                }
            }
        }
        let seal = self.signer.seal(
            since_ms,
            until_ms,
            covered.first_seq,
            covered.last_seq,
            covered.first_prev_hash,
            covered.last_hash,
            covered.records,
            now_ms(),
        );
        let _ = sink.send(Ok(Line::Seal(seal))).await;
        Ok(())
    }

    /// Recomputes the whole chain from the store (a page at a time) and
    /// checks every checkpoint's signature and that it matches the record
    /// it covers, and every tombstone's signature and place.
    pub async fn verify(&self) -> Result<Verified> {
        let outcome = self.verify_walk().await;
        let verified = match outcome {
            Ok(verified) => verified,
            // Stored data that does not even decode is a fault found.
            Err(AuditError::Corrupt { seq, message }) => Verified {
                ok: false,
                records_checked: 0,
                checkpoints_checked: 0,
                first_bad_seq: seq,
                reason: format!("stored data does not decode: {message}"),
            },
            Err(error) => return Err(error),
        };
        if !verified.ok {
            self.metrics.verify_failures.inc();
            tracing::error!(
                first_bad_seq = verified.first_bad_seq,
                reason = %verified.reason,
                "audit log verification FAILED"
            );
        }
        Ok(verified)
    }

    async fn verify_walk(&self) -> Result<Verified> {
        let _no_retention = self.walk_guard.read().await;
        let head = self.head().await?.seq;
        let key = &self.public_key;
        let mut chain = ChainVerifier::new(Digest::ZERO, 1);
        let mut interior_checkpoints = 0;
        let mut last_tombstone: Option<(u64, u64)> = None;
        let mut walker = Walker::new(self, 0, head, 0, 0);
        let failed = |chain: &ChainVerifier, interior: u64, seq: u64, reason: String| Verified {
            ok: false,
            records_checked: chain.records(),
            checkpoints_checked: chain.checkpoints() + interior,
            first_bad_seq: seq,
            reason,
        };
        while let Some(item) = walker.next().await? {
            let checked = match &item {
                Item::Record(record) => chain.push(record),
                Item::Tombstone(tombstone) => {
                    last_tombstone = Some((tombstone.first_seq, tombstone.last_seq));
                    chain.push_tombstone(tombstone, key)
                }
                Item::Checkpoint(checkpoint) => {
                    let inside_removed = last_tombstone.is_some_and(|(first, last)| {
                        first <= checkpoint.seq && checkpoint.seq < last
                    }) && chain.last_seq() != Some(checkpoint.seq);
                    if inside_removed {
                        // Its record is gone: only the signature can be checked.
                        match key.verify_checkpoint(checkpoint) {
                            Ok(()) => {
                                interior_checkpoints += 1;
                                Ok(())
                            }
                            Err(error) => {
                                return Ok(failed(
                                    &chain,
                                    interior_checkpoints,
                                    checkpoint.seq,
                                    format!("checkpoint {}: {error}", checkpoint.seq),
                                ));
                            }
                        }
                    } else {
                        chain.check_checkpoint(checkpoint, key)
                    }
                }
            };
            if let Err(failure) = checked {
                let seq = failure.seq.unwrap_or_else(|| item.key().0).max(1);
                return Ok(failed(
                    &chain,
                    interior_checkpoints,
                    seq,
                    failure.to_string(),
                ));
            }
        }
        if chain.last_seq().unwrap_or(0) != head {
            return Ok(failed(
                &chain,
                interior_checkpoints,
                chain.next_seq(),
                format!(
                    "the chain ends at {} but the head is record {head}",
                    chain.last_seq().unwrap_or(0)
                ),
            ));
        }
        Ok(Verified {
            ok: true,
            records_checked: chain.records(),
            checkpoints_checked: chain.checkpoints() + interior_checkpoints,
            first_bad_seq: 0,
            reason: String::new(),
        })
    }
}

/// The result of Verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub ok: bool,
    pub records_checked: u64,
    pub checkpoints_checked: u64,
    /// The first record (or checkpoint sequence) at fault; 0 when ok.
    pub first_bad_seq: u64,
    pub reason: String,
}
