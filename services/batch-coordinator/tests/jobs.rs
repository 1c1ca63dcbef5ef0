//! Batch jobs end to end: submit over gRPC and REST, shards taken by a
//! test consumer (the workers' batch role in miniature), SUCCEEDED with
//! exactly one output row per input row; bad submits; a poisoned shard; a
//! coordinator restarted mid-job; cancel; residency. SQLite and the
//! in-process queue, and PostgreSQL with Redis where configured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::JobQueue;
use shamal_batch_io::Manifest;
use shamal_proto::shamal::batch::v1 as proto;
use support::{Behaviour, Consumer, TestDb, client, spec, submit, wait_state};
use tonic::Code;

/// A JSONL job and a Parquet job run to SUCCEEDED: manifest verified,
/// exactly one row per input row, every shard taken in the job's region.
async fn jobs_succeed(db: TestDb, queue: Arc<dyn JobQueue>) {
    let running = support::start(
        &db,
        support::dependencies(
            queue.clone(),
            vec![support::scorer_state(&["uae-north", "uae-south"])],
        ),
    )
    .await;
    let mut client = client(&running).await;
    let consumer = Consumer::start(queue.clone(), "uae-north", Behaviour::Score);
    let outsider = Consumer::start(queue.clone(), "eu-west", Behaviour::Score);
    let dir = db.dir.path();
    support::write_jsonl(&dir.join("rows.jsonl"), 95);
    support::write_parquet(&dir.join("rows.parquet"), 57, 10);
    for (input, rows, shards) in [("rows.jsonl", 95, None), ("rows.parquet", 57, Some(6))] {
        let output = dir.join(format!("out-{input}"));
        let job = submit(&mut client, spec(&dir.join(input), &output))
            .await
            .unwrap();
        assert!(job.id.starts_with("job-"), "{}", job.id);
        assert_eq!(job.version, 1, "the newest ready version");
        assert_eq!(job.actor, "anonymous");
        let done = wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
        assert_eq!(done.done_rows, rows as u64, "{done:?}");
        assert_eq!(done.total_rows, rows as u64);
        assert_eq!(done.shards_done, done.shards_total);
        if let Some(shards) = shards {
            assert_eq!(done.shards_total, shards);
        }
        assert!(done.finished_at_ms >= done.started_at_ms && done.started_at_ms > 0);
        let manifest = Manifest::verify(output.to_str().unwrap()).await.unwrap();
        assert_eq!(manifest.total_rows, rows as u64);
        assert_eq!(manifest.parts.len() as u32, done.shards_total);
        assert_eq!(manifest.job_id, job.id);
        assert_eq!(
            done.manifest,
            output.join("_manifest.json").display().to_string()
        );
        support::assert_exactly_once(&output, rows);
    }
    assert!(
        outsider.taken.lock().unwrap().is_empty(),
        "a worker of another region took a shard"
    );
    consumer.stop().await;
    outsider.stop().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_and_parquet_jobs_succeed_sqlite_memory() {
    jobs_succeed(TestDb::sqlite(), support::memory_queue()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_and_parquet_jobs_succeed_postgres_redis() {
    let (Some(db), Some(queue)) = (TestDb::postgres().await, support::redis_queue().await) else {
        return;
    };
    jobs_succeed(db, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submits_name_the_field_and_write_nothing() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&["uae-north"])]),
    )
    .await;
    let mut client = client(&running).await;
    let dir = db.dir.path();
    let good = dir.join("rows.jsonl");
    support::write_jsonl(&good, 20);
    std::fs::write(dir.join("typed.jsonl"), "{\"id\": 1, \"x\": \"one\"}\n").unwrap();
    std::fs::write(dir.join("nox.jsonl"), "{\"id\": 1, \"z\": 1.5}\n").unwrap();
    std::fs::write(dir.join("corrupt.parquet"), b"PAR1 this is not parquet").unwrap();
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    let output = dir.join("out");
    let base = spec(&good, &output);
    let cases: Vec<(proto::JobSpec, Code, &str)> = vec![
        (
            proto::JobSpec {
                model: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.model",
        ),
        (
            proto::JobSpec {
                input: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.input",
        ),
        (
            proto::JobSpec {
                output: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.output",
        ),
        (
            proto::JobSpec {
                key_columns: vec!["id".into(), String::new()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.key_columns[1]",
        ),
        (
            proto::JobSpec {
                key_columns: vec!["id".into(), "id".into()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.key_columns[1]",
        ),
        (
            proto::JobSpec {
                priority: 10,
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.priority",
        ),
        (
            proto::JobSpec {
                version: 1,
                alias: "prod".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.alias",
        ),
        (
            proto::JobSpec {
                input_format: "xlsx".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.input_format",
        ),
        (
            proto::JobSpec {
                output: full.display().to_string(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "is not empty",
        ),
        (
            proto::JobSpec {
                key_columns: vec!["missing_key".into()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "missing_key",
        ),
        (
            proto::JobSpec {
                input: dir.join("nox.jsonl").display().to_string(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "column 'x'",
        ),
        (
            proto::JobSpec {
                input: dir.join("typed.jsonl").display().to_string(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "column 'x': expected",
        ),
        (
            proto::JobSpec {
                input: dir.join("corrupt.parquet").display().to_string(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "corrupt.parquet",
        ),
        (
            proto::JobSpec {
                input: dir.join("nowhere.parquet").display().to_string(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "nowhere.parquet",
        ),
        (
            proto::JobSpec {
                input_columns: [("bogus".to_owned(), "x".to_owned())].into_iter().collect(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "spec.input_columns[bogus]",
        ),
        (
            proto::JobSpec {
                model: "nosuch".into(),
                ..base.clone()
            },
            Code::NotFound,
            "model 'nosuch'",
        ),
        (
            proto::JobSpec {
                version: 7,
                ..base.clone()
            },
            Code::NotFound,
            "version 7",
        ),
        (
            proto::JobSpec {
                alias: "staging".into(),
                ..base.clone()
            },
            Code::NotFound,
            "alias 'staging'",
        ),
        (
            proto::JobSpec {
                version: 2,
                ..base.clone()
            },
            Code::FailedPrecondition,
            "not ready",
        ),
        (
            proto::JobSpec {
                regions: vec!["eu-west".into()],
                ..base.clone()
            },
            Code::FailedPrecondition,
            "eu-west",
        ),
    ];
    for (spec, code, named) in cases {
        let status = submit(&mut client, spec.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{spec:?}: {status:?}");
        assert!(
            status.message().contains(named),
            "{named}: {}",
            status.message()
        );
        assert!(!output.exists(), "{named}: the output was written");
    }
    let (jobs, _) = running.coordinator.list(0, "", None, None).await.unwrap();
    assert!(jobs.is_empty(), "no job is stored: {jobs:?}");
    // The input_columns mapping: input x read from column z.
    let mapped = submit(
        &mut client,
        proto::JobSpec {
            input: dir.join("nox.jsonl").display().to_string(),
            input_columns: [("x".to_owned(), "z".to_owned())].into_iter().collect(),
            ..base.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        mapped
            .spec
            .unwrap()
            .input_columns
            .get("x")
            .map(String::as_str),
        Some("z")
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_shard_fails_the_job_after_max_attempts_naming_it() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
    )
    .await;
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 5);
    let output = db.dir.path().join("out");
    let consumer = Consumer::start(queue.clone(), "uae-north", Behaviour::FailAll);
    let job = submit(&mut client, spec(&input, &output)).await.unwrap();
    let failed = wait_state(&mut client, &job.id, proto::JobState::Failed).await;
    assert!(failed.message.contains("shard 0"), "{}", failed.message);
    assert!(
        failed.message.contains("after 3 attempts"),
        "{}",
        failed.message
    );
    assert!(
        failed.message.contains("fails every shard"),
        "{}",
        failed.message
    );
    assert_eq!(failed.shard_failures, 3);
    assert_eq!(
        consumer.taken.lock().unwrap().len(),
        3,
        "one entry per attempt"
    );
    assert!(!output.join("_manifest.json").exists());
    consumer.stop().await;
    running.stop().await.unwrap();
}

/// The coordinator stops mid-job while the consumer goes on completing
/// entries; a new one on the same store and queue finishes the job with
/// exactly one row per input row.
async fn restart_mid_job(db: TestDb, queue: Arc<dyn JobQueue>) {
    let models = vec![support::scorer_state(&[])];
    let first = support::start(&db, support::dependencies(queue.clone(), models.clone())).await;
    let mut client = client(&first).await;
    let input = db.dir.path().join("rows.parquet");
    support::write_parquet(&input, 200, 10);
    let output = db.dir.path().join("out");
    let job = submit(&mut client, spec(&input, &output)).await.unwrap();
    assert_eq!(job.shards_total, 20);
    let consumer = Consumer::start(queue.clone(), "uae-north", Behaviour::Slow(40));
    // Wait for some progress, then stop the coordinator.
    for _ in 0..400 {
        let now = client
            .get_job(proto::GetJobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if now.shards_done > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop().await.unwrap();
    let stored = support::store(&db)
        .await
        .job(&job.id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !stored.state.is_final(),
        "the job ended before the restart: {stored:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = support::start(&db, support::dependencies(queue.clone(), models)).await;
    let mut client = self::client(&second).await;
    let done = wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
    assert_eq!(done.done_rows, 200);
    Manifest::verify(output.to_str().unwrap()).await.unwrap();
    support::assert_exactly_once(&output, 200);
    consumer.stop().await;
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_job_sqlite_memory() {
    restart_mid_job(TestDb::sqlite(), support::memory_queue()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_job_postgres_redis() {
    let (Some(db), Some(queue)) = (TestDb::postgres().await, support::redis_queue().await) else {
        return;
    };
    restart_mid_job(db, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_nobody_takes_says_why_and_cancel_leaves_no_manifest() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
    )
    .await;
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 30);
    let output = db.dir.path().join("out");
    let job = submit(&mut client, spec(&input, &output)).await.unwrap();
    assert_eq!(job.state(), proto::JobState::Queued);
    let mut waiting = None;
    for _ in 0..100 {
        let now = client
            .get_job(proto::GetJobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if now.message.contains("no batch worker") {
            waiting = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = waiting.expect("the job never said why it waits");
    assert!(
        waiting.message.contains("region [uae-north]"),
        "{}",
        waiting.message
    );
    assert_eq!(waiting.state(), proto::JobState::Queued);
    // Watch sees the cancel.
    let mut watch = client
        .watch_job(proto::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.state(), proto::JobState::Queued);
    let cancelled = client
        .cancel_job(proto::CancelJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), proto::JobState::Cancelled);
    let mut last = first;
    while let Some(job) = watch.message().await.unwrap() {
        last = job;
    }
    assert_eq!(
        last.state(),
        proto::JobState::Cancelled,
        "the watch ends with the cancel"
    );
    let again = client
        .cancel_job(proto::CancelJobRequest { id: job.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    // Workers that take its shards now are ignored: no manifest, still
    // CANCELLED.
    let consumer = Consumer::start(queue.clone(), "uae-north", Behaviour::Score);
    for _ in 0..200 {
        if consumer.taken.lock().unwrap().len() == job.shards_total as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = client
        .get_job(proto::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.state(), proto::JobState::Cancelled);
    assert_eq!(after.shards_done, 0);
    assert!(!output.join("_manifest.json").exists());
    let missing = client
        .cancel_job(proto::CancelJobRequest {
            id: "job-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    consumer.stop().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_are_idempotent_by_request_id_and_lists_page() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
    )
    .await;
    let mut client = client(&running).await;
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 10);
    let mut ids = Vec::new();
    for n in 0..3 {
        let request = proto::SubmitJobRequest {
            spec: Some(spec(&input, &db.dir.path().join(format!("out-{n}")))),
            request_id: format!("req-{n}"),
        };
        let first = client
            .submit_job(request.clone())
            .await
            .unwrap()
            .into_inner();
        let second = client.submit_job(request).await.unwrap().into_inner();
        assert_eq!(first.id, second.id, "same request id, same job");
        ids.push(first.id);
    }
    let page = client
        .list_jobs(proto::ListJobsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![ids[2].clone(), ids[1].clone()]
    );
    assert!(!page.next_page_token.is_empty());
    let rest = client
        .list_jobs(proto::ListJobsRequest {
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 1);
    assert_eq!(rest.jobs[0].id, ids[0]);
    assert!(rest.next_page_token.is_empty());
    let none = client
        .list_jobs(proto::ListJobsRequest {
            model: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.jobs.is_empty());
    running.stop().await.unwrap();
}

/// Property: whatever the job's regions and the model's, and whichever
/// workers run, no shard is ever taken by a worker outside the job's
/// stored regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_shard_is_ever_taken_outside_the_jobs_regions() {
    let regions = ["r1", "r2", "r3"];
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let mut models = Vec::new();
    // Models allowing every subset of regions (empty: any).
    for mask in 0u32..8 {
        let allowed: Vec<&str> = regions
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, r)| *r)
            .collect();
        let mut state = support::scorer_state(&allowed);
        state.name = format!("m{mask}");
        models.push(state);
    }
    let mut dependencies = support::dependencies(queue.clone(), models);
    dependencies.metadata = Arc::new(shamal_batch_coordinator::catalog::StaticMetadata::new(
        (0..8).map(|mask| (format!("m{mask}"), support::scorer_signature())),
    ));
    let running = support::start(&db, dependencies).await;
    let consumers: Vec<Consumer> = regions
        .iter()
        .map(|region| Consumer::start(queue.clone(), region, Behaviour::Score))
        .collect();
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 20);
    let mut accepted = Vec::new();
    for model_mask in 0u32..8 {
        for job_mask in 0u32..8 {
            let requested: Vec<String> = regions
                .iter()
                .enumerate()
                .filter(|(i, _)| job_mask & (1 << i) != 0)
                .map(|(_, r)| (*r).to_owned())
                .collect();
            let output = db.dir.path().join(format!("out-{model_mask}-{job_mask}"));
            let spec = shamal_batch_coordinator::model::JobSpec {
                model: format!("m{model_mask}"),
                input: input.display().to_string(),
                output: output.display().to_string(),
                key_columns: vec!["id".into()],
                regions: requested.clone(),
                rows_per_shard: 7,
                ..Default::default()
            };
            let result = running
                .coordinator
                .submit(
                    shamal_batch_coordinator::coordinator::Submit {
                        spec,
                        request_id: String::new(),
                    },
                    &shamal_auth::Principal::Anonymous,
                )
                .await;
            let both_restrict = model_mask != 0 && job_mask != 0;
            match result {
                Ok(job) => accepted.push(job.id),
                Err(error) => {
                    assert!(both_restrict && model_mask & job_mask == 0, "{error}");
                    assert!(!output.exists());
                }
            }
        }
    }
    let mut client = client(&running).await;
    for id in &accepted {
        wait_state(&mut client, id, proto::JobState::Succeeded).await;
    }
    let store = support::store(&db).await;
    let mut checked = 0;
    for consumer in &consumers {
        let taken = consumer.taken.lock().unwrap().clone();
        for (job_id, shard, region) in &taken {
            let job = store.job(job_id).await.unwrap().unwrap();
            assert!(
                job.regions.is_empty() || job.regions.contains(region),
                "job {job_id} (regions {:?}) shard {shard} taken in {region}",
                job.regions
            );
            checked += 1;
        }
    }
    assert!(checked >= accepted.len());
    for consumer in consumers {
        consumer.stop().await;
    }
    running.stop().await.unwrap();
}

/// A job reading a Parquet dataset (a Spark-like prefix of parts with a
/// `_SUCCESS` marker) from S3 and writing its output to S3: SUCCEEDED,
/// every row once, the manifest on S3 verified. Bad S3 locations are
/// refused at submit naming the URL, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reads_from_and_writes_to_s3() {
    let Some(endpoint) = support::services::configured(
        support::s3::VARIABLE,
        "a_job_reads_from_and_writes_to_s3",
        support::s3::REMEDY,
    ) else {
        return;
    };
    support::s3::configure(&endpoint);
    let bucket = support::s3::create_bucket(&endpoint);
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&["uae-north"])]),
    )
    .await;
    let mut client = client(&running).await;
    let consumer = Consumer::start(queue.clone(), "uae-north", Behaviour::Score);
    let dir = db.dir.path();
    // What a Spark job leaves: part files and a _SUCCESS marker.
    support::write_parquet(&dir.join("a.parquet"), 40, 10);
    support::write_parquet(&dir.join("b.parquet"), 23, 10);
    let input = format!("s3://{bucket}/features/day=2026-12-07");
    support::s3::upload(
        &dir.join("a.parquet"),
        &format!("{input}/part-00000-c000.snappy.parquet"),
    )
    .await;
    support::s3::put(&format!("{input}/_SUCCESS"), Vec::new()).await;
    let output = format!("s3://{bucket}/scores/day=2026-12-07");
    let job = submit(
        &mut client,
        proto::JobSpec {
            input: input.clone(),
            output: output.clone(),
            ..spec(Path::new("/unused"), Path::new("/unused"))
        },
    )
    .await
    .unwrap();
    let done = wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
    assert_eq!(done.done_rows, 40, "{done:?}");
    assert_eq!(done.shards_total, 4);
    assert_eq!(done.manifest, format!("{output}/_manifest.json"));
    let manifest = Manifest::verify(&output).await.unwrap();
    assert_eq!(manifest.total_rows, 40);
    assert_eq!(manifest.parts.len(), 4);
    assert_eq!(manifest.job_id, job.id);
    support::assert_rows(&support::read_output_at(&output).await, 40);

    // The output is not empty now; an input bucket that does not exist; a
    // scheme that is not supported: refused naming the location.
    let other_input = format!("s3://{bucket}/features/more");
    support::s3::upload(&dir.join("b.parquet"), &format!("{other_input}/b.parquet")).await;
    let missing = format!("s3://no-such-bucket-{}/in", uuid::Uuid::new_v4().simple());
    let fresh_output = format!("s3://{bucket}/scores/fresh");
    for (input, output, field, named) in [
        (
            other_input.as_str(),
            output.as_str(),
            "spec.output",
            output.as_str(),
        ),
        (
            missing.as_str(),
            fresh_output.as_str(),
            "spec.input",
            missing.as_str(),
        ),
        (
            "gs://bucket/in",
            fresh_output.as_str(),
            "spec.input",
            "gs://bucket/in",
        ),
        (
            other_input.as_str(),
            "hdfs://nn/out",
            "spec.output",
            "hdfs://nn/out",
        ),
    ] {
        let status = submit(
            &mut client,
            proto::JobSpec {
                input: input.to_owned(),
                output: output.to_owned(),
                ..spec(Path::new("/unused"), Path::new("/unused"))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(field) && status.message().contains(named),
            "{field} {named}: {}",
            status.message()
        );
    }
    assert!(support::s3::names(&fresh_output).await.is_empty());

    // A second job from the other prefix to a fresh output.
    let job = submit(
        &mut client,
        proto::JobSpec {
            input: other_input,
            output: fresh_output.clone(),
            ..spec(Path::new("/unused"), Path::new("/unused"))
        },
    )
    .await
    .unwrap();
    wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
    let rows = support::read_output_at(&fresh_output).await;
    assert_eq!(rows.len(), 23);
    Manifest::verify(&fresh_output).await.unwrap();
    consumer.stop().await;
    running.stop().await.unwrap();
}

/// The rows of a decrypted output, checked once each.
async fn decrypted_rows(output: &Path, rows: i64) {
    let plain = output.with_file_name(format!(
        "{}-plain",
        output.file_name().unwrap().to_string_lossy()
    ));
    let manifest = shamal_batch_io::decrypt_dataset(
        output.to_str().unwrap(),
        plain.to_str().unwrap(),
        &support::key_ring(),
    )
    .await
    .unwrap();
    assert_eq!(manifest.total_rows, rows as u64);
    assert!(manifest.encryption.is_none());
    Manifest::verify(plain.to_str().unwrap()).await.unwrap();
    support::assert_exactly_once(&plain, rows);
}

/// A job asking for encryption, and a job forced to it by the policy
/// (`encrypt_outputs`): every part stored encrypted (`.parquet.enc`, not
/// Parquet), the manifest records the key id and verifies, and decrypting
/// gives exactly the expected rows. Workers without keys refuse the
/// shards, and the job fails saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_outputs_end_to_end() {
    for policy in [false, true] {
        let db = TestDb::sqlite();
        let queue = support::memory_queue();
        let running = support::start_with(
            &db,
            support::dependencies(queue.clone(), vec![support::scorer_state(&["uae-north"])]),
            |config| config.encrypt_outputs = policy,
        )
        .await;
        let mut client = client(&running).await;
        let consumer = Consumer::start_with_keys(
            queue.clone(),
            "uae-north",
            Behaviour::Score,
            Some(support::key_ring()),
        );
        let dir = db.dir.path();
        support::write_parquet(&dir.join("rows.parquet"), 57, 10);
        let output = dir.join("out");
        let job = submit(
            &mut client,
            proto::JobSpec {
                encrypt: !policy,
                ..spec(&dir.join("rows.parquet"), &output)
            },
        )
        .await
        .unwrap();
        assert!(
            job.spec.as_ref().unwrap().encrypt,
            "policy {policy}: {job:?}"
        );
        let done = wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
        assert_eq!(done.done_rows, 57);
        let manifest = Manifest::verify(output.to_str().unwrap()).await.unwrap();
        let encryption = manifest
            .encryption
            .clone()
            .expect("the manifest records encryption");
        assert_eq!(encryption.key_ids, ["k1"]);
        assert_eq!(manifest.parts.len(), 6);
        for part in &manifest.parts {
            assert!(part.name.ends_with(".parquet.enc"), "{part:?}");
            assert_eq!(part.key_id.as_deref(), Some("k1"));
            let stored = std::fs::read(output.join(&part.name)).unwrap();
            assert!(!stored.starts_with(b"PAR1") && !stored.ends_with(b"PAR1"));
        }
        // Nothing readable as Parquet in the output as stored.
        assert!(support::read_output(&output).is_empty());
        decrypted_rows(&output, 57).await;
        consumer.stop().await;
        running.stop().await.unwrap();
    }

    // Only workers without keys: the job fails naming the reason.
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&["uae-north"])]),
    )
    .await;
    let mut client = client(&running).await;
    let consumer = Consumer::start(queue.clone(), "uae-north", Behaviour::Score);
    let dir = db.dir.path();
    support::write_jsonl(&dir.join("rows.jsonl"), 20);
    let output = dir.join("out");
    let job = submit(
        &mut client,
        proto::JobSpec {
            encrypt: true,
            ..spec(&dir.join("rows.jsonl"), &output)
        },
    )
    .await
    .unwrap();
    let failed = wait_state(&mut client, &job.id, proto::JobState::Failed).await;
    assert!(
        failed
            .message
            .contains("encryption is not supported by this worker")
            && failed.message.contains("no key ring"),
        "{}",
        failed.message
    );
    assert!(
        failed
            .message
            .contains(".parquet.enc) failed after 3 attempts"),
        "{}",
        failed.message
    );
    let written: Vec<_> = std::fs::read_dir(&output).unwrap().collect();
    assert!(written.is_empty(), "nothing written: {written:?}");
    consumer.stop().await;
    running.stop().await.unwrap();
}

/// An encrypted job from S3 to S3, decrypted from S3 to S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_job_on_s3() {
    let Some(endpoint) = support::services::configured(
        support::s3::VARIABLE,
        "an_encrypted_job_on_s3",
        support::s3::REMEDY,
    ) else {
        return;
    };
    support::s3::configure(&endpoint);
    let bucket = support::s3::create_bucket(&endpoint);
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start_with(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&["uae-north"])]),
        |config| config.encrypt_outputs = true,
    )
    .await;
    let mut client = client(&running).await;
    let consumer = Consumer::start_with_keys(
        queue.clone(),
        "uae-north",
        Behaviour::Score,
        Some(support::key_ring()),
    );
    let dir = db.dir.path();
    support::write_jsonl(&dir.join("rows.jsonl"), 45);
    let input = format!("s3://{bucket}/in/rows.jsonl");
    support::s3::upload(&dir.join("rows.jsonl"), &input).await;
    let output = format!("s3://{bucket}/out");
    let job = submit(
        &mut client,
        proto::JobSpec {
            input,
            output: output.clone(),
            ..spec(Path::new("/unused"), Path::new("/unused"))
        },
    )
    .await
    .unwrap();
    wait_state(&mut client, &job.id, proto::JobState::Succeeded).await;
    let manifest = Manifest::verify(&output).await.unwrap();
    assert_eq!(manifest.encryption.unwrap().key_ids, ["k1"]);
    for part in &manifest.parts {
        let stored = support::s3::get(&format!("{output}/{}", part.name)).await;
        assert!(!stored.starts_with(b"PAR1"), "{}", part.name);
    }
    let plain = format!("s3://{bucket}/plain");
    shamal_batch_io::decrypt_dataset(&output, &plain, &support::key_ring())
        .await
        .unwrap();
    support::assert_rows(&support::read_output_at(&plain).await, 45);
    consumer.stop().await;
    running.stop().await.unwrap();
}
