//! Locations: local paths (`/data/in`, `file:///data/in`) and S3-compatible
//! object storage (`s3://bucket/prefix`, also spelt `s3a://` as Spark
//! does), mapped to an [`ObjectStore`] and a path in it.
//!
//! S3 settings come from the standard environment (`AWS_ENDPOINT_URL`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP`, ... as `object_store`'s
//! `AmazonS3Builder::from_env` reads them), overridden by the process's
//! [`S3Options`] ([`configure_s3`]: a service's configuration file). One
//! store is kept per bucket and reused.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// S3 settings of this process, over those of the environment. Every field
/// left `None` keeps the environment's value (or `object_store`'s default).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Options {
    /// The endpoint of an S3-compatible server (`http://127.0.0.1:9000`,
    /// `https://minio.internal`); requests are path-style when set.
    /// Unset: `AWS_ENDPOINT_URL`, else AWS's regional endpoint.
    pub endpoint: Option<String>,
    /// The region (`AWS_REGION`; default `us-east-1`).
    pub region: Option<String>,
    /// Allow `http://` endpoints (`AWS_ALLOW_HTTP`).
    pub allow_http: Option<bool>,
    /// Credentials; prefer the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`), a web identity or the instance's role:
    /// the services' configuration files do not carry them.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

struct S3State {
    options: S3Options,
    /// Stores by bucket.
    stores: HashMap<String, Arc<dyn ObjectStore>>,
}

static S3: RwLock<Option<S3State>> = RwLock::new(None);

/// Sets this process's S3 settings (over the environment's) for every
/// location opened from now on. A process that embeds several services
/// (`shamal up`) shares one setting: the last one set.
pub fn configure_s3(options: S3Options) {
    let mut state = S3.write().unwrap_or_else(PoisonError::into_inner);
    *state = Some(S3State {
        options,
        stores: HashMap::new(),
    });
}

/// The store of `bucket`, built on first use.
fn s3_store(location: &str, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    if let Some(state) = S3.read().unwrap_or_else(PoisonError::into_inner).as_ref()
        && let Some(store) = state.stores.get(bucket)
    {
        return Ok(store.clone());
    }
    let mut guard = S3.write().unwrap_or_else(PoisonError::into_inner);
    let state = guard.get_or_insert_with(|| S3State {
        options: S3Options::default(),
        stores: HashMap::new(),
    });
    if let Some(store) = state.stores.get(bucket) {
        return Ok(store.clone());
    }
    let options = &state.options;
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
    if let Some(endpoint) = &options.endpoint {
        builder = builder
            .with_endpoint(endpoint.clone())
            .with_virtual_hosted_style_request(false);
    }
    if let Some(region) = &options.region {
        builder = builder.with_region(region.clone());
    }
    if let Some(allow_http) = options.allow_http {
        builder = builder.with_allow_http(allow_http);
    }
    if let Some(key) = &options.access_key_id {
        builder = builder.with_access_key_id(key.clone());
    }
    if let Some(secret) = &options.secret_access_key {
        builder = builder.with_secret_access_key(secret.clone());
    }
    let store: Arc<dyn ObjectStore> = Arc::new(builder.build().map_err(|error| Error::Store {
        path: location.to_owned(),
        reason: format!("S3 settings: {error}"),
    })?);
    state.stores.insert(bucket.to_owned(), store.clone());
    Ok(store)
}

/// A parsed location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    /// A local path.
    Local(PathBuf),
    /// An object key (or a prefix) in a bucket; `scheme` is `s3` or `s3a`.
    S3 {
        scheme: &'static str,
        bucket: String,
        key: String,
    },
}

impl Location {
    /// Parses `location`: a local path (optionally `file://`), or
    /// `s3://bucket/key` (`s3a://` too). Other schemes are refused with
    /// [`Error::Format`] naming the location.
    pub(crate) fn parse(location: &str) -> Result<Location> {
        let unsupported = |reason: &str| Error::Format {
            path: location.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = location.strip_prefix("file://") {
            return Ok(Location::Local(PathBuf::from(path)));
        }
        for scheme in ["s3", "s3a"] {
            if let Some(rest) = location
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
            {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(unsupported("names no bucket (expected s3://bucket/prefix)"));
                }
                let key = key.trim_matches('/');
                if key
                    .split('/')
                    .any(|part| part.is_empty() || part == "." || part == "..")
                    && !key.is_empty()
                {
                    return Err(unsupported("holds an empty, '.' or '..' path segment"));
                }
                return Ok(Location::S3 {
                    scheme: if scheme == "s3" { "s3" } else { "s3a" },
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                });
            }
        }
        if location.contains("://") {
            return Err(unsupported(
                "unsupported scheme: locations are local paths (or file://) and \
                 S3-compatible object storage (s3://bucket/prefix)",
            ));
        }
        Ok(Location::Local(PathBuf::from(location)))
    }

