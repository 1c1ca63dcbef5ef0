//! `shamal-loadgen`: command-line front end of the load generator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use shamal_loadtest::{Config, Mode, parse_duration, run};

/// KServe v2 gRPC load generator (closed loop by concurrency, or open loop by rate).
#[derive(Debug, Parser)]
#[command(name = "shamal-loadgen", version)]
struct Args {
    /// gRPC endpoint of the server.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    url: String,
    /// Model to call.
    #[arg(long)]
    model: String,
    /// Model version (default: the server's choice).
    #[arg(long, default_value = "")]
    model_version: String,
    /// Size of the leading (batch) dimension when the model reports it as -1.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Size of the other variable dimensions.
    #[arg(long, default_value_t = 1)]
    dim: usize,
    /// NAME=VALUE: send input NAME with every element set to VALUE instead
    /// of random contents (e.g. `--fill attention_mask=1`); repeatable.
    #[arg(long, value_parser = parse_fill)]
    fill: Vec<(String, f64)>,
    /// Closed loop: requests kept in flight (default 1 when --rate is absent).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: arrivals per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most requests in flight; further arrivals are dropped by the client.
    #[arg(long, default_value_t = 1024, requires = "rate")]
    max_outstanding: usize,
    /// Measurement time, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Time before measuring, e.g. 2s.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// HTTP/2 connections (default min(concurrency, 4); 4 in open loop).
    #[arg(long)]
    connections: Option<usize>,
    /// gRPC deadline of each request.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Label shown in the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Runtime threads of the load generator (default: 1 for a closed loop
    /// at concurrency 1, where more threads only add cross-thread wake-ups
    /// to every request; otherwise one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Bearer access token sent with every request (a router with OIDC on).
    #[arg(long, env = "SHAMAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// TLS to the router with this client certificate (PEM; with --tls-key
    /// and --tls-ca; the URL is then https://<a name in the router's
    /// certificate>:<port>).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

/// Parses `NAME=VALUE` of `--fill`.
fn parse_fill(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if name.is_empty() {
        return Err(format!("expected NAME=VALUE, got {text:?}"));
    }
    Ok((name.to_owned(), value))
}

fn main() {
    let args = Args::parse();
    let threads = args.threads.unwrap_or_else(|| {
        if args.rate.is_none() && args.concurrency.unwrap_or(1) == 1 {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |cores| cores.get())
        }
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(real_main(args)),
        Err(error) => Err(error.into()),
    };
    if let Err(error) = result {
        eprintln!("shamal-loadgen: {error:#}");
        std::process::exit(1);
    }
}

async fn real_main(args: Args) -> Result<()> {
    let mode = match args.rate {
        Some(rate) => Mode::Open {
            rate,
            max_outstanding: args.max_outstanding,
        },
        None => Mode::Closed {
            concurrency: args.concurrency.unwrap_or(1),
        },
    };
    let config = Config {
        connections: args
            .connections
            .unwrap_or_else(|| Config::default_connections(&mode)),
        mode,
        url: args.url,
        model: args.model,
        model_version: args.model_version,
        batch: args.batch,
        dim: args.dim,
        duration: args.duration,
        warmup: args.warmup,
        timeout: args.timeout,
        label: args.label,
        fill: args.fill,
        token: args.token.filter(|token| !token.is_empty()),
        tls: match (args.tls_cert, args.tls_key, args.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(shamal_tls::TlsFiles { cert, key, ca }),
            _ => None,
        },
    };
    let report = run(config).await?;
    println!("{report}");
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
