//! Which worker takes which shard, and when: a job of several regions is
//! scored by the workers of any of them (and of no other); the queue window
//! puts a later job of higher priority ahead of an earlier one's remaining
//! shards; a cancelled job's pending shards are never queued; a tenant's
//! residency policy narrows its jobs' regions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::JobQueue;
use shamal_batch_coordinator::model::ShardState;
use shamal_proto::shamal::batch::v1 as proto;
use support::{Behaviour, Consumer, TestDb, client, spec, submit, wait_state};

/// A job allowed in r1 and r2, with batch workers in r2 and r3 only: the
/// r2 worker scores every shard, the r3 worker none; the job's stream is
/// the region set `r1+r2`.
async fn several_regions(db: TestDb, queue: Arc<dyn JobQueue>) {
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
    )
    .await;
    let outside = Consumer::start(queue.clone(), "r3", Behaviour::Score);
    let inside = Consumer::start(queue.clone(), "r2", Behaviour::Score);
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 40);
    let output = db.dir.path().join("out");
    let job = submit(
        &mut client,
        proto::JobSpec {
            regions: vec!["r2".into(), "r1".into()],
            ..spec(&input, &output)
        },
    )
    .await
    .unwrap();
    let done = wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
    assert_eq!(done.done_rows, 40);
    let store = support::store(&db).await;
    assert_eq!(store.routing(&job.id).await.unwrap().stream_region, "r1+r2");
    let stored = store.job(&job.id).await.unwrap().unwrap();
    assert_eq!(stored.regions, vec!["r1".to_owned(), "r2".to_owned()]);
    let taken = inside.taken.lock().unwrap().clone();
    assert_eq!(taken.len(), 4, "{taken:?}");
    assert!(
        taken
            .iter()
            .all(|(id, _, region)| *id == job.id && region == "r2")
    );
    assert!(outside.taken.lock().unwrap().is_empty());
    support::assert_exactly_once(&output, 40);
    outside.stop().await;
    inside.stop().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_several_regions_is_scored_in_any_of_them_sqlite_memory() {
    several_regions(TestDb::sqlite(), support::memory_queue()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_several_regions_is_scored_in_any_of_them_postgres_redis() {
    let (Some(db), Some(queue)) = (TestDb::postgres().await, support::redis_queue().await) else {
        return;
    };
    several_regions(db, queue).await;
}

/// The shards of `job` in the store, by state: (queued, pending).
async fn queued_and_pending(db: &TestDb, job: &str) -> (usize, usize) {
    let shards = support::store(db).await.shards(job).await.unwrap();
    let count = |state| shards.iter().filter(|shard| shard.state == state).count();
    (count(ShardState::Queued), count(ShardState::Pending))
}

/// With one entry of the stream waiting at most, a job of priority 9
/// submitted after a job of priority 0 has its shards scored before the
/// first job's remaining ones; the first job's queued shard is not taken
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_job_of_higher_priority_overtakes_an_earlier_one() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start_with(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
        |config| config.queue_window = 1,
    )
    .await;
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 60);
    let small = db.dir.path().join("small.jsonl");
    support::write_jsonl(&small, 30);
    let low = submit(&mut client, spec(&input, &db.dir.path().join("low")))
        .await
        .unwrap();
    assert_eq!(low.shards_total, 6);
    let high = submit(
        &mut client,
        proto::JobSpec {
            priority: 9,
            ..spec(&small, &db.dir.path().join("high"))
        },
    )
    .await
    .unwrap();
    // Nobody takes anything yet: one entry waits, the rest is pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queued_and_pending(&db, &low.id).await, (1, 5));
    assert_eq!(queued_and_pending(&db, &high.id).await, (0, 3));
    let waiting = client
        .get_job(proto::GetJobRequest {
            id: high.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        waiting
            .message
            .starts_with("queued: waiting behind other jobs"),
        "{}",
        waiting.message
    );
    // One shard at a time.
    let worker = Consumer::start(queue.clone(), "uae-north", Behaviour::Slow(1));
    wait_state(&mut client, &high.id, proto::JobState::Succeeded).await;
    wait_state(&mut client, &low.id, proto::JobState::Succeeded).await;
    let order: Vec<(String, u32)> = worker
        .taken
        .lock()
        .unwrap()
        .iter()
        .map(|(job, shard, _)| (job.clone(), *shard))
        .collect();
    let mut expected = vec![(low.id.clone(), 0)];
    expected.extend((0..3).map(|shard| (high.id.clone(), shard)));
    expected.extend((1..6).map(|shard| (low.id.clone(), shard)));
    assert_eq!(order, expected);
    support::assert_exactly_once(&db.dir.path().join("low"), 60);
    support::assert_exactly_once(&db.dir.path().join("high"), 30);
    worker.stop().await;
    running.stop().await.unwrap();
}

/// A cancelled job's shards are never scored: those beyond the window are
/// never queued, and the two in it are answered on the queue, so a worker
/// started afterwards takes none of them; the next job of the stream still
/// runs, and nothing is written in the cancelled job's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_jobs_pending_shards_are_never_queued() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start_with(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
        |config| config.queue_window = 2,
    )
    .await;
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 50);
    let cancelled = submit(&mut client, spec(&input, &db.dir.path().join("gone")))
        .await
        .unwrap();
    assert_eq!(cancelled.shards_total, 5);
    client
        .cancel_job(proto::CancelJobRequest {
            id: cancelled.id.clone(),
        })
        .await
        .unwrap();
    let next = submit(&mut client, spec(&input, &db.dir.path().join("next")))
        .await
        .unwrap();
    let worker = Consumer::start(queue.clone(), "uae-north", Behaviour::Score);
    wait_state(&mut client, &next.id, proto::JobState::Succeeded).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = worker.taken.lock().unwrap().clone();
    let of_cancelled = taken
        .iter()
        .filter(|(job, _, _)| *job == cancelled.id)
        .count();
    assert_eq!(of_cancelled, 0, "{taken:?}");
    assert_eq!(queued_and_pending(&db, &cancelled.id).await, (2, 3));
    assert!(
        !db.dir.path().join("gone").exists()
            || std::fs::read_dir(db.dir.path().join("gone"))
                .unwrap()
                .next()
                .is_none(),
        "a cancelled job's output has parts"
    );
    let after = client
        .get_job(proto::GetJobRequest {
            id: cancelled.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.state(), proto::JobState::Cancelled);
    support::assert_exactly_once(&db.dir.path().join("next"), 50);
    worker.stop().await;
    running.stop().await.unwrap();
}

