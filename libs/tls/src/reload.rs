//! Certificates, keys and CA bundles that are re-read when their files
//! change.
//!
//! Every [`POLL_INTERVAL`] a background task reads the three files and
//! compares their content hashes with the last ones it saw. Reading through
//! the paths follows symbolic links, so Kubernetes' secret volumes (which
//! swap a `..data` symlink) and plain rewrites look the same. When anything
//! changed, the new certificate, key and CA bundle are parsed and checked
//! (the key must belong to the certificate); on success they replace the
//! old ones for every *new* handshake, on failure (a half-written pair, a
//! missing file) the old ones stay, a warning is logged, and the next poll
//! tries again once the content changes again. There is never a moment
//! without a certificate.
//!
//! The task holds only a weak reference: it ends when the last
//! `ServerTls`/`ClientTls` (and every rustls configuration, channel or
//! listener made from it) is gone.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use crate::metrics::TlsMetrics;
use crate::{TlsError, TlsFiles, certificate_serial};

/// How often the files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The crypto provider of every Shamal TLS configuration: ring.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// One consistent set of certificate, key and trust anchors, with the
/// verifiers built over those anchors.
pub(crate) struct Material {
    pub certified_key: Arc<CertifiedKey>,
    /// Hex serial number of our own leaf certificate.
    pub serial: String,
    pub required_client_verifier: Arc<dyn ClientCertVerifier>,
    pub optional_client_verifier: Arc<dyn ClientCertVerifier>,
    pub server_verifier: Arc<WebPkiServerVerifier>,
}

impl Material {
    fn parse(files: &TlsFiles, cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Material, TlsError> {
        let provider = provider();
        let chain = parse_certificates(&files.cert, cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|error| {
            TlsError::invalid(&files.key, format!("no usable PEM private key: {error}"))
        })?;
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|error| {
                TlsError::invalid(&files.key, format!("unusable private key: {error}"))
            })?;
        let serial = certificate_serial(&chain[0]).ok_or_else(|| {
            TlsError::invalid(&files.cert, "the first certificate does not parse")
        })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        match certified_key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(error) => {
                return Err(TlsError::KeyMismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    message: error.to_string(),
                });
            }
        }

        let mut roots = RootCertStore::empty();
        for certificate in parse_certificates(&files.ca, ca)? {
            roots.add(certificate).map_err(|error| {
                TlsError::invalid(&files.ca, format!("not a usable CA certificate: {error}"))
            })?;
        }
        let roots = Arc::new(roots);
        let config_error = |error: &dyn fmt::Display| {
            TlsError::invalid(&files.ca, format!("cannot build a verifier: {error}"))
        };
        let required_client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|error| config_error(&error))?;
        let optional_client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|error| config_error(&error))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|error| config_error(&error))?;
        Ok(Material {
            certified_key: Arc::new(certified_key),
            serial,
            required_client_verifier,
            optional_client_verifier,
            server_verifier,
        })
    }
}

fn parse_certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::invalid(path, format!("bad PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(TlsError::invalid(path, "holds no PEM certificate"));
    }
    Ok(certificates)
}

type Fingerprint = [[u8; 32]; 3];

/// The three files' contents, or the first one that cannot be read.
fn read_files(files: &TlsFiles) -> (Fingerprint, Result<[Vec<u8>; 3], TlsError>) {
    let mut fingerprint = [[0u8; 32]; 3];
    let mut contents: [Vec<u8>; 3] = Default::default();
    let mut first_error = None;
    for (index, path) in [&files.cert, &files.key, &files.ca].into_iter().enumerate() {
        match std::fs::read(path) {
            Ok(bytes) => {
                fingerprint[index] = Sha256::digest(&bytes).into();
                contents[index] = bytes;
            }
            Err(error) => {
                fingerprint[index] = Sha256::digest(format!("unreadable: {error}")).into();
                first_error.get_or_insert(TlsError::Read {
                    path: path.clone(),
                    source: error,
                });
            }
        }
    }
    match first_error {
        Some(error) => (fingerprint, Err(error)),
        None => (fingerprint, Ok(contents)),
    }
}

