//! Keys for data at rest, and the blob format that uses them.
//!
//! A [`KeyRing`] holds AES-256 keys by id, one of them active: new data is
//! encrypted under the active key, and data under any key the ring still
//! holds stays readable, so keys rotate without a flag day (add a key, make
//! it active, re-encrypt, remove the old one). Rings come from a key file
//! ([`KeyRing::from_file`]: TOML or JSON, mode 0600) or an environment
//! variable of `id:base64` entries ([`KeyRing::from_env_value`]). Key
//! material is zeroized on drop and never printed.
//!
//! [`blob`] is the on-disk format: a header naming the key id, then
//! AES-256-GCM segments of 64 KiB under the STREAM construction, so blobs of
//! any size are encrypted and decrypted without being held in memory, and
//! truncation, reordering or any changed byte is refused rather than
//! decrypted into garbage. The registry's artifact store uses it; so can
//! anything else that keeps data at rest.

pub mod blob;
mod keyring;

use std::path::PathBuf;

pub use blob::{
    BlobEncryptor, BlobHeader, PlaintextStream, decrypt, decrypt_after_header, encrypt,
    is_encrypted, plaintext_len,
};
pub use keyring::{KeyRing, generate_key_file, random_key_base64};

/// Why keys cannot be loaded or a blob cannot be encrypted or decrypted.
/// Every message names the file, variable, key id or segment at fault, and
/// none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file is unreadable, too open, or malformed.
    #[error("key file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// Keys from another source (an environment variable, a caller's list)
    /// are malformed; `origin` names the source.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    /// A blob names a key id the ring does not hold.
    #[error(
        "the blob is encrypted under key id '{key_id}', which the key ring does not hold (its keys: {known})"
    )]
    UnknownKey { key_id: String, known: String },
    /// The blob does not start with a valid header.
    #[error("not a readable encrypted blob: {0}")]
    Header(String),
    /// A segment does not authenticate under its key: the key is wrong, or
    /// the blob was changed, truncated, extended or reordered.
    #[error(
        "the blob fails authentication at segment {segment} under key id '{key_id}': wrong key, or the blob was tampered with or truncated"
    )]
    Authentication { key_id: String, segment: u64 },
    /// More segments than one nonce prefix allows (2^32 segments of 64 KiB).
    #[error("the blob is too large to encrypt under one nonce prefix")]
    TooLarge,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<KeyError> for std::io::Error {
    fn from(error: KeyError) -> std::io::Error {
        match error {
            KeyError::Io(error) => error,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}
