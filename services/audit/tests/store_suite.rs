//! One test-suite, two backends: every case runs against SQLite and against
//! a real PostgreSQL server.
#![allow(clippy::unwrap_used)]

mod support;

use shamal_audit::export::Line;
use shamal_audit::{Digest, FailureKind};
use shamal_audit_service::AuditLog;
use shamal_audit_service::error::AuditError;
use shamal_audit_service::log::{Query, now_ms};
use shamal_audit_service::store::Backend;
use support::*;

/// Instantiates each case once per backend.
macro_rules! both_backends {
    ($($case:ident),+ $(,)?) => {
        $(mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = super::TestDb::sqlite().await;
                super::$case(&db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = super::TestDb::postgres().await else { return };
                super::$case(&db).await;
            }
        })+
    };
}

both_backends!(
    appends_are_chained_and_idempotent,
    bad_events_are_refused_naming_index_and_field,
    triggers_refuse_update_and_delete,
    verify_finds_a_record_changed_behind_the_triggers,
    checkpoints_sign_the_head_once,
    retention_leaves_a_tombstone_and_the_chain_verifies,
    query_filters_and_pages,
    export_verifies_offline,
    export_of_a_time_window_verifies_offline,
    replicas_on_one_database_extend_one_chain,
);

async fn appends_are_chained_and_idempotent(db: &TestDb) {
    let log = db.open().await;
    assert_eq!(log.head().await.unwrap().seq, 0);
    // A batch with a repeat inside it.
    let mut batch = events(0..50);
    batch.push(event(7));
    let first = log.append(batch.clone()).await.unwrap();
    assert_eq!(
        (first.appended, first.duplicates, first.head_seq),
        (50, 1, 50)
    );
    // The producer retries the whole batch: nothing new.
    let retry = log.append(batch).await.unwrap();
    assert_eq!(
        (retry.appended, retry.duplicates, retry.head_seq),
        (0, 51, 50)
    );
    // A batch half old, half new.
    let mixed = log.append(events(25..75)).await.unwrap();
    assert_eq!(
        (mixed.appended, mixed.duplicates, mixed.head_seq),
        (25, 25, 75)
    );
    assert_eq!(log.metrics().appended.get(), 75);
    // An empty batch answers the head.
    let empty = log.append(Vec::new()).await.unwrap();
    assert_eq!((empty.appended, empty.head_seq), (0, 75));

    // One copy of each event, numbered 1..=75, each linked to the one before.
    let page = log
        .query(&Query {
            page_size: 1000,
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 75);
    let mut prev = Digest::ZERO;
    for (index, record) in page.records.iter().enumerate() {
        assert_eq!(record.seq, index as u64 + 1);
        assert_eq!(record.event, event(index as u64));
        assert_eq!(record.prev_hash, prev);
        assert!(record.is_intact());
        prev = record.hash;
    }
    let head = log.head().await.unwrap();
    assert_eq!((head.seq, head.hash), (75, prev));
    // A u64 latency above i64::MAX survives the BIGINT column.
    let mut big = event(1000);
    big.latency_us = u64::MAX - 1;
    log.append(vec![big.clone()]).await.unwrap();
    let stored = log
        .query(&Query {
            after_seq: 75,
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(stored.records[0].event, big);
    assert!(stored.records[0].is_intact());
    let verified = log.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, 76);
}

async fn bad_events_are_refused_naming_index_and_field(db: &TestDb) {
    let log = db.open().await;
    let mut batch = events(0..5);
    batch[3].request_sha256 = "ABC".to_owned();
    let error = log.append(batch).await.unwrap_err();
    assert!(
        matches!(&error, AuditError::Invalid { field, .. } if field == "events[3].request_sha256"),
        "{error}"
    );
    assert!(
        error.to_string().starts_with("events[3].request_sha256: "),
        "{error}"
    );
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let mut batch = events(0..2);
    batch[1].before_json = "{not json".to_owned();
    let error = log.append(batch).await.unwrap_err().to_string();
    assert!(error.starts_with("events[1].before_json: "), "{error}");
    let mut batch = events(0..1);
    batch[0].event_id.clear();
    let error = log.append(batch).await.unwrap_err().to_string();
    assert!(error.starts_with("events[0].event_id: "), "{error}");
    // Too many events in one call.
    let error = log.append(events(0..10_001)).await.unwrap_err().to_string();
    assert!(error.starts_with("events: 10001 events"), "{error}");
    // Nothing of the refused batches was written.
    assert_eq!(log.head().await.unwrap().seq, 0);
    // Exactly the limit is accepted.
    let appended = log.append(events(0..10_000)).await.unwrap();
    assert_eq!(appended.appended, 10_000);
    assert!(log.verify().await.unwrap().ok);
}

/// A statement the append-only triggers must refuse.
async fn refused(log: &AuditLog, sql: &str) {
    let result = sqlx::query(sql).execute(&log.store().pool).await;
    let error = result.err().unwrap_or_else(|| panic!("{sql} was allowed"));
    let error = AuditError::from(error);
    assert!(
        matches!(&error, AuditError::Refused(message) if message.contains("append-only")),
        "{sql}: {error}"
    );
}

async fn triggers_refuse_update_and_delete(db: &TestDb) {
    let log = db.open().await;
    log.append(events(0..10)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(10..20)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    // Retention leaves a tombstone to try to change too.
    log.retain(now_ms() + 60_000).await.unwrap().unwrap();
    log.append(events(20..30)).await.unwrap();
    for sql in [
        "UPDATE audit_records SET actor = 'mallory' WHERE seq = 25",
        "UPDATE audit_records SET hash = prev_hash",
        "DELETE FROM audit_records WHERE seq = 25",
        "DELETE FROM audit_records",
        "UPDATE audit_checkpoints SET head_hash = 'x'",
        "DELETE FROM audit_checkpoints",
        "UPDATE audit_tombstones SET last_seq = 30",
        "DELETE FROM audit_tombstones",
        "UPDATE audit_append_lock SET id = 1",
        "DELETE FROM audit_append_lock",
    ] {
        refused(&log, sql).await;
    }
    if log.store().backend == Backend::Postgres {
        for sql in [
            "TRUNCATE audit_records",
            "TRUNCATE audit_checkpoints",
            "TRUNCATE audit_tombstones",
        ] {
            refused(&log, sql).await;
        }
    }
    // Nothing was changed by the attempts.
    let verified = log.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(log.head().await.unwrap().seq, 30);
}

async fn verify_finds_a_record_changed_behind_the_triggers(db: &TestDb) {
    let log = db.open().await;
    log.append(events(0..40)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(40..60)).await.unwrap();
    assert!(log.verify().await.unwrap().ok);
    // Someone with the database's owner rights drops a trigger and edits
    // record 17: the chain no longer matches.
    let drop_trigger = match log.store().backend {
        Backend::Postgres => "DROP TRIGGER audit_records_no_update ON audit_records",
        Backend::Sqlite => "DROP TRIGGER audit_records_no_update",
    };
    sqlx::query(drop_trigger)
        .execute(&log.store().pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_records SET actor = 'mallory' WHERE seq = 17")
        .execute(&log.store().pool)
        .await
        .unwrap();
    let verified = log.verify().await.unwrap();
    assert!(!verified.ok);
    assert_eq!(verified.first_bad_seq, 17, "{verified:?}");
    assert!(verified.reason.contains("edited"), "{verified:?}");
    assert_eq!(log.metrics().verify_failures.get(), 1);
    // Rehashing the record does not help: its successor and the signed
    // checkpoint disagree.
    let record = log
        .query(&Query {
            after_seq: 16,
            page_size: 1,
            ..Query::default()
        })
        .await
        .unwrap()
        .records
        .remove(0);
    let rehashed = shamal_audit::Record::append(
        &record.prev_hash,
        record.seq,
        record.recorded_at_ms,
        record.event.clone(),
    );
    sqlx::query("UPDATE audit_records SET hash = $1 WHERE seq = 17")
        .bind(rehashed.hash.to_hex())
        .execute(&log.store().pool)
        .await
        .unwrap();
    let verified = log.verify().await.unwrap();
    assert!(!verified.ok);
    assert_eq!(verified.first_bad_seq, 18, "{verified:?}");
}

async fn checkpoints_sign_the_head_once(db: &TestDb) {
    let log = db.open_with(25).await;
    // Nothing to checkpoint in an empty log.
    assert_eq!(log.checkpoint().await.unwrap(), None);
    log.append(events(0..30)).await.unwrap();
    let checkpoint = log.checkpoint().await.unwrap().unwrap();
    let head = log.head().await.unwrap();
    assert_eq!(
        (checkpoint.seq, checkpoint.head_hash),
        (head.seq, head.hash)
    );
    log.public_key().verify_checkpoint(&checkpoint).unwrap();
    // The head did not move: no second checkpoint of it.
    assert_eq!(log.checkpoint().await.unwrap(), None);
    // The background task signs after `every` (25) records.
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let task = log.spawn_checkpointer(stop);
    log.append(events(30..60)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.last_checkpoint_seq().await.unwrap() != 60 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint of 60");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // And a last one when it stops.
    log.append(events(60..61)).await.unwrap();
    stop_sender.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(log.last_checkpoint_seq().await.unwrap(), 61);
    let verified = log.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.checkpoints_checked, 3);
    assert!(log.metrics().checkpoints.get() >= 3);
}

async fn retention_leaves_a_tombstone_and_the_chain_verifies(db: &TestDb) {
    let log = db.open().await;
    // Nothing to remove in an empty log, nor without checkpoints.
    assert_eq!(log.retain(now_ms() + 60_000).await.unwrap(), None);
    log.append(events(0..10)).await.unwrap();
    assert_eq!(log.retain(now_ms() + 60_000).await.unwrap(), None);
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(10..25)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(25..30)).await.unwrap();
    // A cutoff before everything: nothing is old enough.
    assert_eq!(log.retain(1).await.unwrap(), None);
    // Everything is old: the range up to the newest checkpoint (25) goes;
    // records after it stay, since no checkpoint ends their range.
    let tombstone = log.retain(now_ms() + 60_000).await.unwrap().unwrap();
    assert_eq!((tombstone.first_seq, tombstone.last_seq), (1, 25));
    log.public_key().verify_tombstone(&tombstone).unwrap();
    let remaining = log.query(&Query::default()).await.unwrap().records;
    assert_eq!(
        remaining
            .iter()
            .map(|record| record.seq)
            .collect::<Vec<_>>(),
        (26..=30).collect::<Vec<_>>()
    );
    assert_eq!(remaining[0].prev_hash, tombstone.last_hash);
    assert_eq!(log.metrics().retention_removed.get(), 25);
    let verified = log.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, 5);
    // The removed range's checkpoints: the one at 25 against the tombstone,
    // the one at 10 by its signature alone.
    assert_eq!(verified.checkpoints_checked, 2);
    // Again: nothing checkpointed left to remove.
    assert_eq!(log.retain(now_ms() + 60_000).await.unwrap(), None);
    // The chain goes on past the gap; a second pass leaves a second
    // tombstone right after the first.
    log.append(events(30..40)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(40..42)).await.unwrap();
    let second = log.retain(now_ms() + 60_000).await.unwrap().unwrap();
    assert_eq!((second.first_seq, second.last_seq), (26, 40));
    let verified = log.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, 2);
    // An export of everything starts with both tombstones and verifies.
    let lines = export_lines(&log, 0, 0).await;
    assert!(matches!(&lines[0], Line::Tombstone(t) if t.first_seq == 1));
    let report = verify_offline(&lines, log.public_key()).unwrap();
    assert_eq!(
        (report.records, report.tombstones, report.removed),
        (2, 2, 40)
    );
    assert_eq!((report.first_seq, report.last_seq), (1, 42));
    // When every record is removed, the head is the last tombstone's end
    // and appends continue from it.
    log.checkpoint().await.unwrap().unwrap();
    let third = log.retain(now_ms() + 60_000).await.unwrap().unwrap();
    assert_eq!((third.first_seq, third.last_seq), (41, 42));
    let head = log.head().await.unwrap();
    assert_eq!((head.seq, head.hash), (42, third.last_hash));
    assert!(log.verify().await.unwrap().ok);
    let report = verify_offline(&export_lines(&log, 0, 0).await, log.public_key()).unwrap();
    assert_eq!((report.records, report.tombstones), (0, 3));
    let appended = log.append(events(42..45)).await.unwrap();
    assert_eq!(appended.head_seq, 45);
    let verified = log.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, 3);
    // The triggers still refuse removing records no tombstone covers.
    refused(&log, "DELETE FROM audit_records WHERE seq = 43").await;
}

