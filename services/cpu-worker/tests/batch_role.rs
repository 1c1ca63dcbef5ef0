#![allow(clippy::unwrap_used)]
//! The cpu-worker's batch role, with real ONNX Runtime and the `demo`
//! model: shards of Parquet and JSON Lines datasets taken from the batch
//! queue are scored on a batch instance of their own and written as parts
//! whose rows equal the model run online (gRPC ModelInfer) on the same rows;
//! online calls keep being answered while a large shard runs; bad shards
//! fail naming themselves and write nothing; a shard whose worker dies is
//! finished by another, once; a shard running for many idle periods is not
//! taken from its live worker; a worker never takes another region's shards.
//! On the in-process queue (`shamal up`), and on Redis at
//! SHAMAL_TEST_REDIS_URL (a second worker reclaiming after the idle time).

#[path = "../../../tests/support/services.rs"]
mod services;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, FixedSizeListArray, Float32Array, Int64Array};
use arrow::datatypes::{DataType as ArrowType, Field, Float32Type, Schema};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use prost::Message;
use shamal_async_queue::{
    JobId, JobQueue, JobStatus, MemoryQueue, NewJob, Outcome, QueueConfig, RedisOptions,
    RedisQueue, StreamKey,
};
use shamal_batch_io::{Dataset, Shard};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::ModelInferRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::shamal::batch::v1::{ShardResult, ShardTask};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::{NodeArgs, WorkerListeners};
use tokio::net::TcpListener;

const FEATURES: usize = 16;
const OUTPUTS: usize = 4;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn onnxruntime_library() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    shamal_cpu_worker::bundled_onnxruntime(&workspace_root()).unwrap_or_else(|| {
        panic!("ONNX Runtime not found: run scripts/setup-deps.sh or set ORT_DYLIB_PATH")
    })
}

/// A repository holding only `demo` (loads fast).
fn demo_repository(dir: &Path) -> PathBuf {
    let repository = dir.join("repository");
    std::fs::create_dir_all(&repository).unwrap();
    std::os::unix::fs::symlink(
        workspace_root()
            .join("models/repository/demo")
            .canonicalize()
            .unwrap(),
        repository.join("demo"),
    )
    .unwrap();
    repository
}

fn config(repository: &Path, region: &str, tune: impl FnOnce(&mut NodeArgs)) -> CpuWorkerConfig {
    let mut args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        instances: Some(1),
        node: NodeArgs {
            model_repository: Some(repository.to_owned()),
            region: Some(region.to_owned()),
            ..NodeArgs::default()
        },
        ..CpuWorkerArgs::default()
    };
    args.node.batch.batch_queue = Some("memory".to_owned());
    tune(&mut args.node);
    CpuWorkerConfig::load(&args).unwrap()
}

/// A worker serving on a port of its own.
struct Running {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Its consumer name (the default: `<server>-<host>-<port>`).
    fn consumer_suffix(&self) -> String {
        format!("-{}", self.address.port())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.serving.take().unwrap().await.unwrap().unwrap();
    }
}

async fn start(config: &CpuWorkerConfig, queue: Option<Arc<dyn JobQueue>>) -> Running {
    start_with(config, queue, shamal_telemetry::MetricsRegistry::new()).await
}

