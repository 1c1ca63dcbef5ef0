//! A development PKI: one CA and a certificate per service, each naming its
//! SPIFFE identity (`shamal certs init`). For production use a real CA
//! (docs/tls.md).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{PeerIdentity, TlsError, TlsFiles};

/// The services `init_dev_pki` issues certificates for by default.
pub const DEFAULT_SERVICES: [&str; 5] = ["router", "registry", "worker", "batch", "audit"];
/// The trust domain of development identities.
pub const DEFAULT_TRUST_DOMAIN: &str = "shamal.local";
/// Host names and addresses every development certificate carries.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// One service to issue a certificate for: `spiffe://<td>/<name>/<id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevService {
    pub name: String,
    pub id: String,
}

impl DevService {
    /// A service whose instance id is its name.
    pub fn new(name: &str) -> DevService {
        DevService {
            name: name.to_owned(),
            id: name.to_owned(),
        }
    }

    /// `NAME` or `NAME=ID`.
    pub fn parse(text: &str) -> DevService {
        match text.split_once('=') {
            Some((name, id)) => DevService {
                name: name.to_owned(),
                id: id.to_owned(),
            },
            None => DevService::new(text),
        }
    }
}

/// What `init_dev_pki` writes.
#[derive(Clone, Debug)]
pub struct DevPkiOptions {
    pub trust_domain: String,
    pub services: Vec<DevService>,
    /// Extra DNS names or IP addresses for every service certificate (on
    /// top of `localhost`, `127.0.0.1` and `::1`).
    pub hosts: Vec<String>,
    pub ca_validity: Duration,
    pub leaf_validity: Duration,
    /// Replace an existing CA (and every certificate) in the directory.
    pub force: bool,
}

impl Default for DevPkiOptions {
    fn default() -> Self {
        DevPkiOptions {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            services: DEFAULT_SERVICES
                .iter()
                .map(|name| DevService::new(name))
                .collect(),
            hosts: Vec::new(),
            ca_validity: 3650 * DAY,
            leaf_validity: 90 * DAY,
            force: false,
        }
    }
}

/// The result of `init_dev_pki`.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
    pub trust_domain: String,
    /// The services and the identity each certificate carries.
    pub services: Vec<(DevService, PeerIdentity)>,
    /// Every file written, CA first.
    pub written: Vec<PathBuf>,
}

impl DevPki {
    /// The files a service uses: `<service>.pem`, `<service>-key.pem`,
    /// `ca.pem`.
    pub fn files(&self, service: &str) -> TlsFiles {
        service_files(&self.dir, service)
    }
}

