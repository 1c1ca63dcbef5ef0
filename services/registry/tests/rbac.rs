//! The RBAC matrix of the registry, against a real OpenID provider: every
//! REST route of the OpenAPI document and every gRPC method of the
//! protocol, called by every role (and without a token, and with a token
//! without roles). A caller is refused exactly when its role lacks the
//! route's permission: UNAUTHENTICATED / 401 with `WWW-Authenticate`
//! without a token, PERMISSION_DENIED / 403 naming the permission with one.
//! Routes come from the route tables, so a new route without a policy
//! fails here (and everywhere: it is refused).
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/support/services.rs"]
mod services;

#[path = "../../../tests/support/oidc.rs"]
mod oidc;

use std::collections::BTreeMap;

use http::Method;
use shamal_auth::layer::Access;
use shamal_auth::security::SecurityConfig;
use shamal_auth::{Permission, Role};
use shamal_registry::auth::{grpc_access, rest_access};

/// The callers: a client of each role, one without roles, and nobody.
const CLIENTS: [(&str, Option<Role>); 6] = [
    ("shamal-viewer", Some(Role::Viewer)),
    ("shamal-inference", Some(Role::Inference)),
    ("shamal-data-scientist", Some(Role::DataScientist)),
    ("shamal-release-manager", Some(Role::ReleaseManager)),
    ("shamal-admin", Some(Role::Admin)),
    ("shamal-noroles", None),
];

