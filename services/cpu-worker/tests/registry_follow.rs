//! A cpu-worker following a registry loads an ONNX artifact fetched from it
//! and serves it. The registry here is a small in-test peer serving fixed
//! data through the registry's gRPC API (the real registry service has its
//! own end-to-end tests).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::{ModelInferRequest, ServerReadyRequest};
use shamal_registry_client::proto::registry_server::{Registry, RegistryServer};
use shamal_registry_client::proto::*;
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::WorkerListeners;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

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

struct Peer {
    snapshot: WatchEvent,
    artifact: (String, Bytes),
    reports: Mutex<Vec<ReportPlacementRequest>>,
}

#[derive(Clone)]
struct TestRegistry(Arc<Peer>);

#[tonic::async_trait]
impl Registry for TestRegistry {
    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;
    type FetchArtifactStream = ReceiverStream<Result<ArtifactChunk, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let (sender, receiver) = mpsc::channel(4);
        let snapshot = self.0.snapshot.clone();
        tokio::spawn(async move {
            let _ = sender.send(Ok(snapshot)).await;
            // Keep the stream open.
            sender.closed().await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn register_worker(
        &self,
        _: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        Ok(Response::new(RegisterWorkerResponse {}))
    }

    async fn report_placement(
        &self,
        request: Request<ReportPlacementRequest>,
    ) -> Result<Response<ReportPlacementResponse>, Status> {
        self.0.reports.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ReportPlacementResponse {}))
    }

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let (sha256, bytes) = self.0.artifact.clone();
        if request.into_inner().sha256 != sha256 {
            return Err(Status::not_found("no such artifact"));
        }
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            for chunk in bytes.chunks(64) {
                let chunk = ArtifactChunk {
                    data: Bytes::copy_from_slice(chunk),
                };
                let _ = sender.send(Ok(chunk)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn report_traffic(
        &self,
        _: Request<ReportTrafficRequest>,
    ) -> Result<Response<ReportTrafficResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn get_model(&self, _: Request<GetModelRequest>) -> Result<Response<ModelState>, Status> {
        Err(Status::unimplemented("test peer"))
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_onnx_version_fetched_from_the_registry() {
    let model =
        std::fs::read(workspace_root().join("models/repository/simple/1/model.onnx")).unwrap();
    let sha256 = hex::encode(Sha256::digest(&model));
    let peer = Arc::new(Peer {
        snapshot: WatchEvent {
            revision: 1,
            snapshot: true,
            models: vec![ModelState {
                name: "adder".to_owned(),
                versions: vec![VersionState {
                    version: 3,
                    lifecycle: "ready".to_owned(),
                    reason: String::new(),
                    artifact: Some(Artifact {
                        sha256: sha256.clone(),
                        size_bytes: model.len() as u64,
                        format: "onnx".to_owned(),
                    }),
                }],
                ..Default::default()
            }],
            removed: vec![],
        },
        artifact: (sha256.clone(), Bytes::from(model)),
        reports: Mutex::default(),
    });
    let registry_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_address = registry_listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServer::new(TestRegistry(peer.clone())))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(
                registry_listener,
            )),
    );

    let cache = tempfile::tempdir().unwrap();
    let args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        registry: Some(registry_address),
        artifact_cache: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let config = CpuWorkerConfig::load(&args).unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(shamal_cpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        shamal_telemetry::Registry::new(),
        async move {
            let _ = stopped.await;
        },
    ));

    let mut client = GrpcInferenceServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready;
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "worker never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reports = peer.reports.lock().unwrap().clone();
    let ready = reports.last().unwrap();
    assert_eq!((ready.model.as_str(), ready.version), ("adder", 3));
    assert_eq!(ready.state, "ready", "{reports:?}");
    let signature: serde_json::Value = serde_json::from_str(&ready.signature_json).unwrap();
    assert_eq!(signature["inputs"][0]["datatype"], "INT32", "{signature}");
    assert!(cache.path().join(format!("{sha256}.onnx")).is_file());

    let a: Vec<i32> = (0..16).collect();
    let b = vec![1i32; 16];
    let (inputs, raw_input_contents) = encode_inputs(&[int32("INPUT0", &a), int32("INPUT1", &b)]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: "adder".to_owned(),
            model_version: "3".to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let sum = outputs
        .iter()
        .find(|output| output.name == "OUTPUT0")
        .unwrap();
    let TensorData::Fixed(bytes) = &sum.data else {
        unreachable!()
    };
    let values: Vec<i32> = bytes
        .chunks_exact(4)
        .map(|chunk| i32::from_le_bytes(chunk.try_into().unwrap()))
        .collect();
    let expected: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(values, expected);

    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
