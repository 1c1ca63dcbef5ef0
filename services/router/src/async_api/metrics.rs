//! The async API's Prometheus metrics.

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use shamal_telemetry::MetricsRegistry;
use shamal_telemetry::register;

#[derive(Clone)]
pub(super) struct AsyncMetrics {
    pub(super) submitted: IntCounterVec,
    pub(super) refused: IntCounterVec,
    pub(super) backlog: IntGaugeVec,
    pub(super) fetched: IntCounterVec,
}

impl AsyncMetrics {
    pub(super) fn new(registry: &MetricsRegistry) -> AsyncMetrics {
        let build = || -> prometheus::Result<AsyncMetrics> {
            Ok(AsyncMetrics {
                submitted: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_async_submitted_total",
                            "Async inference jobs queued by this router, per model.",
                        ),
                        &["model"],
                    )?,
                )?,
                refused: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_async_backlog_full_total",
                            "Async submissions refused because the stream's backlog was at max_async_backlog.",
                        ),
                        &["model"],
                    )?,
                )?,
                backlog: register(
                    registry,
                    IntGaugeVec::new(
                        Opts::new(
                            "shamal_router_async_backlog",
                            "Async jobs waiting or running (lag + pending) per stream, refreshed every second.",
                        ),
                        &["model", "region"],
                    )?,
                )?,
                fetched: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_async_results_fetched_total",
                            "Finished async jobs answered to a fetch, by the job's gRPC code.",
                        ),
                        &["code"],
                    )?,
                )?,
            })
        };
        match build() {
            Ok(metrics) => metrics,
            Err(error) => panic!("invalid async metric definition: {error}"),
        }
    }
}
