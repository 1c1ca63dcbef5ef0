//! Per model-version statistics, in the shape of the ModelStatistics RPC, and
//! the Prometheus metrics fed from the same records.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use shamal_proto::inference::{
    InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration,
};
use shamal_telemetry::{BATCH_BUCKETS, LATENCY_BUCKETS, register};

/// Worker metrics, registered once per worker. Every metric carries the
/// worker's backend (`onnxruntime`, `candle`) as a constant label, which
/// also keeps two workers of one process (`shamal up`) apart in a shared
/// registry.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub dropped: IntCounterVec,
}

impl WorkerMetrics {
    pub fn new(registry: &Registry, backend: &str) -> WorkerMetrics {
        let labels = &["model", "version"];
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("backend", backend);
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::from(opts(name, help)).buckets(buckets.to_vec()),
                labels,
            )
            .and_then(|metric| register(registry, metric))
        };
        let build = || -> prometheus::Result<WorkerMetrics> {
            Ok(WorkerMetrics {
                requests: register(
                    registry,
                    IntCounterVec::new(
                        opts(
                            "shamal_worker_requests_total",
                            "Inference requests handled by the worker, by outcome (ok or a gRPC code name).",
                        ),
                        &["model", "version", "outcome"],
                    )?,
                )?,
                request_duration: histogram(
                    "shamal_worker_request_duration_seconds",
                    "Time from receiving an inference request to answering it.",
                    LATENCY_BUCKETS,
                )?,
                queue_duration: histogram(
                    "shamal_worker_queue_duration_seconds",
                    "Time requests wait in the batcher queue before a model instance takes them.",
                    LATENCY_BUCKETS,
                )?,
                inference_duration: histogram(
                    "shamal_worker_inference_duration_seconds",
                    "Duration of one model execution (one batch).",
                    LATENCY_BUCKETS,
                )?,
                batch_size: histogram(
                    "shamal_worker_batch_size",
                    "Rows per model execution formed by the dynamic batcher.",
                    BATCH_BUCKETS,
                )?,
                dropped: register(
                    registry,
                    IntCounterVec::new(
                        opts(
                            "shamal_worker_dropped_total",
                            "Queued requests dropped unrun because their deadline passed or their caller left.",
                        ),
                        labels,
                    )?,
                )?,
                queue_depth: register(
                    registry,
                    IntGaugeVec::new(
                        opts(
                            "shamal_worker_queue_depth",
                            "Requests waiting in a model's batcher queue.",
                        ),
                        labels,
                    )?,
                )?,
            })
        };
        // Metric definitions are static and each worker registers them once
        // with its own backend label: a failure here is a programming error
        // (two workers of one backend sharing a registry) caught by every
        // test that builds a worker.
        match build() {
            Ok(metrics) => metrics,
            Err(error) => panic!("invalid worker metric definition: {error}"),
        }
    }
}

/// One model execution, as recorded by an instance thread.
pub struct ExecutionRecord {
    pub batch_rows: usize,
    pub requests: usize,
    /// Sum over the batch's requests of their time in the queue.
    pub queue_ns: u128,
    /// Merging request inputs into the batch.
    pub compute_input: Duration,
    pub compute: Duration,
    /// Splitting the batch outputs back per request.
    pub compute_output: Duration,
    pub success: bool,
}

#[derive(Default)]
struct Counters {
    success: (u64, u64),
    fail: (u64, u64),
    queue: (u64, u64),
    compute_input: (u64, u64),
    compute_infer: (u64, u64),
    compute_output: (u64, u64),
    inference_count: u64,
    execution_count: u64,
    last_inference_ms: u64,
    dropped: u64,
    /// Per batch size: (count, input ns, infer ns, output ns).
    batches: BTreeMap<u64, (u64, u64, u64, u64)>,
}

/// The metric series of one model version, resolved once: the hot path
/// then records without hashing label values.
struct Series {
    ok: IntCounter,
    request_duration: Histogram,
    queue_duration: Histogram,
    inference_duration: Histogram,
    batch_size: Histogram,
    queue_depth: IntGauge,
    dropped: IntCounter,
}

/// Statistics of one model version.
pub struct ModelStats {
    model: String,
    version: String,
    metrics: WorkerMetrics,
    series: Series,
    counters: Mutex<Counters>,
}

fn saturating_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

