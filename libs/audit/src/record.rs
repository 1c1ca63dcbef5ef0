//! [`Record`]: an event in its place in the hash chain.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::encoding::{Encoder, RECORD_DOMAIN};
use crate::{Digest, Event};

/// An event as stored: its place in the chain and its hashes
/// (`shamal.audit.v1.AuditRecord`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1, 2, 3, ... without gaps (removed ranges leave a tombstone).
    pub seq: u64,
    /// When the audit service appended it, Unix milliseconds.
    pub recorded_at_ms: i64,
    /// What happened.
    pub event: Event,
    /// The hash of record `seq - 1` ([`Digest::ZERO`] for record 1).
    pub prev_hash: Digest,
    /// [`record_hash`]`(prev_hash, seq, recorded_at_ms, event)`.
    pub hash: Digest,
}

/// The canonical encoding of a record (without its hashes): the text
/// `shamal-audit-record-v1`, `seq` (u64), `recorded_at_ms` (i64), then every
/// event field in proto field-number order: `event_id`, `occurred_at_ms`
/// (i64), `service`, `instance`, `action`, `outcome`, `actor`, `client_id`,
/// `tenant`, `model`, `version`, `region`, `worker`, `request_id`,
/// `latency_us` (u64), `request_sha256`, `response_sha256`, `before_json`,
/// `after_json`, `reason`. Integers are 8 bytes big-endian; each text is its
/// UTF-8 byte length (u64 big-endian) followed by its bytes.
pub fn canonical_bytes(seq: u64, recorded_at_ms: i64, event: &Event) -> Vec<u8> {
    let mut encoder = Encoder::new(RECORD_DOMAIN);
    encoder
        .u64(seq)
        .i64(recorded_at_ms)
        .text(&event.event_id)
        .i64(event.occurred_at_ms)
        .text(&event.service)
        .text(&event.instance)
        .text(&event.action)
        .text(&event.outcome)
        .text(&event.actor)
        .text(&event.client_id)
        .text(&event.tenant)
        .text(&event.model)
        .text(&event.version)
        .text(&event.region)
        .text(&event.worker)
        .text(&event.request_id)
        .u64(event.latency_us)
        .text(&event.request_sha256)
        .text(&event.response_sha256)
        .text(&event.before_json)
        .text(&event.after_json)
        .text(&event.reason);
    encoder.finish()
}

/// SHA-256 over the 32 raw bytes of `prev` followed by
/// [`canonical_bytes`]`(seq, recorded_at_ms, event)`.
pub fn record_hash(prev: &Digest, seq: u64, recorded_at_ms: i64, event: &Event) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update(prev.0);
    hasher.update(canonical_bytes(seq, recorded_at_ms, event));
    Digest(hasher.finalize().into())
}

impl Record {
    /// The record that follows a record whose hash is `prev` (use
    /// [`Digest::ZERO`] for seq 1), with its hash computed.
    pub fn append(prev: &Digest, seq: u64, recorded_at_ms: i64, event: Event) -> Record {
        let hash = record_hash(prev, seq, recorded_at_ms, &event);
        Record {
            seq,
            recorded_at_ms,
            event,
            prev_hash: *prev,
            hash,
        }
    }

    /// Whether `hash` is the hash of this record's contents and `prev_hash`
    /// (it says nothing about the chain: see [`crate::ChainVerifier`]).
    pub fn is_intact(&self) -> bool {
        record_hash(&self.prev_hash, self.seq, self.recorded_at_ms, &self.event) == self.hash
    }
}
