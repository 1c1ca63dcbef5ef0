//! A cpu-worker following the real registry (`shamal-registry`, SQLite in a
//! temporary directory, on loopback) loads the ONNX versions pushed to it on
//! ONNX Runtime, reports them ready, serves them over gRPC, unloads an
//! archived one, rides out registry restarts, and reports a broken artifact
//! failed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::{ModelInferRequest, ModelReadyRequest, ServerReadyRequest};
use shamal_registry::model::{Lifecycle, MemberState, NewVersion};
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::WorkerListeners;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const WORKER: &str = "cpu-1";

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn onnxruntime_library() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    shamal_cpu_worker::bundled_onnxruntime(&workspace_root()).unwrap_or_else(|| {
        panic!("ONNX Runtime not found: run scripts/setup-deps.sh or set ORT_DYLIB_PATH")
    })
}

// --------------------------------------------------------------- registry

/// The registry's configuration: `database` in `dir`, artifacts in
/// `<dir>/artifacts`, gRPC on `grpc`.
fn registry_config(dir: &Path, database: &str, grpc: SocketAddr) -> RegistryConfig {
    RegistryConfig {
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: grpc,
        metrics_listen: None,
        database_url: format!("sqlite://{}", dir.join(database).display()),
        artifact_dir: dir.join("artifacts"),
        ..RegistryConfig::default()
    }
}

