//! Many appenders at once on PostgreSQL: tasks sharing one log and tasks
//! on other replicas (their own pools and in-process locks, as separate
//! processes would be) extend one unbroken chain, with no sequence number
//! given twice and each event recorded once, while checkpoints are signed
//! and Verify runs alongside.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;

use sqlx::Row;
use support::*;

const REPLICAS: usize = 3;
const TASKS_PER_REPLICA: usize = 4;
const ROUNDS: u64 = 12;
const BATCH: u64 = 25;

async fn many_appenders_make_one_chain(db: &TestDb) {
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(db.open_with(100).await);
    }
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    // Every replica signs checkpoints meanwhile, as the service does.
    let checkpointers: Vec<_> = replicas
        .iter()
        .map(|log| log.spawn_checkpointer(stop.clone()))
        .collect();
    let mut tasks = Vec::new();
    let tasks_total = (REPLICAS * TASKS_PER_REPLICA) as u64;
    for task in 0..tasks_total {
        let log = replicas[task as usize % REPLICAS].clone();
        tasks.push(tokio::spawn(async move {
            let (mut appended, mut duplicates) = (0u64, 0u64);
            for round in 0..ROUNDS {
                // Each task's own events, plus the first five of the next
                // task's batch of this round: the same event offered by two
                // appenders at once.
                let own = (round * tasks_total + task) * BATCH;
                let next = (round * tasks_total + (task + 1) % tasks_total) * BATCH;
                let mut batch = events(own..own + BATCH);
                batch.extend(events(next..next + 5));
                let outcome = log.append(batch).await.unwrap();
                appended += u64::from(outcome.appended);
                duplicates += u64::from(outcome.duplicates);
            }
            (appended, duplicates)
        }));
    }
    // Verify while the appends run: every snapshot it sees is a whole chain.
    let verifier = {
        let log = replicas[0].clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                let verified = log.verify().await.unwrap();
                assert!(verified.ok, "{verified:?}");
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        })
    };
    let (mut appended, mut duplicates) = (0, 0);
    for task in tasks {
        let (a, d) = task.await.unwrap();
        appended += a;
        duplicates += d;
    }
    verifier.await.unwrap();
    stop_sender.send(true).unwrap();
    for task in checkpointers {
        task.await.unwrap();
    }

    let unique = tasks_total * ROUNDS * BATCH;
    assert_eq!(appended, unique, "each event written exactly once");
    assert_eq!(duplicates, tasks_total * ROUNDS * 5);
    let pool = &replicas[0].store().pool;
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT seq) AS seqs, COUNT(DISTINCT event_id) AS ids, \
         MIN(seq) AS first, MAX(seq) AS last FROM audit_records",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let count = |column: &str| row.try_get::<i64, _>(column).unwrap() as u64;
    assert_eq!(count("n"), unique);
    assert_eq!(count("seqs"), unique);
    assert_eq!(count("ids"), unique);
    assert_eq!((count("first"), count("last")), (1, unique));
    // Every record links to the one before (checked by Verify too).
    let verified = replicas[REPLICAS - 1].verify().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records_checked, unique);
    assert!(verified.checkpoints_checked >= 1, "{verified:?}");
    // The final checkpoints cover the head; no two checkpoints of one seq.
    let head = replicas[0].head().await.unwrap();
    assert_eq!(replicas[0].last_checkpoint_seq().await.unwrap(), head.seq);
    let rows = sqlx::query("SELECT seq FROM audit_checkpoints")
        .fetch_all(pool)
        .await
        .unwrap();
    let seqs: HashSet<i64> = rows.iter().map(|row| row.try_get("seq").unwrap()).collect();
    assert_eq!(seqs.len(), rows.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_appenders_make_one_unbroken_chain() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    many_appenders_make_one_chain(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_appenders_make_one_unbroken_chain() {
    let db = TestDb::sqlite().await;
    many_appenders_make_one_chain(&db).await;
}
