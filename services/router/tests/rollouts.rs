//! The router following a registry: a fake registry (Watch fed by the test,
//! traffic reports recorded) in front of a real cpu-worker serving the
//! bundled `simple` model, whose version 2 answers one more than version 1.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_proto::inference::*;
use shamal_proto::shamal::registry::v1::registry_server::{Registry, RegistryServer};
use shamal_proto::shamal::registry::v1::*;
use shamal_tensor::{DataType, Tensor};
use support::*;
use tonic::{Code, Request, Response, Status};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A registry that streams the events the test publishes and records the
/// traffic reports it gets.
#[derive(Clone)]
struct FakeRegistry {
    log: tokio::sync::watch::Sender<Vec<WatchEvent>>,
    reports: Arc<Mutex<Vec<ReportTrafficRequest>>>,
}

impl FakeRegistry {
    fn publish(&self, event: WatchEvent) {
        self.log.send_modify(|log| log.push(event));
    }

    /// Requests reported so far per (model, version, rollout revision, role).
    fn reported(&self) -> BTreeMap<(String, u64, u64, String), (u64, u64)> {
        let mut totals = BTreeMap::new();
        for report in self.reports.lock().unwrap().iter() {
            assert_eq!(report.router_id, "router-test");
            for traffic in &report.traffic {
                let entry: &mut (u64, u64) = totals
                    .entry((
                        traffic.model.clone(),
                        traffic.version,
                        traffic.rollout_revision,
                        traffic.role.clone(),
                    ))
                    .or_default();
                entry.0 += traffic.requests;
                entry.1 += traffic.errors;
                assert_eq!(
                    traffic.latency_buckets.iter().sum::<u64>(),
                    traffic.requests
                );
            }
        }
        totals
    }
}

