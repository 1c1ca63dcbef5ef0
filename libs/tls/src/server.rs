//! The server side: a reloading certificate, client-certificate checks,
//! and accepted connections that carry the peer's identity to handlers.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::metrics::{TlsMetrics, reason};
use crate::reload::{Reloader, provider, signatures};
use crate::{PeerIdentity, TlsError, TlsFiles, certificate_identity, certificate_serial};

/// Whether clients must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Internal gRPC: a client without a certificate chaining to the CA
    /// bundle is refused during the handshake.
    Required,
    /// Public ports: clients without a certificate are let through (to be
    /// authenticated by a bearer token), but a certificate that *is*
    /// presented must chain to the CA bundle and be in date.
    Optional,
}

/// How long a client may take to finish its handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress per listener; further connections wait in the
/// kernel's accept queue.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// A server's TLS: certificate, key and CA bundle re-read when their files
/// change. Cheap to clone; every clone shares the same files and poller.
#[derive(Clone, Debug)]
pub struct ServerTls {
    reloader: Arc<Reloader>,
    config: Arc<ServerConfig>,
    metrics: Option<TlsMetrics>,
    handshake_timeout: Duration,
}

impl ServerTls {
    /// Loads `files` (an error names the file at fault) and starts watching
    /// them. Call it inside a tokio runtime (the watcher is a task there).
    pub fn new(files: &TlsFiles, client_auth: ClientAuth) -> Result<ServerTls, TlsError> {
        let reloader = Reloader::start(files, "server")?;
        let verifier = Arc::new(ReloadingClientVerifier {
            reloader: reloader.clone(),
            client_auth,
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ReloadingServerCert {
                reloader: reloader.clone(),
            }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // No resumption: every connection shows (and has checked) the
        // client's current certificate against the current CA bundle.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(ServerTls {
            reloader,
            config: Arc::new(config),
            metrics: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// Counts failed handshakes and reloads in `metrics`.
    pub fn with_metrics(mut self, metrics: TlsMetrics) -> ServerTls {
        self.reloader.set_metrics(metrics.clone());
        self.metrics = Some(metrics);
        self
    }

    /// Overrides the handshake timeout (10 s by default).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> ServerTls {
        self.handshake_timeout = timeout;
        self
    }

    /// The rustls configuration (reloading certificate and verifier; ALPN
    /// `h2`, `http/1.1`), for servers this crate does not wrap.
    pub fn rustls_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Checks the files now instead of waiting for the next poll: `Ok(true)`
    /// when new material was loaded, `Ok(false)` when nothing changed, `Err`
    /// when the files changed but are unusable (the old material stays).
    pub fn reload_now(&self) -> Result<bool, TlsError> {
        self.reloader.check()
    }

    /// Successful reloads since start.
    pub fn reload_count(&self) -> u64 {
        self.reloader.reload_count()
    }

    /// Refused reloads (unusable files) since start.
    pub fn failed_reload_count(&self) -> u64 {
        self.reloader.failed_reload_count()
    }

    /// Hex serial number of the certificate new handshakes present.
    pub fn current_serial(&self) -> String {
        self.reloader.current().serial.clone()
    }

    /// Accepts TLS connections on `listener`, for
    /// `tonic::transport::Server::serve_with_incoming(_shutdown)`.
    ///
    /// Handshakes run concurrently, each in its own task with a timeout;
    /// failed ones are logged and counted, never yielded, so the stream
    /// only ends when it is dropped. Must be called inside a tokio runtime.
    pub fn incoming(&self, listener: TcpListener) -> TlsIncoming {
        let local_addr = listener.local_addr().ok();
        TlsIncoming {
            accepted: self.spawn_acceptor(listener),
            local_addr,
        }
    }

    /// The same accepted connections as an `axum::serve::Listener`. Serve
    /// with `app.into_make_service_with_connect_info::<PeerInfo>()` so that
    /// [`peer_info`] finds the connection's details.
    pub fn axum_listener(&self, listener: TcpListener) -> TlsListener {
        let local_addr = listener.local_addr();
        TlsListener {
            accepted: self.spawn_acceptor(listener),
            local_addr: local_addr.map_err(|error| error.to_string()),
        }
    }

    fn spawn_acceptor(&self, listener: TcpListener) -> mpsc::Receiver<TlsStream> {
        let (sender, receiver) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        let metrics = self.metrics.clone();
        let timeout = self.handshake_timeout;
        tokio::spawn(accept_loop(listener, acceptor, sender, metrics, timeout));
        receiver
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    sender: mpsc::Sender<TlsStream>,
    metrics: Option<TlsMetrics>,
    timeout: Duration,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = sender.closed() => return,
            permit = pending.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = sender.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Per-connection errors (reset before accept) are harmless;
                // running out of descriptors is not, and must not spin.
                if !matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) {
                    tracing::warn!(%error, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local_addr = tcp.local_addr().ok();
        let acceptor = acceptor.clone();
        let sender = sender.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let failure = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let info = PeerInfo::of(&stream, remote_addr, local_addr);
                    tracing::debug!(
                        peer = %remote_addr,
                        identity = ?info.identity.as_ref().map(PeerIdentity::uri),
                        "TLS handshake done"
                    );
                    drop(_permit);
                    let _ = sender
                        .send(TlsStream {
                            inner: stream,
                            info,
                        })
                        .await;
                    return;
                }
                Ok(Err(error)) => (classify(&error), error.to_string()),
                Err(_) => (reason::TIMEOUT, format!("no handshake within {timeout:?}")),
            };
            let (label, message) = failure;
            if label == reason::CLOSED {
                // TCP probes and port scans: not worth a warning each.
                tracing::debug!(peer = %remote_addr, reason = label, error = %message, "TLS handshake failed");
            } else {
                tracing::warn!(peer = %remote_addr, reason = label, error = %message, "TLS handshake failed");
            }
            if let Some(metrics) = metrics {
                metrics.handshake_failed(label);
            }
        });
    }
}

