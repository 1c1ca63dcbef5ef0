//! Mutual TLS over loopback with a real tonic service (grpc.health.v1):
//! who gets in, who does not, what the server learns about its peer, and
//! certificate rotation under load.
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use shamal_tls::dev::write_file;
use shamal_tls::failure_reason as reason;
use shamal_tls::{
    ClientAuth, ClientTls, DevCa, DevPki, DevPkiOptions, PeerIdentity, PeerInfo, ServerTls,
    TlsFiles, TlsMetrics, certificate_serial, init_dev_pki, issue,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const DAY: Duration = Duration::from_secs(86_400);

fn hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|host| host.to_string())
        .collect()
}

fn pki() -> (tempfile::TempDir, DevPki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = init_dev_pki(dir.path(), &DevPkiOptions::default()).unwrap();
    (dir, pki)
}

struct Server {
    addr: SocketAddr,
    tls: ServerTls,
    metrics: TlsMetrics,
    /// The connection details of every request, in order.
    seen: Arc<Mutex<Vec<Option<PeerInfo>>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Server {
    async fn start(files: &TlsFiles, client_auth: ClientAuth) -> Server {
        Server::start_with_timeout(files, client_auth, Duration::from_secs(10)).await
    }

    async fn start_with_timeout(
        files: &TlsFiles,
        client_auth: ClientAuth,
        handshake_timeout: Duration,
    ) -> Server {
        let registry = prometheus::Registry::new();
        let metrics = TlsMetrics::new(&registry).unwrap();
        let tls = ServerTls::new(files, client_auth)
            .unwrap()
            .with_metrics(metrics.clone())
            .with_handshake_timeout(handshake_timeout);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let layer =
            tower::util::MapRequestLayer::new(move |request: http::Request<tonic::body::Body>| {
                let info = shamal_tls::peer_info(request.extensions()).cloned();
                record.lock().unwrap().push(info);
                request
            });
        let (shutdown, stop) = oneshot::channel::<()>();
        let incoming = tls.incoming(listener);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await
                .unwrap();
        });
        Server {
            addr,
            tls,
            metrics,
            seen,
            shutdown: Some(shutdown),
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.addr.port()))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
    }

    fn last_seen(&self) -> Option<PeerInfo> {
        self.seen.lock().unwrap().last().cloned().flatten()
    }

    /// Waits (up to 5 s) until `reason` has been counted `count` times.
    async fn wait_for_failure(&self, reason: &str, count: u64) {
        for _ in 0..100 {
            if self.metrics.handshake_failures(reason) >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{reason} counted {} times, expected {count}",
            self.metrics.handshake_failures(reason)
        );
    }
}

async fn check(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

fn roots(ca: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that trusts `ca` and presents no certificate.
fn anonymous_config(ca: &Path) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A client that trusts `ca` and presents this certificate and key.
fn config_with_cert(ca: &Path, cert_pem: &str, key_pem: &str) -> ClientConfig {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A tonic channel over a hand-made rustls client configuration.
fn custom_channel(server: &Server, config: ClientConfig) -> Channel {
    let config = Arc::new(config);
    let addr = server.addr;
    server
        .endpoint()
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                    .await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }))
}

