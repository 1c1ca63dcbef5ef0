//! The `[audit]` table of a producing service's settings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// 256 MiB: the default bound on unshipped bytes.
pub const DEFAULT_MAX_SPOOL_BYTES: u64 = 256 * 1024 * 1024;
/// 16 MiB: the default size at which the writer starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// What [`Auditor::record`](crate::Auditor::record) and
/// [`Auditor::admit`](crate::Auditor::admit) do when the spool holds
/// `max_spool_bytes` unshipped bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Refuse: `admit` and `record` return [`Backlog`](crate::Backlog), so
    /// that no request is served without its audit event.
    #[default]
    FailClosed,
    /// Serve anyway: the event is dropped, counted in
    /// `shamal_audit_dropped_total` and a warning is logged (at most one
    /// every 10 s).
    FailOpen,
}

/// Where a producer's audit events go and how much may wait for the audit
/// service. Usable as the `[audit]` table of a service's settings; every
/// field has a default, and `endpoint` unset (the default) turns auditing
/// off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditClientConfig {
    /// The audit service's gRPC address: `https://audit:8301`, or
    /// `host:port` (then `https://` with TLS, `http://` without). `None`
    /// (the default): auditing is off and nothing is spooled.
    pub endpoint: Option<String>,
    /// The spool's directory (created if missing). Required when
    /// `endpoint` is set; one running producer per directory (a lock file
    /// enforces it).
    pub spool_dir: PathBuf,
    /// Bound on the bytes recorded but not yet acknowledged by the audit
    /// service (queued + on disk), default 256 MiB. At the bound,
    /// `on_full` decides.
    pub max_spool_bytes: u64,
    /// `fail_closed` (default) or `fail_open`.
    pub on_full: OnFull,
    /// Most events per `Append` call (1..=10000, default 2000).
    pub batch_size: usize,
    /// Group-commit window of the spool writer, milliseconds (0..=1000,
    /// default 10): after the first queued event it waits this long for
    /// more before writing them with one `fsync`. A `flush` ends the window
    /// at once.
    pub flush_interval_ms: u64,
    /// How long the shipper lets newly spooled events accumulate before it
    /// sends a batch that is not full, milliseconds (0..=60000, default
    /// 200). Fewer, larger `Append`s cost the audit service far less per
    /// record (one transaction, one `fsync`, index pages shared); the
    /// records wait in the durable spool meanwhile.
    pub ship_interval_ms: u64,
    /// Size at which the writer starts a new segment file (4 KiB..=1 GiB,
    /// default 16 MiB). Fully shipped segments are deleted.
    pub segment_bytes: u64,
    /// First delay before retrying a failed `Append`, milliseconds
    /// (default 100); doubles up to `retry_max_ms` (default 10000).
    pub retry_min_ms: u64,
    /// Longest delay between `Append` retries, milliseconds.
    pub retry_max_ms: u64,
    /// Timeout of one `Append` call, milliseconds (default 10000).
    pub request_timeout_ms: u64,
}

impl Default for AuditClientConfig {
    fn default() -> Self {
        AuditClientConfig {
            endpoint: None,
            spool_dir: PathBuf::new(),
            max_spool_bytes: DEFAULT_MAX_SPOOL_BYTES,
            on_full: OnFull::FailClosed,
            batch_size: 2000,
            flush_interval_ms: 10,
            ship_interval_ms: 200,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retry_min_ms: 100,
            retry_max_ms: 10_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// A setting that cannot work, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid audit setting '{field}': {reason}")]
pub struct ConfigError {
    /// The field at fault, as spelled in the `[audit]` table.
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

fn within(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(field, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

impl AuditClientConfig {
    /// Whether auditing is on (an endpoint is set).
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some()
    }

    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.endpoint {
            let endpoint = endpoint.trim();
            if endpoint.is_empty() {
                return Err(invalid(
                    "endpoint",
                    "empty (leave it out to turn auditing off)",
                ));
            }
            let url = endpoint_url(endpoint, false);
            match url.parse::<tonic::codegen::http::Uri>() {
                Ok(uri) if uri.host().is_some() => {}
                Ok(_) => return Err(invalid("endpoint", format!("'{endpoint}' names no host"))),
                Err(error) => {
                    return Err(invalid(
                        "endpoint",
                        format!("'{endpoint}' is not a URL: {error}"),
                    ));
                }
            }
            if self.spool_dir.as_os_str().is_empty() {
                return Err(invalid("spool_dir", "required when endpoint is set"));
            }
        }
        within("max_spool_bytes", self.max_spool_bytes, 1, u64::MAX)?;
        within("batch_size", self.batch_size as u64, 1, 10_000)?;
        within("flush_interval_ms", self.flush_interval_ms, 0, 1_000)?;
        within("ship_interval_ms", self.ship_interval_ms, 0, 60_000)?;
        within(
            "segment_bytes",
            self.segment_bytes,
            4 * 1024,
            1024 * 1024 * 1024,
        )?;
        within("retry_min_ms", self.retry_min_ms, 1, 60_000)?;
        within("retry_max_ms", self.retry_max_ms, 1, 600_000)?;
        if self.retry_max_ms < self.retry_min_ms {
            return Err(invalid(
                "retry_max_ms",
                format!(
                    "{} is below retry_min_ms ({})",
                    self.retry_max_ms, self.retry_min_ms
                ),
            ));
        }
        within("request_timeout_ms", self.request_timeout_ms, 1, 600_000)?;
        Ok(())
    }
}

/// The URL of an endpoint given as a URL or as `host:port`.
pub(crate) fn endpoint_url(endpoint: &str, tls: bool) -> String {
    let endpoint = endpoint.trim();
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}
