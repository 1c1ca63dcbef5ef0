//! Every recorded event reaches the audit log exactly once, whatever the
//! service and the producer go through.

mod common;

use std::time::Duration;

use common::{
    FakeAudit, assert_log_is, config, event, eventually, free_addr, ids, segments, start,
};
use shamal_audit_client::{Auditor, Error};

const DRAIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_when_the_service_comes_up_late() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let auditor = start(config(dir.path(), addr), "late");
    let expected = ids("late", 1000);
    for id in &expected {
        auditor.record(event(id)).unwrap();
    }
    auditor.flush().await;
    eventually("a failed Append", || auditor.stats().ship_failures > 0).await;
    let stats = auditor.stats();
    assert_eq!(stats.shipped, 0);
    assert_eq!(stats.spool_events, 1000);
    assert!(stats.spool_bytes > 1000 * 8, "{stats:?}");
    assert!(
        segments(dir.path()).len() > 5,
        "4 KiB segments hold the spool"
    );

    let fake = FakeAudit::default();
    let serving = fake.serve(addr).await;
    auditor.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &expected);
    let logged = fake.log_ids();
    assert_eq!(logged, expected, "events arrive in the order recorded");
    let stats = auditor.stats();
    assert_eq!(stats.shipped, 1000);
    assert_eq!((stats.spool_events, stats.spool_bytes), (0, 0));
    assert!(
        segments(dir.path()).len() <= 1,
        "shipped segments are deleted: {:?}",
        segments(dir.path())
    );
    auditor.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermittent_failures_neither_lose_nor_double_events() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    {
        let mut state = fake.state();
        state.fail_every = Some(3);
        state.lose_response_every = Some(5);
    }
    let serving = fake.serve(addr).await;
    let mut cfg = config(dir.path(), addr);
    cfg.batch_size = 20;
    let auditor = start(cfg, "flaky");
    let mut expected = Vec::new();
    for wave in 0..4 {
        let wave_ids = ids(&format!("flaky{wave}"), 500);
        for id in &wave_ids {
            auditor.record(event(id)).unwrap();
        }
        expected.extend(wave_ids);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    auditor.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &expected);
    let resent: u32 = fake.state().received.values().map(|times| times - 1).sum();
    assert!(
        resent > 0,
        "lost responses make the producer resend (skipped by the log)"
    );
    let stats = auditor.stats();
    assert!(stats.ship_failures > 0, "{stats:?}");
    assert_eq!(stats.shipped, 2000);
    assert_eq!(stats.spool_events, 0);
    auditor.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_auditor_resumes_from_its_spool_without_resending_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    let serving = fake.serve(addr).await;

    let first = start(config(dir.path(), addr), "crash");
    let acknowledged = ids("acked", 300);
    for id in &acknowledged {
        first.record(event(id)).unwrap();
    }
    first.drain(DRAIN).await.unwrap();
    fake.set_down(true);
    let spooled = ids("spooled", 200);
    for id in &spooled {
        first.record(event(id)).unwrap();
    }
    first.flush().await;
    first.kill().await;

    let second = start(config(dir.path(), addr), "crash");
    let stats = second.stats();
    assert_eq!(
        stats.spool_events, 200,
        "recovered from the spool: {stats:?}"
    );
    assert_eq!(stats.recovered_frames, 0);
    fake.set_down(false);
    let later = ids("later", 100);
    for id in &later {
        second.record(event(id)).unwrap();
    }
    second.drain(DRAIN).await.unwrap();
    let expected: Vec<String> = [acknowledged.clone(), spooled, later].concat();
    assert_log_is(&fake, &expected);
    let received = fake.state().received.clone();
    for id in &acknowledged {
        assert_eq!(
            received[id], 1,
            "{id} was acknowledged before the crash and sent again"
        );
    }
    second.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_without_shutdown_still_writes_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let auditor = start(config(dir.path(), addr), "dropped");
    let expected = ids("queued", 200);
    let clone = auditor.clone();
    for id in &expected {
        clone.record(event(id)).unwrap();
    }
    drop(clone);
    drop(auditor);

    // The old tasks finish writing and release the spool's lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let next = loop {
        match Auditor::start(
            config(dir.path(), addr),
            None,
            "dropped",
            "test-1",
            &prometheus::Registry::new(),
        ) {
            Ok(next) => break next,
            Err(Error::SpoolLocked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    assert_eq!(next.stats().spool_events, 200);
    let fake = FakeAudit::default();
    let serving = fake.serve(addr).await;
    next.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &expected);
    next.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_auditor_on_the_same_spool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let first = start(config(dir.path(), addr), "locked");
    let second = Auditor::start(
        config(dir.path(), addr),
        None,
        "locked",
        "test-1",
        &prometheus::Registry::new(),
    );
    match second {
        Err(error @ Error::SpoolLocked { .. }) => {
            assert!(error.to_string().contains("in use"), "{error}")
        }
        other => panic!("expected SpoolLocked, got {other:?}"),
    }
    first.shutdown().await;
    let third = start(config(dir.path(), addr), "locked");
    third.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_fills_in_the_id_time_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    let serving = fake.serve(addr).await;
    let auditor = start(config(dir.path(), addr), "filler");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    auditor
        .record(shamal_audit_client::AuditEvent {
            action: "model.create".into(),
            ..Default::default()
        })
        .unwrap();
    auditor
        .record(shamal_audit_client::AuditEvent {
            event_id: "given".into(),
            occurred_at_ms: 42,
            service: "batch-coordinator".into(),
            instance: "bc-7".into(),
            action: "model.delete".into(),
            ..Default::default()
        })
        .unwrap();
    auditor.drain(DRAIN).await.unwrap();
    let log = fake.state().log.clone();
    assert_eq!(log.len(), 2);
    let filled = &log[0];
    assert_eq!(filled.action, "model.create");
    let id = uuid::Uuid::parse_str(&filled.event_id).unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(filled.event_id, id.to_string(), "lower-case hyphenated");
    assert!(filled.occurred_at_ms >= before, "{}", filled.occurred_at_ms);
    assert_eq!(
        (filled.service.as_str(), filled.instance.as_str()),
        ("filler", "test-0")
    );
    let given = &log[1];
    assert_eq!(
        (
            given.event_id.as_str(),
            given.occurred_at_ms,
            given.service.as_str(),
            given.instance.as_str()
        ),
        ("given", 42, "batch-coordinator", "bc-7")
    );
    auditor.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_unshipped_events_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let auditor = start(config(dir.path(), addr), "restart");
    let expected = ids("kept", 120);
    for id in &expected {
        auditor.record(event(id)).unwrap();
    }
    auditor.shutdown().await;
    let fake = FakeAudit::default();
    let serving = fake.serve(addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        fake.log_ids().is_empty(),
        "the stopped shipper sent nothing"
    );
    let next = start(config(dir.path(), addr), "restart");
    next.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &expected);
    next.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    fake.state().fail_every = Some(4);
    let serving = fake.serve(addr).await;
    let auditor = start(config(dir.path(), addr), "concurrent");
    let producers: Vec<_> = (0..4)
        .map(|producer| {
            let auditor = auditor.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    auditor.record(event(&format!("p{producer}-{i}"))).unwrap();
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    auditor.drain(DRAIN).await.unwrap();
    let expected: Vec<String> = (0..4)
        .flat_map(|producer| ids(&format!("p{producer}"), 500))
        .collect();
    assert_log_is(&fake, &expected);
    let stats = auditor.stats();
    assert_eq!(
        (stats.shipped, stats.spool_events, stats.spool_bytes),
        (2000, 0, 0)
    );
    auditor.shutdown().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_service_refuses_as_invalid_are_set_aside_not_retried_for_ever() {
    use shamal_proto::prost::Message;

    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    fake.state().invalid_action = Some("bogus".into());
    let serving = fake.serve(addr).await;
    let auditor = start(config(dir.path(), addr), "invalid");
    let mut expected = Vec::new();
    for i in 0..120 {
        let id = format!("inv-{i}");
        let mut event = event(&id);
        if i % 40 == 7 {
            event.action = "bogus".into();
        } else {
            expected.push(id);
        }
        auditor.record(event).unwrap();
    }
    auditor.drain(DRAIN).await.unwrap();
    assert_log_is(&fake, &expected);
    let stats = auditor.stats();
    assert_eq!((stats.rejected, stats.shipped), (3, 117), "{stats:?}");
    assert_eq!(stats.spool_events, 0);

    // The refused events are kept, framed like the segments.
    let bytes = std::fs::read(dir.path().join("rejected.frames")).unwrap();
    let mut kept = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap());
        let payload = &bytes[offset + 8..offset + 8 + len];
        assert_eq!(crc32fast::hash(payload), crc);
        kept.push(
            shamal_audit_client::AuditEvent::decode(payload)
                .unwrap()
                .event_id,
        );
        offset += 8 + len;
    }
    assert_eq!(kept, ["inv-7", "inv-47", "inv-87"]);
    auditor.shutdown().await;
    serving.stop().await;
}
