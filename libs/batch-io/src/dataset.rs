//! Dataset locations: listing the files, telling their format, reading
//! their schema and the metadata that shard planning needs.

use std::io::Cursor;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;

use crate::error::{Error, Result};
use crate::format::Format;
use crate::location::{Location, store_for};
use crate::parquet_store::StoreReader;
use crate::schema::{ModelInput, check_schema};

/// How many bytes at the head of a CSV / JSON Lines file the schema is
/// inferred from (whole lines only; more when the first line is longer).
pub(crate) const SAMPLE_BYTES: u64 = 1 << 20;

/// One file of a dataset.
#[derive(Clone, Debug)]
pub struct DataFile {
    /// The file's location, as [`store_for`] takes it: an absolute local
    /// path, or an object's URL (`s3://bucket/key`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// The file's Arrow schema: from the Parquet footer, or inferred from
    /// the first [`SAMPLE_BYTES`] of a CSV / JSON Lines file.
    pub schema: SchemaRef,
    /// Parquet: the row count of each row group.
    pub(crate) row_groups: Vec<u64>,
    /// CSV: the length of the header line (with its newline); 0 otherwise.
    pub(crate) header_len: u64,
    /// CSV / JSON Lines: average bytes per line in the sample (at least 1).
    pub(crate) bytes_per_row: f64,
}

/// A dataset: one file, or the files of one format in a directory.
#[derive(Clone, Debug)]
pub struct Dataset {
    location: String,
    format: Format,
    files: Vec<DataFile>,
}

impl Dataset {
    /// Opens `location`: a file, or a directory whose files (not its
    /// subdirectories, and not the hidden files starting with `.` or `_`)
    /// make up the dataset, in name order. On object storage
    /// (`s3://bucket/key`) the key names one object when there is one, and
    /// is otherwise a prefix whose objects (up to the next `/`) make up the
    /// dataset.
    ///
    /// The format is `format` when given; otherwise it comes from the file
    /// extensions (`.parquet`, `.jsonl` / `.ndjson`, `.csv`), which must all
    /// agree in a directory. Every Parquet footer is read here (a file that
    /// is not Parquet fails with [`Error::CorruptFile`] naming it); the
    /// schema of a CSV / JSON Lines file is inferred from its first lines.
    pub async fn open(location: &str, format: Option<Format>) -> Result<Dataset> {
        let (store, listed) = match Location::parse(location)? {
            Location::Local(local) => list_local(location, &local).await?,
            Location::S3 {
                scheme,
                bucket,
                key,
            } => list_s3(location, scheme, &bucket, &key).await?,
        };
        if listed.is_empty() {
            return Err(Error::Format {
                path: location.to_owned(),
                reason: "the directory holds no data file".to_owned(),
            });
        }
        let format = match format {
            Some(format) => format,
            None => {
                let mut found: Option<Format> = None;
                for (path, _) in &listed {
                    let Some(this) = Format::from_path(path) else {
                        return Err(Error::Format {
                            path: path.clone(),
                            reason: "unknown extension (expected .parquet, .jsonl, .ndjson or \
                                     .csv); name the format explicitly"
                                .to_owned(),
                        });
                    };
                    match found {
                        Some(format) if format != this => {
                            return Err(Error::Format {
                                path: location.to_owned(),
                                reason: format!(
                                    "mixes {format} and {this} files (e.g. '{path}'); a dataset \
                                     has one format"
                                ),
                            });
                        }
                        _ => found = Some(this),
                    }
                }
                found.unwrap_or(Format::Parquet)
            }
        };

        let mut files = Vec::with_capacity(listed.len());
        for (path, size) in listed {
            let file = match format {
                Format::Parquet => open_parquet(&store, path, size).await?,
                Format::JsonLines | Format::Csv => open_text(&store, format, path, size).await?,
            };
            files.push(file);
        }
        Ok(Dataset {
            location: location.to_owned(),
            format,
            files,
        })
    }

    /// The location it was opened from.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Its files, in name order.
    pub fn files(&self) -> &[DataFile] {
        &self.files
    }

    /// The schema of its first file.
    pub fn schema(&self) -> SchemaRef {
        self.files[0].schema.clone()
    }

    /// Checks, before any work, that every file has a column for each of
    /// the model's `inputs`, of a type it can be read from (see
    /// [`ModelInput`]), and every `keys` column. The first problem found is
    /// returned: [`Error::MissingColumn`] (listing the columns there are),
    /// [`Error::WrongType`] or [`Error::UnsupportedInput`].
    pub fn check(&self, inputs: &[ModelInput], keys: &[String]) -> Result<()> {
        for file in &self.files {
            check_schema(&file.schema, self.format, &file.path, inputs, keys)?;
        }
        Ok(())
    }
}

/// Whether a listed file is data (not `_SUCCESS`, `.crc`, ...).
fn is_data_name(name: &str) -> bool {
    !(name.is_empty() || name.starts_with('.') || name.starts_with('_'))
}

