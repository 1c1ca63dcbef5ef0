//! Retry budget: retries may add at most a fixed share of extra load.
//!
//! Every request deposits `ratio` of a token; every retry withdraws one. A
//! small reserve, refilled over time, lets a quiet router retry at all. The
//! balance is capped, so a long calm period cannot bank a retry storm.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

/// Thousandths of a token.
const MILLI: i64 = 1_000;

pub struct RetryBudget {
    /// Balance in thousandths of a token.
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
    /// Tokens added per second regardless of traffic.
    min_per_second: i64,
    last_refill: Mutex<Instant>,
}

impl RetryBudget {
    /// `ratio`: retries allowed per request (0.2 = at most 20% extra load);
    /// `min_per_second`: retries allowed per second even without traffic.
    pub fn new(ratio: f64, min_per_second: u32) -> RetryBudget {
        let deposit = (ratio.clamp(0.0, 1.0) * MILLI as f64).round() as i64;
        let min_per_second = i64::from(min_per_second) * MILLI;
        RetryBudget {
            balance: AtomicI64::new(min_per_second),
            deposit,
            // Ten seconds of reserve, or the deposits of 1,000 requests.
            cap: (10 * min_per_second).max(1_000 * deposit).max(MILLI),
            min_per_second,
            last_refill: Mutex::new(Instant::now()),
        }
    }

    /// Counts one request.
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let cap = self.cap;
        let deposit = self.deposit;
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                (balance < cap).then(|| (balance + deposit).min(cap))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.refill();
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                (balance >= MILLI).then_some(balance - MILLI)
            })
            .is_ok()
    }

    fn refill(&self) {
        if self.min_per_second == 0 {
            return;
        }
        let Ok(mut last) = self.last_refill.lock() else {
            return;
        };
        let elapsed = last.elapsed();
        let amount = (elapsed.as_secs_f64() * self.min_per_second as f64) as i64;
        if amount == 0 {
            return;
        }
        *last = Instant::now();
        let cap = self.cap;
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                Some((balance + amount).min(cap.max(balance)))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_ratio_of_requests() {
        // No time-based reserve: only deposits count.
        let budget = RetryBudget::new(0.2, 0);
        assert!(!budget.try_withdraw(), "nothing deposited yet");
        for _ in 0..100 {
            budget.deposit();
        }
        let mut retries = 0;
        while budget.try_withdraw() {
            retries += 1;
        }
        assert_eq!(retries, 20, "100 requests at 20% buy 20 retries");
    }

    #[test]
    fn a_quiet_router_keeps_a_small_reserve() {
        let budget = RetryBudget::new(0.2, 5);
        let mut retries = 0;
        while budget.try_withdraw() {
            retries += 1;
        }
        assert_eq!(retries, 5, "the initial reserve is one second's worth");
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(budget.try_withdraw(), "refilled over time");
    }
}
