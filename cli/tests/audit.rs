//! `shamal audit` against a real audit service started in-process (SQLite
//! in a temporary directory): export then verify offline with the key
//! `public-key` fetched, a tampered export naming the edited record, query
//! filters and output formats, usage errors, and (with the test OpenID
//! provider) a viewer's token refused with exit 6.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/support/services.rs"]
mod services;

#[path = "../../tests/support/oidc.rs"]
mod oidc;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use serde_json::Value;
use shamal_audit_service::{AuditConfig, AuditListeners, RunningAudit};
use shamal_auth::security::SecurityConfig;
use shamal_proto::shamal::audit::v1 as pb;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;

/// A `shamal` command with its own config directory (no stored login) and
/// no token or audit URL from the environment.
async fn shamal(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shamal"));
    command
        .args(args)
        .env("XDG_CONFIG_HOME", home)
        .env("HOME", home)
        .env("RUST_LOG", "warn")
        .env("SHAMAL_ACTOR", "tester")
        .env_remove("SHAMAL_TOKEN")
        .env_remove("SHAMAL_AUDIT_URL")
        .env_remove("SHAMAL_AUDIT_CA")
        .env_remove("SHAMAL_OIDC_ISSUER");
    for (name, value) in envs {
        command.env(name, value);
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Inference calls of fraud-detector v3 (EU) and churn v1 (US), and a
/// registry mutation.
fn events() -> Vec<pb::AuditEvent> {
    let at = now_ms() - 60_000;
    let inference = |n: u64, model: &str, version: &str, region: &str| pb::AuditEvent {
        event_id: format!("cli-test-{n}"),
        occurred_at_ms: at + n as i64,
        service: "router".to_owned(),
        instance: "router-0".to_owned(),
        action: "inference".to_owned(),
        outcome: "ok".to_owned(),
        actor: "alice".to_owned(),
        client_id: "shamal-inference".to_owned(),
        tenant: "acme".to_owned(),
        model: model.to_owned(),
        version: version.to_owned(),
        region: region.to_owned(),
        worker: "worker-1".to_owned(),
        request_id: format!("req-{n}"),
        latency_us: 1_234 + n,
        request_sha256: "ab".repeat(32),
        response_sha256: "cd".repeat(32),
        ..pb::AuditEvent::default()
    };
    vec![
        inference(1, "fraud-detector", "3", "eu-west"),
        inference(2, "churn", "1", "us-east"),
        inference(3, "fraud-detector", "3", "eu-west"),
        pb::AuditEvent {
            event_id: "cli-test-4".to_owned(),
            occurred_at_ms: at + 4,
            service: "registry".to_owned(),
            instance: "registry-0".to_owned(),
            action: "model.create".to_owned(),
            outcome: "ok".to_owned(),
            actor: "bob".to_owned(),
            model: "sentiment".to_owned(),
            after_json: r#"{"name":"sentiment"}"#.to_owned(),
            ..pb::AuditEvent::default()
        },
        inference(5, "fraud-detector", "3", "eu-west"),
    ]
}

struct Audit {
    running: RunningAudit,
    dir: tempfile::TempDir,
    url: String,
}

/// An audit service on loopback with the test events appended and a
/// checkpoint after record 3.
async fn start(security: SecurityConfig) -> Audit {
    let dir = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        security,
        grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("audit.db").display()
        ),
        signing_key_file: dir.path().join("audit-signing-key.pem"),
        ..AuditConfig::default()
    };
    let listeners = AuditListeners::bind(&config).await.unwrap();
    let running = RunningAudit::start(config, listeners, Default::default())
        .await
        .unwrap();
    let url = format!("http://{}", running.grpc_address);
    let mut events = events();
    let later = events.split_off(3);
    running
        .log
        .append(events.into_iter().map(Into::into).collect())
        .await
        .unwrap();
    running.log.checkpoint().await.unwrap();
    running
        .log
        .append(later.into_iter().map(Into::into).collect())
        .await
        .unwrap();
    Audit { running, dir, url }
}

