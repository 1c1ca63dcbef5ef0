//! The audit log's format: events, records, the hash chain, signed
//! checkpoints and tombstones, the export format and an offline verifier.
//! A pure library (no service, database or RPC dependency): an auditor
//! verifies an exported file with [`verify_export`] and the service's
//! [`PublicKey`]. The audit service appends with [`Record::append`], signs
//! with [`Signer`] and re-checks its store with [`ChainVerifier`]. Feature
//! `proto`: conversions to and from the `shamal.audit.v1` protobuf types.
//!
//! What follows is the format's specification, `docs/audit-format.md`.
//!
#![doc = include_str!("../../../docs/audit-format.md")]

mod digest;
mod encoding;
mod event;
pub mod export;
mod keys;
#[cfg(feature = "proto")]
mod proto;
mod record;
mod signed;
mod verify;

pub use digest::{Digest, ParseDigestError};
pub use encoding::{CHECKPOINT_DOMAIN, RECORD_DOMAIN, SEAL_DOMAIN, TOMBSTONE_DOMAIN};
pub use event::{
    Event, FieldError, MAX_EVENT_ID_CHARS, MAX_JSON_BYTES, MAX_NAME_CHARS, MAX_TEXT_CHARS,
};
pub use keys::{KeyError, PublicKey, Signer, VerifyError, load_public_key};
#[cfg(feature = "proto")]
pub use proto::ProtoError;
pub use record::{Record, canonical_bytes, record_hash};
pub use signed::{Checkpoint, Seal, Tombstone, checkpoint_bytes, seal_bytes, tombstone_bytes};
pub use verify::{ChainVerifier, Failure, FailureKind, Report, verify_export};
