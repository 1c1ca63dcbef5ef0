//! Scoring one shard: the task checked against the worker's model, the
//! shard read, scored on a batch instance and written as its part, as a
//! pipeline of three stages (reading ahead, scoring on the instance's
//! thread, writing behind on a blocking thread) that hand each other
//! chunks of rows; and the failures a shard can end with.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use futures::StreamExt;
use shamal_async_queue::Job;
use shamal_batch_io::{
    ModelInput, Output, PartEncryption, PartInfo, PartWriter, RowOrigin, SUCCESS_FILE, Shard,
    input_tensors, read_shard, tensors_to_columns,
};
use shamal_proto::shamal::batch::v1::ShardTask;
use shamal_tensor::{Tensor, TensorData};
use tonic::Code;

use super::{Context, Failure};
use crate::backend::{Backend, BackendError, ModelSignature};
use crate::repository::Lookup;
use crate::service::prepare_inputs;

/// Rows per execution when the task names none.
const DEFAULT_BATCH_SIZE: usize = 256;

/// A failure with `code` and `message`.
fn failed<T>(code: Code, message: impl Into<String>) -> Result<T, Failure> {
    Err((code as i32, message.into()))
}

/// The gRPC code of a data failure.
fn data_code(error: &shamal_batch_io::Error) -> Code {
    use shamal_batch_io::Error as E;
    match error {
        E::UnreadablePath { .. } | E::Store { .. } => Code::Unavailable,
        E::Write { .. } | E::BadOutput { .. } | E::Verify { .. } | E::Encryption { .. } => {
            Code::Internal
        }
        E::Format { .. }
        | E::MissingColumn { .. }
        | E::WrongType { .. }
        | E::UnsupportedInput { .. }
        | E::BadRow { .. }
        | E::CorruptFile { .. } => Code::InvalidArgument,
    }
}

/// A data failure, naming the dataset's column where the error names the
/// model input it feeds.
fn data_failure(error: shamal_batch_io::Error, columns: &HashMap<String, String>) -> Failure {
    use shamal_batch_io::Error as E;
    let code = data_code(&error);
    let error = match error {
        E::BadRow {
            column,
            row,
            location,
            reason,
        } => E::BadRow {
            column: columns.get(&column).cloned().unwrap_or(column),
            row,
            location,
            reason,
        },
        E::WrongType {
            column,
            expected,
            found,
        } => E::WrongType {
            column: columns.get(&column).cloned().unwrap_or(column),
            expected,
            found,
        },
        other => other,
    };
    (code as i32, error.to_string())
}

fn backend_failure(error: BackendError) -> Failure {
    match error {
        BackendError::InvalidInput(message) => (Code::InvalidArgument as i32, message),
        BackendError::Internal(message) => (Code::Internal as i32, message),
    }
}

/// The output location of a task: a local path (or `file://` URL) or an
/// object-store prefix (`s3://bucket/prefix`); another scheme is
/// `FAILED_PRECONDITION`.
fn output_dir(output: &str) -> Result<Output, Failure> {
    if output.is_empty() {
        return failed(Code::InvalidArgument, "the task names no output location");
    }
    Output::new(output).map_err(|error| (Code::FailedPrecondition as i32, error.to_string()))
}

/// The model's inputs as batch inference reads them.
fn model_inputs(signature: &ModelSignature) -> Vec<ModelInput> {
    signature
        .inputs
        .iter()
        .map(|spec| ModelInput::new(spec.name.clone(), spec.datatype.as_str(), spec.dims.clone()))
        .collect()
}

