//! The router's audit trail against a real audit service.
//!
//! - Every inference call, refused ones included, has one record naming
//!   the model, the version and worker that answered, the region, the
//!   outcome, and SHA-256 digests of the request and response (never the
//!   payloads).
//! - Kill -9 the audit service (a real process: this test binary started
//!   with `SHAMAL_AUDIT_CHILD` set) under inference load and restart it on
//!   the same database: every request the router answered has exactly one
//!   inference record, none lost, none doubled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shamal_audit_client::AuditClientConfig;
use shamal_proto::inference::*;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use shamal_proto::shamal::audit::v1::{AuditRecord, QueryRequest};
use support::*;

const CHILD: &str = "SHAMAL_AUDIT_CHILD";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child_audit();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let filter = std::env::args().nth(1).filter(|arg| !arg.starts_with('-'));
    let tests: [(&str, fn() -> _); 2] = [
        ("inference_records_say_who_what_where_with_digests", || {
            Box::pin(inference_records_say_who_what_where_with_digests())
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
        }),
        (
            "kill_9_the_audit_service_under_load_loses_and_doubles_nothing",
            || Box::pin(kill_9_the_audit_service_under_load_loses_and_doubles_nothing()),
        ),
    ];
    for (name, test) in tests {
        if filter
            .as_deref()
            .is_some_and(|filter| !name.contains(filter))
        {
            continue;
        }
        println!("test {name} ...");
        runtime.block_on(test());
        println!("test {name} ... ok");
    }
}

// ----- the child: a real audit service on a given port and database ----

fn child_audit() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = std::path::PathBuf::from(std::env::var("SHAMAL_AUDIT_DIR").unwrap());
        let port: u16 = std::env::var("SHAMAL_AUDIT_PORT").unwrap().parse().unwrap();
        let config = shamal_audit_service::AuditConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_listen: None,
            database_url: format!("sqlite://{}?mode=rwc", dir.join("audit.db").display()),
            signing_key_file: dir.join("audit-signing-key.pem"),
            ..shamal_audit_service::AuditConfig::default()
        };
        let listeners = shamal_audit_service::AuditListeners::bind(&config)
            .await
            .unwrap();
        let _running = shamal_audit_service::RunningAudit::start(
            config,
            listeners,
            shamal_telemetry::MetricsRegistry::new(),
        )
        .await
        .unwrap();
        println!("listening");
        std::future::pending::<()>().await;
    });
}

/// An audit service process; killed when dropped.
struct AuditProcess {
    child: Child,
}

impl AuditProcess {
    fn start(dir: &Path, port: u16) -> AuditProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, "audit")
            .env("SHAMAL_AUDIT_DIR", dir)
            .env("SHAMAL_AUDIT_PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "listening", "unexpected child output");
        AuditProcess { child }
    }

    fn kill_9(&mut self) {
        let status = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = self.child.wait();
    }
}

impl Drop for AuditProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- helpers -----------------------------------------------------------