/// Appends through the gRPC API (auth off), as a producer would.
async fn append_over_grpc(url: &str, events: Vec<pb::AuditEvent>) -> pb::AppendResponse {
    let mut client = AuditServiceClient::connect(url.to_owned()).await.unwrap();
    client
        .append(pb::AppendRequest { events })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_verifies_offline_and_a_tampered_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let home = config_dir.path();
    let audit = start_empty().await;
    let appended = append_over_grpc(&audit.url, events()).await;
    assert_eq!((appended.appended, appended.head_seq), (5, 5));
    // The producer's retry: nothing doubled.
    let again = append_over_grpc(&audit.url, events()).await;
    assert_eq!((again.appended, again.duplicates), (0, 5));
    audit.running.log.checkpoint().await.unwrap();
    let url = audit.url.as_str();

    // The key, to stdout and to a file; its id on stderr.
    let printed = shamal(home, &["audit", "public-key", "--audit", url], &[]).await;
    assert_eq!(code(&printed), 0, "{}", stderr(&printed));
    let key_id = audit.running.log.public_key().key_id();
    assert!(
        stdout(&printed).starts_with("-----BEGIN PUBLIC KEY-----"),
        "{}",
        stdout(&printed)
    );
    assert!(stderr(&printed).contains(&key_id), "{}", stderr(&printed));
    let key = dir.path().join("audit-key.pem");
    let written = shamal(
        home,
        &["audit", "public-key", "--out", key.to_str().unwrap()],
        &[("SHAMAL_AUDIT_URL", url)],
    )
    .await;
    assert_eq!(code(&written), 0, "{}", stderr(&written));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), stdout(&printed));

    // Export everything.
    let file = dir.path().join("audit.jsonl");
    let exported = shamal(
        home,
        &[
            "audit",
            "export",
            "--since",
            "1h",
            "--out",
            file.to_str().unwrap(),
            "--audit",
            url,
        ],
        &[],
    )
    .await;
    assert_eq!(code(&exported), 0, "{}", stderr(&exported));
    assert!(
        stdout(&exported).contains("exported 5 records (seq 1..=5), 1 checkpoints, 0 tombstones"),
        "{}",
        stdout(&exported)
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|name| name.ends_with(".partial")),
        "{names:?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 5 + 1 + 1, "{text}");

    // Offline: the audit URL points nowhere.
    let offline = [("SHAMAL_AUDIT_URL", "http://127.0.0.1:1")];
    let verified = shamal(
        home,
        &[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
        ],
        &offline,
    )
    .await;
    assert_eq!(code(&verified), 0, "{}", stderr(&verified));
    let summary = stdout(&verified);
    for expected in [
        "verified",
        "records:",
        " 5",
        "checkpoints:",
        "seq range:",
        "1..=5",
        &key_id,
    ] {
        assert!(summary.contains(expected), "{expected}: {summary}");
    }

    // Edit one field of record 3: verification names it.
    let tampered_file = dir.path().join("tampered.jsonl");
    let tampered: Vec<String> = text
        .lines()
        .map(|line| {
            let mut value: Value = serde_json::from_str(line).unwrap();
            if value["type"] == "record" && value["seq"] == 3 {
                value["event"]["model"] = Value::from("innocent-model");
                serde_json::to_string(&value).unwrap()
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_ne!(tampered.join("\n"), text.trim_end());
    std::fs::write(&tampered_file, tampered.join("\n") + "\n").unwrap();
    let refused = shamal(
        home,
        &[
            "audit",
            "verify",
            tampered_file.to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
        ],
        &offline,
    )
    .await;
    assert_eq!(code(&refused), 7, "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("line 3, record 3: edited") && message.contains("first bad record: seq 3"),
        "{message}"
    );

    // Another key: refused as well.
    let other_key = dir.path().join("other.pem");
    std::fs::write(
        &other_key,
        shamal_audit::Signer::generate().public_key().to_pem(),
    )
    .unwrap();
    let wrong = shamal(
        home,
        &[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--public-key",
            other_key.to_str().unwrap(),
        ],
        &offline,
    )
    .await;
    assert_eq!(code(&wrong), 7, "{}", stderr(&wrong));
    assert!(stderr(&wrong).contains("wrong key"), "{}", stderr(&wrong));

    // A missing file is not a verification failure: exit 1.
    let missing = shamal(
        home,
        &[
            "audit",
            "verify",
            dir.path().join("nope.jsonl").to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
        ],
        &offline,
    )
    .await;
    assert_eq!(code(&missing), 1, "{}", stderr(&missing));

    // The service's own check.
    let log = shamal(home, &["audit", "verify-log", "--audit", url], &[]).await;
    assert_eq!(code(&log), 0, "{}", stderr(&log));
    assert!(
        stdout(&log).starts_with("ok: 5 records"),
        "{}",
        stdout(&log)
    );
    audit.running.stop().await.unwrap();
    drop(audit.dir);
}

/// An audit service with nothing appended yet.
async fn start_empty() -> Audit {
    let dir = tempfile::tempdir().unwrap();
    let running = RunningAudit::start_local(
        &format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("audit.db").display()
        ),
        dir.path(),
    )
    .await
    .unwrap();
    let url = format!("http://{}", running.grpc_address);
    Audit { running, dir, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_and_prints_a_table_or_json() {
    let config_dir = tempfile::tempdir().unwrap();
    let home = config_dir.path();
    let audit = start(SecurityConfig::default()).await;
    let url = audit.url.as_str();

    let table = shamal(
        home,
        &[
            "audit",
            "query",
            "--model",
            "fraud-detector",
            "--audit",
            url,
        ],
        &[],
    )
    .await;
    assert_eq!(code(&table), 0, "{}", stderr(&table));
    let text = stdout(&table);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    for column in [
        "SEQ",
        "TIME (UTC)",
        "SERVICE",
        "ACTION",
        "OUTCOME",
        "ACTOR",
        "TENANT",
        "MODEL",
        "VERSION",
        "REGION",
        "LATENCY",
    ] {
        assert!(header.contains(column), "{column}: {header}");
    }
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows.iter().all(|row| row.contains("fraud-detector")
            && row.contains("eu-west")
            && row.contains("inference")
            && row.contains("ms")),
        "{text}"
    );
    assert!(!text.contains("churn"), "{text}");
    assert!(rows[0].starts_with("1 "), "{text}");

    // JSON: the records as in an export, filtered by action and region.
    let json = shamal(
        home,
        &[
            "audit",
            "query",
            "--action",
            "inference",
            "--region",
            "us-east",
            "--since",
            "1h",
            "--output",
            "json",
            "--audit",
            url,
        ],
        &[],
    )
    .await;
    assert_eq!(code(&json), 0, "{}", stderr(&json));
    let answer: Value = serde_json::from_str(&stdout(&json)).unwrap();
    let records = answer["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{answer}");
    assert_eq!(records[0]["seq"], 2);
    assert_eq!(records[0]["event"]["model"], "churn");
    assert_eq!(records[0]["event"]["request_sha256"], "ab".repeat(32));
    assert_eq!(records[0]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(answer["more"], false);

    // The actor filter, and a limit that leaves records out.
    let by_actor = shamal(
        home,
        &[
            "audit", "query", "--actor", "bob", "--output", "json", "--audit", url,
        ],
        &[],
    )
    .await;
    let answer: Value = serde_json::from_str(&stdout(&by_actor)).unwrap();
    assert_eq!(answer["records"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer["records"][0]["event"]["action"], "model.create");
    let limited = shamal(
        home,
        &["audit", "query", "--limit", "2", "--audit", url],
        &[],
    )
    .await;
    assert_eq!(code(&limited), 0, "{}", stderr(&limited));
    assert_eq!(
        stdout(&limited).lines().count(),
        1 + 2,
        "{}",
        stdout(&limited)
    );
    assert!(
        stderr(&limited).contains("more records match"),
        "{}",
        stderr(&limited)
    );
    let future = shamal(
        home,
        &[
            "audit",
            "query",
            "--since",
            "2999-01-01T00:00:00Z",
            "--audit",
            url,
        ],
        &[],
    )
    .await;
    assert_eq!(code(&future), 0, "{}", stderr(&future));
    assert_eq!(stdout(&future).trim(), "no matching records");
    audit.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_times_and_urls_are_usage_errors_and_unreachable_is_1() {
    let config_dir = tempfile::tempdir().unwrap();
    let home = config_dir.path();
    let out = config_dir.path().join("x.jsonl");
    let bad_since = shamal(
        home,
        &[
            "audit",
            "export",
            "--since",
            "yesterday",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code(&bad_since), 2, "{}", stderr(&bad_since));
    assert!(
        stderr(&bad_since).contains("--since") && stderr(&bad_since).contains("yesterday"),
        "{}",
        stderr(&bad_since)
    );
    let bad_until = shamal(
        home,
        &["audit", "query", "--until", "2026-02-30T00:00:00Z"],
        &[],
    )
    .await;
    assert_eq!(code(&bad_until), 2, "{}", stderr(&bad_until));
    assert!(
        stderr(&bad_until).contains("--until"),
        "{}",
        stderr(&bad_until)
    );
    let bad_url = shamal(home, &["audit", "query", "--audit", "ftp://x"], &[]).await;
    assert_eq!(code(&bad_url), 2, "{}", stderr(&bad_url));
    assert!(stderr(&bad_url).contains("--audit"), "{}", stderr(&bad_url));
    let unreachable = shamal(
        home,
        &[
            "audit",
            "export",
            "--out",
            out.to_str().unwrap(),
            "--audit",
            "http://127.0.0.1:1",
        ],
        &[],
    )
    .await;
    assert_eq!(code(&unreachable), 1, "{}", stderr(&unreachable));
    assert!(
        stderr(&unreachable).contains("cannot reach the audit service at http://127.0.0.1:1"),
        "{}",
        stderr(&unreachable)
    );
    assert!(!out.exists());
}

/// With OIDC on: reading needs the admin role (exit 6 for a viewer), no
/// token is exit 5, the public key needs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_cannot_read_the_audit_log() {
    let Some(issuer) = oidc::issuer("shamal audit with OIDC on") else {
        return;
    };
    let config_dir = tempfile::tempdir().unwrap();
    let home = config_dir.path();
    let audit = start(SecurityConfig {
        oidc_issuer: Some(issuer.clone()),
        oidc_audience: Some(oidc::AUDIENCE.to_owned()),
        ..SecurityConfig::default()
    })
    .await;
    let url = audit.url.as_str();
    let viewer = oidc::token(&issuer, "shamal-viewer").await;
    let admin = oidc::token(&issuer, "shamal-admin").await;
    let refused = shamal(
        home,
        &["audit", "query", "--audit", url],
        &[("SHAMAL_TOKEN", &viewer)],
    )
    .await;
    assert_eq!(code(&refused), 6, "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("permission denied"),
        "{}",
        stderr(&refused)
    );
    let anonymous = shamal(home, &["audit", "query", "--audit", url], &[]).await;
    assert_eq!(code(&anonymous), 5, "{}", stderr(&anonymous));
    // The admin reads the five events and the two refusals above, which
    // the audit service records in its own log (asynchronously: wait).
    let mut allowed = None;
    for _ in 0..50 {
        let output = shamal(
            home,
            &["audit", "query", "--audit", url, "--token", &admin],
            &[],
        )
        .await;
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        let done = stdout(&output).lines().count() >= 1 + 5 + 2;
        allowed = Some(output);
        if done {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let allowed = stdout(&allowed.unwrap());
    assert_eq!(allowed.lines().count(), 1 + 5 + 2, "{allowed}");
    assert_eq!(
        allowed
            .lines()
            .filter(|line| line.contains("auth.refused"))
            .count(),
        2,
        "{allowed}"
    );
    let key = shamal(home, &["audit", "public-key", "--audit", url], &[]).await;
    assert_eq!(code(&key), 0, "{}", stderr(&key));
    audit.running.stop().await.unwrap();
}

/// Over https with the development CA (`--audit-ca`): the public key needs
/// no credentials; reading without a token is refused (exit 5); without
/// the CA the server's certificate is not trusted (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_given_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = shamal_tls::init_dev_pki(pki_dir.path(), &Default::default()).unwrap();
    let files = pki.files("audit");
    let ca = files.ca.clone();
    let config_dir = tempfile::tempdir().unwrap();
    let home = config_dir.path();
    let audit = start(SecurityConfig {
        tls_cert: Some(files.cert),
        tls_key: Some(files.key),
        tls_ca: Some(files.ca),
        ..SecurityConfig::default()
    })
    .await;
    let url = format!("https://localhost:{}", audit.running.grpc_address.port());
    let key = shamal(
        home,
        &["audit", "public-key", "--audit", &url],
        &[("SHAMAL_AUDIT_CA", ca.to_str().unwrap())],
    )
    .await;
    assert_eq!(code(&key), 0, "{}", stderr(&key));
    assert!(
        stdout(&key).contains("BEGIN PUBLIC KEY"),
        "{}",
        stdout(&key)
    );
    let query = shamal(
        home,
        &[
            "audit",
            "query",
            "--audit",
            &url,
            "--audit-ca",
            ca.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code(&query), 5, "{}", stderr(&query));
    let untrusted = shamal(
        home,
        &["audit", "public-key", "--audit", &url],
        &[(
            "SSL_CERT_FILE",
            ca.with_file_name("none.pem").to_str().unwrap(),
        )],
    )
    .await;
    assert_eq!(code(&untrusted), 1, "{}", stderr(&untrusted));
    audit.running.stop().await.unwrap();
}
