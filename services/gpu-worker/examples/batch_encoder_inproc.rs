//! In-process batch-scoring baseline of a text sentence encoder for batch
//! jobs (issue 17): reads a Parquet file's text column with the
//! `parquet`/`arrow` crates and runs the gpu-worker's own candle backend
//! (the `Backend` its instances use: tokenisation, padding, forward pass,
//! pooling) over every row, `--batch` sentences per call, on this thread:
//! no server, no queue, no shards. `loadtests/batch-bench.sh` compares a
//! batch job's rows/s with it.
//!
//! What the timed loop includes, per pass over the file: opening the file
//! and reading its footer, decoding the text column `--batch` rows at a
//! time, copying the strings into the BYTES input tensor, `infer`
//! (tokenise + encode), reading the embeddings (a checksum), and with
//! `--write DIR` building the output's Arrow columns (key columns + the
//! embedding as a FixedSizeList) and writing them to one Snappy Parquet
//! file in DIR, as a batch job's part. Loading the model is not timed.
//! candle's CPU threads come from `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`
//! (the gpu-worker sets both to 1 on the CPU unless configured; set them
//! so here to compare with one worker).
//!
//! ```text
//! RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 \
//! cargo run --release -p shamal-gpu-worker --example batch_encoder_inproc -- \
//!     --model models/gpu/repository/minilm_tiny_text/1/model.json \
//!     --input sentences.parquet --batch 1024
//! ```

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch};
use arrow::datatypes::{DataType as ArrowType, Field, Schema};
use bytes::Bytes;
use clap::Parser;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shamal_gpu_worker::spec::{EncoderInputs, ModelSpec, encoder_io, read_spec};
use shamal_gpu_worker::{CandleRuntime, DevicePreference, device};
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::{Backend, InstanceOptions, Runtime};

