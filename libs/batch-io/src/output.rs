//! Output parts (one Parquet file per shard) and the manifest.
//!
//! Layout of an output directory:
//!
//! ```text
//! part-000000.parquet     one per shard: key columns, then model outputs
//! part-000001.parquet
//! _manifest.json          written last: parts, row counts, SHA-256, model
//! _SUCCESS                empty, after the manifest
//! ```
//!
//! Parts are written whole: locally to a hidden temporary name
//! (`.part-000001.parquet.tmp-<random>`) renamed into place, on object
//! storage staged in a local temporary file and uploaded as one object (a
//! single PUT, or a multipart upload that completes at once), so a re-run
//! shard replaces its part whole and readers never see half a file.
//! pyarrow, DuckDB and Spark skip names starting with `.` or `_`, so the
//! directory reads as one dataset of the parts.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use shamal_keys::KeyRing;

use crate::error::{Error, Result};
use crate::location::Output;

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "_manifest.json";
/// The empty marker written after the manifest.
pub const SUCCESS_FILE: &str = "_SUCCESS";
/// The manifest format this crate writes.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// The part file name of shard `index`: `part-000042.parquet`.
pub fn part_name(index: usize) -> String {
    format!("part-{index:06}.parquet")
}

/// What an encrypted part's name ends with, after `.parquet`.
pub const ENCRYPTED_SUFFIX: &str = ".enc";

/// The encrypted part file name of shard `index`:
/// `part-000042.parquet.enc`.
pub fn encrypted_part_name(index: usize) -> String {
    format!("part-{index:06}.parquet{ENCRYPTED_SUFFIX}")
}

/// The associated data an encrypted part is bound to: its job and its name
/// (`shamal-batch-part:<job_id>/<part name>`), so that a part moved to
/// another name or another job's output fails to decrypt.
pub fn part_context(job_id: &str, name: &str) -> Vec<u8> {
    format!("shamal-batch-part:{job_id}/{name}").into_bytes()
}

/// How parts are encrypted at rest: AES-256-GCM in the blob format of
/// `shamal-keys` (64 KiB STREAM segments, header naming the key id), under
/// a key of `ring` (`key_id`, or the ring's active key), bound to the
/// job's id and the part's name ([`part_context`]).
#[derive(Clone, Debug)]
pub struct PartEncryption {
    pub ring: Arc<KeyRing>,
    /// `None`: the ring's active key.
    pub key_id: Option<String>,
    pub job_id: String,
}

impl PartEncryption {
    /// The id of the key parts are encrypted under.
    pub fn key_id(&self) -> &str {
        self.key_id.as_deref().unwrap_or(self.ring.active_id())
    }
}

/// What the manifest of an encrypted output records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEncryption {
    /// `AES-256-GCM`.
    pub cipher: String,
    /// `shamal-blob-v1`: the `shamal-keys` blob format.
    pub format: String,
    /// The ids of the keys the parts are encrypted under (each part names
    /// its own in `key_id`), sorted.
    pub key_ids: Vec<String>,
    /// The associated data of each part, `{job_id}` and `{name}` standing
    /// for the job's id and the part's name.
    pub context: String,
}

impl ManifestEncryption {
    /// The record of `parts`, encrypted under the key ids they name.
    pub fn of(parts: &[PartInfo]) -> ManifestEncryption {
        let mut key_ids: Vec<String> = parts
            .iter()
            .filter_map(|part| part.key_id.clone())
            .collect();
        key_ids.sort();
        key_ids.dedup();
        ManifestEncryption {
            cipher: "AES-256-GCM".to_owned(),
            format: format!("shamal-blob-v{}", shamal_keys::blob::VERSION),
            key_ids,
            context: "shamal-batch-part:{job_id}/{name}".to_owned(),
        }
    }
}

/// A finished part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// File name in the output directory.
    pub name: String,
    pub rows: u64,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
    /// The id of the key an encrypted part is encrypted under; `None` for
    /// a plaintext part. The checksum and size are those of the bytes as
    /// stored (encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// Counts and hashes what goes through to the file.
