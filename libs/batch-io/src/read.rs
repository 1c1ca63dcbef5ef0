//! Reading one shard's rows.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};

use crate::convert::RowOrigin;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::location::{Location, store_for};
use crate::parquet_store::StoreReader;
use crate::shard::{Shard, Span};

/// Rows of a shard, with where they come from (to number rows in errors).
#[derive(Clone, Debug)]
pub struct ShardBatch {
    pub batch: RecordBatch,
    pub origin: RowOrigin,
}

/// The batches of a shard, in row order.
pub type ShardStream = BoxStream<'static, Result<ShardBatch>>;

/// Bytes fetched at a time past a byte range's end, looking for the end of
/// its last line.
const LINE_END_CHUNK: u64 = 64 * 1024;

/// Reads `shard`'s rows in batches of at most `batch_size` rows, with only
/// `columns`, in that order.
///
/// Parquet shards are streamed from their row groups, reading only the
/// projected columns. A JSON Lines or CSV shard's bytes (its range plus the
/// rest of its last line) are fetched whole and decoded with the schema
/// the shard carries, so a shard's size bounds the memory it takes.
/// A column not in the file fails with [`Error::MissingColumn`]; bytes that
/// do not decode (corrupt Parquet, invalid JSON or UTF-8, a CSV record with
/// the wrong number of fields) fail with [`Error::CorruptFile`].
pub async fn read_shard(
    shard: &Shard,
    columns: &[String],
    batch_size: usize,
) -> Result<ShardStream> {
    let batch_size = batch_size.max(1);
    if let Span::RowGroups { first, count } = shard.span
        && let Location::Local(file) = Location::parse(&shard.file)?
    {
        return read_local_row_groups(shard, file, first, count, columns, batch_size).await;
    }
    let (store, path) = store_for(&shard.file)?;
    match shard.span {
        Span::RowGroups { first, count } => {
            read_row_groups(shard, store, path, first, count, columns, batch_size).await
        }
        Span::Bytes { start, end } => {
            read_lines(shard, store, path, start, end, columns, batch_size).await
        }
    }
}

fn corrupt(shard: &Shard, error: impl ToString) -> Error {
    Error::CorruptFile {
        file: shard.file.clone(),
        reason: error.to_string(),
    }
}

/// The indices of `columns` in `schema`.
fn indices(shard: &Shard, schema: &Schema, columns: &[String]) -> Result<Vec<usize>> {
    columns
        .iter()
        .map(|column| {
            schema.index_of(column).map_err(|_| Error::MissingColumn {
                column: column.clone(),
                needed_for: "the job".to_owned(),
                file: shard.file.clone(),
                available: schema
                    .fields()
                    .iter()
                    .map(|field| field.name().clone())
                    .collect(),
            })
        })
        .collect()
}

