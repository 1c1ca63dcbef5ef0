//! In-process batch-scoring baseline for batch jobs (issue 17): reads a
//! Parquet file with the `parquet`/`arrow` crates and runs an ONNX model
//! on ONNX Runtime over every row, `--batch` rows per `session.run`, on
//! this thread: no server, no queue, no shards. `loadtests/batch-bench.sh`
//! compares a batch job's rows/s with it.
//!
//! The session is built the way the cpu-worker builds its instances
//! (graph optimisation `all`, `--intra-threads` intra-op threads, no
//! intra-op spinning). What the timed loop includes, per run over the file:
//! opening the file and reading its footer, decoding the projected input
//! column (and with `--write` the key columns) `--batch` rows at a time,
//! copying the FixedSizeList's values into the input tensor, `session.run`,
//! reading the output tensor (a checksum, so that nothing is optimised
//! away), and with `--write DIR` building the output's Arrow columns (key
//! columns + one FixedSizeList per output) and writing them to one Snappy
//! Parquet file in DIR, as a batch job's part. Loading the model is not
//! timed.
//!
//! `--parallel N` runs N such loops at once on N threads, each with a
//! session of its own over a contiguous share of the file's row groups
//! (and with `--write` a part of its own), timed from the start to the
//! last thread's end: the cheapest way to score the file on N cores, the
//! floor of a job on N workers (no queue, no coordinator, no checksums).
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p shamal-cpu-worker --example batch_inproc -- \
//!     --model models/repository/demo/1/model.onnx --input rows.parquet \
//!     --column INPUT0 --batch 1024 --rounds 3
//! ```

