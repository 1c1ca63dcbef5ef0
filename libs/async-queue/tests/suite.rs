//! One behavioural suite, run against both backends: `memory::*` on the
//! in-process queue, `redis::*` on Redis at SHAMAL_TEST_REDIS_URL (which
//! must answer when set; when unset they are skipped loudly, or fail under
//! SHAMAL_REQUIRE_SERVICES=1 as in scripts/test.sh: docs/testing.md).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Backend, fast_config};
use shamal_async_queue::{
    Backlog, ConsumerConfig, ConsumerReport, Job, JobId, JobQueue, JobStatus, NewJob, Outcome,
    QueueConfig, StreamKey, StreamSelector, codes, run_consumer,
};
use tokio::sync::{mpsc, oneshot};

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = super::Backend::redis().await else { return };
                    super::$case(&backend).await;
                }
            )*
        }
    };
}

suite!(
    submit_fetch_wait,
    unknown_id_is_not_queued,
    results_first_write_wins,
    results_expire_after_ttl,
    expired_deadline_answered_without_running,
    dead_consumer_entries_reclaimed,
    poison_job_gets_error_after_max_attempts,
    panicking_handler_ends_as_poison,
    backlog_counts,
    concurrent_waiters_all_woken,
    runner_bounds_concurrency,
    shutdown_finishes_held_and_takes_no_more,
    wildcard_selectors_follow_new_streams,
    touched_entries_are_not_reclaimed,
    cancelled_jobs_are_answered_and_never_delivered,
);

/// CPU time the calling thread has used, in clock ticks (1/100 s).
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("thread stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime, fields 14 and 15 of the line.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// A consumer whose every permit is taken waits for a handler to finish
/// without polling: while one job runs for 1.5 s, many reclaim intervals,
/// the thread running the consumer (a current-thread runtime: this one)
/// uses almost no CPU. (It used to spin once the reclaim time had passed.)
async fn a_saturated_consumer_does_not_spin(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("slow-cpu");
    let job = submit(&*q, &s, "x").await;
    let before = thread_cpu_ticks();
    let runner = Runner::start(
        &q,
        consumer("sleepy", vec![StreamSelector::exact(&s)], 1),
        |job| async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            echo(&job)
        },
    );
    assert_eq!(wait_done(&*q, &job.id).await.outcome, echo(&job));
    let used = thread_cpu_ticks() - before;
    println!("consumer CPU while its handler slept 1.5 s: {used} ticks");
    runner.stop().await;
    assert!(
        used < 15,
        "the consumer used {used} ticks (1/100 s) of CPU while its one handler slept 1.5 s"
    );
}

mod saturated {
    #[tokio::test]
    async fn memory() {
        super::a_saturated_consumer_does_not_spin(&super::Backend::Memory).await;
    }

    #[tokio::test]
    async fn redis() {
        let Some(backend) = super::Backend::redis().await else {
            return;
        };
        super::a_saturated_consumer_does_not_spin(&backend).await;
    }
}

fn stream(model: &str) -> StreamKey {
    StreamKey::new(model, "eu-west").expect("valid stream")
}

async fn submit(q: &dyn JobQueue, s: &StreamKey, payload: &str) -> Job {
    q.submit(NewJob::new(s.clone(), Bytes::from(payload.to_owned())))
        .await
        .expect("submit")
}

/// The echo handler: answers the payload upper-cased.
fn echo(job: &Job) -> Outcome {
    Outcome::Ok(Bytes::from(job.payload.to_ascii_uppercase()))
}

fn done(status: JobStatus) -> shamal_async_queue::JobResult {
    match status {
        JobStatus::Done(r) => r,
        other => panic!("expected a result, got {other:?}"),
    }
}

struct Runner {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<ConsumerReport>,
}

impl Runner {
    fn start<H, Fut>(q: &Arc<dyn JobQueue>, config: ConsumerConfig, handler: H) -> Runner
    where
        H: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let q = Arc::clone(q);
        let task = tokio::spawn(async move {
            run_consumer(q, config, handler, async move {
                let _ = rx.await;
            })
            .await
            .expect("valid consumer config")
        });
        Runner {
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) -> ConsumerReport {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("consumer stops in time")
            .expect("consumer task")
    }
}