struct HashingFile {
    file: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.file.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes one shard's output part.
///
/// ```no_run
/// # async fn example(keys: arrow::record_batch::RecordBatch, outputs: Vec<(String, arrow::array::ArrayRef)>) -> shamal_batch_io::Result<()> {
/// use shamal_batch_io::{Output, PartWriter};
/// let output = Output::new("s3://bucket/scores")?; // or a local directory
/// let batch = PartWriter::batch(&keys, outputs)?;
/// let mut writer = PartWriter::create(&output, 7, batch.schema())?;
/// writer.write(&batch)?;
/// let part = writer.finish().await?; // s3://bucket/scores/part-000007.parquet
/// # Ok(()) }
/// ```
///
/// The Parquet file is built in a local temporary file (in the output
/// directory for a local output, in the system's temporary directory for
/// object storage); [`PartWriter::close`] finishes it (synchronous: the
/// CPU-bound part) and [`StagedPart::commit`] puts it in place (a rename,
/// or one upload). Dropped before then, it removes its temporary file and
/// leaves any earlier part of the shard as it was.
pub struct PartWriter {
    output: Output,
    name: String,
    staging: PathBuf,
    writer: Option<ArrowWriter<HashingFile>>,
    rows: u64,
    encryption: Option<PartEncryption>,
}

impl PartWriter {
    /// The output batch of `keys` (the key columns of the input rows, with
    /// their types) followed by `outputs` (from
    /// [`crate::outputs_to_columns`]), which must have as many rows.
    pub fn batch(keys: &RecordBatch, outputs: Vec<(String, ArrayRef)>) -> Result<RecordBatch> {
        let mut fields: Vec<Arc<Field>> = keys.schema().fields().iter().cloned().collect();
        let mut columns: Vec<ArrayRef> = keys.columns().to_vec();
        for (name, array) in outputs {
            if fields.iter().any(|field| field.name() == &name) {
                return Err(Error::BadOutput {
                    output: name,
                    reason: "has the name of a key column".to_owned(),
                });
            }
            if array.len() != keys.num_rows() {
                return Err(Error::BadOutput {
                    output: name,
                    reason: format!(
                        "{} rows for a batch of {} rows",
                        array.len(),
                        keys.num_rows()
                    ),
                });
            }
            fields.push(Arc::new(Field::new(name, array.data_type().clone(), true)));
            columns.push(array);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|error| {
            Error::BadOutput {
                output: "*".to_owned(),
                reason: error.to_string(),
            }
        })
    }

    /// Starts the part of shard `shard_index` in `output` (a local
    /// directory is created if missing), with columns `schema`
    /// (Snappy-compressed Parquet).
    pub fn create(output: &Output, shard_index: usize, schema: SchemaRef) -> Result<PartWriter> {
        PartWriter::create_with(output, shard_index, schema, None)
    }

