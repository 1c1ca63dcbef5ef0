//! Rollouts end to end on the real components: the registry (SQLite, and
//! PostgreSQL where noted), a cpu-worker that follows it and loads the
//! bundled `simple` model's versions 1 and 2 from it (no model repository),
//! and a router that follows it. Every change goes through the registry's
//! own operations, as `shamal rollout` would make them.
//!
//! Where a version must misbehave (a shadow that answers only when the test
//! lets it, a canary that fails), it is served by a scripted peer worker;
//! the registry learns of it through the calls a worker makes. Weighted
//! placement runs three cpu-workers that follow the registry.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_proto::inference::*;
use shamal_registry::model::{
    GuardRails, PlacementMode, RolloutState, SetPlacement, SetPolicy, Shadow, Split, StartRollout,
    VersionAnalysis,
};
use shamal_registry::registry::ANALYSIS_ACTOR;
use support::*;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

type Client = GrpcInferenceServiceClient<Channel>;

/// Sends `count` requests built by `request`, `concurrency` at a time, and
/// returns the outcomes in request order.
async fn drive(
    client: &Client,
    count: usize,
    concurrency: usize,
    request: impl Fn(usize) -> Request<ModelInferRequest> + Send + Sync + 'static,
) -> Vec<Result<ModelInferResponse, Status>> {
    let request = Arc::new(request);
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, request, next) = (client.clone(), request.clone(), next.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        return outcomes;
                    }
                    let outcome = client
                        .model_infer(request(index))
                        .await
                        .map(tonic::Response::into_inner);
                    outcomes.push((index, outcome));
                }
            })
        })
        .collect();
    let mut outcomes: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    outcomes.sort_by_key(|(index, _)| *index);
    outcomes.into_iter().map(|(_, outcome)| outcome).collect()
}

/// Asserts that `observed` of `trials` Bernoulli(`percent`%) draws lies
/// within 4 standard deviations of the mean.
fn assert_binomial(what: &str, observed: usize, trials: usize, percent: f64) {
    let p = percent / 100.0;
    let mean = trials as f64 * p;
    let sigma = (trials as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (observed as f64 - mean).abs() <= 4.0 * sigma,
        "{what}: {observed} of {trials}, expected {mean} ± {:.1} (4 sigma)",
        4.0 * sigma
    );
}

/// The registry's analysis of the model's current rollout revision, by
/// (version, role).
async fn analysis(stack: &RegistryStack) -> BTreeMap<(u64, String), VersionAnalysis> {
    stack
        .registry()
        .rollout_status(MODEL)
        .await
        .unwrap()
        .analysis
        .into_iter()
        .map(|entry| ((entry.version, entry.role.clone()), entry))
        .collect()
}

fn requests_of(
    analysis: &BTreeMap<(u64, String), VersionAnalysis>,
    version: u64,
    role: &str,
) -> u64 {
    analysis
        .get(&(version, role.to_owned()))
        .map_or(0, |entry| entry.requests)
}

/// The value of one series in Prometheus text (0 when absent).
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

// ----- 1. canary weight ---------------------------------------------------

