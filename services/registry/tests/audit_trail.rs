//! The audit trail: every registry mutation made through the REST and
//! gRPC APIs reaches a real audit service (in process, SQLite) as exactly
//! one event, with its actor, model, version and the object before and
//! after; events wait in the spool while the audit service is down; and a
//! full backlog with `fail_closed` refuses a change before it is made.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shamal_audit_client::{AuditClientConfig, AuditEvent, Auditor, OnFull};
use shamal_audit_service::{AuditConfig, AuditListeners, RunningAudit};
use shamal_proto::shamal::audit::v1 as audit_proto;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use shamal_proto::shamal::registry::v1 as proto;
use shamal_proto::shamal::registry::v1::registry_client::RegistryClient;
use shamal_registry::RunningRegistry;
use support::TestDb;

/// What every REST call of these tests is attributed to.
const ACTOR: &str = "alice (client ci-bot)";

struct Api {
    base: String,
    client: reqwest::Client,
    running: RunningRegistry,
}

impl Api {
    async fn start(db: &TestDb, auditor: Auditor) -> Api {
        let running =
            RunningRegistry::start_local_with(&db.url, &db.dir.path().join("artifacts"), auditor)
                .await
                .unwrap();
        Api {
            base: format!("http://{}", running.http_address),
            client: reqwest::Client::new(),
            running,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("x-shamal-actor", ACTOR);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {status} {text}"))
        };
        (status, value)
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method.clone(), path, body).await;
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value
    }

    async fn upload(&self, bytes: &[u8]) -> String {
        let digest = hex::encode(Sha256::digest(bytes));
        let response = self
            .client
            .put(format!("{}/v1/artifacts/{digest}", self.base))
            .header("x-shamal-actor", ACTOR)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        digest
    }

    /// Uploads `bytes` and registers them as the next version of `model`.
    async fn push(&self, model: &str, bytes: &[u8]) -> u64 {
        let digest = self.upload(bytes).await;
        let version = self
            .ok(
                Method::POST,
                &format!("/v1/models/{model}/versions"),
                Some(json!({"sha256": digest, "format": "onnx"})),
            )
            .await;
        version["version"].as_u64().unwrap()
    }

    async fn grpc(&self) -> RegistryClient<tonic::transport::Channel> {
        RegistryClient::connect(format!("http://{}", self.running.grpc_address))
            .await
            .unwrap()
    }
}

/// An auditor shipping to `endpoint`, spooling in `dir`.
fn auditor(endpoint: SocketAddr, dir: &Path, max_spool_bytes: u64) -> Auditor {
    let config = AuditClientConfig {
        endpoint: Some(format!("http://{endpoint}")),
        spool_dir: dir.join("audit-spool"),
        max_spool_bytes,
        on_full: OnFull::FailClosed,
        retry_min_ms: 20,
        retry_max_ms: 200,
        ..AuditClientConfig::default()
    };
    Auditor::start(
        config,
        None,
        "registry",
        "registry-test",
        &prometheus::Registry::new(),
    )
    .unwrap()
}

