//! Raw ONNX Runtime benchmark: `session.run` in a loop on one thread, no server.
//! This is the baseline the serving stack is compared with.
//!
//! With `--loopback` each inference instead goes through the cheapest server
//! there can be: this thread sends the input bytes over a loopback TCP socket
//! to a second thread, which copies them into tensors, runs the session and
//! writes the output bytes back (no framing, no protocol, no queue). Its
//! latency minus the tight loop's is the floor that any server on the same
//! machine adds; `--loopback-spin` makes both sides busy-poll their sockets
//! instead of sleeping in `read`.
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p shamal-cpu-worker --example ort_raw -- \
//!     --model models/repository/demo/1/model.onnx --batch 1 --duration 5s
//! ```

use std::fmt::Display;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor, TensorElementType};

/// In-process ONNX Runtime benchmark with random FP32 inputs.
#[derive(Debug, Parser)]
struct Args {
    /// Path of the ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Leading (batch) dimension given to inputs whose first dimension is dynamic.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Measurement time, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Time spent running before measuring.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 1)]
    intra_threads: usize,
    /// Idle time between two runs, in microseconds (0: back to back). A
    /// served model is idle between requests (the client's round trip), so
    /// its caches and cores are colder than in a tight loop; a gap makes the
    /// baseline see the same.
    #[arg(long, default_value_t = 0)]
    gap_us: u64,
    /// Spend the gap busy-waiting on this thread instead of sleeping: the
    /// core stays awake, as it does under a worker that polls for its next
    /// request before parking.
    #[arg(long)]
    gap_spin: bool,
    /// Serve each inference over a loopback TCP socket from a second thread
    /// (the floor any server adds; see the file's documentation).
    #[arg(long, conflicts_with = "gap_us")]
    loopback: bool,
    /// With --loopback: both threads busy-poll their sockets instead of
    /// blocking in `read`, so neither ever sleeps.
    #[arg(long, requires = "loopback")]
    loopback_spin: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn ort_err(e: impl Display) -> anyhow::Error {
    anyhow!("onnxruntime: {e}")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dylib = std::env::var("ORT_DYLIB_PATH")
        .context("ORT_DYLIB_PATH is not set (source scripts/env.sh)")?;
    let environment = ort::init_from(&dylib)
        .map_err(ort_err)?
        .with_name("ort_raw")
        .build()
        .map_err(ort_err)?;
    let mut session = Session::builder(&environment)
        .map_err(ort_err)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort_err)?
        .with_intra_threads(args.intra_threads)
        .map_err(ort_err)?
        .commit_from_file(&args.model)
        .map_err(ort_err)
        .with_context(|| format!("loading {}", args.model.display()))?;

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut inputs: Vec<(String, DynValue)> = Vec::new();
    let mut specs: Vec<InputSpec> = Vec::new();
    for outlet in session.inputs() {
        let dtype = outlet.dtype();
        if dtype.tensor_type() != Some(TensorElementType::Float32) {
            bail!(
                "input {} is {dtype:?}; only FP32 inputs are supported",
                outlet.name()
            );
        }
        let shape: Vec<i64> = dtype
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, &d)| match (i, d) {
                (0, d) if d < 0 => args.batch as i64,
                (_, d) if d < 0 => 1,
                (_, d) => d,
            })
            .collect();
        let count = shape.iter().product::<i64>() as usize;
        let data: Vec<f32> = (0..count).map(|_| rng.next_f32()).collect();
        println!("input {} shape {shape:?}", outlet.name());
        specs.push(InputSpec {
            name: outlet.name().to_string(),
            shape: shape.clone(),
            data: data.clone(),
        });
        let tensor = Tensor::from_array((shape, data)).map_err(ort_err)?;
        inputs.push((outlet.name().to_string(), tensor.into_dyn()));
    }

    if args.loopback {
        drop(inputs);
        return loopback(&args, session, specs);
    }

    let run_once = |session: &mut Session| -> Result<()> {
        let feed: Vec<(&str, &DynValue)> = inputs.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let outputs = session.run(feed).map_err(ort_err)?;
        drop(outputs);
        Ok(())
    };

    let warmup_end = Instant::now() + args.warmup;
    run_once(&mut session)?;
    while Instant::now() < warmup_end {
        run_once(&mut session)?;
    }
    let mut latencies_us: Vec<u64> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let end = start + args.duration;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        run_once(&mut session)?;
        latencies_us.push(t.elapsed().as_micros() as u64);
        if args.gap_us > 0 {
            let gap = Duration::from_micros(args.gap_us);
            if args.gap_spin {
                let until = Instant::now() + gap;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(gap);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    report(&args, latencies_us, elapsed)
}

/// Prints the percentiles and writes the JSON file.
fn report(args: &Args, mut latencies_us: Vec<u64>, elapsed: f64) -> Result<()> {
    latencies_us.sort_unstable();
    let runs = latencies_us.len();
    let pct = |q: f64| -> u64 {
        if runs == 0 {
            return 0;
        }
        let rank = ((q * runs as f64).ceil() as usize).clamp(1, runs);
        latencies_us[rank - 1]
    };
    let (p50, p90, p99, p999) = (pct(0.5), pct(0.9), pct(0.99), pct(0.999));
    let max = latencies_us.last().copied().unwrap_or(0);
    let runs_per_s = runs as f64 / elapsed;
    let ips = runs_per_s * args.batch as f64;

    let (title, label) = if args.loopback {
        ("ONNX Runtime behind a bare loopback socket", "ort_loopback")
    } else {
        ("raw ONNX Runtime", "ort_raw")
    };
    println!("=== {title}: {} ===", args.model.display());
    println!(
        "setup        batch {}, intra threads {}, gap {} us, loopback {}, {:.1} s after {:.1} s warmup",
        args.batch,
        args.intra_threads,
        args.gap_us,
        match (args.loopback, args.loopback_spin) {
            (false, _) => "off",
            (true, false) => "blocking",
            (true, true) => "busy-poll",
        },
        elapsed,
        args.warmup.as_secs_f64()
    );
    println!("runs         {runs} ({runs_per_s:.1} runs/s)");
    println!("throughput   {ips:.1} inferences/s");
    println!("latency us   p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}");

    if let Some(path) = &args.json {
        let model = args
            .model
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let json = format!(
            "{{\n  \"label\": \"{label}\",\n  \"model\": \"{model}\",\n  \"batch\": {},\n  \
             \"intra_threads\": {},\n  \"duration_s\": {elapsed:.3},\n  \"warmup_s\": {:.3},\n  \
             \"runs\": {runs},\n  \"runs_per_s\": {runs_per_s:.3},\n  \"ips\": {ips:.3},\n  \
             \"p50_us\": {p50},\n  \"p90_us\": {p90},\n  \"p99_us\": {p99},\n  \
             \"p999_us\": {p999},\n  \"max_us\": {max}\n}}\n",
            args.batch,
            args.intra_threads,
            args.warmup.as_secs_f64(),
        );
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One model input: name, shape and the values sent every time.
struct InputSpec {
    name: String,
    shape: Vec<i64>,
    data: Vec<f32>,
}

/// `--loopback`: a server thread owns the session; this thread is its client.
fn loopback(args: &Args, session: Session, specs: Vec<InputSpec>) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback socket")?;
    let address = listener.local_addr()?;
    let shapes: Vec<(String, Vec<i64>, usize)> = specs
        .iter()
        .map(|spec| (spec.name.clone(), spec.shape.clone(), spec.data.len()))
        .collect();
    let spin = args.loopback_spin;
    let server = std::thread::Builder::new()
        .name("loopback-server".into())
        .spawn(move || serve(listener, session, shapes, spin))?;

    let mut stream = TcpStream::connect(address).context("connecting to the loopback server")?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(spin)?;
    let request: Vec<u8> = specs
        .iter()
        .flat_map(|spec| spec.data.iter().flat_map(|value| value.to_le_bytes()))
        .collect();
    let mut reply = Vec::new();
    let mut call = |stream: &mut TcpStream| -> Result<()> {
        write_all(stream, &request)?;
        let mut length = [0u8; 4];
        read_exact(stream, &mut length)?;
        reply.resize(u32::from_le_bytes(length) as usize, 0);
        read_exact(stream, &mut reply)
    };

    let warmup_end = Instant::now() + args.warmup;
    call(&mut stream)?;
    while Instant::now() < warmup_end {
        call(&mut stream)?;
    }
    let mut latencies_us: Vec<u64> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let end = start + args.duration;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        call(&mut stream)?;
        latencies_us.push(t.elapsed().as_micros() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(stream);
    let mut runs_us = server
        .join()
        .map_err(|_| anyhow!("the loopback server thread panicked"))??;
    runs_us.sort_unstable();
    if let Some(median) = runs_us.get(runs_us.len() / 2) {
        println!(
            "server: session.run p50 {median} us over {} runs",
            runs_us.len()
        );
    }
    report(args, latencies_us, elapsed)
}

/// The server side of `--loopback`: read one request's input bytes, run,
/// answer with the outputs' bytes behind a 4-byte length, until EOF.
/// Returns how long each `session.run` took, in microseconds.
fn serve(
    listener: TcpListener,
    mut session: Session,
    shapes: Vec<(String, Vec<i64>, usize)>,
    spin: bool,
) -> Result<Vec<u64>> {
    let mut runs_us = Vec::with_capacity(1 << 16);
    let (mut stream, _) = listener.accept()?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(spin)?;
    let mut request = vec![0u8; shapes.iter().map(|(_, _, count)| count * 4).sum()];
    loop {
        match read_exact(&mut stream, &mut request) {
            Ok(()) => {}
            Err(error)
                if error
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == ErrorKind::UnexpectedEof) =>
            {
                return Ok(runs_us);
            }
            Err(error) => return Err(error),
        }
        let mut values: Vec<(&str, DynValue)> = Vec::with_capacity(shapes.len());
        let mut offset = 0;
        for (name, shape, count) in &shapes {
            let bytes = &request[offset..offset + count * 4];
            offset += count * 4;
            let data: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let tensor = Tensor::from_array((shape.clone(), data)).map_err(ort_err)?;
            values.push((name.as_str(), tensor.into_dyn()));
        }
        let started = Instant::now();
        let outputs = session.run(values).map_err(ort_err)?;
        runs_us.push(started.elapsed().as_micros() as u64);
        let mut reply = Vec::new();
        for (_, value) in outputs.iter() {
            let (_, data) = value.try_extract_tensor::<f32>().map_err(ort_err)?;
            reply.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        }
        drop(outputs);
        write_all(&mut stream, &(reply.len() as u32).to_le_bytes())?;
        write_all(&mut stream, &reply)?;
    }
}

/// `read_exact` that also works on a non-blocking (busy-polled) socket.
fn read_exact(stream: &mut TcpStream, mut buf: &mut [u8]) -> Result<()> {
    while !buf.is_empty() {
        match stream.read(buf) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `write_all` that also works on a non-blocking (busy-polled) socket.
fn write_all(stream: &mut TcpStream, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero).into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Small deterministic generator for input data (the crate has no `rand`).
struct XorShift(u64);

impl XorShift {
    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
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
