//! The gRPC API end to end on loopback, against a server the test starts:
//! Append, Query, Export (streamed, then verified offline with the key
//! PublicKey serves), Verify, INVALID_ARGUMENT naming the field; and the
//! access table with auth on: mTLS service identities (development
//! certificates) and OIDC roles (the real provider, when configured).
#![allow(clippy::unwrap_used)]

mod support;

#[path = "../../../tests/support/oidc.rs"]
mod oidc;

use std::net::SocketAddr;

use shamal_audit::export::Line;
use shamal_audit_service::{AuditConfig, AuditListeners, RunningAudit};
use shamal_auth::security::SecurityConfig;
use shamal_proto::shamal::audit::v1 as proto;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use shamal_tls::{ClientTls, DevPkiOptions, DevService, init_dev_pki};
use support::*;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn proto_events(range: std::ops::Range<u64>) -> Vec<proto::AuditEvent> {
    events(range).into_iter().map(Into::into).collect()
}

async fn plain_client(address: SocketAddr) -> AuditServiceClient<Channel> {
    AuditServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

/// Exports `[since, until)` over gRPC into export lines.
async fn export(
    client: &mut AuditServiceClient<Channel>,
    since_ms: i64,
    until_ms: i64,
) -> Vec<Line> {
    let mut stream = client
        .export(proto::ExportRequest { since_ms, until_ms })
        .await
        .unwrap()
        .into_inner();
    let mut lines = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        lines.push(Line::try_from(item).unwrap());
    }
    lines
}