/// Reads, scores and writes one shard; returns its part.
pub(super) async fn score(
    context: &Context,
    job: &Job,
    task: &ShardTask,
    version_label: &mut String,
) -> Result<PartInfo, Failure> {
    if task.model != job.model() {
        return failed(
            Code::InvalidArgument,
            format!(
                "the task on the stream of model '{}' names model '{}'",
                job.model(),
                task.model
            ),
        );
    }
    // Encryption asked for: refused before anything is read or written
    // by a worker that cannot do it (the coordinator tries again, maybe
    // on a worker with keys, then fails the job with this message).
    let encryption = if task.encrypt {
        let Some(ring) = context.keys.clone() else {
            return failed(
                Code::FailedPrecondition,
                format!(
                    "output encryption is not supported by this worker ({}): it has no key \
                     ring; set batch.key_file to the key file of the batch outputs",
                    context.identity.consumer_id
                ),
            );
        };
        let key_id = (!task.key_id.is_empty()).then(|| task.key_id.clone());
        if let Some(id) = &key_id
            && !ring.contains(id)
        {
            return failed(
                Code::FailedPrecondition,
                format!(
                    "the task asks for key id '{id}', which this worker's key ring does not \
                     hold (its keys: {})",
                    ring.key_ids().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        Some(PartEncryption {
            ring,
            key_id,
            job_id: task.job_id.clone(),
        })
    } else {
        None
    };
    let shard: Shard = serde_json::from_str(&task.shard_json).map_err(|error| {
        (
            Code::InvalidArgument as i32,
            format!("shard_json is not a shard: {error}"),
        )
    })?;
    let requested = if task.version == 0 {
        String::new()
    } else {
        task.version.to_string()
    };
    let version = context
        .state
        .store
        .get(&task.model, &requested)
        .map_err(|lookup| {
            let what = if task.version == 0 {
                format!("model '{}'", task.model)
            } else {
                format!("model '{}' version {}", task.model, task.version)
            };
            let reason = match lookup {
                Lookup::UnknownModel | Lookup::UnknownVersion => {
                    format!("{what} is not served by this worker")
                }
                Lookup::NotReady(reason) => format!("{what} is not ready here: {reason}"),
            };
            (Code::FailedPrecondition as i32, reason)
        })?;
    *version_label = version.version_label();
    let dir = output_dir(&task.output)?;

    // Model input -> dataset column; every input must have one.
    let inputs = model_inputs(&version.signature);
    for name in task.input_columns.keys() {
        if !inputs.iter().any(|input| &input.name == name) {
            return failed(
                Code::InvalidArgument,
                format!(
                    "input_columns names '{name}', which is not an input of model '{}'",
                    task.model
                ),
            );
        }
    }
    let column_of: HashMap<String, String> = inputs
        .iter()
        .map(|input| {
            let column = task
                .input_columns
                .get(&input.name)
                .cloned()
                .unwrap_or_else(|| input.name.clone());
            (input.name.clone(), column)
        })
        .collect();
    let mut columns: Vec<String> = Vec::new();
    for column in inputs
        .iter()
        .map(|input| &column_of[&input.name])
        .chain(&task.key_columns)
    {
        if !columns.contains(column) {
            columns.push(column.clone());
        }
    }
    let lease = context
        .pool
        .checkout(&version)
        .await
        .map_err(backend_failure)
        .map_err(|(code, message)| (code, format!("cannot load the batch instance: {message}")))?;
    let pads = lease
        .instance()
        .run(|backend| !backend.ragged_axes().is_empty())
        .await
        .map_err(backend_failure)?;
    let batch_size = rows_per_execution(
        task.batch_size,
        version.settings.max_batch_size,
        version.signature.supports_batching() && !pads,
    );
    let mut stream = read_shard(&shard, &columns, rows_per_chunk(batch_size))
        .await
        .map_err(|error| data_failure(error, &column_of))?;
    // Reading runs ahead of scoring: the next chunks are fetched and
    // decoded (a local Parquet file on a blocking thread of its own,
    // other inputs on the runtime) while the instance's thread scores
    // this one. The reader stops at the first error, and when the shard
    // ends early: its next send fails once `batches` is dropped.
    let (sender, mut batches) = tokio::sync::mpsc::channel(READ_AHEAD);
    let reader = tokio::spawn(async move {
        while let Some(batch) = stream.next().await {
            let failed = batch.is_err();
            if sender.send(batch).await.is_err() || failed {
                break;
            }
        }
    });
    let shard_index = usize::try_from(task.shard_index).unwrap_or(usize::MAX);
    let scoring = Arc::new(Scoring {
        signature: version.signature.clone(),
        model: task.model.clone(),
        inputs,
        column_of: column_of.clone(),
        keys: task.key_columns.clone(),
        dir,
        shard_index,
        encryption,
        per_execution: batch_size,
    });
    // Writing runs behind scoring: a blocking thread encodes the scored
    // batches into the part while the instance scores the next ones, so
    // one shard keeps a second core busy (read, score and write overlap).
    // It stops at its first error; it ends when `parts` is dropped, and
    // returns the writer only then, so a shard that fails while scoring
    // drops its writer (and the part's temporary file) with the task.
    let (parts, mut scored) = tokio::sync::mpsc::channel::<Vec<RecordBatch>>(WRITE_BEHIND);
    let part_scoring = scoring.clone();
    let writing = tokio::task::spawn_blocking(move || {
        let mut writer: Option<PartWriter> = None;
        while let Some(outs) = scored.blocking_recv() {
            for out in &outs {
                part_scoring.write(out, &mut writer)?;
            }
        }
        Ok::<_, Failure>(writer)
    });
    while let Some(batch) = batches.recv().await {
        let batch = batch.map_err(|error| data_failure(error, &column_of))?;
        let scoring = scoring.clone();
        // Conversion and execution run on the instance's thread, off the
        // async threads that serve real-time requests.
        let outs = lease
            .instance()
            .run(move |backend| scoring.chunk(backend, batch))
            .await
            .map_err(backend_failure)??;
        // A send fails only once the writer has stopped at an error,
        // which its result below reports.
        if !outs.is_empty() && parts.send(outs).await.is_err() {
            break;
        }
    }
    drop(parts);
    let writer = writing.await.map_err(|error| {
        (
            Code::Internal as i32,
            format!("writing the part failed: {error}"),
        )
    })??;
    // The channel also ends when the reader panics: only a reader that
    // ended by itself has read every row.
    reader.await.map_err(|error| {
        (
            Code::Internal as i32,
            format!("reading the shard failed: {error}"),
        )
    })?;
    // The Parquet footer (and an encrypted part's sealing) on a blocking
    // thread; putting the part in place (a rename, or an upload) on the
    // runtime.
    let staged = tokio::task::spawn_blocking(move || match writer {
        Some(writer) => writer.close(),
        None => scoring.empty(&shard)?.close(),
    })
    .await
    .map_err(|error| {
        (
            Code::Internal as i32,
            format!("closing the part failed: {error}"),
        )
    })?
    .map_err(|error| data_failure(error, &column_of))?;
    // Never into a finished output: this entry may be a duplicate the
    // coordinator does not follow (it died between queuing the shard and
    // recording the entry, and queued it again on resume), and a part
    // committed after the manifest would replace the one it lists (an
    // encrypted part differs at every run). The check and the rename are
    // made under the lock the coordinator holds while it writes the
    // manifest (local outputs).
    match staged
        .commit_unless_finished()
        .await
        .map_err(|error| data_failure(error, &column_of))?
    {
        Some(part) => Ok(part),
        None => failed(
            Code::FailedPrecondition,
            format!(
                "the job's output '{}' is finished already (it has {SUCCESS_FILE}): the part \
                 of this duplicate run was not committed",
                task.output
            ),
        ),
    }
}

/// Rows per execution of a shard: the task's batch size (the
/// coordinator's `batch_size`). The model's `max_batch_size` sizes the
/// online batcher's batches; it caps a shard's batches too when the model
/// file has a fixed first dimension on an input or output (it cannot take
/// more rows) or the model pads inputs to the longest row of a batch (the
/// text encoders: a larger batch pads more and runs slower). Otherwise a
/// shard runs in the task's larger batches, which is what makes a cheap
/// tabular model fast in bulk.
///
/// `uncapped`: the model file takes any number of rows and the model does
/// not pad.
fn rows_per_execution(task_batch_size: u32, max_batch_size: usize, uncapped: bool) -> usize {
    let mut rows = usize::try_from(task_batch_size).unwrap_or(usize::MAX);
    if rows == 0 {
        rows = DEFAULT_BATCH_SIZE;
    }
    if max_batch_size > 0 && !uncapped {
        rows = rows.min(max_batch_size);
    }
    rows
}

/// Rows a shard's reader, instance and writer hand each other at once
/// (about): each hand-off wakes a thread, which costs tens of µs on a
/// virtual machine, so a chunk holds several executions' rows.
const CHUNK_ROWS: usize = 8192;

/// Rows per chunk: whole executions of `per_execution` rows, at least
/// [`CHUNK_ROWS`] (one execution when that is larger).
fn rows_per_chunk(per_execution: usize) -> usize {
    let per_execution = per_execution.max(1);
    per_execution.saturating_mul(CHUNK_ROWS.div_ceil(per_execution))
}

/// Chunks of a shard read ahead of the one being scored.
const READ_AHEAD: usize = 2;

/// Scored chunks of a shard waiting for the part's writer.
const WRITE_BEHIND: usize = 2;

/// What scoring one batch of a shard needs.
struct Scoring {
    model: String,
    signature: ModelSignature,
    inputs: Vec<ModelInput>,
    /// Model input -> dataset column.
    column_of: HashMap<String, String>,
    keys: Vec<String>,
    dir: Output,
    shard_index: usize,
    /// Encrypt the part at rest.
    encryption: Option<PartEncryption>,
    /// Rows per execution of the model ([`rows_per_execution`]).
    per_execution: usize,
}

impl Scoring {
    /// Scores a chunk of a shard's rows, `per_execution` rows at a time:
    /// the key columns and the model's outputs of each execution.
    fn chunk(
        &self,
        backend: &mut dyn Backend,
        shard_batch: shamal_batch_io::ShardBatch,
    ) -> Result<Vec<RecordBatch>, Failure> {
        let shamal_batch_io::ShardBatch { batch, origin } = shard_batch;
        let total = batch.num_rows();
        let per_execution = self.per_execution.max(1);
        let mut scored = Vec::with_capacity(total.div_ceil(per_execution));
        let mut offset = 0;
        while offset < total {
            let rows = per_execution.min(total - offset);
            let origin = RowOrigin {
                location: origin.location.clone(),
                first_row: origin.first_row + offset as u64,
            };
            scored.push(self.batch(backend, &batch.slice(offset, rows), &origin)?);
            offset += rows;
        }
        Ok(scored)
    }

    /// Scores one execution's rows (at least one): its key columns and the
    /// model's outputs.
    fn batch(
        &self,
        backend: &mut dyn Backend,
        batch: &RecordBatch,
        origin: &RowOrigin,
    ) -> Result<RecordBatch, Failure> {
        let data = |error| data_failure(error, &self.column_of);
        let rows = batch.num_rows();
        // Columns to tensors and back in process: no request to encode.
        let tensors =
            input_tensors(&self.input_batch(batch)?, &self.inputs, origin).map_err(data)?;
        let (ordered, _) = prepare_inputs(&self.model, &self.signature, 0, tensors)
            .map_err(|status| (status.code() as i32, status.message().to_owned()))?;
        backend
            .check(&ordered)
            .map_err(backend_failure)
            .map_err(|(code, message)| (code, rows_named(origin, rows, &message)))?;
        let outputs = backend
            .infer(ordered)
            .map_err(backend_failure)
            .map_err(|(code, message)| (code, rows_named(origin, rows, &message)))?;
        let columns = tensors_to_columns(&outputs, rows).map_err(data)?;
        PartWriter::batch(&self.key_batch(batch)?, columns).map_err(data)
    }

    /// Appends a scored batch to the part (created at the first).
    fn write(&self, out: &RecordBatch, writer: &mut Option<PartWriter>) -> Result<(), Failure> {
        let data = |error| data_failure(error, &self.column_of);
        if writer.is_none() {
            *writer = Some(self.writer(out.schema()).map_err(data)?);
        }
        if let Some(writer) = writer.as_mut() {
            writer.write(out).map_err(data)?;
        }
        Ok(())
    }

    /// The input columns, named after the model inputs they feed.
    fn input_batch(&self, batch: &RecordBatch) -> Result<RecordBatch, Failure> {
        let mut fields = Vec::with_capacity(self.inputs.len());
        let mut arrays = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            let column = &self.column_of[&input.name];
            let index = batch
                .schema()
                .index_of(column)
                .map_err(|error| (Code::Internal as i32, format!("column '{column}': {error}")))?;
            let field = batch.schema().field(index).clone();
            fields.push(field.with_name(input.name.clone()));
            arrays.push(batch.column(index).clone());
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|error| (Code::Internal as i32, error.to_string()))
    }

    /// The key columns of `batch`.
    fn key_batch(&self, batch: &RecordBatch) -> Result<RecordBatch, Failure> {
        let mut indices = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            indices.push(batch.schema().index_of(key).map_err(|error| {
                (
                    Code::Internal as i32,
                    format!("key column '{key}': {error}"),
                )
            })?);
        }
        batch
            .project(&indices)
            .map_err(|error| (Code::Internal as i32, error.to_string()))
    }

    /// The part of a shard without rows: the key columns' types from the
    /// shard's schema (text files), the outputs' from the model.
    fn empty(&self, shard: &Shard) -> shamal_batch_io::Result<PartWriter> {
        let bad = |reason: String| shamal_batch_io::Error::BadOutput {
            output: "*".to_owned(),
            reason,
        };
        let schema: Option<SchemaRef> = shard.schema.clone().map(Arc::new);
        let mut fields: Vec<Field> = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for key in &self.keys {
            let field = schema
                .as_ref()
                .and_then(|schema| schema.field_with_name(key).ok().cloned())
                .ok_or_else(|| {
                    bad(format!(
                        "the shard has no rows and its key column '{key}' has no known type"
                    ))
                })?;
            arrays.push(arrow::array::new_empty_array(field.data_type()));
            fields.push(field);
        }
        let keys = RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            arrays,
            &RecordBatchOptions::new().with_row_count(Some(0)),
        )
        .map_err(|error| bad(error.to_string()))?;
        let outputs: Vec<Tensor> = self
            .signature
            .outputs
            .iter()
            .map(|spec| {
                let mut shape: Vec<i64> = spec
                    .dims
                    .iter()
                    .map(|&dim| if dim < 0 { 1 } else { dim })
                    .collect();
                if let Some(first) = shape.first_mut() {
                    *first = 0;
                } else {
                    shape.push(0);
                }
                let data = match spec.datatype.element_size() {
                    Some(_) => TensorData::Fixed(bytes::Bytes::new()),
                    None => TensorData::Strings(Vec::new()),
                };
                Tensor {
                    name: spec.name.clone(),
                    datatype: spec.datatype,
                    shape,
                    data,
                }
            })
            .collect();
        let columns = tensors_to_columns(&outputs, 0)?;
        let out = PartWriter::batch(&keys, columns)?;
        let mut writer = self.writer(out.schema())?;
        writer.write(&out)?;
        Ok(writer)
    }

    /// The part's writer (encrypting when the task asks).
    fn writer(&self, schema: SchemaRef) -> shamal_batch_io::Result<PartWriter> {
        PartWriter::create_with(&self.dir, self.shard_index, schema, self.encryption.clone())
    }
}