    /// [`PartWriter::create`], the part encrypted at rest when
    /// `encryption` is given (named `part-000042.parquet.enc`, see
    /// [`PartEncryption`]). The key is checked here: a ring without the
    /// key id fails before anything is written.
    pub fn create_with(
        output: &Output,
        shard_index: usize,
        schema: SchemaRef,
        encryption: Option<PartEncryption>,
    ) -> Result<PartWriter> {
        let write_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Write { path, source }
        };
        let name = match &encryption {
            Some(encryption) => {
                if !encryption.ring.contains(encryption.key_id()) {
                    return Err(Error::Encryption {
                        path: output.file(&encrypted_part_name(shard_index)),
                        reason: format!(
                            "the key ring holds no key '{}' (its keys: {})",
                            encryption.key_id(),
                            encryption.ring.key_ids().collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
                encrypted_part_name(shard_index)
            }
            None => part_name(shard_index),
        };
        if let Some(dir) = output.local_dir() {
            std::fs::create_dir_all(dir).map_err(write_error(dir))?;
        }
        let staging = staging_path(output, &name);
        let file = File::create(&staging).map_err(write_error(&staging))?;
        let sink = HashingFile {
            file: BufWriter::new(file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let properties = part_writer_properties(&schema);
        let writer = match ArrowWriter::try_new(sink, schema, Some(properties)) {
            Ok(writer) => writer,
            Err(error) => {
                let _ = std::fs::remove_file(&staging);
                return Err(Error::Write {
                    path: staging.display().to_string(),
                    source: std::io::Error::other(error),
                });
            }
        };
        Ok(PartWriter {
            output: output.clone(),
            name,
            staging,
            writer: Some(writer),
            rows: 0,
            encryption,
        })
    }

    fn parquet_error(&self, error: parquet::errors::ParquetError) -> Error {
        Error::Write {
            path: self.staging.display().to_string(),
            source: std::io::Error::other(error),
        }
    }

    /// Appends `batch` (of the schema the writer was created with).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        match writer.write(batch) {
            Ok(()) => {
                self.rows += batch.num_rows() as u64;
                Ok(())
            }
            Err(error) => Err(self.parquet_error(error)),
        }
    }

    /// Finishes the Parquet file in its temporary place and syncs it; the
    /// part is not in the output until [`StagedPart::commit`].
    pub fn close(mut self) -> Result<StagedPart> {
        let Some(writer) = self.writer.take() else {
            return Err(self.parquet_error(parquet::errors::ParquetError::General(
                "already finished".to_owned(),
            )));
        };
        // From here the staged part owns (and on failure removes) the file.
        let mut staged = StagedPart {
            output: self.output.clone(),
            name: self.name.clone(),
            staging: Some(self.staging.clone()),
            rows: self.rows,
            sha256: String::new(),
            bytes: 0,
            encryption: self.encryption.take(),
        };
        let sink = writer
            .into_inner()
            .map_err(|error| self.parquet_error(error))?;
        let HashingFile {
            file,
            hasher,
            bytes,
        } = sink;
        let write_error = |source| Error::Write {
            path: self.staging.display().to_string(),
            source,
        };
        let file = file
            .into_inner()
            .map_err(|error| write_error(error.into_error()))?;
        file.sync_all().map_err(write_error)?;
        staged.sha256 = hex::encode(hasher.finalize());
        staged.bytes = bytes;
        Ok(staged)
    }

    /// [`PartWriter::close`], then [`StagedPart::commit`]: the part is in
    /// place, replacing an earlier part of the same shard.
    pub async fn finish(self) -> Result<PartInfo> {
        self.close()?.commit().await
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

/// A finished part in its temporary place, to be committed to the output.
/// Dropped uncommitted, it removes its temporary file.
pub struct StagedPart {
    output: Output,
    name: String,
    staging: Option<PathBuf>,
    rows: u64,
    sha256: String,
    bytes: u64,
    encryption: Option<PartEncryption>,
}

/// A fresh temporary file for part `name` of `output`: hidden in the
/// output directory (renamed into place from there), or in the system's
/// temporary directory for object storage (uploaded from there).
pub(crate) fn staging_path(output: &Output, name: &str) -> PathBuf {
    let random = uuid::Uuid::new_v4().simple();
    match output.local_dir() {
        Some(dir) => dir.join(format!(".{name}{TEMPORARY_MARKER}{random}")),
        None => std::env::temp_dir().join(format!(".shamal-{name}{TEMPORARY_MARKER}{random}")),
    }
}

/// What separates a part's name from the random suffix in the name of its
/// temporary file (`.part-000001.parquet.tmp-<32 hex>`).
const TEMPORARY_MARKER: &str = ".tmp-";
/// What an encrypted part's temporary file ends with while it is sealed
/// (`.part-000001.parquet.enc.tmp-<32 hex>.sealed`).
const SEALED_SUFFIX: &str = ".sealed";

/// Whether `name` is the name of a temporary file that [`PartWriter`] (or
/// [`StagedPart::commit`] sealing an encrypted part) leaves in a local
/// output directory when its process dies before the rename:
/// `.<part name>.tmp-<32 hex digits>`, optionally followed by `.sealed`.
/// Nothing else matches (the manifest's own temporary files, parts, other
/// hidden files).
pub fn is_temporary_part_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((part, random)) = rest.rsplit_once(TEMPORARY_MARKER) else {
        return false;
    };
    let random = random.strip_suffix(SEALED_SUFFIX).unwrap_or(random);
    is_part_name(part) && random.len() == 32 && random.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes the temporary part files ([`is_temporary_part_name`]) of a
/// local output directory, returning their names. Meant for a finished job
/// (after its manifest is written, so that a writer still running sees
/// `_SUCCESS` and never commits, see [`StagedPart::commit_unless_finished`]):
/// it removes what writers killed mid-shard left. Object-store outputs
/// have none (a part is staged in the local temporary directory of its
/// worker and put as one object), so nothing is done there.
pub async fn remove_temporary_parts(output: &Output) -> Result<Vec<String>> {
    let Some(dir) = output.local_dir().map(Path::to_path_buf) else {
        return Ok(Vec::new());
    };
    tokio::task::spawn_blocking(move || {
        let unreadable = |source| Error::UnreadablePath {
            path: dir.display().to_string(),
            source,
        };
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(error) => return Err(unreadable(error)),
        };
        for entry in entries {
            let entry = entry.map_err(unreadable)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_temporary_part_name(&name) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed.push(name),
                // Its live writer removed it first.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Write {
                        path: entry.path().display().to_string(),
                        source,
                    });
                }
            }
        }
        removed.sort();
        Ok(removed)
    })
    .await
    .map_err(|error| Error::Write {
        path: output.location().to_owned(),
        source: std::io::Error::other(error),
    })?
}

/// Holds back [`StagedPart::commit_unless_finished`] in a local output
/// directory while held (an exclusive `flock` of the directory; commits
/// take it shared), so that the parts checked against the workers'
/// reports are still those parts when the manifest is written. Released
/// when dropped. Object-store outputs have no fence (nothing is held).
pub struct CommitFence {
    _dir: Option<File>,
}

impl CommitFence {
    /// Takes the fence of `output`, waiting for commits in progress.
    pub async fn take(output: &Output) -> Result<CommitFence> {
        let Some(dir) = output.local_dir().map(Path::to_path_buf) else {
            return Ok(CommitFence { _dir: None });
        };
        let file = tokio::task::spawn_blocking(move || {
            let locked = File::open(&dir).and_then(|file| file.lock().map(|()| file));
            locked.map_err(|source| Error::Write {
                path: dir.display().to_string(),
                source,
            })
        })
        .await
        .map_err(|error| Error::Write {
            path: output.location().to_owned(),
            source: std::io::Error::other(error),
        })??;
        Ok(CommitFence { _dir: Some(file) })
    }
}

impl StagedPart {
    /// The plaintext part `name` of `output` in local file `staging`
    /// (from [`staging_path`]), of `rows` rows, `bytes` bytes and SHA-256
    /// `sha256`.
    pub(crate) fn plaintext(
        output: &Output,
        name: &str,
        staging: PathBuf,
        rows: u64,
        sha256: String,
        bytes: u64,
    ) -> StagedPart {
        StagedPart {
            output: output.clone(),
            name: name.to_owned(),
            staging: Some(staging),
            rows,
            sha256,
            bytes,
            encryption: None,
        }
    }

