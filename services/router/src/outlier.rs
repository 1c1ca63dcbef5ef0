//! Outlier ejection: workers that fail or slow down are passed over for a
//! while, then brought back gradually.
//!
//! - **Failures**: `consecutive_failures` failed calls in a row (transport
//!   errors, UNAVAILABLE, INTERNAL, UNKNOWN) eject the worker at once.
//! - **Latency**: every `interval` the router compares, per model, each
//!   worker's mean latency over the last interval with the fastest other
//!   worker's. A worker more than `slow_factor` times slower (and slower by
//!   at least `min_slowdown`), with at least `min_requests` answers, is
//!   ejected.
//! - An ejection lasts `base_ejection` times the number of recent
//!   ejections (capped at ten), so a worker that stays bad stays out
//!   longer. When it returns, its weight ramps from 10% to 100% over
//!   `slow_start`; a clean interval forgets one past ejection.
//! - At most `max_ejection_percent` of the workers are ejected at a time,
//!   and a request whose every candidate is ejected still goes to one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::pool::Upstream;

/// Milliseconds since the router's clock started (never 0).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Clone, Debug)]
pub struct OutlierSettings {
    pub interval: Duration,
    pub consecutive_failures: u32,
    pub slow_factor: f64,
    pub min_slowdown: Duration,
    pub min_requests: u64,
    pub base_ejection: Duration,
    pub slow_start: Duration,
    pub max_ejection_percent: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            interval: Duration::from_millis(500),
            consecutive_failures: 5,
            slow_factor: 3.0,
            min_slowdown: Duration::from_millis(2),
            min_requests: 5,
            base_ejection: Duration::from_secs(2),
            slow_start: Duration::from_secs(3),
            max_ejection_percent: 50,
        }
    }
}

/// Latency of one model's answers from one worker during the current
/// interval.
#[derive(Default)]
struct Window {
    count: AtomicU64,
    total_us: AtomicU64,
}

/// One worker's record.
#[derive(Default)]
pub struct OutlierState {
    consecutive_failures: AtomicU32,
    /// Ejected until this time (`now_ms`); 0 when not ejected.
    ejected_until: AtomicU64,
    /// Recent ejections (sets the next ejection's length).
    ejections: AtomicU32,
    windows: RwLock<HashMap<String, Arc<Window>>>,
}

/// Whether a failure says something about the worker rather than the
/// request or the load: `Fault::Server` in the one error table.
pub fn counts_as_failure(code: Code) -> bool {
    shamal_error::is_replica_failure(code)
}

impl OutlierState {
    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// Weight factor while returning from an ejection: 10% right after,
    /// 100% after `slow_start`.
    pub fn ramp(&self, now_ms: u64, slow_start: Duration) -> f64 {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || until > now_ms {
            return 1.0;
        }
        let since = (now_ms - until) as f64;
        let span = slow_start.as_millis() as f64;
        if span <= 0.0 || since >= span {
            1.0
        } else {
            (since / span).max(0.1)
        }
    }

    /// An answer from the worker (any code the worker chose to return).
    pub fn record_success(&self, model: &str, latency: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let window = {
            let windows = self
                .windows
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            windows.get(model).cloned()
        };
        let window = window.unwrap_or_else(|| {
            self.windows
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry(model.to_owned())
                .or_default()
                .clone()
        });
        window.count.fetch_add(1, Ordering::Relaxed);
        window
            .total_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// A failure of the worker; true when it is ejected by this one.
    pub fn record_failure(&self, settings: &OutlierSettings, now_ms: u64) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= settings.consecutive_failures && !self.ejected(now_ms) {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.eject(settings, now_ms);
            return true;
        }
        false
    }

