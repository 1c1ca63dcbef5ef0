//! Who may call what on the router: the access each gRPC method and HTTP
//! route needs, and the HTTP layer that enforces it.
//!
//! `ModelInfer` (gRPC and HTTP) is [`Access::Pipeline`]: authenticated and
//! authorised by the inference pipeline's own step (`pipeline`, step 2),
//! where the tenant of the call is also taken from the token. Every other
//! route is checked here, before its handler. A route missing from these
//! tables is refused whether auth is on or off, so a new route without a
//! policy fails every test that calls it.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{Method, header};
use serde_json::json;
use shamal_auth::layer::{Access, Gate, admit};
use shamal_auth::{AuthError, Authenticator, Credentials, Permission};

/// The API label of the router's refusals in `shamal_auth_refusals_total`.
pub const API: &str = "router";

/// Access of each `inference.GRPCInferenceService` and
/// `shamal.async.v1.AsyncInference` method, and of the health service.
pub fn grpc_access(path: &str) -> Option<Access> {
    use Access::{Needs, Pipeline, Public};
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Public,
        // Liveness and readiness say nothing about models; load balancers
        // and Triton's clients ask them before anything else.
        ("inference.GRPCInferenceService", "ServerLive" | "ServerReady") => Public,
        (
            "inference.GRPCInferenceService",
            "ModelReady" | "ServerMetadata" | "ModelMetadata" | "ModelConfig" | "ModelStatistics"
            | "RepositoryIndex",
        ) => Needs(Permission::MetadataRead),
        ("inference.GRPCInferenceService", "ModelInfer") => Pipeline,
        // Not served (UNIMPLEMENTED) but classified, so that a caller gets
        // the honest answer once authenticated.
        ("inference.GRPCInferenceService", "ModelStreamInfer") => Needs(Permission::InferenceCall),
        (
            "inference.GRPCInferenceService",
            "RepositoryModelLoad"
            | "RepositoryModelUnload"
            | "SystemSharedMemoryStatus"
            | "SystemSharedMemoryRegister"
            | "SystemSharedMemoryUnregister"
            | "CudaSharedMemoryStatus"
            | "CudaSharedMemoryRegister"
            | "CudaSharedMemoryUnregister"
            | "TraceSetting"
            | "LogSettings",
        ) => Needs(Permission::Admin),
        ("shamal.async.v1.AsyncInference", _) => Needs(Permission::InferenceCall),
        _ => return None,
    })
}

/// Access of each HTTP route (`route` is axum's matched path).
pub fn http_access(method: &Method, route: &str) -> Option<Access> {
    use Access::{Needs, Pipeline, Public};
    let read = method == Method::GET || method == Method::HEAD;
    Some(match route {
        "/v2/health/live" | "/v2/health/ready" => Public,
        "/v2"
        | "/v2/models/stats"
        | "/v2/models/{model}"
        | "/v2/models/{model}/versions/{version}"
        | "/v2/models/{model}/ready"
        | "/v2/models/{model}/versions/{version}/ready"
        | "/v2/models/{model}/config"
        | "/v2/models/{model}/versions/{version}/config"
        | "/v2/models/{model}/stats"
        | "/v2/models/{model}/versions/{version}/stats"
            if read =>
        {
            Needs(Permission::MetadataRead)
        }
        // A POST that only reads (Triton's protocol says POST).
        "/v2/repository/index" => Needs(Permission::MetadataRead),
        "/v2/models/{model}/infer" | "/v2/models/{model}/versions/{version}/infer" => Pipeline,
        "/v2/models/{model}/infer/async"
        | "/v2/models/{model}/versions/{version}/infer/async"
        | "/v2/async/{id}" => Needs(Permission::InferenceCall),
        _ => return None,
    })
}

/// The HTTP layer (a `route_layer`, so that axum's matched path is known):
/// refuses what the route's access does not admit and leaves the
/// principal in the request's extensions.
pub async fn http_layer(
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
    let permission = match Gate::of(http_access(request.method(), &route), &what) {
        Gate::Open => return next.run(request).await,
        Gate::Check(permission) => permission,
        Gate::Refuse(error) => return refusal(&auth, &route, &error),
    };
    let credentials = Credentials::of(request.headers(), request.extensions());
    match admit(&auth, credentials, permission).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => refusal(&auth, &route, &error),
    }
}

/// A refusal in the v2 protocol's error body, `WWW-Authenticate` on 401;
/// counted and logged.
pub fn refusal(auth: &Authenticator, route: &str, error: &AuthError) -> Response {
    auth.refused(API, route, error);
    let status = error.kind().http_status();
    let mut response = (status, axum::Json(json!({ "error": error.to_string() }))).into_response();
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

    /// Every method of every gRPC service the router serves, read from the
    /// protocols' descriptors: a method added to a `.proto` without a
    /// policy here fails this test.
    #[test]
    fn every_grpc_method_has_a_policy() {
        let mut methods = 0;
        for set in [
            shamal_proto::INFERENCE_DESCRIPTOR_SET,
            shamal_proto::ASYNC_DESCRIPTOR_SET,
        ] {
            let pool = prost_reflect::DescriptorPool::decode(set).unwrap();
            for service in pool.services() {
                if service.full_name() == "shamal.registry.v1.Registry" {
                    continue;
                }
                for method in service.methods() {
                    let path = format!("/{}/{}", service.full_name(), method.name());
                    assert!(grpc_access(&path).is_some(), "{path} has no access policy");
                    methods += 1;
                }
            }
        }
        assert!(methods >= 20, "{methods}");
        assert_eq!(grpc_access("/inference.GRPCInferenceService/Bogus"), None);
        assert_eq!(grpc_access("/some.Other/Method"), None);
        assert_eq!(
            grpc_access("/inference.GRPCInferenceService/ModelInfer"),
            Some(Access::Pipeline)
        );
    }

    #[test]
    fn writes_to_read_routes_have_no_policy() {
        assert_eq!(http_access(&Method::DELETE, "/v2/models/{model}"), None);
        assert_eq!(
            http_access(&Method::GET, "/v2/models/{model}"),
            Some(Access::Needs(Permission::MetadataRead))
        );
        assert_eq!(http_access(&Method::GET, "/v2/unknown"), None);
    }
}
