//! The content-addressed artifact cache: `<sha256>.<format>` files, fetched
//! from the registry, verified while written and renamed into place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use shamal_registry_client::proto::registry_client::RegistryClient;
use shamal_registry_client::proto::{Artifact, FetchArtifactRequest};
use tonic::transport::Channel;

use super::{CALL_TIMEOUT, LoadFailure, blocking};

fn valid_digest(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

fn valid_format(format: &str) -> bool {
    !format.is_empty() && format.bytes().all(|byte| byte.is_ascii_alphanumeric())
}

/// Hashes a file: (lowercase hex sha256, size). Blocking.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// A download in progress; removed when dropped before `keep`.
struct PartialFile {
    path: PathBuf,
    kept: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Idle time allowed between two chunks of an artifact.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// Downloads older than this are leftovers of a process that died.
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

/// Removes leftover downloads (`*.partial`) not written to for an hour.
pub fn clean_partials(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let stale = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > STALE_PARTIAL);
        if stale
            && path
                .extension()
                .is_some_and(|extension| extension == "partial")
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn status_failure(what: &str, status: &tonic::Status) -> LoadFailure {
    let reason = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        tonic::Code::NotFound
        | tonic::Code::InvalidArgument
        | tonic::Code::PermissionDenied
        | tonic::Code::Unimplemented => LoadFailure::permanent(reason),
        _ => LoadFailure::transient(reason),
    }
}

/// Makes the artifact available in the cache and returns its path:
/// `<cache>/<sha256>.<format>` when present and intact (a cached file whose
/// content does not match is deleted and fetched again), otherwise fetched
/// with FetchArtifact into a `.partial` file, hashed while written, checked
/// against the artifact's size and digest, synced and renamed into place.
pub async fn ensure_artifact(
    client: &mut RegistryClient<Channel>,
    cache: &Path,
    artifact: &Artifact,
) -> Result<PathBuf, LoadFailure> {
    let sha256 = artifact.sha256.clone();
    if !valid_digest(&sha256) {
        return Err(LoadFailure::permanent(format!(
            "artifact digest '{sha256}' is not a lowercase hex sha256"
        )));
    }
    if !valid_format(&artifact.format) {
        return Err(LoadFailure::permanent(format!(
            "artifact format '{}' is not valid",
            artifact.format
        )));
    }
    let expected_size = artifact.size_bytes;
    let target = cache.join(format!("{sha256}.{}", artifact.format));

    let cached = target.clone();
    match blocking(move || match hash_file(&cached) {
        Ok(found) => Ok(Some(found)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    })
    .await
    {
        Ok(Some((digest, size))) if digest == sha256 && size == expected_size => {
            tracing::debug!(path = %target.display(), "artifact found in the cache");
            return Ok(target);
        }
        Ok(Some((digest, size))) => {
            tracing::warn!(path = %target.display(), expected = %sha256, %digest, size, "cached artifact is corrupt; fetching it again");
            let _ = std::fs::remove_file(&target);
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(path = %target.display(), %error, "cannot read cached artifact; fetching it again");
            let _ = std::fs::remove_file(&target);
        }
    }

    let directory = cache.to_path_buf();
    blocking(move || std::fs::create_dir_all(&directory))
        .await
        .map_err(|error| {
            LoadFailure::transient(format!(
                "cannot create artifact cache {}: {error}",
                cache.display()
            ))
        })?;
    // One download file per fetch, so that workers sharing a cache never
    // write into each other's file.
    static FETCHES: AtomicU64 = AtomicU64::new(0);
    let partial_path = cache.join(format!(
        "{sha256}.{}.{}-{}.partial",
        artifact.format,
        std::process::id(),
        FETCHES.fetch_add(1, Ordering::Relaxed)
    ));
    let mut partial = PartialFile {
        path: partial_path.clone(),
        kept: false,
    };
    let io_failure = |error: std::io::Error| {
        LoadFailure::transient(format!(
            "cannot write artifact to {}: {error}",
            partial_path.display()
        ))
    };
    let path = partial.path.clone();
    let file = blocking(move || std::fs::File::create(&path))
        .await
        .map_err(io_failure)?;

    let request = FetchArtifactRequest {
        sha256: sha256.clone(),
    };
    let what = format!("cannot fetch artifact {sha256}");
    let mut stream = match tokio::time::timeout(CALL_TIMEOUT, client.fetch_artifact(request)).await
    {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(status_failure(&what, &status)),
        Err(_) => {
            return Err(LoadFailure::transient(format!(
                "{what}: the registry did not answer"
            )));
        }
    };
    let mut sink = Some((file, Sha256::new()));
    let mut received = 0u64;
    loop {
        let chunk = match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(status_failure(&what, &status)),
            Err(_) => {
                return Err(LoadFailure::transient(format!(
                    "{what}: no data for {} s",
                    CHUNK_TIMEOUT.as_secs()
                )));
            }
        };
        received += chunk.data.len() as u64;
        if received > expected_size {
            return Err(LoadFailure::permanent(format!(
                "artifact {sha256} is larger than its registered size of {expected_size} bytes"
            )));
        }
        let Some((mut file, mut hasher)) = sink.take() else {
            break;
        };
        let data = chunk.data;
        sink = Some(
            blocking(move || {
                file.write_all(&data)?;
                hasher.update(&data);
                Ok((file, hasher))
            })
            .await
            .map_err(io_failure)?,
        );
    }
    let Some((file, hasher)) = sink else {
        return Err(LoadFailure::transient(format!(
            "{what}: download interrupted"
        )));
    };
    let digest = hex::encode(hasher.finalize());
    if received != expected_size {
        return Err(LoadFailure::permanent(format!(
            "artifact size mismatch: expected {expected_size} bytes, received {received}"
        )));
    }
    if digest != sha256 {
        return Err(LoadFailure::permanent(format!(
            "artifact digest mismatch: expected sha256 {sha256}, received content with sha256 {digest}"
        )));
    }
    let (from, to) = (partial.path.clone(), target.clone());
    blocking(move || {
        file.sync_all()?;
        drop(file);
        std::fs::rename(&from, &to)?;
        if let Some(parent) = to.parent()
            && let Ok(directory) = std::fs::File::open(parent)
        {
            let _ = directory.sync_all();
        }
        Ok(())
    })
    .await
    .map_err(io_failure)?;
    partial.kept = true;
    tracing::info!(sha256 = %sha256, bytes = received, path = %target.display(), "artifact fetched");
    Ok(target)
}
