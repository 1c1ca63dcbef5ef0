//! The router following the real registry: aliases, shadow agreement,
//! pause and resume, and the traffic it reports, with a real cpu-worker
//! serving `simple` versions 1 and 2 loaded from the registry (version 2
//! answers one more than version 1). Canary weights, sticky callers,
//! shadow isolation, rollbacks and guard rails are in registry_rollouts.rs.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use shamal_proto::inference::*;
use shamal_registry::model::{SetPolicy, Shadow, Split};
use support::*;
use tonic::{Code, Status};

/// The version that answered, by the response (checked against what it
/// computed).
async fn answered(
    client: &mut shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    version: &str,
) -> Result<u64, Status> {
    let response = client
        .model_infer(simple_infer_request(version))
        .await?
        .into_inner();
    Ok(answered_version(&response))
}

/// Requests and errors the registry has from the router for the model's
/// current rollout revision, for one version and role.
async fn reported(stack: &RegistryStack, version: u64, role: &str) -> Option<(u64, u64)> {
    stack
        .registry()
        .rollout_status(MODEL)
        .await
        .unwrap()
        .analysis
        .iter()
        .find(|entry| entry.version == version && entry.role == role)
        .map(|entry| (entry.requests, entry.errors))
}

const SHADOW_OK: &str =
    r#"shamal_router_shadow_requests_total{code="ok",model="simple",version="2"}"#;
const SHADOW_MISMATCH: &str =
    r#"shamal_router_shadow_agreement_total{model="simple",result="mismatch",version="2"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_shadows_pauses_and_traffic_reports_follow_the_registry() {
    let stack = RegistryStack::start(TestDb::sqlite()).await;
    stack
        .registry()
        .set_alias(MODEL, "staging", 2, "tester")
        .await
        .unwrap();
    let router = stack.router(&[], |_| {}).await;
    // The registry's snapshot is in place (no rollout yet: revision 0).
    wait_rollout_applied(&router, MODEL, 0).await;
    let mut client = client(router.running.address).await;

    // No rollout: the production alias decides, though the worker's latest
    // version is 2.
    for _ in 0..5 {
        assert_eq!(answered(&mut client, "").await.unwrap(), 1);
    }
    // Explicit versions: numbers as they are, aliases resolved.
    assert_eq!(answered(&mut client, "1").await.unwrap(), 1);
    assert_eq!(answered(&mut client, "2").await.unwrap(), 2);
    assert_eq!(answered(&mut client, "staging").await.unwrap(), 2);
    assert_eq!(answered(&mut client, "production").await.unwrap(), 1);
    let unknown = answered(&mut client, "canary").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("'canary'"),
        "{}",
        unknown.message()
    );
    let ready = client
        .model_ready(ModelReadyRequest {
            name: MODEL.into(),
            version: "staging".into(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);

    // Moving the alias moves the traffic that follows it.
    stack
        .registry()
        .set_alias(MODEL, "production", 2, "tester")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answered(&mut client, "").await.unwrap() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the router never followed the production alias to version 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        assert_eq!(answered(&mut client, "").await.unwrap(), 2);
    }

    // Shadow: everything on 1 (a rollout beats the alias), every request
    // copied to 2, which answers differently, off the request path.
    let shadowed = stack
        .registry()
        .set_policy(
            MODEL,
            SetPolicy {
                expected_revision: 0,
                stable: 1,
                splits: vec![Split {
                    version: 1,
                    weight: 100,
                }],
                shadow: Some(Shadow {
                    version: 2,
                    percent: 100.0,
                }),
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, shadowed.revision).await;
    for _ in 0..10 {
        assert_eq!(answered(&mut client, "").await.unwrap(), 1);
    }
    wait_for_metric(&router, &format!("{SHADOW_OK} 10\n")).await;
    wait_for_metric(&router, &format!("{SHADOW_MISMATCH} 10\n")).await;
    // The traffic reports carry what went where, under the revision.
    wait_until("the registry has the shadow traffic", || async {
        reported(&stack, 1, "primary").await == Some((10, 0))
            && reported(&stack, 2, "shadow").await == Some((10, 0))
    })
    .await;

    // Paused: everything on the stable version, and no copies.
    let paused = stack
        .registry()
        .pause(MODEL, shadowed.revision, "tester")
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, paused.revision).await;
    for _ in 0..20 {
        assert_eq!(answered(&mut client, "").await.unwrap(), 1);
    }
    wait_until("the registry has the paused traffic", || async {
        reported(&stack, 1, "primary").await == Some((20, 0))
    })
    .await;
    assert_eq!(reported(&stack, 2, "shadow").await, None);

    // Resumed: copies again, and only those of this revision.
    let resumed = stack
        .registry()
        .resume(MODEL, paused.revision, "tester")
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, resumed.revision).await;
    for _ in 0..10 {
        assert_eq!(answered(&mut client, "").await.unwrap(), 1);
    }
    wait_for_metric(&router, &format!("{SHADOW_OK} 20\n")).await;
    wait_until("the registry has the resumed traffic", || async {
        reported(&stack, 1, "primary").await == Some((10, 0))
            && reported(&stack, 2, "shadow").await == Some((10, 0))
    })
    .await;

    router.running.stop().await.unwrap();
    stack.stop().await;
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
    wait_ready(router.running.address, MODEL).await;
    let mut client = client(router.running.address).await;
    // Routed as without a registry: the latest version, or the one named.
    assert_eq!(answered(&mut client, "").await.unwrap(), 2);
    assert_eq!(answered(&mut client, "1").await.unwrap(), 1);
    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}