/// Which events a query should return.
type Keep = Box<dyn Fn(&shamal_audit::Event) -> bool>;

async fn query_filters_and_pages(db: &TestDb) {
    let log = db.open().await;
    let mut batch = Vec::new();
    for n in 0..60u64 {
        let mut event = event(n);
        event.model = ["fraud", "churn", "spam"][(n % 3) as usize].to_owned();
        event.actor = ["alice", "bob"][(n % 2) as usize].to_owned();
        event.tenant = if n < 30 { "acme" } else { "globex" }.to_owned();
        event.action = if n % 10 == 0 {
            "rollout.shift"
        } else {
            "inference"
        }
        .to_owned();
        event.outcome = if n % 7 == 0 {
            "permission_denied"
        } else {
            "ok"
        }
        .to_owned();
        event.region = if n % 4 == 0 { "us" } else { "eu" }.to_owned();
        event.version = (n % 5).to_string();
        event.occurred_at_ms = 1_000_000 + n as i64 * 10;
        batch.push(event);
    }
    log.append(batch.clone()).await.unwrap();
    let all = |query: Query| {
        let log = log.clone();
        async move {
            let mut seqs = Vec::new();
            let mut query = query;
            loop {
                let page = log.query(&query).await.unwrap();
                assert!(page.records.len() <= query.page_size as usize);
                seqs.extend(page.records.iter().map(|record| record.seq));
                match page.next_after {
                    Some(after) => query.after_seq = after,
                    None => break,
                }
            }
            seqs
        }
    };
    let expect = |keep: &dyn Fn(&shamal_audit::Event) -> bool| {
        batch
            .iter()
            .enumerate()
            .filter(|(_, event)| keep(event))
            .map(|(index, _)| index as u64 + 1)
            .collect::<Vec<u64>>()
    };
    // Every filter alone, paged 7 at a time.
    let cases: Vec<(Query, Keep)> = vec![
        (
            Query {
                model: "fraud".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.model == "fraud"),
        ),
        (
            Query {
                actor: "bob".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.actor == "bob"),
        ),
        (
            Query {
                tenant: "globex".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.tenant == "globex"),
        ),
        (
            Query {
                version: "3".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.version == "3"),
        ),
        (
            Query {
                action: "rollout.shift".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.action == "rollout.shift"),
        ),
        (
            Query {
                outcome: "permission_denied".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.outcome == "permission_denied"),
        ),
        (
            Query {
                region: "us".into(),
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| event.region == "us"),
        ),
        (
            Query {
                since_ms: 1_000_200,
                until_ms: 1_000_400,
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| {
                (1_000_200..1_000_400).contains(&event.occurred_at_ms)
            }),
        ),
        // Several, ANDed.
        (
            Query {
                model: "churn".into(),
                actor: "alice".into(),
                tenant: "acme".into(),
                since_ms: 1_000_050,
                ..Query::default()
            },
            Box::new(|event: &shamal_audit::Event| {
                event.model == "churn"
                    && event.actor == "alice"
                    && event.tenant == "acme"
                    && event.occurred_at_ms >= 1_000_050
            }),
        ),
        (
            Query {
                model: "nobody".into(),
                ..Query::default()
            },
            Box::new(|_: &shamal_audit::Event| false),
        ),
        (Query::default(), Box::new(|_: &shamal_audit::Event| true)),
    ];
    for (query, keep) in cases {
        let wanted = expect(&*keep);
        let paged = all(Query {
            page_size: 7,
            ..query.clone()
        })
        .await;
        assert_eq!(paged, wanted, "{query:?}");
        let one_page = all(Query {
            page_size: 1000,
            ..query.clone()
        })
        .await;
        assert_eq!(one_page, wanted, "{query:?}");
    }
    // The default page is 100; a page exactly full says whether more come.
    let page = log.query(&Query::default()).await.unwrap();
    assert_eq!((page.records.len(), page.next_after), (60, None));
    let page = log
        .query(&Query {
            page_size: 60,
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(page.next_after, None);
    let page = log
        .query(&Query {
            page_size: 59,
            ..Query::default()
        })
        .await
        .unwrap();
    assert_eq!(page.next_after, Some(59));
    // Bad requests name the field.
    for (query, field) in [
        (
            Query {
                page_size: 1001,
                ..Query::default()
            },
            "page_size",
        ),
        (
            Query {
                since_ms: -1,
                ..Query::default()
            },
            "since_ms",
        ),
        (
            Query {
                since_ms: 10,
                until_ms: 10,
                ..Query::default()
            },
            "until_ms",
        ),
    ] {
        let error = log.query(&query).await.unwrap_err();
        assert!(
            matches!(&error, AuditError::Invalid { field: named, .. } if named == field),
            "{error}"
        );
    }
}

async fn export_verifies_offline(db: &TestDb) {
    let log = db.open().await;
    // An empty log exports a seal alone, which verifies.
    let lines = export_lines(&log, 0, 0).await;
    assert_eq!(lines.len(), 1);
    let report = verify_offline(&lines, log.public_key()).unwrap();
    assert_eq!(report.records, 0);
    // More than a walk page (500) of records, checkpoints in between.
    log.append(events(0..700)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(700..1300)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(1300..1320)).await.unwrap();
    let lines = export_lines(&log, 0, 0).await;
    // Records, two checkpoints right after their records, the seal.
    assert_eq!(lines.len(), 1320 + 2 + 1);
    assert!(matches!(&lines[700], Line::Checkpoint(c) if c.seq == 700));
    assert!(matches!(&lines[1301], Line::Checkpoint(c) if c.seq == 1300));
    let Some(Line::Seal(seal)) = lines.last() else {
        panic!("no seal last");
    };
    assert_eq!(
        (seal.first_seq, seal.last_seq, seal.records),
        (1, 1320, 1320)
    );
    assert_eq!(seal.first_prev_hash, Digest::ZERO);
    assert_eq!(seal.last_hash, log.head().await.unwrap().hash);
    let report = verify_offline(&lines, log.public_key()).unwrap();
    assert_eq!((report.records, report.checkpoints), (1320, 2));
    assert_eq!(report.key_id, log.public_key().key_id());
    // Tampering with the export is caught offline: an edited record, a
    // record left out, the file cut before its seal.
    let mut edited = lines.clone();
    if let Line::Record(record) = &mut edited[100] {
        record.event.actor = "mallory".to_owned();
    }
    let failure = verify_offline(&edited, log.public_key()).unwrap_err();
    assert_eq!(
        (failure.kind, failure.seq),
        (FailureKind::Edited, Some(101))
    );
    let mut removed = lines.clone();
    removed.remove(200);
    let failure = verify_offline(&removed, log.public_key()).unwrap_err();
    assert_eq!(failure.kind, FailureKind::Removed, "{failure}");
    let cut = &lines[..lines.len() - 1];
    let failure = verify_offline(cut, log.public_key()).unwrap_err();
    assert_eq!(failure.kind, FailureKind::Truncated, "{failure}");
    // Against another key, nothing verifies.
    let other = shamal_audit::Signer::generate().public_key();
    let failure = verify_offline(&lines, &other).unwrap_err();
    assert_eq!(failure.kind, FailureKind::WrongKey, "{failure}");
}

async fn export_of_a_time_window_verifies_offline(db: &TestDb) {
    let log = db.open().await;
    log.append(events(0..20)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    log.append(events(20..30)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();
    log.append(events(30..35)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let until = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    log.append(events(35..50)).await.unwrap();
    log.checkpoint().await.unwrap().unwrap();

    // [since, until): records 21..=35, the checkpoint of 30.
    let lines = export_lines(&log, since, until).await;
    let report = verify_offline(&lines, log.public_key()).unwrap();
    assert_eq!(
        (
            report.first_seq,
            report.last_seq,
            report.records,
            report.checkpoints
        ),
        (21, 35, 15, 1)
    );
    assert_eq!((report.since_ms, report.until_ms), (since, until));
    // [since, open): 21..=50 with the checkpoints of 30 and 50.
    let report = verify_offline(&export_lines(&log, since, 0).await, log.public_key()).unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.checkpoints),
        (21, 50, 2)
    );
    // [open, until): 1..=35.
    let report = verify_offline(&export_lines(&log, 0, until).await, log.public_key()).unwrap();
    assert_eq!((report.first_seq, report.last_seq), (1, 35));
    // A window with no record: an empty, sealed export.
    let later = now_ms() + 60_000;
    let report = verify_offline(
        &export_lines(&log, later, later + 1).await,
        log.public_key(),
    )
    .unwrap();
    assert_eq!(report.records, 0);
    // Bad bounds name the field.
    let (sender, _receiver) = tokio::sync::mpsc::channel(1);
    let error = log.export_into(10, 5, &sender).await.unwrap_err();
    assert!(
        matches!(&error, AuditError::Invalid { field, .. } if field == "until_ms"),
        "{error}"
    );
}

async fn replicas_on_one_database_extend_one_chain(db: &TestDb) {
    // Two logs over one database, each with its own pool and in-process
    // lock: only the database serialises them.
    let first = db.open().await;
    let second = db.open().await;
    let mut tasks = Vec::new();
    for task in 0..6u64 {
        let log = if task % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            for round in 0..5u64 {
                let start = (task * 5 + round) * 20;
                // Overlapping batches: half of each repeats the last one's ids.
                let events = events(start.saturating_sub(10)..start + 20);
                log.append(events).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let head = first.head().await.unwrap();
    assert_eq!(head.seq, 600);
    let verified = second.verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, 600);
}