async fn start_with(
    config: &CpuWorkerConfig,
    queue: Option<Arc<dyn JobQueue>>,
    metrics: shamal_telemetry::MetricsRegistry,
) -> Running {
    let worker = shamal_cpu_worker::build_with_batch_queue(config, metrics, queue).unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(worker.serve(
        WorkerListeners {
            grpc,
            metrics: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    wait_ready(address).await;
    Running {
        address,
        stop: Some(stop),
        serving: Some(serving),
    }
}

async fn client(address: SocketAddr) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

async fn wait_ready(address: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut client) =
            GrpcInferenceServiceClient::connect(format!("http://{address}")).await
            && let Ok(ready) = client
                .server_ready(shamal_proto::inference::ServerReadyRequest {})
                .await
            && ready.into_inner().ready
        {
            return;
        }
        assert!(Instant::now() < deadline, "the worker did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deterministic features of row `id`.
fn features(id: i64) -> Vec<f32> {
    (0..FEATURES)
        .map(|j| (((id * 31 + j as i64 * 7) % 97) as f32 - 48.0) / 17.0)
        .collect()
}

/// A Parquet file of `rows` rows (`id` Int64, `features` FixedSizeList of
/// 16 Float32), in row groups of `group` rows.
fn write_parquet(path: &Path, rows: i64, group: usize) {
    let item = Arc::new(Field::new("item", ArrowType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", ArrowType::Int64, false),
        Field::new(
            "features",
            ArrowType::FixedSizeList(item.clone(), FEATURES as i32),
            false,
        ),
    ]));
    let ids = Int64Array::from_iter_values(0..rows);
    let values = Float32Array::from_iter_values((0..rows).flat_map(features));
    let lists = FixedSizeListArray::new(item, FEATURES as i32, Arc::new(values), None);
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(lists)]).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// A JSON Lines file of `rows` rows: `{"key": <id>, "x": [16 numbers]}`.
fn write_jsonl(path: &Path, rows: i64) {
    let mut text = String::new();
    for id in 0..rows {
        let x: Vec<serde_json::Value> = features(id)
            .into_iter()
            .map(|v| serde_json::json!(f64::from(v)))
            .collect();
        text.push_str(&serde_json::json!({"key": id, "x": x}).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

async fn shards(location: &Path, target_rows: u64) -> Vec<Shard> {
    Dataset::open(location.to_str().unwrap(), None)
        .await
        .unwrap()
        .plan_shards(target_rows)
}

fn task(shard: &Shard, output: &Path, key: &str, column: &str) -> ShardTask {
    ShardTask {
        job_id: "job-1".to_owned(),
        shard_index: shard.index as u32,
        shard_json: serde_json::to_string(shard).unwrap(),
        model: "demo".to_owned(),
        version: 0,
        output: output.to_str().unwrap().to_owned(),
        key_columns: vec![key.to_owned()],
        input_columns: HashMap::from([("INPUT0".to_owned(), column.to_owned())]),
        batch_size: 32,
        ..Default::default()
    }
}

async fn submit(queue: &dyn JobQueue, region: &str, task: &ShardTask) -> JobId {
    queue
        .submit(NewJob::new(
            StreamKey::new("demo", region).unwrap(),
            task.encode_to_vec(),
        ))
        .await
        .unwrap()
        .id
}

/// The entry's outcome, once it has one (within `timeout`).
async fn outcome(queue: &dyn JobQueue, id: &JobId, timeout: Duration) -> (Outcome, String, u32) {
    let status = queue.wait(id, timeout).await.unwrap();
    let JobStatus::Done(result) = status else {
        panic!("the shard was not answered in {timeout:?}: {status:?}");
    };
    (result.outcome, result.worker_id, result.attempts)
}

fn shard_result(outcome: Outcome) -> ShardResult {
    match outcome {
        Outcome::Ok(bytes) => ShardResult::decode(bytes).unwrap(),
        Outcome::Err { code, message } => {
            panic!("the shard failed: {:?}: {message}", tonic::Code::from(code))
        }
    }
}

fn shard_error(outcome: Outcome) -> (tonic::Code, String) {
    match outcome {
        Outcome::Err { code, message } => (tonic::Code::from(code), message),
        Outcome::Ok(_) => panic!("the shard should have failed"),
    }
}

/// Every row of the parts in `dir`: key -> the part's OUTPUT0.
fn read_parts(dir: &Path, key: &str) -> Vec<(i64, Vec<f32>)> {
    let mut rows = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("part-"))
        .collect();
    names.sort();
    for name in names {
        let file = std::fs::File::open(dir.join(name)).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let names: Vec<&str> = batch
                .schema_ref()
                .fields()
                .iter()
                .map(|field| field.name().as_str())
                .collect();
            assert_eq!(names, [key, "OUTPUT0"], "key columns, then the outputs");
            let keys = batch
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>();
            let outputs = batch.column(1).as_fixed_size_list();
            assert_eq!(outputs.value_length(), OUTPUTS as i32);
            for row in 0..batch.num_rows() {
                let values = outputs.value(row);
                let values = values.as_primitive::<Float32Type>();
                rows.push((keys.value(row), values.values().to_vec()));
            }
        }
    }
    rows
}

/// The model run online (the worker's gRPC ModelInfer) on rows `ids`.
async fn online(
    client: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    ids: &[i64],
) -> Result<Vec<Vec<f32>>, tonic::Status> {
    let values: Vec<f32> = ids.iter().flat_map(|&id| features(id)).collect();
    let tensor = Tensor {
        name: "INPUT0".to_owned(),
        datatype: DataType::Fp32,
        shape: vec![ids.len() as i64, FEATURES as i64],
        data: TensorData::Fixed(Bytes::from(bytemuck_cast(&values))),
    };
    let (inputs, raw_input_contents) = encode_inputs(&[tensor]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: "demo".to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await?
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("fixed-size output expected")
    };
    let flat: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect();
    Ok(flat.chunks(OUTPUTS).map(<[f32]>::to_vec).collect())
}

fn bytemuck_cast(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Each of `0..rows` exactly once in `parts`, with the output the model
/// gives online for the same row.
async fn assert_parts_match_online(address: SocketAddr, parts: &[(i64, Vec<f32>)], rows: i64) {
    let by_key: BTreeMap<i64, &Vec<f32>> = parts.iter().map(|(key, out)| (*key, out)).collect();
    assert_eq!(parts.len() as i64, rows, "one output row per input row");
    assert_eq!(by_key.len() as i64, rows, "each input row exactly once");
    assert_eq!(
        by_key.keys().copied().collect::<Vec<_>>(),
        (0..rows).collect::<Vec<_>>()
    );
    let mut client = client(address).await;
    let ids: Vec<i64> = (0..rows).collect();
    for chunk in ids.chunks(64) {
        let expected = online(&mut client, chunk).await.unwrap();
        for (id, want) in chunk.iter().zip(expected) {
            let got = by_key[id];
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                    "row {id}: batch {got:?} vs online {want:?}"
                );
            }
        }
    }
}

fn memory_queue(min_idle: Duration) -> Arc<dyn JobQueue> {
    Arc::new(
        MemoryQueue::new(QueueConfig {
            min_idle,
            ..QueueConfig::default()
        })
        .unwrap(),
    )
}

/// Names of the files in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_and_jsonl_shards_are_scored_as_the_model_runs_online() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let queue = memory_queue(Duration::from_secs(60));
    let worker = start(&config(&repository, "eu", |_| {}), Some(queue.clone())).await;

    // Parquet: 1,000 rows in row groups of 100, shards of 300 rows (whole
    // row groups): several shards and a partial batch at each shard's end.
    let parquet = dir.path().join("in.parquet");
    write_parquet(&parquet, 1_000, 100);
    let out = dir.path().join("out-parquet");
    let planned = shards(&parquet, 300).await;
    assert!(planned.len() >= 3, "{} shards", planned.len());
    let mut ids = Vec::new();
    for shard in &planned {
        ids.push(submit(queue.as_ref(), "eu", &task(shard, &out, "id", "features")).await);
    }
    let mut rows = 0;
    for (shard, id) in planned.iter().zip(&ids) {
        let (outcome, worker_id, _) = outcome(queue.as_ref(), id, Duration::from_secs(60)).await;
        let result = shard_result(outcome);
        assert_eq!(result.part, format!("part-{:06}.parquet", shard.index));
        assert_eq!(result.rows, shard.rows);
        assert_eq!(result.region, "eu");
        assert_eq!(result.worker, worker_id, "the consumer that wrote it");
        let bytes = std::fs::read(out.join(&result.part)).unwrap();
        assert_eq!(result.bytes, bytes.len() as u64);
        assert_eq!(result.sha256, sha256(&bytes));
        rows += result.rows;
    }
    assert_eq!(rows, 1_000);
    assert_parts_match_online(worker.address, &read_parts(&out, "id"), 1_000).await;

    // JSON Lines: byte-range shards, keys and a column named unlike the
    // input.
    let jsonl = dir.path().join("in.jsonl");
    write_jsonl(&jsonl, 700);
    let out = dir.path().join("out-jsonl");
    let planned = shards(&jsonl, 200).await;
    assert!(planned.len() >= 3, "{} shards", planned.len());
    let mut ids = Vec::new();
    for shard in &planned {
        ids.push(submit(queue.as_ref(), "eu", &task(shard, &out, "key", "x")).await);
    }
    for id in &ids {
        shard_result(outcome(queue.as_ref(), id, Duration::from_secs(60)).await.0);
    }
    assert_parts_match_online(worker.address, &read_parts(&out, "key"), 700).await;

    // The same shard again replaces its part: still each row once.
    let again = submit(queue.as_ref(), "eu", &task(&planned[0], &out, "key", "x")).await;
    shard_result(
        outcome(queue.as_ref(), &again, Duration::from_secs(60))
            .await
            .0,
    );
    assert_parts_match_online(worker.address, &read_parts(&out, "key"), 700).await;
    assert!(
        files_in(&out).iter().all(|name| name.starts_with("part-")),
        "no temporary files left: {:?}",
        files_in(&out)
    );
    worker.stop().await;
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_calls_are_answered_while_a_large_shard_runs() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let queue = memory_queue(Duration::from_secs(60));
    let worker = start(&config(&repository, "eu", |_| {}), Some(queue.clone())).await;
    let parquet = dir.path().join("large.parquet");
    let rows = 200_000;
    write_parquet(&parquet, rows, 50_000);
    let planned = shards(&parquet, rows as u64).await;
    assert_eq!(planned.len(), 1, "one large shard");
    let out = dir.path().join("out");

    let mut client = client(worker.address).await;
    let mut idle = Vec::new();
    for i in 0..300 {
        let started = Instant::now();
        online(&mut client, &[i]).await.unwrap();
        idle.push(started.elapsed());
    }

    let mut task = task(&planned[0], &out, "id", "features");
    task.batch_size = 64;
    let id = submit(queue.as_ref(), "eu", &task).await;
    // Online calls for as long as the shard runs (it has started once the
    // queue says it is running).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match queue.status(&id).await.unwrap() {
            JobStatus::Running { .. } | JobStatus::Done(_) => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "the shard was not taken");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut busy = Vec::new();
    let mut failures = Vec::new();
    let mut i = 0;
    while !queue.status(&id).await.unwrap().is_done() || busy.len() < 50 {
        let started = Instant::now();
        match online(&mut client, &[i % 1000]).await {
            Ok(_) => busy.push(started.elapsed()),
            Err(status) => failures.push(status),
        }
        i += 1;
        assert!(busy.len() < 1_000_000);
    }
    let result = shard_result(outcome(queue.as_ref(), &id, Duration::from_secs(1)).await.0);
    assert_eq!(result.rows, rows as u64, "the shard finished");
    assert!(failures.is_empty(), "online calls failed: {failures:?}");
    let (p50, p99) = percentiles(&mut idle);
    let (busy_p50, busy_p99) = percentiles(&mut busy);
    println!(
        "online ModelInfer latency: no shard: p50 {p50:?} p99 {p99:?} ({} calls); \
         during a {rows}-row shard ({} ms): p50 {busy_p50:?} p99 {busy_p99:?} ({} calls)",
        idle.len(),
        result.elapsed_ms,
        busy.len()
    );
    worker.stop().await;
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shards_fail_naming_themselves_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let queue = memory_queue(Duration::from_secs(60));
    let worker = start(&config(&repository, "eu", |_| {}), Some(queue.clone())).await;
    let parquet = dir.path().join("in.parquet");
    write_parquet(&parquet, 200, 100);
    let planned = shards(&parquet, 100).await;
    let out = dir.path().join("out");

    // A column the file does not have.
    let mut bad = task(&planned[1], &out, "nope", "features");
    bad.job_id = "job-missing".to_owned();
    let id = submit(queue.as_ref(), "eu", &bad).await;
    let (code, message) = shard_error(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(
        message.contains("shard 1 of job 'job-missing'") && message.contains("'nope'"),
        "{message}"
    );

    // An input column missing.
    let bad = task(&planned[0], &out, "id", "absent");
    let id = submit(queue.as_ref(), "eu", &bad).await;
    let (code, message) = shard_error(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(message.contains("'absent'"), "{message}");

    // Encryption asked for: refused before anything is written.
    let mut encrypted = task(&planned[0], &out, "id", "features");
    encrypted.encrypt = true;
    let id = submit(queue.as_ref(), "eu", &encrypted).await;
    let (code, message) = shard_error(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(code, tonic::Code::FailedPrecondition, "{message}");
    assert!(message.contains("encryption is not supported"), "{message}");

    // A version this worker does not serve.
    let mut unknown = task(&planned[0], &out, "id", "features");
    unknown.version = 9;
    let id = submit(queue.as_ref(), "eu", &unknown).await;
    let (code, message) = shard_error(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(code, tonic::Code::FailedPrecondition, "{message}");
    assert!(message.contains("version 9"), "{message}");

    // Not a ShardTask at all.
    let id = queue
        .submit(NewJob::new(
            StreamKey::new("demo", "eu").unwrap(),
            Bytes::from_static(&[0xff, 0xff, 0xff]),
        ))
        .await
        .unwrap()
        .id;
    let (code, _) = shard_error(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(code, tonic::Code::InvalidArgument);

    // A corrupt Parquet file (planned while it was whole).
    let corrupt = dir.path().join("corrupt.parquet");
    write_parquet(&corrupt, 200, 100);
    let planned = shards(&corrupt, 100).await;
    let length = std::fs::metadata(&corrupt).unwrap().len() as usize;
    std::fs::write(&corrupt, vec![0x5a; length]).unwrap();
    let id = submit(
        queue.as_ref(),
        "eu",
        &task(&planned[0], &out, "id", "features"),
    )
    .await;
    let (code, message) = shard_error(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(
        message.contains("shard 0 of job 'job-1'") && message.contains("corrupt.parquet"),
        "{message}"
    );

    assert!(
        files_in(&out).is_empty(),
        "failed shards write nothing: {:?}",
        files_in(&out)
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_takes_another_regions_shards() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let queue = memory_queue(Duration::from_secs(60));
    let eu = start(&config(&repository, "eu", |_| {}), Some(queue.clone())).await;
    let parquet = dir.path().join("in.parquet");
    write_parquet(&parquet, 100, 100);
    let planned = shards(&parquet, 100).await;
    let us_out = dir.path().join("out-us");
    let eu_out = dir.path().join("out-eu");
    let us_id = submit(
        queue.as_ref(),
        "us",
        &task(&planned[0], &us_out, "id", "features"),
    )
    .await;
    let eu_id = submit(
        queue.as_ref(),
        "eu",
        &task(&planned[0], &eu_out, "id", "features"),
    )
    .await;
    // The eu worker consumes: its own region's shard is done...
    shard_result(
        outcome(queue.as_ref(), &eu_id, Duration::from_secs(60))
            .await
            .0,
    );
    // ...and a while later the other region's is still queued.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(queue.status(&us_id).await.unwrap(), JobStatus::Queued);
    assert!(files_in(&us_out).is_empty());
    eu.stop().await;

    // A worker of that region takes it.
    let us = start(&config(&repository, "us", |_| {}), Some(queue.clone())).await;
    let result = shard_result(
        outcome(queue.as_ref(), &us_id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(result.region, "us");
    us.stop().await;
}

/// A shard running for many idle periods stays with its live worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_shard_is_not_taken_from_its_live_worker() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    // Reclaimable after 300 ms idle: the shard runs many times that.
    let queue = memory_queue(Duration::from_millis(300));
    let parquet = dir.path().join("large.parquet");
    let rows = 200_000;
    write_parquet(&parquet, rows, 50_000);
    let planned = shards(&parquet, rows as u64).await;
    let out = dir.path().join("out");
    let a = start(&config(&repository, "eu", |_| {}), Some(queue.clone())).await;
    let mut task = task(&planned[0], &out, "id", "features");
    // One row per execution: 200,000 executions, seconds of work.
    task.batch_size = 1;
    let id = submit(queue.as_ref(), "eu", &task).await;
    wait_running(queue.as_ref(), &id).await;
    // A second live worker, eager to reclaim.
    let b = start(&config(&repository, "eu", |_| {}), Some(queue.clone())).await;
    let (outcome, worker_id, attempts) =
        outcome(queue.as_ref(), &id, Duration::from_secs(120)).await;
    let result = shard_result(outcome);
    println!("long shard: {} ms", result.elapsed_ms);
    assert!(
        result.elapsed_ms > 1_000,
        "the shard must run for several idle periods to show anything: {} ms",
        result.elapsed_ms
    );
    assert_eq!(attempts, 1, "delivered once: never reclaimed");
    assert!(worker_id.ends_with(&a.consumer_suffix()), "{worker_id}");
    a.stop().await;
    b.stop().await;
}

async fn wait_running(queue: &dyn JobQueue, id: &JobId) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match queue.status(id).await.unwrap() {
            JobStatus::Running { consumer, .. } => return consumer,
            JobStatus::Done(result) => panic!("done before it was seen running: {result:?}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "the shard was not taken");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Kills worker A mid-shard (its whole runtime, as a process dies) and
/// shows worker B finishing the shard, with one part and each row once.
#[test]
fn a_shard_whose_worker_dies_is_finished_by_another_once() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let test = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queue = memory_queue(Duration::from_secs(1));
    let parquet = dir.path().join("large.parquet");
    let rows = 200_000;
    write_parquet(&parquet, rows, 50_000);
    let planned = test.block_on(shards(&parquet, rows as u64));
    let out = dir.path().join("out");
    let mut task = task(&planned[0], &out, "id", "features");
    task.batch_size = 16;
    let config = config(&repository, "eu", |_| {});

    // Worker A, in a runtime of its own.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a = doomed.block_on(start(&config, Some(queue.clone())));
    let id = test.block_on(submit(queue.as_ref(), "eu", &task));
    let taker = test.block_on(wait_running(queue.as_ref(), &id));
    assert!(taker.ends_with(&a.consumer_suffix()), "{taker}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !test.block_on(queue.status(&id)).unwrap().is_done(),
        "still running when A dies"
    );
    // A dies: every task of its runtime is dropped at once.
    std::mem::forget(a);
    doomed.shutdown_background();

    test.block_on(async {
        let b = start(&config, Some(queue.clone())).await;
        let (outcome, worker_id, attempts) =
            outcome(queue.as_ref(), &id, Duration::from_secs(120)).await;
        let result = shard_result(outcome);
        assert!(worker_id.ends_with(&b.consumer_suffix()), "{worker_id}");
        assert_eq!(attempts, 2, "reclaimed once");
        assert_eq!(result.rows, rows as u64);
        let parts: Vec<String> = files_in(&out)
            .into_iter()
            .filter(|name| name.starts_with("part-"))
            .collect();
        assert_eq!(parts, ["part-000000.parquet"], "one part");
        let written = read_parts(&out, "id");
        assert_eq!(written.len() as i64, rows);
        let mut keys: Vec<i64> = written.iter().map(|(key, _)| *key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len() as i64, rows, "each row exactly once");
        b.stop().await;
    });
}

/// Over Redis: worker A (consumer of the batch queue at its configured
/// prefix) is stopped abruptly mid-shard; worker B reclaims the entry after
/// the idle time and finishes it.
#[test]
fn over_redis_a_second_worker_reclaims_a_dead_workers_shard() {
    let Some(url) = services::configured(
        "SHAMAL_TEST_REDIS_URL",
        "over_redis_a_second_worker_reclaims_a_dead_workers_shard",
        "scripts/ensure-redis.sh starts one",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let prefix = format!(
        "shamal-test:batch-role:{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let config = config(&repository, "eu", |node| {
        node.batch.batch_queue = Some(url.clone());
        node.batch.batch_key_prefix = Some(prefix.clone());
    });
    let mut config = config;
    config.node.batch.reclaim_idle_ms = 1_000;
    let test = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queue: Arc<dyn JobQueue> = Arc::new(
        test.block_on(RedisQueue::connect(
            RedisOptions::new(url.clone()).with_key_prefix(prefix.clone()),
            QueueConfig {
                min_idle: Duration::from_secs(1),
                ..QueueConfig::default()
            },
        ))
        .unwrap(),
    );
    let parquet = dir.path().join("large.parquet");
    let rows = 200_000;
    write_parquet(&parquet, rows, 50_000);
    let planned = test.block_on(shards(&parquet, rows as u64));
    let out = dir.path().join("out");
    let mut task = task(&planned[0], &out, "id", "features");
    task.batch_size = 16;

    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a = doomed.block_on(start(&config, None));
    let id = test.block_on(submit(queue.as_ref(), "eu", &task));
    let taker = test.block_on(wait_running(queue.as_ref(), &id));
    assert!(taker.ends_with(&a.consumer_suffix()), "{taker}");
    std::mem::forget(a);
    doomed.shutdown_background();

    test.block_on(async {
        let b = start(&config, None).await;
        let (outcome, worker_id, attempts) =
            outcome(queue.as_ref(), &id, Duration::from_secs(120)).await;
        let result = shard_result(outcome);
        assert!(worker_id.ends_with(&b.consumer_suffix()), "{worker_id}");
        assert_eq!(attempts, 2);
        assert_eq!(result.rows, rows as u64);
        let written = read_parts(&out, "id");
        let mut keys: Vec<i64> = written.iter().map(|(key, _)| *key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len() as i64, rows, "each row exactly once");
        assert_eq!(written.len() as i64, rows);
        b.stop().await;
    });
}

/// The value of metric `name` (summed over its series matching `label`).
fn metric(
    registry: &shamal_telemetry::MetricsRegistry,
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            label.is_none_or(|(key, value)| {
                metric
                    .get_label()
                    .iter()
                    .any(|pair| pair.name() == key && pair.value() == value)
            })
        })
        .map(|metric| metric.get_gauge().get_value() + metric.get_counter().get_value())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_instance_is_loaded_by_the_first_shard_and_dropped_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let queue = memory_queue(Duration::from_secs(60));
    let mut config = config(&repository, "eu", |_| {});
    config.node.batch.idle_unload_ms = 1_000;
    let registry = shamal_telemetry::MetricsRegistry::new();
    let worker = start_with(&config, Some(queue.clone()), registry.clone()).await;
    let instances = |registry: &shamal_telemetry::MetricsRegistry| {
        metric(registry, "shamal_worker_batch_instances", None)
    };
    assert_eq!(instances(&registry), 0.0, "nothing loaded before a shard");
    let parquet = dir.path().join("in.parquet");
    write_parquet(&parquet, 100, 100);
    let planned = shards(&parquet, 100).await;
    let out = dir.path().join("out");
    let id = submit(
        queue.as_ref(),
        "eu",
        &task(&planned[0], &out, "id", "features"),
    )
    .await;
    shard_result(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(
        instances(&registry),
        1.0,
        "loaded by the shard, kept a while"
    );
    assert_eq!(
        metric(
            &registry,
            "shamal_worker_batch_shards_total",
            Some(("code", "ok"))
        ),
        1.0
    );
    assert_eq!(
        metric(&registry, "shamal_worker_batch_rows_total", None),
        100.0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while instances(&registry) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the idle batch instance was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Loaded again by the next shard.
    let id = submit(
        queue.as_ref(),
        "eu",
        &task(&planned[0], &out, "id", "features"),
    )
    .await;
    shard_result(
        outcome(queue.as_ref(), &id, Duration::from_secs(60))
            .await
            .0,
    );
    assert_eq!(
        metric(
            &registry,
            "shamal_worker_batch_shards_total",
            Some(("code", "ok"))
        ),
        2.0
    );
    worker.stop().await;
}