fn demo_request() -> ModelInferRequest {
    let raw: Vec<u8> = (0..16)
        .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
        .collect();
    let input = shamal_tensor::Tensor::from_raw(
        "INPUT0",
        shamal_tensor::DataType::Fp32,
        vec![1, 16],
        bytes::Bytes::from(raw),
    )
    .unwrap();
    let (inputs, raw_input_contents) = shamal_tensor::encode_inputs(&[input]);
    ModelInferRequest {
        model_name: "demo".into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

fn with_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

fn audit_config(endpoint: String, spool: &Path) -> AuditClientConfig {
    AuditClientConfig {
        endpoint: Some(endpoint),
        spool_dir: spool.to_path_buf(),
        retry_min_ms: 20,
        retry_max_ms: 200,
        request_timeout_ms: 2_000,
        ..AuditClientConfig::default()
    }
}

/// Every inference record in the log, by request id.
async fn inference_records(audit: &str) -> HashMap<String, Vec<AuditRecord>> {
    let mut client = AuditServiceClient::connect(format!("http://{audit}"))
        .await
        .unwrap();
    let mut by_id: HashMap<String, Vec<AuditRecord>> = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .query(QueryRequest {
                action: "inference".into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for record in page.records {
            let id = record.event.as_ref().unwrap().request_id.clone();
            by_id.entry(id).or_default().push(record);
        }
        if page.next_page_token.is_empty() {
            return by_id;
        }
        page_token = page.next_page_token;
    }
}

/// Waits until the log holds a record for each of `ids`.
async fn wait_recorded(audit: &str, ids: &[String]) -> HashMap<String, Vec<AuditRecord>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = inference_records(audit).await;
        let missing = ids.iter().filter(|id| !records.contains_key(*id)).count();
        if missing == 0 {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} answered requests have no audit record after 60 s",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ----- the tests ---------------------------------------------------------

async fn inference_records_say_who_what_where_with_digests() {
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
    let worker = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    let worker_address = worker.address.to_string();
    let spool = dir.path().join("spool");
    let endpoint = audit_address.clone();
    let router = start_router(vec![worker_address.clone()], |config| {
        config.audit = audit_config(endpoint, &spool);
        config.static_worker_region = "uae-north".into();
    })
    .await;
    wait_ready(router.running.address, "demo").await;
    let mut grpc = client(router.running.address).await;

    let request = demo_request();
    let answer = grpc
        .model_infer(with_id(request.clone(), "audit-ok-1"))
        .await
        .unwrap()
        .into_inner();
    let unknown = grpc
        .model_infer(with_id(
            ModelInferRequest {
                model_name: "nope".into(),
                ..request.clone()
            },
            "audit-unknown-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let mut elsewhere = request.clone();
    elsewhere.parameters.insert(
        "shamal-allowed-regions".into(),
        InferParameter {
            parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(
                "eu-west-1".into(),
            )),
        },
    );
    let refused = grpc
        .model_infer(with_id(elsewhere, "audit-residency-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let ids = ["audit-ok-1", "audit-unknown-1", "audit-residency-1"].map(str::to_owned);
    let records = wait_recorded(&audit_address, &ids).await;
    let one = |id: &str| {
        let records = &records[id];
        assert_eq!(records.len(), 1, "{id}: {records:?}");
        records[0].event.clone().unwrap()
    };
    let ok = one("audit-ok-1");
    assert_eq!(ok.service, "router");
    assert_eq!(ok.action, "inference");
    assert_eq!(ok.outcome, "ok");
    assert_eq!(ok.actor, "anonymous");
    assert_eq!(ok.model, "demo");
    assert_eq!(ok.version, answer.model_version);
    assert_eq!(ok.worker, worker_address);
    assert_eq!(ok.region, "uae-north");
    assert!(ok.latency_us > 0);
    // Digests of the protobuf encodings, never the payloads.
    assert_eq!(
        ok.request_sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            prost::Message::encode_to_vec(&request)
        ))
    );
    assert_eq!(
        ok.response_sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            prost::Message::encode_to_vec(&answer)
        ))
    );
    let unknown = one("audit-unknown-1");
    assert_eq!(
        (unknown.outcome.as_str(), unknown.model.as_str()),
        ("not_found", "nope")
    );
    assert!(unknown.response_sha256.is_empty());
    let residency = one("audit-residency-1");
    assert_eq!(residency.outcome, "failed_precondition");
    assert!(residency.reason.contains("eu-west-1"), "{residency:?}");

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
    audit.stop().await.unwrap();
}

async fn kill_9_the_audit_service_under_load_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let audit_address = format!("127.0.0.1:{port}");
    let mut audit = AuditProcess::start(dir.path(), port);
    let worker = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    let spool = dir.path().join("spool");
    let endpoint = audit_address.clone();
    let router = start_router(vec![worker.address.to_string()], |config| {
        config.audit = audit_config(endpoint, &spool);
    })
    .await;
    wait_ready(router.running.address, "demo").await;

    // Load from four callers, each request with its own id; the ids the
    // router answered are kept.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let address = router.running.address;
    let load: Vec<_> = (0..4)
        .map(|caller| {
            let (stop, answered) = (stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut grpc = client(address).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("load-{caller}-{n}");
                    n += 1;
                    if grpc.model_infer(with_id(demo_request(), &id)).await.is_ok() {
                        answered.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    audit.kill_9();
    // The router keeps answering while the audit service is down: the
    // records wait in its spool.
    let before = answered.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = answered.lock().unwrap().len();
    assert!(
        during > before,
        "the router stopped answering while the audit service was down"
    );
    let mut audit = AuditProcess::start(dir.path(), port);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // And once more, killed right in the middle of shipping.
    audit.kill_9();
    let audit = AuditProcess::start(dir.path(), port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 100, "too little load: {}", answered.len());

    let records = wait_recorded(&audit_address, &answered).await;
    let doubled: Vec<_> = records
        .iter()
        .filter(|(_, records)| records.len() > 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(doubled.is_empty(), "requests recorded twice: {doubled:?}");
    let answered_set: std::collections::HashSet<_> = answered.iter().collect();
    let extra = records
        .keys()
        .filter(|id| !answered_set.contains(id))
        .count();
    println!(
        "answered {}, recorded {}, recorded without an answer seen by the caller {extra}",
        answered.len(),
        records.len()
    );
    // The chain is intact after the crashes.
    let mut client = AuditServiceClient::connect(format!("http://{audit_address}"))
        .await
        .unwrap();
    let verdict = client
        .verify(shamal_proto::shamal::audit::v1::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "{verdict:?}");

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
    drop(audit);
}
