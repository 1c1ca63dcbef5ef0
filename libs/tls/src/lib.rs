//! Mutual TLS for every Shamal connection (rustls on ring, no OpenSSL).
//!
//! A service's identity is a SPIFFE URI in its certificate's subject
//! alternative names: `spiffe://<trust-domain>/<service>/<id>`.
//!
//! - [`ServerTls`]: a reloading server certificate and client-certificate
//!   verifier; [`ServerTls::incoming`] feeds tonic, [`ServerTls::axum_listener`]
//!   feeds axum, and [`peer_info`] / [`peer_identity`] read who connected
//!   from a request's extensions.
//! - [`ClientTls`]: a reloading client certificate and CA bundle;
//!   [`ClientTls::connect_lazy`] makes a tonic channel.
//! - [`init_dev_pki`]: a development CA and one certificate per service
//!   (`shamal certs init`).
//!
//! Certificates, keys and CA bundles are re-read when their files change
//! (see [`reload`]); docs/tls.md describes the files and rotation.

mod cert_info;
mod client;
pub mod dev;
mod error;
pub mod identity;
mod metrics;
pub mod reload;
mod serve;
mod server;

use std::path::PathBuf;

pub use cert_info::{certificate_identity, certificate_serial};
pub use client::ClientTls;
pub use dev::{DevCa, DevPki, DevPkiOptions, DevService, init_dev_pki, issue};
pub use error::TlsError;
pub use identity::PeerIdentity;
pub use metrics::{TlsMetrics, reason as failure_reason};
pub use serve::{Conn, HttpListener, Incoming};
pub use server::{
    ClientAuth, PeerInfo, ServerTls, TlsIncoming, TlsListener, TlsStream, grpc_peer_identity,
    peer_identity, peer_info,
};

/// The PEM files of one TLS participant (a server, a client, or both).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    /// This participant's certificate, then any intermediates.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates peers must chain to; several during a CA
    /// rotation (old and new, overlapping).
    pub ca: PathBuf,
}
