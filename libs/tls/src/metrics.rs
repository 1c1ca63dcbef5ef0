//! Prometheus counters: failed handshakes by reason, reloads by outcome.

use prometheus::{IntCounterVec, Opts, Registry};

/// Handshake failure reasons (`reason` label of
/// `shamal_tls_handshake_failures_total`).
pub mod reason {
    /// `ClientAuth::Required` and the client presented no certificate.
    pub const NO_CLIENT_CERT: &str = "no_client_cert";
    /// The peer's certificate does not chain to the CA bundle.
    pub const UNKNOWN_CA: &str = "unknown_ca";
    /// The peer's certificate has expired.
    pub const EXPIRED: &str = "expired";
    /// The peer's certificate is not valid yet.
    pub const NOT_YET_VALID: &str = "not_yet_valid";
    /// Another problem with the peer's certificate (wrong usage, bad
    /// encoding, revoked, ...).
    pub const BAD_CERTIFICATE: &str = "bad_certificate";
    /// The peer does not speak TLS (plaintext HTTP/2 or HTTP/1.1, garbage).
    pub const NOT_TLS: &str = "not_tls";
    /// The peer aborted the handshake with an alert (it refused our
    /// certificate, or found no common protocol).
    pub const PEER_ALERT: &str = "peer_alert";
    /// The connection closed before the handshake finished.
    pub const CLOSED: &str = "closed";
    /// The handshake did not finish within the handshake timeout.
    pub const TIMEOUT: &str = "timeout";
    /// Anything else.
    pub const OTHER: &str = "other";

    pub const ALL: [&str; 10] = [
        NO_CLIENT_CERT,
        UNKNOWN_CA,
        EXPIRED,
        NOT_YET_VALID,
        BAD_CERTIFICATE,
        NOT_TLS,
        PEER_ALERT,
        CLOSED,
        TIMEOUT,
        OTHER,
    ];
}

/// The TLS counters of one process; clone it into every `ServerTls` and
/// `ClientTls` (registering twice in one registry fails).
#[derive(Clone, Debug)]
pub struct TlsMetrics {
    handshake_failures: IntCounterVec,
    reloads: IntCounterVec,
}

impl TlsMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<TlsMetrics> {
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "shamal_tls_handshake_failures_total",
                "Inbound TLS handshakes that failed, by reason.",
            ),
            &["reason"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "shamal_tls_reloads_total",
                "Certificate, key and CA bundle reloads after their files changed, by outcome (success, failure: the previous material stays in use).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(handshake_failures.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        for reason in reason::ALL {
            handshake_failures.with_label_values(&[reason]);
        }
        for outcome in ["success", "failure"] {
            reloads.with_label_values(&[outcome]);
        }
        Ok(TlsMetrics {
            handshake_failures,
            reloads,
        })
    }

    pub(crate) fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    pub(crate) fn reloaded(&self, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        self.reloads.with_label_values(&[outcome]).inc();
    }

    /// Failed handshakes counted so far for one reason.
    pub fn handshake_failures(&self, reason: &str) -> u64 {
        self.handshake_failures.with_label_values(&[reason]).get()
    }

    /// Reloads counted so far with one outcome (`success` or `failure`).
    pub fn reloads(&self, outcome: &str) -> u64 {
        self.reloads.with_label_values(&[outcome]).get()
    }
}
