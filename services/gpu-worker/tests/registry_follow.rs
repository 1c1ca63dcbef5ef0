//! A gpu-worker following the real registry (`shamal-registry`, SQLite in a
//! temporary directory, on loopback) loads the safetensors versions pushed
//! to it (the spec, and a text encoder's tokenizer, embedded in the file's
//! header metadata), reports them ready with their signatures, answers
//! inference with the numpy reference outputs, follows a version pushed
//! while it runs and one archived, leaves ONNX versions to the cpu-workers
//! and reports a broken artifact failed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shamal_gpu_worker::{DevicePreference, GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::{ModelInferRequest, ModelReadyRequest, ServerReadyRequest};
use shamal_registry::model::{Lifecycle, MemberState, NewVersion};
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::WorkerListeners;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const WORKER: &str = "gpu-1";

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn artifact(model: &str) -> Vec<u8> {
    std::fs::read(
        workspace_root().join(format!("models/gpu/repository/{model}/1/model.safetensors")),
    )
    .unwrap()
}

fn reference(model: &str) -> serde_json::Value {
    let path = workspace_root().join(format!("models/gpu/reference/{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

// --------------------------------------------------------------- registry

async fn start_registry(dir: &Path) -> (RunningRegistry, SocketAddr) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let config = RegistryConfig {
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: address,
        metrics_listen: None,
        database_url: format!("sqlite://{}", dir.join("registry.db").display()),
        artifact_dir: dir.join("artifacts"),
        ..RegistryConfig::default()
    };
    let listeners = RegistryListeners {
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        grpc,
        metrics: None,
    };
    let running =
        RunningRegistry::start(config, listeners, shamal_telemetry::MetricsRegistry::new())
            .await
            .unwrap();
    (running, address)
}

/// Uploads `bytes` and registers them as the next version of `model`.
async fn push(registry: &ModelRegistry, model: &str, format: &str, bytes: &[u8]) -> u64 {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let body = futures::stream::iter(vec![Ok(Bytes::copy_from_slice(bytes))]).boxed();
    registry.put_artifact(&sha256, body).await.unwrap();
    registry
        .register_version(
            model,
            NewVersion {
                sha256,
                format: format.to_owned(),
                ..NewVersion::default()
            },
            "tester",
        )
        .await
        .unwrap()
        .version
}

/// This worker's placement state of a version.
async fn placement(registry: &ModelRegistry, model: &str, version: u64) -> Option<String> {
    registry
        .list_placements(model)
        .await
        .unwrap()
        .into_iter()
        .find(|placement| placement.worker_id == WORKER && placement.version == version)
        .map(|placement| placement.state)
}

/// Polls an async condition until it holds, for at most 30 s.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ worker

async fn infer(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    version: u64,
    input: Tensor,
) -> Result<Tensor, tonic::Status> {
    let (inputs, raw_input_contents) = encode_inputs(&[input]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: model.to_owned(),
            model_version: version.to_string(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    assert_eq!(outputs.len(), 1);
    Ok(outputs.remove(0))
}

fn values(tensor: &Tensor) -> Vec<f32> {
    let TensorData::Fixed(bytes) = &tensor.data else {
        panic!("not fixed-size data")
    };
    bytemuck::pod_collect_to_vec(bytes)
}

/// The MLP reference's input as an FP32 tensor named `name`.
fn mlp_input(reference: &serde_json::Value, name: &str) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(reference["input"].clone()).unwrap();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor {
        name: name.to_owned(),
        datatype: DataType::Fp32,
        shape: vec![rows.len() as i64, rows[0].len() as i64],
        data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&flat))),
    }
}

fn assert_close(actual: &[f32], expected: &serde_json::Value, what: &str) {
    let expected: Vec<Vec<f64>> = serde_json::from_value(expected.clone()).unwrap();
    let expected: Vec<f64> = expected.into_iter().flatten().collect();
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (&a, &e) in actual.iter().zip(&expected) {
        assert!(
            (f64::from(a) - e).abs() <= 1e-5 + 1e-4 * e.abs(),
            "{what}: {a} vs {e}"
        );
    }
}

