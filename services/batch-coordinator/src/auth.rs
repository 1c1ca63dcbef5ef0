//! Who may call what on the batch coordinator: the access of each gRPC
//! method and REST route. A method or route missing here is refused
//! whether auth is on or off.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{Method, header};
use shamal_auth::layer::{Access, Gate};
use shamal_auth::{AuthError, Authenticator, Credentials, Permission};

/// The API labels of refusals.
pub const GRPC_API: &str = "batch_grpc";
pub const REST_API: &str = "batch_rest";

/// Access of each `shamal.batch.v1.BatchService` method and of the health
/// service.
pub fn grpc_access(path: &str) -> Option<Access> {
    use Access::{Needs, Public};
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Public,
        ("shamal.batch.v1.BatchService", method) => match method {
            "SubmitJob" | "CancelJob" => Needs(Permission::BatchSubmit),
            "GetJob" | "ListJobs" | "WatchJob" => Needs(Permission::BatchRead),
            _ => return None,
        },
        _ => return None,
    })
}

/// Access of each REST route (as axum matches it).
pub fn rest_access(method: &Method, route: &str) -> Option<Access> {
    use Access::{Needs, Public};
    let read = *method == Method::GET || *method == Method::HEAD;
    match (route, read) {
        ("/openapi.json", true) => Some(Public),
        ("/v1/jobs" | "/v1/jobs/{id}", true) => Some(Needs(Permission::BatchRead)),
        ("/v1/jobs", false) if *method == Method::POST => Some(Needs(Permission::BatchSubmit)),
        ("/v1/jobs/{id}/cancel", false) if *method == Method::POST => {
            Some(Needs(Permission::BatchSubmit))
        }
        _ => None,
    }
}

/// The REST layer: refuses what the route's access does not admit and
/// leaves the principal in the request's extensions.
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
    let admitted = match auth.authenticate(credentials).await {
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

fn refusal(auth: &Authenticator, route: &str, error: &AuthError) -> Response {
    auth.refused(REST_API, route, error);
    let kind = error.kind();
    let mut response = (
        kind.http_status(),
        axum::Json(serde_json::json!({ "error": error.to_string() })),
    )
        .into_response();
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

    /// Every method of the batch protocol, read from its descriptor: a
    /// method added without a policy fails here.
    #[test]
    fn every_grpc_method_has_a_policy() {
        let pool = prost_reflect::DescriptorPool::decode(shamal_proto::BATCH_DESCRIPTOR_SET)
            .unwrap_or_else(|error| panic!("{error}"));
        let mut methods = 0;
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(
                    matches!(grpc_access(&path), Some(Access::Needs(_))),
                    "{path} has no access policy"
                );
                methods += 1;
            }
        }
        assert!(methods >= 5, "{methods}");
        assert_eq!(grpc_access("/shamal.batch.v1.BatchService/Bogus"), None);
        assert_eq!(grpc_access("/shamal.registry.v1.Registry/Watch"), None);
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
            ] {
                if present {
                    let access = rest_access(&method, &path);
                    assert!(
                        matches!(access, Some(Access::Needs(_))),
                        "{method} {path}: {access:?}"
                    );
                    routes += 1;
                }
            }
        }
        assert_eq!(routes, 4);
        assert_eq!(rest_access(&Method::DELETE, "/v1/jobs/{id}"), None);
        assert_eq!(
            rest_access(&Method::POST, "/v1/jobs"),
            Some(Access::Needs(Permission::BatchSubmit))
        );
        assert_eq!(
            rest_access(&Method::GET, "/v1/jobs/{id}"),
            Some(Access::Needs(Permission::BatchRead))
        );
    }
}