/// Binds `address` again once a stopped registry has released it.
async fn rebind(address: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return listener,
            Err(error) => assert!(Instant::now() < deadline, "cannot bind {address}: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves the registry of `config` on the bound gRPC listener.
async fn serve_registry(config: RegistryConfig, grpc: TcpListener) -> RunningRegistry {
    let listeners = RegistryListeners {
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        grpc,
        metrics: None,
    };
    RunningRegistry::start(config, listeners, shamal_telemetry::MetricsRegistry::new())
        .await
        .unwrap()
}

/// Uploads `bytes` and registers them as the next ONNX version of `model`.
async fn push(registry: &ModelRegistry, model: &str, bytes: &[u8]) -> u64 {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let body = futures::stream::iter(vec![Ok(Bytes::copy_from_slice(bytes))]).boxed();
    registry.put_artifact(&sha256, body).await.unwrap();
    registry
        .register_version(
            model,
            NewVersion {
                sha256,
                format: "onnx".to_owned(),
                ..NewVersion::default()
            },
            "tester",
        )
        .await
        .unwrap()
        .version
}

/// Pushes models/repository/simple/1 and /2 as versions 1 and 2 of `simple`.
async fn push_simple(registry: &ModelRegistry) {
    for version in [1u64, 2] {
        let path = workspace_root().join(format!("models/repository/simple/{version}/model.onnx"));
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(push(registry, "simple", &bytes).await, version);
    }
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

/// Polls an async condition until it holds, for at most 20 s.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ worker

fn int32(name: &str, values: &[i32]) -> Tensor {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    Tensor::from_raw(
        name,
        DataType::Int32,
        vec![1, values.len() as i64],
        Bytes::from(bytes),
    )
    .unwrap()
}

/// `simple` at `version`: (OUTPUT0, OUTPUT1) for a = 0..16, b = 1.
async fn infer(
    client: &mut GrpcInferenceServiceClient<Channel>,
    version: &str,
) -> Result<(Vec<i32>, Vec<i32>), tonic::Status> {
    let a: Vec<i32> = (0..16).collect();
    let b = vec![1i32; 16];
    let (inputs, raw_input_contents) = encode_inputs(&[int32("INPUT0", &a), int32("INPUT1", &b)]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: "simple".to_owned(),
            model_version: version.to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await?
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let values = |name: &str| -> Vec<i32> {
        let output = outputs.iter().find(|output| output.name == name).unwrap();
        let TensorData::Fixed(bytes) = &output.data else {
            unreachable!()
        };
        bytes
            .chunks_exact(4)
            .map(|chunk| i32::from_le_bytes(chunk.try_into().unwrap()))
            .collect()
    };
    Ok((values("OUTPUT0"), values("OUTPUT1")))
}

/// What `simple` at `version` must answer: v1 a+b, v2 a+b+1; both a-b.
fn expected(version: i32) -> (Vec<i32>, Vec<i32>) {
    (
        (0..16).map(|a| a + 1 + (version - 1)).collect(),
        (0..16).map(|a| a - 1).collect(),
    )
}

async fn model_ready(client: &mut GrpcInferenceServiceClient<Channel>, version: &str) -> bool {
    client
        .model_ready(ModelReadyRequest {
            name: "simple".to_owned(),
            version: version.to_owned(),
        })
        .await
        .is_ok_and(|response| response.into_inner().ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_onnx_versions_the_registry_assigns() {
    let dir = tempfile::tempdir().unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_address = grpc.local_addr().unwrap();
    let config = registry_config(dir.path(), "registry.db", registry_address);
    let running = serve_registry(config.clone(), grpc).await;
    let registry = running.registry.clone();
    push_simple(&registry).await;
    // A broken ONNX file: the first half of a real one.
    let model =
        std::fs::read(workspace_root().join("models/repository/simple/1/model.onnx")).unwrap();
    assert_eq!(
        push(&registry, "broken", &model[..model.len() / 2]).await,
        1
    );

    let cache = dir.path().join("cache");
    let args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        node: shamal_worker::NodeArgs {
            registry: Some(registry_address.to_string()),
            worker_id: Some(WORKER.to_owned()),
            artifact_cache: Some(cache.clone()),
            capacity: Some(6),
            drain_grace_ms: Some(100),
            ..Default::default()
        },
        ..Default::default()
    };
    let worker_config = CpuWorkerConfig::load(&args).unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(shamal_cpu_worker::run(
        worker_config,
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

    // Registered with its address; both versions ready, their signature
    // recorded; the broken one failed with a reason.
    let workers = registry.list_workers().await.unwrap();
    let me = workers.iter().find(|worker| worker.id == WORKER).unwrap();
    assert_eq!(me.address, address.to_string());
    assert_eq!(me.formats, ["onnx"]);
    assert_eq!(me.capacity, 6, "the configured capacity");
    assert_eq!(me.state, MemberState::Serving);
    wait_until("placements reported", async || {
        placement(&registry, "simple", 1).await.as_deref() == Some("ready")
            && placement(&registry, "simple", 2).await.as_deref() == Some("ready")
            && placement(&registry, "broken", 1).await.as_deref() == Some("failed")
    })
    .await;
    for version in [1, 2] {
        let found = registry.get_version("simple", version).await.unwrap();
        assert_eq!(found.lifecycle, Lifecycle::Ready, "{found:?}");
        let signature = found.signature.unwrap();
        assert_eq!(signature["inputs"][0]["name"], "INPUT0", "{signature}");
        assert_eq!(signature["inputs"][0]["datatype"], "INT32", "{signature}");
        assert_eq!(
            signature["outputs"][1]["dims"],
            serde_json::json!([-1, 16]),
            "{signature}"
        );
    }
    let broken = registry.get_version("broken", 1).await.unwrap();
    assert_eq!(broken.lifecycle, Lifecycle::Failed, "{broken:?}");
    assert!(
        broken.reason.contains("cannot read model") && broken.reason.contains("failed"),
        "{}",
        broken.reason
    );
    assert!(broken.signature.is_none());
    let sha256 = registry
        .get_version("simple", 1)
        .await
        .unwrap()
        .artifact
        .sha256;
    assert!(cache.join(format!("{sha256}.onnx")).is_file());

    assert_eq!(infer(&mut client, "1").await.unwrap(), expected(1));
    assert_eq!(infer(&mut client, "2").await.unwrap(), expected(2));

    // The registry restarts on the same database: the worker serves
    // meanwhile, resumes its watch and follows what changes after.
    running.stop().await.unwrap();
    assert_eq!(infer(&mut client, "1").await.unwrap(), expected(1));
    assert_eq!(infer(&mut client, "2").await.unwrap(), expected(2));
    let running = serve_registry(config, rebind(registry_address).await).await;
    let registry = running.registry.clone();

    // Version 1 archived (the `production` alias moved off it first):
    // unloaded, and reported so.
    registry
        .set_alias("simple", "production", 2, "tester")
        .await
        .unwrap();
    registry
        .archive_version("simple", 1, "tester")
        .await
        .unwrap();
    wait_until("version 1 unloaded", async || {
        placement(&registry, "simple", 1).await.as_deref() == Some("unloaded")
    })
    .await;
    assert!(!model_ready(&mut client, "1").await);
    let status = infer(&mut client, "1").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(infer(&mut client, "2").await.unwrap(), expected(2));

    // The registry comes back with a database restored from before the
    // worker joined (older revision, version 1 not archived there): the
    // worker registers again, reports what it holds, loads version 1 again
    // (from its cache) and serves both.
    running.stop().await.unwrap();
    let restored = registry_config(dir.path(), "restored.db", registry_address);
    let prepared = shamal_registry::open(&restored).await.unwrap();
    push_simple(&prepared).await;
    drop(prepared);
    let running = serve_registry(restored, rebind(registry_address).await).await;
    let registry = running.registry.clone();
    wait_until("registered again", async || {
        registry
            .list_workers()
            .await
            .unwrap()
            .iter()
            .any(|worker| worker.id == WORKER)
    })
    .await;
    wait_until("both versions ready again", async || {
        placement(&registry, "simple", 1).await.as_deref() == Some("ready")
            && placement(&registry, "simple", 2).await.as_deref() == Some("ready")
    })
    .await;
    for version in [1, 2] {
        let found = registry.get_version("simple", version).await.unwrap();
        assert_eq!(found.lifecycle, Lifecycle::Ready, "{found:?}");
        assert!(found.signature.is_some());
    }
    assert!(model_ready(&mut client, "1").await);
    assert_eq!(infer(&mut client, "1").await.unwrap(), expected(1));
    assert_eq!(infer(&mut client, "2").await.unwrap(), expected(2));

    // Shutdown drains: the registry sees the worker leave.
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    let left = registry.get_worker(WORKER).await.unwrap().unwrap();
    assert_eq!(left.state, MemberState::Gone, "{left:?}");
    assert!(placement(&registry, "simple", 1).await.is_none());
    running.stop().await.unwrap();
}