/// A tenant's residency policy narrows its jobs' regions like the model's
/// does: a job of tenant `acme` (policy: r2) naming no region runs in r2
/// only; one naming r1 and r2 runs in r2; one naming only r1 is refused
/// naming the tenant and nothing is written; a tenant without a policy
/// goes to the default region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_residency_policy_narrows_its_jobs_regions() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let mut dependencies = support::dependencies(queue.clone(), vec![]);
    dependencies.catalog = Arc::new(
        shamal_batch_coordinator::catalog::StaticCatalog::new([support::scorer_state(&[])])
            .with_tenant_policy("acme", &["r2"]),
    );
    let running = support::start(&db, dependencies).await;
    let r1 = Consumer::start(queue.clone(), "r1", Behaviour::Score);
    let r2 = Consumer::start(queue.clone(), "r2", Behaviour::Score);
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 20);
    let store = support::store(&db).await;
    let job_of = |tenant: &str, regions: &[&str], out: &str| proto::JobSpec {
        tenant: tenant.to_owned(),
        regions: regions.iter().map(|region| (*region).to_owned()).collect(),
        ..spec(&input, &db.dir.path().join(out))
    };
    for (regions, out) in [(&[][..], "any"), (&["r1", "r2"][..], "both")] {
        let job = submit(&mut client, job_of("acme", regions, out))
            .await
            .unwrap();
        wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
        let stored = store.job(&job.id).await.unwrap().unwrap();
        assert_eq!(stored.regions, vec!["r2".to_owned()], "{regions:?}");
        support::assert_exactly_once(&db.dir.path().join(out), 20);
    }
    let refused = submit(&mut client, job_of("acme", &["r1"], "refused"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("tenant 'acme' allows [r2]"),
        "{}",
        refused.message()
    );
    assert!(!db.dir.path().join("refused").exists());
    let free = submit(&mut client, job_of("other", &[], "free"))
        .await
        .unwrap();
    wait_state(&mut client, &free.id, proto::JobState::Succeeded).await;
    assert!(
        store
            .job(&free.id)
            .await
            .unwrap()
            .unwrap()
            .regions
            .is_empty()
    );
    assert!(
        r1.taken
            .lock()
            .unwrap()
            .iter()
            .all(|(job, _, _)| *job == free.id),
        "only the free job runs in r1 (the default region)"
    );
    assert_eq!(r1.taken.lock().unwrap().len(), 2);
    assert_eq!(r2.taken.lock().unwrap().len(), 4);
    r1.stop().await;
    r2.stop().await;
    running.stop().await.unwrap();
}