/// The store and the (location, size) of each data file of a local
/// location, in name order.
async fn list_local(
    location: &str,
    local: &std::path::Path,
) -> Result<(Arc<dyn ObjectStore>, Vec<(String, u64)>)> {
    let metadata = std::fs::metadata(local).map_err(|source| Error::UnreadablePath {
        path: location.to_owned(),
        source,
    })?;
    let absolute = std::fs::canonicalize(local).map_err(|source| Error::UnreadablePath {
        path: location.to_owned(),
        source,
    })?;
    let absolute_text = absolute.to_string_lossy().into_owned();
    let (store, root) = store_for(&absolute_text)?;
    let mut listed: Vec<(String, u64)> = Vec::new();
    if metadata.is_dir() {
        let listing = store
            .list_with_delimiter(Some(&root))
            .await
            .map_err(|error| Error::Store {
                path: location.to_owned(),
                reason: error.to_string(),
            })?;
        for object in listing.objects {
            if !is_data_name(object.location.filename().unwrap_or_default()) {
                continue;
            }
            listed.push((format!("/{}", object.location), object.size));
        }
        listed.sort();
    } else {
        listed.push((absolute_text, metadata.len()));
    }
    Ok((store, listed))
}

/// The store and the (URL, size) of each data file of an S3 location: the
/// object `key`, or the objects under the prefix `key/`, in name order.
async fn list_s3(
    location: &str,
    scheme: &str,
    bucket: &str,
    key: &str,
) -> Result<(Arc<dyn ObjectStore>, Vec<(String, u64)>)> {
    let (store, path) = store_for(location)?;
    let store_error = |error: object_store::Error| Error::Store {
        path: location.to_owned(),
        reason: crate::error::one_line(error),
    };
    if !key.is_empty() {
        match store.head(&path).await {
            Ok(meta) => {
                return Ok((
                    store,
                    vec![(format!("{scheme}://{bucket}/{key}"), meta.size)],
                ));
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => return Err(store_error(error)),
        }
    }
    let prefix = (!key.is_empty()).then_some(&path);
    let listing = store
        .list_with_delimiter(prefix)
        .await
        .map_err(store_error)?;
    if listing.objects.is_empty() && listing.common_prefixes.is_empty() {
        return Err(Error::Store {
            path: location.to_owned(),
            reason: "no object and no objects under this prefix".to_owned(),
        });
    }
    let mut listed: Vec<(String, u64)> = listing
        .objects
        .into_iter()
        .filter(|object| is_data_name(object.location.filename().unwrap_or_default()))
        .map(|object| {
            (
                format!("{scheme}://{bucket}/{}", object.location),
                object.size,
            )
        })
        .collect();
    listed.sort();
    Ok((store, listed))
}

async fn open_parquet(store: &Arc<dyn ObjectStore>, path: String, size: u64) -> Result<DataFile> {
    let (_, store_path) = store_for(&path)?;
    let reader = StoreReader::new(store.clone(), store_path, size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|error| crate::error::parquet_error(&path, error))?;
    let row_groups = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|group| u64::try_from(group.num_rows()).unwrap_or(0))
        .collect();
    Ok(DataFile {
        schema: builder.schema().clone(),
        path,
        size,
        row_groups,
        header_len: 0,
        bytes_per_row: 1.0,
    })
}

/// Reads whole lines from the head of a text file: at least
/// [`SAMPLE_BYTES`] (or the file), extended to the end of the line it
/// stops in.
async fn read_head(store: &Arc<dyn ObjectStore>, path: &str, size: u64) -> Result<Vec<u8>> {
    let (_, store_path) = store_for(path)?;
    let mut head = Vec::new();
    let mut end = 0;
    let mut want = SAMPLE_BYTES;
    while end < size {
        let next = size.min(end + want);
        let bytes = store
            .get_range(&store_path, end..next)
            .await
            .map_err(|error| Error::Store {
                path: path.to_owned(),
                reason: crate::error::one_line(error),
            })?;
        head.extend_from_slice(&bytes);
        end = next;
        if let Some(last) = head.iter().rposition(|&byte| byte == b'\n') {
            if end < size {
                head.truncate(last + 1);
            }
            break;
        }
        want = want.saturating_mul(2);
    }
    Ok(head)
}

async fn open_text(
    store: &Arc<dyn ObjectStore>,
    format: Format,
    path: String,
    size: u64,
) -> Result<DataFile> {
    let head = read_head(store, &path, size).await?;
    let corrupt = |reason: String| Error::CorruptFile {
        file: path.clone(),
        reason,
    };
    let (schema, header_len) = match format {
        Format::JsonLines => {
            let (schema, _) = arrow::json::reader::infer_json_schema(Cursor::new(&head), None)
                .map_err(|error| corrupt(error.to_string()))?;
            (schema, 0)
        }
        _ => {
            let header_len = head
                .iter()
                .position(|&byte| byte == b'\n')
                .map_or(head.len(), |newline| newline + 1);
            if header_len == 0 {
                return Err(corrupt("empty CSV file: no header line".to_owned()));
            }
            let (schema, _) = arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(Cursor::new(&head), None)
                .map_err(|error| corrupt(error.to_string()))?;
            (schema, header_len as u64)
        }
    };
    let body = &head[usize::try_from(header_len).unwrap_or(head.len())..];
    let lines = body.iter().filter(|&&byte| byte == b'\n').count()
        + usize::from(body.last().is_some_and(|&byte| byte != b'\n'));
    let bytes_per_row = if lines == 0 {
        1.0
    } else {
        (body.len() as f64 / lines as f64).max(1.0)
    };
    Ok(DataFile {
        path,
        size,
        schema: Arc::new(schema),
        row_groups: Vec::new(),
        header_len,
        bytes_per_row,
    })
}
