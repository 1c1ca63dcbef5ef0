//! Artifact bytes, content-addressed by sha256.
//!
//! The store is a trait so that object storage can follow; the local
//! directory store writes each upload to a temporary file while hashing it,
//! and only a complete upload whose digest matches the declared one is
//! renamed into place: a reader never sees a half-written artifact.
//!
//! With a key ring (`artifact_key_file` or `SHAMAL_REGISTRY_ARTIFACT_KEYS`)
//! every new blob is written encrypted under the ring's active key in the
//! `shamal_keys::blob` format (AES-256-GCM in 64 KiB segments, its header
//! naming the key id, the artifact's digest bound in as associated data).
//! Reads decrypt under whatever key a blob names, and plaintext blobs
//! written before encryption was turned on stay readable; `rekey`
//! re-encrypts every blob not under the active key. Workers still check
//! the sha256 of the plaintext they receive on every load.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shamal_keys::{BlobEncryptor, BlobHeader, KeyError, KeyRing};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use utoipa::ToSchema;

use crate::error::{RegistryError, Result};

/// A stream of artifact bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// What one re-keying pass did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RekeyReport {
    /// Blobs re-encrypted under the active key (plaintext ones included).
    pub rekeyed: u64,
    /// Blobs that were under the active key already.
    pub already_current: u64,
    /// The key id every blob is now encrypted under.
    pub active_key: String,
}

/// Where artifact bytes live.
pub trait ArtifactStore: Send + Sync {
    /// Stores the bytes of `body` if they hash to `sha256` and are at most
    /// `max_bytes` long; returns their size. Storing an artifact that is
    /// already there succeeds (same digest, same bytes).
    fn put<'a>(
        &'a self,
        sha256: &'a str,
        body: BoxStream<'a, io::Result<Bytes>>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<u64>>;

    /// Size of a stored artifact (of its plaintext), `None` when absent.
    fn size<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<u64>>>;

    /// The bytes of a stored artifact (decrypted), `None` when absent.
    fn open<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<(u64, ByteStream)>>>;

    /// Re-encrypts, one by one, every stored blob that is not under the
    /// active key (plaintext ones included); fails with
    /// `FailedPrecondition` when the store does not encrypt.
    fn rekey(&self) -> BoxFuture<'_, Result<RekeyReport>>;
}

/// Checks that `text` is a lowercase hex sha256 digest.
pub fn validate_sha256(field: &str, text: &str) -> Result<()> {
    if text.len() == 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    {
        Ok(())
    } else {
        Err(RegistryError::invalid(
            field,
            "must be 64 lowercase hexadecimal characters (a sha256 digest)",
        ))
    }
}

/// What `rekey` says when the registry has no key ring.
const ENCRYPTION_OFF: &str = "artifact encryption at rest is off: set artifact_key_file or SHAMAL_REGISTRY_ARTIFACT_KEYS to re-key artifacts";

/// The associated data that binds a blob to the digest it is stored
/// under: a blob moved to another digest's path fails authentication.
fn blob_context(sha256: &str) -> Vec<u8> {
    format!("shamal-registry artifact sha256:{sha256}").into_bytes()
}

/// A stored blob, opened: its file positioned at the first byte after any
/// header, and its plaintext size.
enum Blob {
    Plain {
        file: tokio::fs::File,
        size: u64,
    },
    Encrypted {
        file: tokio::fs::File,
        header: BlobHeader,
        size: u64,
    },
}

impl Blob {
    fn size(&self) -> u64 {
        match self {
            Blob::Plain { size, .. } | Blob::Encrypted { size, .. } => *size,
        }
    }
}

/// Where plaintext on its way into a new blob goes.
enum Sink {
    Plain(tokio::fs::File),
    Encrypted(Box<BlobEncryptor<tokio::fs::File>>),
}

impl Sink {
    async fn create(temp: &Path, keys: Option<&KeyRing>, sha256: &str) -> Result<Sink> {
        let file = tokio::fs::File::create(temp).await?;
        Ok(match keys {
            Some(ring) => Sink::Encrypted(Box::new(
                BlobEncryptor::new(ring, &blob_context(sha256), file)
                    .await
                    .map_err(|error| key_error(sha256, error))?,
            )),
            None => Sink::Plain(file),
        })
    }

    async fn write(&mut self, sha256: &str, chunk: &[u8]) -> Result<()> {
        match self {
            Sink::Plain(file) => file.write_all(chunk).await?,
            Sink::Encrypted(encryptor) => encryptor
                .write(chunk)
                .await
                .map_err(|error| key_error(sha256, error))?,
        }
        Ok(())
    }

