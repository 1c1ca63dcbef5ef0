//! Zero trust end to end: a worker that takes only mTLS callers with the
//! router (or batch) role, a router serving TLS with OIDC + RBAC in front
//! of it, and a real OpenID provider issuing the tokens.
//!
//! - A token of the `inference` role calls a model over HTTPS and gRPC; no
//!   token is UNAUTHENTICATED / 401 with `WWW-Authenticate`; a `viewer`
//!   token is PERMISSION_DENIED / 403 naming `inference:call`; a request
//!   naming a tenant other than its token's is refused; refusals are
//!   counted.
//! - A batch coordinator's certificate (a service identity) may call
//!   models without a token.
//! - The worker refuses a peer whose certificate names another role
//!   (the registry's) and one without a certificate.
#![allow(clippy::unwrap_used)]

mod support;

#[path = "../../../tests/support/oidc.rs"]
mod oidc;

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use shamal_auth::security::SecurityConfig;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::*;
use shamal_tls::{ClientTls, DevPki, DevPkiOptions, init_dev_pki};
use support::*;
use tonic::transport::Endpoint;

fn security(pki: &DevPki, service: &str, issuer: Option<&str>) -> SecurityConfig {
    let files = pki.files(service);
    SecurityConfig {
        tls_cert: Some(files.cert),
        tls_key: Some(files.key),
        tls_ca: Some(files.ca),
        oidc_issuer: issuer.map(str::to_owned),
        oidc_audience: issuer.map(|_| oidc::AUDIENCE.to_owned()),
        ..SecurityConfig::default()
    }
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// An HTTPS client that trusts the development CA and presents no
/// certificate: how people and applications reach the router.
fn https_client(ca: &Path) -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// One HTTPS call: status, `WWW-Authenticate` (when sent) and body.
async fn https(
    client: &HttpsClient,
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Option<String>, String) {
    use http_body_util::BodyExt;
    let mut request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|value| value.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        challenge,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A gRPC client presenting `service`'s certificate.
fn mtls_client(
    pki: &DevPki,
    service: &str,
    address: std::net::SocketAddr,
) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    let tls = ClientTls::new(&pki.files(service)).unwrap();
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", address.port())).unwrap();
    GrpcInferenceServiceClient::new(tls.connect_lazy(endpoint))
}

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

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

const HTTP_BODY: &str = r#"{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"FP32","data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}"#;

#[tokio::test]
async fn callers_are_authenticated_and_authorised_end_to_end() {
    let Some(issuer) = oidc::issuer("router zero trust") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = init_dev_pki(dir.path(), &DevPkiOptions::default()).unwrap();
    let worker = start_worker(workspace_root().join("models/repository"), |args| {
        let files = pki.files("worker");
        args.node.security.tls_cert = Some(files.cert);
        args.node.security.tls_key = Some(files.key);
        args.node.security.tls_ca = Some(files.ca);
    })
    .await;
    // The audit service, on mTLS: the router records every refusal there.
    let audit = {
        let config = shamal_audit_service::AuditConfig {
            grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            database_url: format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("audit.db").display()
            ),
            signing_key_file: dir.path().join("audit-signing-key.pem"),
            security: security(&pki, "audit", None),
            ..shamal_audit_service::AuditConfig::default()
        };
        let listeners = shamal_audit_service::AuditListeners::bind(&config)
            .await
            .unwrap();
        shamal_audit_service::RunningAudit::start(config, listeners, Default::default())
            .await
            .unwrap()
    };
    let router = start_router(vec![worker.address.to_string()], |config| {
        config.security = security(&pki, "router", Some(&issuer));
        config.audit.endpoint = Some(format!("https://localhost:{}", audit.grpc_address.port()));
        config.audit.spool_dir = dir.path().join("router-audit-spool");
    })
    .await;
    let inference = oidc::token(&issuer, "shamal-inference").await;
    let viewer = oidc::token(&issuer, "shamal-viewer").await;

    // gRPC with a token, over TLS (the router's port takes optional client
    // certificates: this client presents the batch service's).
    let mut grpc = mtls_client(&pki, "batch", router.running.address);
    let mut ready = false;
    for _ in 0..300 {
        let answer = grpc
            .model_ready(with_token(
                ModelReadyRequest {
                    name: "demo".into(),
                    version: String::new(),
                },
                &inference,
            ))
            .await;
        if answer.is_ok_and(|answer| answer.into_inner().ready) {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "the router never reached the mTLS worker");
    let answer = grpc
        .model_infer(with_token(demo_request(), &inference))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().model_name, "demo");
    // The batch coordinator's certificate alone is a service principal
    // allowed to call models.
    grpc.model_infer(demo_request()).await.unwrap();
    // A viewer may read metadata but not call models.
    let refused = grpc
        .model_infer(with_token(demo_request(), &viewer))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("inference:call"), "{refused:?}");
    grpc.model_metadata(with_token(
        ModelMetadataRequest {
            name: "demo".into(),
            version: String::new(),
        },
        &viewer,
    ))
    .await
    .unwrap();
    // A forged token is refused even with a service certificate beside it.
    let forged = grpc
        .model_infer(with_token(demo_request(), "e30.e30.c2ln"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);

    // HTTPS with a token, no client certificate.
    let web = https_client(&pki.files("router").ca);
    let url = format!(
        "https://localhost:{}/v2/models/demo/infer",
        router.http.port()
    );
    let (status, _, body) = https(&web, "POST", &url, Some(&inference), &[], HTTP_BODY).await;
    assert_eq!(status, 200, "{body}");
    let (status, challenge, _) = https(&web, "POST", &url, None, &[], HTTP_BODY).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().starts_with("Bearer realm=\"shamal\""));
    let (status, _, body) = https(&web, "POST", &url, Some(&viewer), &[], HTTP_BODY).await;
    assert_eq!(status, 403);
    assert!(body.contains("inference:call"), "{body}");
    // The tenant is the token's (acme): naming another is refused.
    let globex = [("x-shamal-tenant", "globex")];
    let (status, _, body) = https(&web, "POST", &url, Some(&inference), &globex, HTTP_BODY).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("tenant"), "{body}");
    // Metadata needs a token too; liveness does not.
    let metadata = format!("https://localhost:{}/v2/models/demo", router.http.port());
    assert_eq!(https(&web, "GET", &metadata, None, &[], "").await.0, 401);
    assert_eq!(
        https(&web, "GET", &metadata, Some(&viewer), &[], "")
            .await
            .0,
        200
    );
    let live = format!("https://localhost:{}/v2/health/live", router.http.port());
    assert_eq!(https(&web, "GET", &live, None, &[], "").await.0, 200);
    // Plaintext to the TLS port is not served.
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/v2/health/live",
            router.http.port()
        ))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // Every refusal is counted.
    let metrics = router_metrics(&router).await;
    let refused = |reason: &str| {
        metrics
            .lines()
            .find(|line| {
                line.starts_with("shamal_auth_refusals_total")
                    && line.contains("api=\"router\"")
                    && line.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(refused("unauthenticated") >= 3.0, "{metrics}");
    assert!(refused("permission_denied") >= 2.0, "{metrics}");

    // And recorded: a refused ModelInfer (gRPC or HTTP) as that call's
    // inference record, every other refusal (here the metadata route
    // without a token) as `auth.refused`; each exactly once.
    router.running.stop().await.unwrap();
    let records = |action: &'static str| {
        let log = audit.log.clone();
        async move {
            log.query(&shamal_audit_service::log::Query {
                action: action.to_owned(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .records
        }
    };
    let refusals = records("auth.refused").await;
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert_eq!(refusals[0].event.outcome, "unauthenticated");
    assert_eq!(refusals[0].event.actor, "anonymous");
    assert!(
        refusals[0]
            .event
            .reason
            .contains("router /v2/models/{model}"),
        "{}",
        refusals[0].event.reason
    );
    let inferences = records("inference").await;
    let outcomes = |outcome: &str| {
        inferences
            .iter()
            .filter(|record| record.event.outcome == outcome)
            .count()
    };
    // gRPC viewer and forged token, HTTPS without a token, viewer, and the
    // other tenant.
    assert_eq!(outcomes("permission_denied"), 3, "{inferences:#?}");
    assert_eq!(outcomes("unauthenticated"), 2, "{inferences:#?}");
    assert_eq!(outcomes("ok"), 3, "{inferences:#?}");

    // The worker itself: the registry's certificate names the wrong role;
    // the router's is right.
    let mut as_registry = mtls_client(&pki, "registry", worker.address);
    let refused = as_registry.model_infer(demo_request()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let mut as_router = mtls_client(&pki, "router", worker.address);
    as_router.model_infer(demo_request()).await.unwrap();
    // And a peer without a certificate does not get past the handshake.
    let mut plaintext = client(worker.address).await;
    assert!(plaintext.model_infer(demo_request()).await.is_err());

    worker.stop().await.unwrap();
    audit.stop().await.unwrap();
}

/// A model limited to listed tenants or groups (set in the registry,
/// applied by the router through Watch) refuses callers of other tenants
/// and groups with PERMISSION_DENIED, whatever their role, but not admins.
#[tokio::test]
async fn a_model_limited_to_tenants_or_groups_refuses_other_callers() {
    let Some(issuer) = oidc::issuer("model access") else {
        return;
    };
    let stack = RegistryStack::start(TestDb::sqlite()).await;
    let registry_address = stack.registry.grpc_address.to_string();
    let worker = stack.worker.address.to_string();
    let router = start_router(vec![worker], |config| {
        config.registry = Some(registry_address);
        config.router_id = "router-access".into();
        config.security = SecurityConfig {
            oidc_issuer: Some(issuer.clone()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            ..SecurityConfig::default()
        };
    })
    .await;
    // shamal-inference: tenant acme, group apps; shamal-inference-globex:
    // tenant globex, group apps; shamal-admin: tenant acme, group ops.
    let acme = oidc::token(&issuer, "shamal-inference").await;
    let globex = oidc::token(&issuer, "shamal-inference-globex").await;
    let admin = oidc::token(&issuer, "shamal-admin").await;
    let address = router.running.address;
    let call = |token: String| async move {
        client(address)
            .await
            .model_infer(with_token(simple_infer_request("1"), &token))
            .await
    };
    let limited = |answer: &Result<tonic::Response<ModelInferResponse>, tonic::Status>| {
        answer.as_ref().is_err_and(|status| {
            status.code() == tonic::Code::PermissionDenied
                && status
                    .message()
                    .contains("limited to listed tenants or groups")
        })
    };
    wait_until("acme calls the unlimited model", || async {
        call(acme.clone()).await.is_ok()
    })
    .await;

    // Limited to tenant globex: acme's caller is refused, globex's and the
    // admin are not.
    let registry = stack.registry();
    let only = |tenants: &[&str], groups: &[&str]| shamal_registry::model::SetAccess {
        allowed_tenants: tenants.iter().map(|s| (*s).to_owned()).collect(),
        allowed_groups: groups.iter().map(|s| (*s).to_owned()).collect(),
    };
    registry
        .set_model_access(MODEL, only(&["globex"], &[]), "tester")
        .await
        .unwrap();
    wait_until("the tenant limit is applied", || async {
        limited(&call(acme.clone()).await)
    })
    .await;
    let refused = call(acme.clone()).await.unwrap_err();
    assert!(refused.message().contains("model 'simple'"), "{refused:?}");
    assert_eq!(
        answered_version(&call(globex.clone()).await.unwrap().into_inner()),
        1
    );
    call(admin.clone()).await.unwrap();

    // Limited to group apps: both inference callers are in it.
    registry
        .set_model_access(MODEL, only(&[], &["apps"]), "tester")
        .await
        .unwrap();
    wait_until("the group limit is applied", || async {
        call(acme.clone()).await.is_ok()
    })
    .await;
    call(globex.clone()).await.unwrap();

    // Limited to group ops: neither inference caller; the admin always.
    registry
        .set_model_access(MODEL, only(&[], &["ops"]), "tester")
        .await
        .unwrap();
    wait_until("the ops limit is applied", || async {
        limited(&call(globex.clone()).await)
    })
    .await;
    assert!(limited(&call(acme.clone()).await));
    call(admin.clone()).await.unwrap();

    // Lifted: everyone with the inference role again.
    registry
        .set_model_access(MODEL, only(&[], &[]), "tester")
        .await
        .unwrap();
    wait_until("the limit is lifted", || async {
        call(acme.clone()).await.is_ok()
    })
    .await;

    router.running.stop().await.unwrap();
    stack.stop().await;
}
