#![allow(clippy::unwrap_used)]
//! The gpu-worker end to end: a repository of candle models served over the
//! KServe v2 gRPC protocol, with dynamic batching.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use shamal_gpu_worker::{DevicePreference, GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::model_config::SchedulingChoice;
use shamal_proto::inference::model_instance_group::Kind;
use shamal_proto::inference::{
    ModelConfigRequest, ModelInferRequest, ModelStatisticsRequest, ServerMetadataRequest,
    ServerReadyRequest,
};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::WorkerListeners;
use tokio::net::TcpListener;
use tonic::transport::Channel;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn reference(model: &str) -> (Vec<Vec<f32>>, Vec<Vec<f64>>) {
    let path = workspace_root().join(format!("models/gpu/reference/{model}.json"));
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows = |key: &str| -> Vec<Vec<f64>> { serde_json::from_value(value[key].clone()).unwrap() };
    let input = rows("input")
        .into_iter()
        .map(|row| row.into_iter().map(|v| v as f32).collect())
        .collect();
    (input, rows("output"))
}

async fn infer(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    input_name: &str,
    rows: &[Vec<f32>],
) -> Vec<f32> {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    let tensor = Tensor {
        name: input_name.to_owned(),
        datatype: DataType::Fp32,
        shape: vec![rows.len() as i64, rows[0].len() as i64],
        data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&values))),
    };
    let (inputs, raw_input_contents) = encode_inputs(&[tensor]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: model.to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("not fixed-size data")
    };
    bytemuck::pod_collect_to_vec(bytes)
}

