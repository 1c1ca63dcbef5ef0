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
//! Parts are written to a hidden temporary name
//! (`.part-000001.parquet.tmp-<random>`) and renamed into place, so a
//! re-run shard replaces its part whole and readers never see half a file.
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

use crate::error::{Error, Result};

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
/// # fn example(keys: arrow::record_batch::RecordBatch, outputs: Vec<(String, arrow::array::ArrayRef)>) -> shamal_batch_io::Result<()> {
/// use shamal_batch_io::PartWriter;
/// let batch = PartWriter::batch(&keys, outputs)?;
/// let mut writer = PartWriter::create("out".as_ref(), 7, batch.schema())?;
/// writer.write(&batch)?;
/// let part = writer.finish()?; // out/part-000007.parquet
/// # Ok(()) }
/// ```
///
/// Dropped without [`PartWriter::finish`], it removes its temporary file
/// and leaves any earlier part of the shard as it was.
pub struct PartWriter {
    dir: PathBuf,
    name: String,
    temporary: PathBuf,
    writer: Option<ArrowWriter<HashingFile>>,
    rows: u64,
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

    /// Starts the part of shard `shard_index` in `dir` (created if missing),
    /// with columns `schema` (Snappy-compressed Parquet).
    pub fn create(dir: &Path, shard_index: usize, schema: SchemaRef) -> Result<PartWriter> {
        let write_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(write_error(dir))?;
        let name = part_name(shard_index);
        let temporary = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
        let file = File::create(&temporary).map_err(write_error(&temporary))?;
        let sink = HashingFile {
            file: BufWriter::new(file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let writer =
            ArrowWriter::try_new(sink, schema, Some(properties)).map_err(|error| Error::Write {
                path: temporary.display().to_string(),
                source: std::io::Error::other(error),
            })?;
        Ok(PartWriter {
            dir: dir.to_owned(),
            name,
            temporary,
            writer: Some(writer),
            rows: 0,
        })
    }

    fn parquet_error(&self, error: parquet::errors::ParquetError) -> Error {
        Error::Write {
            path: self.temporary.display().to_string(),
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

    /// Finishes the file, syncs it and renames it to its part name,
    /// replacing an earlier part of the same shard.
    pub fn finish(mut self) -> Result<PartInfo> {
        let Some(writer) = self.writer.take() else {
            return Err(self.parquet_error(parquet::errors::ParquetError::General(
                "already finished".to_owned(),
            )));
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
            path: self.temporary.display().to_string(),
            source,
        };
        let file = file
            .into_inner()
            .map_err(|error| write_error(error.into_error()))?;
        file.sync_all().map_err(write_error)?;
        drop(file);
        let target = self.dir.join(&self.name);
        std::fs::rename(&self.temporary, &target).map_err(|source| Error::Write {
            path: target.display().to_string(),
            source,
        })?;
        sync_dir(&self.dir)?;
        Ok(PartInfo {
            name: self.name.clone(),
            rows: self.rows,
            sha256: hex::encode(hasher.finalize()),
            bytes,
        })
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
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
            parts,
        }
    }

    /// Writes `_manifest.json` in `dir` atomically (temporary name, sync,
    /// rename), then an empty `_SUCCESS`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let write_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Write { path, source }
        };
        let text = serde_json::to_vec_pretty(self).map_err(|error| Error::Write {
            path: dir.join(MANIFEST_FILE).display().to_string(),
            source: std::io::Error::other(error),
        })?;
        let temporary = dir.join(format!(
            ".{MANIFEST_FILE}.tmp-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let result = (|| {
            let mut file = File::create(&temporary)?;
            file.write_all(&text)?;
            file.sync_all()
        })();
        if let Err(source) = result {
            let _ = std::fs::remove_file(&temporary);
            return Err(Error::Write {
                path: temporary.display().to_string(),
                source,
            });
        }
        let target = dir.join(MANIFEST_FILE);
        std::fs::rename(&temporary, &target).map_err(write_error(&target))?;
        let success = dir.join(SUCCESS_FILE);
        File::create(&success)
            .and_then(|file| file.sync_all())
            .map_err(write_error(&success))?;
        sync_dir(dir)
    }

    /// Reads the manifest of `dir`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|source| Error::UnreadablePath {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|error| Error::CorruptFile {
            file: path.display().to_string(),
            reason: error.to_string(),
        })
    }

    /// Reads the manifest of `dir` and checks the directory against it:
    /// `_SUCCESS` is there, every part has its size and SHA-256, the total
    /// is the sum of the parts, and no `part-*.parquet` file is there that
    /// the manifest does not list (a reader would count its rows too).
    pub fn verify(dir: &Path) -> Result<Manifest> {
        let manifest = Manifest::read(dir)?;
        let mismatch = |path: &Path, reason: String| Error::Verify {
            path: path.display().to_string(),
            reason,
        };
        if !dir.join(SUCCESS_FILE).is_file() {
            return Err(mismatch(dir, format!("no {SUCCESS_FILE} marker")));
        }
        let sum: u64 = manifest.parts.iter().map(|part| part.rows).sum();
        if sum != manifest.total_rows {
            return Err(mismatch(
                dir,
                format!(
                    "total_rows is {} but the parts hold {sum}",
                    manifest.total_rows
                ),
            ));
        }
        for part in &manifest.parts {
            let path = dir.join(&part.name);
            let (sha256, bytes) = hash_file(&path)?;
            if bytes != part.bytes {
                return Err(mismatch(
                    &path,
                    format!("{bytes} bytes, the manifest says {}", part.bytes),
                ));
            }
            if sha256 != part.sha256 {
                return Err(mismatch(
                    &path,
                    format!("SHA-256 {sha256}, the manifest says {}", part.sha256),
                ));
            }
        }
        let entries = std::fs::read_dir(dir).map_err(|source| Error::UnreadablePath {
            path: dir.display().to_string(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| Error::UnreadablePath {
                path: dir.display().to_string(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("part-")
                && name.ends_with(".parquet")
                && !manifest.parts.iter().any(|part| part.name == name)
            {
                return Err(mismatch(
                    &dir.join(&name),
                    "a part the manifest does not list".to_owned(),
                ));
            }
        }
        Ok(manifest)
    }
}

/// SHA-256 (hex) and size of a file.
fn hash_file(path: &Path) -> Result<(String, u64)> {
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