    fn eject(&self, settings: &OutlierSettings, now_ms: u64) -> Duration {
        let ejections = (self.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(10);
        let length = settings.base_ejection * ejections;
        self.ejected_until
            .store(now_ms + length.as_millis() as u64, Ordering::Relaxed);
        length
    }

    /// Takes this interval's figures: model -> (answers, mean latency).
    fn take_window(&self) -> HashMap<String, (u64, Duration)> {
        let windows = self
            .windows
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        windows
            .iter()
            .filter_map(|(model, window)| {
                let count = window.count.swap(0, Ordering::Relaxed);
                let total = window.total_us.swap(0, Ordering::Relaxed);
                (count > 0).then(|| (model.clone(), (count, Duration::from_micros(total / count))))
            })
            .collect()
    }
}

/// One round of latency-based detection over `members`.
pub fn detect(members: &[Arc<Upstream>], settings: &OutlierSettings, now_ms: u64) {
    let windows: Vec<HashMap<String, (u64, Duration)>> = members
        .iter()
        .map(|upstream| upstream.outlier.take_window())
        .collect();
    let max_ejected = (members.len() * usize::from(settings.max_ejection_percent) / 100).max(1);
    let mut ejected_now = members
        .iter()
        .filter(|upstream| upstream.outlier.ejected(now_ms))
        .count();
    for (index, upstream) in members.iter().enumerate() {
        if upstream.outlier.ejected(now_ms) {
            continue;
        }
        let mut slow_for: Option<(String, Duration, Duration)> = None;
        let mut judged = false;
        for (model, (count, mean)) in &windows[index] {
            if *count < settings.min_requests {
                continue;
            }
            let best_other = windows
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .filter_map(|(_, window)| window.get(model))
                .filter(|(count, _)| *count >= settings.min_requests)
                .map(|(_, mean)| *mean)
                .min();
            let Some(best_other) = best_other else {
                continue;
            };
            judged = true;
            if mean.as_secs_f64() > best_other.as_secs_f64() * settings.slow_factor
                && *mean > best_other + settings.min_slowdown
            {
                slow_for = Some((model.clone(), *mean, best_other));
                break;
            }
        }
        match slow_for {
            Some((model, mean, best_other)) if ejected_now < max_ejected => {
                let length = upstream.outlier.eject(settings, now_ms);
                ejected_now += 1;
                tracing::warn!(
                    worker = %upstream.meta.address,
                    model = %model,
                    mean_ms = mean.as_secs_f64() * 1e3,
                    best_other_ms = best_other.as_secs_f64() * 1e3,
                    ejection_ms = length.as_millis() as u64,
                    "slow worker ejected"
                );
            }
            Some(_) => {}
            None if judged => {
                // A clean interval: forget one past ejection.
                let _ = upstream.outlier.ejections.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |ejections| ejections.checked_sub(1),
                );
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replica_failures_count() {
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
        ] {
            assert!(counts_as_failure(code), "{code:?}");
        }
        // The request's fault, or load: not the replica's.
        for code in [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Cancelled,
        ] {
            assert!(!counts_as_failure(code), "{code:?}");
        }
    }

    #[test]
    fn failures_in_a_row_eject_and_ejections_grow() {
        let settings = OutlierSettings::default();
        let state = OutlierState::default();
        let now = 1_000;
        for _ in 0..4 {
            assert!(!state.record_failure(&settings, now));
        }
        state.record_success("m", Duration::from_millis(1));
        for _ in 0..4 {
            assert!(!state.record_failure(&settings, now), "a success resets");
        }
        assert!(state.record_failure(&settings, now), "fifth in a row");
        assert!(state.ejected(now + 1));
        let first_end = now + settings.base_ejection.as_millis() as u64;
        assert!(!state.ejected(first_end));
        // Right after it returns, it weighs 10%, then ramps up.
        assert!((state.ramp(first_end, settings.slow_start) - 0.1).abs() < 1e-9);
        let half = first_end + settings.slow_start.as_millis() as u64 / 2;
        assert!((state.ramp(half, settings.slow_start) - 0.5).abs() < 0.01);
        for _ in 0..5 {
            state.record_failure(&settings, first_end + 1);
        }
        let second = settings.base_ejection.as_millis() as u64 * 2;
        assert!(
            state.ejected(first_end + second),
            "second ejection is longer"
        );
    }
}
