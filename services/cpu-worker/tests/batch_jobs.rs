#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Batch jobs end to end with real cpu-workers, on PostgreSQL
//! (SHAMAL_TEST_POSTGRES_URL) and Redis (SHAMAL_TEST_REDIS_URL):
//!
//! - a `shamal-cpu-worker` process is killed with SIGKILL mid-shard; a new
//!   worker reclaims its entry after `reclaim_idle_ms` and the job
//!   succeeds with every input row exactly once, scored as the model
//!   scores it online (ModelInfer);
//! - the coordinator's process is killed with SIGKILL mid-job and started
//!   again on the same database and queue; the job succeeds with every row
//!   exactly once and a manifest listing every part once;
//! - residency, over random job regions and random worker regions: no
//!   shard is ever taken by a worker outside the job's regions, and a job
//!   no worker of its regions takes stays QUEUED saying why;
//! - encryption at rest: a worker with a key file writes only encrypted
//!   parts, which read back (`decrypt_dataset`) as the rows scored online.
//!
//! The coordinator's process is this test binary, started again with
//! [`CHILD_DB`] set: it runs the coordinator library (the `shamal-batch`
//! binary would need a registry and a router) with the `demo` model's
//! catalog and signature built in. The workers are the real
//! `shamal-cpu-worker` binary (ONNX Runtime, the bundled `demo` model),
//! or, for the residency test, the same worker built in process.

#[path = "../../../tests/support/services.rs"]
mod services;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, FixedSizeListArray, Float32Array, Int64Array};
use arrow::datatypes::{DataType as ArrowType, Field, Float32Type, Schema};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use shamal_async_queue::{JobId, JobQueue, JobStatus, QueueConfig, RedisOptions, RedisQueue};
use shamal_audit_client::Auditor;
use shamal_batch_coordinator::catalog::{Signature, StaticCatalog, StaticMetadata};
use shamal_batch_coordinator::{Dependencies, QueueSource, RunningBatch};
use shamal_batch_io::{Manifest, ModelInput, is_temporary_part_name};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::ModelInferRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::shamal::batch::v1 as proto;
use shamal_proto::shamal::batch::v1::batch_service_client::BatchServiceClient;
use shamal_proto::shamal::registry::v1::{ModelState, VersionState};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::{NodeArgs, WorkerListeners};
use sqlx::Connection;
use tonic::transport::Channel;

const FEATURES: usize = 16;
const OUTPUTS: usize = 4;

/// Set in the coordinator's child process: its database URL.
const CHILD_DB: &str = "SHAMAL_BATCH_JOBS_CHILD_DB";
/// The child's Redis URL and key prefix.
const CHILD_REDIS: &str = "SHAMAL_BATCH_JOBS_CHILD_REDIS";
const CHILD_PREFIX: &str = "SHAMAL_BATCH_JOBS_CHILD_PREFIX";

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

// ----- services --------------------------------------------------------

/// A fresh database on the PostgreSQL server, dropped at the end.
struct TestDb {
    url: String,
    admin: String,
    name: String,
}

impl TestDb {
    async fn create(admin: &str) -> TestDb {
        let mut connection = sqlx::postgres::PgConnection::connect(admin)
            .await
            .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_POSTGRES_URL", admin, error));
        let name = format!("shamal_batch_jobs_test_{}", unique());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(base, _)| base).unwrap();
        TestDb {
            url: format!("{base}/{name}"),
            admin: admin.to_owned(),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(mut connection) = sqlx::postgres::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut connection)
                        .await;
                }
            });
        })
        .join();
    }
}

fn unique() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// PostgreSQL and Redis URLs, or `None` when the test is skipped (fails
/// under SHAMAL_REQUIRE_SERVICES=1).
fn required_services(test: &str) -> Option<(String, String)> {
    let postgres = services::configured(
        "SHAMAL_TEST_POSTGRES_URL",
        test,
        "scripts/ensure-postgres.sh prints a URL for it",
    );
    let redis = services::configured(
        "SHAMAL_TEST_REDIS_URL",
        test,
        "scripts/ensure-redis.sh prints a URL for it",
    );
    Some((postgres?, redis?))
}

