//! The backoff of every background loop that reconnects or retries (the
//! registry Watch, the worker's registration, heartbeats and placement
//! reports, the async queue's consumers and result notifications): the
//! delay doubles from `min` up to `max` and is reset after a success, and
//! each delay gets a random jitter, so that a fleet that lost its registry
//! or its Redis at the same moment does not come back in lockstep.
//!
//! The sequence comes from `backon`; this type only fixes the policy (no
//! limit on attempts) and adds the reset the loops need.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// An endless, capped exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    max: Duration,
    current: ExponentialBackoff,
}

impl Backoff {
    /// Delays start at `min` and double up to `max`; the jitter adds up to
    /// the delay itself (so a delay lies in `[d, 2d)`), and the result never
    /// exceeds `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            max,
            current: builder.build(),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts again from `min`, after a success.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_min_to_max_and_reset() {
        let min = Duration::from_millis(50);
        let max = Duration::from_secs(2);
        let mut backoff = Backoff::new(min, max);
        let first = backoff.next_delay();
        assert!(first >= min && first < 2 * min, "{first:?}");
        let later: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(later.iter().all(|delay| *delay <= max), "{later:?}");
        assert!(
            later.iter().rev().take(5).all(|delay| *delay >= max / 2),
            "capped delays stay near max: {later:?}"
        );
        backoff.reset();
        let again = backoff.next_delay();
        assert!(again < 2 * min, "reset starts from min: {again:?}");
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).next_delay())
            .collect();
        assert!(
            delays.len() > 1,
            "twenty fresh backoffs all waited {delays:?}"
        );
    }
}
