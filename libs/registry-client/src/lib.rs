//! Client side of the registry's internal gRPC API, shared by the router and
//! the workers: a Watch subscription that reconnects and resumes from the
//! last revision it saw, the latency buckets routers report traffic in, and
//! what a version's placement means for one worker.

pub mod names;

use std::time::Duration;

use shamal_backoff::Backoff;
use shamal_proto::shamal::registry::v1::registry_client::RegistryClient;
use shamal_proto::shamal::registry::v1::{WatchEvent, WatchRequest};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

pub use shamal_proto::shamal::registry::v1 as proto;

/// Why a registry client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured address is neither `host:port` nor a URL tonic can
    /// connect to.
    #[error("invalid registry address '{address}': {source}")]
    InvalidAddress {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A lazily connecting plaintext channel to the registry's gRPC address
/// (`host:port` or a URL). Fails only on an address that cannot be parsed;
/// an unreachable registry shows up on the first call.
pub fn channel(address: &str) -> Result<Channel, Error> {
    channel_with(address, None)
}

/// Like [`channel`], over mTLS with this service's certificate when `tls`
/// is given (a `host:port` address then means `https://`).
pub fn channel_with(address: &str, tls: Option<&shamal_tls::ClientTls>) -> Result<Channel, Error> {
    let url = if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else if tls.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|source| Error::InvalidAddress {
            address: address.to_owned(),
            source,
        })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(match tls {
        Some(tls) => tls.connect_lazy(endpoint),
        None => endpoint.connect_lazy(),
    })
}

/// A registry client with Shamal's message size limit.
pub fn client(channel: Channel) -> RegistryClient<Channel> {
    RegistryClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// Subscribes to the registry's Watch stream and forwards every event to
/// the returned receiver, for as long as the receiver lives. When the
/// stream breaks it reconnects (backing off up to 2 s) and resumes after
/// the last revision delivered, so no change is missed; the registry sends
/// a fresh snapshot when it cannot resume.
pub fn watch(channel: Channel, subscriber: &str) -> mpsc::Receiver<WatchEvent> {
    let (sender, receiver) = mpsc::channel(64);
    let subscriber = subscriber.to_owned();
    tokio::spawn(async move {
        let mut revision = 0u64;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut failures = 0u32;
        loop {
            let mut registry = client(channel.clone());
            let request = WatchRequest {
                since_revision: revision,
                subscriber: subscriber.clone(),
            };
            match registry.watch(request).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(event)) => {
                                backoff.reset();
                                failures = 0;
                                let next = event.revision;
                                if sender.send(event).await.is_err() {
                                    return;
                                }
                                revision = next;
                            }
                            Ok(None) => {
                                tracing::warn!("registry closed the watch stream");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(%status, "registry watch stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    // Loud at first and then every minute or so: a wrong
                    // address must not go unnoticed, nor flood the log.
                    if failures.is_multiple_of(30) {
                        tracing::warn!(%status, attempts = failures + 1, "cannot watch the registry");
                    } else {
                        tracing::debug!(%status, "cannot watch the registry yet");
                    }
                    failures += 1;
                }
            }
            if sender.is_closed() {
                return;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    });
    receiver
}

/// Whether the registry wants `worker_id` to hold `version`: an empty
/// `assigned_workers` means every capable worker (placement mode `all`),
/// otherwise only the workers it lists.
pub fn assigned_to(version: &proto::VersionState, worker_id: &str) -> bool {
    version.assigned_workers.is_empty()
        || version
            .assigned_workers
            .iter()
            .any(|assigned| assigned == worker_id)
}

/// Upper bounds (µs) of the latency buckets that traffic reports use:
/// geometric, 25% apart, from 50 µs to about 2 minutes. A report carries
/// one count per bound plus one for everything slower.
pub fn latency_bounds_us() -> &'static [u64] {
    static BOUNDS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut bounds = Vec::new();
        let mut bound = 50.0f64;
        while bound < 120_000_000.0 {
            bounds.push(bound.round() as u64);
            bound *= 1.25;
        }
        bounds
    })
}

/// Number of counts in a latency histogram (bounds plus overflow).
pub fn latency_bucket_count() -> usize {
    latency_bounds_us().len() + 1
}

/// Index of the bucket a latency falls into.
pub fn latency_bucket(micros: u64) -> usize {
    latency_bounds_us().partition_point(|&bound| bound < micros)
}

/// The `quantile` (0..=1) of a bucketed histogram, as the upper bound of
/// the bucket it falls in (ms); `None` when empty. The overflow bucket
/// reports the last bound.
pub fn latency_quantile_ms(buckets: &[u64], quantile: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((quantile.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let bounds = latency_bounds_us();
    let mut seen = 0u64;
    for (index, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let bound = bounds
                .get(index)
                .or(bounds.last())
                .copied()
                .unwrap_or_default();
            return Some(bound as f64 / 1000.0);
        }
    }
    bounds.last().map(|bound| *bound as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_quantiles_land_in_them() {
        let bounds = latency_bounds_us();
        assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(50), 0);
        assert_eq!(latency_bucket(51), 1);
        assert_eq!(latency_bucket(u64::MAX), bounds.len());

        let mut buckets = vec![0u64; latency_bucket_count()];
        // 99 fast requests (~1 ms) and one slow one (~100 ms).
        buckets[latency_bucket(1_000)] += 99;
        buckets[latency_bucket(100_000)] += 1;
        let p50 = latency_quantile_ms(&buckets, 0.5).unwrap_or_default();
        let p99 = latency_quantile_ms(&buckets, 0.99).unwrap_or_default();
        let p100 = latency_quantile_ms(&buckets, 1.0).unwrap_or_default();
        assert!((1.0..1.3).contains(&p50), "p50 {p50}");
        assert!((1.0..1.3).contains(&p99), "p99 {p99}");
        assert!((100.0..126.0).contains(&p100), "max {p100}");
        assert_eq!(latency_quantile_ms(&[0; 3], 0.5), None);
    }

    #[test]
    fn an_empty_assignment_means_every_worker() {
        let mut version = proto::VersionState::default();
        assert!(assigned_to(&version, "w1"));
        version.assigned_workers = vec!["w2".to_owned(), "w3".to_owned()];
        assert!(!assigned_to(&version, "w1"));
        assert!(assigned_to(&version, "w3"));
    }
}
