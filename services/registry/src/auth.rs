//! Who may call what on the registry: the access of each gRPC method and
//! REST route, and the REST layer that enforces it (the gRPC one is
//! `shamal_auth::layer::GrpcAuthLayer` over [`grpc_access`]).
//!
//! A route missing from these tables is refused whether auth is on or
//! off, so a new route without a policy fails every test that calls it;
//! the RBAC matrix test walks every method of the protocol and every
//! route of the OpenAPI document against every role.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{Method, header};
use shamal_auth::layer::{Access, Gate};
use shamal_auth::{AuthError, Authenticator, Credentials, Permission};

use crate::rest::ApiError;

/// The API labels of the registry's refusals.
pub const GRPC_API: &str = "registry_grpc";
pub const REST_API: &str = "registry_rest";

/// Access of each `shamal.registry.v1.Registry` method and of the health
/// service.
pub fn grpc_access(path: &str) -> Option<Access> {
    use Access::{Needs, Public};
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Public,
        ("shamal.registry.v1.Registry", method) => Needs(match method {
            "Watch" => Permission::RegistryWatch,
            "RegisterWorker" | "Heartbeat" | "DeregisterWorker" | "ReportPlacement" => {
                Permission::WorkersRegister
            }
            "FetchArtifact" => Permission::ArtifactsFetch,
            "ReportTraffic" => Permission::TrafficReport,
            "GetModel" => Permission::ModelsRead,
            _ => return None,
        }),
        _ => return None,
    })
}

/// Access of each REST route (`route` is axum's matched path).
pub fn rest_access(method: &Method, route: &str) -> Option<Access> {
    use Access::{Needs, Public};
    use Permission as P;
    let read = *method == Method::GET || *method == Method::HEAD;
    let needs = |permission| Some(Needs(permission));
    match (route, read) {
        // The web UI's page and the API document: the UI logs in itself.
        ("/" | "/openapi.json", true) => Some(Public),
        // The web UI's login and session (`rest::session`): they
        // authenticate themselves.
        ("/login" | "/oidc/callback" | "/session", true) => Some(Public),
        ("/logout", false) if *method == Method::POST => Some(Public),
        ("/v1/workers", true) => needs(P::WorkersRead),
        (_, true) if route.starts_with("/v1/") => needs(P::ModelsRead),
        ("/v1/models" | "/v1/models/{name}/versions", false) if *method == Method::POST => {
            needs(P::ModelsWrite)
        }
        ("/v1/artifacts/{sha256}", false) if *method == Method::PUT => needs(P::ModelsWrite),
        (
            "/v1/models/{name}/versions/{version}/archive"
            | "/v1/models/{name}/versions/{version}/retry",
            false,
        ) => needs(P::ModelsWrite),
        ("/v1/models/{name}/rollout", false) if *method == Method::POST => needs(P::RolloutsStart),
        (
            "/v1/models/{name}/rollout/policy"
            | "/v1/models/{name}/rollout/shift"
            | "/v1/models/{name}/rollout/promote"
            | "/v1/models/{name}/rollout/rollback"
            | "/v1/models/{name}/rollout/pause"
            | "/v1/models/{name}/rollout/resume"
            | "/v1/models/{name}/aliases/{alias}",
            false,
        ) => needs(P::RolloutsManage),
        (
            "/v1/models/{name}/residency"
            | "/v1/residency/tenants/{tenant}"
            | "/v1/models/{name}/placement",
            false,
        ) => needs(P::ResidencyWrite),
        ("/v1/models/{name}/access", false) => needs(P::AccessWrite),
        ("/v1/admin/rekey", false) => needs(P::Admin),
        _ => None,
    }
}

/// The REST layer (a `route_layer`, so that the matched route names the
/// policy): refuses what the route's access does not admit and leaves the
/// principal in the request's extensions (the actor of a change).
pub async fn rest_layer(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    let what = format!("{} {route}", request.method());
    let permission = match Gate::of(rest_access(request.method(), &route), &what) {
        Gate::Open => return next.run(request).await,
        Gate::Check(permission) => permission,
        Gate::Refuse(error) => return refusal(&auth, &route, &error),
    };
    let credentials = Credentials::of(request.headers(), request.extensions());
    // The web UI's session cookie (with its CSRF token on changes) when
    // there is one and no Authorization header; else the token or the
    // certificate.
    let authenticated = match crate::rest::session::credentials(&request) {
        Some(by_session) => match by_session.await {
            Ok(principal) => Ok(principal),
            Err(refused) => return refused,
        },
        None => auth.authenticate(credentials).await,
    };
    let admitted = match authenticated {
        Ok(principal) => principal.require(permission).map(|()| principal),
        Err(error) => Err(error),
    };
    match admitted {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => refusal(&auth, &route, &error),
    }
}

/// A refusal as the REST API's JSON error, `WWW-Authenticate` on 401;
/// counted and logged.
fn refusal(auth: &Authenticator, route: &str, error: &AuthError) -> Response {
    auth.refused(REST_API, route, error);
    let kind = error.kind();
    let mut response =
        ApiError::new(kind.http_status(), kind.label(), error.to_string()).into_response();
    if let Some(value) = error.challenge() {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the registry's protocol, read from its descriptor: a
    /// method added without a policy fails here.
    #[test]
    fn every_grpc_method_has_a_policy() {
        let pool =
            prost_reflect::DescriptorPool::decode(shamal_proto::REGISTRY_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(grpc_access(&path).is_some(), "{path} has no access policy");
                methods += 1;
            }
        }
        assert!(methods >= 8, "{methods}");
        assert_eq!(grpc_access("/shamal.registry.v1.Registry/Bogus"), None);
    }

    /// Every route of the OpenAPI document has a policy.
    #[test]
    fn every_rest_route_has_a_policy() {
        let document = crate::rest::openapi();
        let mut routes = 0;
        for (path, item) in document.paths.paths {
            for (method, present) in [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::DELETE, item.delete.is_some()),
                (Method::HEAD, item.head.is_some()),
            ] {
                if present {
                    let access = rest_access(&method, &path);
                    let public = path == "/" || path == "/openapi.json";
                    assert!(
                        matches!(access, Some(Access::Needs(_)))
                            || (public && access == Some(Access::Public)),
                        "{method} {path}: {access:?}"
                    );
                    routes += 1;
                }
            }
        }
        assert!(routes >= 30, "{routes}");
        assert_eq!(rest_access(&Method::PATCH, "/v1/models"), None);
    }
}
