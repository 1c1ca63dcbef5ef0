//! Test harness: stores (SQLite, or a fresh database on the PostgreSQL
//! server at `SHAMAL_TEST_POSTGRES_URL`), queues (in process, or Redis at
//! `SHAMAL_TEST_REDIS_URL` under a key prefix of its own), datasets, and a
//! test consumer standing in for the workers' batch role.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../../tests/support/services.rs"]
pub mod services;

#[path = "../../../../libs/batch-io/tests/common/s3.rs"]
pub mod s3;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, Float32Array, Float64Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use prost::Message;
use shamal_async_queue::{JobQueue, MemoryQueue, Outcome, QueueConfig, RedisOptions, RedisQueue};
use shamal_audit_client::Auditor;
use shamal_batch_coordinator::catalog::{Signature, StaticCatalog, StaticMetadata};
use shamal_batch_coordinator::model::region_may_take;
use shamal_batch_coordinator::{Dependencies, QueueSource, RunningBatch};
use shamal_batch_io::{
    KeyRing, ModelInput, Output, PartEncryption, PartWriter, Shard, outputs_to_columns, read_shard,
    to_infer_request,
};
use shamal_proto::inference::ModelInferResponse;
use shamal_proto::inference::model_infer_response::InferOutputTensor;
use shamal_proto::shamal::batch::v1 as proto;
use shamal_proto::shamal::batch::v1::batch_service_client::BatchServiceClient;
use shamal_proto::shamal::registry::v1::{ModelState, VersionState};
use sqlx::Connection;
use tonic::transport::Channel;

pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    drop_database: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("batch.db").display()
        );
        TestDb {
            url,
            dir,
            drop_database: None,
        }
    }

    pub async fn postgres() -> Option<TestDb> {
        let admin = services::configured(
            "SHAMAL_TEST_POSTGRES_URL",
            "PostgreSQL batch store test",
            "scripts/ensure-postgres.sh prints a URL for it",
        )?;
        let mut connection = sqlx::postgres::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_POSTGRES_URL", &admin, error));
        let name = format!("shamal_batch_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(base, _)| base).unwrap();
        Some(TestDb {
            url: format!("{base}/{name}"),
            dir: tempfile::tempdir().unwrap(),
            drop_database: Some((admin, name)),
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.drop_database.take() {
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(mut connection) = sqlx::postgres::PgConnection::connect(&admin).await
                    {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut connection)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn queue_config() -> QueueConfig {
    QueueConfig {
        min_idle: Duration::from_millis(500),
        wait_recheck: Duration::from_millis(50),
        ..QueueConfig::default()
    }
}

pub fn memory_queue() -> Arc<dyn JobQueue> {
    Arc::new(MemoryQueue::new(queue_config()).unwrap())
}

/// A Redis queue under a key prefix of its own; `None` when skipped.
pub async fn redis_queue() -> Option<Arc<dyn JobQueue>> {
    let url = services::configured(
        "SHAMAL_TEST_REDIS_URL",
        "Redis batch queue test",
        "scripts/ensure-redis.sh prints a URL for it",
    )?;
    let options = RedisOptions::new(url.clone()).with_key_prefix(format!(
        "shamal:batch:test:{}",
        uuid::Uuid::new_v4().simple()
    ));
    let queue = RedisQueue::connect(options, queue_config())
        .await
        .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_REDIS_URL", &url, error));
    Some(Arc::new(queue))
}

/// The test model: `scorer` version 1 (ready), version 2 (registered),
/// alias `prod` -> 1; input `x` (FP32 scalar), output `y` = 2x + 1.
pub fn scorer_state(allowed_regions: &[&str]) -> ModelState {
    ModelState {
        name: "scorer".to_owned(),
        versions: vec![
            VersionState {
                version: 1,
                lifecycle: "ready".to_owned(),
                ..Default::default()
            },
            VersionState {
                version: 2,
                lifecycle: "registered".to_owned(),
                ..Default::default()
            },
        ],
        aliases: [("prod".to_owned(), 1)].into_iter().collect(),
        allowed_regions: allowed_regions.iter().map(|r| (*r).to_owned()).collect(),
        ..Default::default()
    }
}

pub fn scorer_signature() -> Signature {
    Signature {
        inputs: vec![ModelInput::new("x", "FP32", vec![-1, 1])],
        outputs: vec!["y".to_owned()],
    }
}

pub fn dependencies(queue: Arc<dyn JobQueue>, models: Vec<ModelState>) -> Dependencies {
    Dependencies {
        queue: QueueSource::Shared(queue),
        catalog: Arc::new(StaticCatalog::new(models)),
        metadata: Arc::new(StaticMetadata::new([(
            "scorer".to_owned(),
            scorer_signature(),
        )])),
        auditor: Auditor::disabled(),
    }
}

pub async fn start(db: &TestDb, dependencies: Dependencies) -> RunningBatch {
    start_with(db, dependencies, |_| {}).await
}

/// [`start`], with more settings.
pub async fn start_with(
    db: &TestDb,
    dependencies: Dependencies,
    tune: impl FnOnce(&mut shamal_batch_coordinator::BatchConfig),
) -> RunningBatch {
    RunningBatch::start_local(&db.url, dependencies, |config| {
        config.poll_interval_ms = 50;
        config.wait_warning_s = 1;
        config.default_region = "r1".to_owned();
        tune(config);
    })
    .await
    .unwrap()
}

/// The test key ring: `k1` active.
pub fn key_ring() -> Arc<KeyRing> {
    Arc::new(KeyRing::new("k1", [("k1", [42u8; 32].as_slice())]).unwrap())
}

/// `rows` rows `{"id": i, "x": i / 2}` as JSON Lines.
pub fn write_jsonl(path: &Path, rows: i64) {
    let mut text = String::new();
    for i in 0..rows {
        text.push_str(&format!("{{\"id\": {i}, \"x\": {}}}\n", i as f64 / 2.0));
    }
    std::fs::write(path, text).unwrap();
}

/// `rows` rows (id Int64, x Float64) as Parquet, `group` rows per row group.
pub fn write_parquet(path: &Path, rows: i64, group: usize) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
    ]));
    let ids: Vec<i64> = (0..rows).collect();
    let xs: Vec<f64> = ids.iter().map(|i| *i as f64 / 2.0).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Float64Array::from(xs)),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// What the test consumer does with a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Score and write the part.
    Score,
    /// Answer every shard with an error.
    FailAll,
    /// Score, taking at least this many milliseconds per shard.
    Slow(u64),
}

