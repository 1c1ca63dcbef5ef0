//! Ed25519 keys: [`Signer`] (the audit service's signing key) and
//! [`PublicKey`] (what a verifier needs).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rand::RngCore as _;
use zeroize::Zeroizing;

use crate::signed::{checkpoint_bytes, seal_bytes, tombstone_bytes};
use crate::{Checkpoint, Digest, Seal, Tombstone};

/// A key could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file: missing, unreadable, not private, or not writable.
    #[error("key file {}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Not a key of the expected encoding.
    #[error("invalid key: {0}")]
    Invalid(String),
}

/// A signed statement failed verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Signed by another key (its `key_id` is not this key's).
    #[error("signed by key {found}, not by the expected key {expected}")]
    WrongKey {
        /// This key's id.
        expected: String,
        /// The statement's `key_id`.
        found: String,
    },
    /// The signature does not verify: the statement was altered or forged.
    #[error("invalid {what} signature: {message}")]
    BadSignature {
        /// "checkpoint", "tombstone" or "seal".
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// An Ed25519 signing key. Its `Debug` shows only the key id.
pub struct Signer {
    key: SigningKey,
    key_id: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// An Ed25519 verifying (public) key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

fn file_error(path: &Path, message: impl Into<String>) -> KeyError {
    KeyError::File {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl Signer {
    fn from_key(key: SigningKey) -> Signer {
        let key_id = key_id_of(&key.verifying_key());
        Signer { key, key_id }
    }

    /// A new random key (from the operating system's entropy through
    /// `rand`'s thread-local CSPRNG).
    pub fn generate() -> Signer {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(seed.as_mut());
        Signer::from_key(SigningKey::from_bytes(&seed))
    }

    /// The raw 32-byte secret seed (RFC 8032), e.g. for tests.
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        Signer::from_key(SigningKey::from_bytes(seed))
    }

    /// Parses a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<Signer, KeyError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Signer::from_key)
            .map_err(|error| {
                KeyError::Invalid(format!("not an Ed25519 PKCS#8 PEM private key: {error}"))
            })
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| Zeroizing::new(pem.to_string()))
            .map_err(|error| KeyError::Invalid(format!("cannot encode the key as PKCS#8: {error}")))
    }

    /// Loads the PKCS#8 PEM key at `path`, or, when there is no file there,
    /// creates a new key in it (parent directories included, the file with
    /// mode 0600, never overwriting one that appears meanwhile). An existing
    /// file readable or writable by group or others is refused.
    pub fn load_or_create(path: &Path) -> Result<Signer, KeyError> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Signer::load(path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let signer = Signer::generate();
                match signer.create(path) {
                    Ok(()) => Ok(signer),
                    // Created by someone else in between: use theirs.
                    Err(CreateError::Exists) => Signer::load(path),
                    Err(CreateError::Key(error)) => Err(error),
                }
            }
            Err(error) => Err(file_error(path, format!("cannot read it: {error}"))),
        }
    }

    /// Loads the PKCS#8 PEM key at `path`, which must be private (no access
    /// for group or others).
    pub fn load(path: &Path) -> Result<Signer, KeyError> {
        let metadata = std::fs::metadata(path)
            .map_err(|error| file_error(path, format!("cannot read it: {error}")))?;
        if !metadata.is_file() {
            return Err(file_error(path, "is not a regular file"));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(file_error(
                    path,
                    format!(
                        "is accessible by group or others (mode {mode:04o}); a signing key must be private: chmod 600 {}",
                        path.display()
                    ),
                ));
            }
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|error| file_error(path, format!("cannot read it: {error}")))?,
        );
        Signer::from_pem(&text).map_err(|error| file_error(path, error.to_string()))
    }

    fn create(&self, path: &Path) -> Result<(), CreateError> {
        let pem = self.to_pem().map_err(CreateError::Key)?;
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(parent).map_err(|error| {
                CreateError::Key(file_error(
                    path,
                    format!("cannot create its directory: {error}"),
                ))
            })?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::AlreadyExists {
                CreateError::Exists
            } else {
                CreateError::Key(file_error(path, format!("cannot create it: {error}")))
            }
        })?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|error| {
                CreateError::Key(file_error(path, format!("cannot write it: {error}")))
            })
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
        }
    }

    /// The public key's id ([`PublicKey::key_id`]).
    pub fn key_id(&self) -> String {
        self.key_id.clone()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    /// Signs "the chain up to `seq` ends in `head_hash`".
    pub fn checkpoint(&self, seq: u64, head_hash: Digest, signed_at_ms: i64) -> Checkpoint {
        let signature = self.sign(&checkpoint_bytes(
            seq,
            &head_hash,
            signed_at_ms,
            &self.key_id,
        ));
        Checkpoint {
            seq,
            head_hash,
            signed_at_ms,
            key_id: self.key_id.clone(),
            signature,
        }
    }

    /// Signs "records `first_seq..=last_seq` were removed; record `last_seq`'s
    /// hash was `last_hash`".
    pub fn tombstone(
        &self,
        first_seq: u64,
        last_seq: u64,
        last_hash: Digest,
        removed_at_ms: i64,
    ) -> Tombstone {
        let signature = self.sign(&tombstone_bytes(
            first_seq,
            last_seq,
            &last_hash,
            removed_at_ms,
            &self.key_id,
        ));
        Tombstone {
            first_seq,
            last_seq,
            last_hash,
            removed_at_ms,
            key_id: self.key_id.clone(),
            signature,
        }
    }

    /// Signs an export's seal.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        &self,
        since_ms: i64,
        until_ms: i64,
        first_seq: u64,
        last_seq: u64,
        first_prev_hash: Digest,
        last_hash: Digest,
        records: u64,
        signed_at_ms: i64,
    ) -> Seal {
        let signature = self.sign(&seal_bytes(
            since_ms,
            until_ms,
            first_seq,
            last_seq,
            &first_prev_hash,
            &last_hash,
            records,
            signed_at_ms,
            &self.key_id,
        ));
        Seal {
            since_ms,
            until_ms,
            first_seq,
            last_seq,
            first_prev_hash,
            last_hash,
            records,
            signed_at_ms,
            key_id: self.key_id.clone(),
            signature,
        }
    }
}

