//! Crash test: a worker dies holding unacknowledged entries, then Redis
//! (AOF, fsync always) is killed with SIGKILL and restarted on the same data
//! directory and port. Another worker finishes the work: every submitted job
//! has exactly one result and none is lost.
//!
//! Needs the `redis-server` binary (PATH or /usr/bin); skipped loudly when
//! absent, or fails under SHAMAL_REQUIRE_SERVICES=1 as in scripts/test.sh
//! (docs/testing.md).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shamal_async_queue::{
    Backlog, ConsumerConfig, Job, JobId, JobQueue, JobStatus, NewJob, Outcome, QueueConfig,
    RedisOptions, RedisQueue, StreamKey, StreamSelector, run_consumer,
};
use tokio::sync::{mpsc, oneshot};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct RedisServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    async fn start(bin: &Path, dir: &Path, port: u16) -> RedisServer {
        let mut server = RedisServer {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            port,
            child: None,
        };
        server.spawn().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(["--logfile", &self.dir.join("redis.log").to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // PING fails with LOADING while the AOF is replayed.
            if common::ping(&self.url()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up; log: {}",
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("reap redis-server");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Retries a queue call while Redis is coming back.
async fn retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = shamal_async_queue::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying after: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("queue call keeps failing: {e}"),
        }
    }
}

fn answer(job: &Job) -> Outcome {
    let mut out = b"done:".to_vec();
    out.extend_from_slice(&job.payload);
    Outcome::Ok(Bytes::from(out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_has_exactly_one_result_after_worker_and_redis_crash() {
    let Some(bin) = common::services::redis_server("Redis crash test") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = RedisServer::start(&bin, dir.path(), free_port()).await;

    let config = QueueConfig {
        min_idle: Duration::from_millis(300),
        max_attempts: 5,
        wait_recheck: Duration::from_millis(500),
        ..QueueConfig::default()
    };
    let queue: Arc<dyn JobQueue> = Arc::new(
        RedisQueue::connect(RedisOptions::new(server.url()), config)
            .await
            .expect("connect"),
    );
    let stream = StreamKey::new("classifier", "eu-west").expect("valid");
    let streams = std::slice::from_ref(&stream);

    const N: usize = 40;
    let mut jobs = Vec::new();
    for i in 0..N {
        let job = queue
            .submit(NewJob::new(
                stream.clone(),
                Bytes::from(format!("request-{i}")),
            ))
            .await
            .expect("submit");
        jobs.push(job);
    }

    // A worker finishes 10 jobs before anything goes wrong.
    let mut early = HashSet::new();
    for d in queue
        .take(streams, "early", 10, Duration::ZERO)
        .await
        .expect("take")
    {
        assert!(queue.complete(&d, answer(&d.job)).await.expect("complete"));
        early.insert(d.job.id.clone());
    }
    assert_eq!(early.len(), 10);

    // A worker takes 8 more and is killed while running them (no ack).
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<JobId>();
    let doomed = tokio::spawn({
        let queue = Arc::clone(&queue);
        let config =
            ConsumerConfig::new("doomed", vec![StreamSelector::exact(&stream)]).with_concurrency(8);
        async move {
            run_consumer(
                queue,
                config,
                move |job: Job| {
                    let _ = started_tx.send(job.id.clone());
                    futures::future::pending::<Outcome>()
                },
                futures::future::pending::<()>(),
            )
            .await
        }
    });
    let mut held = HashSet::new();
    while held.len() < 8 {
        let id = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
            .await
            .expect("doomed worker takes jobs")
            .expect("id");
        held.insert(id);
    }
    doomed.abort();
    let _ = doomed.await;

    // Redis dies (SIGKILL) and comes back from its append-only file.
    server.kill9();
    let down = tokio::time::timeout(Duration::from_secs(15), queue.status(&jobs[0].id))
        .await
        .expect("a call to a dead Redis returns");
    assert!(
        down.as_ref().is_err_and(|e| e.is_unavailable()),
        "Redis down is an error: {down:?}"
    );
    server.spawn().await;

    // The same client reconnects; finished results and held entries survived.
    let some_early = early.iter().next().expect("an early job").clone();
    let status = retry(|| queue.status(&some_early)).await;
    assert!(
        status.is_done(),
        "result written before the crash survives: {status:?}"
    );
    let some_held = held.iter().next().expect("a held job").clone();
    let status = retry(|| queue.status(&some_held)).await;
    assert!(
        matches!(status, JobStatus::Running { ref consumer, .. } if consumer == "doomed"),
        "{status:?}"
    );

    // Another worker finishes everything else.
    let runs = Arc::new(Mutex::new(HashMap::<JobId, usize>::new()));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let survivor = tokio::spawn({
        let queue = Arc::clone(&queue);
        let runs = Arc::clone(&runs);
        let mut config = ConsumerConfig::new("survivor", vec![StreamSelector::exact(&stream)])
            .with_concurrency(4);
        config.reclaim_interval = Duration::from_millis(100);
        config.read_block = Duration::from_millis(200);
        async move {
            run_consumer(
                queue,
                config,
                move |job: Job| {
                    *runs
                        .lock()
                        .expect("lock")
                        .entry(job.id.clone())
                        .or_default() += 1;
                    async move { answer(&job) }
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
        }
    });

    for job in &jobs {
        let status = retry(|| queue.wait(&job.id, Duration::from_secs(15))).await;
        let JobStatus::Done(result) = status else {
            panic!("job {} has no result: {status:?}", job.id);
        };
        assert_eq!(result.outcome, answer(job), "result of {}", job.id);
        if early.contains(&job.id) {
            assert_eq!((result.worker_id.as_str(), result.attempts), ("early", 1));
        } else if held.contains(&job.id) {
            assert_eq!(
                (result.worker_id.as_str(), result.attempts),
                ("survivor", 2)
            );
        } else {
            assert_eq!(
                (result.worker_id.as_str(), result.attempts),
                ("survivor", 1)
            );
        }
    }
    let _ = stop_tx.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), survivor)
        .await
        .expect("survivor stops")
        .expect("task")
        .expect("consumer");

    let runs = runs.lock().expect("lock").clone();
    assert_eq!(
        runs.len(),
        N - early.len(),
        "every unfinished job run by the survivor"
    );
    assert!(
        runs.keys().all(|id| !early.contains(id)),
        "finished jobs not run again"
    );
    assert!(
        runs.values().all(|&n| n == 1),
        "each job run once: {runs:?}"
    );
    assert_eq!(report.written, (N - early.len()) as u64);
    assert_eq!(report.duplicates, 0);
    assert_eq!(
        queue.backlog(&stream).await.expect("backlog"),
        Backlog::default()
    );
}
