//! The HTTP client openidconnect fetches the discovery document and the
//! JWKS with: hyper over rustls with the ring provider (no aws-lc, no
//! OpenSSL) and the system's roots (`SSL_CERT_FILE` honoured), https only
//! (http on loopback for development providers), no redirects, a timeout
//! per request and a cap on the response size.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openidconnect::{AsyncHttpClient, HttpRequest, HttpResponse};

use crate::settings::is_loopback_authority;

/// The largest discovery document or JWKS read (bytes).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a request to the provider failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("refusing to fetch {0}: only https (or http on a loopback address) is allowed")]
    Insecure(String),
    #[error("request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("request to {url} timed out after {ms} ms")]
    Timeout { url: String, ms: u64 },
    #[error(
        "response from {url} is larger than {MAX_RESPONSE_BYTES} bytes or unreadable: {reason}"
    )]
    Body { url: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(timeout: Duration) -> Result<HttpClient, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            // A machine without CA certificates can still reach a loopback
            // provider over http; https will fail, saying so.
            tracing::warn!(errors = ?native.errors, "no system CA certificates: https OIDC providers cannot be verified");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| HttpError::Tls(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(HttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        })
    }

    async fn fetch(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let url = request.uri().to_string();
        let secure = match (request.uri().scheme_str(), request.uri().authority()) {
            (Some("https"), Some(_)) => true,
            (Some("http"), Some(authority)) => is_loopback_authority(authority.as_str()),
            _ => false,
        };
        if !secure {
            return Err(HttpError::Insecure(url));
        }
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|error| HttpError::Request {
                        url: url.clone(),
                        reason: error_chain(&error),
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|error| HttpError::Body {
                    url: url.clone(),
                    reason: error.to_string(),
                })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                url,
                ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// An error and its sources, `: `-separated (hyper's own message is terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl<'c> AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.fetch(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_plain_http_off_loopback_without_connecting() {
        let client = HttpClient::new(Duration::from_millis(500)).unwrap();
        for url in [
            "http://id.example.com/.well-known/openid-configuration",
            "ftp://127.0.0.1/x",
        ] {
            let request = http::Request::get(url).body(Vec::new()).unwrap();
            let error = client.call(request).await.unwrap_err();
            assert!(matches!(error, HttpError::Insecure(_)), "{url}: {error}");
        }
    }

    #[tokio::test]
    async fn a_closed_loopback_port_is_a_request_error_naming_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let client = HttpClient::new(Duration::from_millis(2000)).unwrap();
        let url = format!("http://127.0.0.1:{port}/jwks");
        let request = http::Request::get(&url).body(Vec::new()).unwrap();
        let error = client.call(request).await.unwrap_err();
        assert!(error.to_string().contains(&url), "{error}");
    }
}