/// Who took which shard (job, shard index, taker's region).
pub type Taken = Arc<Mutex<Vec<(String, u32, String)>>>;

/// A test consumer: the workers' batch role in miniature. Takes entries
/// from every stream its region may take, scores `y = 2x + 1`, writes the
/// part with `PartWriter`, and completes with a `ShardResult`.
pub struct Consumer {
    pub taken: Taken,
    pub scored: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    pub fn start(queue: Arc<dyn JobQueue>, region: &str, behaviour: Behaviour) -> Consumer {
        Consumer::start_with_keys(queue, region, behaviour, None)
    }

    /// [`Consumer::start`], encrypting the parts of tasks that ask under
    /// `keys` (without keys such tasks are refused FAILED_PRECONDITION, as
    /// the workers' batch role does).
    pub fn start_with_keys(
        queue: Arc<dyn JobQueue>,
        region: &str,
        behaviour: Behaviour,
        keys: Option<Arc<KeyRing>>,
    ) -> Consumer {
        let taken: Taken = Arc::default();
        let scored = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let region = region.to_owned();
        let task = tokio::spawn({
            let (taken, scored, stop) = (taken.clone(), scored.clone(), stop.clone());
            async move {
                let consumer = format!("test-{region}-{}", uuid::Uuid::new_v4().simple());
                while !stop.load(Ordering::SeqCst) {
                    let streams: Vec<_> = queue
                        .streams()
                        .await
                        .unwrap()
                        .into_iter()
                        .filter(|stream| region_may_take(stream.region(), &region))
                        .collect();
                    if streams.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let deliveries = queue
                        .take(
                            &streams,
                            &consumer,
                            if matches!(behaviour, Behaviour::Slow(_)) {
                                1
                            } else {
                                4
                            },
                            Duration::from_millis(50),
                        )
                        .await
                        .unwrap();
                    for delivery in deliveries {
                        let task = proto::ShardTask::decode(delivery.job.payload.clone()).unwrap();
                        taken.lock().unwrap().push((
                            task.job_id.clone(),
                            task.shard_index,
                            region.clone(),
                        ));
                        if let Behaviour::Slow(ms) = behaviour {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let outcome = match behaviour {
                            Behaviour::FailAll => {
                                Outcome::error(13, "the test consumer fails every shard")
                            }
                            Behaviour::Score | Behaviour::Slow(_) => {
                                match score_with(&task, &consumer, &region, keys.clone()).await {
                                    Ok(result) => {
                                        scored.fetch_add(1, Ordering::SeqCst);
                                        Outcome::Ok(result.encode_to_vec().into())
                                    }
                                    Err((code, error)) => Outcome::error(code, error),
                                }
                            }
                        };
                        queue.complete(&delivery, outcome).await.unwrap();
                    }
                }
            }
        });
        Consumer {
            taken,
            scored,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
    }
}

/// Scores one shard as a worker would.
pub async fn score(
    task: &proto::ShardTask,
    worker: &str,
    region: &str,
) -> Result<proto::ShardResult, String> {
    score_with(task, worker, region, None)
        .await
        .map_err(|(_, error)| error)
}

/// [`score`] with a key ring; errors carry their gRPC code.
pub async fn score_with(
    task: &proto::ShardTask,
    worker: &str,
    region: &str,
    keys: Option<Arc<KeyRing>>,
) -> Result<proto::ShardResult, (i32, String)> {
    let encryption = match (task.encrypt, keys) {
        (false, _) => None,
        (true, None) => {
            return Err((
                9,
                format!(
                    "shard {} of job '{}': output encryption is not supported by this worker \
                     ({worker}): it has no key ring; set batch.key_file",
                    task.shard_index, task.job_id
                ),
            ));
        }
        (true, Some(ring)) => Some(PartEncryption {
            ring,
            key_id: None,
            job_id: task.job_id.clone(),
        }),
    };
    score_inner(task, worker, region, encryption)
        .await
        .map_err(|error| (13, error))
}

async fn score_inner(
    task: &proto::ShardTask,
    worker: &str,
    region: &str,
    encryption: Option<PartEncryption>,
) -> Result<proto::ShardResult, String> {
    let shard: Shard = serde_json::from_str(&task.shard_json).map_err(|e| e.to_string())?;
    let inputs: Vec<ModelInput> = vec![ModelInput::new(
        task.input_columns
            .get("x")
            .cloned()
            .unwrap_or_else(|| "x".to_owned()),
        "FP32",
        vec![-1, 1],
    )];
    let mut columns = task.key_columns.clone();
    columns.push(inputs[0].name.clone());
    let mut stream = read_shard(&shard, &columns, task.batch_size as usize)
        .await
        .map_err(|e| e.to_string())?;
    let mut writer: Option<PartWriter> = None;
    let output = Output::new(&task.output).map_err(|e| e.to_string())?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| e.to_string())?;
        let rows = batch.batch.num_rows();
        let inputs_batch = batch
            .batch
            .project(&[task.key_columns.len()])
            .map_err(|e| e.to_string())?;
        let request =
            to_infer_request(&inputs_batch, &inputs, &batch.origin).map_err(|e| e.to_string())?;
        let ys: Vec<u8> = request.raw_input_contents[0]
            .chunks_exact(4)
            .flat_map(|chunk| {
                let x = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                (2.0 * x + 1.0).to_le_bytes()
            })
            .collect();
        let response = ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "y".to_owned(),
                datatype: "FP32".to_owned(),
                shape: vec![rows as i64, 1],
                ..Default::default()
            }],
            raw_output_contents: vec![ys.into()],
            ..Default::default()
        };
        let outputs = outputs_to_columns(response, rows).map_err(|e| e.to_string())?;
        let keys = batch
            .batch
            .project(&(0..task.key_columns.len()).collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
        let out = PartWriter::batch(&keys, outputs).map_err(|e| e.to_string())?;
        if writer.is_none() {
            writer = Some(
                PartWriter::create_with(
                    &output,
                    task.shard_index as usize,
                    out.schema(),
                    encryption.clone(),
                )
                .map_err(|e| e.to_string())?,
            );
        }
        writer
            .as_mut()
            .unwrap()
            .write(&out)
            .map_err(|e| e.to_string())?;
    }
    let part = match writer {
        Some(writer) => writer.finish().await.map_err(|e| e.to_string())?,
        None => {
            // A shard without rows: an empty part with the output schema.
            let schema = Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("y", DataType::Float32, false),
            ]));
            PartWriter::create_with(&output, task.shard_index as usize, schema, encryption)
                .map_err(|e| e.to_string())?
                .finish()
                .await
                .map_err(|e| e.to_string())?
        }
    };
    Ok(proto::ShardResult {
        part: part.name,
        rows: part.rows,
        sha256: part.sha256,
        bytes: part.bytes,
        worker: worker.to_owned(),
        region: region.to_owned(),
        elapsed_ms: 1,
    })
}