enum CreateError {
    Exists,
    Key(KeyError),
}

fn key_id_of(key: &VerifyingKey) -> String {
    let mut id = Digest::of(key.as_bytes()).to_hex();
    id.truncate(16);
    id
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &str) -> Result<PublicKey, KeyError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(|key| PublicKey { key })
            .map_err(|error| KeyError::Invalid(format!("not an Ed25519 public key PEM: {error}")))
    }

    /// The key as SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        // Encoding a valid 32-byte key cannot fail.
        self.key
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default()
    }

    /// The raw 32-byte key.
    pub fn from_bytes(bytes: &[u8]) -> Result<PublicKey, KeyError> {
        let bytes: &[u8; 32] = bytes.try_into().map_err(|_| {
            KeyError::Invalid(format!(
                "an Ed25519 public key is 32 bytes, not {}",
                bytes.len()
            ))
        })?;
        VerifyingKey::from_bytes(bytes)
            .map(|key| PublicKey { key })
            .map_err(|error| KeyError::Invalid(format!("not an Ed25519 public key: {error}")))
    }

    /// The raw 32-byte key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The first 16 hex characters of the SHA-256 of the raw 32-byte key.
    pub fn key_id(&self) -> String {
        key_id_of(&self.key)
    }

    fn verify(
        &self,
        what: &'static str,
        key_id: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), VerifyError> {
        let expected = self.key_id();
        if key_id != expected {
            return Err(VerifyError::WrongKey {
                expected,
                found: key_id.to_owned(),
            });
        }
        let signature = ed25519_dalek::Signature::from_slice(signature).map_err(|_| {
            VerifyError::BadSignature {
                what,
                message: format!("{} bytes, an Ed25519 signature is 64", signature.len()),
            }
        })?;
        self.key
            .verify_strict(message, &signature)
            .map_err(|_| VerifyError::BadSignature {
                what,
                message: "does not match its contents".to_owned(),
            })
    }

    /// Checks a checkpoint's key id and signature.
    pub fn verify_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), VerifyError> {
        self.verify(
            "checkpoint",
            &checkpoint.key_id,
            &checkpoint.signed_bytes(),
            &checkpoint.signature,
        )
    }

    /// Checks a tombstone's key id and signature.
    pub fn verify_tombstone(&self, tombstone: &Tombstone) -> Result<(), VerifyError> {
        self.verify(
            "tombstone",
            &tombstone.key_id,
            &tombstone.signed_bytes(),
            &tombstone.signature,
        )
    }

    /// Checks a seal's key id and signature.
    pub fn verify_seal(&self, seal: &Seal) -> Result<(), VerifyError> {
        self.verify("seal", &seal.key_id, &seal.signed_bytes(), &seal.signature)
    }
}

/// Loads a public key file: SubjectPublicKeyInfo PEM, or the raw key as 64
/// hex characters (surrounding white space ignored).
pub fn load_public_key(path: &Path) -> Result<PublicKey, KeyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| file_error(path, format!("cannot read it: {error}")))?;
    let trimmed = text.trim();
    let parsed = if trimmed.starts_with("-----BEGIN") {
        PublicKey::from_pem(trimmed)
    } else if trimmed.len() == 64 {
        hex::decode(trimmed)
            .map_err(|error| KeyError::Invalid(format!("not 64 hex characters: {error}")))
            .and_then(|bytes| PublicKey::from_bytes(&bytes))
    } else {
        Err(KeyError::Invalid(
            "expected a PEM public key (-----BEGIN PUBLIC KEY-----) or 64 hex characters"
                .to_owned(),
        ))
    };
    parsed.map_err(|error| file_error(path, error.to_string()))
}