fn consumer(id: &str, streams: Vec<StreamSelector>, concurrency: usize) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(id, streams).with_concurrency(concurrency);
    c.read_block = Duration::from_millis(100);
    c.reclaim_interval = Duration::from_millis(50);
    c.refresh_interval = Duration::from_millis(100);
    c
}

async fn wait_done(q: &dyn JobQueue, id: &JobId) -> shamal_async_queue::JobResult {
    done(q.wait(id, Duration::from_secs(10)).await.expect("wait"))
}

async fn submit_fetch_wait(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("resnet");
    let job = q
        .submit(NewJob::new(s.clone(), Bytes::from_static(b"\x00binary\xff")).with_priority(7))
        .await
        .expect("submit");
    assert_eq!(q.status(&job.id).await.expect("status"), JobStatus::Queued);

    // Waiting on a queued job times out with its current status.
    let started = Instant::now();
    let status = q
        .wait(&job.id, Duration::from_millis(150))
        .await
        .expect("wait");
    assert_eq!(status, JobStatus::Queued);
    assert!(started.elapsed() >= Duration::from_millis(140));

    let got = q
        .take(
            std::slice::from_ref(&s),
            "w1",
            10,
            Duration::from_millis(10),
        )
        .await
        .expect("take");
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.job, job, "the worker sees the submitted job");
    assert_eq!(d.job.payload.as_ref(), b"\x00binary\xff");
    assert_eq!(d.job.priority, Some(7));
    assert_eq!((d.attempts, d.consumer.as_str()), (1, "w1"));
    assert_eq!(
        q.status(&job.id).await.expect("status"),
        JobStatus::Running {
            consumer: "w1".into(),
            attempts: 1
        }
    );
    // Nothing else to take.
    let more = q
        .take(
            std::slice::from_ref(&s),
            "w2",
            10,
            Duration::from_millis(50),
        )
        .await
        .expect("take");
    assert!(more.is_empty());

    let waiter = {
        let q = Arc::clone(&q.q);
        let id = job.id.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (q.wait(&id, Duration::from_secs(10)).await, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = SystemTime::now() - Duration::from_millis(5);
    assert!(
        q.complete(d, Outcome::Ok(Bytes::from_static(b"out")))
            .await
            .expect("complete")
    );
    let (status, waited) = waiter.await.expect("waiter");
    let result = done(status.expect("wait"));
    assert!(waited < Duration::from_secs(3), "woken by the result");
    assert_eq!(result.id, job.id);
    assert_eq!(result.outcome, Outcome::Ok(Bytes::from_static(b"out")));
    assert_eq!((result.worker_id.as_str(), result.attempts), ("w1", 1));
    assert!(result.finished_at >= before);
    assert_eq!(done(q.status(&job.id).await.expect("status")), result);
    assert_eq!(
        q.backlog(&s).await.expect("backlog"),
        Backlog { lag: 0, pending: 0 }
    );
}

async fn unknown_id_is_not_queued(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let unknown = JobId::generate();
    assert_eq!(
        q.status(&unknown).await.expect("status"),
        JobStatus::Unknown
    );
    let started = Instant::now();
    assert_eq!(
        q.wait(&unknown, Duration::from_secs(10))
            .await
            .expect("wait"),
        JobStatus::Unknown
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting for unknown ids"
    );
    let outside = JobId::parse("not-a-real-job").expect("valid id syntax");
    assert_eq!(
        q.status(&outside).await.expect("status"),
        JobStatus::Unknown
    );
    let job = submit(&**q, &stream("m"), "x").await;
    assert_eq!(q.status(&job.id).await.expect("status"), JobStatus::Queued);
}

async fn results_first_write_wins(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("m");
    let job = submit(&**q, &s, "x").await;
    let got = q
        .take(std::slice::from_ref(&s), "a", 1, Duration::ZERO)
        .await
        .expect("take");
    let d = got.into_iter().next().expect("one delivery");
    assert!(
        q.complete(&d, Outcome::Ok(Bytes::from_static(b"first")))
            .await
            .expect("complete")
    );
    assert!(
        !q.complete(&d, Outcome::error(13, "second"))
            .await
            .expect("complete")
    );
    let mut other = d.clone();
    other.consumer = "b".into();
    other.attempts = 2;
    assert!(
        !q.complete(&other, Outcome::Ok(Bytes::from_static(b"third")))
            .await
            .expect("complete")
    );
    let r = done(q.status(&job.id).await.expect("status"));
    assert_eq!(r.outcome, Outcome::Ok(Bytes::from_static(b"first")));
    assert_eq!((r.worker_id.as_str(), r.attempts), ("a", 1));
    assert_eq!(
        q.backlog(&s).await.expect("backlog"),
        Backlog::default(),
        "acknowledged"
    );
}

/// A cancelled job has the cancellation as its result at once (waiters
/// wake), no consumer is given it, and a consumer already running one
/// finishes without its result being kept; a job with a result, or one the
/// queue does not know, is not cancelled.
async fn cancelled_jobs_are_answered_and_never_delivered(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("m");
    let running = submit(&**q, &s, "running").await;
    let waiting = submit(&**q, &s, "waiting").await;
    let taken = q
        .take(std::slice::from_ref(&s), "a", 1, Duration::ZERO)
        .await
        .expect("take");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].job.id, running.id);
    let waiter = {
        let q = Arc::clone(&q.q);
        let id = waiting.id.clone();
        tokio::spawn(async move { q.wait(&id, Duration::from_secs(10)).await })
    };
    // Registered before the cancellation.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled = || Outcome::error(codes::CANCELLED, "job cancelled");

    assert!(
        q.cancel(&s, &waiting.id, cancelled())
            .await
            .expect("cancel")
    );
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter wakes at the cancellation")
        .expect("waiter task")
        .expect("wait");
    assert_eq!(done(woken).outcome, cancelled());
    assert_eq!(
        done(q.status(&waiting.id).await.expect("status")).outcome,
        cancelled()
    );
    assert!(
        !q.cancel(&s, &waiting.id, Outcome::error(codes::CANCELLED, "again"))
            .await
            .expect("cancel"),
        "a result is written once"
    );
    let after = q
        .take(std::slice::from_ref(&s), "b", 10, Duration::ZERO)
        .await
        .expect("take");
    assert!(after.is_empty(), "a cancelled job was delivered: {after:?}");

    // Running: cancelled; the consumer's late result is not kept.
    assert!(
        q.cancel(&s, &running.id, cancelled())
            .await
            .expect("cancel")
    );
    assert!(
        !q.complete(&taken[0], Outcome::Ok(Bytes::from_static(b"late")))
            .await
            .expect("complete")
    );
    assert_eq!(
        done(q.status(&running.id).await.expect("status")).outcome,
        cancelled()
    );

    // Finished, and unknown: nothing to cancel.
    let finished = submit(&**q, &s, "finished").await;
    let got = q
        .take(std::slice::from_ref(&s), "a", 1, Duration::ZERO)
        .await
        .expect("take");
    assert_eq!(got.len(), 1);
    assert!(
        q.complete(&got[0], Outcome::Ok(Bytes::from_static(b"ok")))
            .await
            .expect("complete")
    );
    assert!(
        !q.cancel(&s, &finished.id, cancelled())
            .await
            .expect("cancel")
    );
    assert_eq!(
        done(q.status(&finished.id).await.expect("status")).outcome,
        Outcome::Ok(Bytes::from_static(b"ok"))
    );
    assert!(
        !q.cancel(&s, &JobId::generate(), cancelled())
            .await
            .expect("cancel")
    );
    assert_eq!(
        q.backlog(&s).await.expect("backlog"),
        Backlog::default(),
        "nothing left on the stream"
    );
}