async fn canary_share_matches_its_weight(db: TestDb) {
    const REQUESTS: usize = 10_000;
    let stack = RegistryStack::start(db).await;
    let router = stack.router(&[], |_| {}).await;
    let rollout = stack
        .registry()
        .start_rollout(
            MODEL,
            StartRollout {
                expected_revision: 0,
                candidate: 2,
                weight: 10,
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap();
    assert_eq!(rollout.stable_version, 1, "stable taken from production");
    wait_rollout_applied(&router, MODEL, rollout.revision).await;

    let client = client(router.running.address).await;
    let outcomes = drive(&client, REQUESTS, 16, |_| {
        Request::new(simple_infer_request(""))
    })
    .await;
    let mut answered = BTreeMap::<u64, usize>::new();
    for outcome in &outcomes {
        *answered
            .entry(answered_version(outcome.as_ref().unwrap()))
            .or_default() += 1;
    }
    let canary = answered.get(&2).copied().unwrap_or(0);
    assert_eq!(answered.get(&1).copied().unwrap_or(0) + canary, REQUESTS);
    assert_binomial("requests on the canary", canary, REQUESTS, 10.0);

    // The router reported every one of them, by the version that answered,
    // under the rollout's revision: what the canary analysis sees.
    wait_until("the registry has every request reported", || async {
        let analysis = analysis(&stack).await;
        requests_of(&analysis, 1, "primary") + requests_of(&analysis, 2, "primary")
            >= REQUESTS as u64
    })
    .await;
    let analysis = analysis(&stack).await;
    assert_eq!(requests_of(&analysis, 2, "primary"), canary as u64);
    assert_eq!(
        requests_of(&analysis, 1, "primary"),
        (REQUESTS - canary) as u64
    );
    assert_eq!(analysis.len(), 2, "{analysis:?}");
    assert!(
        analysis.values().all(|entry| entry.errors == 0),
        "{analysis:?}"
    );

    router.running.stop().await.unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_share_matches_its_weight_on_sqlite() {
    canary_share_matches_its_weight(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_share_matches_its_weight_on_postgres() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    canary_share_matches_its_weight(db).await;
}

// ----- 2. sticky keys -----------------------------------------------------

const STICKY_KEY: &str = "user";

/// The version each caller lands on, asking as each caller several times:
/// by request parameter (twice), by gRPC metadata (twice) and by HTTP
/// header (once); every answer of one caller must be the same version.
async fn sticky_versions(router: &Router, callers: &[String]) -> BTreeMap<String, u64> {
    let grpc = client(router.running.address).await;
    let http = reqwest::Client::new();
    let http_address = router.http;
    let asks = callers.iter().cloned().map(|caller| {
        let (mut grpc, http) = (grpc.clone(), http.clone());
        async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let mut request = simple_infer_request("");
                request.parameters.insert(
                    STICKY_KEY.into(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam(caller.clone())),
                    },
                );
                let response = grpc.model_infer(request).await.unwrap().into_inner();
                seen.push(("parameter", answered_version(&response)));
                let mut request = Request::new(simple_infer_request(""));
                request
                    .metadata_mut()
                    .insert(STICKY_KEY, caller.parse().unwrap());
                let response = grpc.model_infer(request).await.unwrap().into_inner();
                seen.push(("metadata", answered_version(&response)));
            }
            let body = serde_json::json!({"inputs": [
                {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": (0..16).collect::<Vec<i32>>()},
                {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": (0..16).collect::<Vec<i32>>()},
            ]});
            let response: serde_json::Value = http
                .post(format!("http://{http_address}/v2/models/{MODEL}/infer"))
                .header("User", caller.as_str())
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let version: u64 = response["model_version"].as_str().unwrap().parse().unwrap();
            let expected: Vec<i64> = (0..16).map(|i| 2 * i + version as i64 - 1).collect();
            assert_eq!(
                response["outputs"][0]["data"],
                serde_json::json!(expected),
                "{response}"
            );
            seen.push(("http header", version));
            let version = seen[0].1;
            assert!(
                seen.iter().all(|(_, answered)| *answered == version),
                "caller {caller} flipped between versions: {seen:?}"
            );
            (caller, version)
        }
    });
    futures::stream::iter(asks)
        .buffer_unordered(16)
        .collect()
        .await
}

fn on_canary(versions: &BTreeMap<String, u64>) -> BTreeSet<String> {
    versions
        .iter()
        .filter(|(_, version)| **version == 2)
        .map(|(caller, _)| caller.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_callers_keep_their_version_across_shifts_and_restarts() {
    let stack = RegistryStack::start(TestDb::sqlite()).await;
    let router = stack.router(&[], |_| {}).await;
    let rollout = stack
        .registry()
        .start_rollout(
            MODEL,
            StartRollout {
                expected_revision: 0,
                candidate: 2,
                weight: 10,
                sticky_key: Some(STICKY_KEY.into()),
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, rollout.revision).await;
    let callers: Vec<String> = (0..200).map(|i| format!("caller-{i}")).collect();

    let at_10 = sticky_versions(&router, &callers).await;
    assert_eq!(at_10.len(), callers.len());
    let canary_at_10 = on_canary(&at_10);
    assert_binomial(
        "callers on the canary at 10%",
        canary_at_10.len(),
        200,
        10.0,
    );

    // Shifting the canary up only moves callers onto it.
    let shifted = stack
        .registry()
        .shift(MODEL, rollout.revision, 30, "tester")
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, shifted.revision).await;
    let at_30 = sticky_versions(&router, &callers).await;
    let canary_at_30 = on_canary(&at_30);
    let left: Vec<_> = canary_at_10.difference(&canary_at_30).collect();
    assert!(left.is_empty(), "callers left the canary: {left:?}");
    assert!(canary_at_30.len() >= canary_at_10.len());
    assert_binomial(
        "callers on the canary at 30%",
        canary_at_30.len(),
        200,
        30.0,
    );

    // A new router on the same registry maps every caller the same way.
    router.running.stop().await.unwrap();
    let router = stack.router(&[], |_| {}).await;
    wait_rollout_applied(&router, MODEL, shifted.revision).await;
    let restarted = sticky_versions(&router, &callers).await;
    assert_eq!(restarted, at_30, "callers moved across a router restart");

    router.running.stop().await.unwrap();
    stack.stop().await;
}

// ----- 3. shadow ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copies_never_hold_up_nor_reach_the_caller() {
    const REQUESTS: usize = 400;
    const PERCENT: f64 = 50.0;
    let stack = RegistryStack::start(TestDb::sqlite()).await;
    // Version 3 exists only on the gated peer: its artifact is in a format
    // the cpu-worker does not load, and the peer reports it ready.
    let shadow = ScriptedWorker::start(MODEL, 3, Script::Gated).await;
    let version = push_artifact(
        stack.registry(),
        MODEL,
        b"shadow candidate weights".to_vec(),
        "safetensors",
    )
    .await;
    assert_eq!(version, 3);
    report_peer_ready(stack.registry(), "gated-peer", shadow.address, MODEL, 3).await;
    let router = stack
        .router(&[shadow.address], |config| {
            config.max_shadow_inflight = 1_000;
            // Copies carry the caller's deadline: long enough that none
            // expires while the gate holds it.
            config.default_timeout_ms = 300_000;
        })
        .await;
    let policy = stack
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
                    version: 3,
                    percent: PERCENT,
                }),
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, policy.revision).await;

    // Every caller gets its answer from version 1 (answered_version fails
    // on anything else, the shadow's answer included) while the gate holds
    // every shadow call.
    // (The time limit only turns a router that waits for its shadow, which
    // would hang here, into a failure.)
    let client = client(router.running.address).await;
    let callers = drive(&client, REQUESTS, 8, |index| {
        let mut request = Request::new(simple_infer_request(""));
        request
            .metadata_mut()
            .insert("x-request-id", format!("caller-{index}").parse().unwrap());
        request
    });
    let outcomes = tokio::time::timeout(std::time::Duration::from_secs(120), callers)
        .await
        .expect("callers waited for the gated shadow");
    for outcome in &outcomes {
        assert_eq!(answered_version(outcome.as_ref().unwrap()), 1);
    }
    let lower_bound = {
        let (n, p) = (REQUESTS as f64, PERCENT / 100.0);
        (n * p - 4.0 * (n * p * (1.0 - p)).sqrt()) as usize
    };
    wait_until("the shadow has received its share of copies", || async {
        shadow.received_count() >= lower_bound
    })
    .await;
    assert_eq!(
        shadow.completed(),
        0,
        "every caller was answered while no shadow call had returned"
    );

    // Released, each copy completes and is compared with the caller's
    // answer (they differ: the shadow answers -7 everywhere).
    shadow.open_gate();
    let series = |name: &str, labels: &str| format!("{name}{{{labels}}}");
    let sent = series(
        "shamal_router_shadow_requests_total",
        r#"code="ok",model="simple",version="3""#,
    );
    let mismatched = series(
        "shamal_router_shadow_agreement_total",
        r#"model="simple",result="mismatch",version="3""#,
    );
    wait_until("the router has counted every shadow answer", || async {
        let text = router_metrics(&router).await;
        let received = shadow.received_count();
        shadow.completed() == received
            && metric_value(&text, &sent) as usize == received
            && metric_value(&text, &mismatched) as usize == received
    })
    .await;
    let received = shadow.received();
    assert_binomial(
        "requests copied to the shadow",
        received.len(),
        REQUESTS,
        PERCENT,
    );
    let text = router_metrics(&router).await;
    assert_eq!(
        metric_value(
            &text,
            r#"shamal_router_shadow_skipped_total{model="simple"}"#
        ),
        0.0
    );

    // What the shadow got: the callers' own requests, naming version 3.
    let sent_inputs = simple_infer_request("").raw_input_contents;
    let mut ids = BTreeSet::new();
    for copy in &received {
        assert_eq!((copy.model.as_str(), copy.version.as_str()), (MODEL, "3"));
        assert_eq!(copy.inputs, ["INPUT0", "INPUT1"]);
        assert_eq!(copy.raw_input_contents, sent_inputs);
        let id = copy.request_id.clone().unwrap();
        let index: usize = id.strip_prefix("caller-").unwrap().parse().unwrap();
        assert!(index < REQUESTS, "{id}");
        assert!(ids.insert(id.clone()), "{id} copied twice");
    }

    // The registry sees both roles under the rollout's revision.
    wait_until("the registry has the shadow traffic", || async {
        let analysis = analysis(&stack).await;
        requests_of(&analysis, 3, "shadow") == received.len() as u64
            && requests_of(&analysis, 1, "primary") == REQUESTS as u64
    })
    .await;

    router.running.stop().await.unwrap();
    stack.stop().await;
}

// ----- 4. rollback --------------------------------------------------------

/// An outcome (the version that answered, or the error code), tagged with
/// whether its request was sent after the router had applied the rollback.
type Tagged = (bool, Result<u64, Code>);

async fn rollback_takes_effect_for_the_next_request(db: TestDb) {
    let stack = RegistryStack::start(db).await;
    let router = stack.router(&[], |_| {}).await;
    let rollout = stack
        .registry()
        .start_rollout(
            MODEL,
            StartRollout {
                expected_revision: 0,
                candidate: 2,
                weight: 50,
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, rollout.revision).await;

    // Steady traffic; each answer is tagged with whether its request was
    // sent after the router had applied the rollback.
    let client = client(router.running.address).await;
    let applied = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<Tagged>>> = Arc::default();
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (mut client, applied, stop, log) =
                (client.clone(), applied.clone(), stop.clone(), log.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let after = applied.load(Ordering::SeqCst);
                    let outcome = client
                        .model_infer(simple_infer_request(""))
                        .await
                        .map(|response| answered_version(response.get_ref()))
                        .map_err(|status| status.code());
                    log.lock().unwrap().push((after, outcome));
                }
            })
        })
        .collect();
    wait_until("both versions answer the steady traffic", || async {
        let log = log.lock().unwrap();
        let versions: BTreeSet<_> = log.iter().filter_map(|(_, outcome)| outcome.ok()).collect();
        log.len() >= 100 && versions.len() == 2
    })
    .await;

    let rolled_back = stack
        .registry()
        .rollback(MODEL, rollout.revision, "canary looks wrong", "tester")
        .await
        .unwrap();
    assert_eq!(rolled_back.state, RolloutState::RolledBack);
    wait_rollout_applied(&router, MODEL, rolled_back.revision).await;
    applied.store(true, Ordering::SeqCst);
    wait_until("steady traffic goes on after the rollback", || async {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(after, _)| *after)
            .count()
            >= 400
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.unwrap();
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        log.iter().all(|(_, outcome)| outcome.is_ok()),
        "no request failed across the rollback"
    );
    let after: Vec<_> = log.iter().filter(|(after, _)| *after).collect();
    let stray: Vec<_> = after
        .iter()
        .filter(|(_, outcome)| *outcome != Ok(1))
        .collect();
    assert!(
        stray.is_empty(),
        "{} of {} requests after the rollback was applied went elsewhere than version 1",
        stray.len(),
        after.len()
    );

    router.running.stop().await.unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_takes_effect_for_the_next_request_on_sqlite() {
    rollback_takes_effect_for_the_next_request(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_takes_effect_for_the_next_request_on_postgres() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    rollback_takes_effect_for_the_next_request(db).await;
}

// ----- 5. guard rails -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_breaking_its_guard_rail_is_rolled_back_automatically() {
    let stack = RegistryStack::start(TestDb::sqlite()).await;
    // Version 3 exists only on a peer that fails every inference.
    let failing = ScriptedWorker::start(MODEL, 3, Script::Failing).await;
    let version = push_artifact(
        stack.registry(),
        MODEL,
        b"broken candidate weights".to_vec(),
        "safetensors",
    )
    .await;
    assert_eq!(version, 3);
    report_peer_ready(stack.registry(), "failing-peer", failing.address, MODEL, 3).await;
    let router = stack.router(&[failing.address], |_| {}).await;
    let rollout = stack
        .registry()
        .start_rollout(
            MODEL,
            StartRollout {
                expected_revision: 0,
                candidate: 3,
                weight: 50,
                guard_rails: GuardRails {
                    max_error_rate: Some(0.05),
                    min_requests: Some(50),
                    ..Default::default()
                },
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap();
    wait_rollout_applied(&router, MODEL, rollout.revision).await;

    // Traffic until the canary analysis pulls the canary.
    let mut client = client(router.running.address).await;
    let mut failures = 0usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        for _ in 0..10 {
            match client.model_infer(simple_infer_request("")).await {
                Ok(response) => assert_eq!(answered_version(response.get_ref()), 1),
                Err(status) => {
                    assert_eq!(status.code(), Code::Internal, "{status:?}");
                    assert!(status.message().contains("scripted failure"), "{status:?}");
                    failures += 1;
                }
            }
        }
        let current = stack.registry().get_rollout(MODEL).await.unwrap().unwrap();
        if current.state == RolloutState::RolledBack {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the canary was never rolled back ({failures} failures): {current:?}"
        );
    }
    assert!(failures >= 50, "judged after {failures} canary failures");

    let rolled_back = stack.registry().get_rollout(MODEL).await.unwrap().unwrap();
    assert_eq!(rolled_back.updated_by, ANALYSIS_ACTOR);
    assert_eq!(rolled_back.stable_version, 1);
    assert!(
        rolled_back.reason.contains("error rate"),
        "{}",
        rolled_back.reason
    );
    let history = stack.registry().history(MODEL, None, None).await.unwrap();
    let last = history.items.last().unwrap();
    assert_eq!(last.action, "auto_rollback");
    assert_eq!(last.actor, ANALYSIS_ACTOR);
    assert_eq!(last.reason, rolled_back.reason);
    assert_eq!(last.revision, rolled_back.revision);

    // Once the router has it, every request succeeds on the stable version.
    wait_rollout_applied(&router, MODEL, rolled_back.revision).await;
    let reached_canary = failing.received_count();
    let outcomes = drive(&client, 200, 4, |_| Request::new(simple_infer_request(""))).await;
    for outcome in &outcomes {
        assert_eq!(answered_version(outcome.as_ref().unwrap()), 1);
    }
    assert_eq!(failing.received_count(), reached_canary);

    router.running.stop().await.unwrap();
    stack.stop().await;
}

// ----- 6. weighted placement ----------------------------------------------

/// The versions of `simple` the placement test registers: (registry
/// version, bundled version it is made of). 1 and 3 compute OUTPUT0 = 2i,
/// 2 computes 2i + 1.
const PLACED: [(u64, u64); 3] = [(1, 1), (2, 2), (3, 1)];

/// The registry version that answered, checked against what it computed.
fn answered_placed(response: &ModelInferResponse) -> u64 {
    let version: u64 = response.model_version.parse().unwrap();
    let (_, bundled) = PLACED
        .iter()
        .find(|(registered, _)| *registered == version)
        .copied()
        .unwrap_or_else(|| panic!("no version {version} was registered: {response:?}"));
    let mut as_bundled = response.clone();
    as_bundled.model_version = bundled.to_string();
    assert_eq!(answered_version(&as_bundled), bundled);
    version
}

/// A whole-policy write over versions 1, 2 and 3.
fn three_way(expected_revision: u64, weights: [u32; 3]) -> SetPolicy {
    SetPolicy {
        expected_revision,
        stable: 1,
        splits: (1..=3)
            .zip(weights)
            .map(|(version, weight)| Split { version, weight })
            .collect(),
        ..Default::default()
    }
}

/// Where the registry placed each version once the moves are done, when
/// they are: `holders[i]` workers hold version i + 1, no worker is still
/// releasing one, every holder reports it ready, and every worker lists
/// READY exactly the versions it is assigned. `None` while moving.
async fn settled(
    registry: &shamal_registry::ModelRegistry,
    workers: &[(String, std::net::SocketAddr)],
    holders: [usize; 3],
) -> Option<BTreeMap<String, Vec<String>>> {
    let view = registry.placement(MODEL).await.unwrap();
    if view.versions.len() != 3 {
        return None;
    }
    let mut assigned: BTreeMap<String, Vec<String>> = workers
        .iter()
        .map(|(id, _)| (id.clone(), Vec::new()))
        .collect();
    for (version, count) in view.versions.iter().zip(holders) {
        if version.workers.len() != count
            || !version.releasing.is_empty()
            || version.ready != version.workers
        {
            return None;
        }
        for worker in &version.workers {
            assigned.get_mut(worker)?.push(version.version.to_string());
        }
    }
    for (id, address) in workers {
        if ready_versions(*address, MODEL).await != assigned[id] {
            return None;
        }
    }
    Some(assigned)
}

async fn wait_settled(
    registry: &Arc<shamal_registry::ModelRegistry>,
    workers: &[(String, std::net::SocketAddr)],
    holders: [usize; 3],
) -> BTreeMap<String, Vec<String>> {
    wait_until(&format!("placement settles as {holders:?}"), || {
        let (registry, workers) = (registry.clone(), workers.to_vec());
        async move { settled(&registry, &workers, holders).await.is_some() }
    })
    .await;
    settled(registry, workers, holders).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_no_longer_holds_a_version_is_passed_over() {
    // The router's pool says both workers hold `simple` version 1; the
    // stale one has unloaded it. Its NOT_FOUND sends the request on to the
    // worker that holds it: no caller sees it.
    let worker = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    // Loaded before the router first looks at both workers.
    wait_ready(worker.address, MODEL).await;
    let stale = ScriptedWorker::start(MODEL, 1, Script::Unloaded).await;
    let router = start_router(
        vec![stale.address.to_string(), worker.address.to_string()],
        |_| {},
    )
    .await;
    wait_ready(router.running.address, MODEL).await;
    let mut client = client(router.running.address).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut answered = 0usize;
    while stale.received_count() < 3 {
        let response = client
            .model_infer(simple_infer_request("1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answered_version(&response), 1);
        answered += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "the stale worker was never tried ({answered} requests)"
        );
    }
    // A version nobody holds is still NOT_FOUND.
    let status = client
        .model_infer(simple_infer_request("7"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_placement_gives_each_version_workers_of_its_own() {
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        weighted_placement_scenario(),
    )
    .await
    .expect("the placement scenario takes less than a minute");
}

/// Requests sent to the router one after the other by a few tasks until
/// stopped, each outcome kept.
struct SteadyTraffic {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Result<u64, Status>>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyTraffic {
    fn start(client: &Client, tasks: usize) -> SteadyTraffic {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Result<u64, Status>>>> = Arc::default();
        let senders = (0..tasks)
            .map(|_| {
                let (mut client, stop, log) = (client.clone(), stop.clone(), log.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let outcome = client
                            .model_infer(simple_infer_request(""))
                            .await
                            .map(|response| answered_placed(response.get_ref()));
                        log.lock().unwrap().push(outcome);
                    }
                })
            })
            .collect();
        SteadyTraffic { stop, log, senders }
    }

    fn sent(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until `count` more requests have been answered.
    async fn more(&self, count: usize) {
        let mark = self.sent();
        wait_until("steady traffic goes on", || async {
            self.sent() >= mark + count
        })
        .await;
    }

    async fn stop(self) -> Vec<Result<u64, Status>> {
        self.stop.store(true, Ordering::SeqCst);
        for sender in self.senders {
            sender.await.unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// Waits until `worker` is among the workers of version 1 (the one taking
/// all traffic): the registry has planned with it.
async fn wait_planned_with(registry: &Arc<shamal_registry::ModelRegistry>, worker: &str) {
    wait_until(&format!("{worker} holds version 1"), || async {
        let view = registry.placement(MODEL).await.unwrap();
        view.versions[0].workers.iter().any(|held| held == worker)
    })
    .await;
}

/// Polls the placement until it settles as `holders`; true when a worker
/// was seen keeping a version for its new holder meanwhile.
async fn saw_a_release(
    registry: &Arc<shamal_registry::ModelRegistry>,
    workers: &[(String, std::net::SocketAddr)],
    holders: [usize; 3],
) -> bool {
    let mut seen = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while settled(registry, workers, holders).await.is_none() {
        let view = registry.placement(MODEL).await.unwrap();
        seen |= view
            .versions
            .iter()
            .any(|version| !version.releasing.is_empty());
        assert!(
            std::time::Instant::now() < deadline,
            "placement never settled as {holders:?}: {view:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    seen
}

async fn weighted_placement_scenario() {
    const REQUESTS: usize = 900;
    let db = TestDb::sqlite();
    // A short grace period, still longer than the router's 100 ms refresh.
    let running = start_registry_with(&db, |config| config.placement_grace_ms = 400).await;
    let registry = running.registry.clone();
    for (version, bundled) in PLACED {
        let bytes = std::fs::read(
            workspace_root().join(format!("models/repository/simple/{bundled}/model.onnx")),
        )
        .unwrap();
        assert_eq!(
            push_artifact(&registry, MODEL, bytes, "onnx").await,
            version
        );
    }
    registry
        .set_placement_policy(
            MODEL,
            SetPlacement {
                mode: PlacementMode::Weighted,
                min_replicas: None,
            },
            "tester",
        )
        .await
        .unwrap();
    // Workers join one at a time: the first holds every version (version
    // 1 takes all traffic, 2 and 3 need a worker each and it is the only
    // one), the others version 1 only.
    let grpc = running.grpc_address.to_string();
    let mut workers = Vec::new();
    for index in 1..=3 {
        let id = format!("cpu-worker-{index}");
        let cache = db.dir.path().join(format!("cache-{index}"));
        workers.push((id.clone(), start_registry_worker(&grpc, &cache, &id).await));
        wait_planned_with(&registry, &id).await;
    }
    let addresses: Vec<(String, std::net::SocketAddr)> = workers
        .iter()
        .map(|(id, worker)| (id.clone(), worker.address))
        .collect();
    let held = wait_settled(&registry, &addresses, [3, 1, 1]).await;
    assert_eq!(held["cpu-worker-1"], ["1", "2", "3"]);
    let router = start_router(
        addresses
            .iter()
            .map(|(_, address)| address.to_string())
            .collect(),
        |config| {
            config.registry = Some(grpc.clone());
            config.router_id = "router-placement".into();
        },
    )
    .await;
    wait_ready(router.running.address, MODEL).await;
    let client = client(router.running.address).await;
    // From here on, no request may fail, whatever moves.
    let traffic = SteadyTraffic::start(&client, 4);
    traffic.more(100).await;

    // 34/33/33: each worker ends up holding exactly one version. Version
    // 3 leaves cpu-worker-1 for a worker that has to load it first, and
    // cpu-worker-1 keeps it meanwhile (make-before-break).
    let split = registry
        .set_policy(MODEL, three_way(0, [34, 33, 33]), "tester")
        .await
        .unwrap();
    assert!(
        saw_a_release(&registry, &addresses, [1, 1, 1]).await,
        "a version moved without its old holder keeping it"
    );
    let held = wait_settled(&registry, &addresses, [1, 1, 1]).await;
    assert!(
        held.values().all(|versions| versions.len() == 1),
        "{held:?}"
    );
    wait_rollout_applied(&router, MODEL, split.revision).await;
    traffic.more(100).await;
    // The split follows the weights.
    let outcomes = drive(&client, REQUESTS, 8, |_| {
        Request::new(simple_infer_request(""))
    })
    .await;
    let mut answered = BTreeMap::<u64, usize>::new();
    for outcome in &outcomes {
        *answered
            .entry(answered_placed(outcome.as_ref().unwrap()))
            .or_default() += 1;
    }
    for (version, percent) in [(1, 34.0), (2, 33.0), (3, 33.0)] {
        assert_binomial(
            &format!("requests on version {version}"),
            answered.get(&version).copied().unwrap_or(0),
            REQUESTS,
            percent,
        );
    }

    // 100/0/0: version 1 grows onto every worker.
    let pinned = registry
        .set_policy(MODEL, three_way(split.revision, [100, 0, 0]), "tester")
        .await
        .unwrap();
    let held = wait_settled(&registry, &addresses, [3, 1, 1]).await;
    assert!(
        held.values()
            .all(|versions| versions.contains(&"1".to_owned()))
    );
    wait_rollout_applied(&router, MODEL, pinned.revision).await;
    traffic.more(200).await;

    // And back: version 1 leaves two workers while the router may still
    // send it there.
    let back = registry
        .set_policy(MODEL, three_way(pinned.revision, [34, 33, 33]), "tester")
        .await
        .unwrap();
    let held = wait_settled(&registry, &addresses, [1, 1, 1]).await;
    assert!(
        held.values().all(|versions| versions.len() == 1),
        "{held:?}"
    );
    wait_rollout_applied(&router, MODEL, back.revision).await;
    traffic.more(200).await;

    let log = traffic.stop().await;
    let failed: Vec<&Status> = log
        .iter()
        .filter_map(|outcome| outcome.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the moves, first: {:?}",
        failed.len(),
        log.len(),
        failed.first()
    );

    router.running.stop().await.unwrap();
    futures::future::join_all(workers.into_iter().map(|(_, worker)| worker.stop()))
        .await
        .into_iter()
        .for_each(|stopped| stopped.unwrap());
    running.stop().await.unwrap();
}
