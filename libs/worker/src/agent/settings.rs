//! The registry agent's settings, and their validation shared by every
//! worker binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::settings::ModelDefaults;

/// How a worker follows the registry.
#[derive(Clone, Debug)]
pub struct RegistryAgentSettings {
    /// The registry's internal gRPC address (`host:port` or a URL).
    pub address: String,
    /// This worker's identity in the registry; empty: `<hostname>-<port of
    /// the bound gRPC listener>`.
    pub worker_id: String,
    /// `host:port` at which routers reach this worker's inference gRPC;
    /// `None`: the bound gRPC listener's address (the host name in place of
    /// an unspecified IP such as 0.0.0.0).
    pub advertise_address: Option<String>,
    /// Region (data residency) the worker runs in.
    pub region: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Directory of fetched artifacts, `<sha256>.<format>`.
    pub artifact_cache: PathBuf,
    /// Requests the worker is sized to run concurrently, reported to the
    /// registry (routers weight their choice by it); 0: derived from the
    /// model defaults, `instances × max_batch_size` (32 by default).
    pub capacity: u32,
    /// How long a worker that starts draining keeps taking requests after
    /// the registry accepted its drain notice, so that routers hear of it
    /// and route around it first.
    pub drain_grace: Duration,
    /// mTLS to the registry (this worker's certificate); `None`:
    /// plaintext. Set by the worker from its security settings.
    pub tls: Option<shamal_tls::ClientTls>,
}

/// Default of [`RegistryAgentSettings::drain_grace`].
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_millis(1000);

impl RegistryAgentSettings {
    /// Follows the registry at `address` with the defaults: derived id and
    /// address, region `local`, device `cpu`.
    pub fn new(
        address: impl Into<String>,
        artifact_cache: impl Into<PathBuf>,
    ) -> RegistryAgentSettings {
        RegistryAgentSettings {
            address: address.into(),
            worker_id: String::new(),
            advertise_address: None,
            region: "local".to_owned(),
            device: "cpu".to_owned(),
            artifact_cache: artifact_cache.into(),
            capacity: 0,
            drain_grace: DEFAULT_DRAIN_GRACE,
            tls: None,
        }
    }

    /// The capacity reported to the registry: `capacity`, or
    /// `instances × max_batch_size` of the model defaults when it is 0.
    pub fn effective_capacity(&self, defaults: &ModelDefaults) -> u32 {
        if self.capacity > 0 {
            return self.capacity;
        }
        let derived = defaults
            .instances
            .max(1)
            .saturating_mul(defaults.max_batch_size.max(1));
        u32::try_from(derived).unwrap_or(u32::MAX)
    }

    /// The worker id and advertised address, given the bound gRPC address.
    pub fn identity(&self, bound: SocketAddr) -> (String, String) {
        let worker_id = if self.worker_id.is_empty() {
            format!("{}-{}", hostname(), bound.port())
        } else {
            self.worker_id.clone()
        };
        let address = match &self.advertise_address {
            Some(address) => address.clone(),
            None if bound.ip().is_unspecified() => format!("{}:{}", hostname(), bound.port()),
            None => bound.to_string(),
        };
        (worker_id, address)
    }
}

/// A registry setting that cannot work; the message names the field at
/// fault (it is shown as a configuration error).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `registry` is neither `host:port` nor an http(s) URL with a host.
    #[error("registry '{0}' is not a host:port or http(s) URL")]
    Registry(String),
    /// `worker_id` is empty, too long, or has spaces or non-ASCII.
    #[error("worker_id '{0}' must be 1 to 128 printable ASCII characters without spaces")]
    WorkerId(String),
    /// `advertise_address` has no host or no valid port.
    #[error("advertise_address '{0}' must be host:port")]
    AdvertiseAddress(String),
    /// `region` breaks the shared rule for region names.
    #[error("region {0}")]
    Region(#[from] shamal_registry_client::names::Error),
    /// `artifact_cache` is the empty path.
    #[error("artifact_cache must not be empty")]
    EmptyArtifactCache,
    /// `artifact_cache` exists and is not a directory.
    #[error("artifact_cache {} is not a directory", .0.display())]
    ArtifactCacheNotADirectory(PathBuf),
}

/// Checks a worker's registry settings as configured (before the worker
/// binds its port), naming the field at fault. Shared by every worker
/// binary.
pub fn validate_agent_settings(
    registry: &str,
    worker_id: Option<&str>,
    advertise_address: Option<&str>,
    region: &str,
    artifact_cache: &Path,
) -> Result<(), Error> {
    let url = if registry.starts_with("http://") || registry.starts_with("https://") {
        registry.to_owned()
    } else {
        format!("http://{registry}")
    };
    let valid = !registry.trim().is_empty()
        && url
            .parse::<tonic::transport::Uri>()
            .is_ok_and(|uri| uri.host().is_some_and(|host| !host.is_empty()));
    if !valid {
        return Err(Error::Registry(registry.to_owned()));
    }
    if let Some(id) = worker_id
        && (id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()))
    {
        return Err(Error::WorkerId(id.to_owned()));
    }
    if let Some(address) = advertise_address {
        let port = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|port| *port > 0);
        if port.is_none() {
            return Err(Error::AdvertiseAddress(address.to_owned()));
        }
    }
    shamal_registry_client::names::check_region(region)?;
    if artifact_cache.as_os_str().is_empty() {
        return Err(Error::EmptyArtifactCache);
    }
    if artifact_cache.exists() && !artifact_cache.is_dir() {
        return Err(Error::ArtifactCacheNotADirectory(artifact_cache.to_owned()));
    }
    Ok(())
}

/// The machine's host name (`/proc/sys/kernel/hostname`, then `HOSTNAME`),
/// `localhost` when neither is known.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