use std::fmt::Display;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use clap::Parser;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Tensor, TensorElementType};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// In-process rows/s of an ONNX model over a Parquet file.
#[derive(Debug, Parser)]
struct Args {
    /// Path of the ONNX model (one FP32 input `[-1, N]`).
    #[arg(long)]
    model: PathBuf,
    /// The Parquet file.
    #[arg(long)]
    input: PathBuf,
    /// The column holding the model's input (a FixedSizeList or List of N
    /// float32 per row); default: the model input's name.
    #[arg(long)]
    column: Option<String>,
    /// Key columns copied to the output with `--write` (repeat).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// Rows per `session.run` (and per decoded record batch).
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 1)]
    intra_threads: usize,
    /// Loops run at once, each on its own thread and session over its
    /// share of the row groups (and writing its own part).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Passes over the whole file; the best is reported (and every one
    /// printed), so a shared VM's transient contention shows as spread.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also write the key columns and outputs as Snappy Parquet into this
    /// directory (one file, replaced every round), as a batch job does.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn ort_err(e: impl Display) -> anyhow::Error {
    anyhow!("onnxruntime: {e}")
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
    if args.batch == 0 || args.rounds == 0 || args.parallel == 0 {
        bail!("--batch, --rounds and --parallel must be at least 1");
    }
    let dylib = std::env::var("ORT_DYLIB_PATH")
        .context("ORT_DYLIB_PATH is not set (source scripts/env.sh)")?;
    let environment = ort::init_from(&dylib)
        .map_err(ort_err)?
        .with_name("batch_inproc")
        .with_telemetry(false)
        .build()
        .map_err(ort_err)?;
    let open = || -> Result<Session> {
        Session::builder(&environment)
            .map_err(ort_err)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort_err)?
            .with_intra_threads(args.intra_threads)
            .map_err(ort_err)?
            .with_intra_op_spinning(false)
            .map_err(ort_err)?
            .commit_from_file(&args.model)
            .map_err(ort_err)
            .with_context(|| format!("loading {}", args.model.display()))
    };
    let mut sessions = (0..args.parallel)
        .map(|_| open())
        .collect::<Result<Vec<Session>>>()?;
    let session = &sessions[0];

    let [input] = session.inputs() else {
        bail!("the model must have exactly one input");
    };
    let input_name = input.name().to_string();
    let dtype = input.dtype();
    if dtype.tensor_type() != Some(TensorElementType::Float32) {
        bail!("input {input_name} is {dtype:?}; only FP32 is supported");
    }
    let width = dtype
        .tensor_shape()
        .map(|shape| shape.to_vec())
        .unwrap_or_default()
        .get(1)
        .copied()
        .filter(|&d| d > 0)
        .ok_or_else(|| anyhow!("input {input_name} is not [-1, N]"))? as usize;
    let outputs: Vec<String> = session
        .outputs()
        .iter()
        .map(|output| output.name().to_string())
        .collect();
    let column = args.column.clone().unwrap_or_else(|| input_name.clone());

    println!(
        "=== in-process batch scoring: {} over {} ===",
        args.model.display(),
        args.input.display()
    );
    println!(
        "setup        input {input_name} [-1, {width}] from column '{column}', batch {}, \
         intra threads {}, parallel {}, write {}",
        args.batch,
        args.intra_threads,
        args.parallel,
        args.write
            .as_ref()
            .map_or("off".to_owned(), |dir| dir.display().to_string())
    );

    let mut passes = Vec::new();
    for round in 1..=args.rounds {
        let pass = parallel_pass(&args, &mut sessions, &input_name, width, &column, &outputs)?;
        println!(
            "round {round}      {:>10.0} rows/s   {} rows in {:.3} s  (read+convert {:.3} s, \
             run {:.3} s, write {:.3} s, checksum {:.3})",
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
    println!("best         {:.0} rows/s", rate(&best));
    if let Some(path) = &args.json {
        let document = serde_json::json!({
            "label": "in-process ONNX Runtime over Parquet",
            "model": args.model.display().to_string(),
            "input": args.input.display().to_string(),
            "batch": args.batch,
            "intra_threads": args.intra_threads,
            "parallel": args.parallel,
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

/// Scores the whole file once on `sessions.len()` threads, each over its
/// share of the row groups: the wall time to the last one's end; rows,
/// read, run and write times and checksums summed.
fn parallel_pass(
    args: &Args,
    sessions: &mut [Session],
    input_name: &str,
    width: usize,
    column: &str,
    outputs: &[String],
) -> Result<Pass> {
    let started = Instant::now();
    let groups = ParquetRecordBatchReaderBuilder::try_new(
        File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?,
    )?
    .metadata()
    .num_row_groups();
    let threads = sessions.len();
    let passes = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .enumerate()
            .map(|(index, session)| {
                let share = (groups * index / threads)..(groups * (index + 1) / threads);
                let only = (threads > 1).then_some(share);
                scope.spawn(move || {
                    one_pass(
                        args, session, input_name, width, column, outputs, only, index,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .map_err(|_| anyhow!("a scoring thread panicked"))?
            })
            .collect::<Result<Vec<Pass>>>()
    })?;
    let mut total = Pass::default();
    for pass in passes {
        total.rows += pass.rows;
        total.read += pass.read;
        total.run += pass.run;
        total.write += pass.write;
        total.checksum += pass.checksum;
    }
    total.wall = started.elapsed();
    Ok(total)
}

/// Reads, scores (and writes) the file once (only row groups `groups`
/// when given, writing part `part`).
#[allow(clippy::too_many_arguments)]
fn one_pass(
    args: &Args,
    session: &mut Session,
    input_name: &str,
    width: usize,
    column: &str,
    outputs: &[String],
    groups: Option<std::ops::Range<usize>>,
    part: usize,
) -> Result<Pass> {
    let started = Instant::now();
    let mut pass = Pass::default();
    let mut clock = Instant::now();
    let file =
        File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    if let Some(groups) = groups {
        builder = builder.with_row_groups(groups.collect());
    }
    let arrow_schema = builder.schema().clone();
    let mut wanted: Vec<&str> = vec![column];
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
    let reader = builder
        .with_projection(mask)
        .with_batch_size(args.batch)
        .build()?;
    let mut writer: Option<ArrowWriter<File>> = None;
    pass.read += clock.elapsed();

    clock = Instant::now();
    for batch in reader {
        let batch = batch?;
        let rows = batch.num_rows();
        let array = batch
            .column_by_name(column)
            .ok_or_else(|| anyhow!("column '{column}' missing from a record batch"))?;
        let values = list_values(array.as_ref(), width)?;
        let tensor = Tensor::from_array((vec![rows as i64, width as i64], values))
            .map_err(ort_err)?
            .into_dyn();
        pass.read += clock.elapsed();

        clock = Instant::now();
        let result = session.run(vec![(input_name, &tensor)]).map_err(ort_err)?;
        let mut columns: Vec<(String, Vec<f32>, usize)> = Vec::new();
        for name in outputs {
            let (shape, data) = result[name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(ort_err)?;
            pass.checksum += data.iter().map(|v| f64::from(*v)).sum::<f64>();
            if args.write.is_some() {
                let per_row = shape.iter().skip(1).product::<i64>().max(1) as usize;
                columns.push((name.clone(), data.to_vec(), per_row));
            }
        }
        drop(result);
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
            for (name, data, per_row) in columns {
                let item = Arc::new(Field::new("item", DataType::Float32, true));
                fields.push(Field::new(
                    name,
                    DataType::FixedSizeList(item.clone(), per_row as i32),
                    false,
                ));
                arrays.push(Arc::new(FixedSizeListArray::try_new(
                    item,
                    per_row as i32,
                    Arc::new(Float32Array::from(data)),
                    None,
                )?));
            }
            let schema = Arc::new(Schema::new(fields));
            let out = RecordBatch::try_new(schema.clone(), arrays)?;
            if writer.is_none() {
                std::fs::create_dir_all(dir)?;
                let file = File::create(dir.join(format!("part-{part:06}.parquet")))?;
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

/// The row-major FP32 values of a FixedSizeList / List column of `width`
/// float32 per row, copied into one vector (the input tensor's buffer).
fn list_values(array: &dyn Array, width: usize) -> Result<Vec<f32>> {
    let (values, expected) = match array.data_type() {
        DataType::FixedSizeList(_, size) => {
            let list = array.as_fixed_size_list();
            if *size as usize != width {
                bail!("the column holds {size} values per row, the model takes {width}");
            }
            let start = list.offset() * width;
            (list.values().slice(start, list.len() * width), list.len())
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let offsets = list.value_offsets();
            let (first, last) = (offsets[0] as usize, offsets[list.len()] as usize);
            if last - first != list.len() * width {
                bail!("the column's lists are not all {width} long");
            }
            (list.values().slice(first, last - first), list.len())
        }
        other => bail!("the input column is {other}, not a list of float32"),
    };
    if values.null_count() > 0 || array.null_count() > 0 {
        bail!("the input column has nulls");
    }
    let floats = values
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| anyhow!("the input column's values are not float32"))?;
    debug_assert_eq!(floats.len(), expected * width);
    Ok(floats.values().to_vec())
}
