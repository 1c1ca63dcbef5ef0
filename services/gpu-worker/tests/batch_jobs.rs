#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Batch jobs scored by the gpu-worker's batch role (issue 17), end to end
//! through the real batch coordinator library, as `shamal up` runs them:
//! the coordinator (SQLite store) and a real gpu-worker (candle on the CPU,
//! the bundled text encoder `minilm_tiny_text`) share one in-process batch
//! queue (`[batch] queue = "memory"`), so no outside service is needed.
//!
//! - A dataset of sentences, as JSON Lines (column `text`, the input's own
//!   name; a job of any region, scored in the coordinator's default
//!   region) and as Parquet (a Utf8 column `sentence` mapped onto the input
//!   with `input_columns`; a job of the worker's region), in several
//!   shards: the job succeeds, its manifest verifies, every id is in the
//!   output exactly once, and each row's embedding equals what the same
//!   worker answers online (ModelInfer, the sentence alone) within the
//!   encoder's batched-vs-alone tolerance (`batch_tolerance` of
//!   `models/gpu/reference/minilm_tiny_text.json`, as `tests/bert.rs`);
//!   the sentences of that reference file also match its Python embeddings.
//! - A job whose text column is missing, or is not a string column, is
//!   refused at submit (INVALID_ARGUMENT) naming the column and the input,
//!   and writes nothing.
//!
//! The model's signature comes from the worker itself (its ModelMetadata,
//! through the coordinator's `InferenceMetadata`), so the column checks are
//! those a deployed coordinator makes against this worker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, Int64Array, StringArray};
use arrow::datatypes::{DataType as ArrowType, Field, Float32Type, Int64Type, Schema};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use shamal_async_queue::{JobQueue, MemoryQueue, QueueConfig};
use shamal_audit_client::Auditor;
use shamal_batch_coordinator::catalog::{InferenceMetadata, StaticCatalog};
use shamal_batch_coordinator::{Dependencies, QueueSource, RunningBatch};
use shamal_batch_io::Manifest;
use shamal_gpu_worker::{DevicePreference, GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::{ModelInferRequest, ModelMetadataRequest, ModelReadyRequest};
use shamal_proto::shamal::batch::v1 as proto;
use shamal_proto::shamal::batch::v1::batch_service_client::BatchServiceClient;
use shamal_proto::shamal::registry::v1::{ModelState, VersionState};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::node::MEMORY_QUEUE;
use shamal_worker::{NodeArgs, WorkerListeners};
use tonic::transport::Channel;

/// The bundled text encoder: input `text` (BYTES `[-1]`), output
/// `embedding` (FP32 `[-1, 32]`).
const MODEL: &str = "minilm_tiny_text";
const INPUT: &str = "text";
const OUTPUT: &str = "embedding";
const HIDDEN: usize = 32;
/// The worker's region, also the coordinator's default region (as
/// `local` is both in `shamal up`).
const REGION: &str = "eu-test";
const ROWS_PER_SHARD: u64 = 10;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A repository holding only the text encoder (its batch role then has one
/// stream to read).
fn text_repository(dir: &Path) -> PathBuf {
    let repository = dir.join("repository");
    std::fs::create_dir_all(&repository).unwrap();
    std::os::unix::fs::symlink(
        workspace_root()
            .join("models/gpu/repository")
            .join(MODEL)
            .canonicalize()
            .unwrap(),
        repository.join(MODEL),
    )
    .unwrap();
    repository
}

fn reference() -> serde_json::Value {
    let path = workspace_root().join(format!("models/gpu/reference/{MODEL}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The dataset: the reference file's sentences (whose Python embeddings
/// are known), then more of varied lengths, scripts and punctuation, one
/// longer than the model's 32 tokens. Row `id` is its index.
fn sentences() -> Vec<String> {
    let mut all: Vec<String> = serde_json::from_value(reference()["text"].clone()).unwrap();
    all.extend(
        [
            "The lazy dog sat on the mat.",
            "Quick brown foxes are fast; lazy dogs are slow.",
            "hello",
            "Is the GPU worker serving the model?",
            "Rust and candle embed text in batches.",
            "token token token",
            "A batch job scores a dataset in shards.",
            "42",
            "The 3 cats jumped over 7 mats in 2026.",
            "(brackets), 'quotes' and: colons!",
            "Shamal is a wind over the Gulf.",
            "x",
            "the worker was serving the sentence model and the batch was padded to the \
             longest sentence of the batch, which is this one, longer than thirty-two tokens",
            "Über straße, garçon, señor.",
            "東京 and 大阪 are cities",
            "emoji 🙂 in a sentence",
            "slow slow slow quick",
            "Did the dog jump? Yes, it jumped.",
            "model serve embed batch pad",
            "Tabs\tand  doubled  spaces",
            "on in of to and",
            "Sentence embeddings are normalised to unit length.",
            "mat cat sat",
            "An apostrophe's place",
            "zzz qqq jjj",
            "The text encoder reads one string per row.",
            "0 1 2 3 4 5 6 7 8 9",
            "world hello",
            "Jumping, jumped, jumps.",
            "the end",
        ]
        .map(str::to_owned),
    );
    all
}

/// `sentences` as JSON Lines: `{"id": i, "<column>": sentence}`.
fn write_jsonl(path: &Path, sentences: &[String], column: &str) {
    let mut text = String::new();
    for (id, sentence) in sentences.iter().enumerate() {
        text.push_str(&serde_json::json!({ "id": id, column: sentence }).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// `sentences` as Parquet (`id` Int64, `sentence` Utf8), in row groups of
/// `group` rows.
fn write_parquet(path: &Path, sentences: &[String], group: usize) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", ArrowType::Int64, false),
        Field::new("sentence", ArrowType::Utf8, false),
    ]));
    let ids = Int64Array::from_iter_values(0..sentences.len() as i64);
    let text = StringArray::from_iter_values(sentences);
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(text)]).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

// ----- the worker and the coordinator -----------------------------------

/// A gpu-worker (candle on the CPU) in this process, its batch role on the
/// shared in-process queue, as `shamal up` builds it.
struct InProcessWorker {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessWorker {
    async fn start(repository: &Path, queue: Arc<dyn JobQueue>) -> InProcessWorker {
        let mut args = GpuWorkerArgs {
            device: Some(DevicePreference::Cpu),
            instances: Some(1),
            node: NodeArgs {
                model_repository: Some(repository.to_owned()),
                region: Some(REGION.to_owned()),
                ..NodeArgs::default()
            },
            ..GpuWorkerArgs::default()
        };
        args.node.batch.batch_queue = Some(MEMORY_QUEUE.to_owned());
        let config = GpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.node.batch.queue.as_deref(), Some(MEMORY_QUEUE));
        let device = shamal_gpu_worker::device::select(config.device, config.cuda_device).unwrap();
        let worker = shamal_gpu_worker::build_on_with_batch_queue(
            &config,
            device,
            shamal_telemetry::MetricsRegistry::new(),
            Some(queue),
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
        let running = InProcessWorker {
            address,
            stop: Some(stop),
            serving: Some(serving),
        };
        running.wait_ready().await;
        running
    }

    fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect_lazy()
    }

    fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel())
    }

    /// Until the text encoder is ready (polled, with a deadline).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut client = self.client();
        loop {
            if let Ok(ready) = client
                .model_ready(ModelReadyRequest {
                    name: MODEL.to_owned(),
                    version: String::new(),
                })
                .await
                && ready.into_inner().ready
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the gpu-worker's {MODEL} was not ready within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.serving.take().unwrap().await.unwrap().unwrap();
    }
}

/// A gpu-worker and a coordinator on one in-process queue, the
/// coordinator's model signatures read from the worker.
struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    worker: InProcessWorker,
    coordinator: RunningBatch,
    client: BatchServiceClient<Channel>,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let repository = text_repository(dir.path());
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new(QueueConfig::default()).unwrap());
        let worker = InProcessWorker::start(&repository, queue.clone()).await;
        let dependencies = Dependencies {
            queue: QueueSource::Shared(queue),
            // The registry's view: version 1 of the encoder, ready.
            catalog: Arc::new(StaticCatalog::new([ModelState {
                name: MODEL.to_owned(),
                versions: vec![VersionState {
                    version: 1,
                    lifecycle: "ready".to_owned(),
                    ..Default::default()
                }],
                ..Default::default()
            }])),
            metadata: Arc::new(InferenceMetadata::new(worker.channel())),
            auditor: Auditor::disabled(),
        };
        let database = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("batch.db").display()
        );
        let coordinator = RunningBatch::start_local(&database, dependencies, |config| {
            config.poll_interval_ms = 50;
            config.default_region = REGION.to_owned();
            // Several model executions per shard, each padded to its
            // longest sentence.
            config.batch_size = 4;
        })
        .await
        .unwrap();
        let client = BatchServiceClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{}", coordinator.grpc_address))
                .unwrap()
                .connect_lazy(),
        );
        Setup {
            _dir: dir,
            data,
            worker,
            coordinator,
            client,
        }
    }

    async fn stop(self) {
        self.coordinator.stop().await.unwrap();
        self.worker.stop().await;
    }
}