#[tokio::test]
async fn mutual_tls_works_and_the_server_learns_the_clients_identity() {
    let (_dir, pki) = pki();
    let server = Server::start(&pki.files("worker"), ClientAuth::Required).await;
    let client = ClientTls::new(&pki.files("router")).unwrap();

    check(client.connect_lazy(server.endpoint())).await.unwrap();
    let info = server.last_seen().expect("the request carries PeerInfo");
    assert_eq!(
        info.identity,
        Some(PeerIdentity::new("shamal.local", "router", "router"))
    );
    assert_eq!(
        info.certificate_serial.as_deref(),
        Some(client.current_serial().as_str())
    );
    assert_eq!(info.remote_addr.ip(), server.addr.ip());

    // `connect` (eager) and the SPIFFE check of the server's identity.
    let channel = client
        .expect_service("worker")
        .connect(server.endpoint())
        .await
        .unwrap();
    check(channel).await.unwrap();
    let wrong = client
        .expect_service("registry")
        .connect_lazy(server.endpoint());
    assert!(check(wrong).await.is_err(), "a worker is not a registry");
    server.wait_for_failure(reason::PEER_ALERT, 1).await;

    // The server's name is checked too: its certificate does not name 127.0.0.2.
    let other_name =
        Endpoint::from_shared(format!("https://127.0.0.2:{}", server.addr.port())).unwrap();
    assert!(check(client.connect_lazy(other_name)).await.is_err());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_when_required() {
    let (_dir, pki) = pki();
    let files = pki.files("worker");
    let server = Server::start(&files, ClientAuth::Required).await;
    let channel = custom_channel(&server, anonymous_config(&files.ca));
    assert!(check(channel).await.is_err());
    server.wait_for_failure(reason::NO_CLIENT_CERT, 1).await;
    assert!(server.seen.lock().unwrap().is_empty(), "nothing was served");
}

#[tokio::test]
async fn certificates_from_a_foreign_ca_are_refused() {
    let (_dir, pki) = pki();
    let files = pki.files("worker");
    let server = Server::start(&files, ClientAuth::Required).await;
    let foreign = DevCa::generate().unwrap();
    let now = SystemTime::now();
    let (cert, key) = issue(
        &foreign,
        &PeerIdentity::new("shamal.local", "router", "impostor"),
        &hosts(),
        now - DAY,
        now + DAY,
    )
    .unwrap();
    let channel = custom_channel(&server, config_with_cert(&files.ca, &cert, &key));
    assert!(check(channel).await.is_err());
    server.wait_for_failure(reason::UNKNOWN_CA, 1).await;
    assert!(server.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn expired_certificates_are_refused() {
    let (dir, pki) = pki();
    let files = pki.files("worker");
    let server = Server::start(&files, ClientAuth::Required).await;
    let ca = DevCa::load(dir.path()).unwrap();
    let now = SystemTime::now();
    let (cert, key) = issue(
        &ca,
        &PeerIdentity::new("shamal.local", "router", "old"),
        &hosts(),
        now - 10 * DAY,
        now - DAY,
    )
    .unwrap();
    // Through ClientTls: loading an expired certificate is allowed (the
    // peer decides), presenting it fails.
    let expired = TlsFiles {
        cert: dir.path().join("expired.pem"),
        key: dir.path().join("expired-key.pem"),
        ca: files.ca.clone(),
    };
    write_file(&expired.cert, cert.as_bytes(), false).unwrap();
    write_file(&expired.key, key.as_bytes(), true).unwrap();
    let client = ClientTls::new(&expired).unwrap();
    assert!(check(client.connect_lazy(server.endpoint())).await.is_err());
    server.wait_for_failure(reason::EXPIRED, 1).await;
    assert!(server.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn plaintext_h2c_to_a_tls_port_is_refused_and_counted() {
    let (_dir, pki) = pki();
    let server = Server::start(&pki.files("worker"), ClientAuth::Required).await;
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect_lazy();
    assert!(check(plain).await.is_err());
    server.wait_for_failure(reason::NOT_TLS, 1).await;
    assert!(server.seen.lock().unwrap().is_empty());

    // Plain HTTP/1.1 too.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    assert!(!answer.starts_with(b"HTTP/"));
    server.wait_for_failure(reason::NOT_TLS, 2).await;

    // The server still serves TLS afterwards.
    let client = ClientTls::new(&pki.files("router")).unwrap();
    check(client.connect_lazy(server.endpoint())).await.unwrap();
}

#[tokio::test]
async fn a_stalled_handshake_times_out_without_blocking_others() {
    let (_dir, pki) = pki();
    let server = Server::start_with_timeout(
        &pki.files("worker"),
        ClientAuth::Required,
        Duration::from_millis(500),
    )
    .await;
    // Connected, silent: the handshake never starts.
    let _stalled = TcpStream::connect(server.addr).await.unwrap();
    let client = ClientTls::new(&pki.files("router")).unwrap();
    check(client.connect_lazy(server.endpoint())).await.unwrap();
    assert_eq!(server.metrics.handshake_failures(reason::TIMEOUT), 0);
    server.wait_for_failure(reason::TIMEOUT, 1).await;
    // A connection closed before its handshake is counted as such.
    drop(TcpStream::connect(server.addr).await.unwrap());
    server.wait_for_failure(reason::CLOSED, 1).await;
}

#[tokio::test]
async fn optional_client_auth_admits_anonymous_clients_but_checks_presented_certificates() {
    let (dir, pki) = pki();
    let files = pki.files("router");
    let server = Server::start(&files, ClientAuth::Optional).await;

    check(custom_channel(&server, anonymous_config(&files.ca)))
        .await
        .unwrap();
    let info = server.last_seen().unwrap();
    assert_eq!(info.identity, None);
    assert_eq!(info.certificate_serial, None);

    let client = ClientTls::new(&pki.files("worker")).unwrap();
    check(client.connect_lazy(server.endpoint())).await.unwrap();
    assert_eq!(
        server.last_seen().unwrap().identity.unwrap().service,
        "worker"
    );

    let foreign = DevCa::generate().unwrap();
    let now = SystemTime::now();
    let identity = PeerIdentity::new("shamal.local", "worker", "impostor");
    let (cert, key) = issue(&foreign, &identity, &hosts(), now - DAY, now + DAY).unwrap();
    let served = server.seen.lock().unwrap().len();
    assert!(
        check(custom_channel(
            &server,
            config_with_cert(&files.ca, &cert, &key)
        ))
        .await
        .is_err()
    );
    server.wait_for_failure(reason::UNKNOWN_CA, 1).await;

    let ca = DevCa::load(dir.path()).unwrap();
    let (cert, key) = issue(&ca, &identity, &hosts(), now - 10 * DAY, now - DAY).unwrap();
    assert!(
        check(custom_channel(
            &server,
            config_with_cert(&files.ca, &cert, &key)
        ))
        .await
        .is_err()
    );
    server.wait_for_failure(reason::EXPIRED, 1).await;
    assert_eq!(server.seen.lock().unwrap().len(), served);
}

#[tokio::test]
async fn unusable_files_keep_the_previous_certificate_and_are_retried() {
    let (dir, pki) = pki();
    let files = pki.files("worker");
    let server = Server::start(&files, ClientAuth::Required).await;
    let client = ClientTls::new(&pki.files("router")).unwrap();
    let serial = server.tls.current_serial();

    // A half-written certificate.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
    let error = server.tls.reload_now().unwrap_err();
    assert!(error.to_string().contains("worker.pem"), "{error}");
    assert_eq!(server.tls.current_serial(), serial);
    check(client.connect_lazy(server.endpoint())).await.unwrap();

    // A new certificate with the old key: a mismatch.
    let ca = DevCa::load(dir.path()).unwrap();
    let now = SystemTime::now();
    let identity = PeerIdentity::new("shamal.local", "worker", "worker");
    let (cert, key) = issue(&ca, &identity, &hosts(), now - DAY, now + DAY).unwrap();
    std::fs::write(&files.cert, &cert).unwrap();
    let error = server.tls.reload_now().unwrap_err();
    assert!(error.to_string().contains("worker-key.pem"), "{error}");
    assert_eq!(server.tls.current_serial(), serial);
    // Nothing changed since: nothing to do.
    assert!(!server.tls.reload_now().unwrap());

    // The key follows: the background poll picks the pair up.
    std::fs::write(&files.key, &key).unwrap();
    let new_serial =
        certificate_serial(&CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()).unwrap();
    wait_until(|| server.tls.current_serial() == new_serial).await;
    assert_eq!(server.tls.reload_count(), 1);
    assert_eq!(server.metrics.reloads("success"), 1);
    assert_eq!(server.metrics.reloads("failure"), 2);
    check(client.connect_lazy(server.endpoint())).await.unwrap();
    assert_eq!(
        server_certificate_serial(&server, &client).await,
        new_serial
    );

    // A missing file (mid symlink swap) is a failure, not an outage.
    std::fs::remove_file(&files.ca).unwrap();
    assert!(server.tls.reload_now().is_err());
    check(client.connect_lazy(server.endpoint())).await.unwrap();
}

#[tokio::test]
async fn axum_sees_the_peer_identity_through_the_tls_listener() {
    let (_dir, pki) = pki();
    let server_tls = ServerTls::new(&pki.files("registry"), ClientAuth::Required).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|request: axum::extract::Request| async move {
            shamal_tls::peer_identity(request.extensions())
                .map(|identity| identity.uri())
                .unwrap_or_else(|| "nobody".to_owned())
        }),
    );
    let tls_listener = server_tls.axum_listener(listener);
    tokio::spawn(async move {
        axum::serve(
            tls_listener,
            app.into_make_service_with_connect_info::<PeerInfo>(),
        )
        .await
        .unwrap();
    });

    let client = ClientTls::new(&pki.files("router")).unwrap();
    let mut config = (*client.rustls_client_config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("spiffe://shamal.local/router/router"),
        "{answer}"
    );
}

/// The serial number of the certificate the server presents to a new
/// connection.
async fn server_certificate_serial(server: &Server, client: &ClientTls) -> String {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.rustls_client_config())
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let certificates = tls.get_ref().1.peer_certificates().unwrap();
    certificate_serial(&certificates[0]).unwrap()
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    for _ in 0..100 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 5 s");
}

fn serial_of(cert_pem: &str) -> String {
    certificate_serial(&CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()).unwrap()
}

/// Writes a certificate, then its key a little later, as a careless
/// writer would (the poller may see the new certificate with the old key).
async fn write_pair_non_atomically(files: &TlsFiles, cert: &str, key: &str) {
    std::fs::write(&files.cert, cert).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&files.key, key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_load_loses_no_call() {
    let (dir, pki) = pki();
    let server_files = pki.files("worker");
    let client_files = pki.files("router");
    let server = Server::start(&server_files, ClientAuth::Required).await;
    let client = ClientTls::new(&client_files).unwrap();
    let server_identity = PeerIdentity::new("shamal.local", "worker", "worker");
    let client_identity = PeerIdentity::new("shamal.local", "router", "router");

    let channels: Vec<Channel> = (0..4)
        .map(|_| client.connect_lazy(server.endpoint()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for task in 0..16 {
        let channels = channels.clone();
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let client = client.clone();
        let endpoint = server.endpoint();
        tasks.push(tokio::spawn(async move {
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                // Most calls reuse a long-lived connection; every tenth
                // makes a new one, so handshakes happen throughout.
                let channel = if round.is_multiple_of(10) {
                    client.connect_lazy(endpoint.clone())
                } else {
                    channels[(task + round) % channels.len()].clone()
                };
                if let Err(status) = check(channel).await {
                    failures.lock().unwrap().push(status.to_string());
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let now = SystemTime::now();
    let old_ca = DevCa::load(dir.path()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. A new server certificate from the same CA.
    let (cert, key) = issue(&old_ca, &server_identity, &hosts(), now - DAY, now + DAY).unwrap();
    write_pair_non_atomically(&server_files, &cert, &key).await;
    let serial = serial_of(&cert);
    wait_until(|| server.tls.current_serial() == serial).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 2. A new client certificate from the same CA.
    let (cert, key) = issue(&old_ca, &client_identity, &hosts(), now - DAY, now + DAY).unwrap();
    write_pair_non_atomically(&client_files, &cert, &key).await;
    let serial = serial_of(&cert);
    wait_until(|| client.current_serial() == serial).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 3. CA rotation: both sides trust old and new CA, then the leaves
    //    move to the new CA, then the old CA goes.
    let new_ca = DevCa::generate_with("rotated CA", now - DAY, now + 10 * DAY).unwrap();
    let (server_reloads, client_reloads) = (server.tls.reload_count(), client.reload_count());
    let bundle = format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem());
    write_file(&server_files.ca, bundle.as_bytes(), false).unwrap();
    wait_until(|| {
        server.tls.reload_count() > server_reloads && client.reload_count() > client_reloads
    })
    .await;
    let (cert, key) = issue(&new_ca, &server_identity, &hosts(), now - DAY, now + DAY).unwrap();
    write_pair_non_atomically(&server_files, &cert, &key).await;
    let new_server_serial = serial_of(&cert);
    wait_until(|| server.tls.current_serial() == new_server_serial).await;
    let (cert, key) = issue(&new_ca, &client_identity, &hosts(), now - DAY, now + DAY).unwrap();
    write_pair_non_atomically(&client_files, &cert, &key).await;
    let new_client_serial = serial_of(&cert);
    wait_until(|| client.current_serial() == new_client_serial).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (server_reloads, client_reloads) = (server.tls.reload_count(), client.reload_count());
    write_file(&server_files.ca, new_ca.cert_pem().as_bytes(), false).unwrap();
    wait_until(|| {
        server.tls.reload_count() > server_reloads && client.reload_count() > client_reloads
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let calls = calls.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(calls > 100, "only {calls} calls");

    // New connections present the new certificates, both ways.
    check(client.connect_lazy(server.endpoint())).await.unwrap();
    let info = server.last_seen().unwrap();
    assert_eq!(
        info.certificate_serial.as_deref(),
        Some(new_client_serial.as_str())
    );
    assert_eq!(info.identity.as_ref(), Some(&client_identity));
    assert_eq!(
        server_certificate_serial(&server, &client).await,
        new_server_serial
    );
    for reason in shamal_tls::failure_reason::ALL {
        assert_eq!(server.metrics.handshake_failures(reason), 0, "{reason}");
    }
    // A client of the old CA alone is now refused.
    let (cert, key) = issue(&old_ca, &client_identity, &hosts(), now - DAY, now + DAY).unwrap();
    let stale = custom_channel(&server, config_with_cert(&server_files.ca, &cert, &key));
    assert!(check(stale).await.is_err());
    server.wait_for_failure(reason::UNKNOWN_CA, 1).await;
}