    /// Completes the blob and syncs it to disk.
    async fn finish(self, sha256: &str) -> Result<()> {
        let mut file = match self {
            Sink::Plain(file) => file,
            Sink::Encrypted(encryptor) => {
                encryptor
                    .finish()
                    .await
                    .map_err(|error| key_error(sha256, error))?
                    .0
            }
        };
        file.flush().await?;
        file.sync_all().await?;
        Ok(())
    }
}

/// A key or blob-format error about artifact `sha256`. A key id the ring
/// does not hold is the operator's to fix (the message names it); a blob
/// that fails authentication is corrupt or tampered with (internal: its
/// detail goes to the log).
fn key_error(sha256: &str, error: KeyError) -> RegistryError {
    match error {
        KeyError::UnknownKey { .. } => {
            RegistryError::FailedPrecondition(format!("artifact sha256:{sha256}: {error}"))
        }
        KeyError::Io(error) => error.into(),
        error => RegistryError::Internal(format!(
            "artifact sha256:{sha256} cannot be decrypted: {error}"
        )),
    }
}

/// Artifacts in a local directory: `<root>/sha256/<aa>/<digest>`, each
/// blob encrypted when the store has a key ring.
pub struct LocalArtifactStore {
    root: PathBuf,
    keys: Option<Arc<KeyRing>>,
    /// One re-keying pass at a time.
    rekeying: tokio::sync::Mutex<()>,
}

impl LocalArtifactStore {
    /// A store that writes plaintext blobs (and cannot read encrypted ones).
    pub fn new(root: impl Into<PathBuf>) -> io::Result<LocalArtifactStore> {
        let root = root.into();
        std::fs::create_dir_all(root.join("sha256"))?;
        std::fs::create_dir_all(root.join("incoming"))?;
        Ok(LocalArtifactStore {
            root,
            keys: None,
            rekeying: tokio::sync::Mutex::new(()),
        })
    }

    /// Encrypts new blobs under `keys`' active key, and reads blobs under
    /// any of its keys; `None` leaves encryption off.
    pub fn with_keys(mut self, keys: Option<Arc<KeyRing>>) -> LocalArtifactStore {
        self.keys = keys;
        self
    }

    /// The key ring, when encryption is on.
    pub fn keys(&self) -> Option<&KeyRing> {
        self.keys.as_deref()
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(&sha256[..2]).join(sha256)
    }

    fn temp_path(&self, sha256: &str) -> PathBuf {
        self.root
            .join("incoming")
            .join(format!("{sha256}.{}", uuid::Uuid::new_v4()))
    }