/// `message`, saying which rows failed.
fn rows_named(origin: &RowOrigin, rows: usize, message: &str) -> String {
    format!(
        "rows {}..{} of {}: {message}",
        origin.first_row,
        origin.first_row + rows as u64,
        origin.location
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_failures_have_the_code_that_fits_and_name_the_column() {
        let columns: HashMap<String, String> =
            [("INPUT0".to_owned(), "features".to_owned())].into();
        let (code, message) = data_failure(
            shamal_batch_io::Error::BadRow {
                column: "INPUT0".to_owned(),
                row: 7,
                location: "file '/d/a.parquet'".to_owned(),
                reason: "null".to_owned(),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::InvalidArgument);
        assert!(message.contains("column 'features', row 7"), "{message}");
        let (code, _) = data_failure(
            shamal_batch_io::Error::CorruptFile {
                file: "x".to_owned(),
                reason: "y".to_owned(),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::InvalidArgument);
        let (code, _) = data_failure(
            shamal_batch_io::Error::UnreadablePath {
                path: "x".to_owned(),
                source: std::io::Error::other("gone"),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::Unavailable);
        let (code, _) = data_failure(
            shamal_batch_io::Error::Write {
                path: "x".to_owned(),
                source: std::io::Error::other("full"),
            },
            &columns,
        );
        assert_eq!(Code::from(code), Code::Internal);
    }

    #[test]
    fn a_shard_runs_in_the_tasks_batches_unless_the_model_pads_or_cannot_batch() {
        // demo: max_batch_size 64, a variable first dimension, no padding.
        assert_eq!(rows_per_execution(1024, 64, true), 1024);
        // A text encoder (pads) or a file with a fixed first dimension.
        assert_eq!(rows_per_execution(1024, 32, false), 32);
        // Below the cap, or no cap: the task's.
        assert_eq!(rows_per_execution(16, 32, false), 16);
        assert_eq!(rows_per_execution(1024, 0, false), 1024);
        // No batch size in the task: the default, capped alike.
        assert_eq!(rows_per_execution(0, 0, true), DEFAULT_BATCH_SIZE);
        assert_eq!(rows_per_execution(0, 64, false), 64);
    }

    #[test]
    fn a_chunk_is_whole_executions_of_at_least_chunk_rows() {
        assert_eq!(rows_per_chunk(1024), CHUNK_ROWS);
        assert_eq!(rows_per_chunk(1000), 9000);
        assert_eq!(rows_per_chunk(32), CHUNK_ROWS);
        assert_eq!(rows_per_chunk(20_000), 20_000);
        assert_eq!(rows_per_chunk(0), CHUNK_ROWS);
        for per_execution in [1, 7, 64, 1000, 5000, 9000] {
            let chunk = rows_per_chunk(per_execution);
            assert_eq!(chunk % per_execution, 0, "{per_execution}");
            assert!(chunk >= CHUNK_ROWS && chunk < CHUNK_ROWS + per_execution);
        }
    }

    #[test]
    fn local_and_s3_outputs_are_written_and_other_schemes_refused() {
        assert_eq!(
            output_dir("/out").unwrap().local_dir(),
            Some(std::path::Path::new("/out"))
        );
        assert_eq!(
            output_dir("file:///out").unwrap().local_dir(),
            Some(std::path::Path::new("/out"))
        );
        let s3 = output_dir("s3://bucket/out").unwrap();
        assert_eq!(s3.local_dir(), None);
        assert_eq!(
            s3.file("part-000001.parquet"),
            "s3://bucket/out/part-000001.parquet"
        );
        let (code, message) = output_dir("gs://bucket/out").unwrap_err();
        assert_eq!(Code::from(code), Code::FailedPrecondition);
        assert!(message.contains("gs://bucket/out"), "{message}");
        assert_eq!(
            Code::from(output_dir("").unwrap_err().0),
            Code::InvalidArgument
        );
    }
}
