//! Turning a call's credentials into a [`Principal`]: the peer's mTLS
//! identity, the bearer token, or (auth off) nobody.

use std::sync::{Arc, OnceLock};

use shamal_tls::PeerIdentity;

use crate::error::AuthError;
use crate::metrics::AuthMetrics;
use crate::principal::Principal;
use crate::validator::TokenValidator;

/// One refusal, as [`Authenticator::refused`] reports it.
#[derive(Clone, Copy, Debug)]
pub struct Refusal<'a> {
    /// The API label (`router`, `registry-grpc`, ...).
    pub api: &'a str,
    /// The gRPC method path or HTTP route refused.
    pub method: &'a str,
    pub error: &'a AuthError,
}

/// Told of every refusal an [`Authenticator`] reports: the services' audit
/// trail (`shamal-audit-client`'s `RefusalRecorder`). Called on the
/// refusing task: it must not block.
pub trait RefusalObserver: Send + Sync + 'static {
    fn refused(&self, refusal: Refusal<'_>);
}

/// What a call presented: the identity in its client certificate (when the
/// connection is mTLS and the certificate has one) and its
/// `Authorization` header.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    pub peer: Option<&'a PeerIdentity>,
    pub authorization: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    /// The credentials of an HTTP request or gRPC call: the `authorization`
    /// header and the peer identity the TLS listener recorded.
    pub fn of(headers: &'a http::HeaderMap, extensions: &'a http::Extensions) -> Credentials<'a> {
        Credentials {
            peer: shamal_tls::peer_info(extensions).and_then(|info| info.identity.as_ref()),
            authorization: headers
                .get(http::header::AUTHORIZATION)
                .map(|value| value.to_str().unwrap_or("\u{0}")),
        }
    }
}

/// Authenticates calls for one service.
///
/// - Auth off ([`Authenticator::off`]): every call is [`Principal::Anonymous`].
/// - A bearer token, when OIDC is on, names a user (or application); it
///   wins over a certificate, since it names who the call is for.
/// - Otherwise a client certificate from this trust domain naming a Shamal
///   service makes a service principal.
/// - Anything else is UNAUTHENTICATED: deny by default.
pub struct Authenticator {
    tokens: Option<TokenValidator>,
    trust_domain: Option<String>,
    metrics: Option<AuthMetrics>,
    /// Callers without credentials are anonymous rather than refused: a
    /// service started insecure with TLS but no OIDC (`shamal up --tls`).
    anonymous: bool,
    /// Set once, after start (the auditor starts after the authenticator).
    observer: OnceLock<Arc<dyn RefusalObserver>>,
}

impl Authenticator {
    /// No authentication: every caller is anonymous and may do anything.
    pub fn off() -> Arc<Authenticator> {
        Arc::new(Authenticator {
            tokens: None,
            trust_domain: None,
            metrics: None,
            anonymous: true,
            observer: OnceLock::new(),
        })
    }

    /// Tokens validated by `tokens` (OIDC on), and certificates of
    /// `trust_domain` (mTLS on); at least one should be given.
    pub fn new(
        tokens: Option<TokenValidator>,
        trust_domain: Option<String>,
        metrics: Option<AuthMetrics>,
    ) -> Arc<Authenticator> {
        Arc::new(Authenticator {
            tokens,
            trust_domain,
            metrics,
            anonymous: false,
            observer: OnceLock::new(),
        })
    }

    /// Like [`Authenticator::new`], but a caller without credentials is
    /// [`Principal::Anonymous`] instead of refused (insecure mode: TLS on,
    /// OIDC off). Certificates and tokens are still checked when sent.
    pub fn admitting_anonymous(
        trust_domain: Option<String>,
        metrics: Option<AuthMetrics>,
    ) -> Arc<Authenticator> {
        Arc::new(Authenticator {
            tokens: None,
            trust_domain,
            metrics,
            anonymous: true,
            observer: OnceLock::new(),
        })
    }

    /// Whether callers are authenticated at all.
    pub fn is_on(&self) -> bool {
        self.tokens.is_some() || self.trust_domain.is_some()
    }

    /// Whether bearer tokens are accepted (OIDC on).
    pub fn tokens_on(&self) -> bool {
        self.tokens.is_some()
    }

    pub fn metrics(&self) -> Option<&AuthMetrics> {
        self.metrics.as_ref()
    }

    /// Logs a refusal of a call to `api`'s `method`, counts it when this
    /// authenticator keeps metrics, and tells the refusal observer (the
    /// audit trail) when one is set.
    pub fn refused(&self, api: &str, method: &str, error: &AuthError) {
        self.count_refusal(api, method, error);
        if let Some(observer) = self.observer.get() {
            observer.refused(Refusal { api, method, error });
        }
    }

    /// [`Authenticator::refused`] without the observer: for a caller that
    /// records the refusal in its own audit record (the router's inference
    /// pipeline records a refused ModelInfer as that call's record).
    pub fn count_refusal(&self, api: &str, method: &str, error: &AuthError) {
        match &self.metrics {
            Some(metrics) => metrics.refused(api, method, error),
            None => crate::metrics::log_refusal(api, method, error),
        }
    }

    /// Sets the observer every later refusal is reported to; `false` when
    /// one was already set (the first stays).
    pub fn observe_refusals(&self, observer: Arc<dyn RefusalObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// The principal behind `credentials`, when it can be told without
    /// waiting: auth off, a service certificate, a cached token, or a
    /// refusal that needs no key. `None`: the token must be validated
    /// ([`Authenticator::authenticate`]).
    pub fn authenticate_now(
        &self,
        credentials: Credentials<'_>,
    ) -> Option<Result<Principal, AuthError>> {
        if !self.is_on() {
            return Some(Ok(Principal::Anonymous));
        }
        if let Some(header) = credentials.authorization {
            let Some(tokens) = &self.tokens else {
                return Some(Err(AuthError::malformed(
                    "bearer tokens are not accepted here (no OIDC issuer is configured)",
                )));
            };
            let token = match crate::bearer::bearer_token(Some(header)) {
                Ok(token) => token,
                Err(error) => return Some(Err(error)),
            };
            return tokens.cached(token).map(|user| Ok(Principal::User(user)));
        }
        Some(self.certificate_principal(credentials.peer))
    }

    /// The principal behind `credentials`, validating a token not seen
    /// before (which may fetch the provider's keys).
    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Principal, AuthError> {
        if let Some(known) = self.authenticate_now(credentials) {
            return known;
        }
        match (&self.tokens, credentials.authorization) {
            (Some(tokens), Some(header)) => {
                tokens.authenticate(Some(header)).await.map(Principal::User)
            }
            _ => self.certificate_principal(credentials.peer),
        }
    }

    fn certificate_principal(&self, peer: Option<&PeerIdentity>) -> Result<Principal, AuthError> {
        match (peer, &self.trust_domain) {
            (Some(identity), Some(trust_domain)) => {
                Principal::service(identity.clone(), trust_domain).ok_or_else(|| {
                    AuthError::missing(format!(
                        "certificate identity '{identity}' names no Shamal service of trust domain '{trust_domain}'"
                    ))
                })
            }
            (None, _) if self.anonymous => Ok(Principal::Anonymous),
            _ if self.tokens.is_some() => Err(AuthError::missing(
                "no credentials: send 'Authorization: Bearer <access token>'",
            )),
            _ => Err(AuthError::missing(
                "no credentials: a client certificate is required",
            )),
        }
    }
}
