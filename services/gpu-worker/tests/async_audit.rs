#![allow(clippy::unwrap_used)]
//! The async jobs a worker runs are in the audit log: one
//! `inference.async_run` record per job, ok or failed, naming the job (its
//! id as `request_id`), the model, the version that answered, the region,
//! the consumer and the outcome, with the SHA-256 of the job's payload (the
//! same digest the router records for the submission) and of the response;
//! never the payloads. Against a real audit service, in process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use shamal_async_queue::{
    JobQueue, JobStatus, MemoryQueue, NewJob, Outcome, QueueConfig, StreamKey,
};
use shamal_audit_client::AuditClientConfig;
use shamal_gpu_worker::{DevicePreference, GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use shamal_proto::shamal::audit::v1::{AuditEvent, QueryRequest};
use shamal_tensor::{DataType, Tensor, TensorData, encode_inputs};
use shamal_worker::{ASYNC_RUN, AsyncInference, NodeArgs, QueueSource, WorkerListeners};
use tokio::net::TcpListener;

const REGION: &str = "eu-test";
const CONSUMER: &str = "gpu-audit-consumer";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An `mlp_demo` request of one row of `width` values.
fn request(width: usize, version: &str) -> ModelInferRequest {
    let input = vec![0.5f32; width];
    let tensor = Tensor {
        name: "INPUT0".to_owned(),
        datatype: DataType::Fp32,
        shape: vec![1, width as i64],
        data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&input))),
    };
    let (inputs, raw_input_contents) = encode_inputs(&[tensor]);
    ModelInferRequest {
        model_name: "mlp_demo".to_owned(),
        model_version: version.to_owned(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

/// The `mlp_demo` input width, from its numpy reference.
fn input_width() -> usize {
    let path = workspace_root().join("models/gpu/reference/mlp_demo.json");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value["input"][0].as_array().unwrap().len()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every `inference.async_run` record in the log, by request id.
async fn run_records(audit: &str) -> HashMap<String, Vec<AuditEvent>> {
    let mut client = AuditServiceClient::connect(format!("http://{audit}"))
        .await
        .unwrap();
    let page = client
        .query(QueryRequest {
            action: ASYNC_RUN.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut by_id: HashMap<String, Vec<AuditEvent>> = HashMap::new();
    for record in page.records {
        let event = record.event.unwrap();
        by_id
            .entry(event.request_id.clone())
            .or_default()
            .push(event);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_async_job_run_has_one_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let audit = shamal_audit_service::RunningAudit::start_local(
        &format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("audit.db").display()
        ),
        dir.path(),
    )
    .await
    .unwrap();
    let audit_address = audit.grpc_address.to_string();

    let mut config = GpuWorkerConfig::load(&GpuWorkerArgs {
        device: Some(DevicePreference::Cpu),
        instances: Some(1),
        node: NodeArgs {
            model_repository: Some(workspace_root().join("models/gpu/repository")),
            region: Some(REGION.to_owned()),
            ..NodeArgs::default()
        },
        ..GpuWorkerArgs::default()
    })
    .unwrap();
    config.node.audit = AuditClientConfig {
        endpoint: Some(audit_address.clone()),
        spool_dir: dir.path().join("spool"),
        retry_min_ms: 20,
        retry_max_ms: 200,
        ..AuditClientConfig::default()
    };
    let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new(QueueConfig::default()).unwrap());
    let worker = shamal_gpu_worker::build(&config, shamal_telemetry::MetricsRegistry::new())
        .unwrap()
        .with_async_inference(AsyncInference {
            consumer_id: Some(CONSUMER.to_owned()),
            region: Some(REGION.to_owned()),
            ..AsyncInference::new(QueueSource::Shared(queue.clone()))
        });
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
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

    // One that runs, one with an input of the wrong width (refused by the
    // worker: INVALID_ARGUMENT), one that is not a request at all.
    let width = input_width();
    let ok_payload: Bytes = request(width, "").encode_to_vec().into();
    let bad_payload: Bytes = request(width + 1, "1").encode_to_vec().into();
    let garbage = Bytes::from_static(&[0xff, 0xff, 0xff]);
    let stream = StreamKey::new("mlp_demo", REGION).unwrap();
    let mut jobs = Vec::new();
    for payload in [&ok_payload, &bad_payload, &garbage] {
        let job = queue
            .submit(
                NewJob::new(stream.clone(), payload.clone()).with_timeout(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        jobs.push(job.id);
    }
    let mut results = Vec::new();
    for id in &jobs {
        let status = queue.wait(id, Duration::from_secs(60)).await.unwrap();
        let JobStatus::Done(result) = status else {
            panic!("job {id} was not answered: {status:?}");
        };
        results.push(result.outcome);
    }
    let Outcome::Ok(response_bytes) = &results[0] else {
        panic!("the good job failed: {:?}", results[0]);
    };
    let response = ModelInferResponse::decode(response_bytes.clone()).unwrap();
    assert!(!response.model_version.is_empty());
    for (index, code) in [(1, 3), (2, 3)] {
        let Outcome::Err { code: got, .. } = &results[index] else {
            panic!("job {index} should fail: {:?}", results[index]);
        };
        assert_eq!(*got, code, "job {index}: {:?}", results[index]);
    }

    // The records arrive through the worker's spool.
    let ids: Vec<String> = jobs.iter().map(ToString::to_string).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records = run_records(&audit_address).await;
        if ids.iter().all(|id| records.contains_key(id)) {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "not every job has a record after 30 s: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        records.len(),
        3,
        "one record per job, nothing else: {records:?}"
    );
    let one = |id: &str| {
        let events = &records[id];
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        events[0].clone()
    };
    for (id, payload) in ids.iter().zip([&ok_payload, &bad_payload, &garbage]) {
        let event = one(id);
        assert_eq!(event.action, ASYNC_RUN);
        assert_eq!(event.service, "gpu-worker");
        assert_eq!(event.instance, CONSUMER);
        assert_eq!(
            event.actor, "service:gpu-worker",
            "no TLS: the service name"
        );
        assert_eq!(event.model, "mlp_demo");
        assert_eq!(event.region, REGION);
        assert_eq!(event.worker, CONSUMER);
        assert_eq!(&event.request_id, id, "the job id");
        assert_eq!(event.request_sha256, sha256(payload), "{id}");
        assert!(event.latency_us > 0 || event.outcome != "ok", "{event:?}");
        assert!(event.before_json.is_empty() && event.after_json.is_empty());
    }
    let ok = one(&ids[0]);
    assert_eq!(ok.outcome, "ok");
    assert_eq!(
        ok.version, response.model_version,
        "the version that answered"
    );
    assert_eq!(ok.response_sha256, sha256(response_bytes));
    assert!(ok.reason.is_empty());
    // The router's request_sha256 of a submission is the SHA-256 of the
    // request's encoding: the job's payload, so submit and run agree.
    assert_eq!(
        ok.request_sha256,
        sha256(&request(width, "").encode_to_vec())
    );

    let bad = one(&ids[1]);
    assert_eq!(bad.outcome, "invalid_argument");
    assert_eq!(bad.version, "1", "the version asked for");
    assert!(bad.response_sha256.is_empty());
    assert!(bad.reason.contains("INPUT0"), "{}", bad.reason);

    let garbage_record = one(&ids[2]);
    assert_eq!(garbage_record.outcome, "invalid_argument");
    assert!(
        garbage_record
            .reason
            .contains("not an encoded inference request"),
        "{}",
        garbage_record.reason
    );

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
    audit.stop().await.unwrap();
}