    /// Whether `location` is an object-store URL (not a local path).
    pub(crate) fn is_remote(&self) -> bool {
        matches!(self, Location::S3 { .. })
    }
}

/// Whether `location` is a location this crate reads and writes: a local
/// path, `file://`, or `s3://` / `s3a://` with a bucket. The error says
/// why not, naming the location.
pub fn check_location(location: &str) -> Result<()> {
    Location::parse(location).map(|_| ())
}

/// Whether `location` names object storage (`s3://`, `s3a://`) rather than
/// a local path.
pub fn is_object_store_url(location: &str) -> bool {
    Location::parse(location).is_ok_and(|location| location.is_remote())
}

/// The store that holds `file` and the file's path in it.
///
/// `file` is a local path (absolute or relative to the working directory,
/// optionally as `file:///...`) or an S3 URL (`s3://bucket/key`). This is
/// the one place that maps locations to stores. Other schemes are refused
/// with [`Error::Format`].
pub fn store_for(file: &str) -> Result<(Arc<dyn ObjectStore>, StorePath)> {
    match Location::parse(file)? {
        Location::Local(local) => {
            let path = StorePath::from_filesystem_path(&local).map_err(|error| Error::Store {
                path: file.to_owned(),
                reason: error.to_string(),
            })?;
            Ok((Arc::new(LocalFileSystem::new()), path))
        }
        Location::S3 { bucket, key, .. } => {
            let store = s3_store(file, &bucket)?;
            let path = StorePath::parse(&key).map_err(|error| Error::Format {
                path: file.to_owned(),
                reason: format!("not a valid object key: {error}"),
            })?;
            Ok((store, path))
        }
    }
}

/// An output location: a local directory or an object-store prefix, where
/// parts, the manifest and `_SUCCESS` are written.
#[derive(Clone)]
pub struct Output {
    location: String,
    kind: OutputKind,
}

#[derive(Clone)]
enum OutputKind {
    Local(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: StorePath,
        /// `s3://bucket/prefix` without a trailing slash.
        base: String,
    },
}

impl fmt::Debug for Output {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Output")
            .field("location", &self.location)
            .finish()
    }
}

impl Output {
    /// The output at `location` (a local directory, `file://`, or
    /// `s3://bucket/prefix`). Nothing is created or read yet.
    pub fn new(location: &str) -> Result<Output> {
        let kind = match Location::parse(location)? {
            Location::Local(dir) => OutputKind::Local(dir),
            Location::S3 {
                scheme,
                bucket,
                key,
            } => {
                let (store, prefix) = store_for(location)?;
                let base = if key.is_empty() {
                    format!("{scheme}://{bucket}")
                } else {
                    format!("{scheme}://{bucket}/{key}")
                };
                OutputKind::Store {
                    store,
                    prefix,
                    base,
                }
            }
        };
        Ok(Output {
            location: location.to_owned(),
            kind,
        })
    }

    /// The location as given.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The local directory, for a local output.
    pub fn local_dir(&self) -> Option<&Path> {
        match &self.kind {
            OutputKind::Local(dir) => Some(dir),
            OutputKind::Store { .. } => None,
        }
    }

    /// The location of file `name` in the output (`/out/part-000001.parquet`,
    /// `s3://bucket/out/part-000001.parquet`).
    pub fn file(&self, name: &str) -> String {
        match &self.kind {
            OutputKind::Local(dir) => dir.join(name).display().to_string(),
            OutputKind::Store { base, .. } => format!("{base}/{name}"),
        }
    }

    pub(crate) fn store_path(&self, name: &str) -> Option<(Arc<dyn ObjectStore>, StorePath)> {
        match &self.kind {
            OutputKind::Local(_) => None,
            OutputKind::Store { store, prefix, .. } => {
                Some((store.clone(), prefix.clone().join(name)))
            }
        }
    }

