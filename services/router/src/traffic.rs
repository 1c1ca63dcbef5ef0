//! Per-version traffic the router reports to the registry (the input of its
//! canary analysis): requests, server-side errors and a latency histogram
//! per (model, answered version, rollout revision, role), as deltas since
//! the last report.
//!
//! The hot path takes a read lock and bumps atomics; only the first request
//! of a new key, and the report taken once an interval, take the write lock.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shamal_registry_client::proto::VersionTraffic;
use tonic::Code;

/// Whether a request was served to the caller or copied to the shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Primary,
    Shadow,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Shadow => "shadow",
        }
    }
}

/// Whether a final code counts as a server-side failure of the version.
/// Caller mistakes (bad input, unknown names, refused credentials) and
/// callers going away are not; the router's own admission refusals are not
/// recorded at all (they never reached a version).
///
/// The one error table decides: anything but OK and `Fault::Caller`.
pub fn is_server_error(code: Code) -> bool {
    shamal_error::is_server_error(code)
}

struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Box<[AtomicU64]>,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..shamal_registry_client::latency_bucket_count())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn add(&self, error: bool, bucket: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(count) = self.latency.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// (version, rollout revision, role) within one model.
type Key = (u64, u64, Role);

/// Traffic accumulated since the last [`Traffic::take`].
#[derive(Default)]
pub struct Traffic {
    models: RwLock<HashMap<String, HashMap<Key, Counters>>>,
}

impl Traffic {
    /// Counts one request. `code` is its final gRPC code.
    pub fn record(
        &self,
        model: &str,
        version: u64,
        rollout_revision: u64,
        role: Role,
        code: Code,
        elapsed: Duration,
    ) {
        let key = (version, rollout_revision, role);
        let error = is_server_error(code);
        let bucket = shamal_registry_client::latency_bucket(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        );
        {
            // Counting happens under the read lock, so that `take` (under
            // the write lock) never drops an entry someone is counting in.
            let models = self
                .models
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(counters) = models.get(model).and_then(|keys| keys.get(&key)) {
                counters.add(error, bucket);
                return;
            }
        }
        let mut models = self
            .models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        models
            .entry(model.to_owned())
            .or_default()
            .entry(key)
            .or_insert_with(Counters::new)
            .add(error, bucket);
    }

    /// The traffic since the last call, sorted by model, version, revision
    /// and role; counters restart from zero. Keys idle for a whole interval
    /// are forgotten.
    pub fn take(&self) -> Vec<VersionTraffic> {
        let mut models = self
            .models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut report = Vec::new();
        for (model, keys) in models.iter_mut() {
            keys.retain(|(version, rollout_revision, role), counters| {
                let requests = counters.requests.swap(0, Ordering::Relaxed);
                let errors = counters.errors.swap(0, Ordering::Relaxed);
                let latency_buckets: Vec<u64> = counters
                    .latency
                    .iter()
                    .map(|count| count.swap(0, Ordering::Relaxed))
                    .collect();
                if requests == 0 {
                    return false;
                }
                report.push(VersionTraffic {
                    model: model.clone(),
                    version: *version,
                    rollout_revision: *rollout_revision,
                    role: role.as_str().to_owned(),
                    requests,
                    errors,
                    latency_buckets,
                });
                true
            });
        }
        models.retain(|_, keys| !keys.is_empty());
        report.sort_by(|a, b| {
            (&a.model, a.version, a.rollout_revision, &a.role).cmp(&(
                &b.model,
                b.version,
                b.rollout_revision,
                &b.role,
            ))
        });
        report
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use shamal_registry_client::{latency_bucket, latency_bucket_count};

    #[test]
    fn deltas_are_counted_per_key_and_reset_once_taken() {
        let traffic = Traffic::default();
        let ms = Duration::from_millis;
        traffic.record("m", 1, 7, Role::Primary, Code::Ok, ms(1));
        traffic.record("m", 1, 7, Role::Primary, Code::Unavailable, ms(1));
        traffic.record("m", 1, 7, Role::Primary, Code::InvalidArgument, ms(100));
        traffic.record("m", 2, 7, Role::Primary, Code::DeadlineExceeded, ms(1));
        traffic.record("m", 2, 7, Role::Shadow, Code::Internal, ms(1));
        traffic.record("m", 1, 6, Role::Primary, Code::Ok, ms(1));
        traffic.record("other", 3, 0, Role::Primary, Code::NotFound, ms(1));

        let report = traffic.take();
        let keys: Vec<_> = report
            .iter()
            .map(|t| {
                (
                    t.model.as_str(),
                    t.version,
                    t.rollout_revision,
                    t.role.as_str(),
                    t.requests,
                    t.errors,
                )
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ("m", 1, 6, "primary", 1, 0),
                ("m", 1, 7, "primary", 3, 1),
                ("m", 2, 7, "primary", 1, 1),
                ("m", 2, 7, "shadow", 1, 1),
                ("other", 3, 0, "primary", 1, 0),
            ]
        );
        let buckets = &report[1].latency_buckets;
        assert_eq!(buckets.len(), latency_bucket_count());
        assert_eq!(buckets.iter().sum::<u64>(), 3);
        assert_eq!(buckets[latency_bucket(1_000)], 2);
        assert_eq!(buckets[latency_bucket(100_000)], 1);

        // Taken deltas are gone; new traffic starts from zero.
        assert!(traffic.take().is_empty());
        traffic.record("m", 1, 7, Role::Primary, Code::Ok, ms(1));
        let report = traffic.take();
        assert_eq!(report.len(), 1);
        assert_eq!((report[0].requests, report[0].errors), (1, 0));
        assert_eq!(report[0].latency_buckets.iter().sum::<u64>(), 1);
    }

    #[test]
    fn concurrent_counting_loses_nothing() {
        let traffic = std::sync::Arc::new(Traffic::default());
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let traffic = traffic.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        traffic.record("m", i % 3, thread, Role::Primary, Code::Ok, Duration::ZERO);
                    }
                })
            })
            .collect();
        let mut total = 0;
        for _ in 0..20 {
            total += traffic.take().iter().map(|t| t.requests).sum::<u64>();
        }
        for thread in threads {
            thread.join().unwrap();
        }
        total += traffic.take().iter().map(|t| t.requests).sum::<u64>();
        assert_eq!(total, 40_000);
    }

    #[test]
    fn caller_mistakes_are_not_server_errors() {
        for code in [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Cancelled,
            Code::PermissionDenied,
        ] {
            assert!(!is_server_error(code), "{code:?}");
        }
        for code in [
            Code::Internal,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Unknown,
        ] {
            assert!(is_server_error(code), "{code:?}");
        }
    }
}