/// The current material of one `TlsFiles`, and the poller that replaces it.
pub(crate) struct Reloader {
    files: TlsFiles,
    role: &'static str,
    current: RwLock<Arc<Material>>,
    /// The fingerprint of the files last looked at (loaded or refused).
    seen: Mutex<Fingerprint>,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
    metrics: OnceLock<TlsMetrics>,
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("files", &self.files)
            .field("role", &self.role)
            .field("reloads", &self.reloads)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Loads the files (an error names the file at fault) and starts the
    /// poller: a tokio task when called inside a runtime, a thread otherwise.
    pub(crate) fn start(files: &TlsFiles, role: &'static str) -> Result<Arc<Reloader>, TlsError> {
        let (fingerprint, contents) = read_files(files);
        let [cert, key, ca] = contents?;
        let material = Material::parse(files, &cert, &key, &ca)?;
        let reloader = Arc::new(Reloader {
            files: files.clone(),
            role,
            current: RwLock::new(Arc::new(material)),
            seen: Mutex::new(fingerprint),
            reloads: AtomicU64::new(0),
            failed_reloads: AtomicU64::new(0),
            metrics: OnceLock::new(),
            watcher: Mutex::new(None),
        });
        let weak = Arc::downgrade(&reloader);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let task = runtime.spawn(poll_task(weak));
                *lock(&reloader.watcher) = Some(task.abort_handle());
            }
            Err(_) => {
                let spawned = std::thread::Builder::new()
                    .name("shamal-tls-reload".to_owned())
                    .spawn(move || poll_thread(weak));
                if let Err(error) = spawned {
                    return Err(TlsError::Config(format!(
                        "cannot start the certificate reload thread: {error}"
                    )));
                }
            }
        }
        Ok(reloader)
    }

    pub(crate) fn current(&self) -> Arc<Material> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_metrics(&self, metrics: TlsMetrics) {
        let _ = self.metrics.set(metrics);
    }

    pub(crate) fn reload_count(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    pub(crate) fn failed_reload_count(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }

    /// Reads the files now: `Ok(true)` when new material was loaded,
    /// `Ok(false)` when nothing changed since the last look, `Err` when the
    /// files changed but are unusable (the old material stays).
    pub(crate) fn check(&self) -> Result<bool, TlsError> {
        let mut seen = lock(&self.seen);
        let (fingerprint, contents) = read_files(&self.files);
        if fingerprint == *seen {
            return Ok(false);
        }
        *seen = fingerprint;
        let parsed =
            contents.and_then(|[cert, key, ca]| Material::parse(&self.files, &cert, &key, &ca));
        match parsed {
            Ok(material) => {
                let serial = material.serial.clone();
                match self.current.write() {
                    Ok(mut guard) => *guard = Arc::new(material),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(material),
                }
                self.reloads.fetch_add(1, Ordering::Relaxed);
                if let Some(metrics) = self.metrics.get() {
                    metrics.reloaded(true);
                }
                tracing::info!(
                    role = self.role,
                    cert = %self.files.cert.display(),
                    ca = %self.files.ca.display(),
                    serial = %serial,
                    "TLS certificate, key and CA bundle reloaded"
                );
                Ok(true)
            }
            Err(error) => {
                self.failed_reloads.fetch_add(1, Ordering::Relaxed);
                if let Some(metrics) = self.metrics.get() {
                    metrics.reloaded(false);
                }
                tracing::warn!(
                    role = self.role,
                    %error,
                    "TLS files changed but cannot be used; keeping the previous certificate and CA bundle, retrying when they change again"
                );
                Err(error)
            }
        }
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.watcher).take() {
            task.abort();
        }
    }
}

async fn poll_task(reloader: Weak<Reloader>) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(reloader) = reloader.upgrade() else {
            return;
        };
        // Three small files: reading them inline is cheaper than a hop to
        // the blocking pool. Errors are logged inside.
        let _ = reloader.check();
    }
}

fn poll_thread(reloader: Weak<Reloader>) {
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let Some(reloader) = reloader.upgrade() else {
            return;
        };
        let _ = reloader.check();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Handshake signature checks of both verifiers (the server's of client
/// certificates, the client's of server certificates): the ring provider's
/// algorithms.
pub(crate) mod signatures {
    use rustls::client::danger::HandshakeSignatureValid;
    use rustls::pki_types::CertificateDer;
    use rustls::{DigitallySignedStruct, SignatureScheme};

    use super::provider;

    pub(crate) fn verify_tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub(crate) fn verify_tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub(crate) fn schemes() -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