async fn end_to_end(db: &TestDb) {
    let audit = RunningAudit::start_local(&db.url, db.dir.path())
        .await
        .unwrap();
    let mut client = plain_client(audit.grpc_address).await;

    // Append, then the producer's retry.
    let appended = client
        .append(proto::AppendRequest {
            events: proto_events(0..40),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (appended.appended, appended.duplicates, appended.head_seq),
        (40, 0, 40)
    );
    let retried = client
        .append(proto::AppendRequest {
            events: proto_events(20..60),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retried.appended, retried.duplicates, retried.head_seq),
        (20, 20, 60)
    );

    // A bad event: INVALID_ARGUMENT naming its index and field; nothing written.
    let mut bad = proto_events(60..63);
    bad[1].occurred_at_ms = 0;
    let status = client
        .append(proto::AppendRequest { events: bad })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("events[1].occurred_at_ms: "),
        "{}",
        status.message()
    );
    let mut bad = proto_events(60..61);
    bad[0].response_sha256 = "not-a-digest".into();
    let status = client
        .append(proto::AppendRequest { events: bad })
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("events[0].response_sha256: "),
        "{}",
        status.message()
    );

    // Query, paged.
    let mut seqs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .query(proto::QueryRequest {
                tenant: "acme".into(),
                page_size: 25,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seqs.extend(page.records.iter().map(|record| record.seq));
        assert!(
            page.records
                .iter()
                .all(|record| record.event.as_ref().unwrap().tenant == "acme")
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    for (request, field) in [
        (
            proto::QueryRequest {
                page_size: 1001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            proto::QueryRequest {
                page_token: "seven".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let status = client.query(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{}",
            status.message()
        );
    }
    let status = client
        .export(proto::ExportRequest {
            since_ms: 100,
            until_ms: 50,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("until_ms: "), "{status:?}");

    // Export (with a checkpoint in it), verified offline with the key
    // PublicKey serves.
    // (The service's own checkpointer may have signed one already.)
    audit.log.checkpoint().await.unwrap();
    client
        .append(proto::AppendRequest {
            events: proto_events(60..70),
        })
        .await
        .unwrap();
    let key = client
        .public_key(proto::PublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let public_key = shamal_audit::PublicKey::from_bytes(&key.public_key).unwrap();
    assert_eq!(public_key.key_id(), key.key_id);
    assert_eq!(
        shamal_audit::PublicKey::from_pem(&key.pem).unwrap(),
        public_key
    );
    let lines = export(&mut client, 0, 0).await;
    assert!(matches!(lines.last(), Some(Line::Seal(_))));
    let report = verify_offline(&lines, &public_key).unwrap();
    assert_eq!((report.records, report.last_seq), (70, 70));
    assert!(report.checkpoints >= 1, "{report:?}");

    // Verify over gRPC.
    let verified = client
        .verify(proto::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(
        (verified.records_checked, verified.checkpoints_checked),
        (70, report.checkpoints)
    );
    audit.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_end_to_end_sqlite() {
    end_to_end(&TestDb::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_end_to_end_postgres() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    end_to_end(&db).await;
}

/// A client presenting `service`'s development certificate.
fn mtls_client(
    pki: &shamal_tls::DevPki,
    service: &str,
    address: SocketAddr,
) -> AuditServiceClient<Channel> {
    let tls = ClientTls::new(&pki.files(service))
        .unwrap()
        .expect_service("audit");
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", address.port())).unwrap();
    AuditServiceClient::new(tls.connect_lazy(endpoint))
}

async fn start_with(db: &TestDb, security: SecurityConfig) -> RunningAudit {
    let config = AuditConfig {
        security,
        grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: db.url.clone(),
        signing_key_file: db.key_file(),
        ..AuditConfig::default()
    };
    let listeners = AuditListeners::bind(&config).await.unwrap();
    RunningAudit::start(config, listeners, Default::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_producers_append_and_other_services_are_refused() {
    let db = TestDb::sqlite().await;
    let pki_dir = tempfile::tempdir().unwrap();
    let mut options = DevPkiOptions::default();
    options.services.push(DevService::new("stranger"));
    let pki = init_dev_pki(pki_dir.path(), &options).unwrap();
    let files = pki.files("audit");
    let audit = start_with(
        &db,
        SecurityConfig {
            tls_cert: Some(files.cert),
            tls_key: Some(files.key),
            tls_ca: Some(files.ca),
            ..SecurityConfig::default()
        },
    )
    .await;
    let address = audit.grpc_address;
    let append = |service: &'static str, from: u64| {
        let mut client = mtls_client(&pki, service, address);
        async move {
            client
                .append(proto::AppendRequest {
                    events: proto_events(from..from + 3),
                })
                .await
        }
    };
    // The registry, routers, batch coordinators and workers (async jobs,
    // batch shards) append.
    for (service, from) in [
        ("registry", 0),
        ("router", 10),
        ("batch", 20),
        ("worker", 30),
    ] {
        let appended = append(service, from).await.unwrap().into_inner();
        assert_eq!(appended.appended, 3, "{service}");
    }
    // The audit service itself may not.
    for service in ["audit"] {
        let status = append(service, 40).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{service}: {status:?}"
        );
        assert!(status.message().contains("audit:append"), "{status:?}");
    }
    // A certificate naming no Shamal service is not a caller at all.
    let status = append("stranger", 50).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // No service reads the log: that is admins' (tokens).
    let mut registry = mtls_client(&pki, "registry", address);
    let status = registry
        .query(proto::QueryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("audit:read"), "{status:?}");
    let status = registry
        .export(proto::ExportRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = registry.verify(proto::VerifyRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // The public key is public.
    let mut stranger = mtls_client(&pki, "stranger", address);
    let key = stranger
        .public_key(proto::PublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.key_id, audit.log.public_key().key_id());
    // Plaintext does not get past the TLS port.
    let plaintext = AuditServiceClient::connect(format!("http://{address}")).await;
    if let Ok(mut plaintext) = plaintext {
        assert!(
            plaintext
                .public_key(proto::PublicKeyRequest {})
                .await
                .is_err()
        );
    }
    // The twelve appended events, and the five refusals recorded in the
    // service's own log (asynchronously: wait for them).
    let mut head = 0;
    for _ in 0..100 {
        head = audit.log.head().await.unwrap().seq;
        if head >= 17 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(head, 17);
    let refusals = audit
        .log
        .query(&shamal_audit_service::log::Query {
            action: "auth.refused".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .records;
    let summary: Vec<(String, String, bool)> = refusals
        .iter()
        .map(|record| {
            (
                record.event.outcome.clone(),
                record.event.actor.clone(),
                record
                    .event
                    .reason
                    .contains("/shamal.audit.v1.AuditService/"),
            )
        })
        .collect();
    let denied = |refusal: &(String, String, bool), service: &str| {
        refusal.0 == "permission_denied"
            && refusal.1.starts_with("spiffe://")
            && refusal.1.contains(&format!("/{service}/"))
            && refusal.2
    };
    assert_eq!(summary.len(), 5, "{summary:#?}");
    assert!(denied(&summary[0], "audit"), "{summary:#?}");
    assert_eq!(summary[1].0, "unauthenticated");
    assert!(
        summary[2..]
            .iter()
            .all(|refusal| denied(refusal, "registry")),
        "{summary:#?}"
    );
    assert!(
        refusals
            .iter()
            .all(|record| record.event.service == "audit")
    );
    audit.stop().await.unwrap();
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Every method against every role of the real provider: reading needs
/// `audit:read` (admins), appending `audit:append` (admins among people),
/// PublicKey nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_roles_read_and_append_as_the_rbac_table_says() {
    let Some(issuer) = oidc::issuer("audit rbac (gRPC)") else {
        return;
    };
    let db = TestDb::sqlite().await;
    let audit = start_with(
        &db,
        SecurityConfig {
            oidc_issuer: Some(issuer.clone()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            ..SecurityConfig::default()
        },
    )
    .await;
    let mut client = plain_client(audit.grpc_address).await;
    let clients = [
        ("shamal-viewer", false),
        ("shamal-inference", false),
        ("shamal-data-scientist", false),
        ("shamal-release-manager", false),
        ("shamal-admin", true),
    ];
    let mut tokens = Vec::new();
    for (name, admin) in clients {
        tokens.push((name, Some(oidc::token(&issuer, name).await), admin));
    }
    tokens.push(("nobody", None, false));
    for (index, (name, token, admin)) in tokens.iter().enumerate() {
        let token = token.as_deref();
        let expect = |result: Result<(), tonic::Status>, what: &str| match (admin, result) {
            (true, Ok(())) => {}
            (false, Err(status)) => {
                let code = if token.is_some() {
                    Code::PermissionDenied
                } else {
                    Code::Unauthenticated
                };
                assert_eq!(status.code(), code, "{name} {what}: {status:?}");
            }
            (admin, result) => panic!("{name} (admin {admin}) {what}: {result:?}"),
        };
        let from = index as u64 * 10;
        expect(
            client
                .append(with_token(
                    proto::AppendRequest {
                        events: proto_events(from..from + 2),
                    },
                    token,
                ))
                .await
                .map(drop),
            "Append",
        );
        expect(
            client
                .query(with_token(proto::QueryRequest::default(), token))
                .await
                .map(drop),
            "Query",
        );
        expect(
            client
                .verify(with_token(proto::VerifyRequest {}, token))
                .await
                .map(drop),
            "Verify",
        );
        let exported = match client
            .export(with_token(proto::ExportRequest::default(), token))
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut items = 0;
                while stream.message().await.unwrap().is_some() {
                    items += 1;
                }
                assert!(items >= 1);
                Ok(())
            }
            Err(status) => Err(status),
        };
        expect(exported, "Export");
        // PublicKey: anyone.
        client
            .public_key(with_token(proto::PublicKeyRequest {}, token))
            .await
            .unwrap();
    }
    // Only the admin's two events were appended; each of the 20 refusals
    // (four roles and nobody, four methods each) was recorded by the
    // service itself, asynchronously.
    let mut head = 0;
    for _ in 0..100 {
        head = audit.log.head().await.unwrap().seq;
        if head >= 22 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(head, 22);
    let records = audit
        .log
        .query(&shamal_audit_service::log::Query {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .records;
    let refusals = records
        .iter()
        .filter(|record| record.event.action == "auth.refused")
        .count();
    assert_eq!((records.len() - refusals, refusals), (2, 20));
    audit.stop().await.unwrap();
}