/// In-process sentences/s of a text encoder over a Parquet file.
#[derive(Debug, Parser)]
struct Args {
    /// `model.json` of a text encoder (`"inputs": "text"`), weights and
    /// tokenizer next to it.
    #[arg(long)]
    model: PathBuf,
    /// The Parquet file.
    #[arg(long)]
    input: PathBuf,
    /// The text column (Utf8 or LargeUtf8).
    #[arg(long, default_value = "text")]
    column: String,
    /// Key columns copied to the output with `--write` (repeat).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// Sentences per call (and per decoded record batch).
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Score only the first N rows (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Passes over the file; the best is reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also write the key columns and embeddings as Snappy Parquet into
    /// this directory (one file, replaced every round).
    #[arg(long)]
    write: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto")]
    device: DevicePreference,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One pass's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    rows: usize,
    wall: Duration,
    read: Duration,
    run: Duration,
    write: Duration,
    checksum: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.rounds == 0 {
        bail!("--batch and --rounds must be at least 1");
    }
    let located = read_spec(&args.model).map_err(|error| anyhow!(error))?;
    let ModelSpec::BertEncoder(spec) = &located.spec else {
        bail!("{} is not a sentence encoder", args.model.display());
    };
    if spec.inputs != EncoderInputs::Text {
        bail!("{} takes token ids, not text", args.model.display());
    }
    let hidden = spec.hidden;
    let device = device::select(args.device, 0).map_err(|error| anyhow!(error))?;
    let label = device::label(&device);
    let runtime = CandleRuntime::new(device);
    let mut backend = runtime
        .instantiate(&args.model, &InstanceOptions::default())
        .map_err(|error| anyhow!("{error}"))
        .with_context(|| format!("loading {}", args.model.display()))?;
    println!(
        "=== in-process candle text encoder: {} on {label} over {} ===",
        args.model.display(),
        args.input.display()
    );
    println!(
        "setup        hidden {hidden}, {} layers, max_seq_len {}, batch {}, candle CPU threads {}, write {}",
        spec.layers,
        spec.max_seq_len(),
        args.batch,
        candle_core::utils::get_num_threads(),
        args.write
            .as_ref()
            .map_or("off".to_owned(), |dir| dir.display().to_string())
    );

    let mut passes = Vec::new();
    for round in 1..=args.rounds {
        let pass = one_pass(&args, backend.as_mut(), hidden)?;
        println!(
            "round {round}      {:>10.1} sentences/s   {} rows in {:.3} s  (read+convert {:.3} s, \
             infer {:.3} s, write {:.3} s, checksum {:.3})",
            pass.rows as f64 / pass.wall.as_secs_f64(),
            pass.rows,
            pass.wall.as_secs_f64(),
            pass.read.as_secs_f64(),
            pass.run.as_secs_f64(),
            pass.write.as_secs_f64(),
            pass.checksum
        );
        passes.push(pass);
    }
    let rate = |pass: &Pass| pass.rows as f64 / pass.wall.as_secs_f64();
    let best = passes
        .iter()
        .copied()
        .max_by(|a, b| rate(a).total_cmp(&rate(b)))
        .unwrap_or_default();
    println!("best         {:.1} sentences/s", rate(&best));
    if let Some(path) = &args.json {
        let document = serde_json::json!({
            "label": "in-process candle text encoder over Parquet",
            "model": args.model.display().to_string(),
            "input": args.input.display().to_string(),
            "device": label,
            "batch": args.batch,
            "threads": candle_core::utils::get_num_threads(),
            "write": args.write.is_some(),
            "rows": best.rows,
            "wall_s": best.wall.as_secs_f64(),
            "rows_per_s": rate(&best),
            "read_s": best.read.as_secs_f64(),
            "run_s": best.run.as_secs_f64(),
            "write_s": best.write.as_secs_f64(),
            "rounds_rows_per_s": passes.iter().map(rate).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Reads, encodes (and writes) the file, or its first `--limit` rows, once.
fn one_pass(args: &Args, backend: &mut dyn Backend, hidden: usize) -> Result<Pass> {
    let started = Instant::now();
    let mut pass = Pass::default();
    let mut clock = Instant::now();
    let file =
        File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let arrow_schema = builder.schema().clone();
    let mut wanted: Vec<&str> = vec![&args.column];
    if args.write.is_some() {
        wanted.extend(args.keys.iter().map(String::as_str));
    }
    let mut roots = Vec::new();
    for name in &wanted {
        roots.push(
            arrow_schema
                .index_of(name)
                .with_context(|| format!("column '{name}' not in {}", args.input.display()))?,
        );
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let mut builder = builder.with_projection(mask).with_batch_size(args.batch);
    if args.limit > 0 {
        builder = builder.with_limit(args.limit);
    }
    let reader = builder.build()?;
    let mut writer: Option<ArrowWriter<File>> = None;
    pass.read += clock.elapsed();

    clock = Instant::now();
    for batch in reader {
        let batch = batch?;
        let rows = batch.num_rows();
        let array = batch
            .column_by_name(&args.column)
            .ok_or_else(|| anyhow!("column '{}' missing from a record batch", args.column))?;
        let strings = strings(array.as_ref())?;
        let input = Tensor {
            name: encoder_io::TEXT.to_owned(),
            datatype: DataType::Bytes,
            shape: vec![rows as i64],
            data: TensorData::Strings(strings),
        };
        pass.read += clock.elapsed();

        clock = Instant::now();
        let outputs = backend
            .infer(vec![input])
            .map_err(|error| anyhow!("{error}"))?;
        let embedding = outputs
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("the encoder returned no output"))?;
        if embedding.shape != [rows as i64, hidden as i64] {
            bail!("unexpected output shape {:?}", embedding.shape);
        }
        let TensorData::Fixed(raw) = &embedding.data else {
            bail!("the embedding is not a fixed-size tensor");
        };
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        pass.checksum += values.iter().map(|v| f64::from(*v)).sum::<f64>();
        pass.run += clock.elapsed();

        clock = Instant::now();
        if let Some(dir) = &args.write {
            let mut fields = Vec::new();
            let mut arrays: Vec<ArrayRef> = Vec::new();
            for key in &args.keys {
                let array = batch
                    .column_by_name(key)
                    .ok_or_else(|| anyhow!("key column '{key}' missing"))?;
                fields.push(Field::new(key, array.data_type().clone(), true));
                arrays.push(array.clone());
            }
            let item = Arc::new(Field::new("item", ArrowType::Float32, true));
            fields.push(Field::new(
                encoder_io::EMBEDDING,
                ArrowType::FixedSizeList(item.clone(), hidden as i32),
                false,
            ));
            arrays.push(Arc::new(FixedSizeListArray::try_new(
                item,
                hidden as i32,
                Arc::new(Float32Array::from(values)),
                None,
            )?));
            let schema = Arc::new(Schema::new(fields));
            let out = RecordBatch::try_new(schema.clone(), arrays)?;
            if writer.is_none() {
                std::fs::create_dir_all(dir)?;
                let file = File::create(dir.join("part-000000.parquet"))?;
                // As a job's part is written.
                let properties = shamal_batch_io::part_writer_properties(&schema);
                writer = Some(ArrowWriter::try_new(file, schema, Some(properties))?);
            }
            if let Some(writer) = writer.as_mut() {
                writer.write(&out)?;
            }
        }
        pass.write += clock.elapsed();
        pass.rows += rows;
        clock = Instant::now();
    }
    pass.read += clock.elapsed();
    clock = Instant::now();
    if let Some(writer) = writer {
        writer.close()?;
    }
    pass.write += clock.elapsed();
    pass.wall = started.elapsed();
    Ok(pass)
}

/// The column's strings, one buffer each (the BYTES tensor's elements).
fn strings(array: &dyn Array) -> Result<Vec<Bytes>> {
    if array.null_count() > 0 {
        bail!("the text column has nulls");
    }
    Ok(match array.data_type() {
        ArrowType::Utf8 => array
            .as_string::<i32>()
            .iter()
            .map(|s| Bytes::copy_from_slice(s.unwrap_or_default().as_bytes()))
            .collect(),
        ArrowType::LargeUtf8 => array
            .as_string::<i64>()
            .iter()
            .map(|s| Bytes::copy_from_slice(s.unwrap_or_default().as_bytes()))
            .collect(),
        other => bail!("the text column is {other}, not Utf8"),
    })
}