impl ModelStats {
    pub fn new(model: &str, version: &str, metrics: WorkerMetrics) -> ModelStats {
        let labels = [model, version];
        let series = Series {
            ok: metrics.requests.with_label_values(&[model, version, "ok"]),
            request_duration: metrics.request_duration.with_label_values(&labels),
            queue_duration: metrics.queue_duration.with_label_values(&labels),
            inference_duration: metrics.inference_duration.with_label_values(&labels),
            batch_size: metrics.batch_size.with_label_values(&labels),
            queue_depth: metrics.queue_depth.with_label_values(&labels),
            dropped: metrics.dropped.with_label_values(&labels),
        };
        ModelStats {
            model: model.to_owned(),
            version: version.to_owned(),
            metrics,
            series,
            counters: Mutex::new(Counters::default()),
        }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A panic while holding this lock cannot leave counters invalid.
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn record_execution(&self, record: ExecutionRecord) {
        let compute_ns = saturating_u64(record.compute.as_nanos());
        let input_ns = saturating_u64(record.compute_input.as_nanos());
        let output_ns = saturating_u64(record.compute_output.as_nanos());
        {
            let mut counters = self.counters();
            if record.success {
                // perf_analyzer requires the three compute counts to agree:
                // every execution has an input, infer and output phase.
                counters.execution_count += 1;
                counters.inference_count += record.batch_rows as u64;
                counters.compute_input.0 += 1;
                counters.compute_input.1 += input_ns;
                counters.compute_infer.0 += 1;
                counters.compute_infer.1 += compute_ns;
                counters.compute_output.0 += 1;
                counters.compute_output.1 += output_ns;
                let entry = counters
                    .batches
                    .entry(record.batch_rows as u64)
                    .or_default();
                entry.0 += 1;
                entry.1 += input_ns;
                entry.2 += compute_ns;
                entry.3 += output_ns;
            }
            counters.queue.0 += record.requests as u64;
            counters.queue.1 += saturating_u64(record.queue_ns);
            counters.last_inference_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| saturating_u64(elapsed.as_millis()))
                .unwrap_or(0);
        }
        self.series
            .inference_duration
            .observe(record.compute.as_secs_f64());
        self.series.batch_size.observe(record.batch_rows as f64);
        if record.requests > 0 {
            let mean_queue = record.queue_ns as f64 / record.requests as f64 / 1e9;
            self.series.queue_duration.observe(mean_queue);
        }
    }

    /// A request answered (successfully or not) after `elapsed`.
    pub fn record_request(&self, elapsed: Duration, outcome: &str) {
        let ns = saturating_u64(elapsed.as_nanos());
        {
            let mut counters = self.counters();
            let slot = if outcome == "ok" {
                &mut counters.success
            } else {
                &mut counters.fail
            };
            slot.0 += 1;
            slot.1 += ns;
        }
        if outcome == "ok" {
            self.series.ok.inc();
        } else {
            self.metrics
                .requests
                .with_label_values(&[self.model.as_str(), self.version.as_str(), outcome])
                .inc();
        }
        self.series.request_duration.observe(elapsed.as_secs_f64());
    }

    /// A queued request dropped because its caller left or its deadline
    /// passed.
    pub fn record_dropped(&self) {
        self.counters().dropped += 1;
        self.series.dropped.inc();
    }

    pub fn dropped(&self) -> u64 {
        self.counters().dropped
    }

    pub fn set_queue_depth(&self, depth: usize) {
        self.series
            .queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// The ModelStatistics RPC view.
    pub fn snapshot(&self) -> ModelStatistics {
        let counters = self.counters();
        let duration = |(count, ns): (u64, u64)| Some(StatisticDuration { count, ns });
        ModelStatistics {
            name: self.model.clone(),
            version: self.version.clone(),
            last_inference: counters.last_inference_ms,
            inference_count: counters.inference_count,
            execution_count: counters.execution_count,
            inference_stats: Some(InferStatistics {
                success: duration(counters.success),
                fail: duration(counters.fail),
                queue: duration(counters.queue),
                compute_input: duration(counters.compute_input),
                compute_infer: duration(counters.compute_infer),
                compute_output: duration(counters.compute_output),
                cache_hit: duration((0, 0)),
                cache_miss: duration((0, 0)),
            }),
            batch_stats: counters
                .batches
                .iter()
                .map(|(&batch_size, &(count, input_ns, infer_ns, output_ns))| {
                    InferBatchStatistics {
                        batch_size,
                        compute_input: duration((count, input_ns)),
                        compute_infer: duration((count, infer_ns)),
                        compute_output: duration((count, output_ns)),
                    }
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Encoder;

    use super::*;

    fn exported(registry: &Registry) -> String {
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn records_reach_statistics_and_metrics() {
        let registry = Registry::new();
        let stats = ModelStats::new("m", "3", WorkerMetrics::new(&registry, "test"));
        stats.record_execution(ExecutionRecord {
            batch_rows: 4,
            requests: 2,
            queue_ns: 2_000,
            compute_input: Duration::from_micros(1),
            compute: Duration::from_micros(50),
            compute_output: Duration::from_micros(2),
            success: true,
        });
        stats.record_request(Duration::from_micros(80), "ok");
        stats.record_request(Duration::from_micros(80), "resource_exhausted");
        stats.record_dropped();
        stats.set_queue_depth(5);

        let snapshot = stats.snapshot();
        assert_eq!((snapshot.inference_count, snapshot.execution_count), (4, 1));
        let inference = snapshot.inference_stats.unwrap();
        assert_eq!(inference.success.unwrap().count, 1);
        assert_eq!(inference.fail.unwrap().count, 1);
        assert_eq!(inference.compute_infer.unwrap().ns, 50_000);
        assert_eq!(snapshot.batch_stats[0].batch_size, 4);

        let text = exported(&registry);
        for line in [
            r#"shamal_worker_requests_total{backend="test",model="m",outcome="ok",version="3"} 1"#,
            r#"shamal_worker_requests_total{backend="test",model="m",outcome="resource_exhausted",version="3"} 1"#,
            r#"shamal_worker_dropped_total{backend="test",model="m",version="3"} 1"#,
            r#"shamal_worker_queue_depth{backend="test",model="m",version="3"} 5"#,
            r#"shamal_worker_batch_size_sum{backend="test",model="m",version="3"} 4"#,
            r#"shamal_worker_inference_duration_seconds_count{backend="test",model="m",version="3"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
