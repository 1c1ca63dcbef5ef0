//! What a certificate says about its holder: SPIFFE identity, serial number.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::PeerIdentity;

/// The SPIFFE identity in a DER certificate's URI subject alternative
/// names: the first URI that parses as `spiffe://<td>/<service>/<id>`.
/// `None` when the certificate does not parse or carries none.
pub fn certificate_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => PeerIdentity::from_uri(uri),
        _ => None,
    })
}

/// A DER certificate's serial number in lower-case hex (no leading zero
/// bytes), as `openssl x509 -serial` prints it modulo case.
pub fn certificate_serial(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let raw = cert.raw_serial();
    let first = raw.iter().position(|byte| *byte != 0).unwrap_or(raw.len());
    let trimmed = &raw[first..];
    Some(if trimmed.is_empty() {
        "00".to_owned()
    } else {
        hex::encode(trimmed)
    })
}