/// The (id -> y) rows of every part file of `dir`, failing on a duplicate.
pub fn read_output(dir: &Path) -> HashMap<i64, f32> {
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("part-") && name.ends_with(".parquet")) {
            continue;
        }
        parts.push(bytes::Bytes::from(std::fs::read(&path).unwrap()));
    }
    rows_of_parts(parts)
}

/// The (id -> y) rows of every part of the output at `location` (local or
/// S3), failing on a duplicate.
pub async fn read_output_at(location: &str) -> HashMap<i64, f32> {
    let output = Output::new(location).unwrap();
    let mut parts = Vec::new();
    for name in output.list().await.unwrap() {
        if name.starts_with("part-") && name.ends_with(".parquet") {
            parts.push(output.read(&name).await.unwrap());
        }
    }
    rows_of_parts(parts)
}

/// The (id -> y) rows of Parquet parts, failing on a duplicate.
pub fn rows_of_parts(parts: Vec<bytes::Bytes>) -> HashMap<i64, f32> {
    let mut rows = HashMap::new();
    for part in parts {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(part)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = batch
                .column_by_name("id")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            let ys = batch
                .column_by_name("y")
                .unwrap()
                .as_any()
                .downcast_ref::<Float32Array>()
                .unwrap()
                .clone();
            for row in 0..batch.num_rows() {
                assert!(!ids.is_null(row));
                let previous = rows.insert(ids.value(row), ys.value(row));
                assert!(
                    previous.is_none(),
                    "row {} twice in the output",
                    ids.value(row)
                );
            }
        }
    }
    rows
}

