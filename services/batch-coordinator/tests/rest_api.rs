//! The REST API: JSON errors naming the field, submit / list / get /
//! cancel, and the served OpenAPI document equal to the committed
//! `docs/batch-openapi.json` (`SHAMAL_UPDATE_OPENAPI=1` rewrites it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_jobs_and_the_openapi_document() {
    let db = TestDb::sqlite();
    let queue = support::memory_queue();
    let running = support::start(
        &db,
        support::dependencies(queue.clone(), vec![support::scorer_state(&[])]),
    )
    .await;
    let base = format!("http://{}", running.http_address);
    let http = reqwest::Client::new();
    let input = db.dir.path().join("rows.jsonl");
    support::write_jsonl(&input, 12);
    let output = db.dir.path().join("out");
    let spec = json!({
        "model": "scorer",
        "input": input.display().to_string(),
        "output": output.display().to_string(),
        "key_columns": ["id"],
        "rows_per_shard": 5,
    });

    // Errors are JSON naming the field.
    for (body, status, named) in [
        (json!({"spec": {"model": "scorer"}}), 400, "spec.input"),
        (
            json!({"spec": {"model": "scorer", "input": "x", "output": "y", "priority": 12}}),
            400,
            "spec.priority",
        ),
        (
            json!({"spec": {"model": "scorer", "bogus": 1}}),
            400,
            "bogus",
        ),
        (
            json!({"spec": {"model": "nope", "input": input.display().to_string(), "output": output.display().to_string()}}),
            404,
            "model 'nope'",
        ),
    ] {
        let response = http
            .post(format!("{base}/v1/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        let answer: Value = response.json().await.unwrap();
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{named}: {answer}");
    }
    assert!(!output.exists());

    let response = http
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"spec": spec, "request_id": "r-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["state"], "QUEUED");
    assert_eq!(job["shards_total"], 3);
    assert_eq!(job["spec"]["input_columns"]["x"], "x");

    let got: Value = http
        .get(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id.as_str());
    let list: Value = http
        .get(format!("{base}/v1/jobs?state=queued&model=scorer"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let bad = http
        .get(format!("{base}/v1/jobs?state=sleeping"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert!(
        bad["error"].as_str().unwrap().starts_with("state:"),
        "{bad}"
    );
    let missing = http
        .get(format!("{base}/v1/jobs/job-nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    let cancelled = http
        .post(format!("{base}/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status().as_u16(), 200);
    let cancelled: Value = cancelled.json().await.unwrap();
    assert_eq!(cancelled["state"], "CANCELLED");
    let again = http
        .post(format!("{base}/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 409);
    let nowhere = http.get(format!("{base}/v2/nothing")).send().await.unwrap();
    assert_eq!(nowhere.status().as_u16(), 404);
    let nowhere: Value = nowhere.json().await.unwrap();
    assert!(nowhere["error"].is_string());

    // The served document equals the committed one.
    let served = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let committed_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/batch-openapi.json");
    if std::env::var_os("SHAMAL_UPDATE_OPENAPI").is_some() {
        std::fs::write(&committed_path, served.clone() + "\n").unwrap();
    }
    let served: Value = serde_json::from_str(&served).unwrap();
    for path in ["/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/cancel"] {
        assert!(served["paths"][path].is_object(), "{path}");
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    let committed: Value = serde_json::from_str(&committed).unwrap_or(Value::Null);
    assert!(
        committed == served,
        "docs/batch-openapi.json is out of date: run this test with SHAMAL_UPDATE_OPENAPI=1"
    );
    running.stop().await.unwrap();
}
