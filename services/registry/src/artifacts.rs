//! Artifact bytes, content-addressed by sha256.
//!
//! The store is a trait so that object storage can follow; the local
//! directory store writes each upload to a temporary file while hashing it,
//! and only a complete upload whose digest matches the declared one is
//! renamed into place: a reader never sees a half-written artifact.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{RegistryError, Result};

/// A stream of artifact bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

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

    /// Size of a stored artifact, `None` when absent.
    fn size<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<u64>>>;

    /// The bytes of a stored artifact, `None` when absent.
    fn open<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<(u64, ByteStream)>>>;
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

/// Artifacts in a local directory: `<root>/sha256/<aa>/<digest>`.
pub struct LocalArtifactStore {
    root: PathBuf,
}

impl LocalArtifactStore {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<LocalArtifactStore> {
        let root = root.into();
        std::fs::create_dir_all(root.join("sha256"))?;
        std::fs::create_dir_all(root.join("incoming"))?;
        Ok(LocalArtifactStore { root })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(&sha256[..2]).join(sha256)
    }

    async fn put_inner(
        &self,
        sha256: &str,
        mut body: BoxStream<'_, io::Result<Bytes>>,
        max_bytes: u64,
        temp: &Path,
    ) -> Result<u64> {
        let mut file = tokio::fs::File::create(temp).await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
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
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(RegistryError::DigestMismatch(format!(
                "uploaded bytes hash to sha256 {actual}, not the declared {sha256}"
            )));
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        let target = self.path(sha256);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(temp, &target).await?;
        Ok(size)
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
            let temp = self
                .root
                .join("incoming")
                .join(format!("{sha256}.{}", uuid::Uuid::new_v4()));
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
            match tokio::fs::metadata(self.path(sha256)).await {
                Ok(metadata) => Ok(Some(metadata.len())),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(error.into()),
            }
        })
    }

    fn open<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, Result<Option<(u64, ByteStream)>>> {
        Box::pin(async move {
            validate_sha256("sha256", sha256)?;
            let file = match tokio::fs::File::open(self.path(sha256)).await {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            let size = file.metadata().await?.len();
            let stream: ByteStream = Box::pin(tokio_util::io::ReaderStream::with_capacity(
                file,
                256 * 1024,
            ));
            Ok(Some((size, stream)))
        })
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
