//! The async API's settings, read from the router's configuration.

use std::time::Duration;

use shamal_async_queue::QueueConfig;

use crate::config::{AUTO_REGION, RouterConfig};

/// Async settings of a router (from [`RouterConfig`]).
#[derive(Clone, Debug)]
pub struct AsyncSettings {
    pub result_ttl: Duration,
    pub job_timeout: Duration,
    /// Region of jobs without a residency policy; `None`: by capacity.
    pub default_region: Option<String>,
    pub max_backlog: u64,
    pub max_wait: Duration,
}

impl AsyncSettings {
    pub fn from_config(config: &RouterConfig) -> AsyncSettings {
        AsyncSettings {
            result_ttl: Duration::from_millis(config.async_result_ttl_ms),
            job_timeout: Duration::from_millis(config.async_job_timeout_ms),
            default_region: (config.async_region != AUTO_REGION)
                .then(|| config.async_region.clone()),
            max_backlog: config.max_async_backlog,
            max_wait: Duration::from_millis(config.async_max_wait_ms),
        }
    }

    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            result_ttl: self.result_ttl,
            ..QueueConfig::default()
        }
    }
}

/// Hides a password in a Redis URL for logs and messages.
pub(super) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redacted("redis://user:secret@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(redacted("redis://redis:6379"), "redis://redis:6379");
    }
}
