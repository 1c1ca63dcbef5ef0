//! The batch coordinator's Prometheus metrics.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use shamal_telemetry::{MetricsRegistry, register};

#[derive(Clone)]
pub struct BatchMetrics {
    /// Submits by outcome (`accepted`, `invalid`, `not_found`, `refused`,
    /// `failed_precondition`, `error`).
    pub submits: IntCounterVec,
    /// Jobs that reached a final state, by state.
    pub finished: IntCounterVec,
    /// Jobs queued or running.
    pub active: IntGauge,
    /// Shards queued (every attempt).
    pub shards_queued: IntCounter,
    /// Shards done.
    pub shards_done: IntCounter,
    /// Shard attempts that failed.
    pub shard_failures: IntCounter,
    /// Rows whose output part is written.
    pub rows_done: IntCounter,
    /// Shards queued again because the queue no longer knew their entry.
    pub shards_requeued: IntCounter,
}

impl BatchMetrics {
    pub fn new(registry: &MetricsRegistry) -> prometheus::Result<BatchMetrics> {
        Ok(BatchMetrics {
            submits: register(
                registry,
                IntCounterVec::new(
                    Opts::new("shamal_batch_submits_total", "Batch job submits by outcome"),
                    &["outcome"],
                )?,
            )?,
            finished: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "shamal_batch_jobs_finished_total",
                        "Batch jobs that reached a final state, by state",
                    ),
                    &["state"],
                )?,
            )?,
            active: register(
                registry,
                IntGauge::new("shamal_batch_jobs_active", "Batch jobs queued or running")?,
            )?,
            shards_queued: register(
                registry,
                IntCounter::new(
                    "shamal_batch_shards_queued_total",
                    "Shard entries put on the batch queue (every attempt)",
                )?,
            )?,
            shards_done: register(
                registry,
                IntCounter::new(
                    "shamal_batch_shards_done_total",
                    "Shards scored and written",
                )?,
            )?,
            shard_failures: register(
                registry,
                IntCounter::new(
                    "shamal_batch_shard_failures_total",
                    "Shard attempts that failed (retried or not)",
                )?,
            )?,
            rows_done: register(
                registry,
                IntCounter::new(
                    "shamal_batch_rows_done_total",
                    "Rows whose output part is written",
                )?,
            )?,
            shards_requeued: register(
                registry,
                IntCounter::new(
                    "shamal_batch_shards_requeued_total",
                    "Shards queued again because the queue no longer knew their entry (lost queue data)",
                )?,
            )?,
        })
    }

    /// Metrics on a registry of their own (tests).
    pub fn unregistered() -> BatchMetrics {
        match BatchMetrics::new(&MetricsRegistry::new()) {
            Ok(metrics) => metrics,
            Err(error) => unreachable!("fresh metrics registry: {error}"),
        }
    }
}
