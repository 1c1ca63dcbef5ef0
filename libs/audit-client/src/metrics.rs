//! The auditor's Prometheus metrics, labelled by producing `service`: the
//! families are one per process (services sharing a registry, as in
//! `shamal up`, share them), each auditor owns its label's series.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

struct Families {
    spool_bytes: IntGaugeVec,
    spool_events: IntGaugeVec,
    shipped: IntCounterVec,
    ship_failures: IntCounterVec,
    dropped: IntCounterVec,
    refused: IntCounterVec,
    recovered: IntCounterVec,
    write_errors: IntCounterVec,
    rejected: IntCounterVec,
}

fn counter(name: &str, help: &str) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), &["service"])
}

fn gauge(name: &str, help: &str) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), &["service"])
}

fn build() -> prometheus::Result<Families> {
    Ok(Families {
        spool_bytes: gauge(
            "shamal_audit_spool_bytes",
            "Audit event bytes recorded but not yet acknowledged by the audit service (queued and spooled)",
        )?,
        spool_events: gauge(
            "shamal_audit_spool_events",
            "Audit events recorded but not yet acknowledged by the audit service",
        )?,
        shipped: counter(
            "shamal_audit_shipped_total",
            "Audit events acknowledged by the audit service",
        )?,
        ship_failures: counter(
            "shamal_audit_ship_failures_total",
            "Failed Append calls to the audit service (each is retried)",
        )?,
        dropped: counter(
            "shamal_audit_dropped_total",
            "Audit events dropped because the spool was full (fail_open) or the auditor had stopped",
        )?,
        refused: counter(
            "shamal_audit_refused_total",
            "Requests or events refused because the audit backlog was full (fail_closed)",
        )?,
        recovered: counter(
            "shamal_audit_spool_recovered_frames_total",
            "Torn or corrupt spool frames found and cut off (at start-up or while shipping)",
        )?,
        write_errors: counter(
            "shamal_audit_spool_write_errors_total",
            "Failed spool writes or fsyncs (each is retried)",
        )?,
        rejected: counter(
            "shamal_audit_rejected_total",
            "Audit events the audit service refused as invalid (set aside in the spool's rejected file, not retried)",
        )?,
    })
}

fn families() -> prometheus::Result<&'static Families> {
    static FAMILIES: OnceLock<Result<Families, String>> = OnceLock::new();
    FAMILIES
        .get_or_init(|| build().map_err(|error| error.to_string()))
        .as_ref()
        .map_err(|error| prometheus::Error::Msg(error.clone()))
}

fn register(
    registry: &Registry,
    collector: Box<dyn prometheus::core::Collector>,
) -> prometheus::Result<()> {
    match registry.register(collector) {
        Ok(()) | Err(prometheus::Error::AlreadyReg) => Ok(()),
        Err(error) => Err(error),
    }
}

/// A count kept both by this auditor (for [`AuditStats`](crate::AuditStats))
/// and in its Prometheus series.
pub struct Counter {
    local: AtomicU64,
    series: IntCounter,
}

impl Counter {
    fn new(series: IntCounter) -> Counter {
        Counter {
            local: AtomicU64::new(0),
            series,
        }
    }

    pub fn add(&self, n: u64) {
        self.local.fetch_add(n, Ordering::Relaxed);
        self.series.inc_by(n);
    }

    pub fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}

pub struct Metrics {
    pub spool_bytes: IntGauge,
    pub spool_events: IntGauge,
    pub shipped: Counter,
    pub ship_failures: Counter,
    pub dropped: Counter,
    pub refused: Counter,
    pub recovered: Counter,
    pub write_errors: Counter,
    pub rejected: Counter,
}

impl Metrics {
    pub fn new(registry: &Registry, service: &str) -> prometheus::Result<Metrics> {
        let families = families()?;
        register(registry, Box::new(families.spool_bytes.clone()))?;
        register(registry, Box::new(families.spool_events.clone()))?;
        register(registry, Box::new(families.shipped.clone()))?;
        register(registry, Box::new(families.ship_failures.clone()))?;
        register(registry, Box::new(families.dropped.clone()))?;
        register(registry, Box::new(families.refused.clone()))?;
        register(registry, Box::new(families.recovered.clone()))?;
        register(registry, Box::new(families.write_errors.clone()))?;
        register(registry, Box::new(families.rejected.clone()))?;
        let labels = [service];
        Ok(Metrics {
            spool_bytes: families.spool_bytes.with_label_values(&labels),
            spool_events: families.spool_events.with_label_values(&labels),
            shipped: Counter::new(families.shipped.with_label_values(&labels)),
            ship_failures: Counter::new(families.ship_failures.with_label_values(&labels)),
            dropped: Counter::new(families.dropped.with_label_values(&labels)),
            refused: Counter::new(families.refused.with_label_values(&labels)),
            recovered: Counter::new(families.recovered.with_label_values(&labels)),
            write_errors: Counter::new(families.write_errors.with_label_values(&labels)),
            rejected: Counter::new(families.rejected.with_label_values(&labels)),
        })
    }
}