async fn redis_queue(url: &str, prefix: &str) -> Arc<dyn JobQueue> {
    Arc::new(
        RedisQueue::connect(
            RedisOptions::new(url.to_owned()).with_key_prefix(prefix.to_owned()),
            QueueConfig::default(),
        )
        .await
        .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_REDIS_URL", url, error)),
    )
}

// ----- the coordinator --------------------------------------------------

/// The `demo` model as the registry and the router would describe it.
fn demo_dependencies(queue: QueueSource) -> Dependencies {
    Dependencies {
        queue,
        catalog: Arc::new(StaticCatalog::new([ModelState {
            name: "demo".to_owned(),
            versions: vec![VersionState {
                version: 1,
                lifecycle: "ready".to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        }])),
        metadata: Arc::new(StaticMetadata::new([(
            "demo".to_owned(),
            Signature {
                inputs: vec![ModelInput::new("INPUT0", "FP32", vec![-1, FEATURES as i64])],
                outputs: vec!["OUTPUT0".to_owned()],
            },
        )])),
        auditor: Auditor::disabled(),
    }
}

async fn start_coordinator(
    database_url: &str,
    queue: QueueSource,
    default_region: &str,
    batch_size: u32,
) -> RunningBatch {
    RunningBatch::start_local(database_url, demo_dependencies(queue), |config| {
        config.poll_interval_ms = 50;
        config.wait_warning_s = 1;
        config.default_region = default_region.to_owned();
        config.batch_size = batch_size;
    })
    .await
    .unwrap()
}

/// The coordinator's child process: serves until killed, or until its
/// parent closes its stdin. Run only as a child (`CHILD_DB` set).
#[test]
#[ignore = "the coordinator's child process of the crash tests"]
fn coordinator_process() {
    let Ok(database_url) = std::env::var(CHILD_DB) else {
        return;
    };
    let redis = std::env::var(CHILD_REDIS).unwrap();
    let prefix = std::env::var(CHILD_PREFIX).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let queue = QueueSource::Redis {
            options: RedisOptions::new(redis).with_key_prefix(prefix),
            config: QueueConfig::default(),
        };
        let running = start_coordinator(&database_url, queue, "eu", 4).await;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening {}", running.grpc_address).unwrap();
        stdout.flush().unwrap();
        drop(stdout);
        // Until the parent goes away.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await;
        running.stop().await.unwrap();
    });
}

/// A coordinator in a process of its own; killed when dropped.
struct CoordinatorProcess {
    child: Child,
    address: SocketAddr,
}

impl CoordinatorProcess {
    fn start(database_url: &str, redis: &str, prefix: &str) -> CoordinatorProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["coordinator_process", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_DB, database_url)
            .env(CHILD_REDIS, redis)
            .env(CHILD_PREFIX, prefix)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("listening ") {
                    let _ = first.send(address.to_owned());
                }
            }
        });
        let address = listening
            .recv_timeout(Duration::from_secs(30))
            .expect("the coordinator's process did not start within 30 s")
            .parse()
            .unwrap();
        CoordinatorProcess { child, address }
    }

    /// SIGKILL: no shutdown of any kind.
    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn batch_client(address: SocketAddr) -> BatchServiceClient<Channel> {
    BatchServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy(),
    )
}

fn demo_spec(input: &Path, output: &Path, regions: &[&str], rows_per_shard: u64) -> proto::JobSpec {
    proto::JobSpec {
        model: "demo".to_owned(),
        input: input.display().to_string(),
        output: output.display().to_string(),
        key_columns: vec!["id".to_owned()],
        input_columns: [("INPUT0".to_owned(), "features".to_owned())]
            .into_iter()
            .collect(),
        regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        rows_per_shard,
        ..Default::default()
    }
}

