//! A full spool: fail_closed refuses, fail_open drops and counts.

mod common;

use std::time::Duration;

use common::{FakeAudit, assert_log_is, config, event, eventually, free_addr};
use shamal_audit_client::{Auditor, Backlog, OnFull};

const DRAIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_at_the_bound_until_the_spool_drains() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    fake.set_down(true);
    let serving = fake.serve(addr).await;
    let mut cfg = config(dir.path(), addr);
    cfg.max_spool_bytes = 2048;
    let auditor =
        Auditor::start(cfg, None, "closed", "test-0", &prometheus::Registry::new()).unwrap();

    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..1000 {
        if let Err(backlog) = auditor.admit() {
            refusal = Some(backlog);
            break;
        }
        // Admitted, and nothing else records: the event is taken.
        let id = format!("closed-{i}");
        auditor.record(event(&id)).unwrap();
        accepted.push(id);
    }
    let refusal = refusal.expect("a 2 KiB spool fills up");
    assert!(
        accepted.len() > 5 && accepted.len() < 40,
        "{} accepted",
        accepted.len()
    );
    let message = refusal.to_string();
    assert!(
        message.starts_with("audit backlog full: ") && message.contains(" of 2048 bytes spooled"),
        "{message}"
    );
    assert!(matches!(refusal, Backlog::Spool { spooled_bytes, .. } if spooled_bytes >= 2048));
    assert_eq!(auditor.stats().spool_events as usize, accepted.len());
    let recorded = auditor.record(event("closed-refused")).unwrap_err();
    assert_eq!(recorded, refusal, "record refuses as admit did");
    assert!(auditor.stats().refused >= 2);
    auditor.flush().await;
    assert!(auditor.admit().is_err(), "still full once spooled");

    fake.set_down(false);
    auditor.drain(DRAIN).await.unwrap();
    auditor.admit().unwrap();
    auditor.record(event("closed-after")).unwrap();
    accepted.push("closed-after".to_owned());
    auditor.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &accepted);
    auditor.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_drops_and_counts_events_at_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    fake.set_down(true);
    let serving = fake.serve(addr).await;
    let mut cfg = config(dir.path(), addr);
    cfg.max_spool_bytes = 2048;
    cfg.on_full = OnFull::FailOpen;
    let registry = prometheus::Registry::new();
    let auditor = Auditor::start(cfg, None, "open", "test-0", &registry).unwrap();

    let mut accepted = Vec::new();
    for i in 0..100 {
        auditor.admit().unwrap();
        let id = format!("open-{i}");
        let before = auditor.stats().dropped;
        auditor.record(event(&id)).unwrap();
        if auditor.stats().dropped == before {
            accepted.push(id);
        }
    }
    let stats = auditor.stats();
    assert!(stats.dropped > 50, "{stats:?}");
    assert_eq!(stats.dropped as usize + accepted.len(), 100);
    assert_eq!(stats.refused, 0);
    eventually("a failed Append", || auditor.stats().ship_failures > 0).await;

    let exported = registry
        .gather()
        .into_iter()
        .find(|family| family.name() == "shamal_audit_dropped_total")
        .expect("shamal_audit_dropped_total is registered");
    let series = exported
        .get_metric()
        .iter()
        .find(|metric| {
            metric
                .get_label()
                .iter()
                .any(|label| label.name() == "service" && label.value() == "open")
        })
        .expect("a series for this service");
    assert_eq!(series.get_counter().get_value() as u64, stats.dropped);

    fake.set_down(false);
    auditor.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &accepted);
    auditor.shutdown().await;
    serving.stop().await;
}