fn config(issuer: &str, dir: &std::path::Path) -> shamal_registry::RegistryConfig {
    shamal_registry::RegistryConfig {
        security: SecurityConfig {
            oidc_issuer: Some(issuer.to_owned()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            ..SecurityConfig::default()
        },
        http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: format!("sqlite://{}?mode=rwc", dir.join("registry.db").display()),
        artifact_dir: dir.join("artifacts"),
        ..Default::default()
    }
}

async fn start(issuer: &str, dir: &std::path::Path) -> shamal_registry::RunningRegistry {
    let config = config(issuer, dir);
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap();
    shamal_registry::RunningRegistry::start(config, listeners, Default::default())
        .await
        .unwrap()
}

/// A concrete path for a route template.
fn concrete(route: &str) -> String {
    route
        .replace("{name}", "matrix-model")
        .replace("{version}", "1")
        .replace("{alias}", "prod")
        .replace("{tenant}", "acme")
        .replace("{sha256}", &"0".repeat(64))
}

#[tokio::test]
async fn every_rest_route_admits_exactly_the_roles_holding_its_permission() {
    let Some(issuer) = oidc::issuer("registry rbac (REST)") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = start(&issuer, dir.path()).await;
    let mut tokens = BTreeMap::new();
    for (client, _) in CLIENTS {
        tokens.insert(client, oidc::token(&issuer, client).await);
    }
    let http = reqwest::Client::new();
    let base = format!("http://{}", registry.http_address);
    let mut checked = 0;
    for (route, item) in shamal_registry::rest::openapi().paths.paths {
        for (method, present) in [
            (Method::GET, item.get.is_some()),
            (Method::POST, item.post.is_some()),
            (Method::PUT, item.put.is_some()),
            (Method::DELETE, item.delete.is_some()),
            (Method::HEAD, item.head.is_some()),
        ] {
            if !present {
                continue;
            }
            let permission = match rest_access(&method, &route) {
                Some(Access::Needs(permission)) => permission,
                // The UI's page and the API document only.
                Some(Access::Public) if route == "/" || route == "/openapi.json" => continue,
                other => panic!("{method} {route}: {other:?}"),
            };
            let url = format!("{base}{}", concrete(&route));
            let request = |token: Option<&str>| {
                let mut request = http
                    .request(method.clone(), &url)
                    .header("content-type", "application/json")
                    .body("{}");
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                request
            };
            // Nobody: 401 with a Bearer challenge.
            let response = request(None).send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {route} without a token");
            let challenge = response.headers()["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            // A forged token: 401 invalid_token.
            let response = request(Some("e30.e30.c2ln")).send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {route} bad token");
            for (client, role) in CLIENTS {
                let allowed = role.is_some_and(|role| role.allows(permission));
                let response = request(Some(&tokens[client])).send().await.unwrap();
                let status = response.status().as_u16();
                if allowed {
                    assert!(
                        status != 401 && status != 403,
                        "{client} refused {method} {route} ({permission}): {status} {}",
                        response.text().await.unwrap()
                    );
                } else {
                    let body = response.text().await.unwrap();
                    assert_eq!(status, 403, "{client} {method} {route}: {body}");
                    // A HEAD answer has no body to name it in.
                    if method != Method::HEAD {
                        assert!(body.contains(permission.name()), "{body}");
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 30 * CLIENTS.len(), "{checked}");
    registry.stop().await.unwrap();
}

/// A gRPC call with an empty message to `path`, returning its status code
/// (`Ok` counts as allowed, like any code other than the two refusals).
async fn call(channel: tonic::transport::Channel, path: &str, token: Option<&str>) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request.set_timeout(std::time::Duration::from_secs(2));
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::try_from(path.to_owned()).unwrap();
    match grpc.server_streaming(request, path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_grpc_method_admits_exactly_the_roles_holding_its_permission() {
    let Some(issuer) = oidc::issuer("registry rbac (gRPC)") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = start(&issuer, dir.path()).await;
    let channel = shamal_registry_client::channel(&registry.grpc_address.to_string()).unwrap();
    let pool =
        prost_reflect::DescriptorPool::decode(shamal_proto::REGISTRY_DESCRIPTOR_SET).unwrap();
    let mut checked = 0;
    for service in pool.services() {
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            let Some(Access::Needs(permission)) = grpc_access(&path) else {
                panic!("{path} has no policy");
            };
            assert_eq!(
                call(channel.clone(), &path, None).await,
                tonic::Code::Unauthenticated,
                "{path} without a token"
            );
            for (client, role) in CLIENTS {
                let token = oidc::token(&issuer, client).await;
                let allowed = role.is_some_and(|role| role.allows(permission));
                let code = call(channel.clone(), &path, Some(&token)).await;
                if allowed {
                    assert!(
                        !matches!(
                            code,
                            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                        ),
                        "{client} refused {path} ({permission}): {code:?}"
                    );
                } else {
                    assert_eq!(code, tonic::Code::PermissionDenied, "{client} {path}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 8 * CLIENTS.len());
    // Only admins among people hold the services' permissions.
    assert!(!Role::ReleaseManager.allows(Permission::WorkersRegister));
    registry.stop().await.unwrap();
}

/// Refused calls reach the audit log as `auth.refused` records naming the
/// caller, the route and the reason; admitted reads leave no record.
#[tokio::test]
async fn refused_calls_are_audited() {
    let Some(issuer) = oidc::issuer("registry refusals audited") else {
        return;
    };
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
    let auditor = shamal_audit_client::Auditor::start(
        shamal_audit_client::AuditClientConfig {
            endpoint: Some(format!("http://{}", audit.grpc_address)),
            spool_dir: dir.path().join("audit-spool"),
            ..Default::default()
        },
        None,
        "registry",
        "registry-rbac",
        &prometheus::Registry::new(),
    )
    .unwrap();
    let config = config(&issuer, dir.path());
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap();
    let registry = shamal_registry::RunningRegistry::start_with_auditor(
        config,
        listeners,
        Default::default(),
        auditor.clone(),
    )
    .await
    .unwrap();
    let viewer = oidc::token(&issuer, "shamal-viewer").await;
    let (_, claims) = shamal_auth::decode_unverified(&viewer).unwrap();
    let http = reqwest::Client::new();
    let models = format!("http://{}/v1/models", registry.http_address);
    // Refused: a viewer creating a model (403), nobody listing (401), and
    // nobody over gRPC.
    let response = http
        .post(&models)
        .bearer_auth(&viewer)
        .json(&serde_json::json!({"name": "refused-model"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(http.get(&models).send().await.unwrap().status(), 401);
    let channel = shamal_registry_client::channel(&registry.grpc_address.to_string()).unwrap();
    assert_eq!(
        call(channel, "/shamal.registry.v1.Registry/Watch", None).await,
        tonic::Code::Unauthenticated
    );
    // Admitted: not recorded.
    let response = http.get(&models).bearer_auth(&viewer).send().await.unwrap();
    assert_eq!(response.status(), 200);

    auditor
        .drain(std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let page = audit
        .log
        .query(&shamal_audit_service::log::Query {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let records: Vec<_> = page.records.iter().map(|record| &record.event).collect();
    assert_eq!(records.len(), 3, "{records:#?}");
    assert!(records.iter().all(|event| event.action == "auth.refused"));
    assert_eq!(records[0].outcome, "permission_denied");
    assert_eq!(
        records[0].actor,
        claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .unwrap()
    );
    assert!(
        records[0].reason.contains("registry_rest /v1/models")
            && records[0].reason.contains("models:write"),
        "{}",
        records[0].reason
    );
    assert_eq!(
        (records[1].outcome.as_str(), records[1].actor.as_str()),
        ("unauthenticated", "anonymous")
    );
    assert!(
        records[1].reason.contains("registry_rest /v1/models"),
        "{}",
        records[1].reason
    );
    assert!(
        records[2]
            .reason
            .contains("/shamal.registry.v1.Registry/Watch"),
        "{}",
        records[2].reason
    );
    assert!(records.iter().all(|event| event.service == "registry"));
    registry.stop().await.unwrap();
    auditor.shutdown().await;
    audit.stop().await.unwrap();
}
