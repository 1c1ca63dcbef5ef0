//! Append throughput of the audit log on a database, at batch sizes 1, 100
//! and 1,000 (events per Append call, one caller at a time): what one
//! producer's shipper can push through the service's store.
//!
//! ```text
//! cargo run --release -p shamal-audit-service --example append_bench -- \
//!     [--database-url postgres://...] [--seconds 3]
//! ```
//!
//! Without `--database-url` (or `SHAMAL_AUDIT_DATABASE_URL`) it uses a
//! SQLite file in a temporary directory. The log is append-only: point it
//! at a scratch database, never at a production one.

use std::time::{Duration, Instant};

use clap::Parser;
use shamal_audit::{Event, Signer};
use shamal_audit_service::AuditLog;
use shamal_audit_service::log::CheckpointPolicy;
use shamal_audit_service::metrics::AuditMetrics;
use shamal_audit_service::store::Store;

#[derive(Parser)]
struct Args {
    /// Database URL (postgres://... or sqlite://...); default: a temporary
    /// SQLite file.
    #[arg(long, env = "SHAMAL_AUDIT_DATABASE_URL")]
    database_url: Option<String>,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

fn event(run: &str, n: u64) -> Event {
    Event {
        event_id: format!("bench-{run}-{n}"),
        occurred_at_ms: 1_700_000_000_000 + n as i64,
        service: "router".to_owned(),
        instance: "router-0".to_owned(),
        action: "inference".to_owned(),
        outcome: "ok".to_owned(),
        actor: "spiffe://shamal.local/router/router-0".to_owned(),
        client_id: "shamal-inference".to_owned(),
        tenant: "acme".to_owned(),
        model: "fraud".to_owned(),
        version: "7".to_owned(),
        region: "eu-west".to_owned(),
        worker: "cpu-worker-3".to_owned(),
        request_id: format!("req-{n}"),
        latency_us: 850,
        request_sha256: "ab".repeat(32),
        response_sha256: "cd".repeat(32),
        ..Event::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let url = args.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        )
    });
    let store = Store::connect(&url).await?;
    println!(
        "append throughput, {:?} database, {} s per batch size, one caller",
        store.backend, args.seconds
    );
    let log = AuditLog::new(
        store,
        Signer::generate(),
        AuditMetrics::unregistered(),
        CheckpointPolicy {
            every: 1000,
            interval: Duration::from_secs(10),
        },
    );
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut next = 0u64;
    for batch in [1u64, 100, 1000] {
        let budget = Duration::from_secs_f64(args.seconds);
        let started = Instant::now();
        let (mut events, mut calls) = (0u64, 0u64);
        while started.elapsed() < budget {
            let batch_events: Vec<Event> = (next..next + batch).map(|n| event(&run, n)).collect();
            next += batch;
            let appended = log.append(batch_events).await?;
            events += u64::from(appended.appended);
            calls += 1;
            // Checkpoints as the service signs them.
            if next % 1000 < batch {
                log.checkpoint().await?;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "batch {batch:>5}: {:>9.0} events/s  ({calls} calls, {:.2} ms per call)",
            events as f64 / elapsed,
            elapsed * 1000.0 / calls as f64
        );
    }
    let verified = log.verify().await?;
    println!(
        "verify: ok={} over {} records, {} checkpoints",
        verified.ok, verified.records_checked, verified.checkpoints_checked
    );
    Ok(())
}