/// Puts a decoded batch's columns in the order asked for.
fn reorder(batch: RecordBatch, columns: &[String]) -> std::result::Result<RecordBatch, String> {
    let schema = batch.schema();
    let order = columns
        .iter()
        .map(|column| schema.index_of(column).map_err(|error| error.to_string()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    batch.project(&order).map_err(|error| error.to_string())
}

/// Numbers the batches of a stream of decoded batches.
fn numbered(
    shard: &Shard,
    batches: BoxStream<'static, Result<RecordBatch>>,
    columns: &[String],
) -> ShardStream {
    let location = shard.location();
    let file = shard.file.clone();
    let base = shard.first_row.unwrap_or(0);
    let columns = columns.to_vec();
    let mut rows_before = 0u64;
    batches
        .map(move |batch| {
            let batch = reorder(batch?, &columns).map_err(|reason| Error::CorruptFile {
                file: file.clone(),
                reason,
            })?;
            let origin = RowOrigin {
                location: location.clone(),
                first_row: base + rows_before,
            };
            rows_before += batch.num_rows() as u64;
            Ok(ShardBatch { batch, origin })
        })
        .boxed()
}

async fn read_row_groups(
    shard: &Shard,
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    first: usize,
    count: usize,
    columns: &[String],
    batch_size: usize,
) -> Result<ShardStream> {
    let reader = StoreReader::new(store, path, shard.file_size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|error| crate::error::parquet_error(&shard.file, error))?;
    check_row_groups(shard, builder.metadata().num_row_groups(), first, count)?;
    let wanted = indices(shard, builder.schema(), columns)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let stream = builder
        .with_row_groups((first..first + count).collect())
        .with_projection(mask)
        .with_batch_size(batch_size)
        .build()
        .map_err(|error| corrupt(shard, error))?;
    let file = shard.file.clone();
    let batches = stream
        .map(move |batch| batch.map_err(|error| crate::error::parquet_error(&file, error)))
        .boxed();
    Ok(numbered(shard, batches, columns))
}

/// A local file's row groups, read and decoded by the synchronous Parquet
/// reader on a blocking thread and handed over a channel: no object-store
/// round trip per column chunk, and the decoding runs beside the caller's
/// work on the rows (measured: the async reader over the local store was
/// the slowest stage of a worker's shard, docs/benchmarks.md). Errors as
/// the object-store path gives them.
async fn read_local_row_groups(
    shard: &Shard,
    file: PathBuf,
    first: usize,
    count: usize,
    columns: &[String],
    batch_size: usize,
) -> Result<ShardStream> {
    let opening = shard.clone();
    let wanted_columns = columns.to_vec();
    let reader = tokio::task::spawn_blocking(move || {
        let shard = opening;
        let handle = std::fs::File::open(&file).map_err(|error| Error::Store {
            path: shard.file.clone(),
            reason: error.to_string(),
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(handle)
            .map_err(|error| crate::error::parquet_error(&shard.file, error))?;
        check_row_groups(&shard, builder.metadata().num_row_groups(), first, count)?;
        let wanted = indices(&shard, builder.schema(), &wanted_columns)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
        builder
            .with_row_groups((first..first + count).collect())
            .with_projection(mask)
            .with_batch_size(batch_size)
            .build()
            .map_err(|error| corrupt(&shard, error))
    })
    .await
    .map_err(|error| Error::Store {
        path: shard.file.clone(),
        reason: format!("opening the file failed: {error}"),
    })??;
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let file = shard.file.clone();
    // Ends at the first error, or when the stream is dropped (its next
    // send fails).
    tokio::task::spawn_blocking(move || {
        for batch in reader {
            let batch = batch.map_err(|error| Error::CorruptFile {
                file: file.clone(),
                reason: error.to_string(),
            });
            let failed = batch.is_err();
            if sender.blocking_send(batch).is_err() || failed {
                break;
            }
        }
    });
    let batches = stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|batch| (batch, receiver))
    })
    .boxed();
    Ok(numbered(shard, batches, columns))
}

/// Fails unless row groups `first .. first + count` exist in a file of
/// `groups` row groups.
fn check_row_groups(shard: &Shard, groups: usize, first: usize, count: usize) -> Result<()> {
    if first + count > groups {
        return Err(corrupt(
            shard,
            format!(
                "shard {} wants row groups {first}..{} of {groups}; the file changed since it \
                 was planned",
                shard.index,
                first + count
            ),
        ));
    }
    Ok(())
}

/// Fetches the lines that start in `start .. end`: from the first line
/// start at or after `start` to the end of the last line starting before
/// `end` (which may run past `end`).
pub(crate) async fn fetch_lines(
    store: &dyn ObjectStore,
    path: &StorePath,
    size: u64,
    start: u64,
    end: u64,
) -> std::result::Result<Bytes, object_store::Error> {
    let end = end.min(size);
    if start >= end {
        return Ok(Bytes::new());
    }
    // One byte before `start` tells whether a line starts at `start`.
    let fetch_start = start.saturating_sub(1);
    let head = store.get_range(path, fetch_start..end).await?;
    let begin = if start == 0 {
        0
    } else {
        match head.iter().position(|&byte| byte == b'\n') {
            Some(newline) => newline + 1,
            None => return Ok(Bytes::new()),
        }
    };
    if begin >= head.len() {
        // The first line start is at or after `end`: not this shard's.
        return Ok(Bytes::new());
    }
    if head.last() == Some(&b'\n') || end == size {
        return Ok(head.slice(begin..));
    }
    // The last line runs past `end`: read on to its newline (or the end).
    let mut lines = head[begin..].to_vec();
    let mut position = end;
    while position < size {
        let next = size.min(position + LINE_END_CHUNK);
        let more = store.get_range(path, position..next).await?;
        if let Some(newline) = more.iter().position(|&byte| byte == b'\n') {
            lines.extend_from_slice(&more[..=newline]);
            break;
        }
        lines.extend_from_slice(&more);
        position = next;
    }
    Ok(Bytes::from(lines))
}

async fn read_lines(
    shard: &Shard,
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    start: u64,
    end: u64,
    columns: &[String],
    batch_size: usize,
) -> Result<ShardStream> {
    let Some(schema) = shard.schema.as_ref() else {
        return Err(corrupt(
            shard,
            format!(
                "shard {} carries no schema to decode its lines",
                shard.index
            ),
        ));
    };
    let wanted = indices(shard, schema, columns)?;
    let lines = fetch_lines(store.as_ref(), &path, shard.file_size, start, end)
        .await
        .map_err(|error| Error::Store {
            path: shard.file.clone(),
            reason: crate::error::one_line(error),
        })?;
    let file = shard.file.clone();
    let decode_error = move |error: arrow::error::ArrowError| Error::CorruptFile {
        file: file.clone(),
        reason: error.to_string(),
    };
    let batches: BoxStream<'static, Result<RecordBatch>> = match shard.format {
        Format::JsonLines => {
            // Only the wanted fields: the decoder skips the others.
            let projected: SchemaRef = Arc::new(
                schema
                    .project(&wanted)
                    .map_err(|error| corrupt(shard, error))?,
            );
            let reader = arrow::json::ReaderBuilder::new(projected)
                .with_batch_size(batch_size)
                .build(Cursor::new(lines))
                .map_err(|error| corrupt(shard, error))?;
            stream::iter(reader.map(move |batch| batch.map_err(&decode_error))).boxed()
        }
        Format::Csv => {
            let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema.clone()))
                .with_header(false)
                .with_batch_size(batch_size)
                .with_projection(wanted)
                .build(Cursor::new(lines))
                .map_err(|error| corrupt(shard, error))?;
            stream::iter(reader.map(move |batch| batch.map_err(&decode_error))).boxed()
        }
        Format::Parquet => {
            return Err(corrupt(
                shard,
                format!("shard {} is a byte range of a Parquet file", shard.index),
            ));
        }
    };
    Ok(numbered(shard, batches, columns))
}
