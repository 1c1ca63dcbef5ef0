//! The audit service's Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts};
use shamal_telemetry::{LATENCY_BUCKETS, MetricsRegistry, register};

/// Append batch-size buckets: 1 to the 10,000 events one call may carry.
const APPEND_BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

#[derive(Clone)]
pub struct AuditMetrics {
    /// Events written.
    pub appended: IntCounter,
    /// Events skipped as already recorded (by event_id).
    pub duplicates: IntCounter,
    /// Events per Append call.
    pub batch_size: Histogram,
    /// Seconds an Append spends (validation, the transaction, the commit).
    pub append_latency: Histogram,
    /// The chain's last sequence number.
    pub head_seq: IntGauge,
    /// Checkpoints signed and stored.
    pub checkpoints: IntCounter,
    /// Verify runs that found a fault.
    pub verify_failures: IntCounter,
    /// Records removed by retention.
    pub retention_removed: IntCounter,
    /// Refusals of the service's own callers not recorded (the queue of
    /// them was full).
    pub refusals_dropped: IntCounter,
}

impl AuditMetrics {
    /// Metrics registered on `registry`.
    pub fn new(registry: &MetricsRegistry) -> prometheus::Result<AuditMetrics> {
        Ok(AuditMetrics {
            appended: register(
                registry,
                IntCounter::new("shamal_audit_appended_total", "Audit events appended")?,
            )?,
            duplicates: register(
                registry,
                IntCounter::new(
                    "shamal_audit_duplicates_total",
                    "Audit events skipped because their event_id was already recorded",
                )?,
            )?,
            batch_size: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("shamal_audit_append_batch_size", "Events per Append call")
                        .buckets(APPEND_BATCH_BUCKETS.to_vec()),
                )?,
            )?,
            append_latency: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "shamal_audit_append_seconds",
                        "Time an Append call takes, validation to commit",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            head_seq: register(
                registry,
                IntGauge::with_opts(Opts::new(
                    "shamal_audit_head_seq",
                    "Sequence number of the audit chain's last record",
                ))?,
            )?,
            checkpoints: register(
                registry,
                IntCounter::new(
                    "shamal_audit_checkpoints_total",
                    "Signed checkpoints stored",
                )?,
            )?,
            verify_failures: register(
                registry,
                IntCounter::new(
                    "shamal_audit_verify_failures_total",
                    "Verify runs that found a broken chain or a bad checkpoint",
                )?,
            )?,
            retention_removed: register(
                registry,
                IntCounter::new(
                    "shamal_audit_retention_removed_total",
                    "Records removed by retention (each range leaves a signed tombstone)",
                )?,
            )?,
            refusals_dropped: register(
                registry,
                IntCounter::new(
                    "shamal_audit_refusals_dropped_total",
                    "Refused calls to the audit service left unrecorded (more refusals at once than its queue holds)",
                )?,
            )?,
        })
    }

    /// Metrics on a registry of their own (tests, benchmarks).
    pub fn unregistered() -> AuditMetrics {
        match AuditMetrics::new(&MetricsRegistry::new()) {
            Ok(metrics) => metrics,
            // A fresh registry holds no metric these could collide with.
            Err(error) => unreachable!("fresh metrics registry: {error}"),
        }
    }
}