async fn model_ready(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    version: u64,
) -> bool {
    client
        .model_ready(ModelReadyRequest {
            name: model.to_owned(),
            version: version.to_string(),
        })
        .await
        .is_ok_and(|response| response.into_inner().ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_safetensors_versions_the_registry_assigns() {
    let dir = tempfile::tempdir().unwrap();
    let (running, registry_address) = start_registry(dir.path()).await;
    let registry = running.registry.clone();

    // Single-file artifacts: spec (and tokenizer) in the header metadata.
    assert_eq!(
        push(&registry, "mlp", "safetensors", &artifact("mlp_demo")).await,
        1
    );
    assert_eq!(
        push(
            &registry,
            "encoder",
            "safetensors",
            &artifact("minilm_tiny_text")
        )
        .await,
        1
    );
    // Half a file: its header promises more than it holds.
    let whole = artifact("mlp_regressor");
    assert_eq!(
        push(
            &registry,
            "broken",
            "safetensors",
            &whole[..whole.len() / 2]
        )
        .await,
        1
    );
    // An ONNX version is for the cpu-workers: no placement on this one.
    let onnx =
        std::fs::read(workspace_root().join("models/repository/simple/1/model.onnx")).unwrap();
    assert_eq!(push(&registry, "simple", "onnx", &onnx).await, 1);

    let cache = dir.path().join("cache");
    let config = GpuWorkerConfig::load(&GpuWorkerArgs {
        device: Some(DevicePreference::Cpu),
        node: shamal_worker::NodeArgs {
            registry: Some(registry_address.to_string()),
            worker_id: Some(WORKER.to_owned()),
            artifact_cache: Some(cache.clone()),
            drain_grace_ms: Some(0),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        config.node.model_repository, None,
        "the registry's models only"
    );
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(shamal_gpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        shamal_telemetry::MetricsRegistry::new(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    wait_until("worker ready", async || {
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    })
    .await;

    // Registered as a safetensors worker on its device.
    let workers = registry.list_workers().await.unwrap();
    let me = workers.iter().find(|worker| worker.id == WORKER).unwrap();
    assert_eq!(me.address, address.to_string());
    assert_eq!(me.formats, ["safetensors"]);
    assert_eq!(me.device, "cpu");
    assert_eq!(me.state, MemberState::Serving);

    wait_until("placements reported", async || {
        placement(&registry, "mlp", 1).await.as_deref() == Some("ready")
            && placement(&registry, "encoder", 1).await.as_deref() == Some("ready")
            && placement(&registry, "broken", 1).await.as_deref() == Some("failed")
    })
    .await;
    assert_eq!(
        placement(&registry, "simple", 1).await,
        None,
        "not its format"
    );

    // Ready, with the signatures the worker read from the artifacts.
    let mlp = registry.get_version("mlp", 1).await.unwrap();
    assert_eq!(mlp.lifecycle, Lifecycle::Ready, "{mlp:?}");
    let signature = mlp.signature.unwrap();
    assert_eq!(signature["inputs"][0]["name"], "INPUT0", "{signature}");
    assert_eq!(signature["inputs"][0]["datatype"], "FP32", "{signature}");
    assert_eq!(
        signature["outputs"][0]["dims"],
        serde_json::json!([-1, 4]),
        "{signature}"
    );
    let encoder = registry.get_version("encoder", 1).await.unwrap();
    assert_eq!(encoder.lifecycle, Lifecycle::Ready, "{encoder:?}");
    let signature = encoder.signature.unwrap();
    assert_eq!(signature["inputs"][0]["name"], "text", "{signature}");
    assert_eq!(signature["inputs"][0]["datatype"], "BYTES", "{signature}");
    assert_eq!(signature["outputs"][0]["name"], "embedding", "{signature}");
    assert_eq!(
        signature["outputs"][0]["dims"],
        serde_json::json!([-1, 32]),
        "{signature}"
    );
    let broken = registry.get_version("broken", 1).await.unwrap();
    assert_eq!(broken.lifecycle, Lifecycle::Failed, "{broken:?}");
    assert!(!broken.reason.is_empty());
    assert!(broken.signature.is_none());
    assert!(
        cache
            .join(format!("{}.safetensors", mlp.artifact.sha256))
            .is_file()
    );

    // The right answers: the numpy references of the committed fixtures.
    let mlp_reference = reference("mlp_demo");
    let output = infer(&mut client, "mlp", 1, mlp_input(&mlp_reference, "INPUT0"))
        .await
        .unwrap();
    assert_eq!(output.name, "OUTPUT0");
    assert_close(&values(&output), &mlp_reference["output"], "mlp v1");

    let text_reference = reference("minilm_tiny_text");
    let sentences: Vec<String> = serde_json::from_value(text_reference["text"].clone()).unwrap();
    let text = Tensor {
        name: "text".to_owned(),
        datatype: DataType::Bytes,
        shape: vec![sentences.len() as i64],
        data: TensorData::Strings(
            sentences
                .iter()
                .map(|sentence| Bytes::copy_from_slice(sentence.as_bytes()))
                .collect(),
        ),
    };
    let output = infer(&mut client, "encoder", 1, text).await.unwrap();
    assert_eq!(output.name, "embedding");
    assert_eq!(output.shape, vec![sentences.len() as i64, 32]);
    assert_close(&values(&output), &text_reference["embedding"], "encoder v1");

    // A version pushed while the worker runs is loaded and served next to
    // the first.
    assert_eq!(
        push(&registry, "mlp", "safetensors", &artifact("mlp_regressor")).await,
        2
    );
    wait_until("version 2 ready", async || {
        placement(&registry, "mlp", 2).await.as_deref() == Some("ready")
    })
    .await;
    let regressor_reference = reference("mlp_regressor");
    let output = infer(
        &mut client,
        "mlp",
        2,
        mlp_input(&regressor_reference, "features"),
    )
    .await
    .unwrap();
    assert_eq!(output.name, "values");
    assert_close(&values(&output), &regressor_reference["output"], "mlp v2");

    // Version 1 archived (the `production` alias moved off it first):
    // unloaded, and reported so; version 2 keeps serving.
    registry
        .set_alias("mlp", "production", 2, "tester")
        .await
        .unwrap();
    registry.archive_version("mlp", 1, "tester").await.unwrap();
    wait_until("version 1 unloaded", async || {
        placement(&registry, "mlp", 1).await.as_deref() == Some("unloaded")
    })
    .await;
    assert!(!model_ready(&mut client, "mlp", 1).await);
    let status = infer(&mut client, "mlp", 1, mlp_input(&mlp_reference, "INPUT0"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(model_ready(&mut client, "mlp", 2).await);

    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
    running.stop().await.unwrap();
}