    /// Opens a stored blob and reads its header, if any.
    async fn open_blob(&self, sha256: &str) -> Result<Option<Blob>> {
        let mut file = match tokio::fs::File::open(self.path(sha256)).await {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let length = file.metadata().await?.len();
        match BlobHeader::read(&mut file)
            .await
            .map_err(|error| key_error(sha256, error))?
        {
            Ok(header) => {
                let size = shamal_keys::plaintext_len(header.len(), length)
                    .map_err(|error| key_error(sha256, error))?;
                Ok(Some(Blob::Encrypted { file, header, size }))
            }
            Err(_) => {
                file.seek(io::SeekFrom::Start(0)).await?;
                Ok(Some(Blob::Plain { file, size: length }))
            }
        }
    }

    /// The plaintext of an opened blob, each chunk of an encrypted one
    /// authenticated; the first is decrypted before this returns, so that
    /// a wrong key or a tampered start is an error here and not in the
    /// middle of a response.
    async fn plaintext(&self, sha256: &str, blob: Blob) -> Result<ByteStream> {
        let (file, header) = match blob {
            Blob::Plain { file, .. } => {
                return Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
                    file,
                    256 * 1024,
                )));
            }
            Blob::Encrypted { file, header, .. } => (file, header),
        };
        let Some(keys) = self.keys.as_deref() else {
            return Err(RegistryError::FailedPrecondition(format!(
                "artifact sha256:{sha256} is encrypted (key id '{}') but this registry has no artifact key ring: set artifact_key_file or SHAMAL_REGISTRY_ARTIFACT_KEYS",
                header.key_id()
            )));
        };
        let mut stream =
            shamal_keys::decrypt_after_header(keys, &header, &blob_context(sha256), file)
                .map_err(|error| key_error(sha256, error))?;
        let first = match stream.next().await {
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(error)) => return Err(key_error(sha256, error)),
            None => None,
        };
        let named = sha256.to_owned();
        let rest = stream.map(move |chunk| {
            chunk.map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("artifact sha256:{named}: {error}"),
                )
            })
        });
        Ok(Box::pin(futures::stream::iter(first.map(Ok)).chain(rest)))
    }

    async fn put_inner(
        &self,
        sha256: &str,
        mut body: BoxStream<'_, io::Result<Bytes>>,
        max_bytes: u64,
        temp: &Path,
    ) -> Result<u64> {
        let mut sink = Sink::create(temp, self.keys.as_deref(), sha256).await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        // Stored as plaintext, bytes that begin like an encrypted blob
        // would be read back as one: such artifacts need encryption on.
        let mut prefix = Vec::with_capacity(shamal_keys::blob::MAGIC.len());
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|error| {
                RegistryError::invalid("body", format!("upload interrupted: {error}"))
            })?;
            size += chunk.len() as u64;
            if size > max_bytes {
                return Err(RegistryError::PayloadTooLarge(format!(
                    "artifact exceeds the limit of {max_bytes} bytes"
                )));
            }
            if self.keys.is_none() && prefix.len() < prefix.capacity() {
                let take = (prefix.capacity() - prefix.len()).min(chunk.len());
                prefix.extend_from_slice(&chunk[..take]);
                if shamal_keys::is_encrypted(&prefix) {
                    return Err(RegistryError::invalid(
                        "body",
                        "the artifact begins with the registry's encrypted-blob marker; it can only be stored with artifact encryption on",
                    ));
                }
            }
            hasher.update(&chunk);
            sink.write(sha256, &chunk).await?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(RegistryError::DigestMismatch(format!(
                "uploaded bytes hash to sha256 {actual}, not the declared {sha256}"
            )));
        }
        sink.finish(sha256).await?;
        let target = self.path(sha256);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(temp, &target).await?;
        Ok(size)
    }

    /// Re-encrypts blob `sha256` under the active key unless it is under
    /// it already: the plaintext, checked against the digest, goes to a
    /// temporary file that replaces the blob in one rename (a reader has
    /// either file open, both whole). `Some(true)` when re-encrypted,
    /// `Some(false)` when current, `None` when the blob is gone.
    async fn rekey_one(&self, keys: &KeyRing, sha256: &str) -> Result<Option<bool>> {
        let Some(blob) = self.open_blob(sha256).await? else {
            return Ok(None);
        };
        if let Blob::Encrypted { header, .. } = &blob
            && header.key_id() == keys.active_id()
        {
            return Ok(Some(false));
        }
        let size = blob.size();
        let mut plaintext = self.plaintext(sha256, blob).await?;
        let temp = self.temp_path(sha256);
        let result = async {
            let mut sink = Sink::create(&temp, Some(keys), sha256).await?;
            let mut hasher = Sha256::new();
            let mut read: u64 = 0;
            while let Some(chunk) = plaintext.next().await {
                let chunk = chunk.map_err(|error| {
                    RegistryError::Internal(format!(
                        "artifact sha256:{sha256} cannot be read: {error}"
                    ))
                })?;
                read += chunk.len() as u64;
                hasher.update(&chunk);
                sink.write(sha256, &chunk).await?;
            }
            let actual = hex::encode(hasher.finalize());
            if actual != sha256 || read != size {
                return Err(RegistryError::Internal(format!(
                    "stored artifact sha256:{sha256} holds {read} bytes hashing to sha256 {actual}; left as it is"
                )));
            }
            sink.finish(sha256).await?;
            let target = self.path(sha256);
            tokio::fs::rename(&temp, &target).await?;
            if let Some(parent) = target.parent() {
                tokio::fs::File::open(parent).await?.sync_all().await?;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result.map(|()| Some(true))
    }

    /// The digests of every stored blob.
    async fn stored_digests(&self) -> Result<Vec<String>> {
        let mut digests = Vec::new();
        let mut prefixes = tokio::fs::read_dir(self.root.join("sha256")).await?;
        while let Some(prefix) = prefixes.next_entry().await? {
            if !prefix.file_type().await?.is_dir() {
                continue;
            }
            let mut blobs = tokio::fs::read_dir(prefix.path()).await?;
            while let Some(blob) = blobs.next_entry().await? {
                if let Some(name) = blob.file_name().to_str()
                    && validate_sha256("sha256", name).is_ok()
                    && blob.file_type().await?.is_file()
                {
                    digests.push(name.to_owned());
                }
            }
        }
        digests.sort();
        Ok(digests)
    }

    async fn rekey_all(&self) -> Result<RekeyReport> {
        let Some(keys) = self.keys.clone() else {
            return Err(RegistryError::FailedPrecondition(ENCRYPTION_OFF.to_owned()));
        };
        let _one_pass = self.rekeying.lock().await;
        let mut report = RekeyReport {
            rekeyed: 0,
            already_current: 0,
            active_key: keys.active_id().to_owned(),
        };
        let mut failures = Vec::new();
        for sha256 in self.stored_digests().await? {
            match self.rekey_one(&keys, &sha256).await {
                Ok(Some(true)) => report.rekeyed += 1,
                Ok(Some(false)) => report.already_current += 1,
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(%sha256, %error, "cannot re-key artifact");
                    failures.push(format!("sha256:{sha256}: {error}"));
                }
            }
        }
        if !failures.is_empty() {
            // Internal: the detail is logged, one line per blob.
            return Err(RegistryError::Internal(format!(
                "re-keyed {} artifacts ({} already current) but {} could not be: {}",
                report.rekeyed,
                report.already_current,
                failures.len(),
                failures.join("; ")
            )));
        }
        tracing::info!(
            rekeyed = report.rekeyed,
            already_current = report.already_current,
            active_key = %report.active_key,
            "artifacts re-keyed"
        );
        Ok(report)
    }
}