/// The paths `init_dev_pki` uses for one service in `dir`.
pub fn service_files(dir: &Path, service: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{service}.pem")),
        key: dir.join(format!("{service}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

/// A development certificate authority.
pub struct DevCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA valid for ten years.
    pub fn generate() -> Result<DevCa, TlsError> {
        let now = SystemTime::now();
        DevCa::generate_with("Shamal development CA", now - DAY, now + 3650 * DAY)
    }

    /// A new CA with this common name and validity.
    pub fn generate_with(
        common_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<DevCa, TlsError> {
        let failed = |error: rcgen::Error| TlsError::Generate {
            what: "the development CA".to_owned(),
            message: error.to_string(),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Shamal development");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = KeyPair::generate().map_err(failed)?;
        let cert = params.self_signed(&key).map_err(failed)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<DevCa, TlsError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|error| TlsError::invalid(&key_path, format!("not a usable key: {error}")))?;
        // Only the first certificate: ca.pem may be a bundle during a
        // rotation, with the signing CA first.
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|error| {
            TlsError::invalid(&cert_path, format!("not a usable CA certificate: {error}"))
        })?;
        Ok(DevCa {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, TlsError> {
        let cert = dir.join("ca.pem");
        let key = dir.join("ca-key.pem");
        write_file(&cert, self.cert_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok(vec![cert, key])
    }
}

/// Issues a certificate for `identity` (a URI SAN), valid for client and
/// server authentication, naming `hosts` (DNS names or IP addresses) as
/// further SANs. Gives `(cert_pem, key_pem)`; the key is new.
pub fn issue(
    ca: &DevCa,
    identity: &PeerIdentity,
    hosts: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(String, String), TlsError> {
    let what = || format!("the certificate of {identity}");
    let failed = |error: rcgen::Error| TlsError::Generate {
        what: what(),
        message: error.to_string(),
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Shamal development");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{}/{}", identity.service, identity.id),
    );
    let uri = Ia5String::try_from(identity.uri()).map_err(failed)?;
    params.subject_alt_names.push(SanType::URI(uri));
    for host in hosts {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let san = match host.parse::<IpAddr>() {
            Ok(address) => SanType::IpAddress(address),
            Err(_) => SanType::DnsName(Ia5String::try_from(host).map_err(failed)?),
        };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let key = KeyPair::generate().map_err(failed)?;
    let cert = params.signed_by(&key, &ca.issuer).map_err(failed)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a development CA and one certificate per service into `dir`
/// (created if missing): `ca.pem`, `ca-key.pem`, `<service>.pem`,
/// `<service>-key.pem`; keys are mode 0600. Refuses to replace an existing
/// CA unless `options.force`.
pub fn init_dev_pki(dir: &Path, options: &DevPkiOptions) -> Result<DevPki, TlsError> {
    let mut identities = Vec::new();
    for service in &options.services {
        let identity = PeerIdentity::new(&options.trust_domain, &service.name, &service.id);
        if PeerIdentity::from_uri(&identity.uri()).as_ref() != Some(&identity) {
            return Err(TlsError::Config(format!(
                "{} is not a valid SPIFFE identity (trust domain, service and id may hold letters, digits, '-', '.', '_')",
                identity.uri()
            )));
        }
        if identities
            .iter()
            .any(|(other, _): &(DevService, PeerIdentity)| other.name == service.name)
        {
            return Err(TlsError::Config(format!(
                "service {} is listed twice",
                service.name
            )));
        }
        identities.push((service.clone(), identity));
    }
    let mut hosts: Vec<String> = LOOPBACK_HOSTS.iter().map(|host| host.to_string()).collect();
    for host in &options.hosts {
        let host = host.trim();
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(TlsError::Config(format!(
                "{host:?} is not a host name or address"
            )));
        }
        if !hosts.iter().any(|known| known == host) {
            hosts.push(host.to_owned());
        }
    }

    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    if !options.force {
        for path in [&ca_cert, &ca_key] {
            if path.exists() {
                return Err(TlsError::CaExists { path: path.clone() });
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;

    let now = SystemTime::now();
    // A little slack for clocks that are slightly behind.
    let not_before = now - Duration::from_secs(3600);
    let ca = DevCa::generate_with(
        &format!("Shamal development CA ({})", options.trust_domain),
        not_before,
        now + options.ca_validity,
    )?;
    let mut written = ca.write(dir)?;
    for (service, identity) in &identities {
        let (cert_pem, key_pem) = issue(
            &ca,
            identity,
            &hosts,
            not_before,
            now + options.leaf_validity,
        )?;
        let files = service_files(dir, &service.name);
        write_file(&files.key, key_pem.as_bytes(), true)?;
        write_file(&files.cert, cert_pem.as_bytes(), false)?;
        written.push(files.cert);
        written.push(files.key);
    }
    Ok(DevPki {
        dir: dir.to_owned(),
        trust_domain: options.trust_domain.clone(),
        services: identities,
        written,
    })
}

/// Replaces `path` atomically (a temporary file in the same directory,
/// then a rename), mode 0600 when `private`, 0644 otherwise.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let failed = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let result = options.open(&temporary).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let result = result.and_then(|()| std::fs::rename(&temporary, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map_err(failed)
}
