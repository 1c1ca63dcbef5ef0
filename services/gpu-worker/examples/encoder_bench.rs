//! In-process sentence-encoder benchmark: one candle model instance (the
//! worker's own `Backend`, same tensor conversion and forward pass) called
//! in a loop on this thread, no server, no batcher. The baseline that
//! `loadtests/gpu-bench.sh` compares router + gpu-worker with.
//!
//! ```text
//! cargo run --release -p shamal-gpu-worker --example encoder_bench -- \
//!     --model models/gpu/repository/minilm_tiny/1/model.json \
//!     --batch 1,8,32,128 --seq-len 32 --duration 5s
//! ```
//!
//! Every row is `seq-len` tokens long (token ids drawn from 0..100, like
//! `shamal-loadgen`'s INT64 inputs, attention mask all 1).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use shamal_gpu_worker::spec::{EncoderInputs, ModelSpec, encoder_io, read_spec};
use shamal_gpu_worker::{CandleRuntime, DevicePreference, device};
use shamal_tensor::{DataType, Tensor};
use shamal_worker::{InstanceOptions, Runtime};

/// In-process throughput of a candle sentence encoder (token-id form).
#[derive(Debug, Parser)]
struct Args {
    /// `model.json` (weights next to it) or a `.safetensors` embedding its spec.
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes (sentences per call), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    batch: Vec<usize>,
    /// Tokens per sentence.
    #[arg(long, default_value_t = 32)]
    seq_len: usize,
    /// Measurement time per batch size, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Time spent running before measuring, per batch size.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Rounds over all batch sizes; each batch size reports its best round
    /// (a shared VM's transient contention then shows as spread, not as
    /// the result).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto")]
    device: DevicePreference,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let located = read_spec(&args.model).map_err(|error| anyhow!(error))?;
    let ModelSpec::BertEncoder(spec) = &located.spec else {
        bail!("{} is not a sentence encoder", args.model.display());
    };
    if spec.inputs != EncoderInputs::TokenIds {
        bail!(
            "{} takes text; give the token-id form of the model (\"inputs\": \"token_ids\")",
            args.model.display()
        );
    }
    if args.seq_len == 0 || args.seq_len > spec.max_seq_len() {
        bail!(
            "--seq-len must be within 1..={} for this model",
            spec.max_seq_len()
        );
    }
    let device = device::select(args.device, 0).map_err(|error| anyhow!(error))?;
    let label = device::label(&device);
    let runtime = CandleRuntime::new(device);
    let loading = Instant::now();
    let mut backend = runtime
        .instantiate(&args.model, &InstanceOptions::default())
        .map_err(|error| anyhow!("{error}"))
        .with_context(|| format!("loading {}", args.model.display()))?;
    println!(
        "=== in-process candle: {} on {label} ===",
        args.model.display()
    );
    println!(
        "model        bert_encoder hidden {}, {} layers, {} heads, vocab {} (loaded in {:.2} s)",
        spec.hidden,
        spec.layers,
        spec.heads,
        spec.vocab_size,
        loading.elapsed().as_secs_f64()
    );
    println!(
        "threads      candle CPU threads {} (RAYON_NUM_THREADS or all cores)",
        candle_core::utils::get_num_threads()
    );

    let vocab = spec.vocab_size.min(100) as u64;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    if args.batch.contains(&0) || args.rounds == 0 {
        bail!("batch sizes and rounds must be at least 1");
    }
    // Per batch size, the measurement of every round.
    let mut rounds: Vec<Vec<serde_json::Value>> = vec![Vec::new(); args.batch.len()];
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            println!("round {round} of {}", args.rounds);
        }
        for (index, &batch) in args.batch.iter().enumerate() {
            let ids: Vec<i64> = (0..batch * args.seq_len)
                .map(|_| (rng.next() % vocab) as i64)
                .collect();
            let mask = vec![1i64; batch * args.seq_len];
            let shape = vec![batch as i64, args.seq_len as i64];
            let inputs = vec![
                int64(encoder_io::INPUT_IDS, shape.clone(), &ids)?,
                int64(encoder_io::ATTENTION_MASK, shape, &mask)?,
            ];
            let mut run_once = || -> Result<()> {
                let outputs = backend
                    .infer(inputs.clone())
                    .map_err(|error| anyhow!("{error}"))?;
                if outputs[0].shape != [batch as i64, spec.hidden as i64] {
                    bail!("unexpected output shape {:?}", outputs[0].shape);
                }
                Ok(())
            };
            let warmup_end = Instant::now() + args.warmup;
            run_once()?;
            while Instant::now() < warmup_end {
                run_once()?;
            }
            let mut latencies_us: Vec<u64> = Vec::new();
            let start = Instant::now();
            let end = start + args.duration;
            // At least three runs, however long one takes.
            while Instant::now() < end || latencies_us.len() < 3 {
                let t = Instant::now();
                run_once()?;
                latencies_us.push(t.elapsed().as_micros() as u64);
            }
            let elapsed = start.elapsed().as_secs_f64();
            latencies_us.sort_unstable();
            let runs = latencies_us.len();
            let pct = |q: f64| -> u64 {
                let rank = ((q * runs as f64).ceil() as usize).clamp(1, runs);
                latencies_us[rank - 1]
            };
            let sentences_per_s = (runs * batch) as f64 / elapsed;
            println!(
                "batch {batch:>4}   {sentences_per_s:>10.1} sentences/s   {runs:>6} runs   \
             latency p50 {} us  p99 {} us",
                pct(0.5),
                pct(0.99)
            );
            rounds[index].push(serde_json::json!({
                "batch": batch,
                "runs": runs,
                "duration_s": elapsed,
                "sentences_per_s": sentences_per_s,
                "p50_us": pct(0.5),
                "p99_us": pct(0.99),
            }));
        }
    }
    let throughput = |value: &serde_json::Value| value["sentences_per_s"].as_f64().unwrap_or(0.0);
    let mut results = Vec::new();
    for (measured, &batch) in rounds.iter().zip(&args.batch) {
        let best = measured
            .iter()
            .max_by(|a, b| throughput(a).total_cmp(&throughput(b)))
            .cloned()
            .unwrap_or_default();
        if args.rounds > 1 {
            let all: Vec<String> = measured
                .iter()
                .map(|value| format!("{:.1}", throughput(value)))
                .collect();
            println!(
                "batch {batch:>4}   best {:>8.1} sentences/s   (rounds: {})",
                throughput(&best),
                all.join(", ")
            );
        }
        let mut entry = best;
        entry["rounds"] = serde_json::Value::Array(measured.clone());
        results.push(entry);
    }
    if let Some(path) = &args.json {
        let document = serde_json::json!({
            "label": "candle in-process",
            "model": args.model.display().to_string(),
            "device": label,
            "seq_len": args.seq_len,
            "threads": candle_core::utils::get_num_threads(),
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn int64(name: &str, shape: Vec<i64>, values: &[i64]) -> Result<Tensor> {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    Tensor::from_raw(name, DataType::Int64, shape, Bytes::from(bytes))
        .map_err(|error| anyhow!("{error}"))
}

/// Small deterministic generator for token ids.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Parses `5s`, `500ms`, `250us`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let value: f64 = text[..split]
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let scale = match &text[split..] {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        "m" => 60.0,
        unit => return Err(format!("bad duration unit {unit:?} in {text:?}")),
    };
    Ok(Duration::from_secs_f64(value * scale))
}