    /// Its rows.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Puts the part in place, replacing an earlier part of the same shard
    /// whole: a rename in a local directory (then the directory synced), an
    /// upload of the whole file on object storage (the object appears
    /// only once complete).
    pub async fn commit(self) -> Result<PartInfo> {
        let path = self.output.file(&self.name);
        self.commit_inner(false).await?.ok_or_else(|| Error::Write {
            path,
            source: std::io::Error::other("the part was not committed"),
        })
    }

    /// [`StagedPart::commit`], unless the output is finished: when its
    /// `_SUCCESS` marker is there the part is not put in place (its
    /// temporary file is removed) and `None` is returned. In a local
    /// directory the check and the rename are made under a shared `flock`
    /// of the directory, which [`CommitFence`] takes exclusively while the
    /// coordinator checks the parts and writes the manifest, so a part
    /// listed in a manifest is never replaced. On object storage the check
    /// is made just before the upload (there is no lock: an upload that
    /// began before the manifest was written can still land after it).
    pub async fn commit_unless_finished(self) -> Result<Option<PartInfo>> {
        self.commit_inner(true).await
    }

    async fn commit_inner(mut self, unless_finished: bool) -> Result<Option<PartInfo>> {
        let Some(mut staging) = self.staging.clone() else {
            return Err(Error::Write {
                path: self.output.file(&self.name),
                source: std::io::Error::other("the part was committed already"),
            });
        };
        let key_id = match self.encryption.clone() {
            Some(encryption) => {
                // Encrypted next to the plaintext, which is then removed:
                // only the encrypted bytes are ever renamed or uploaded.
                let sealed = PathBuf::from(format!("{}{SEALED_SUFFIX}", staging.display()));
                self.staging = Some(sealed.clone());
                let result = seal(&staging, &sealed, &encryption, &self.output, &self.name).await;
                let _ = std::fs::remove_file(&staging);
                let (sha256, bytes) = result?;
                self.sha256 = sha256;
                self.bytes = bytes;
                staging = sealed;
                Some(encryption.key_id().to_owned())
            }
            None => None,
        };
        match self.output.local_dir() {
            Some(dir) => {
                let dir = dir.to_path_buf();
                let target = dir.join(&self.name);
                let location = target.display().to_string();
                // Blocking (the lock may wait for a fence): off the runtime.
                let committed = tokio::task::spawn_blocking(move || {
                    let write_error = |path: &Path| {
                        let path = path.display().to_string();
                        move |source| Error::Write { path, source }
                    };
                    // Held (shared) until the rename is synced: a fence
                    // taken after the check waits for it, one taken
                    // before is seen (its manifest is written under it).
                    let _lock = if unless_finished {
                        let lock = File::open(&dir)
                            .and_then(|file| file.lock_shared().map(|()| file))
                            .map_err(write_error(&dir))?;
                        if dir.join(SUCCESS_FILE).exists() {
                            return Ok(false);
                        }
                        Some(lock)
                    } else {
                        None
                    };
                    std::fs::rename(&staging, &target).map_err(write_error(&target))?;
                    sync_dir(&dir).map(|()| true)
                })
                .await
                .map_err(|error| Error::Write {
                    path: location,
                    source: std::io::Error::other(error),
                })??;
                if !committed {
                    return Ok(None);
                }
                self.staging = None;
            }
            None => {
                if unless_finished && self.output.exists(SUCCESS_FILE).await? {
                    return Ok(None);
                }
                upload(&self.output, &self.name, &staging).await?;
            }
        }
        Ok(Some(PartInfo {
            name: self.name.clone(),
            rows: self.rows,
            sha256: self.sha256.clone(),
            bytes: self.bytes,
            key_id,
        }))
    }
}

/// Encrypts file `plain` into file `sealed` (the blob format, bound to
/// the part's job and name); returns the SHA-256 and size of `sealed`.
async fn seal(
    plain: &Path,
    sealed: &Path,
    encryption: &PartEncryption,
    output: &Output,
    name: &str,
) -> Result<(String, u64)> {
    let target = output.file(name);
    let failed = |reason: String| Error::Encryption {
        path: target.clone(),
        reason,
    };
    let source = tokio::fs::File::open(plain)
        .await
        .map_err(|error| failed(format!("cannot read the staged part: {error}")))?;
    let file = tokio::fs::File::create(sealed)
        .await
        .map_err(|error| failed(format!("cannot create '{}': {error}", sealed.display())))?;
    let mut encryptor = shamal_keys::BlobEncryptor::with_key(
        &encryption.ring,
        encryption.key_id(),
        &part_context(&encryption.job_id, name),
        tokio::io::BufWriter::new(file),
    )
    .await
    .map_err(|error| failed(error.to_string()))?;
    let mut source = tokio::io::BufReader::new(source);
    let mut chunk = vec![0u8; shamal_keys::blob::SEGMENT_BYTES];
    loop {
        use tokio::io::AsyncReadExt;
        let read = source
            .read(&mut chunk)
            .await
            .map_err(|error| failed(format!("cannot read the staged part: {error}")))?;
        if read == 0 {
            break;
        }
        encryptor
            .write(&chunk[..read])
            .await
            .map_err(|error| failed(error.to_string()))?;
    }
    let (writer, _) = encryptor
        .finish()
        .await
        .map_err(|error| failed(error.to_string()))?;
    writer
        .into_inner()
        .sync_all()
        .await
        .map_err(|error| failed(format!("cannot sync '{}': {error}", sealed.display())))?;
    let sealed = sealed.to_owned();
    tokio::task::spawn_blocking(move || hash_file(&sealed))
        .await
        .map_err(|error| failed(error.to_string()))?
}

impl Drop for StagedPart {
    fn drop(&mut self) {
        if let Some(staging) = self.staging.take() {
            let _ = std::fs::remove_file(staging);
        }
    }
}

/// Uploads local file `file` as `name` of object-store output `output`, as
/// one object (a multipart upload for large files, completed at once).
async fn upload(output: &Output, name: &str, file: &Path) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some((store, path)) = output.store_path(name) else {
        return Err(Error::Write {
            path: output.file(name),
            source: std::io::Error::other("not an object-store output"),
        });
    };
    let target = output.file(name);
    let write_error = |source: std::io::Error| Error::Write {
        path: target.clone(),
        source,
    };
    let mut source = tokio::fs::File::open(file)
        .await
        .map_err(|source| Error::Write {
            path: file.display().to_string(),
            source,
        })?;
    let mut writer = object_store::buffered::BufWriter::new(store, path);
    let mut buffer = vec![0u8; 1 << 20];
    let copied: std::io::Result<()> = async {
        loop {
            let read = source.read(&mut buffer).await?;
            if read == 0 {
                return Ok(());
            }
            writer.write_all(&buffer[..read]).await?;
        }
    }
    .await;
    if let Err(error) = copied {
        // A multipart upload begun is aborted (nothing appears).
        let _ = writer.abort().await;
        return Err(write_error(error));
    }
    // The single PUT, or the multipart upload's completion: the object
    // appears whole or not at all.
    writer.shutdown().await.map_err(write_error)
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| Error::Write {
            path: dir.display().to_string(),
            source,
        })
}

