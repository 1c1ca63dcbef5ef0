//! Rows of the audit tables and their decoding into the format's types
//! (`shamal_audit`): `Record`, `Checkpoint`, `Tombstone`.

use shamal_audit::{Checkpoint, Digest, Event, Record, Tombstone};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::error::{AuditError, Result};

/// The columns of `audit_records`, in the order [`record_from_row`] and the
/// insert bind them.
pub const RECORD_COLUMNS: &str = "seq, event_id, recorded_at_ms, occurred_at_ms, service, instance, \
     action, outcome, actor, client_id, tenant, model, version, region, worker, request_id, \
     latency_us, request_sha256, response_sha256, before_json, after_json, reason, prev_hash, hash";

/// How many columns [`RECORD_COLUMNS`] names (the values of an inserted
/// row, see `log::record_row`).
pub const RECORD_COLUMN_COUNT: usize = 24;

pub const CHECKPOINT_COLUMNS: &str = "seq, head_hash, signed_at_ms, key_id, signature";

pub const TOMBSTONE_COLUMNS: &str =
    "first_seq, last_seq, last_hash, removed_at_ms, key_id, signature";

/// A sequence number as stored (BIGINT).
pub fn seq_value(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A stored sequence number.
pub fn seq_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn digest(seq: u64, column: &str, text: &str) -> Result<Digest> {
    Digest::from_hex(text).map_err(|error| AuditError::Corrupt {
        seq,
        message: format!("{column}: {error}"),
    })
}

pub fn record_from_row(row: &AnyRow) -> Result<Record> {
    let seq = seq_of(row.try_get::<i64, _>("seq")?);
    let event = Event {
        event_id: row.try_get("event_id")?,
        occurred_at_ms: row.try_get("occurred_at_ms")?,
        service: row.try_get("service")?,
        instance: row.try_get("instance")?,
        action: row.try_get("action")?,
        outcome: row.try_get("outcome")?,
        actor: row.try_get("actor")?,
        client_id: row.try_get("client_id")?,
        tenant: row.try_get("tenant")?,
        model: row.try_get("model")?,
        version: row.try_get("version")?,
        region: row.try_get("region")?,
        worker: row.try_get("worker")?,
        request_id: row.try_get("request_id")?,
        // Stored bit for bit (see the migrations).
        latency_us: row.try_get::<i64, _>("latency_us")? as u64,
        request_sha256: row.try_get("request_sha256")?,
        response_sha256: row.try_get("response_sha256")?,
        before_json: row.try_get("before_json")?,
        after_json: row.try_get("after_json")?,
        reason: row.try_get("reason")?,
    };
    Ok(Record {
        seq,
        recorded_at_ms: row.try_get("recorded_at_ms")?,
        event,
        prev_hash: digest(seq, "prev_hash", &row.try_get::<String, _>("prev_hash")?)?,
        hash: digest(seq, "hash", &row.try_get::<String, _>("hash")?)?,
    })
}

pub fn checkpoint_from_row(row: &AnyRow) -> Result<Checkpoint> {
    let seq = seq_of(row.try_get::<i64, _>("seq")?);
    Ok(Checkpoint {
        seq,
        head_hash: digest(seq, "head_hash", &row.try_get::<String, _>("head_hash")?)?,
        signed_at_ms: row.try_get("signed_at_ms")?,
        key_id: row.try_get("key_id")?,
        signature: row.try_get("signature")?,
    })
}

pub fn tombstone_from_row(row: &AnyRow) -> Result<Tombstone> {
    let first_seq = seq_of(row.try_get::<i64, _>("first_seq")?);
    Ok(Tombstone {
        first_seq,
        last_seq: seq_of(row.try_get::<i64, _>("last_seq")?),
        last_hash: digest(
            first_seq,
            "last_hash",
            &row.try_get::<String, _>("last_hash")?,
        )?,
        removed_at_ms: row.try_get("removed_at_ms")?,
        key_id: row.try_get("key_id")?,
        signature: row.try_get("signature")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_count_matches_the_columns() {
        assert_eq!(RECORD_COLUMNS.split(',').count(), RECORD_COLUMN_COUNT);
    }
}