/// Checks that `dir` holds exactly one row per input id `0..rows`, each
/// scored `2x + 1`.
pub fn assert_exactly_once(dir: &Path, rows: i64) {
    assert_rows(&read_output(dir), rows);
}

/// Checks that `output` holds exactly one row per input id `0..rows`, each
/// scored `2x + 1`.
pub fn assert_rows(output: &HashMap<i64, f32>, rows: i64) {
    assert_eq!(output.len() as i64, rows, "rows in the output");
    for id in 0..rows {
        let y = output
            .get(&id)
            .copied()
            .unwrap_or_else(|| panic!("row {id} missing"));
        let expected = 2.0 * (id as f32 / 2.0) + 1.0;
        assert!((y - expected).abs() < 1e-4, "row {id}: {y} != {expected}");
    }
}

/// The store of `db` (migrated).
pub async fn store(db: &TestDb) -> shamal_batch_coordinator::store::Store {
    shamal_batch_coordinator::store::Store::connect(&db.url)
        .await
        .unwrap()
}

/// A gRPC client of the running coordinator.
pub async fn client(
    running: &shamal_batch_coordinator::RunningBatch,
) -> BatchServiceClient<Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", running.grpc_address))
            .unwrap()
            .connect_lazy();
    BatchServiceClient::new(channel)
}

/// A job of the test model `scorer` in `uae-north`, 10 rows a shard.
pub fn spec(input: &Path, output: &Path) -> proto::JobSpec {
    proto::JobSpec {
        model: "scorer".to_owned(),
        input: input.display().to_string(),
        output: output.display().to_string(),
        key_columns: vec!["id".to_owned()],
        regions: vec!["uae-north".to_owned()],
        rows_per_shard: 10,
        ..Default::default()
    }
}

/// Submits `spec` (no request id).
pub async fn submit(
    client: &mut BatchServiceClient<Channel>,
    spec: proto::JobSpec,
) -> Result<proto::Job, tonic::Status> {
    client
        .submit_job(proto::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Polls the job until it is in `state`; panics if it ends otherwise.
pub async fn wait_state(
    client: &mut BatchServiceClient<Channel>,
    id: &str,
    state: proto::JobState,
) -> proto::Job {
    for _ in 0..600 {
        let job = client
            .get_job(proto::GetJobRequest { id: id.to_owned() })
            .await
            .unwrap()
            .into_inner();
        if job.state() == state {
            return job;
        }
        assert!(
            !matches!(
                job.state(),
                proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled
            ),
            "job ended {:?} while waiting for {state:?}: {job:?}",
            job.state()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never reached {state:?}");
}