fn spec(input: &Path, output: &Path) -> proto::JobSpec {
    proto::JobSpec {
        model: MODEL.to_owned(),
        input: input.display().to_string(),
        output: output.display().to_string(),
        key_columns: vec!["id".to_owned()],
        rows_per_shard: ROWS_PER_SHARD,
        ..Default::default()
    }
}

async fn try_submit(
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

/// Polls job `id` until it has SUCCEEDED (failing at once if it ends
/// otherwise, or after `timeout`).
async fn wait_succeeded(
    client: &mut BatchServiceClient<Channel>,
    id: &str,
    timeout: Duration,
) -> proto::Job {
    let deadline = Instant::now() + timeout;
    loop {
        let job = client
            .get_job(proto::GetJobRequest { id: id.to_owned() })
            .await
            .unwrap()
            .into_inner();
        match job.state() {
            proto::JobState::Succeeded => return job,
            proto::JobState::Failed | proto::JobState::Cancelled => {
                panic!("job {id} ended {:?}: {job:?}", job.state())
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not SUCCEEDED within {timeout:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----- online answers and the output -------------------------------------

/// The worker's online embedding of `sentence` alone (ModelInfer, one row).
async fn online(client: &mut GrpcInferenceServiceClient<Channel>, sentence: &str) -> Vec<f32> {
    let tensor = Tensor {
        name: INPUT.to_owned(),
        datatype: DataType::Bytes,
        shape: vec![1],
        data: TensorData::Strings(vec![Bytes::copy_from_slice(sentence.as_bytes())]),
    };
    let (inputs, raw_input_contents) = encode_inputs(&[tensor]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: MODEL.to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("ModelInfer of {sentence:?}: {status}"))
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    assert_eq!(outputs[0].name, OUTPUT);
    assert_eq!(outputs[0].shape, vec![1, HIDDEN as i64]);
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("fixed-size output expected")
    };
    bytemuck::pod_collect_to_vec(bytes)
}

/// Every row of the parts the manifest of `dir` lists, after checking the
/// manifest (`Manifest::verify`: sizes, SHA-256, `_SUCCESS`, no unlisted
/// part): `(id, embedding)`, and the manifest.
async fn read_output(dir: &Path) -> (Vec<(i64, Vec<f32>)>, Manifest) {
    let manifest = Manifest::verify(dir.to_str().unwrap()).await.unwrap();
    assert_eq!(manifest.model, MODEL);
    assert_eq!(manifest.model_version, "1");
    let mut rows = Vec::new();
    for part in &manifest.parts {
        let file = std::fs::File::open(dir.join(&part.name)).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut part_rows = 0;
        for batch in reader {
            let batch = batch.unwrap();
            let names: Vec<&str> = batch
                .schema_ref()
                .fields()
                .iter()
                .map(|field| field.name().as_str())
                .collect();
            assert_eq!(
                names,
                ["id", OUTPUT],
                "{}: key column, then output",
                part.name
            );
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let embeddings = batch.column(1).as_fixed_size_list();
            assert_eq!(embeddings.value_length(), HIDDEN as i32, "{}", part.name);
            for row in 0..batch.num_rows() {
                let values = embeddings.value(row);
                rows.push((
                    ids.value(row),
                    values.as_primitive::<Float32Type>().values().to_vec(),
                ));
            }
            part_rows += batch.num_rows() as u64;
        }
        assert_eq!(
            part_rows, part.rows,
            "{}: rows as the manifest says",
            part.name
        );
    }
    (rows, manifest)
}

/// `|a - b| <= abs + rel·|b|` element-wise.
fn assert_close(actual: &[f32], expected: &[f64], abs: f64, rel: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let error = (f64::from(a) - e).abs();
        assert!(
            error <= abs + rel * e.abs(),
            "{what}[{index}]: {a} vs {e} (error {error:e})"
        );
    }
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

/// The output of a job over [`sentences`] holds every id exactly once,
/// each the online embedding of its sentence (and, for the reference
/// sentences, the Python reference's).
fn assert_scored_as_online(
    rows: Vec<(i64, Vec<f32>)>,
    alone: &[Vec<f32>],
    reference: &serde_json::Value,
    what: &str,
) {
    let sentences = sentences();
    let batch_tolerance = reference["batch_tolerance"].as_f64().unwrap();
    let (abs, rel) = (
        reference["tolerance"]["abs"].as_f64().unwrap(),
        reference["tolerance"]["rel"].as_f64().unwrap(),
    );
    let expected: Vec<Vec<f64>> = serde_json::from_value(reference["embedding"].clone()).unwrap();
    let mut by_id: BTreeMap<i64, Vec<f32>> = BTreeMap::new();
    for (id, embedding) in rows {
        assert!(
            by_id.insert(id, embedding).is_none(),
            "{what}: id {id} twice in the output"
        );
    }
    assert_eq!(
        by_id.keys().copied().collect::<Vec<_>>(),
        (0..sentences.len() as i64).collect::<Vec<_>>(),
        "{what}: every id exactly once"
    );
    for (id, embedding) in &by_id {
        let index = *id as usize;
        let sentence = &sentences[index];
        assert_close(
            embedding,
            &widen(&alone[index]),
            batch_tolerance,
            0.0,
            &format!("{what}: id {id} {sentence:?}, batch vs online"),
        );
        if let Some(python) = expected.get(index) {
            assert_close(
                embedding,
                python,
                abs,
                rel,
                &format!("{what}: id {id} {sentence:?}, batch vs the Python reference"),
            );
        }
    }
}

// ----- the tests ----------------------------------------------------------

/// A dataset of sentences in JSON Lines and in Parquet, each a job of
/// several shards scored by the gpu-worker's batch role: every id once,
/// each row the embedding the worker answers online for its sentence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentence_datasets_are_scored_by_the_batch_role_as_online() {
    let started = Instant::now();
    let mut setup = Setup::start().await;
    let sentences = sentences();
    let reference = reference();

    // The worker advertises what the column mapping reads: one string per
    // row in, one vector of HIDDEN per row out.
    let metadata = setup
        .worker
        .client()
        .model_metadata(ModelMetadataRequest {
            name: MODEL.to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let inputs: Vec<(&str, &str, &[i64])> = metadata
        .inputs
        .iter()
        .map(|input| {
            (
                input.name.as_str(),
                input.datatype.as_str(),
                &input.shape[..],
            )
        })
        .collect();
    assert_eq!(inputs, [(INPUT, "BYTES", &[-1_i64][..])]);
    assert_eq!(metadata.outputs.len(), 1);
    assert_eq!(metadata.outputs[0].name, OUTPUT);
    assert_eq!(metadata.outputs[0].shape, vec![-1, HIDDEN as i64]);

    // The oracle: each sentence alone, online. Distinct sentences have
    // distinct embeddings, so a row under another row's id would show.
    let mut inference = setup.worker.client();
    let mut alone = Vec::new();
    for sentence in &sentences {
        alone.push(online(&mut inference, sentence).await);
    }
    for (i, a) in alone.iter().enumerate() {
        for (j, b) in alone.iter().enumerate().skip(i + 1) {
            let distance = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0_f32, f32::max);
            assert!(
                distance > 1e-3,
                "{:?} and {:?} embed alike ({distance:e})",
                sentences[i],
                sentences[j]
            );
        }
    }

    // JSON Lines, the column named like the input, a job of any region:
    // the coordinator's default region, the worker's.
    let jsonl = setup.data.join("sentences.jsonl");
    write_jsonl(&jsonl, &sentences, INPUT);
    let jsonl_out = setup.data.join("out-jsonl");
    let jsonl_job = try_submit(&mut setup.client, spec(&jsonl, &jsonl_out))
        .await
        .unwrap();
    // Parquet, a Utf8 column `sentence` mapped onto the input, row groups
    // of ROWS_PER_SHARD: exactly one shard per group; a job of the
    // worker's region.
    let parquet = setup.data.join("sentences.parquet");
    write_parquet(&parquet, &sentences, ROWS_PER_SHARD as usize);
    let parquet_out = setup.data.join("out-parquet");
    let parquet_job = try_submit(
        &mut setup.client,
        proto::JobSpec {
            input_columns: [(INPUT.to_owned(), "sentence".to_owned())]
                .into_iter()
                .collect(),
            regions: vec![REGION.to_owned()],
            ..spec(&parquet, &parquet_out)
        },
    )
    .await
    .unwrap();
    let groups = sentences.len().div_ceil(ROWS_PER_SHARD as usize) as u32;
    assert_eq!(parquet_job.shards_total, groups, "{parquet_job:?}");
    assert!(jsonl_job.shards_total >= 2, "{jsonl_job:?}");

    for (job, output, format) in [
        (&jsonl_job, &jsonl_out, "jsonl"),
        (&parquet_job, &parquet_out, "parquet"),
    ] {
        let done = wait_succeeded(&mut setup.client, &job.id, Duration::from_secs(120)).await;
        assert_eq!(done.done_rows, sentences.len() as u64, "{format}: {done:?}");
        assert_eq!(done.shards_done, done.shards_total, "{format}: {done:?}");
        assert_eq!(
            done.manifest,
            output.join("_manifest.json").display().to_string(),
            "{format}"
        );
        let (rows, manifest) = read_output(output).await;
        assert_eq!(manifest.total_rows, sentences.len() as u64, "{format}");
        let expected_parts: Vec<String> = (0..done.shards_total)
            .map(|index| format!("part-{index:06}.parquet"))
            .collect();
        let listed: Vec<String> = manifest.parts.iter().map(|p| p.name.clone()).collect();
        assert_eq!(listed, expected_parts, "{format}: one part per shard");
        assert!(
            manifest.parts.iter().all(|part| part.rows > 0),
            "{format}: a part of no rows: {manifest:?}"
        );
        assert_scored_as_online(rows, &alone, &reference, format);
        println!(
            "{format}: {} rows in {} shards",
            done.done_rows, done.shards_total
        );
    }
    setup.stop().await;
    println!("batch role test: {:?}", started.elapsed());
}

/// A text column that is missing, or not a string column, is refused at
/// submit naming the column and the model input; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_non_string_text_column_is_refused_at_submit() {
    let mut setup = Setup::start().await;
    let sentences = sentences();
    // The column under another name.
    let renamed = setup.data.join("renamed.jsonl");
    write_jsonl(&renamed, &sentences, "sentence");
    // Numbers where the text should be.
    let numbers = setup.data.join("numbers.jsonl");
    std::fs::write(
        &numbers,
        (0..20)
            .map(|id| format!("{{\"id\": {id}, \"text\": {}}}\n", id * 7))
            .collect::<String>(),
    )
    .unwrap();
    // A Parquet file whose mapped column is the Int64 key.
    let parquet = setup.data.join("sentences.parquet");
    write_parquet(&parquet, &sentences, ROWS_PER_SHARD as usize);

    let output = setup.data.join("out");
    // With `input_columns` the message names the mapped column and the
    // input it feeds.
    let cases: [(proto::JobSpec, &[&str]); 4] = [
        (
            spec(&renamed, &output),
            &["spec.input: column 'text' (needed for input 'text') not found in"],
        ),
        (
            spec(&numbers, &output),
            &[
                "spec.input: column 'text': expected a string column for BYTES input 'text', \
               found Int64",
            ],
        ),
        (
            proto::JobSpec {
                input_columns: [(INPUT.to_owned(), "id".to_owned())].into_iter().collect(),
                ..spec(&parquet, &output)
            },
            &[
                "spec.input: column 'id': expected a string column for BYTES input 'text', \
               found Int64",
            ],
        ),
        (
            proto::JobSpec {
                input_columns: [(INPUT.to_owned(), "nosuch".to_owned())]
                    .into_iter()
                    .collect(),
                ..spec(&parquet, &output)
            },
            &["spec.input: column 'nosuch' (needed for input 'text') not found in"],
        ),
    ];
    for (spec, says) in cases {
        let input = spec.input.clone();
        let status = match try_submit(&mut setup.client, spec).await {
            Ok(job) => panic!("a job over {input} was accepted: {job:?}"),
            Err(status) => status,
        };
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{input}: {status:?}"
        );
        for part in says {
            assert!(
                status.message().contains(part),
                "{input}: {:?} does not say {part:?}",
                status.message()
            );
        }
        assert!(
            !output.exists() || std::fs::read_dir(&output).unwrap().next().is_none(),
            "{input}: a refused job wrote output"
        );
    }
    // No job was created by the refusals.
    let jobs = setup
        .client
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{jobs:?}");
    setup.stop().await;
}
