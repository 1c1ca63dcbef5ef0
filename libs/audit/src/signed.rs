//! Signed statements: [`Checkpoint`], [`Tombstone`] and the export [`Seal`],
//! and their canonical (signed) encodings.

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::encoding::{CHECKPOINT_DOMAIN, Encoder, SEAL_DOMAIN, TOMBSTONE_DOMAIN};

/// A signed statement that the chain up to `seq` ends in `head_hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The record the checkpoint covers.
    pub seq: u64,
    /// That record's hash.
    pub head_hash: Digest,
    /// When it was signed, Unix milliseconds.
    pub signed_at_ms: i64,
    /// The signing key's id ([`crate::PublicKey::key_id`]).
    pub key_id: String,
    /// Ed25519 signature (64 bytes; hex in JSON) over [`Checkpoint::signed_bytes`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// A signed statement that records `first_seq..=last_seq` were removed (by
/// retention); `last_hash` is the hash of record `last_seq`, so the chain
/// resumes at `last_seq + 1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    /// The first removed record.
    pub first_seq: u64,
    /// The last removed record.
    pub last_seq: u64,
    /// The hash of record `last_seq`.
    pub last_hash: Digest,
    /// When they were removed, Unix milliseconds.
    pub removed_at_ms: i64,
    /// The signing key's id.
    pub key_id: String,
    /// Ed25519 signature over [`Tombstone::signed_bytes`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// The signed summary of one export (`shamal.audit.v1.ExportSeal`): always the
/// last line of an export file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// The export's bounds on `recorded_at_ms` (inclusive; 0 = open).
    pub since_ms: i64,
    /// The export's bounds on `recorded_at_ms` (exclusive; 0 = open).
    pub until_ms: i64,
    /// The first sequence number the export covers (a record's, or a leading
    /// tombstone's `first_seq`); 0 when the export is empty.
    pub first_seq: u64,
    /// The last sequence number the export covers; 0 when empty.
    pub last_seq: u64,
    /// The hash the chain of the export starts from: `prev_hash` of its first
    /// record (zeros when empty).
    pub first_prev_hash: Digest,
    /// The hash of record `last_seq` (zeros when empty).
    pub last_hash: Digest,
    /// How many record lines the export holds.
    pub records: u64,
    /// When it was signed, Unix milliseconds.
    pub signed_at_ms: i64,
    /// The signing key's id.
    pub key_id: String,
    /// Ed25519 signature over [`Seal::signed_bytes`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// The signed encoding of a checkpoint.
pub fn checkpoint_bytes(seq: u64, head_hash: &Digest, signed_at_ms: i64, key_id: &str) -> Vec<u8> {
    Encoder::new(CHECKPOINT_DOMAIN)
        .u64(seq)
        .digest(head_hash)
        .i64(signed_at_ms)
        .text(key_id)
        .finish()
}

/// The signed encoding of a tombstone.
pub fn tombstone_bytes(
    first_seq: u64,
    last_seq: u64,
    last_hash: &Digest,
    removed_at_ms: i64,
    key_id: &str,
) -> Vec<u8> {
    Encoder::new(TOMBSTONE_DOMAIN)
        .u64(first_seq)
        .u64(last_seq)
        .digest(last_hash)
        .i64(removed_at_ms)
        .text(key_id)
        .finish()
}

/// The signed encoding of a seal.
#[allow(clippy::too_many_arguments)]
pub fn seal_bytes(
    since_ms: i64,
    until_ms: i64,
    first_seq: u64,
    last_seq: u64,
    first_prev_hash: &Digest,
    last_hash: &Digest,
    records: u64,
    signed_at_ms: i64,
    key_id: &str,
) -> Vec<u8> {
    Encoder::new(SEAL_DOMAIN)
        .i64(since_ms)
        .i64(until_ms)
        .u64(first_seq)
        .u64(last_seq)
        .digest(first_prev_hash)
        .digest(last_hash)
        .u64(records)
        .i64(signed_at_ms)
        .text(key_id)
        .finish()
}

impl Checkpoint {
    /// The bytes its signature covers: the text `shamal-audit-checkpoint-v1`,
    /// `seq` (u64), `head_hash` (32 raw bytes), `signed_at_ms` (i64), `key_id`
    /// (text).
    pub fn signed_bytes(&self) -> Vec<u8> {
        checkpoint_bytes(self.seq, &self.head_hash, self.signed_at_ms, &self.key_id)
    }
}

impl Tombstone {
    /// The bytes its signature covers: the text `shamal-audit-tombstone-v1`,
    /// `first_seq`, `last_seq` (u64), `last_hash` (32 raw bytes),
    /// `removed_at_ms` (i64), `key_id` (text).
    pub fn signed_bytes(&self) -> Vec<u8> {
        tombstone_bytes(
            self.first_seq,
            self.last_seq,
            &self.last_hash,
            self.removed_at_ms,
            &self.key_id,
        )
    }
}

impl Seal {
    /// The bytes its signature covers: the text `shamal-audit-seal-v1`,
    /// `since_ms`, `until_ms` (i64), `first_seq`, `last_seq` (u64),
    /// `first_prev_hash`, `last_hash` (32 raw bytes each), `records` (u64),
    /// `signed_at_ms` (i64), `key_id` (text).
    pub fn signed_bytes(&self) -> Vec<u8> {
        seal_bytes(
            self.since_ms,
            self.until_ms,
            self.first_seq,
            self.last_seq,
            &self.first_prev_hash,
            &self.last_hash,
            self.records,
            self.signed_at_ms,
            &self.key_id,
        )
    }
}

/// Byte strings as lower-case hex in JSON.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(serde::de::Error::custom("hex must be lower-case"));
        }
        hex::decode(&text).map_err(serde::de::Error::custom)
    }
}