async fn submit(client: &mut BatchServiceClient<Channel>, spec: proto::JobSpec) -> proto::Job {
    client
        .submit_job(proto::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn get_job(client: &mut BatchServiceClient<Channel>, id: &str) -> proto::Job {
    client
        .get_job(proto::GetJobRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
}

/// Polls the job until `done` holds of it (within `timeout`).
async fn wait_job(
    client: &mut BatchServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&proto::Job) -> bool,
) -> proto::Job {
    let deadline = Instant::now() + timeout;
    loop {
        let job = get_job(client, id).await;
        if done(&job) {
            return job;
        }
        assert!(
            !matches!(
                job.state(),
                proto::JobState::Failed | proto::JobState::Cancelled
            ),
            "job {id} ended {:?} waiting for {what}: {job:?}",
            job.state()
        );
        assert!(
            Instant::now() < deadline,
            "job {id} not {what} within {timeout:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_succeeded(client: &mut BatchServiceClient<Channel>, id: &str) -> proto::Job {
    wait_job(client, id, Duration::from_secs(60), "SUCCEEDED", |job| {
        job.state() == proto::JobState::Succeeded
    })
    .await
}

// ----- workers ----------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `shamal-cpu-worker` process; killed when dropped.
struct WorkerProcess {
    child: Child,
    address: SocketAddr,
}

impl WorkerProcess {
    async fn start(dir: &Path, repository: &Path, redis: &str, prefix: &str) -> WorkerProcess {
        let port = free_port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let file = dir.join(format!("worker-{port}.toml"));
        std::fs::write(
            &file,
            format!(
                "region = \"eu\"\n\
                 grpc_listen = \"{address}\"\n\
                 metrics_listen = \"127.0.0.1:{}\"\n\
                 model_repository = \"{}\"\n\
                 instances = 1\n\
                 [batch]\n\
                 queue = \"{redis}\"\n\
                 key_prefix = \"{prefix}\"\n\
                 concurrency = 1\n\
                 reclaim_idle_ms = 1000\n",
                free_port(),
                repository.display()
            ),
        )
        .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_shamal-cpu-worker"));
        for (name, _) in std::env::vars() {
            if name.starts_with("SHAMAL_CPU_WORKER_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("--config")
            .arg(&file)
            .env("ORT_DYLIB_PATH", onnxruntime_library())
            .env("SHAMAL_CPU_WORKER_INSECURE", "true")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut worker = WorkerProcess { child, address };
        worker.wait_ready().await;
        worker
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut client) =
                GrpcInferenceServiceClient::connect(format!("http://{}", self.address)).await
                && let Ok(ready) = client
                    .server_ready(shamal_proto::inference::ServerReadyRequest {})
                    .await
                && ready.into_inner().ready
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the worker exited before it was ready: {status}");
            }
            assert!(Instant::now() < deadline, "the worker did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its consumer name ends so (`<server>-<host>-<port>`).
    fn consumer_suffix(&self) -> String {
        format!("-{}", self.address.port())
    }

    /// SIGKILL: no drain, no goodbye to the queue.
    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cpu-worker in this process, with a batch role on Redis.
struct InProcessWorker {
    address: SocketAddr,
    region: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessWorker {
    async fn start(repository: &Path, region: &str, redis: &str, prefix: &str) -> InProcessWorker {
        InProcessWorker::start_with_keys(repository, region, redis, prefix, None).await
    }

    /// [`InProcessWorker::start`], encrypting batch parts under the key
    /// ring of `key_file` (`[batch] key_file`).
    async fn start_with_keys(
        repository: &Path,
        region: &str,
        redis: &str,
        prefix: &str,
        key_file: Option<&Path>,
    ) -> InProcessWorker {
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
        args.node.batch.batch_queue = Some(redis.to_owned());
        args.node.batch.batch_key_prefix = Some(prefix.to_owned());
        args.node.batch.batch_key_file = key_file.map(Path::to_path_buf);
        let config = CpuWorkerConfig::load(&args).unwrap();
        let worker = shamal_cpu_worker::build_with_batch_queue(
            &config,
            shamal_telemetry::MetricsRegistry::new(),
            None,
        )
        .unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        let mut running = InProcessWorker {
            address,
            region: region.to_owned(),
            stop: Some(stop),
            serving: Some(serving),
        };
        running.wait_ready().await;
        running
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut client) =
                GrpcInferenceServiceClient::connect(format!("http://{}", self.address)).await
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

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.serving.take().unwrap().await.unwrap().unwrap();
    }
}

// ----- checking the output ----------------------------------------------

/// Every row of the `part-*` files in `dir` (key, OUTPUT0), and the parts'
/// names.
fn read_parts(dir: &Path) -> (Vec<(i64, Vec<f32>)>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("part-"))
        .collect();
    names.sort();
    let mut rows = Vec::new();
    for name in &names {
        let file = std::fs::File::open(dir.join(name)).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let keys = batch
                .column_by_name("id")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            let outputs = batch
                .column_by_name("OUTPUT0")
                .unwrap()
                .as_fixed_size_list();
            assert_eq!(outputs.value_length(), OUTPUTS as i32);
            for row in 0..batch.num_rows() {
                let values = outputs.value(row);
                rows.push((
                    keys.value(row),
                    values.as_primitive::<Float32Type>().values().to_vec(),
                ));
            }
        }
    }
    (rows, names)
}

/// The model run online (a worker's gRPC ModelInfer) on rows `ids`.
async fn online(client: &mut GrpcInferenceServiceClient<Channel>, ids: &[i64]) -> Vec<Vec<f32>> {
    let values: Vec<u8> = ids
        .iter()
        .flat_map(|&id| features(id))
        .flat_map(f32::to_le_bytes)
        .collect();
    let tensor = Tensor {
        name: "INPUT0".to_owned(),
        datatype: DataType::Fp32,
        shape: vec![ids.len() as i64, FEATURES as i64],
        data: TensorData::Fixed(Bytes::from(values)),
    };
    let (inputs, raw_input_contents) = encode_inputs(&[tensor]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: "demo".to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("fixed-size output expected")
    };
    let flat: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect();
    flat.chunks(OUTPUTS).map(<[f32]>::to_vec).collect()
}

/// The names of the temporary part files in output directory `dir`.
fn temporary_parts(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| is_temporary_part_name(name))
        .collect();
    names.sort();
    names
}

/// The output in `dir` holds each of `0..rows` exactly once, scored as the
/// worker at `oracle` scores the same row online, in exactly the parts its
/// manifest lists (one per shard, each once).
async fn assert_exactly_once(dir: &Path, rows: i64, shards: u32, oracle: SocketAddr) {
    let manifest = Manifest::verify(dir.to_str().unwrap()).await.unwrap();
    let listed: Vec<String> = manifest
        .parts
        .iter()
        .map(|part| part.name.clone())
        .collect();
    let expected: Vec<String> = (0..shards)
        .map(|index| format!("part-{index:06}.parquet"))
        .collect();
    assert_eq!(listed, expected, "the manifest lists every part once");
    assert_eq!(manifest.total_rows, rows as u64);
    let (written, names) = read_parts(dir);
    assert_eq!(names, expected, "the output holds exactly the listed parts");
    // Anything else is hidden from readers (a dead worker's temporary file).
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            expected.contains(&name)
                || name == "_manifest.json"
                || name == "_SUCCESS"
                || name.starts_with('.'),
            "a file readers would take for data: {name}"
        );
        if name.starts_with('.') {
            println!("left in the output, hidden: {name}");
        }
    }
    let mut by_key: BTreeMap<i64, Vec<f32>> = BTreeMap::new();
    for (key, output) in written {
        assert!(
            by_key.insert(key, output).is_none(),
            "row {key} twice in the output"
        );
    }
    assert_eq!(
        by_key.keys().copied().collect::<Vec<_>>(),
        (0..rows).collect::<Vec<_>>(),
        "every input row exactly once"
    );
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{oracle}"))
        .await
        .unwrap();
    let ids: Vec<i64> = (0..rows).collect();
    for chunk in ids.chunks(64) {
        for (id, want) in chunk.iter().zip(online(&mut client, chunk).await) {
            let got = &by_key[id];
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                    "row {id}: batch {got:?} vs online {want:?}"
                );
            }
        }
    }
}