    fn store_error(&self, name: Option<&str>, error: impl fmt::Display) -> Error {
        Error::Store {
            path: name.map_or_else(|| self.location.clone(), |name| self.file(name)),
            reason: crate::error::one_line(error),
        }
    }

    /// The names of the files directly in the output (none when it does
    /// not exist).
    pub async fn list(&self) -> Result<Vec<String>> {
        match &self.kind {
            OutputKind::Local(dir) => match std::fs::read_dir(dir) {
                Ok(entries) => {
                    let mut names = Vec::new();
                    for entry in entries {
                        let entry = entry.map_err(|source| Error::UnreadablePath {
                            path: self.location.clone(),
                            source,
                        })?;
                        names.push(entry.file_name().to_string_lossy().into_owned());
                    }
                    names.sort();
                    Ok(names)
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(source) => Err(Error::UnreadablePath {
                    path: self.location.clone(),
                    source,
                }),
            },
            OutputKind::Store { store, prefix, .. } => {
                let prefix = (prefix.parts_count() > 0).then_some(prefix);
                let listing = store
                    .list_with_delimiter(prefix)
                    .await
                    .map_err(|error| self.store_error(None, error))?;
                let mut names: Vec<String> = listing
                    .objects
                    .iter()
                    .filter_map(|object| object.location.filename().map(str::to_owned))
                    .chain(
                        listing
                            .common_prefixes
                            .iter()
                            .filter_map(|prefix| prefix.filename().map(|name| format!("{name}/"))),
                    )
                    .collect();
                names.sort();
                Ok(names)
            }
        }
    }

    /// Checks that the output is empty or absent: an error naming the
    /// location and one of the files otherwise (and when it cannot be
    /// listed: a missing bucket, an unreachable endpoint).
    pub async fn check_empty(&self) -> Result<()> {
        let names = self.list().await?;
        if let Some(first) = names.first() {
            return Err(Error::Format {
                path: self.location.clone(),
                reason: format!(
                    "is not empty (it holds '{first}'{}); outputs must be empty or absent",
                    if names.len() > 1 {
                        format!(" and {} more", names.len() - 1)
                    } else {
                        String::new()
                    }
                ),
            });
        }
        Ok(())
    }

    /// Creates a local output directory (object-store prefixes need none).
    pub async fn create(&self) -> Result<()> {
        if let OutputKind::Local(dir) = &self.kind {
            std::fs::create_dir_all(dir).map_err(|source| Error::Write {
                path: self.location.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether file `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool> {
        match &self.kind {
            OutputKind::Local(dir) => Ok(dir.join(name).is_file()),
            OutputKind::Store { store, prefix, .. } => {
                match store.head(&prefix.clone().join(name)).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(error) => Err(self.store_error(Some(name), error)),
                }
            }
        }
    }

    /// The whole of file `name`.
    pub async fn read(&self, name: &str) -> Result<bytes::Bytes> {
        match &self.kind {
            OutputKind::Local(dir) => {
                let path = dir.join(name);
                std::fs::read(&path)
                    .map(bytes::Bytes::from)
                    .map_err(|source| Error::UnreadablePath {
                        path: path.display().to_string(),
                        source,
                    })
            }
            OutputKind::Store { store, prefix, .. } => {
                let result = store
                    .get(&prefix.clone().join(name))
                    .await
                    .map_err(|error| self.store_error(Some(name), error))?;
                result
                    .bytes()
                    .await
                    .map_err(|error| self.store_error(Some(name), error))
            }
        }
    }

    /// The key id in the header of file `name` when it is an encrypted
    /// blob (`shamal-keys` format), `None` when it is not one.
    pub async fn blob_key_id(&self, name: &str) -> Result<Option<String>> {
        let wanted = shamal_keys::blob::MAX_HEADER_BYTES as u64;
        let head = match &self.kind {
            OutputKind::Local(dir) => {
                use std::io::Read;
                let path = dir.join(name);
                let unreadable = |source| Error::UnreadablePath {
                    path: path.display().to_string(),
                    source,
                };
                let file = std::fs::File::open(&path).map_err(unreadable)?;
                let mut head = Vec::new();
                file.take(wanted)
                    .read_to_end(&mut head)
                    .map_err(unreadable)?;
                bytes::Bytes::from(head)
            }
            OutputKind::Store { store, prefix, .. } => {
                let path = prefix.clone().join(name);
                let meta = store
                    .head(&path)
                    .await
                    .map_err(|error| self.store_error(Some(name), error))?;
                store
                    .get_range(&path, 0..meta.size.min(wanted))
                    .await
                    .map_err(|error| self.store_error(Some(name), error))?
            }
        };
        shamal_keys::BlobHeader::parse(&head)
            .map(|header| header.map(|header| header.key_id().to_owned()))
            .map_err(|error| Error::Encryption {
                path: self.file(name),
                reason: error.to_string(),
            })
    }

    /// SHA-256 (lower-case hex) and size of file `name` as stored, read as
    /// a stream.
    pub async fn hash(&self, name: &str) -> Result<(String, u64)> {
        use futures::StreamExt;
        use sha2::{Digest, Sha256};
        match &self.kind {
            OutputKind::Local(dir) => {
                let path = dir.join(name);
                tokio::task::spawn_blocking(move || crate::output::hash_file(&path))
                    .await
                    .map_err(|error| self.store_error(Some(name), error))?
            }
            OutputKind::Store { store, prefix, .. } => {
                let result = store
                    .get(&prefix.clone().join(name))
                    .await
                    .map_err(|error| self.store_error(Some(name), error))?;
                let mut stream = result.into_stream();
                let mut hasher = Sha256::new();
                let mut bytes = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|error| self.store_error(Some(name), error))?;
                    hasher.update(&chunk);
                    bytes += chunk.len() as u64;
                }
                Ok((hex::encode(hasher.finalize()), bytes))
            }
        }
    }

    /// Writes `data` as file `name`, whole and atomically: a temporary
    /// name renamed into place locally, one PUT on object storage.
    pub async fn put(&self, name: &str, data: bytes::Bytes) -> Result<()> {
        match &self.kind {
            OutputKind::Local(dir) => {
                let dir = dir.clone();
                let name = name.to_owned();
                tokio::task::spawn_blocking(move || crate::output::write_atomic(&dir, &name, &data))
                    .await
                    .map_err(|error| self.store_error(None, error))?
            }
            OutputKind::Store { store, prefix, .. } => store
                .put(&prefix.clone().join(name), data.into())
                .await
                .map(|_| ())
                .map_err(|error| Error::Write {
                    path: self.file(name),
                    source: std::io::Error::other(error),
                }),
        }
    }

    /// Removes file `name` (absent: nothing to do).
    pub async fn delete(&self, name: &str) -> Result<()> {
        match &self.kind {
            OutputKind::Local(dir) => match std::fs::remove_file(dir.join(name)) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::Write {
                    path: self.file(name),
                    source,
                }),
            },
            OutputKind::Store { store, prefix, .. } => {
                match store.delete(&prefix.clone().join(name)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(error) => Err(Error::Write {
                        path: self.file(name),
                        source: std::io::Error::other(error),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_other_schemes_are_refused() {
        assert_eq!(
            Location::parse("/data/in").ok(),
            Some(Location::Local(PathBuf::from("/data/in")))
        );
        assert_eq!(
            Location::parse("file:///data/in").ok(),
            Some(Location::Local(PathBuf::from("/data/in")))
        );
        assert_eq!(
            Location::parse("s3://bucket/a/b/").ok(),
            Some(Location::S3 {
                scheme: "s3",
                bucket: "bucket".to_owned(),
                key: "a/b".to_owned()
            })
        );
        assert_eq!(
            Location::parse("s3a://bucket").ok(),
            Some(Location::S3 {
                scheme: "s3a",
                bucket: "bucket".to_owned(),
                key: String::new()
            })
        );
        for bad in [
            "gs://bucket/x",
            "http://host/x",
            "s3:///x",
            "s3://b/a//c",
            "s3://b/../c",
        ] {
            let error = Location::parse(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(bad), "{bad}: {error}");
        }
        assert!(is_object_store_url("s3://b/x"));
        assert!(!is_object_store_url("/b/x"));
    }

    #[test]
    fn secrets_are_not_printed() {
        let options = S3Options {
            secret_access_key: Some("very-secret".to_owned()),
            ..S3Options::default()
        };
        assert!(!format!("{options:?}").contains("very-secret"));
    }
}