/// Writes `data` as `dir/name` atomically: a temporary name, synced, then
/// renamed into place and the directory synced.
pub(crate) fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let temporary = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::Write {
            path: temporary.display().to_string(),
            source,
        });
    }
    let target = dir.join(name);
    std::fs::rename(&temporary, &target).map_err(|source| Error::Write {
        path: target.display().to_string(),
        source,
    })?;
    sync_dir(dir)
}

/// Whether `name` is the name of an output part (`part-*.parquet`, or
/// `part-*.parquet.enc` encrypted).
pub fn is_part_name(name: &str) -> bool {
    name.starts_with("part-")
        && (name.ends_with(".parquet") || name.ends_with(&format!(".parquet{ENCRYPTED_SUFFIX}")))
}

/// The record of a finished output: written last, as `_manifest.json`,
/// then an empty `_SUCCESS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT_VERSION`] when written by this crate.
    pub format_version: u32,
    pub job_id: String,
    pub model: String,
    pub model_version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// By name, i.e. by shard.
    pub parts: Vec<PartInfo>,
    /// The sum of the parts' rows.
    pub total_rows: u64,
    /// How the parts are encrypted at rest; absent for plaintext parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ManifestEncryption>,
}

impl Manifest {
    /// A manifest of `parts` (sorted by name here), created now.
    pub fn new(
        job_id: impl Into<String>,
        model: impl Into<String>,
        model_version: impl Into<String>,
        mut parts: Vec<PartInfo>,
    ) -> Manifest {
        parts.sort_by(|a, b| a.name.cmp(&b.name));
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            job_id: job_id.into(),
            model: model.into(),
            model_version: model_version.into(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            total_rows: parts.iter().map(|part| part.rows).sum(),
            encryption: parts
                .iter()
                .any(|part| part.key_id.is_some())
                .then(|| ManifestEncryption::of(&parts)),
            parts,
        }
    }