/// The entries of `shards` that `worker` holds (taken, not answered).
async fn held_by(
    queue: &dyn JobQueue,
    shards: &[shamal_batch_coordinator::model::ShardRow],
    worker: &WorkerProcess,
) -> Vec<JobId> {
    let mut held = Vec::new();
    for shard in shards.iter().filter(|shard| !shard.queue_id.is_empty()) {
        let id = JobId::parse(&shard.queue_id).unwrap();
        if let JobStatus::Running { consumer, .. } = queue.status(&id).await.unwrap()
            && consumer.ends_with(&worker.consumer_suffix())
        {
            held.push(id);
        }
    }
    held
}

/// The store's shards of job `id`.
async fn stored_shards(
    database_url: &str,
    id: &str,
) -> Vec<shamal_batch_coordinator::model::ShardRow> {
    shamal_batch_coordinator::store::Store::connect(database_url)
        .await
        .unwrap()
        .shards(id)
        .await
        .unwrap()
}

// Shards long enough to be caught mid-run: 8 of 8,000 rows, scored 4 rows
// per model execution.
const CRASH_ROWS: i64 = 64_000;
const CRASH_GROUP: usize = 8_000;

// ----- the tests --------------------------------------------------------

/// A worker process dies (SIGKILL) mid-shard, after at least one shard is
/// done; a new worker reclaims the dead one's entry after
/// `reclaim_idle_ms` and the job succeeds, each row once, as scored online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_shard_loses_and_doubles_no_row() {
    let Some((postgres, redis)) =
        required_services("a_worker_killed_mid_shard_loses_and_doubles_no_row")
    else {
        return;
    };
    let started = Instant::now();
    let db = TestDb::create(&postgres).await;
    let prefix = format!("shamal-test:batch-jobs:{}", unique());
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let input = dir.path().join("in.parquet");
    write_parquet(&input, CRASH_ROWS, CRASH_GROUP);
    let output = dir.path().join("out");
    let queue = redis_queue(&redis, &prefix).await;
    // One row per model execution: shards long enough to be caught.
    let coordinator = start_coordinator(&db.url, QueueSource::Shared(queue.clone()), "eu", 1).await;
    let mut client = batch_client(coordinator.grpc_address);
    let mut a = WorkerProcess::start(dir.path(), &repository, &redis, &prefix).await;
    let job = submit(
        &mut client,
        demo_spec(&input, &output, &["eu"], CRASH_GROUP as u64),
    )
    .await;
    assert_eq!(job.shards_total, 8);

    // At least one shard done, and A just took another: kill A then, near
    // the start of that shard's run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut previous = held_by(queue.as_ref(), &stored_shards(&db.url, &job.id).await, &a).await;
    loop {
        let shards = stored_shards(&db.url, &job.id).await;
        let done = shards.iter().filter(|shard| !shard.part.is_empty()).count();
        let held = held_by(queue.as_ref(), &shards, &a).await;
        if done >= 1 && held.iter().any(|id| !previous.contains(id)) {
            break;
        }
        previous = held;
        assert!(
            Instant::now() < deadline,
            "never saw a shard done and another taken by A"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its part of that shard begun (a temporary file, the only one: A is
    // the only worker), so that the kill leaves it behind.
    while temporary_parts(&output).is_empty() {
        assert!(
            Instant::now() < deadline,
            "A never began the part of the shard it took"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill_9();
    let orphans = temporary_parts(&output);
    assert!(!orphans.is_empty(), "A's temporary part is gone");
    // What A held when it died (still pending on its consumer in Redis).
    let held = held_by(queue.as_ref(), &stored_shards(&db.url, &job.id).await, &a).await;
    assert!(!held.is_empty(), "A died holding no shard");
    let before = get_job(&mut client, &job.id).await;
    assert!(before.shards_done < before.shards_total, "{before:?}");

    let b = WorkerProcess::start(dir.path(), &repository, &redis, &prefix).await;
    let done = wait_succeeded(&mut client, &job.id).await;
    assert_eq!(done.done_rows, CRASH_ROWS as u64);
    assert_eq!(done.shards_done, 8);
    // The entries A held were reclaimed and finished by B.
    for id in &held {
        let JobStatus::Done(result) = queue.status(id).await.unwrap() else {
            panic!("the shard A held has no result");
        };
        assert!(
            result.worker_id.ends_with(&b.consumer_suffix()),
            "{}",
            result.worker_id
        );
        assert_eq!(
            result.attempts, 2,
            "delivered to A, then reclaimed once by B"
        );
    }
    assert_exactly_once(&output, CRASH_ROWS, 8, b.address).await;
    // The coordinator removed what A left once the job was finished.
    assert_eq!(
        temporary_parts(&output),
        Vec::<String>::new(),
        "temporary parts left after the job (A left {orphans:?})"
    );
    coordinator.stop().await.unwrap();
    println!("worker crash test: {:?}", started.elapsed());
}

/// The coordinator's process dies (SIGKILL) mid-job; one started again on
/// the same database and queue finishes the job, each row once, with a
/// manifest listing every part once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_job_is_resumed_exactly_once() {
    let Some((postgres, redis)) =
        required_services("a_coordinator_killed_mid_job_is_resumed_exactly_once")
    else {
        return;
    };
    let started = Instant::now();
    let db = TestDb::create(&postgres).await;
    let prefix = format!("shamal-test:batch-jobs:{}", unique());
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let input = dir.path().join("in.parquet");
    write_parquet(&input, CRASH_ROWS, CRASH_GROUP);
    let output = dir.path().join("out");
    let worker = WorkerProcess::start(dir.path(), &repository, &redis, &prefix).await;

    let mut first = CoordinatorProcess::start(&db.url, &redis, &prefix);
    let mut client = batch_client(first.address);
    let job = submit(
        &mut client,
        demo_spec(&input, &output, &["eu"], CRASH_GROUP as u64),
    )
    .await;
    assert_eq!(job.shards_total, 8);
    let seen = wait_job(
        &mut client,
        &job.id,
        Duration::from_secs(60),
        "partly done",
        |job| job.shards_done >= 1,
    )
    .await;
    first.kill_9();
    assert!(seen.shards_done < seen.shards_total, "{seen:?}");
    let store = shamal_batch_coordinator::store::Store::connect(&db.url)
        .await
        .unwrap();
    let stored = store.job(&job.id).await.unwrap().unwrap();
    assert!(
        !stored.state.is_final(),
        "the job ended before the coordinator died: {stored:?}"
    );

    // The worker goes on: wait for a shard's result to reach the queue
    // while no coordinator runs, so that the next one finds it on resume.
    let queue = redis_queue(&redis, &prefix).await;
    let recorded = store.shards(&job.id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    'answered: loop {
        for shard in recorded
            .iter()
            .filter(|shard| shard.part.is_empty() && !shard.queue_id.is_empty())
        {
            let id = JobId::parse(&shard.queue_id).unwrap();
            if queue.status(&id).await.unwrap().is_done() {
                break 'answered;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no shard was answered while the coordinator was down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let second = CoordinatorProcess::start(&db.url, &redis, &prefix);
    let mut client = batch_client(second.address);
    let done = wait_succeeded(&mut client, &job.id).await;
    assert_eq!(done.done_rows, CRASH_ROWS as u64);
    assert_eq!(done.shards_done, 8);
    assert_eq!(
        done.manifest,
        output.join("_manifest.json").display().to_string()
    );
    assert_exactly_once(&output, CRASH_ROWS, 8, worker.address).await;
    // Each shard recorded once, by the one worker.
    for shard in stored_shards(&db.url, &job.id).await {
        assert_eq!(shard.part, format!("part-{:06}.parquet", shard.index));
        assert!(shard.worker.ends_with(&worker.consumer_suffix()));
    }
    drop(second);
    println!("coordinator crash test: {:?}", started.elapsed());
}

/// A small seeded generator (xorshift64*): the cases of a run are printed
/// with their seed, and `SHAMAL_TEST_SEED` replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const REGIONS: [&str; 4] = ["r1", "r2", "r3", "r4"];

/// Property: for random job regions and random worker regions, no shard is
/// ever taken by a worker outside the job's regions (each stored shard
/// names the worker and region that wrote it, checked against the
/// workers' own regions); a job is scored exactly when a worker serves one
/// of its regions (the default region for a job of any region), and
/// otherwise stays QUEUED saying why with none of its entries taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_shard_is_taken_outside_the_jobs_regions_random() {
    let Some((postgres, redis)) =
        required_services("no_shard_is_taken_outside_the_jobs_regions_random")
    else {
        return;
    };
    let seed = std::env::var("SHAMAL_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("residency: SHAMAL_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let input = dir.path().join("in.parquet");
    let rows = 300;
    write_parquet(&input, rows, 100);
    for round in 0..3 {
        // Workers: two, in random regions (perhaps the same one).
        let worker_regions: Vec<&str> = (0..2)
            .map(|_| REGIONS[rng.below(REGIONS.len() as u64) as usize])
            .collect();
        let default_region = REGIONS[rng.below(REGIONS.len() as u64) as usize];
        // Jobs: random subsets of the regions (empty: any region).
        let job_regions: Vec<Vec<&str>> = (0..5)
            .map(|_| {
                let mask = rng.below(16);
                REGIONS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, region)| *region)
                    .collect()
            })
            .collect();
        println!(
            "round {round}: workers in {worker_regions:?}, default region {default_region}, \
             jobs {job_regions:?}"
        );
        let db = TestDb::create(&postgres).await;
        let prefix = format!("shamal-test:batch-jobs:{}", unique());
        let queue = redis_queue(&redis, &prefix).await;
        let coordinator = start_coordinator(
            &db.url,
            QueueSource::Shared(queue.clone()),
            default_region,
            64,
        )
        .await;
        let mut client = batch_client(coordinator.grpc_address);
        let mut workers = Vec::new();
        for region in &worker_regions {
            workers.push(InProcessWorker::start(&repository, region, &redis, &prefix).await);
        }
        let region_of_port: HashMap<u16, String> = workers
            .iter()
            .map(|worker| (worker.address.port(), worker.region.clone()))
            .collect();
        let served: BTreeSet<&str> = worker_regions.iter().copied().collect();
        let mut jobs = Vec::new();
        for (index, regions) in job_regions.iter().enumerate() {
            let output = dir.path().join(format!("out-{round}-{index}"));
            let job = submit(&mut client, demo_spec(&input, &output, regions, 100)).await;
            // Where its shards may go: its regions, or the default one.
            let mut takers = regions.clone();
            takers.sort_unstable();
            if takers.is_empty() {
                takers.push(default_region);
            }
            jobs.push((job, regions.clone(), takers, output));
        }
        for (job, regions, takers, output) in &jobs {
            if takers.iter().any(|region| served.contains(region)) {
                let done = wait_succeeded(&mut client, &job.id).await;
                assert_eq!(done.done_rows, rows as u64);
                for shard in stored_shards(&db.url, &job.id).await {
                    let port: u16 = shard
                        .worker
                        .rsplit('-')
                        .next()
                        .and_then(|port| port.parse().ok())
                        .unwrap_or_else(|| panic!("worker {:?}", shard.worker));
                    let worker_region = &region_of_port[&port];
                    assert_eq!(&shard.region, worker_region, "{shard:?}");
                    assert!(
                        takers.contains(&worker_region.as_str()),
                        "job {} (regions {regions:?}) shard {} taken by {} in {worker_region}",
                        job.id,
                        shard.index,
                        shard.worker
                    );
                }
            } else {
                let waiting = wait_job(
                    &mut client,
                    &job.id,
                    Duration::from_secs(30),
                    "saying why it waits",
                    |job| job.message.starts_with("waiting:"),
                )
                .await;
                assert_eq!(waiting.state(), proto::JobState::Queued, "{waiting:?}");
                let list = takers.join(", ");
                let named = if takers.len() > 1 {
                    format!("no batch worker of regions [{list}]")
                } else {
                    format!("no batch worker of region [{list}]")
                };
                assert!(waiting.message.contains(&named), "{}", waiting.message);
                assert_eq!(waiting.shards_done, 0);
                for shard in stored_shards(&db.url, &job.id).await {
                    let id = JobId::parse(&shard.queue_id).unwrap();
                    assert_eq!(
                        queue.status(&id).await.unwrap(),
                        JobStatus::Queued,
                        "job {} (regions {regions:?}, workers in {worker_regions:?}) shard {}",
                        job.id,
                        shard.index
                    );
                }
                assert!(
                    !output.exists() || std::fs::read_dir(output).unwrap().next().is_none(),
                    "nothing written for a job nobody may take"
                );
            }
        }
        for worker in workers {
            worker.stop().await;
        }
        coordinator.stop().await.unwrap();
    }
    println!("residency test: {:?}", started.elapsed());
}

/// A job asking for encryption at rest, scored by a real worker holding a
/// key file: the output holds only encrypted parts (no plaintext Parquet
/// magic in them), the manifest records the key id, and the dataset
/// decrypted with the same key holds every row once, equal to ModelInfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_worker_writes_encrypted_parts_that_decrypt_to_the_online_scores() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some((postgres, redis)) =
        required_services("a_real_worker_writes_encrypted_parts_that_decrypt_to_the_online_scores")
    else {
        return;
    };
    let db = TestDb::create(&postgres).await;
    let prefix = format!("shamal-test:batch-jobs:{}", unique());
    let dir = tempfile::tempdir().unwrap();
    let repository = demo_repository(dir.path());
    let input = dir.path().join("in.parquet");
    let rows = 500;
    write_parquet(&input, rows, 100);
    let key_file = dir.path().join("batch-keys.toml");
    std::fs::write(
        &key_file,
        "active = \"k7\"\n[keys]\nk7 = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let queue = redis_queue(&redis, &prefix).await;
    let coordinator =
        start_coordinator(&db.url, QueueSource::Shared(queue.clone()), "eu", 64).await;
    let mut client = batch_client(coordinator.grpc_address);
    let worker =
        InProcessWorker::start_with_keys(&repository, "eu", &redis, &prefix, Some(&key_file)).await;
    let output = dir.path().join("out");
    let job = submit(
        &mut client,
        proto::JobSpec {
            encrypt: true,
            ..demo_spec(&input, &output, &["eu"], 100)
        },
    )
    .await;
    let done = wait_succeeded(&mut client, &job.id).await;
    assert_eq!(done.done_rows, rows as u64);
    let manifest = Manifest::verify(output.to_str().unwrap()).await.unwrap();
    let encryption = manifest
        .encryption
        .clone()
        .expect("the manifest records encryption");
    assert_eq!(encryption.key_ids, vec!["k7".to_owned()]);
    assert_eq!(manifest.parts.len(), 5);
    for part in &manifest.parts {
        assert!(part.name.ends_with(".parquet.enc"), "{}", part.name);
        let bytes = std::fs::read(output.join(&part.name)).unwrap();
        assert!(
            !bytes.windows(4).any(|window| window == b"PAR1"),
            "{} holds plaintext Parquet",
            part.name
        );
    }
    for entry in std::fs::read_dir(&output).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with("part-") || name.ends_with(".parquet.enc"),
            "a plaintext part beside the encrypted ones: {name}"
        );
    }
    let ring = shamal_batch_io::KeyRing::from_file(&key_file).unwrap();
    let plain = dir.path().join("plain");
    shamal_batch_io::decrypt_dataset(output.to_str().unwrap(), plain.to_str().unwrap(), &ring)
        .await
        .unwrap();
    assert_exactly_once(&plain, rows, 5, worker.address).await;
    worker.stop().await;
    coordinator.stop().await.unwrap();
}