async fn results_expire_after_ttl(b: &Backend) {
    let q = b
        .queue(QueueConfig {
            result_ttl: Duration::from_millis(400),
            ..fast_config()
        })
        .await;
    let s = stream("m");
    let job = submit(&**q, &s, "x").await;
    let d = q
        .take(std::slice::from_ref(&s), "a", 1, Duration::ZERO)
        .await
        .expect("take")
        .pop()
        .expect("delivery");
    assert!(q.complete(&d, echo(&d.job)).await.expect("complete"));
    assert!(q.status(&job.id).await.expect("status").is_done());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        q.status(&job.id).await.expect("status").is_done(),
        "kept within the TTL"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        q.status(&job.id).await.expect("status"),
        JobStatus::Unknown,
        "result and record expired"
    );
}

async fn expired_deadline_answered_without_running(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("m");
    let past = SystemTime::now() - Duration::from_secs(1);
    let expired = q
        .submit(NewJob::new(s.clone(), Bytes::from_static(b"late")).with_deadline(past))
        .await
        .expect("submit");
    let live = q
        .submit(
            NewJob::new(s.clone(), Bytes::from_static(b"live"))
                .with_timeout(Duration::from_secs(60)),
        )
        .await
        .expect("submit");
    // Raw take: the expired job is answered by the queue, not returned.
    let got = q
        .take(std::slice::from_ref(&s), "w", 10, Duration::ZERO)
        .await
        .expect("take");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].job.id, live.id);
    let r = done(q.status(&expired.id).await.expect("status"));
    assert!(matches!(
        r.outcome,
        Outcome::Err {
            code: codes::DEADLINE_EXCEEDED,
            ..
        }
    ));
    assert_eq!(r.worker_id, "w");
    q.complete(&got[0], echo(&got[0].job))
        .await
        .expect("complete");

    // Through the consumer loop: the handler never sees expired jobs.
    let expired2 = q
        .submit(NewJob::new(s.clone(), Bytes::from_static(b"late2")).with_deadline(past))
        .await
        .expect("submit");
    let ok = submit(&**q, &s, "ok").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let runner = Runner::start(&q.q, consumer("r", vec![StreamSelector::exact(&s)], 2), {
        let seen = Arc::clone(&seen);
        move |job: Job| {
            seen.lock().expect("lock").push(job.id.clone());
            async move { echo(&job) }
        }
    });
    let r2 = wait_done(&**q, &expired2.id).await;
    assert!(matches!(
        r2.outcome,
        Outcome::Err {
            code: codes::DEADLINE_EXCEEDED,
            ..
        }
    ));
    assert_eq!(
        wait_done(&**q, &ok.id).await.outcome,
        Outcome::Ok(Bytes::from_static(b"OK"))
    );
    let report = runner.stop().await;
    assert_eq!(*seen.lock().expect("lock"), vec![ok.id.clone()]);
    assert_eq!(report.executed, 1);
}

