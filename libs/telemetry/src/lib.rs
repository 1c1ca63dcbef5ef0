//! Logging and metrics shared by every Shamal service.
//!
//! Each process owns one Prometheus [`Registry`]; services register their
//! metrics into it and [`serve_metrics`] exposes it on `/metrics` next to
//! liveness and readiness probes, on a listener of its own so that scrapes and
//! probes answer even when the data plane is saturated.
//!
//! [`config`] and [`process`] are the rest of every service binary's
//! skeleton: settings layering (defaults < file < environment < flags), the
//! redaction of secrets in `--print-config`, exit codes.

pub mod config;
pub mod process;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
/// A process's Prometheus registry, named apart from the model registry
/// (the registry service) that every Shamal service also talks to.
pub use prometheus::Registry as MetricsRegistry;
pub use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;

/// Latency buckets in seconds: 50 µs to 10 s, dense where inference lives.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Batch-size buckets (powers of two up to 1024).
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the global tracing subscriber: `RUST_LOG`-style filtering
/// (default `info`), plain text or JSON lines (`SHAMAL_LOG_FORMAT=json`).
/// Calling it twice is harmless.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SHAMAL_LOG_FORMAT").is_ok_and(|format| format == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Readiness flag shared between a service and its probes.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct MetricsState {
    registry: MetricsRegistry,
    readiness: Readiness,
}

/// Serves `/metrics` (Prometheus text format), `/health/live` and
/// `/health/ready` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: MetricsRegistry,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { StatusCode::OK }))
        .route("/health/ready", get(ready))
        .with_state(MetricsState {
            registry,
            readiness,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<MetricsState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn ready(State(state): State<MetricsState>) -> StatusCode {
    if state.readiness.get() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Registers a collector and returns it. A second registration of the same
/// metric (same name and constant labels) is an error, not ignored: the
/// collector returned would be one `/metrics` never shows. Services that
/// share one process registry (`shamal up`) keep their metrics apart by
/// name or by a constant label (the workers' `backend`).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &MetricsRegistry,
    collector: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("interrupt received, shutting down"),
        () = terminate => tracing::info!("terminate received, shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, Opts};

    fn counter(backend: &str) -> IntCounterVec {
        IntCounterVec::new(
            Opts::new("shamal_test_requests_total", "Test counter.")
                .const_label("backend", backend),
            &["model"],
        )
        .unwrap_or_else(|error| panic!("static test metric: {error}"))
    }

    #[test]
    fn a_second_registration_is_an_error_not_a_silent_orphan() {
        let registry = MetricsRegistry::new();
        let first = register(&registry, counter("onnxruntime")).expect("first registration");
        assert!(
            register(&registry, counter("onnxruntime")).is_err(),
            "the same metric twice must be refused"
        );
        first.with_label_values(&["demo"]).inc();
        assert_eq!(registry.gather().len(), 1);
    }

    #[test]
    fn two_workers_of_one_process_are_kept_apart_by_their_backend_label() {
        let registry = MetricsRegistry::new();
        let cpu = register(&registry, counter("onnxruntime")).expect("cpu-worker's");
        let gpu = register(&registry, counter("candle")).expect("gpu-worker's");
        cpu.with_label_values(&["demo"]).inc();
        gpu.with_label_values(&["mlp"]).inc_by(2);
        let families = registry.gather();
        assert_eq!(families.len(), 1, "one family");
        let backends: Vec<(String, u64)> = families[0]
            .get_metric()
            .iter()
            .map(|metric| {
                let backend = metric
                    .get_label()
                    .iter()
                    .find(|label| label.name() == "backend")
                    .map(|label| label.value().to_owned())
                    .unwrap_or_default();
                (backend, metric.get_counter().get_value() as u64)
            })
            .collect();
        assert!(
            backends.contains(&("onnxruntime".to_owned(), 1)),
            "{backends:?}"
        );
        assert!(backends.contains(&("candle".to_owned(), 2)), "{backends:?}");
    }
}