    /// Writes `_manifest.json` in `output` (a local directory or an
    /// object-store prefix) atomically, then an empty `_SUCCESS`.
    pub async fn write(&self, output: &str) -> Result<()> {
        let output = Output::new(output)?;
        let text = serde_json::to_vec_pretty(self).map_err(|error| Error::Write {
            path: output.file(MANIFEST_FILE),
            source: std::io::Error::other(error),
        })?;
        output.create().await?;
        output.put(MANIFEST_FILE, text.into()).await?;
        output.put(SUCCESS_FILE, bytes::Bytes::new()).await
    }

    /// Reads the manifest of `output`.
    pub async fn read(output: &str) -> Result<Manifest> {
        Manifest::read_from(&Output::new(output)?).await
    }

    async fn read_from(output: &Output) -> Result<Manifest> {
        let text = output.read(MANIFEST_FILE).await?;
        serde_json::from_slice(&text).map_err(|error| Error::CorruptFile {
            file: output.file(MANIFEST_FILE),
            reason: error.to_string(),
        })
    }

    /// Reads the manifest of `output` and checks the output against it:
    /// `_SUCCESS` is there, every part has its size and SHA-256 (of the
    /// bytes as stored), the total is the sum of the parts, and no part
    /// file is there that the manifest does not list (a reader would count
    /// its rows too).
    pub async fn verify(output: &str) -> Result<Manifest> {
        let output = Output::new(output)?;
        let manifest = Manifest::read_from(&output).await?;
        let mismatch = |path: String, reason: String| Error::Verify { path, reason };
        if !output.exists(SUCCESS_FILE).await? {
            return Err(mismatch(
                output.location().to_owned(),
                format!("no {SUCCESS_FILE} marker"),
            ));
        }
        let sum: u64 = manifest.parts.iter().map(|part| part.rows).sum();
        if sum != manifest.total_rows {
            return Err(mismatch(
                output.location().to_owned(),
                format!(
                    "total_rows is {} but the parts hold {sum}",
                    manifest.total_rows
                ),
            ));
        }
        for part in &manifest.parts {
            if manifest.encryption.is_some() != part.key_id.is_some() {
                return Err(mismatch(
                    output.file(&part.name),
                    if part.key_id.is_some() {
                        "names a key id in a manifest that records no encryption".to_owned()
                    } else {
                        "names no key id in a manifest of encrypted parts".to_owned()
                    },
                ));
            }
            let (sha256, bytes) = output.hash(&part.name).await?;
            if bytes != part.bytes {
                return Err(mismatch(
                    output.file(&part.name),
                    format!("{bytes} bytes, the manifest says {}", part.bytes),
                ));
            }
            if sha256 != part.sha256 {
                return Err(mismatch(
                    output.file(&part.name),
                    format!("SHA-256 {sha256}, the manifest says {}", part.sha256),
                ));
            }
        }
        for name in output.list().await? {
            if is_part_name(&name) && !manifest.parts.iter().any(|part| part.name == name) {
                return Err(mismatch(
                    output.file(&name),
                    "a part the manifest does not list".to_owned(),
                ));
            }
        }
        Ok(manifest)
    }
}

/// How parts are written: Snappy; dictionary encoding only for string
/// and binary columns (keys such as region or product codes repeat).
/// Numeric columns, model outputs above all, rarely repeat: building a
/// dictionary for them until it overflows its page and falls back to plain
/// encoding cost a fifth of a worker's time on a cheap model, for nothing.
pub fn part_writer_properties(schema: &Schema) -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_dictionary_enabled(false);
    for field in schema.fields() {
        if crate::schema::is_text(field.data_type()) {
            builder = builder.set_column_dictionary_enabled(
                parquet::schema::types::ColumnPath::from(field.name().as_str()),
                true,
            );
        }
    }
    builder.build()
}

/// SHA-256 (hex) and size of a file.
pub(crate) fn hash_file(path: &Path) -> Result<(String, u64)> {
    let unreadable = |source| Error::UnreadablePath {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(unreadable)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), bytes))
}