fn assert_close(actual: &[f32], expected: &[f64], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (&a, &e) in actual.iter().zip(expected) {
        assert!(
            (f64::from(a) - e).abs() <= 1e-5 + 1e-4 * e.abs(),
            "{what}: {a} vs {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_candle_models_over_grpc_with_dynamic_batching() {
    // The committed repository, with mlp_regressor's batching delay raised
    // so that concurrent requests surely meet in one batch.
    let dir = tempfile::tempdir().unwrap();
    let repository = dir.path().join("repository");
    copy_dir(&workspace_root().join("models/gpu/repository"), &repository);
    std::fs::write(
        repository.join("mlp_regressor/config.pbtxt"),
        "name: \"mlp_regressor\"\nbackend: \"candle\"\nmax_batch_size: 8\n\
         dynamic_batching { max_queue_delay_microseconds: 2000000 preferred_batch_size: [ 6 ] }\n",
    )
    .unwrap();
    let config = GpuWorkerConfig::load(&GpuWorkerArgs {
        device: Some(DevicePreference::Auto),
        node: shamal_worker::NodeArgs {
            model_repository: Some(repository),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let metrics = shamal_telemetry::MetricsRegistry::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(shamal_gpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut ready = false;
    for _ in 0..200 {
        ready = client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready;
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "worker never became ready");

    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.name, "shamal-gpu-worker");
    // The device the worker chose, as SemVer build metadata of its version
    // (`0.1.0+cpu`, `0.1.0+cuda.0`): the label the metric carries.
    let device = device_label(&metrics);
    assert_eq!(
        metadata.version,
        format!("{}+{}", env!("CARGO_PKG_VERSION"), device.replace(':', "."))
    );

    // ModelConfig: candle, batching derived from the graph (no config.pbtxt).
    let config = client
        .model_config(ModelConfigRequest {
            name: "mlp_demo".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.platform, "candle");
    assert_eq!(config.backend, "candle");
    assert_eq!(config.max_batch_size, 32);
    assert!(matches!(
        config.scheduling_choice,
        Some(SchedulingChoice::DynamicBatching(_))
    ));
    assert_eq!(config.input[0].name, "INPUT0");
    assert_eq!(config.input[0].dims, vec![16]);
    assert_eq!(config.output[0].dims, vec![4]);

    // ModelInfer against the numpy reference, whole batch and one row.
    let (input, output) = reference("mlp_demo");
    let batched = infer(&mut client, "mlp_demo", "INPUT0", &input).await;
    let expected: Vec<f64> = output.iter().flatten().copied().collect();
    assert_close(&batched, &expected, "mlp_demo batch");
    let single = infer(&mut client, "mlp_demo", "INPUT0", &input[2..3]).await;
    assert_close(&single, &output[2], "mlp_demo row 2");

    // Six concurrent single-row requests form one batch of six; each answer
    // is its own row of the reference.
    let (input, output) = reference("mlp_regressor");
    let requests = input.iter().map(|row| {
        let mut client = client.clone();
        let row = row.clone();
        async move { infer(&mut client, "mlp_regressor", "features", &[row]).await }
    });
    let answers = futures_join_all(requests).await;
    for (row, answer) in answers.iter().enumerate() {
        assert_close(answer, &output[row], &format!("mlp_regressor row {row}"));
    }
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: "mlp_regressor".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let stats = &stats.model_stats[0];
    assert_eq!(stats.inference_count, 6, "warm-up is not counted");
    assert!(
        stats.execution_count < stats.inference_count,
        "requests were batched: {} executions for {} inferences",
        stats.execution_count,
        stats.inference_count
    );

    // ModelConfig reports the same device.
    let group = &config.instance_group[0];
    if device == "cpu" {
        assert_eq!(group.kind, Kind::Cpu as i32);
        assert!(group.gpus.is_empty());
    } else {
        assert_eq!(group.kind, Kind::Gpu as i32);
        assert_eq!(
            format!("cuda:{}", group.gpus[0]),
            device,
            "{:?}",
            config.instance_group
        );
    }

    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
}

/// The device label of `shamal_gpu_worker_device_info{device="..."} 1`.
fn device_label(metrics: &shamal_telemetry::MetricsRegistry) -> String {
    let mut text = Vec::new();
    shamal_telemetry::Encoder::encode(
        &shamal_telemetry::TextEncoder::new(),
        &metrics.gather(),
        &mut text,
    )
    .unwrap();
    let text = String::from_utf8(text).unwrap();
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("shamal_gpu_worker_device_info{device=\""))
        .filter_map(|rest| rest.strip_suffix("\"} 1"))
        .collect();
    let [label] = labels.as_slice() else {
        panic!("one device_info sample expected: {text}")
    };
    assert!(
        *label == "cpu" || label.starts_with("cuda:"),
        "device {label}"
    );
    (*label).to_owned()
}

/// Log output captured in memory.
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;

    fn make_writer(&'a self) -> CapturedLog {
        self.clone()
    }
}

#[test]
fn the_device_is_logged_at_start_up_and_per_model_instance() {
    use shamal_worker::{InstanceOptions, Runtime};

    let config = GpuWorkerConfig::load(&GpuWorkerArgs {
        device: Some(DevicePreference::Cpu),
        node: shamal_worker::NodeArgs {
            model_repository: Some(workspace_root().join("models/gpu/repository")),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let log = CapturedLog::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let (_, device) =
            shamal_gpu_worker::build_with_device(&config, shamal_telemetry::MetricsRegistry::new())
                .unwrap();
        assert_eq!(device, "cpu");
        shamal_gpu_worker::CandleRuntime::new(candle_core::Device::Cpu)
            .instantiate(
                &workspace_root().join("models/gpu/repository/mlp_demo/1/model.json"),
                &InstanceOptions::default(),
            )
            .unwrap();
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let line = |message: &str| {
        text.lines()
            .find(|line| line.contains(message))
            .unwrap_or_else(|| panic!("no '{message}' line in {text}"))
            .to_owned()
    };
    assert!(
        line("gpu-worker compute device selected").contains("device=cpu"),
        "{text}"
    );
    assert!(
        line("candle model instance created").contains("device=cpu"),
        "{text}"
    );
}

/// Awaits every future concurrently (tokio tasks, no extra dependency).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

/// A worker serving `repository` on an ephemeral port: its client, metrics
/// registry, stop switch and task.
async fn start_worker(
    repository: PathBuf,
) -> (
    GrpcInferenceServiceClient<Channel>,
    shamal_telemetry::MetricsRegistry,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let config = GpuWorkerConfig::load(&GpuWorkerArgs {
        device: Some(DevicePreference::Auto),
        node: shamal_worker::NodeArgs {
            model_repository: Some(repository),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let metrics = shamal_telemetry::MetricsRegistry::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(shamal_gpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    for _ in 0..400 {
        if client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
        {
            return (client, metrics, stop, worker);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker never became ready");
}

async fn infer_tensors(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    tensors: Vec<Tensor>,
) -> Result<Vec<f32>, tonic::Status> {
    let (inputs, raw_input_contents) = encode_inputs(&tensors);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: model.to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await?
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    assert_eq!(outputs[0].name, "embedding");
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("not fixed-size data")
    };
    Ok(bytemuck::pod_collect_to_vec(bytes))
}

fn int64_tensor(name: &str, datatype: DataType, rows: &[Vec<i64>]) -> Tensor {
    let values: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|&value| match datatype {
            DataType::Int32 => (value as i32).to_le_bytes().to_vec(),
            _ => value.to_le_bytes().to_vec(),
        })
        .collect();
    Tensor {
        name: name.to_owned(),
        datatype,
        shape: vec![rows.len() as i64, rows[0].len() as i64],
        data: TensorData::Fixed(Bytes::from(values)),
    }
}

fn text_tensor(items: &[&str]) -> Tensor {
    Tensor {
        name: "text".to_owned(),
        datatype: DataType::Bytes,
        shape: vec![items.len() as i64],
        data: TensorData::Strings(
            items
                .iter()
                .map(|item| Bytes::copy_from_slice(item.as_bytes()))
                .collect(),
        ),
    }
}

fn reference_json(model: &str) -> serde_json::Value {
    let path = workspace_root().join(format!("models/gpu/reference/{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn statistics(client: &mut GrpcInferenceServiceClient<Channel>, model: &str) -> (u64, u64) {
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: model.to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let stats = &stats.model_stats[0];
    (stats.inference_count, stats.execution_count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_sentence_encoder_over_grpc_with_mixed_length_batches() {
    use shamal_proto::inference::ModelMetadataRequest;

    let dir = tempfile::tempdir().unwrap();
    let repository = dir.path().join("repository");
    copy_dir(&workspace_root().join("models/gpu/repository"), &repository);
    for (model, preferred) in [("minilm_tiny", 6), ("minilm_tiny_text", 10)] {
        std::fs::write(
            repository.join(format!("{model}/config.pbtxt")),
            format!(
                "max_batch_size: 16\n\
                 dynamic_batching {{ max_queue_delay_microseconds: 2000000 \
                 preferred_batch_size: [ {preferred} ] }}\n"
            ),
        )
        .unwrap();
    }
    let (mut client, metrics, stop, worker) = start_worker(repository).await;

    // The device, as metrics report it, is the one ModelConfig reports.
    let mut text = Vec::new();
    shamal_telemetry::Encoder::encode(
        &shamal_telemetry::TextEncoder::new(),
        &metrics.gather(),
        &mut text,
    )
    .unwrap();
    let on_cpu = String::from_utf8(text)
        .unwrap()
        .contains("shamal_gpu_worker_device_info{device=\"cpu\"} 1");
    let config = client
        .model_config(ModelConfigRequest {
            name: "minilm_tiny".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.backend, "candle");
    assert_eq!(config.platform, "candle");
    let group = &config.instance_group[0];
    if on_cpu {
        assert_eq!(group.kind, Kind::Cpu as i32);
        assert!(group.gpus.is_empty());
    } else {
        assert_eq!(group.kind, Kind::Gpu as i32);
        assert_eq!(group.gpus.len(), 1);
    }
    let inputs: Vec<(&str, Vec<i64>)> = config
        .input
        .iter()
        .map(|input| (input.name.as_str(), input.dims.clone()))
        .collect();
    assert_eq!(
        inputs,
        vec![("input_ids", vec![-1]), ("attention_mask", vec![-1])]
    );
    assert_eq!(config.output[0].dims, vec![32]);

    // A model with a tokenizer advertises text.
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "minilm_tiny_text".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.inputs.len(), 1);
    assert_eq!(metadata.inputs[0].name, "text");
    assert_eq!(metadata.inputs[0].datatype, "BYTES");
    assert_eq!(metadata.inputs[0].shape, vec![-1]);
    assert_eq!(metadata.outputs[0].shape, vec![-1, 32]);

    // Ten concurrent sentences, one per request: one batch, each answer its
    // own reference row.
    let reference = reference_json("minilm_tiny_text");
    let sentences: Vec<String> = serde_json::from_value(reference["text"].clone()).unwrap();
    let expected: Vec<Vec<f64>> = serde_json::from_value(reference["embedding"].clone()).unwrap();
    let requests = sentences.iter().map(|sentence| {
        let mut client = client.clone();
        let tensor = text_tensor(&[sentence.as_str()]);
        async move {
            infer_tensors(&mut client, "minilm_tiny_text", vec![tensor])
                .await
                .unwrap()
        }
    });
    let answers = futures_join_all(requests).await;
    for (row, answer) in answers.iter().enumerate() {
        assert_close(answer, &expected[row], &format!("{:?}", sentences[row]));
    }
    let (inferences, executions) = statistics(&mut client, "minilm_tiny_text").await;
    assert_eq!(inferences, sentences.len() as u64);
    assert!(executions < inferences, "{executions} for {inferences}");

    // Six concurrent token-id requests of 3 to 32 tokens: batched, padded.
    let reference = reference_json("minilm_tiny");
    let ids: Vec<Vec<i64>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(reference["attention_mask"].clone()).unwrap();
    let expected: Vec<Vec<f64>> = serde_json::from_value(reference["embedding"].clone()).unwrap();
    let requests = ids.iter().zip(&mask).map(|(ids, mask)| {
        let mut client = client.clone();
        let tensors = vec![
            int64_tensor("input_ids", DataType::Int64, std::slice::from_ref(ids)),
            int64_tensor(
                "attention_mask",
                DataType::Int64,
                std::slice::from_ref(mask),
            ),
        ];
        async move {
            infer_tensors(&mut client, "minilm_tiny", tensors)
                .await
                .unwrap()
        }
    });
    let answers = futures_join_all(requests).await;
    for (row, answer) in answers.iter().enumerate() {
        assert_close(answer, &expected[row], &format!("ids row {row}"));
    }
    let (inferences, executions) = statistics(&mut client, "minilm_tiny").await;
    assert_eq!(inferences, ids.len() as u64);
    assert!(executions < inferences, "{executions} for {inferences}");

    // Bad requests: INVALID_ARGUMENT naming the input, sent together so
    // that they share the batching delay.
    let int64 = |name: &str, rows: &[Vec<i64>]| int64_tensor(name, DataType::Int64, rows);
    let cases: Vec<(&str, Vec<Tensor>, &str)> = vec![
        (
            "minilm_tiny",
            vec![
                int64_tensor("input_ids", DataType::Int32, &[vec![2, 7, 3]]),
                int64("attention_mask", &[vec![1, 1, 1]]),
            ],
            "input 'input_ids': datatype INT32",
        ),
        (
            "minilm_tiny",
            vec![
                int64("input_ids", &[vec![2, 160, 3]]),
                int64("attention_mask", &[vec![1, 1, 1]]),
            ],
            "input 'input_ids': token id 160",
        ),
        (
            "minilm_tiny",
            vec![
                int64("input_ids", &[vec![2, 7, 3]]),
                int64("attention_mask", &[vec![1, 1, 1, 1]]),
            ],
            "input 'attention_mask' has shape [1, 4]",
        ),
        (
            "minilm_tiny_text",
            vec![text_tensor(&[""])],
            "input 'text': element 0 is empty",
        ),
        (
            "minilm_tiny_text",
            vec![text_tensor(&[])],
            "input 'text': batch dimension must be at least 1",
        ),
    ];
    let calls = cases.into_iter().map(|(model, tensors, expected)| {
        let mut client = client.clone();
        async move {
            let status = infer_tensors(&mut client, model, tensors)
                .await
                .unwrap_err();
            (status, expected)
        }
    });
    for (status, expected) in futures_join_all(calls).await {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{expected}: {status:?}"
        );
    }

    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
}