async fn dead_consumer_entries_reclaimed(b: &Backend) {
    let q = b
        .queue(QueueConfig {
            min_idle: Duration::from_millis(500),
            ..fast_config()
        })
        .await;
    let s = stream("m");
    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(submit(&**q, &s, &format!("job-{i}")).await);
    }
    // Consumer A takes three jobs and hangs, then dies without acking.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<JobId>();
    let a = Runner::start(
        &q.q,
        consumer("a", vec![StreamSelector::exact(&s)], 3),
        move |job: Job| {
            let _ = started_tx.send(job.id.clone());
            futures::future::pending::<Outcome>()
        },
    );
    let mut held = HashSet::new();
    for _ in 0..3 {
        let id = tokio::time::timeout(Duration::from_secs(5), started_rx.recv())
            .await
            .expect("A starts jobs")
            .expect("id");
        held.insert(id);
    }
    a.task.abort();
    let _ = a.task.await;
    for id in &held {
        assert!(matches!(
            q.status(id).await.expect("status"),
            JobStatus::Running { ref consumer, attempts: 1 } if consumer == "a"
        ));
    }
    assert_eq!(
        q.backlog(&s).await.expect("backlog"),
        Backlog { lag: 3, pending: 3 }
    );
    // Not yet idle long enough: nothing to reclaim.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let early = q
        .reclaim(std::slice::from_ref(&s), "probe", 10)
        .await
        .expect("reclaim");
    assert!(early.is_empty(), "reclaimed before min_idle: {early:?}");

    // Consumer B finishes everything, A's jobs after min_idle.
    let runs = Arc::new(Mutex::new(HashMap::<JobId, usize>::new()));
    let runner = Runner::start(&q.q, consumer("b", vec![StreamSelector::exact(&s)], 2), {
        let runs = Arc::clone(&runs);
        move |job: Job| {
            *runs
                .lock()
                .expect("lock")
                .entry(job.id.clone())
                .or_default() += 1;
            async move { echo(&job) }
        }
    });
    for job in &jobs {
        let r = wait_done(&**q, &job.id).await;
        assert_eq!(r.worker_id, "b");
        assert_eq!(r.outcome, echo(job));
        let expected_attempts = if held.contains(&job.id) { 2 } else { 1 };
        assert_eq!(r.attempts, expected_attempts, "attempts of {}", job.id);
    }
    let report = runner.stop().await;
    let runs = runs.lock().expect("lock").clone();
    assert_eq!(runs.len(), 6);
    assert!(
        runs.values().all(|&n| n == 1),
        "each job run once by B: {runs:?}"
    );
    assert_eq!((report.written, report.duplicates), (6, 0));
    assert_eq!(q.backlog(&s).await.expect("backlog"), Backlog::default());
}

