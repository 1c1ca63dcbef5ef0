//! Conversions to and from the `shamal.audit.v1` protobuf types (feature
//! `proto`). Digests travel as 64 lower-case hex characters; converting a
//! message with a bad one fails naming its field.

use shamal_proto::shamal::audit::v1 as pb;

use crate::export::Line;
use crate::{Checkpoint, Digest, Event, Record, Seal, Tombstone};

/// A protobuf message that does not convert: the field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ProtoError {
    /// The field's name (`prev_hash`, `record.hash`, `event`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn digest(field: &'static str, text: &str) -> Result<Digest, ProtoError> {
    Digest::from_hex(text).map_err(|error| ProtoError {
        field,
        message: error.to_string(),
    })
}

impl From<Event> for pb::AuditEvent {
    fn from(event: Event) -> pb::AuditEvent {
        pb::AuditEvent {
            event_id: event.event_id,
            occurred_at_ms: event.occurred_at_ms,
            service: event.service,
            instance: event.instance,
            action: event.action,
            outcome: event.outcome,
            actor: event.actor,
            client_id: event.client_id,
            tenant: event.tenant,
            model: event.model,
            version: event.version,
            region: event.region,
            worker: event.worker,
            request_id: event.request_id,
            latency_us: event.latency_us,
            request_sha256: event.request_sha256,
            response_sha256: event.response_sha256,
            before_json: event.before_json,
            after_json: event.after_json,
            reason: event.reason,
        }
    }
}

impl From<pb::AuditEvent> for Event {
    fn from(event: pb::AuditEvent) -> Event {
        Event {
            event_id: event.event_id,
            occurred_at_ms: event.occurred_at_ms,
            service: event.service,
            instance: event.instance,
            action: event.action,
            outcome: event.outcome,
            actor: event.actor,
            client_id: event.client_id,
            tenant: event.tenant,
            model: event.model,
            version: event.version,
            region: event.region,
            worker: event.worker,
            request_id: event.request_id,
            latency_us: event.latency_us,
            request_sha256: event.request_sha256,
            response_sha256: event.response_sha256,
            before_json: event.before_json,
            after_json: event.after_json,
            reason: event.reason,
        }
    }
}

impl From<Record> for pb::AuditRecord {
    fn from(record: Record) -> pb::AuditRecord {
        pb::AuditRecord {
            seq: record.seq,
            recorded_at_ms: record.recorded_at_ms,
            event: Some(record.event.into()),
            prev_hash: record.prev_hash.to_hex(),
            hash: record.hash.to_hex(),
        }
    }
}

impl TryFrom<pb::AuditRecord> for Record {
    type Error = ProtoError;
    fn try_from(record: pb::AuditRecord) -> Result<Record, ProtoError> {
        Ok(Record {
            seq: record.seq,
            recorded_at_ms: record.recorded_at_ms,
            event: record
                .event
                .ok_or_else(|| ProtoError {
                    field: "event",
                    message: "missing".to_owned(),
                })?
                .into(),
            prev_hash: digest("prev_hash", &record.prev_hash)?,
            hash: digest("hash", &record.hash)?,
        })
    }
}

impl From<Checkpoint> for pb::Checkpoint {
    fn from(checkpoint: Checkpoint) -> pb::Checkpoint {
        pb::Checkpoint {
            seq: checkpoint.seq,
            head_hash: checkpoint.head_hash.to_hex(),
            signed_at_ms: checkpoint.signed_at_ms,
            key_id: checkpoint.key_id,
            signature: checkpoint.signature,
        }
    }
}

impl TryFrom<pb::Checkpoint> for Checkpoint {
    type Error = ProtoError;
    fn try_from(checkpoint: pb::Checkpoint) -> Result<Checkpoint, ProtoError> {
        Ok(Checkpoint {
            seq: checkpoint.seq,
            head_hash: digest("head_hash", &checkpoint.head_hash)?,
            signed_at_ms: checkpoint.signed_at_ms,
            key_id: checkpoint.key_id,
            signature: checkpoint.signature,
        })
    }
}

impl From<Tombstone> for pb::Tombstone {
    fn from(tombstone: Tombstone) -> pb::Tombstone {
        pb::Tombstone {
            first_seq: tombstone.first_seq,
            last_seq: tombstone.last_seq,
            last_hash: tombstone.last_hash.to_hex(),
            removed_at_ms: tombstone.removed_at_ms,
            key_id: tombstone.key_id,
            signature: tombstone.signature,
        }
    }
}

impl TryFrom<pb::Tombstone> for Tombstone {
    type Error = ProtoError;
    fn try_from(tombstone: pb::Tombstone) -> Result<Tombstone, ProtoError> {
        Ok(Tombstone {
            first_seq: tombstone.first_seq,
            last_seq: tombstone.last_seq,
            last_hash: digest("last_hash", &tombstone.last_hash)?,
            removed_at_ms: tombstone.removed_at_ms,
            key_id: tombstone.key_id,
            signature: tombstone.signature,
        })
    }
}

impl From<Seal> for pb::ExportSeal {
    fn from(seal: Seal) -> pb::ExportSeal {
        pb::ExportSeal {
            since_ms: seal.since_ms,
            until_ms: seal.until_ms,
            first_seq: seal.first_seq,
            last_seq: seal.last_seq,
            first_prev_hash: seal.first_prev_hash.to_hex(),
            last_hash: seal.last_hash.to_hex(),
            records: seal.records,
            signed_at_ms: seal.signed_at_ms,
            key_id: seal.key_id,
            signature: seal.signature,
        }
    }
}

impl TryFrom<pb::ExportSeal> for Seal {
    type Error = ProtoError;
    fn try_from(seal: pb::ExportSeal) -> Result<Seal, ProtoError> {
        Ok(Seal {
            since_ms: seal.since_ms,
            until_ms: seal.until_ms,
            first_seq: seal.first_seq,
            last_seq: seal.last_seq,
            first_prev_hash: digest("first_prev_hash", &seal.first_prev_hash)?,
            last_hash: digest("last_hash", &seal.last_hash)?,
            records: seal.records,
            signed_at_ms: seal.signed_at_ms,
            key_id: seal.key_id,
            signature: seal.signature,
        })
    }
}

impl From<Line> for pb::ExportItem {
    fn from(line: Line) -> pb::ExportItem {
        use pb::export_item::Item;
        pb::ExportItem {
            item: Some(match line {
                Line::Record(record) => Item::Record(record.into()),
                Line::Checkpoint(checkpoint) => Item::Checkpoint(checkpoint.into()),
                Line::Tombstone(tombstone) => Item::Tombstone(tombstone.into()),
                Line::Seal(seal) => Item::Seal(seal.into()),
            }),
        }
    }
}

impl TryFrom<pb::ExportItem> for Line {
    type Error = ProtoError;
    fn try_from(item: pb::ExportItem) -> Result<Line, ProtoError> {
        use pb::export_item::Item;
        Ok(
            match item.item.ok_or_else(|| ProtoError {
                field: "item",
                message: "missing".to_owned(),
            })? {
                Item::Record(record) => Line::Record(record.try_into()?),
                Item::Checkpoint(checkpoint) => Line::Checkpoint(checkpoint.try_into()?),
                Item::Tombstone(tombstone) => Line::Tombstone(tombstone.try_into()?),
                Item::Seal(seal) => Line::Seal(seal.try_into()?),
            },
        )
    }
}
