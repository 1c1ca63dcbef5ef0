//! Authentication and authorisation as a `tower` layer in front of a gRPC
//! server: each method's [`Access`] comes from the service's route table,
//! so a method without an entry is refused (deny by default), and the
//! [`Principal`] it admits is left in the request's extensions for the
//! handler (the actor of a change, the tenant of a call).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use tower::{Layer, Service};

use crate::authenticator::{Authenticator, Credentials};
use crate::error::AuthError;
use crate::principal::Principal;
use crate::rbac::Permission;

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health probes, the UI's login page).
    Public,
    /// An authenticated principal holding the permission.
    Needs(Permission),
    /// Authenticated and authorised further in, by the service's own
    /// declared pipeline (the router's ModelInfer).
    Pipeline,
}

/// What a route's access means for one request, before any credential is
/// read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Let it through unchecked (public, or checked by the service's own
    /// pipeline).
    Open,
    /// Authenticate the caller and require the permission.
    Check(Permission),
    /// No access policy for the route: refused, auth on or off.
    Refuse(AuthError),
}

impl Gate {
    /// The gate of a route whose access is `access` (`None`: the route
    /// table has no entry; `what` names the route in the refusal).
    pub fn of(access: Option<Access>, what: &str) -> Gate {
        match access {
            Some(Access::Public) | Some(Access::Pipeline) => Gate::Open,
            Some(Access::Needs(permission)) => Gate::Check(permission),
            None => Gate::Refuse(AuthError::Forbidden {
                permission: Permission::Admin,
                who: format!("every caller ({what} has no access policy)"),
                actor: String::new(),
            }),
        }
    }
}

/// Authenticates `credentials` and requires `permission` of the principal.
pub async fn admit(
    auth: &Authenticator,
    credentials: Credentials<'_>,
    permission: Permission,
) -> Result<Principal, AuthError> {
    let principal = auth.authenticate(credentials).await?;
    principal.require(permission)?;
    Ok(principal)
}

/// A service's route table: the access a gRPC method path
/// (`/package.Service/Method`) needs; `None` for a method it does not know.
pub type RouteTable = fn(&str) -> Option<Access>;

/// The layer: `api` names the API in metrics and logs.
#[derive(Clone)]
pub struct GrpcAuthLayer {
    auth: Arc<Authenticator>,
    routes: RouteTable,
    api: &'static str,
}

impl GrpcAuthLayer {
    pub fn new(auth: Arc<Authenticator>, routes: RouteTable, api: &'static str) -> GrpcAuthLayer {
        GrpcAuthLayer { auth, routes, api }
    }
}

impl<S> Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;

    fn layer(&self, inner: S) -> GrpcAuth<S> {
        GrpcAuth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    layer: GrpcAuthLayer,
}

type Boxed<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B, R> Service<http::Request<B>> for GrpcAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<S::Future, Boxed<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let layer = &self.layer;
        let path = request.uri().path();
        let permission = match Gate::of((layer.routes)(path), path) {
            Gate::Open => return Either::Left(self.inner.call(request)),
            Gate::Check(permission) => permission,
            Gate::Refuse(error) => return Either::Right(refuse(layer, path, error)),
        };
        let known = layer
            .auth
            .authenticate_now(Credentials::of(request.headers(), request.extensions()));
        match known {
            Some(Ok(principal)) => match principal.require(permission) {
                Ok(()) => {
                    request.extensions_mut().insert(principal);
                    Either::Left(self.inner.call(request))
                }
                Err(error) => Either::Right(refuse(layer, request.uri().path(), error)),
            },
            Some(Err(error)) => Either::Right(refuse(layer, request.uri().path(), error)),
            None => {
                // An unseen token: validate it off the fast path.
                let layer = layer.clone();
                let inner = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, inner);
                Either::Right(Box::pin(async move {
                    let credentials = Credentials::of(request.headers(), request.extensions());
                    match admit(&layer.auth, credentials, permission).await {
                        Ok(principal) => {
                            request.extensions_mut().insert(principal);
                            inner.call(request).await
                        }
                        Err(error) => {
                            count(&layer, request.uri().path(), &error);
                            Ok(refusal(&error))
                        }
                    }
                }))
            }
        }
    }
}

fn refuse<R: Default + Send + 'static, E: Send + 'static>(
    layer: &GrpcAuthLayer,
    path: &str,
    error: AuthError,
) -> Boxed<http::Response<R>, E> {
    count(layer, path, &error);
    Box::pin(futures::future::ready(Ok(refusal(&error))))
}

fn count(layer: &GrpcAuthLayer, path: &str, error: &AuthError) {
    layer.auth.refused(layer.api, path, error);
}

/// A refusal as a gRPC response (trailers-only), with `WWW-Authenticate`
/// on UNAUTHENTICATED.
pub fn refusal<R: Default>(error: &AuthError) -> http::Response<R> {
    let mut response = error.to_status().into_http();
    if let Some(value) = error.challenge() {
        response
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, value);
    }
    response
}

/// The principal a layer admitted, from a handler's request extensions;
/// anonymous when none was recorded (auth off, or a public route).
pub fn principal_of(extensions: &http::Extensions) -> Principal {
    extensions
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal::Anonymous)
}