impl ArtifactStore for LocalArtifactStore {
    fn put<'a>(
        &'a self,
        sha256: &'a str,
        body: BoxStream<'a, io::Result<Bytes>>,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            validate_sha256("sha256", sha256)?;
            let temp = self.temp_path(sha256);
            let result = self.put_inner(sha256, body, max_bytes, &temp).await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&temp).await;
            }
            result
        })
    }

    fn size<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<u64>>> {
        Box::pin(async move {
            validate_sha256("sha256", sha256)?;
            Ok(self.open_blob(sha256).await?.map(|blob| blob.size()))
        })
    }

    fn open<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<(u64, ByteStream)>>> {
        Box::pin(async move {
            validate_sha256("sha256", sha256)?;
            let Some(blob) = self.open_blob(sha256).await? else {
                return Ok(None);
            };
            let size = blob.size();
            Ok(Some((size, self.plaintext(sha256, blob).await?)))
        })
    }

    fn rekey(&self) -> BoxFuture<'_, Result<RekeyReport>> {
        Box::pin(self.rekey_all())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body(parts: &[&'static [u8]]) -> BoxStream<'static, io::Result<Bytes>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|part| Ok(Bytes::from_static(part)))
                .collect::<Vec<_>>(),
        )
        .boxed()
    }

    #[tokio::test]
    async fn bytes_that_look_encrypted_need_encryption_on() {
        let mut looks_encrypted = shamal_keys::blob::MAGIC.to_vec();
        looks_encrypted.extend_from_slice(b" and then some bytes");
        let digest = hex::encode(Sha256::digest(&looks_encrypted));
        let split = |bytes: &[u8]| {
            let parts: Vec<io::Result<Bytes>> = bytes
                .chunks(3)
                .map(|part| Ok(Bytes::copy_from_slice(part)))
                .collect();
            futures::stream::iter(parts).boxed()
        };
        let dir = tempfile::tempdir().unwrap();
        let plain = LocalArtifactStore::new(dir.path()).unwrap();
        let error = plain
            .put(&digest, split(&looks_encrypted), 1024)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "invalid_argument", "{error}");
        assert_eq!(plain.size(&digest).await.unwrap(), None);
        let keys = KeyRing::new("k1", [("k1", [7u8; 32].as_slice())]).unwrap();
        let encrypting = LocalArtifactStore::new(dir.path())
            .unwrap()
            .with_keys(Some(Arc::new(keys)));
        encrypting
            .put(&digest, split(&looks_encrypted), 1024)
            .await
            .unwrap();
        let (size, stream) = encrypting.open(&digest).await.unwrap().unwrap();
        let bytes: Vec<Bytes> = stream.map(|chunk| chunk.unwrap()).collect().await;
        assert_eq!(size, looks_encrypted.len() as u64);
        assert_eq!(bytes.concat(), looks_encrypted);
    }

    #[tokio::test]
    async fn stores_verified_bytes_and_refuses_wrong_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalArtifactStore::new(dir.path()).unwrap();
        let digest = hex::encode(Sha256::digest(b"hello world"));
        let size = store
            .put(&digest, body(&[b"hello ", b"world"]), 1024)
            .await
            .unwrap();
        assert_eq!(size, 11);
        assert_eq!(store.size(&digest).await.unwrap(), Some(11));
        let (_, stream) = store.open(&digest).await.unwrap().unwrap();
        let bytes: Vec<Bytes> = stream.map(|chunk| chunk.unwrap()).collect().await;
        assert_eq!(bytes.concat(), b"hello world");

        let wrong = hex::encode(Sha256::digest(b"something else"));
        let error = store
            .put(&wrong, body(&[b"hello world"]), 1024)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "digest_mismatch");
        assert_eq!(store.size(&wrong).await.unwrap(), None);
        // Nothing half-written stays behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("incoming"))
                .unwrap()
                .count(),
            0
        );

        let error = store
            .put(&digest, body(&[b"hello world"]), 4)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "payload_too_large");
        let error = store.size("not-a-digest").await.unwrap_err();
        assert_eq!(error.code(), "invalid_argument");
    }
}
