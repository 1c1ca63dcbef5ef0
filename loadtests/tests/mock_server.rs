//! Runs the load generator against an in-process mock KServe v2 server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shamal_loadtest::{Config, Mode, run};
use shamal_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use shamal_proto::inference::model_metadata_response::TensorMetadata;
use shamal_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
};
use tonic::{Request, Response, Status};

/// Serves `demo`-like metadata; fails every 10th inference with UNAVAILABLE.
#[derive(Default)]
struct Mock {
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl GrpcInferenceService for Mock {
    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let name = request.into_inner().name;
        if name != "demo" {
            return Err(Status::not_found(format!("no model {name}")));
        }
        Ok(Response::new(ModelMetadataResponse {
            name,
            versions: vec!["1".to_string()],
            platform: "onnxruntime_onnx".to_string(),
            inputs: vec![TensorMetadata {
                name: "INPUT0".to_string(),
                datatype: "FP32".to_string(),
                shape: vec![-1, 16],
            }],
            outputs: vec![],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let Some(deadline) = request.metadata().get("grpc-timeout") else {
            return Err(Status::invalid_argument("no deadline"));
        };
        // A deadline under 10 ms gets its response far too late.
        let slow = grpc_timeout_micros(deadline.to_str().unwrap_or("")) < 10_000;
        let request = request.into_inner();
        let rows = request.inputs[0].shape[0] as usize;
        if request.raw_input_contents[0].len() != rows * 16 * 4 {
            return Err(Status::invalid_argument("bad raw input size"));
        }
        let delay = if slow { 50_000 } else { 200 };
        tokio::time::sleep(Duration::from_micros(delay)).await;
        if self.calls.fetch_add(1, Ordering::Relaxed) % 10 == 9 {
            return Err(Status::unavailable("every tenth call fails"));
        }
        Ok(Response::new(ModelInferResponse {
            model_name: request.model_name,
            ..Default::default()
        }))
    }
}

/// Parses a `grpc-timeout` value ("5000000u", "100m", ...) into microseconds.
fn grpc_timeout_micros(value: &str) -> u64 {
    let (digits, unit) = value.split_at(value.len().saturating_sub(1));
    let n: u64 = digits.parse().unwrap_or(u64::MAX);
    match unit {
        "n" => n / 1000,
        "u" => n,
        "m" => n.saturating_mul(1000),
        _ => u64::MAX,
    }
}

async fn start_mock() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(Mock::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn config(url: String, mode: Mode) -> Config {
    let mut config = Config::new(url, "demo");
    config.batch = 4;
    config.connections = Config::default_connections(&mode);
    config.mode = mode;
    config.duration = Duration::from_millis(500);
    config.warmup = Duration::from_millis(100);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_ok_and_errors() {
    let url = start_mock().await;
    let report = run(config(url, Mode::Closed { concurrency: 8 }))
        .await
        .expect("run");
    assert_eq!(report.mode, "closed");
    assert!(report.ok > 50, "{report}");
    let unavailable = report.errors.get("Unavailable").copied().unwrap_or(0);
    assert!(unavailable > 0, "{report}");
    assert_eq!(report.error_total, unavailable, "{report}");
    assert!(
        report.p50_us >= 200 && report.p50_us <= report.p99_us,
        "{report}"
    );
    assert!((report.ips - report.rps * 4.0).abs() < 1e-6);
    let json = serde_json::to_value(&report).expect("json");
    for key in [
        "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "rps", "ips", "ok", "errors",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_follows_rate_and_drops_over_bound() {
    let url = start_mock().await;
    let report = run(config(
        url.clone(),
        Mode::Open {
            rate: 400.0,
            max_outstanding: 64,
        },
    ))
    .await
    .expect("run");
    assert_eq!(report.mode, "open");
    let sent = (report.ok + report.error_total) as f64;
    // 400/s over 0.5 s is 200 arrivals.
    assert!((150.0..=250.0).contains(&sent), "{report}");
    assert_eq!(report.dropped_by_client, 0, "{report}");

    // With one request in flight at most, most arrivals at 20k/s are dropped.
    let report = run(config(
        url,
        Mode::Open {
            rate: 20_000.0,
            max_outstanding: 1,
        },
    ))
    .await
    .expect("run");
    assert!(report.dropped_by_client > report.ok, "{report}");
}

#[tokio::test]
async fn unknown_model_is_an_error() {
    let url = start_mock().await;
    let mut config = config(url, Mode::Closed { concurrency: 1 });
    config.model = "nope".to_string();
    assert!(run(config).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_count_as_deadline_exceeded() {
    let url = start_mock().await;
    let mut config = config(url, Mode::Closed { concurrency: 2 });
    config.timeout = Duration::from_micros(100);
    config.duration = Duration::from_millis(300);
    let report = run(config).await.expect("run");
    assert_eq!(report.ok, 0, "{report}");
    assert!(report.error_total > 0, "{report}");
    assert_eq!(
        report.errors.keys().collect::<Vec<_>>(),
        vec!["DeadlineExceeded"],
        "{report}"
    );
}
