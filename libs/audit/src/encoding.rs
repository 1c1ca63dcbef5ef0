//! The canonical binary encoding every hash and signature is computed over.
//!
//! Three item types, concatenated without separators:
//!
//! - `u64` / `i64`: 8 bytes, big-endian (two's complement for `i64`);
//! - text: its UTF-8 length as a big-endian `u64`, then its UTF-8 bytes;
//! - digest: its 32 raw bytes.
//!
//! Every encoding starts with its domain-separation tag, encoded as text.

use crate::Digest;

/// Tag of a record's encoding.
pub const RECORD_DOMAIN: &str = "shamal-audit-record-v1";
/// Tag of a checkpoint's signed encoding.
pub const CHECKPOINT_DOMAIN: &str = "shamal-audit-checkpoint-v1";
/// Tag of a tombstone's signed encoding.
pub const TOMBSTONE_DOMAIN: &str = "shamal-audit-tombstone-v1";
/// Tag of an export seal's signed encoding.
pub const SEAL_DOMAIN: &str = "shamal-audit-seal-v1";

/// Builds one canonical encoding.
pub(crate) struct Encoder(Vec<u8>);

impl Encoder {
    pub(crate) fn new(domain: &str) -> Encoder {
        let mut encoder = Encoder(Vec::with_capacity(256));
        encoder.text(domain);
        encoder
    }

    pub(crate) fn u64(&mut self, value: u64) -> &mut Encoder {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn i64(&mut self, value: i64) -> &mut Encoder {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn text(&mut self, value: &str) -> &mut Encoder {
        self.u64(value.len() as u64);
        self.0.extend_from_slice(value.as_bytes());
        self
    }

    pub(crate) fn digest(&mut self, value: &Digest) -> &mut Encoder {
        self.0.extend_from_slice(&value.0);
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}