async fn poison_job_gets_error_after_max_attempts(b: &Backend) {
    let q = b
        .queue(QueueConfig {
            min_idle: Duration::from_millis(100),
            max_attempts: 2,
            ..fast_config()
        })
        .await;
    let s = stream("m");
    let job = submit(&**q, &s, "poison").await;
    let first = q
        .take(std::slice::from_ref(&s), "a", 1, Duration::ZERO)
        .await
        .expect("take");
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = q
        .reclaim(std::slice::from_ref(&s), "b", 10)
        .await
        .expect("reclaim");
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].attempts, second[0].consumer.as_str()), (2, "b"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let third = q
        .reclaim(std::slice::from_ref(&s), "c", 10)
        .await
        .expect("reclaim");
    assert!(third.is_empty(), "not delivered a third time");
    let r = done(q.status(&job.id).await.expect("status"));
    assert!(
        matches!(
            r.outcome,
            Outcome::Err {
                code: codes::ABORTED,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!((r.worker_id.as_str(), r.attempts), ("c", 3));
    assert_eq!(q.backlog(&s).await.expect("backlog"), Backlog::default());
    // A late completion by the first consumer does not replace it.
    assert!(!q.complete(&first[0], echo(&job)).await.expect("complete"));
}

async fn panicking_handler_ends_as_poison(b: &Backend) {
    let q = b
        .queue(QueueConfig {
            min_idle: Duration::from_millis(100),
            max_attempts: 2,
            ..fast_config()
        })
        .await;
    let s = stream("m");
    let bad = submit(&**q, &s, "boom").await;
    let good = submit(&**q, &s, "fine").await;
    let runner = Runner::start(
        &q.q,
        consumer("w", vec![StreamSelector::exact(&s)], 2),
        |job: Job| async move {
            if job.payload.as_ref() == b"boom" {
                panic!("handler crashed (expected by the test)");
            }
            echo(&job)
        },
    );
    let r = wait_done(&**q, &bad.id).await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Err {
                code: codes::ABORTED,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(r.attempts, 3);
    assert_eq!(wait_done(&**q, &good.id).await.outcome, echo(&good));
    let report = runner.stop().await;
    assert_eq!(report.panicked, 2);
    assert_eq!(
        report.written, 1,
        "the poison result is written by the queue"
    );
}

async fn backlog_counts(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s1 = stream("one");
    let s2 = stream("two");
    for i in 0..5 {
        submit(&**q, &s1, &format!("{i}")).await;
    }
    for i in 0..2 {
        submit(&**q, &s2, &format!("{i}")).await;
    }
    assert_eq!(
        q.backlog(&s1).await.expect("backlog"),
        Backlog { lag: 5, pending: 0 }
    );
    let got = q
        .take(std::slice::from_ref(&s1), "w", 2, Duration::ZERO)
        .await
        .expect("take");
    assert_eq!(got.len(), 2);
    assert_eq!(
        q.backlog(&s1).await.expect("backlog"),
        Backlog { lag: 3, pending: 2 }
    );
    q.complete(&got[0], echo(&got[0].job))
        .await
        .expect("complete");
    assert_eq!(
        q.backlog(&s1).await.expect("backlog"),
        Backlog { lag: 3, pending: 1 }
    );
    assert_eq!(
        q.backlog(&s2).await.expect("backlog"),
        Backlog { lag: 2, pending: 0 }
    );
    assert_eq!(
        q.backlog(&stream("never")).await.expect("backlog"),
        Backlog::default()
    );
    assert_eq!(q.streams().await.expect("streams"), vec![s1, s2]);
}

async fn concurrent_waiters_all_woken(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("m");
    let job = submit(&**q, &s, "x").await;
    let other = submit(&**q, &stream("other"), "y").await;
    let mut waiters = Vec::new();
    for _ in 0..10 {
        let q = Arc::clone(&q.q);
        let id = job.id.clone();
        waiters.push(tokio::spawn(async move {
            q.wait(&id, Duration::from_secs(20)).await
        }));
    }
    let bystander = {
        let q = Arc::clone(&q.q);
        let id = other.id.clone();
        tokio::spawn(async move { q.wait(&id, Duration::from_millis(800)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let d = q
        .take(std::slice::from_ref(&s), "w", 1, Duration::ZERO)
        .await
        .expect("take")
        .pop()
        .expect("delivery");
    let completed = Instant::now();
    q.complete(&d, echo(&d.job)).await.expect("complete");
    for w in waiters {
        let status = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("woken without waiting for a re-check")
            .expect("task")
            .expect("wait");
        assert_eq!(done(status).outcome, echo(&job));
    }
    assert!(completed.elapsed() < Duration::from_secs(5));
    assert_eq!(
        bystander.await.expect("task").expect("wait"),
        JobStatus::Queued,
        "waiters of other jobs keep waiting"
    );
}

async fn runner_bounds_concurrency(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s1 = stream("m1");
    let s2 = stream("m2");
    let mut jobs = Vec::new();
    for i in 0..12 {
        let s = if i % 2 == 0 { &s1 } else { &s2 };
        jobs.push(submit(&**q, s, &format!("job-{i}")).await);
    }
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let runner = Runner::start(
        &q.q,
        consumer(
            "w",
            vec![StreamSelector::exact(&s1), StreamSelector::exact(&s2)],
            3,
        ),
        {
            let in_flight = Arc::clone(&in_flight);
            let peak = Arc::clone(&peak);
            move |job: Job| {
                let in_flight = Arc::clone(&in_flight);
                let peak = Arc::clone(&peak);
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    echo(&job)
                }
            }
        },
    );
    for job in &jobs {
        assert_eq!(wait_done(&**q, &job.id).await.outcome, echo(job));
    }
    let report = runner.stop().await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "at most 3 at a time, saw {peak}");
    assert!(peak >= 2, "jobs ran concurrently, peak {peak}");
    assert_eq!((report.executed, report.written), (12, 12));
}

async fn shutdown_finishes_held_and_takes_no_more(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let s = stream("m");
    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(submit(&**q, &s, &format!("job-{i}")).await);
    }
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<JobId>();
    let runner = Runner::start(
        &q.q,
        consumer("w", vec![StreamSelector::exact(&s)], 2),
        move |job: Job| {
            let _ = started_tx.send(job.id.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                echo(&job)
            }
        },
    );
    let mut started = Vec::new();
    for _ in 0..2 {
        started.push(
            tokio::time::timeout(Duration::from_secs(5), started_rx.recv())
                .await
                .expect("jobs start")
                .expect("id"),
        );
    }
    let report = runner.stop().await;
    assert_eq!((report.executed, report.written), (2, 2));
    for job in &jobs {
        let status = q.status(&job.id).await.expect("status");
        if started.contains(&job.id) {
            assert_eq!(done(status).outcome, echo(job), "held jobs finished");
        } else {
            assert_eq!(status, JobStatus::Queued, "no new job taken");
        }
    }
    assert_eq!(
        q.backlog(&s).await.expect("backlog"),
        Backlog { lag: 4, pending: 0 }
    );
}

async fn wildcard_selectors_follow_new_streams(b: &Backend) {
    let q = b.queue(fast_config()).await;
    let eu = StreamKey::new("bert", "eu").expect("valid");
    let us = StreamKey::new("bert", "us").expect("valid");
    let other = StreamKey::new("gpt", "eu").expect("valid");
    let first = submit(&**q, &eu, "a").await;
    let runner = Runner::start(
        &q.q,
        consumer("w", vec![StreamSelector::model("bert")], 2),
        |job: Job| async move { echo(&job) },
    );
    assert_eq!(wait_done(&**q, &first.id).await.outcome, echo(&first));
    // A stream that appears after the consumer started.
    let later = submit(&**q, &us, "b").await;
    assert_eq!(wait_done(&**q, &later.id).await.outcome, echo(&later));
    // Not selected.
    let ignored = submit(&**q, &other, "c").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        q.status(&ignored.id).await.expect("status"),
        JobStatus::Queued
    );
    runner.stop().await;
}

async fn touched_entries_are_not_reclaimed(b: &Backend) {
    let q = b
        .queue(QueueConfig {
            min_idle: Duration::from_millis(300),
            ..fast_config()
        })
        .await;
    let s = stream("m");
    let job = submit(&**q, &s, "slow").await;
    // A live consumer running a job for longer than min_idle keeps it.
    let runner = Runner::start(
        &q.q,
        consumer("slow", vec![StreamSelector::exact(&s)], 1),
        |job: Job| async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            echo(&job)
        },
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stolen = q
        .reclaim(std::slice::from_ref(&s), "thief", 10)
        .await
        .expect("reclaim");
    assert!(
        stolen.is_empty(),
        "entry of a live consumer reclaimed: {stolen:?}"
    );
    let r = wait_done(&**q, &job.id).await;
    assert_eq!((r.worker_id.as_str(), r.attempts), ("slow", 1));
    runner.stop().await;
}

/// Redis only: waiters of one client are woken (through pub/sub) by a result
/// written by another client, as between a router and a worker.
mod redis_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_woken_by_another_client() {
        let Some(backend) = Backend::redis().await else {
            return;
        };
        let worker_side = backend.queue(fast_config()).await;
        let router_side = worker_side
            .redis_twin(fast_config())
            .await
            .expect("redis twin");
        let s = stream("m");
        let job = submit(&*router_side, &s, "x").await;
        let mut waiters = Vec::new();
        for _ in 0..5 {
            let q = Arc::clone(&router_side);
            let id = job.id.clone();
            waiters.push(tokio::spawn(async move {
                q.wait(&id, Duration::from_secs(20)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let d = worker_side
            .take(std::slice::from_ref(&s), "w", 1, Duration::ZERO)
            .await
            .expect("take")
            .pop()
            .expect("delivery");
        worker_side
            .complete(&d, echo(&d.job))
            .await
            .expect("complete");
        for w in waiters {
            let status = tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("woken by the notification, not by a re-check")
                .expect("task")
                .expect("wait");
            assert_eq!(done(status).outcome, echo(&job));
        }
    }

    #[tokio::test]
    async fn unreachable_redis_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let opts = shamal_async_queue::RedisOptions::new(format!("redis://127.0.0.1:{port}"));
        let err = shamal_async_queue::RedisQueue::connect(opts, fast_config())
            .await
            .err()
            .expect("connecting to a closed port fails");
        assert!(err.is_unavailable(), "{err}");
    }
}
