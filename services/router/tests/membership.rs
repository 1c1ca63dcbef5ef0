//! A router with no static workers learns them from the registry: two real
//! cpu-workers in two regions register and heartbeat, data-residency
//! policies (request, tenant, model) decide which of them may run each
//! request, and a draining worker is routed around without failing a
//! request.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_proto::inference::model_infer_request::InferInputTensor;
use shamal_proto::inference::*;
use shamal_worker::WorkerListeners;
use support::*;
use tokio::sync::oneshot;
use tonic::Code;

const ME: &str = "me-central-1";
const EU: &str = "eu-west-1";

async fn start_worker_in(
    registry: SocketAddr,
    cache: &std::path::Path,
    id: &str,
    region: &str,
) -> Running {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        node: shamal_worker::NodeArgs {
            registry: Some(registry.to_string()),
            worker_id: Some(id.to_owned()),
            region: Some(region.to_owned()),
            artifact_cache: Some(cache.join(id)),
            drain_grace_ms: Some(1_500),
            ..Default::default()
        },
        ..Default::default()
    };
    let config = CpuWorkerConfig::load(&args).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(shamal_cpu_worker::run(
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
    Running::new(address, stop, task)
}

fn request(parameters: &[(&str, &str)]) -> ModelInferRequest {
    let values: Vec<i32> = (0..16).collect();
    let raw: Vec<u8> = values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: ["INPUT0", "INPUT1"]
            .iter()
            .map(|name| InferInputTensor {
                name: (*name).into(),
                datatype: "INT32".into(),
                shape: vec![1, 16],
                ..Default::default()
            })
            .collect(),
        raw_input_contents: vec![raw.clone().into(), raw.into()],
        parameters: parameters
            .iter()
            .map(|(name, value)| {
                (
                    (*name).to_owned(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam((*value).to_owned())),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

/// Inferences a worker has run, from its own statistics.
async fn count(worker: SocketAddr) -> u64 {
    client(worker)
        .await
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .map(|response| {
            response
                .into_inner()
                .model_stats
                .iter()
                .map(|stats| stats.inference_count)
                .sum()
        })
        .unwrap_or(0)
}

/// Sends `n` requests with `parameters`; returns how many each worker ran.
async fn send(
    router: SocketAddr,
    workers: [SocketAddr; 2],
    n: usize,
    parameters: &[(&str, &str)],
) -> [u64; 2] {
    let before = [count(workers[0]).await, count(workers[1]).await];
    let mut client = client(router).await;
    for _ in 0..n {
        client.model_infer(request(parameters)).await.unwrap();
    }
    [
        count(workers[0]).await - before[0],
        count(workers[1]).await - before[1],
    ]
}

async fn refused(router: SocketAddr, parameters: &[(&str, &str)]) -> tonic::Status {
    client(router)
        .await
        .model_infer(request(parameters))
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_from_the_registry_and_residency_decides_where_requests_run() {
    let db = TestDb::sqlite();
    let running =
        shamal_registry::RunningRegistry::start_local(&db.url, &db.dir.path().join("artifacts"))
            .await
            .unwrap();
    let registry = running.registry.clone();
    let bytes =
        std::fs::read(workspace_root().join("models/repository/simple/1/model.onnx")).unwrap();
    push_artifact(&registry, MODEL, bytes, "onnx").await;
    let cache = db.dir.path().join("caches");
    let me = start_worker_in(running.grpc_address, &cache, "worker-me", ME).await;
    let eu = start_worker_in(running.grpc_address, &cache, "worker-eu", EU).await;
    let workers = [me.address, eu.address];

    // No static workers: the router learns both from the registry.
    let registry_address = running.grpc_address.to_string();
    let router = start_router(Vec::new(), |config| {
        config.registry = Some(registry_address);
        config.router_id = "router-membership".into();
    })
    .await;
    let address = router.running.address;
    wait_ready(address, MODEL).await;
    wait_until("both workers serve through the router", || async {
        let [a, b] = send(address, workers, 20, &[]).await;
        a > 0 && b > 0
    })
    .await;

    // The request's own list.
    let [on_me, on_eu] = send(address, workers, 30, &[("shamal-allowed-regions", EU)]).await;
    assert_eq!((on_me, on_eu), (0, 30), "only the EU worker may run these");
    let status = refused(address, &[("shamal-allowed-regions", "us-east-1")]).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("request allows [us-east-1]"),
        "{status}"
    );

    // The model's policy, set in the registry, reaches the router.
    registry
        .set_model_residency(MODEL, vec![ME.to_owned()], "tester")
        .await
        .unwrap();
    wait_until("the model policy is applied", || async {
        send(address, workers, 10, &[]).await == [10, 0]
    })
    .await;
    let status = refused(address, &[("shamal-allowed-regions", EU)]).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("model 'simple'"), "{status}");

    // A tenant policy narrows further; with the model's, nothing is left.
    registry
        .set_tenant_policy("acme", vec![EU.to_owned()], "tester")
        .await
        .unwrap();
    wait_until("the tenant policy is applied", || async {
        let answer = client(address)
            .await
            .model_infer(request(&[("shamal-tenant", "acme")]))
            .await;
        answer.is_err_and(|status| {
            status.code() == Code::FailedPrecondition && status.message().contains("tenant 'acme'")
        })
    })
    .await;
    // Another tenant is not affected.
    assert_eq!(
        send(address, workers, 5, &[("shamal-tenant", "globex")]).await,
        [5, 0]
    );

    // Lift the model policy, then drain the ME worker under load: the
    // router routes around it and no request fails.
    registry
        .set_model_residency(MODEL, Vec::new(), "tester")
        .await
        .unwrap();
    wait_until("the model policy is lifted", || async {
        let [a, b] = send(address, workers, 20, &[]).await;
        a > 0 && b > 0
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mut client = client(address).await;
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if client.model_infer(request(&[])).await.is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drained = tokio::spawn(me.stop());
    // While it drains (grace of 1.5 s, still serving), the router must stop
    // sending it requests: its count stops growing.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let during_grace = count(workers[0]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count(workers[0]).await,
        during_grace,
        "the draining worker gets no new requests"
    );
    drained.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for task in load {
        sent += task.await.unwrap();
    }
    assert!(sent > 50, "load kept flowing ({sent} requests)");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed while a worker drained"
    );

    router.running.stop().await.unwrap();
    eu.stop().await.unwrap();
    running.stop().await.unwrap();
}