/// Maps a failed handshake to its `reason` label.
fn classify(error: &io::Error) -> &'static str {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::NoCertificatesPresented) => reason::NO_CLIENT_CERT,
        Some(rustls::Error::InvalidCertificate(certificate)) => match certificate {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => reason::UNKNOWN_CA,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => reason::EXPIRED,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                reason::NOT_YET_VALID
            }
            _ => reason::BAD_CERTIFICATE,
        },
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. },
        ) => reason::NOT_TLS,
        Some(rustls::Error::AlertReceived(_)) => reason::PEER_ALERT,
        Some(_) => reason::OTHER,
        None => match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => reason::CLOSED,
            _ => reason::OTHER,
        },
    }
}

/// Who is on the other end of an accepted connection. Tonic puts it in
/// every request's extensions (as `PeerInfo`); axum does so (as
/// `ConnectInfo<PeerInfo>`) when served with
/// `into_make_service_with_connect_info::<PeerInfo>()`. Read it with
/// [`peer_info`] either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    pub local_addr: Option<SocketAddr>,
    /// The SPIFFE identity of the client certificate, when a certificate
    /// was presented and carries one.
    pub identity: Option<PeerIdentity>,
    /// Hex serial number of the client certificate, when one was presented.
    pub certificate_serial: Option<String>,
}

impl PeerInfo {
    fn of(
        stream: &tokio_rustls::server::TlsStream<TcpStream>,
        remote_addr: SocketAddr,
        local_addr: Option<SocketAddr>,
    ) -> PeerInfo {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        PeerInfo {
            remote_addr,
            local_addr,
            identity: leaf.and_then(|leaf| certificate_identity(leaf)),
            certificate_serial: leaf.and_then(|leaf| certificate_serial(leaf)),
        }
    }
}

/// The connection details of the request these extensions belong to,
/// whether tonic (through [`ServerTls::incoming`]) or axum (through
/// [`ServerTls::axum_listener`]) served it.
pub fn peer_info(extensions: &http::Extensions) -> Option<&PeerInfo> {
    extensions.get::<PeerInfo>().or_else(|| {
        extensions
            .get::<axum::extract::ConnectInfo<PeerInfo>>()
            .map(|info| &info.0)
    })
}

/// The SPIFFE identity the client's certificate proved, if any.
pub fn peer_identity(extensions: &http::Extensions) -> Option<PeerIdentity> {
    peer_info(extensions)?.identity.clone()
}

/// [`peer_identity`] for a tonic handler's request.
pub fn grpc_peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    request.extensions().get::<PeerInfo>()?.identity.clone()
}

/// The stream of [`ServerTls::incoming`]: established TLS connections,
/// never an error.
#[derive(Debug)]
pub struct TlsIncoming {
    accepted: mpsc::Receiver<TlsStream>,
    local_addr: Option<SocketAddr>,
}

impl TlsIncoming {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl futures::Stream for TlsIncoming {
    type Item = Result<TlsStream, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

/// [`ServerTls::axum_listener`]: an `axum::serve::Listener` of established
/// TLS connections.
#[derive(Debug)]
pub struct TlsListener {
    accepted: mpsc::Receiver<TlsStream>,
    local_addr: Result<SocketAddr, String>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsStream, SocketAddr) {
        match self.accepted.recv().await {
            Some(stream) => {
                let remote_addr = stream.info.remote_addr;
                (stream, remote_addr)
            }
            // The accept task only ends when this receiver is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr.clone().map_err(io::Error::other)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> PeerInfo {
        stream.io().info.clone()
    }
}

/// An established server-side TLS connection and its [`PeerInfo`].
#[derive(Debug)]
pub struct TlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsStream {
    pub fn peer_info(&self) -> &PeerInfo {
        &self.info
    }

    /// The rustls connection (negotiated ALPN, peer certificates, ...).
    pub fn get_ref(&self) -> &tokio_rustls::server::TlsStream<TcpStream> {
        &self.inner
    }
}

impl tonic::transport::server::Connected for TlsStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct ReloadingServerCert {
    reloader: Arc<Reloader>,
}

impl ResolvesServerCert for ReloadingServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.reloader.current().certified_key.clone())
    }
}

/// Checks client certificates against the current CA bundle (the webpki
/// verifier is rebuilt with each reload).
#[derive(Debug)]
struct ReloadingClientVerifier {
    reloader: Arc<Reloader>,
    client_auth: ClientAuth,
}

impl ReloadingClientVerifier {
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let material = self.reloader.current();
        match self.client_auth {
            ClientAuth::Required => material.required_client_verifier.clone(),
            ClientAuth::Optional => material.optional_client_verifier.clone(),
        }
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to outlive a reload; they are optional.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
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
