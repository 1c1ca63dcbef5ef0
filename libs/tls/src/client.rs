//! The client side: a reloading client certificate and CA bundle, and
//! tonic channels that speak mutual TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::TlsMetrics;
use crate::reload::{Reloader, provider, signatures};
use crate::{TlsError, TlsFiles, certificate_identity};

/// A client's TLS: its certificate, key and CA bundle, re-read when their
/// files change (new connections use the new certificate). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientTls {
    reloader: Arc<Reloader>,
    expect_service: Option<String>,
    grpc: Arc<ClientConfig>,
    http: Arc<ClientConfig>,
}

impl ClientTls {
    /// Loads `files` (an error names the file at fault) and starts watching
    /// them.
    pub fn new(files: &TlsFiles) -> Result<ClientTls, TlsError> {
        let reloader = Reloader::start(files, "client")?;
        ClientTls::build(reloader, None)
    }

    fn build(
        reloader: Arc<Reloader>,
        expect_service: Option<String>,
    ) -> Result<ClientTls, TlsError> {
        let verifier = Arc::new(ReloadingServerVerifier {
            reloader: reloader.clone(),
            expect_service: expect_service.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(ReloadingClientCert {
                reloader: reloader.clone(),
            }));
        // Resumed sessions would skip presenting the current certificate.
        config.resumption = rustls::client::Resumption::disabled();
        let mut grpc = config.clone();
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        let mut http = config;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ClientTls {
            reloader,
            expect_service,
            grpc: Arc::new(grpc),
            http: Arc::new(http),
        })
    }

    /// Also requires the server's certificate to carry a SPIFFE identity of
    /// this service (`spiffe://<td>/<service>/<id>`), on top of the chain
    /// and host-name checks.
    pub fn expect_service(&self, service: &str) -> ClientTls {
        match ClientTls::build(self.reloader.clone(), Some(service.to_owned())) {
            Ok(tls) => tls,
            // The same builder already succeeded once with these settings.
            Err(_) => self.clone(),
        }
    }

    /// The service `expect_service` requires, if any.
    pub fn expected_service(&self) -> Option<&str> {
        self.expect_service.as_deref()
    }

    /// Counts reloads in `metrics`.
    pub fn with_metrics(self, metrics: TlsMetrics) -> ClientTls {
        self.reloader.set_metrics(metrics);
        self
    }

    /// A channel that connects (TCP with `TCP_NODELAY`, then the TLS
    /// handshake, ALPN `h2`) when first used and reconnects as needed. Give
    /// the endpoint an `https://host:port` URI: the host is the name the
    /// server's certificate must carry (a DNS name or an IP address).
    /// The endpoint's timeouts and HTTP/2 settings apply; its TCP settings
    /// (keepalive) do not.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }

    /// Like [`connect_lazy`](Self::connect_lazy) but connects now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.connector()).await
    }

    /// The rustls configuration (reloading client certificate and CA;
    /// ALPN `h2`, `http/1.1`), e.g. for reqwest's
    /// `use_preconfigured_tls`.
    pub fn rustls_client_config(&self) -> Arc<ClientConfig> {
        self.http.clone()
    }

    /// Checks the files now; see `ServerTls::reload_now`.
    pub fn reload_now(&self) -> Result<bool, TlsError> {
        self.reloader.check()
    }

    /// Successful reloads since start.
    pub fn reload_count(&self) -> u64 {
        self.reloader.reload_count()
    }

    /// Hex serial number of the certificate new connections present.
    pub fn current_serial(&self) -> String {
        self.reloader.current().serial.clone()
    }

    fn connector(&self) -> TlsConnector {
        TlsConnector {
            connector: tokio_rustls::TlsConnector::from(self.grpc.clone()),
        }
    }
}

/// The tower service tonic calls for each new connection.
#[derive(Clone)]
struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let connector = self.connector.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} has no host")))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let server_name = ServerName::try_from(host.clone())
                .map_err(|error| invalid(format!("{uri}: {host} is not a server name: {error}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Presents the current client certificate in every handshake.
#[derive(Debug)]
struct ReloadingClientCert {
    reloader: Arc<Reloader>,
}

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.reloader.current().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks the server's chain and name against the current CA bundle, and
/// optionally its SPIFFE service.
#[derive(Debug)]
struct ReloadingServerVerifier {
    reloader: Arc<Reloader>,
    expect_service: Option<String>,
}

impl ServerCertVerifier for ReloadingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.reloader.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Some(expected) = &self.expect_service {
            let identity = certificate_identity(end_entity);
            if identity.as_ref().map(|identity| identity.service.as_str()) != Some(expected) {
                tracing::warn!(
                    server = ?server_name,
                    expected = %expected,
                    presented = ?identity.map(|identity| identity.uri()),
                    "the server's certificate names another service"
                );
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}
