#![allow(clippy::unwrap_used)]
//! The gpu-worker consumes async inference jobs, as the cpu-worker does:
//! a job queued for one of its models in its region is run and answered.
//! Over Redis, through the worker's own `async_queue` settings (what a
//! deployed gpu-worker does; needs SHAMAL_TEST_REDIS_URL), and over the
//! in-process queue `shamal up` shares with its workers.

#[path = "../../../tests/support/services.rs"]
mod services;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use shamal_async_queue::{
    JobQueue, JobStatus, MemoryQueue, NewJob, Outcome, QueueConfig, RedisOptions, RedisQueue,
    StreamKey,
};
use shamal_gpu_worker::{DevicePreference, GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::{AsyncInference, NodeArgs, QueueSource, WorkerListeners};
use tokio::net::TcpListener;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const REGION: &str = "eu-test";

fn config(tune: impl FnOnce(&mut NodeArgs)) -> GpuWorkerConfig {
    let mut args = GpuWorkerArgs {
        device: Some(DevicePreference::Cpu),
        instances: Some(1),
        node: NodeArgs {
            model_repository: Some(workspace_root().join("models/gpu/repository")),
            region: Some(REGION.to_owned()),
            ..NodeArgs::default()
        },
        ..GpuWorkerArgs::default()
    };
    tune(&mut args.node);
    GpuWorkerConfig::load(&args).unwrap()
}

/// An `mlp_demo` request of one row, as the router queues it.
fn request() -> (Bytes, Vec<f64>) {
    let path = workspace_root().join("models/gpu/reference/mlp_demo.json");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let input: Vec<f32> = serde_json::from_value::<Vec<Vec<f64>>>(value["input"].clone()).unwrap()
        [0]
    .iter()
    .map(|&v| v as f32)
    .collect();
    let expected: Vec<f64> =
        serde_json::from_value::<Vec<Vec<f64>>>(value["output"].clone()).unwrap()[0].clone();
    let tensor = Tensor {
        name: "INPUT0".to_owned(),
        datatype: DataType::Fp32,
        shape: vec![1, input.len() as i64],
        data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&input))),
    };
    let (inputs, raw_input_contents) = encode_inputs(&[tensor]);
    let request = ModelInferRequest {
        model_name: "mlp_demo".to_owned(),
        inputs,
        raw_input_contents,
        ..Default::default()
    };
    (request.encode_to_vec().into(), expected)
}

/// Serves `worker`, queues one job on `queue` and checks its answer.
async fn a_queued_job_is_answered(worker: shamal_worker::Worker, queue: &dyn JobQueue) {
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
    let (payload, expected) = request();
    let job = queue
        .submit(
            NewJob::new(StreamKey::new("mlp_demo", REGION).unwrap(), payload)
                .with_timeout(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let status = queue.wait(&job.id, Duration::from_secs(60)).await.unwrap();
    let JobStatus::Done(result) = status else {
        panic!("the job was not answered: {status:?}");
    };
    let Outcome::Ok(bytes) = result.outcome else {
        panic!("the job failed: {:?}", result.outcome);
    };
    let response = ModelInferResponse::decode(bytes).unwrap();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("not fixed-size data")
    };
    let actual: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
    assert_eq!(actual.len(), expected.len());
    for (&a, &e) in actual.iter().zip(&expected) {
        assert!(
            (f64::from(a) - e).abs() <= 1e-5 + 1e-4 * e.abs(),
            "{a} vs {e}"
        );
    }
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_the_configured_redis_queue_are_answered() {
    let Some(url) = services::configured(
        "SHAMAL_TEST_REDIS_URL",
        "jobs_on_the_configured_redis_queue_are_answered",
        "scripts/ensure-redis.sh starts one",
    ) else {
        return;
    };
    // A prefix of its own: tests share the Redis.
    let prefix = format!("shamal-test:gpu-async:{}", uuid_like());
    let config = config(|node| {
        node.async_queue = Some(url.clone());
        node.async_key_prefix = Some(prefix.clone());
    });
    assert!(config.node.async_inference().is_some());
    // The worker builds its queue from its own settings.
    let worker =
        shamal_gpu_worker::build(&config, shamal_telemetry::MetricsRegistry::new()).unwrap();
    let queue = RedisQueue::connect(
        RedisOptions::new(url).with_key_prefix(prefix),
        QueueConfig::default(),
    )
    .await
    .unwrap();
    a_queued_job_is_answered(worker, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_a_shared_in_process_queue_are_answered() {
    let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new(QueueConfig::default()).unwrap());
    let config = config(|_| {});
    assert!(
        config.node.async_inference().is_none(),
        "no async_queue set"
    );
    let worker = shamal_gpu_worker::build(&config, shamal_telemetry::MetricsRegistry::new())
        .unwrap()
        .with_async_inference(AsyncInference {
            region: Some(REGION.to_owned()),
            ..AsyncInference::new(QueueSource::Shared(queue.clone()))
        });
    a_queued_job_is_answered(worker, queue.as_ref()).await;
}

/// A name unique to this run, for keys in a shared Redis.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}