/// Every event of the audit log, in the order appended.
async fn audit_log(address: SocketAddr) -> Vec<AuditEvent> {
    let mut client = AuditServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .query(audit_proto::QueryRequest {
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        events.extend(page.records.into_iter().filter_map(|record| record.event));
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

fn parse(json: &str) -> Value {
    if json.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(json).unwrap_or_else(|error| panic!("not JSON ({error}): {json}"))
}

/// A port nothing listens on (yet).
fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn audit_database(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("audit.db").display())
}

/// Starts the audit service on `address` (once free).
async fn start_audit_on(address: SocketAddr, dir: &Path) -> RunningAudit {
    let config = AuditConfig {
        grpc_listen: address,
        metrics_listen: None,
        database_url: audit_database(dir),
        signing_key_file: dir.join("audit-signing-key.pem"),
        ..AuditConfig::default()
    };
    let listeners = AuditListeners::bind(&config).await.unwrap();
    RunningAudit::start(config, listeners, prometheus::Registry::new())
        .await
        .unwrap()
}

/// A worker's registration, as the worker agent sends it.
fn registration(worker_id: &str) -> proto::RegisterWorkerRequest {
    proto::RegisterWorkerRequest {
        worker_id: worker_id.to_owned(),
        address: "127.0.0.1:9".to_owned(),
        region: "eu-west".to_owned(),
        formats: vec!["onnx".to_owned()],
        device: "cpu".to_owned(),
        capacity: 1,
    }
}

fn ready(worker_id: &str, model: &str, version: u64) -> proto::ReportPlacementRequest {
    proto::ReportPlacementRequest {
        worker_id: worker_id.to_owned(),
        model: model.to_owned(),
        version,
        state: "ready".to_owned(),
        ..Default::default()
    }
}

/// The representative set of mutations, then the audit log read back.
async fn every_mutation_is_audited_once(db: TestDb) {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = RunningAudit::start_local(&audit_database(audit_dir.path()), audit_dir.path())
        .await
        .unwrap();
    let auditor = auditor(audit.grpc_address, db.dir.path(), 64 * 1024 * 1024);
    let api = Api::start(&db, auditor.clone()).await;
    let mut grpc = api.grpc().await;

    api.ok(
        Method::POST,
        "/v1/models",
        Some(json!({"name": "fraud", "description": "fraud scores"})),
    )
    .await;
    let v1 = api.push("fraud", b"model one").await;
    grpc.register_worker(registration("worker-1"))
        .await
        .unwrap();
    grpc.report_placement(ready("worker-1", "fraud", v1))
        .await
        .unwrap();
    let v2 = api.push("fraud", b"model two").await;
    grpc.report_placement(ready("worker-1", "fraud", v2))
        .await
        .unwrap();
    let alias = |version: u64| Some(json!({ "version": version }));
    api.ok(Method::PUT, "/v1/models/fraud/aliases/staging", alias(v1))
        .await;
    api.ok(Method::PUT, "/v1/models/fraud/aliases/staging", alias(v2))
        .await;
    api.ok(Method::DELETE, "/v1/models/fraud/aliases/staging", None)
        .await;
    let rollout = api
        .ok(
            Method::POST,
            "/v1/models/fraud/rollout",
            Some(json!({"expected_revision": 0, "candidate": v2, "weight": 10})),
        )
        .await;
    assert_eq!(rollout["revision"], 1);
    api.ok(
        Method::POST,
        "/v1/models/fraud/rollout/shift",
        Some(json!({"expected_revision": 1, "weight": 50})),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/models/fraud/rollout/promote",
        Some(json!({"expected_revision": 2})),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/models/fraud/rollout",
        Some(json!({"expected_revision": 3, "candidate": v1, "weight": 5})),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/models/fraud/rollout/rollback",
        Some(json!({"expected_revision": 4, "reason": "p99 regression"})),
    )
    .await;
    api.ok(
        Method::PUT,
        "/v1/models/fraud/residency",
        Some(json!({"allowed_regions": ["eu-west", "eu-central"]})),
    )
    .await;
    api.ok(
        Method::PUT,
        "/v1/residency/tenants/acme",
        Some(json!({"allowed_regions": ["eu-west"]})),
    )
    .await;
    api.ok(Method::DELETE, "/v1/residency/tenants/acme", None)
        .await;
    api.ok(
        Method::PUT,
        "/v1/models/fraud/placement",
        Some(json!({"mode": "weighted", "min_replicas": 1})),
    )
    .await;
    api.ok(
        Method::PUT,
        "/v1/models/fraud/access",
        Some(json!({"allowed_tenants": ["acme"], "allowed_groups": []})),
    )
    .await;
    grpc.deregister_worker(proto::DeregisterWorkerRequest {
        worker_id: "worker-1".to_owned(),
        done: false,
        reason: "maintenance".to_owned(),
    })
    .await
    .unwrap();

    auditor.drain(Duration::from_secs(20)).await.unwrap();
    let events = audit_log(audit.grpc_address).await;
    let actions: Vec<&str> = events.iter().map(|event| event.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "model.create",
            "artifact.put",
            "version.register",
            "worker.register",
            "version.lifecycle",
            "artifact.put",
            "version.register",
            "version.lifecycle",
            "alias.set",
            "alias.set",
            "alias.delete",
            "rollout.start",
            "rollout.shift",
            "rollout.promote",
            "rollout.start",
            "rollout.rollback",
            "residency.model",
            "residency.tenant.set",
            "residency.tenant.delete",
            "placement.policy",
            "access.set",
            "worker.deregister",
        ],
        "one event per mutation, in order"
    );
    for event in &events {
        assert_eq!(event.service, "registry");
        assert_eq!(event.instance, "registry-test");
        assert_eq!(event.outcome, "ok");
        assert!(!event.event_id.is_empty() && event.occurred_at_ms > 0);
        // Both sides are JSON (or empty).
        parse(&event.before_json);
        parse(&event.after_json);
        let by_rest = !event.action.starts_with("worker.") && event.action != "version.lifecycle";
        if by_rest {
            assert_eq!(
                (event.actor.as_str(), event.client_id.as_str()),
                ("alice", "ci-bot"),
                "{event:?}"
            );
        }
    }
    let find = |action: &str, nth: usize| {
        events
            .iter()
            .filter(|event| event.action == action)
            .nth(nth)
            .unwrap_or_else(|| panic!("no {action} #{nth}"))
    };

    let created = find("model.create", 0);
    assert_eq!(created.model, "fraud");
    assert_eq!(created.before_json, "");
    assert_eq!(parse(&created.after_json)["description"], "fraud scores");

    let registered = find("version.register", 1);
    assert_eq!(
        (registered.model.as_str(), registered.version.as_str()),
        ("fraud", "2")
    );
    assert_eq!(registered.before_json, "");
    assert_eq!(parse(&registered.after_json)["lifecycle"], "registered");

    let put = find("artifact.put", 0);
    assert_eq!(
        parse(&put.after_json)["sha256"],
        hex::encode(Sha256::digest(b"model one"))
    );

    let lifecycle = find("version.lifecycle", 0);
    assert_eq!(lifecycle.version, v1.to_string());
    assert_eq!(lifecycle.worker, "worker-1");
    assert_eq!(parse(&lifecycle.before_json)["lifecycle"], "registered");
    assert_eq!(parse(&lifecycle.after_json)["lifecycle"], "ready");

    let first_alias = find("alias.set", 0);
    assert_eq!(first_alias.before_json, "");
    assert_eq!(parse(&first_alias.after_json)["version"], v1);
    let moved = find("alias.set", 1);
    assert_eq!(moved.version, v2.to_string());
    assert_eq!(parse(&moved.before_json)["version"], v1);
    assert_eq!(parse(&moved.after_json)["version"], v2);
    let deleted = find("alias.delete", 0);
    assert_eq!(parse(&deleted.before_json)["alias"], "staging");
    assert_eq!(parse(&deleted.before_json)["version"], v2);
    assert_eq!(deleted.after_json, "");

    let started = find("rollout.start", 0);
    assert_eq!(started.before_json, "");
    assert_eq!(started.version, v2.to_string());
    let shift = find("rollout.shift", 0);
    let weight_of = |json: &str, version: u64| {
        parse(json)["splits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|split| split["version"] == version)
            .map(|split| split["weight"].as_u64().unwrap())
    };
    assert_eq!(weight_of(&shift.before_json, v2), Some(10));
    assert_eq!(weight_of(&shift.after_json, v2), Some(50));
    assert_eq!(parse(&shift.before_json)["revision"], 1);
    assert_eq!(parse(&shift.after_json)["revision"], 2);
    let promoted = find("rollout.promote", 0);
    assert_eq!(parse(&promoted.after_json)["state"], "promoted");
    assert_eq!(parse(&promoted.after_json)["stable_version"], v2);
    let rolled_back = find("rollout.rollback", 0);
    assert_eq!(rolled_back.reason, "p99 regression");
    assert_eq!(rolled_back.version, v1.to_string());
    assert_eq!(parse(&rolled_back.before_json)["state"], "active");
    assert_eq!(parse(&rolled_back.after_json)["state"], "rolled_back");

    let residency = find("residency.model", 0);
    assert_eq!(parse(&residency.before_json)["allowed_regions"], json!([]));
    assert_eq!(
        parse(&residency.after_json)["allowed_regions"],
        json!(["eu-west", "eu-central"])
    );
    let tenant_set = find("residency.tenant.set", 0);
    assert_eq!(tenant_set.tenant, "acme");
    assert_eq!(tenant_set.before_json, "");
    assert_eq!(
        parse(&tenant_set.after_json)["allowed_regions"],
        json!(["eu-west"])
    );
    let tenant_deleted = find("residency.tenant.delete", 0);
    assert_eq!(tenant_deleted.tenant, "acme");
    assert_eq!(
        parse(&tenant_deleted.before_json)["allowed_regions"],
        json!(["eu-west"])
    );
    assert_eq!(tenant_deleted.after_json, "");

    let placement = find("placement.policy", 0);
    assert_eq!(parse(&placement.before_json)["mode"], "all");
    assert_eq!(parse(&placement.after_json)["mode"], "weighted");
    let access = find("access.set", 0);
    assert_eq!(parse(&access.before_json)["allowed_tenants"], json!([]));
    assert_eq!(
        parse(&access.after_json)["allowed_tenants"],
        json!(["acme"])
    );

    let joined = find("worker.register", 0);
    assert_eq!(joined.worker, "worker-1");
    assert_eq!(joined.actor, "anonymous");
    assert_eq!(joined.before_json, "");
    assert_eq!(parse(&joined.after_json)["state"], "serving");
    let left = find("worker.deregister", 0);
    assert_eq!(left.reason, "maintenance");
    assert_eq!(parse(&left.before_json)["state"], "serving");
    assert_eq!(parse(&left.after_json)["state"], "draining");

    // Reads and heartbeats are not audited.
    api.ok(Method::GET, "/v1/models/fraud", None).await;
    grpc.heartbeat(proto::HeartbeatRequest {
        worker_id: "worker-1".to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    auditor.drain(Duration::from_secs(20)).await.unwrap();
    assert_eq!(audit_log(audit.grpc_address).await.len(), events.len());

    api.running.stop().await.unwrap();
    auditor.shutdown().await;
    audit.stop().await.unwrap();
}

#[tokio::test]
async fn every_mutation_is_audited_once_on_sqlite() {
    every_mutation_is_audited_once(TestDb::sqlite().await).await;
}

#[tokio::test]
async fn every_mutation_is_audited_once_on_postgres() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    every_mutation_is_audited_once(db).await;
}

#[tokio::test]
async fn events_wait_in_the_spool_while_the_audit_service_is_down() {
    let db = TestDb::sqlite().await;
    let audit_dir = tempfile::tempdir().unwrap();
    let address = free_address();
    let auditor = auditor(address, db.dir.path(), 64 * 1024 * 1024);
    let api = Api::start(&db, auditor.clone()).await;

    // The audit service is down: mutations still succeed (the bound is
    // far away) and their events wait in the spool.
    api.ok(Method::POST, "/v1/models", Some(json!({"name": "fraud"})))
        .await;
    api.ok(
        Method::PUT,
        "/v1/models/fraud/residency",
        Some(json!({"allowed_regions": ["eu-west"]})),
    )
    .await;
    assert!(auditor.drain(Duration::from_millis(300)).await.is_err());
    assert_eq!(auditor.stats().spool_events, 2);

    let audit = start_audit_on(address, audit_dir.path()).await;
    auditor.drain(Duration::from_secs(20)).await.unwrap();
    let events = audit_log(audit.grpc_address).await;
    let actions: Vec<&str> = events.iter().map(|event| event.action.as_str()).collect();
    assert_eq!(actions, ["model.create", "residency.model"]);
    assert!(events.iter().all(|event| event.model == "fraud"));

    api.running.stop().await.unwrap();
    auditor.shutdown().await;
    audit.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_backlog_refuses_changes_before_making_them() {
    let db = TestDb::sqlite().await;
    // Nothing listens: every event stays in the spool, and one fills it.
    let auditor = auditor(free_address(), db.dir.path(), 1);
    let api = Api::start(&db, auditor.clone()).await;
    api.ok(Method::POST, "/v1/models", Some(json!({"name": "fraud"})))
        .await;

    let (status, body) = api
        .call(Method::POST, "/v1/models", Some(json!({"name": "churn"})))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "resource_exhausted");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("audit backlog full"), "{message}");
    let (status, _) = api.call(Method::GET, "/v1/models/churn", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was created");

    let (status, _) = api
        .call(
            Method::PUT,
            "/v1/models/fraud/residency",
            Some(json!({"allowed_regions": ["eu-west"]})),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let residency = api
        .ok(Method::GET, "/v1/models/fraud/residency", None)
        .await;
    assert_eq!(
        residency["allowed_regions"],
        json!([]),
        "nothing was changed"
    );

    // gRPC: RESOURCE_EXHAUSTED, and the worker is not registered.
    let mut grpc = api.grpc().await;
    let status = grpc
        .register_worker(registration("worker-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("audit backlog"), "{status:?}");
    assert!(
        api.running
            .registry
            .get_worker("worker-1")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(auditor.stats().spool_events, 1, "only the first change");
    assert!(auditor.stats().refused >= 3);

    api.running.stop().await.unwrap();
    auditor.shutdown().await;
}

fn traffic(version: u64, requests: u64, errors: u64) -> proto::VersionTraffic {
    let mut buckets = vec![0; shamal_registry_client::latency_bucket_count()];
    buckets[shamal_registry_client::latency_bucket(1_000)] = requests;
    proto::VersionTraffic {
        model: "fraud".to_owned(),
        version,
        rollout_revision: 1,
        role: "primary".to_owned(),
        requests,
        errors,
        latency_buckets: buckets,
    }
}

#[tokio::test]
async fn the_registry_s_own_changes_are_audited() {
    let db = TestDb::sqlite().await;
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = RunningAudit::start_local(&audit_database(audit_dir.path()), audit_dir.path())
        .await
        .unwrap();
    let auditor = auditor(audit.grpc_address, db.dir.path(), 64 * 1024 * 1024);
    let api = Api::start(&db, auditor.clone()).await;
    let mut grpc = api.grpc().await;
    let v1 = api.push("fraud", b"model one").await;
    let v2 = api.push("fraud", b"model two").await;
    // A worker that never heartbeats: its lease (1 s) expires.
    grpc.register_worker(registration("worker-1"))
        .await
        .unwrap();
    for version in [v1, v2] {
        grpc.report_placement(ready("worker-1", "fraud", version))
            .await
            .unwrap();
    }
    api.ok(
        Method::POST,
        "/v1/models/fraud/rollout",
        Some(json!({
            "expected_revision": 0,
            "candidate": v2,
            "weight": 10,
            "guard_rails": {"max_error_rate": 0.05, "min_requests": 50},
        })),
    )
    .await;
    // The canary analysis rolls the candidate back.
    let report = proto::ReportTrafficRequest {
        router_id: "r1".to_owned(),
        traffic: vec![traffic(v2, 60, 30), traffic(v1, 540, 0)],
    };
    let rolled_back = api.running.registry.report_traffic(&report).await.unwrap();
    assert_eq!(rolled_back, ["fraud"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let worker = api.running.registry.get_worker("worker-1").await.unwrap();
        if worker.is_some_and(|worker| worker.state.as_str() == "lost") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "worker not lost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    auditor.drain(Duration::from_secs(20)).await.unwrap();
    let events = audit_log(audit.grpc_address).await;
    let only = |action: &str| {
        let found: Vec<&AuditEvent> = events.iter().filter(|e| e.action == action).collect();
        assert_eq!(found.len(), 1, "{action}: {events:#?}");
        found[0]
    };
    let automatic = only("rollout.auto_rollback");
    assert_eq!(automatic.actor, shamal_registry::registry::ANALYSIS_ACTOR);
    assert_eq!(automatic.model, "fraud");
    assert_eq!(automatic.version, v2.to_string());
    assert!(automatic.reason.contains("error rate"), "{automatic:?}");
    assert_eq!(parse(&automatic.before_json)["state"], "active");
    assert_eq!(parse(&automatic.after_json)["state"], "rolled_back");
    let lost = only("worker.state");
    assert_eq!(lost.actor, "registry");
    assert_eq!(lost.worker, "worker-1");
    assert_eq!(parse(&lost.before_json)["state"], "serving");
    assert_eq!(parse(&lost.after_json)["state"], "lost");
    assert!(lost.reason.contains("no heartbeat"), "{lost:?}");

    api.running.stop().await.unwrap();
    auditor.shutdown().await;
    audit.stop().await.unwrap();
}
