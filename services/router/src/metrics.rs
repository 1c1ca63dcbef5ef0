//! Router metrics.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use shamal_telemetry::MetricsRegistry;
use shamal_telemetry::{LATENCY_BUCKETS, register};
use tonic::Code;

use crate::admission::Priority;

#[derive(Clone)]
pub struct RouterMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    pub retries: IntCounter,
    /// Retries not made because the retry budget was spent.
    pub retries_refused: IntCounter,
    shed: IntCounterVec,
}

/// Stable, lower-case names of gRPC codes for metric labels: the one error
/// table's (every code its own label, `ok` for OK).
pub use shamal_error::code_label;

impl RouterMetrics {
    pub fn new(registry: &MetricsRegistry) -> RouterMetrics {
        let build = || -> prometheus::Result<RouterMetrics> {
            Ok(RouterMetrics {
                requests: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_requests_total",
                            "Inference requests answered by the router, by model, version, protocol and gRPC code.",
                        ),
                        &["model", "version", "protocol", "code"],
                    )?,
                )?,
                duration: register(
                    registry,
                    HistogramVec::new(
                        HistogramOpts::new(
                            "shamal_router_request_duration_seconds",
                            "End-to-end inference latency seen by the router.",
                        )
                        .buckets(LATENCY_BUCKETS.to_vec()),
                        &["model", "protocol"],
                    )?,
                )?,
                retries: register(
                    registry,
                    IntCounter::new(
                        "shamal_router_retries_total",
                        "Requests sent again to another worker after the first was unavailable.",
                    )?,
                )?,
                retries_refused: register(
                    registry,
                    IntCounter::new(
                        "shamal_router_retries_refused_total",
                        "Retries not made because the retry budget (share of extra load) was spent.",
                    )?,
                )?,
                shed: register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "shamal_router_shed_total",
                            "Requests refused at once because the router was at capacity for their priority.",
                        ),
                        &["priority"],
                    )?,
                )?,
            })
        };
        match build() {
            Ok(metrics) => metrics,
            Err(error) => panic!("invalid router metric definition: {error}"),
        }
    }

    pub fn shed(&self, priority: Priority) {
        self.shed.with_label_values(&[priority.label()]).inc();
    }

    /// `version` is the version that answered (empty for failures, so that
    /// made-up versions cannot grow the label set).
    pub fn observe(
        &self,
        model: &str,
        version: &str,
        protocol: &str,
        code: Code,
        elapsed: Duration,
    ) {
        self.requests
            .with_label_values(&[model, version, protocol, code_label(code)])
            .inc();
        self.duration
            .with_label_values(&[model, protocol])
            .observe(elapsed.as_secs_f64());
    }
}
