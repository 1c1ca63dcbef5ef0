//! Errors: each names the file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}", path = .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but its content is unusable.
    #[error("{path}: {message}", path = .path.display())]
    Invalid { path: PathBuf, message: String },
    /// Certificate and key parse but do not belong together.
    #[error(
        "{key} is not the private key of the certificate in {cert}: {message}",
        key = .key.display(),
        cert = .cert.display()
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    /// `init_dev_pki` found a CA and was not told to replace it.
    #[error("{path} already exists; pass --force to replace the development CA", path = .path.display())]
    CaExists { path: PathBuf },
    /// Generating a development certificate failed.
    #[error("generating {what}: {message}")]
    Generate { what: String, message: String },
    /// A rustls configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(String),
}

impl TlsError {
    pub(crate) fn invalid(path: &std::path::Path, message: impl Into<String>) -> TlsError {
        TlsError::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}
