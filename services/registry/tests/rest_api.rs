//! The REST API over real HTTP: artifacts, versions, pagination, aliases,
//! rollouts with optimistic concurrency, JSON errors for every malformed
//! request, metrics, and the OpenAPI document (which must match the
//! committed `docs/openapi.json`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shamal_registry::RunningRegistry;
use shamal_registry::model::WorkerInfo;

struct Api {
    base: String,
    client: reqwest::Client,
    running: RunningRegistry,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let running = RunningRegistry::start_local("sqlite::memory:", dir.path())
            .await
            .unwrap();
        Api {
            base: format!("http://{}", running.http_address),
            client: reqwest::Client::new(),
            running,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .header("x-shamal-actor", "alice");
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

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// Sends raw bytes with the given content type.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: &'static [u8],
    ) -> (StatusCode, Value) {
        let response = self
            .client
            .request(method, self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {status} {text}"));
        (status, value)
    }

    async fn upload(&self, bytes: &[u8]) -> String {
        let digest = hex::encode(Sha256::digest(bytes));
        let response = self
            .client
            .put(self.url(&format!("/v1/artifacts/{digest}")))
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
        let (status, version) = self
            .post(
                &format!("/v1/models/{model}/versions"),
                json!({"sha256": digest, "format": "onnx"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{version}");
        version["version"].as_u64().unwrap()
    }

    /// What a worker does over gRPC when it has loaded a version.
    async fn mark_ready(&self, model: &str, version: u64) {
        let registry = &self.running.registry;
        registry
            .register_worker(WorkerInfo {
                id: "worker-1".to_owned(),
                address: "127.0.0.1:9".to_owned(),
                region: "eu-west".to_owned(),
                formats: vec!["onnx".to_owned()],
                device: "cpu".to_owned(),
                last_seen: 0,
            })
            .await
            .unwrap();
        registry
            .report_placement("worker-1", model, version, "ready", "", "")
            .await
            .unwrap();
    }
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
}

fn assert_invalid(status: StatusCode, body: &Value, field: &str) {
    assert_error(status, body, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(body["error"]["field"], field, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_upload_verify_and_stream_back() {
    let api = Api::start().await;
    let bytes = b"onnx model bytes".repeat(10_000);
    let digest = hex::encode(Sha256::digest(&bytes));
    let response = api
        .client
        .put(api.url(&format!("/v1/artifacts/{digest}")))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["location"],
        format!("/v1/artifacts/{digest}").as_str()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"sha256": digest, "size_bytes": bytes.len()}));

    // Same bytes again: idempotent.
    api.upload(&bytes).await;

    let response = api
        .client
        .get(api.url(&format!("/v1/artifacts/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(
        response.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
    assert_eq!(response.bytes().await.unwrap(), bytes);
    let response = api
        .client
        .head(api.url(&format!("/v1/artifacts/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-length"],
        bytes.len().to_string().as_str()
    );

    // Bytes that hash to another digest: refused, nothing stored.
    let wrong = hex::encode(Sha256::digest(b"something else"));
    let response = api
        .client
        .put(api.url(&format!("/v1/artifacts/{wrong}")))
        .body(b"not the declared bytes".to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_error(status, &body, StatusCode::BAD_REQUEST, "digest_mismatch");
    let (status, body) = api.get(&format!("/v1/artifacts/{wrong}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api
        .post(
            "/v1/models/ghost/versions",
            json!({"sha256": wrong, "format": "onnx"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "failed_precondition",
    );
    let (status, _) = api.get("/v1/models/ghost").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a refused version creates no model"
    );

    // Not a digest.
    let (status, body) = api
        .raw(
            Method::PUT,
            "/v1/artifacts/NOT-A-DIGEST",
            "application/octet-stream",
            b"x",
        )
        .await;
    assert_invalid(status, &body, "sha256");
    let (status, body) = api.get("/v1/artifacts/abc").await;
    assert_invalid(status, &body, "sha256");

    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_over_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = RunningRegistry::start_local("sqlite::memory:", dir.path())
        .await
        .unwrap();
    // A router of its own with a 1 KiB limit on the same registry.
    let metrics = shamal_telemetry::MetricsRegistry::new();
    let app = shamal_registry::rest::router(running.registry.clone(), 1024, &metrics).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let bytes = vec![7_u8; 4096];
    let digest = hex::encode(Sha256::digest(&bytes));
    let response = client
        .put(format!("http://{address}/v1/artifacts/{digest}"))
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    // Streamed without a length: the store stops at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![1_u8; 800])).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let digest = hex::encode(Sha256::digest(vec![1_u8; 3200]));
    let response = client
        .put(format!("http://{address}/v1/artifacts/{digest}"))
        .body(streamed)
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    let (size, _) = running
        .registry
        .open_artifact(&digest)
        .await
        .map(|(size, _)| (size, ()))
        .unwrap_or((0, ()));
    assert_eq!(size, 0, "nothing stored");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_register_list_and_archive() {
    let api = Api::start().await;
    let digest = api.upload(b"v1").await;
    let (status, version) = api
        .post(
            "/v1/models/fraud/versions",
            json!({
                "sha256": digest,
                "format": "onnx",
                "metadata": {"team": "risk"},
                "lineage": {"training_run_id": "run-7", "source_commit": "abc123"}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{version}");
    assert_eq!(version["version"], 1);
    assert_eq!(version["lifecycle"], "registered");
    assert_eq!(version["created_by"], "alice");
    assert_eq!(version["metadata"]["team"], "risk");
    assert_eq!(version["lineage"]["training_run_id"], "run-7");
    assert_eq!(version["artifact"]["size_bytes"], 2);

    // The model was created on the way.
    let (status, detail) = api.get("/v1/models/fraud").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["model"]["latest_version"], 1);
    // Its first version became production.
    assert_eq!(detail["aliases"][0]["alias"], "production");
    assert_eq!(detail["aliases"][0]["version"], 1);
    assert_eq!(detail["rollout"], Value::Null);

    let (status, got) = api.get("/v1/models/fraud/versions/1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, version);
    let (status, body) = api.get("/v1/models/fraud/versions/2").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.get("/v1/models/fraud/versions/latest").await;
    assert_invalid(status, &body, "version");
    let (status, body) = api.get("/v1/models/fraud/versions/-1").await;
    assert_invalid(status, &body, "version");
    let (status, body) = api
        .post("/v1/models/fraud/versions/abc/archive", json!({}))
        .await;
    assert_invalid(status, &body, "version");

    // Validation names the field.
    let (status, body) = api
        .post(
            "/v1/models/fraud/versions",
            json!({"sha256": digest, "format": "pickle"}),
        )
        .await;
    assert_invalid(status, &body, "format");
    let (status, body) = api
        .post(
            "/v1/models/fraud/versions",
            json!({"sha256": "abc", "format": "onnx"}),
        )
        .await;
    assert_invalid(status, &body, "sha256");
    let (status, body) = api
        .post("/v1/models/fraud/versions", json!({"format": "onnx"}))
        .await;
    assert_invalid(status, &body, "sha256");
    let (status, body) = api
        .post(
            "/v1/models/fraud/versions",
            json!({"sha256": digest, "format": "onnx", "colour": "blue"}),
        )
        .await;
    assert_invalid(status, &body, "colour");
    let (status, body) = api
        .post(
            "/v1/models/fraud/versions",
            json!({"sha256": digest, "format": "onnx", "lineage": {"dataset": 1}}),
        )
        .await;
    assert_invalid(status, &body, "lineage.dataset");
    let (status, body) = api
        .post(
            "/v1/models/fraud/versions",
            json!({"sha256": digest, "format": "onnx", "metadata": {"team": 5}}),
        )
        .await;
    assert_invalid(status, &body, "metadata.team");
    let (status, body) = api
        .post(
            "/v1/models/bad name!/versions",
            json!({"sha256": digest, "format": "onnx"}),
        )
        .await;
    assert_invalid(status, &body, "name");
    let (status, body) = api
        .post(
            "/v1/models/other/versions",
            json!({"sha256": digest, "format": "onnx", "create_model": false}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // Malformed JSON, wrong media type, empty body.
    let (status, body) = api
        .raw(
            Method::POST,
            "/v1/models/fraud/versions",
            "application/json",
            b"{\"sha256\": ",
        )
        .await;
    assert_invalid(status, &body, "body");
    let (status, body) = api
        .raw(
            Method::POST,
            "/v1/models/fraud/versions",
            "text/plain",
            b"{}",
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, body) = api
        .raw(
            Method::POST,
            "/v1/models/fraud/versions",
            "application/json",
            b"",
        )
        .await;
    assert_invalid(status, &body, "body");

    // Create a model explicitly; a second time conflicts.
    let (status, model) = api
        .post(
            "/v1/models",
            json!({"name": "churn", "description": "who leaves"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{model}");
    assert_eq!(model["created_by"], "alice");
    let (status, body) = api.post("/v1/models", json!({"name": "churn"})).await;
    assert_error(status, &body, StatusCode::CONFLICT, "already_exists");
    let (status, body) = api.post("/v1/models", json!({"name": ".hidden"})).await;
    assert_invalid(status, &body, "name");
    let (status, body) = api.post("/v1/models", json!({"name": 5})).await;
    assert_invalid(status, &body, "name");
    let (status, body) = api.post("/v1/models", json!({"description": "x"})).await;
    assert_invalid(status, &body, "name");

    // Only failed versions can be retried.
    let (status, body) = api
        .call(Method::POST, "/v1/models/fraud/versions/1/retry", None)
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "failed_precondition",
    );

    // Archive: refused while the production alias points to the version.
    let (status, body) = api
        .call(Method::POST, "/v1/models/fraud/versions/1/archive", None)
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "failed_precondition",
    );
    let (status, _) = api
        .call(Method::DELETE, "/v1/models/fraud/aliases/production", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, archived) = api
        .call(Method::POST, "/v1/models/fraud/versions/1/archive", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{archived}");
    assert_eq!(archived["lifecycle"], "archived");

    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_through_everything() {
    let api = Api::start().await;
    let names = ["a-model", "b-model", "c-model", "d-model"];
    for name in names {
        api.push(name, name.as_bytes()).await;
    }
    for round in 0..3 {
        api.push("a-model", format!("more {round}").as_bytes())
            .await;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(token) => format!("/v1/models?page_size=1&page_token={token}"),
            None => "/v1/models?page_size=1".to_owned(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        seen.push(items[0]["name"].as_str().unwrap().to_owned());
        match page["next_page_token"].as_str() {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, names);

    let mut versions = Vec::new();
    let mut path = "/v1/models/a-model/versions?page_size=3".to_owned();
    loop {
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        versions.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|version| version["version"].as_u64().unwrap()),
        );
        match page["next_page_token"].as_str() {
            Some(next) => {
                path = format!("/v1/models/a-model/versions?page_size=3&page_token={next}")
            }
            None => break,
        }
    }
    assert_eq!(versions, [1, 2, 3, 4]);

    let (status, page) = api.get("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    assert!(page.get("next_page_token").is_none());

    // Bad query parameters name themselves.
    for (path, field) in [
        ("/v1/models?page_size=0", "page_size"),
        ("/v1/models?page_size=501", "page_size"),
        ("/v1/models?page_size=ten", "page_size"),
        ("/v1/models?page_size=-1", "page_size"),
        ("/v1/models?page_size=1&page_size=2", "page_size"),
        ("/v1/models?page_token=%%%", "page_token"),
        ("/v1/models?colour=blue", "colour"),
        // base64 of "not-a-number"
        (
            "/v1/models/a-model/versions?page_token=bm90LWEtbnVtYmVy",
            "page_token",
        ),
        (
            "/v1/models/a-model/rollout/history?page_size=x",
            "page_size",
        ),
    ] {
        let (status, body) = api.get(path).await;
        assert_invalid(status, &body, field);
    }
    let (status, body) = api.get("/v1/models/nope/versions").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_set_list_and_delete() {
    let api = Api::start().await;
    api.push("fraud", b"v1").await;
    api.push("fraud", b"v2").await;
    let (status, alias) = api
        .put("/v1/models/fraud/aliases/production", json!({"version": 1}))
        .await;
    assert_eq!(status, StatusCode::OK, "{alias}");
    assert_eq!(alias["version"], 1);
    assert_eq!(alias["updated_by"], "alice");
    let (status, _) = api
        .put("/v1/models/fraud/aliases/staging", json!({"version": 2}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, list) = api.get("/v1/models/fraud/aliases").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|alias| alias["alias"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["production", "staging"]);
    let (_, detail) = api.get("/v1/models/fraud").await;
    assert_eq!(detail["aliases"].as_array().unwrap().len(), 2);

    let (status, body) = api
        .put("/v1/models/fraud/aliases/Prod", json!({"version": 1}))
        .await;
    assert_invalid(status, &body, "alias");
    let (status, body) = api
        .put("/v1/models/fraud/aliases/prod", json!({"version": "1"}))
        .await;
    assert_invalid(status, &body, "version");
    let (status, body) = api
        .put("/v1/models/fraud/aliases/prod", json!({"version": 9}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    // Archived versions cannot be aliased; aliased ones cannot be archived.
    let (status, body) = api
        .call(Method::POST, "/v1/models/fraud/versions/1/archive", None)
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "failed_precondition",
    );

    let (status, body) = api
        .call(Method::DELETE, "/v1/models/fraud/aliases/staging", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = api
        .call(Method::DELETE, "/v1/models/fraud/aliases/staging", None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.get("/v1/models/nope/aliases").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_move_traffic_under_optimistic_concurrency() {
    let api = Api::start().await;
    for bytes in [b"v1", b"v2", b"v3"] {
        let version = api.push("fraud", bytes).await;
        if version < 3 {
            api.mark_ready("fraud", version).await;
        }
    }
    let (status, body) = api.get("/v1/models/fraud/rollout").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // A version no worker has loaded cannot take traffic.
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 0, "candidate": 3, "weight": 10, "stable": 1}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "failed_precondition",
    );
    // Validation names fields, nested ones too.
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 0, "candidate": 2, "weight": 101, "stable": 1}),
        )
        .await;
    assert_invalid(status, &body, "weight");
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 0, "candidate": 2, "weight": 10, "stable": 1,
                   "guard_rails": {"max_error_rate": 2.0}}),
        )
        .await;
    assert_invalid(status, &body, "guard_rails.max_error_rate");
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 0, "candidate": 2, "weight": 10, "stable": 1,
                   "guard_rails": {"max_error_rate": "high"}}),
        )
        .await;
    assert_invalid(status, &body, "guard_rails.max_error_rate");
    // Without a production alias (the first version gets one; remove it)
    // the stable version must be named.
    let (status, _) = api
        .call(Method::DELETE, "/v1/models/fraud/aliases/production", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 0, "candidate": 2, "weight": 10}),
        )
        .await;
    assert_invalid(status, &body, "stable");

    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 0, "candidate": 2, "weight": 10, "stable": 1,
                   "sticky_key": "user-id", "guard_rails": {"max_error_rate": 0.05}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["revision"], 1);
    assert_eq!(rollout["state"], "active");
    assert_eq!(rollout["updated_by"], "alice");
    assert_eq!(
        rollout["splits"],
        json!([{"version": 2, "weight": 10}, {"version": 1, "weight": 90}])
    );

    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout/shift",
            json!({"expected_revision": 1, "weight": 50}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["revision"], 2);

    // A writer that saw revision 1 is refused and told the current one.
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout/shift",
            json!({"expected_revision": 1, "weight": 100}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");
    assert_eq!(body["error"]["current_revision"], 2);
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout/promote",
            json!({"expected_revision": 7}),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict");
    let (status, body) = api
        .post("/v1/models/fraud/rollout/shift", json!({"weight": 100}))
        .await;
    assert_invalid(status, &body, "expected_revision");
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout/pause",
            json!({"expected_revision": 2, "why": "x"}),
        )
        .await;
    assert_invalid(status, &body, "why");

    let (status, status_body) = api.get("/v1/models/fraud/rollout").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(status_body["rollout"]["revision"], 2);
    assert!(status_body["analysis"].is_array());

    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout/pause",
            json!({"expected_revision": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["state"], "paused");
    let (status, body) = api
        .post(
            "/v1/models/fraud/rollout/pause",
            json!({"expected_revision": 3}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "failed_precondition",
    );
    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout/resume",
            json!({"expected_revision": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["state"], "active");
    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout/rollback",
            json!({"expected_revision": 4, "reason": "p99 regression"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["state"], "rolled_back");
    assert_eq!(rollout["reason"], "p99 regression");

    // A new rollout, promoted.
    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout",
            json!({"expected_revision": 5, "candidate": 2, "weight": 25, "stable": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    let (status, rollout) = api
        .post(
            "/v1/models/fraud/rollout/promote",
            json!({"expected_revision": 6}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["state"], "promoted");
    let (_, detail) = api.get("/v1/models/fraud").await;
    assert_eq!(detail["rollout"]["revision"], 7);
    assert_eq!(detail["aliases"][0]["alias"], "production");
    assert_eq!(detail["aliases"][0]["version"], 2);

    // A full policy write.
    let (status, body) = api
        .put(
            "/v1/models/fraud/rollout/policy",
            json!({"expected_revision": 7, "stable": 2,
                   "splits": [{"version": 1, "weight": 30}, {"version": 2, "weight": 60}]}),
        )
        .await;
    assert_invalid(status, &body, "splits");
    let (status, body) = api
        .put(
            "/v1/models/fraud/rollout/policy",
            json!({"expected_revision": 7, "stable": 2,
                   "splits": [{"version": 1, "weight": 30}, {"version": 2, "weight": "70"}]}),
        )
        .await;
    assert_invalid(status, &body, "splits[1].weight");
    let (status, rollout) = api
        .put(
            "/v1/models/fraud/rollout/policy",
            json!({"expected_revision": 7, "stable": 2,
                   "splits": [{"version": 1, "weight": 30}, {"version": 2, "weight": 70}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["revision"], 8);

    // History, a page at a time.
    let mut actions = Vec::new();
    let mut path = "/v1/models/fraud/rollout/history?page_size=3".to_owned();
    loop {
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for entry in page["items"].as_array().unwrap() {
            assert_eq!(entry["actor"], "alice");
            actions.push(entry["action"].as_str().unwrap().to_owned());
        }
        match page["next_page_token"].as_str() {
            Some(next) => {
                path = format!("/v1/models/fraud/rollout/history?page_size=3&page_token={next}")
            }
            None => break,
        }
    }
    assert_eq!(
        actions,
        [
            "start",
            "shift",
            "pause",
            "resume",
            "rollback",
            "start",
            "promote",
            "set_policy"
        ]
    );

    // Workers and placements.
    let (status, workers) = api.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(workers["items"][0]["id"], "worker-1");
    let (status, placements) = api.get("/v1/models/fraud/placements").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(placements["items"].as_array().unwrap().len(), 2);
    assert_eq!(placements["items"][0]["state"], "ready");
    let (status, body) = api.get("/v1/models/nope/placements").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api
        .post(
            "/v1/models/nope/rollout/shift",
            json!({"expected_revision": 0, "weight": 5}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_access_is_read_set_validated_and_watched() {
    let api = Api::start().await;
    api.push("fraud", b"weights").await;

    let (status, body) = api.get("/v1/models/fraud/access").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["allowed_tenants"], json!([]));
    assert_eq!(body["allowed_groups"], json!([]));
    assert_eq!(body["updated_by"], "");
    let (status, body) = api
        .put(
            "/v1/models/fraud/access",
            json!({"allowed_tenants": ["acme"], "allowed_groups": ["/risk/analysts"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["updated_by"], "alice");
    assert_eq!(body["allowed_tenants"], json!(["acme"]));
    let (status, body) = api.get("/v1/models/fraud/access").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["allowed_groups"], json!(["/risk/analysts"]));
    // Routers learn it through Watch.
    let state = api
        .running
        .registry
        .model_state("fraud")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.allowed_tenants, ["acme"]);
    assert_eq!(state.allowed_groups, ["/risk/analysts"]);
    // A list may be left out (empty).
    let (status, body) = api
        .put(
            "/v1/models/fraud/access",
            json!({"allowed_groups": ["ops"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["allowed_tenants"], json!([]));

    // Bad input names the field.
    let (status, body) = api
        .put(
            "/v1/models/fraud/access",
            json!({"allowed_tenants": ["acme", "bad tenant"]}),
        )
        .await;
    assert_invalid(status, &body, "allowed_tenants[1]");
    let (status, body) = api
        .put(
            "/v1/models/fraud/access",
            json!({"allowed_groups": ["ops", "ops"]}),
        )
        .await;
    assert_invalid(status, &body, "allowed_groups[1]");
    let (status, body) = api
        .put("/v1/models/fraud/access", json!({"tenants": ["acme"]}))
        .await;
    assert_invalid(status, &body, "tenants");
    let (status, body) = api
        .put("/v1/models/nope/access", json!({"allowed_tenants": []}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    // The refused writes changed nothing.
    let (_, body) = api.get("/v1/models/fraud/access").await;
    assert_eq!(body["allowed_groups"], json!(["ops"]));
    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_policies_and_workers() {
    let api = Api::start().await;
    api.push("fraud", b"weights").await;

    // A model's regions.
    let (status, body) = api.get("/v1/models/fraud/residency").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["allowed_regions"], json!([]));
    let (status, body) = api
        .put(
            "/v1/models/fraud/residency",
            json!({"allowed_regions": ["eu-west", "eu-central"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["updated_by"], "alice");
    assert_eq!(body["allowed_regions"], json!(["eu-west", "eu-central"]));
    let state = api
        .running
        .registry
        .model_state("fraud")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.allowed_regions, ["eu-west", "eu-central"]);
    let (status, body) = api
        .put(
            "/v1/models/fraud/residency",
            json!({"allowed_regions": ["eu-west", "eu west"]}),
        )
        .await;
    assert_invalid(status, &body, "allowed_regions[1]");
    let (status, body) = api
        .put(
            "/v1/models/fraud/residency",
            json!({"allowed_regions": ["x".repeat(65)]}),
        )
        .await;
    assert_invalid(status, &body, "allowed_regions[0]");
    let (status, body) = api
        .put(
            "/v1/models/fraud/residency",
            json!({"allowed_regions": "eu-west"}),
        )
        .await;
    assert_invalid(status, &body, "allowed_regions");
    let (status, body) = api
        .put(
            "/v1/models/fraud/residency",
            json!({"regions": ["eu-west"]}),
        )
        .await;
    assert_invalid(status, &body, "regions");
    let (status, body) = api
        .raw(
            Method::PUT,
            "/v1/models/fraud/residency",
            "application/json",
            b"{\"allowed_regions\": [",
        )
        .await;
    assert_invalid(status, &body, "body");
    let (status, body) = api
        .raw(
            Method::PUT,
            "/v1/models/fraud/residency",
            "text/plain",
            b"eu-west",
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, body) = api
        .put("/v1/models/nope/residency", json!({"allowed_regions": []}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.get("/v1/models/nope/residency").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // Tenant policies.
    let (status, body) = api.get("/v1/residency/tenants").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"], json!([]));
    let (status, body) = api
        .put(
            "/v1/residency/tenants/acme",
            json!({"allowed_regions": ["uae-north"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["updated_by"], "alice");
    let (status, body) = api.get("/v1/residency/tenants/acme").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["allowed_regions"], json!(["uae-north"]));
    let (status, body) = api
        .put(
            "/v1/residency/tenants/bad%20tenant",
            json!({"allowed_regions": ["uae-north"]}),
        )
        .await;
    assert_invalid(status, &body, "tenant");
    let (status, body) = api
        .put(
            &format!("/v1/residency/tenants/{}", "t".repeat(129)),
            json!({"allowed_regions": ["uae-north"]}),
        )
        .await;
    assert_invalid(status, &body, "tenant");
    let (status, body) = api
        .put("/v1/residency/tenants/acme", json!({"allowed_regions": []}))
        .await;
    assert_invalid(status, &body, "allowed_regions");
    let (status, body) = api.get("/v1/residency/tenants/globex").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.get("/v1/residency/tenants").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"][0]["tenant"], "acme");
    let response = api
        .client
        .delete(api.url("/v1/residency/tenants/acme"))
        .header("x-shamal-actor", "bob")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = api
        .call(Method::DELETE, "/v1/residency/tenants/acme", None)
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");

    // Who changed what.
    let (status, body) = api.get("/v1/residency/history").await;
    assert_eq!(status, StatusCode::OK);
    let entries: Vec<(String, String, String)> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["scope"].as_str().unwrap().to_owned(),
                entry["subject"].as_str().unwrap().to_owned(),
                entry["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("model", "fraud", "alice"),
        ("tenant", "acme", "alice"),
        ("tenant", "acme", "bob"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(entries, expected);
    assert_eq!(body["items"][2]["allowed_regions"], Value::Null);
    let (status, body) = api.get("/v1/residency/history?page_size=0").await;
    assert_invalid(status, &body, "page_size");

    // Workers, with their membership.
    let registry = &api.running.registry;
    registry
        .register_member(
            WorkerInfo {
                id: "gpu-1".to_owned(),
                address: "10.0.0.1:8101".to_owned(),
                region: "eu-west".to_owned(),
                formats: vec!["safetensors".to_owned()],
                device: "cuda".to_owned(),
                last_seen: 0,
            },
            16,
        )
        .await
        .unwrap();
    registry.heartbeat("gpu-1", 3, 1).await.unwrap();
    let (status, body) = api.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK);
    let worker = &body["items"][0];
    assert_eq!(worker["id"], "gpu-1");
    assert_eq!(worker["state"], "serving");
    assert_eq!(worker["capacity"], 16);
    assert_eq!(worker["device"], "cuda");
    assert_eq!(worker["inflight"], 3);
    assert!(worker["last_heartbeat"].as_i64().unwrap() > 0);
    registry.deregister_worker("gpu-1", true, "").await.unwrap();
    let (_, body) = api.get("/v1/workers").await;
    assert_eq!(body["items"], json!([]));
    let (_, body) = api.get("/v1/workers?include_gone=true").await;
    assert_eq!(body["items"][0]["state"], "gone");
    let (status, body) = api.get("/v1/workers?include_gone=maybe").await;
    assert_invalid(status, &body, "include_gone");
    let (status, body) = api.get("/v1/workers?state=lost").await;
    assert_invalid(status, &body, "state");
    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_methods_and_headers_answer_json() {
    let api = Api::start().await;
    let (status, body) = api.get("/v2/nothing").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.call(Method::DELETE, "/v1/models", None).await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let response = api
        .client
        .post(api.url("/v1/models"))
        .header("x-shamal-actor", "x".repeat(300))
        .json(&json!({"name": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "x-shamal-actor");
    let response = api
        .client
        .post(api.url("/v1/models"))
        .json(&json!({"name": "m"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["created_by"], "anonymous");
    // Bodies over the JSON limit.
    let big = format!(
        "{{\"name\": \"n\", \"description\": \"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    // The server answers before reading the whole body and drops the
    // connection, so the client may fail writing the rest of the body before
    // it reads the answer (a broken pipe): try again, a few times, until the
    // answer is read.
    let mut attempts = 0;
    let response = loop {
        attempts += 1;
        let sent = api
            .client
            .post(api.url("/v1/models"))
            .header("content-type", "application/json")
            // Keep the dropped connection out of the client's pool.
            .header("connection", "close")
            .body(big.clone())
            .send()
            .await;
        match sent {
            Ok(response) => break response,
            Err(error) if error.is_request() && attempts < 5 => continue,
            Err(error) => panic!("no answer to an oversized body: {error}"),
        }
    };
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");

    let response = api.client.get(api.url("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(response.text().await.unwrap().contains("Shamal registry"));

    api.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_per_route_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let running = RunningRegistry::start_local("sqlite::memory:", dir.path())
        .await
        .unwrap();
    let metrics = shamal_telemetry::MetricsRegistry::new();
    let app = shamal_registry::rest::router(running.registry.clone(), 1 << 20, &metrics).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    for path in ["/v1/models", "/v1/models", "/v1/models/nope", "/elsewhere"] {
        client
            .get(format!("http://{address}{path}"))
            .send()
            .await
            .unwrap();
    }
    let mut text = Vec::new();
    use shamal_telemetry::Encoder;
    shamal_telemetry::TextEncoder::new()
        .encode(&metrics.gather(), &mut text)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains(
            r#"shamal_registry_http_requests_total{code="200",route="GET /v1/models"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"shamal_registry_http_requests_total{code="404",route="GET /v1/models/{name}"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"shamal_registry_http_requests_total{code="404",route="GET unmatched"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"shamal_registry_http_request_duration_seconds_count{route="GET /v1/models"} 2"#
        ),
        "{text}"
    );
    running.stop().await.unwrap();
}

/// Every route of the API, as `METHOD /path`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_policy_is_read_set_and_validated() {
    let api = Api::start().await;
    api.push("fraud", b"weights one").await;
    api.push("fraud", b"weights two").await;
    for id in ["worker-a", "worker-b"] {
        api.running
            .registry
            .register_worker(WorkerInfo {
                id: id.to_owned(),
                address: format!("{id}:8101"),
                region: "eu-west".to_owned(),
                formats: vec!["onnx".to_owned()],
                device: "cpu".to_owned(),
                last_seen: 0,
            })
            .await
            .unwrap();
    }

    // The default: every worker holds every version.
    let (status, body) = api.get("/v1/models/fraud/placement").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"], "fraud");
    assert_eq!(body["policy"]["mode"], "all");
    assert_eq!(body["policy"]["min_replicas"], 1);
    assert_eq!(body["versions"][0]["version"], 1);
    assert_eq!(body["versions"][0]["weight"], 100.0);
    assert_eq!(
        body["versions"][0]["workers"],
        json!(["worker-a", "worker-b"])
    );
    assert_eq!(body["versions"][1]["weight"], 0.0);
    assert_eq!(body["versions"][1]["releasing"], json!([]));

    // Weighted: version 1 (production) on both, version 2 (no traffic)
    // on one, planned before the answer.
    let (status, body) = api
        .put(
            "/v1/models/fraud/placement",
            json!({"mode": "weighted", "min_replicas": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["policy"]["mode"], "weighted");
    assert_eq!(body["policy"]["updated_by"], "alice");
    assert_eq!(
        body["versions"][0]["workers"],
        json!(["worker-a", "worker-b"])
    );
    assert_eq!(body["versions"][1]["workers"].as_array().unwrap().len(), 1);
    assert_eq!(body["versions"][1]["ready"], json!([]));
    let (status, again) = api.get("/v1/models/fraud/placement").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, body);
    let state = api
        .running
        .registry
        .model_state("fraud")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.placement_policy.unwrap().mode, "weighted");
    assert_eq!(state.versions[0].assigned_workers, ["worker-a", "worker-b"]);
    // min_replicas is optional (1).
    let (status, body) = api
        .put("/v1/models/fraud/placement", json!({"mode": "all"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["policy"]["min_replicas"], 1);

    // Malformed: the field at fault; unknown model: 404.
    for (input, field) in [
        (json!({"mode": "spread"}), "mode"),
        (
            json!({"mode": "weighted", "min_replicas": 0}),
            "min_replicas",
        ),
        (
            json!({"mode": "weighted", "min_replicas": 65}),
            "min_replicas",
        ),
        (
            json!({"mode": "weighted", "min_replicas": -1}),
            "min_replicas",
        ),
        (
            json!({"mode": "weighted", "min_replicas": "two"}),
            "min_replicas",
        ),
        (json!({"min_replicas": 2}), "mode"),
        (json!({"mode": "all", "replicas": 2}), "replicas"),
    ] {
        let (status, body) = api.put("/v1/models/fraud/placement", input.clone()).await;
        assert_invalid(status, &body, field);
    }
    let (status, body) = api
        .raw(
            Method::PUT,
            "/v1/models/fraud/placement",
            "application/json",
            b"{\"mode\": ",
        )
        .await;
    assert_invalid(status, &body, "body");
    let (status, body) = api
        .put("/v1/models/nope/placement", json!({"mode": "weighted"}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.get("/v1/models/nope/placement").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    api.running.stop().await.unwrap();
}

const ROUTES: &[&str] = &[
    "GET /openapi.json",
    "GET /v1/models",
    "POST /v1/models",
    "GET /v1/models/{name}",
    "GET /v1/models/{name}/versions",
    "POST /v1/models/{name}/versions",
    "GET /v1/models/{name}/versions/{version}",
    "POST /v1/models/{name}/versions/{version}/archive",
    "POST /v1/models/{name}/versions/{version}/retry",
    "PUT /v1/artifacts/{sha256}",
    "GET /v1/artifacts/{sha256}",
    "HEAD /v1/artifacts/{sha256}",
    "GET /v1/models/{name}/aliases",
    "PUT /v1/models/{name}/aliases/{alias}",
    "DELETE /v1/models/{name}/aliases/{alias}",
    "GET /v1/models/{name}/rollout",
    "POST /v1/models/{name}/rollout",
    "PUT /v1/models/{name}/rollout/policy",
    "POST /v1/models/{name}/rollout/shift",
    "POST /v1/models/{name}/rollout/promote",
    "POST /v1/models/{name}/rollout/rollback",
    "POST /v1/models/{name}/rollout/pause",
    "POST /v1/models/{name}/rollout/resume",
    "GET /v1/models/{name}/rollout/history",
    "GET /v1/workers",
    "GET /v1/models/{name}/placements",
    "GET /v1/models/{name}/placement",
    "PUT /v1/models/{name}/placement",
    "GET /v1/models/{name}/access",
    "PUT /v1/models/{name}/access",
    "GET /v1/models/{name}/residency",
    "PUT /v1/models/{name}/residency",
    "GET /v1/residency/tenants",
    "GET /v1/residency/tenants/{tenant}",
    "PUT /v1/residency/tenants/{tenant}",
    "DELETE /v1/residency/tenants/{tenant}",
    "GET /v1/residency/history",
    "POST /v1/admin/rekey",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_describes_every_route_and_is_committed() {
    let api = Api::start().await;
    let (status, document) = api.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            documented.insert(format!("{} {path}", method.to_uppercase()));
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|code| code.starts_with('2')),
                "{method} {path} has no success response"
            );
            assert!(responses.contains_key("500"), "{method} {path}");
            if operation["requestBody"]["content"]["application/json"].is_object() {
                assert!(responses.contains_key("400"), "{method} {path}");
                assert!(responses.contains_key("415"), "{method} {path}");
            }
        }
    }
    let expected: BTreeSet<String> = ROUTES.iter().map(|route| route.to_string()).collect();
    assert_eq!(documented, expected);
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for schema in [
        "ErrorBody",
        "ErrorDetail",
        "Model",
        "Version",
        "Rollout",
        "StartRollout",
        "WorkerStatus",
        "MemberState",
        "ModelResidency",
        "TenantPolicy",
        "SetResidency",
        "ResidencyChange",
        "ModelPlacement",
        "SetPlacement",
        "PlacementMode",
    ] {
        assert!(schemas.contains_key(schema), "{schema} missing");
    }

    // Every documented operation is routed (not the JSON 404/405 fallbacks).
    let digest = "0".repeat(64);
    for route in ROUTES {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{name}", "m")
            .replace("{version}", "1")
            .replace("{alias}", "production")
            .replace("{tenant}", "acme")
            .replace("{sha256}", &digest);
        let response = api
            .client
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                api.url(&path),
            )
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{route}");
        if method != "HEAD" {
            let body: Value = response.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(!message.starts_with("no route"), "{route}: {body}");
        }
    }

    // The committed copy must match: `scripts/gen-api-docs.py --update`
    // regenerates it and docs/registry-api.md (or
    // SHAMAL_UPDATE_OPENAPI=1 rewrites docs/openapi.json from this test).
    let committed_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("SHAMAL_UPDATE_OPENAPI").is_some() {
        let served = api
            .client
            .get(api.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        std::fs::write(&committed_path, served + "\n").unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    let committed: Value = serde_json::from_str(&committed).unwrap_or(Value::Null);
    assert!(
        committed == document,
        "docs/openapi.json is out of date: run `scripts/gen-api-docs.py --update`"
    );
    api.running.stop().await.unwrap();
}