#[tonic::async_trait]
impl Registry for FakeRegistry {
    type WatchStream = EventStream<WatchEvent>;
    type FetchArtifactStream = EventStream<ArtifactChunk>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let since = request.into_inner().since_revision;
        let log = self.log.subscribe();
        let stream = futures::stream::unfold((log, since), |(mut log, since)| async move {
            loop {
                let next = log
                    .borrow_and_update()
                    .iter()
                    .find(|event| event.revision > since)
                    .cloned();
                if let Some(event) = next {
                    let revision = event.revision;
                    return Some((Ok(event), (log, revision)));
                }
                log.changed().await.ok()?;
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_worker(
        &self,
        _: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn report_placement(
        &self,
        _: Request<ReportPlacementRequest>,
    ) -> Result<Response<ReportPlacementResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn fetch_artifact(
        &self,
        _: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn report_traffic(
        &self,
        request: Request<ReportTrafficRequest>,
    ) -> Result<Response<ReportTrafficResponse>, Status> {
        self.reports.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ReportTrafficResponse {}))
    }

    async fn get_model(&self, _: Request<GetModelRequest>) -> Result<Response<ModelState>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn start_registry() -> (SocketAddr, FakeRegistry) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let registry = FakeRegistry {
        log: tokio::sync::watch::channel(Vec::new()).0,
        reports: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServer::new(registry.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, registry)
}

fn simple_state(revision: u64, state: &str, splits: &[(u64, u32)]) -> ModelState {
    ModelState {
        name: "simple".into(),
        aliases: [("production".to_owned(), 1), ("staging".to_owned(), 2)].into(),
        rollout: Some(Rollout {
            revision,
            state: state.into(),
            stable_version: 1,
            splits: splits
                .iter()
                .map(|(version, weight)| Split {
                    version: *version,
                    weight: *weight,
                })
                .collect(),
            sticky_key: "user".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn event(revision: u64, snapshot: bool, models: Vec<ModelState>, removed: &[&str]) -> WatchEvent {
    WatchEvent {
        revision,
        snapshot,
        models,
        removed: removed.iter().map(|name| (*name).to_owned()).collect(),
    }
}

fn simple_request(version: &str) -> ModelInferRequest {
    let tensor = |name: &str| {
        let raw: Vec<u8> = (0..16).flat_map(|i: i32| i.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Int32, vec![1, 16], Bytes::from(raw)).unwrap()
    };
    let (inputs, raw_input_contents) =
        shamal_tensor::encode_inputs(&[tensor("INPUT0"), tensor("INPUT1")]);
    ModelInferRequest {
        model_name: "simple".into(),
        model_version: version.into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

async fn metrics(router: &support::Router) -> String {
    reqwest::get(format!("http://{}/metrics", router.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls the router's metrics until `line` shows up.
async fn wait_for_metric(router: &support::Router, line: &str) {
    for _ in 0..100 {
        if metrics(router).await.contains(line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("metric never showed {line}:\n{}", metrics(router).await);
}

/// The version that answered, by the response.
async fn answered(
    client: &mut shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    request: impl tonic::IntoRequest<ModelInferRequest>,
) -> Result<String, Status> {
    Ok(client
        .model_infer(request)
        .await?
        .into_inner()
        .model_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_drive_versions_shadows_and_traffic_reports() {
    let worker = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    let (registry_address, registry) = start_registry().await;
    registry.publish(event(
        1,
        true,
        vec![simple_state(5, "active", &[(1, 50), (2, 50)])],
        &[],
    ));
    let router = start_router(vec![worker.address.to_string()], |config| {
        config.registry = Some(registry_address.to_string());
        config.router_id = "router-test".into();
        config.traffic_report_interval_ms = 100;
    })
    .await;
    wait_ready(router.running.address, "simple").await;
    wait_for_metric(
        &router,
        r#"shamal_router_rollout_revision{model="simple"} 5"#,
    )
    .await;
    let mut client = client(router.running.address).await;

    // 50/50 at random: both versions answer.
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        *seen
            .entry(answered(&mut client, simple_request("")).await.unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["1", "2"],
        "{seen:?}"
    );

    // Sticky: one caller, one version, by metadata or by parameter.
    let by_metadata = |user: &str| {
        let mut request = Request::new(simple_request(""));
        request.metadata_mut().insert("user", user.parse().unwrap());
        request
    };
    let alice = answered(&mut client, by_metadata("alice")).await.unwrap();
    for _ in 0..10 {
        assert_eq!(
            answered(&mut client, by_metadata("alice")).await.unwrap(),
            alice
        );
    }
    let mut by_parameter = simple_request("");
    by_parameter.parameters.insert(
        "user".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("alice".into())),
        },
    );
    for _ in 0..5 {
        assert_eq!(
            answered(&mut client, by_parameter.clone()).await.unwrap(),
            alice
        );
    }
    // The HTTP front door pins the same caller to the same version.
    let body = serde_json::json!({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": (0..16).collect::<Vec<i32>>()},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": (0..16).collect::<Vec<i32>>()},
    ]});
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let response: serde_json::Value = http
            .post(format!("http://{}/v2/models/simple/infer", router.http))
            .header("User", "alice")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            response["model_version"],
            serde_json::json!(alice),
            "{response}"
        );
    }

    // Explicit versions: numbers as they are, aliases resolved.
    assert_eq!(
        answered(&mut client, simple_request("1")).await.unwrap(),
        "1"
    );
    assert_eq!(
        answered(&mut client, simple_request("staging"))
            .await
            .unwrap(),
        "2"
    );
    assert_eq!(
        answered(&mut client, simple_request("production"))
            .await
            .unwrap(),
        "1"
    );
    let unknown = answered(&mut client, simple_request("canary"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("'canary'"),
        "{}",
        unknown.message()
    );
    let ready = client
        .model_ready(ModelReadyRequest {
            name: "simple".into(),
            version: "staging".into(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);

    // Shadow: everything on 1, every request copied to 2 (which answers
    // differently), off the request path.
    let mut shadowed = simple_state(6, "active", &[(1, 100)]);
    if let Some(rollout) = shadowed.rollout.as_mut() {
        rollout.shadow_version = 2;
        rollout.shadow_percent = 100.0;
    }
    registry.publish(event(2, false, vec![shadowed], &[]));
    wait_for_metric(
        &router,
        r#"shamal_router_rollout_revision{model="simple"} 6"#,
    )
    .await;
    for _ in 0..10 {
        assert_eq!(
            answered(&mut client, simple_request("")).await.unwrap(),
            "1"
        );
    }
    wait_for_metric(
        &router,
        r#"shamal_router_shadow_requests_total{code="ok",model="simple",version="2"} 10"#,
    )
    .await;
    wait_for_metric(
        &router,
        r#"shamal_router_shadow_agreement_total{model="simple",result="mismatch",version="2"} 10"#,
    )
    .await;

    // Traffic reports carry what went where, under which revision.
    let key = |version: u64, revision: u64, role: &str| {
        ("simple".to_owned(), version, revision, role.to_owned())
    };
    let mut reported = BTreeMap::new();
    for _ in 0..100 {
        reported = registry.reported();
        if reported
            .get(&key(1, 6, "primary"))
            .is_some_and(|(requests, _)| *requests >= 10)
            && reported.get(&key(2, 6, "shadow")) == Some(&(10, 0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reported.get(&key(2, 6, "shadow")),
        Some(&(10, 0)),
        "{reported:?}"
    );
    assert_eq!(
        reported
            .get(&key(1, 6, "primary"))
            .map(|(_, errors)| *errors),
        Some(0),
        "{reported:?}"
    );
    let before_shadow: u64 = [1, 2]
        .iter()
        .filter_map(|version| reported.get(&key(*version, 5, "primary")))
        .map(|(requests, _)| requests)
        .sum();
    // 40 random + 11 alice (gRPC) + 5 by parameter + 5 HTTP + 3 explicit.
    assert_eq!(before_shadow, 64, "{reported:?}");

    // Paused: everything on the stable version, copies stop.
    registry.publish(event(
        3,
        false,
        vec![simple_state(7, "paused", &[(1, 50), (2, 50)])],
        &[],
    ));
    wait_for_metric(
        &router,
        r#"shamal_router_rollout_revision{model="simple"} 7"#,
    )
    .await;
    for _ in 0..20 {
        assert_eq!(
            answered(&mut client, simple_request("")).await.unwrap(),
            "1"
        );
    }

    // Removed from the registry: routed as without one (the latest).
    registry.publish(event(4, false, vec![], &["simple"]));
    for _ in 0..100 {
        if !metrics(&router)
            .await
            .contains(r#"shamal_router_rollout_revision{model="simple"}"#)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        answered(&mut client, simple_request("")).await.unwrap(),
        "2"
    );

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_does_not_stop_serving() {
    let worker = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let router = start_router(vec![worker.address.to_string()], |config| {
        config.registry = Some(address.to_string());
        config.traffic_report_interval_ms = 50;
    })
    .await;
    wait_ready(router.running.address, "simple").await;
    let mut client = client(router.running.address).await;
    assert_eq!(
        answered(&mut client, simple_request("")).await.unwrap(),
        "2"
    );
    assert_eq!(
        answered(&mut client, simple_request("1")).await.unwrap(),
        "1"
    );
    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}
