//! Per-worker statistics and the final report.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Code;

/// Latencies of successful requests and counts of failed ones.
pub struct Stats {
    pub histogram: Histogram<u64>,
    /// Latencies of RESOURCE_EXHAUSTED answers (load shedding): how fast
    /// an overloaded server says no.
    pub rejected: Histogram<u64>,
    /// The same answers timed from the moment the request was handed to
    /// the client library, not from its intended send time: without the
    /// load generator's own lateness in sending (open loop).
    pub rejected_from_send: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
}

impl Stats {
    /// An empty recorder able to hold latencies up to `max_latency`.
    pub fn new(max_latency: Duration) -> Self {
        let high = (max_latency.as_micros() as u64).max(60_000_000);
        Self {
            histogram: Histogram::new_with_bounds(1, high, 3).expect("valid histogram bounds"),
            rejected: Histogram::new_with_bounds(1, high, 3).expect("valid histogram bounds"),
            rejected_from_send: Histogram::new_with_bounds(1, high, 3)
                .expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            first_error: None,
        }
    }

    pub fn record_ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.histogram
            .saturating_record((latency.as_micros() as u64).max(1));
    }

    /// `latency` runs from the intended send time, `since_send` from the
    /// actual one (equal in a closed loop).
    pub fn record_error(
        &mut self,
        code: Code,
        message: &str,
        latency: Duration,
        since_send: Duration,
    ) {
        if code == Code::ResourceExhausted {
            self.rejected
                .saturating_record((latency.as_micros() as u64).max(1));
            self.rejected_from_send
                .saturating_record((since_send.as_micros() as u64).max(1));
        }
        *self.errors.entry(format!("{code:?}")).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{code:?}: {message}"));
        }
    }

    pub fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        let _ = self.rejected.add(&other.rejected);
        let _ = self.rejected_from_send.add(&other.rejected_from_send);
    }
}

/// Results of one load-generation run; serialised as the `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub url: String,
    pub model: String,
    pub model_version: String,
    /// "closed" (fixed concurrency) or "open" (fixed arrival rate).
    pub mode: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub max_outstanding: Option<usize>,
    pub connections: usize,
    pub batch: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub timeout_ms: u64,
    /// Requests sent during the measurement window (open loop: arrivals that were sent).
    pub sent: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    /// Open loop only: arrivals not sent because `max_outstanding` were in flight.
    pub dropped_by_client: u64,
    pub first_error: Option<String>,
    /// Successful requests per second.
    pub rps: f64,
    /// Successful inferences per second (= rps * batch).
    pub ips: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub min_us: u64,
    pub mean_us: f64,
    /// RESOURCE_EXHAUSTED answers: their latency percentiles (0 when none).
    pub rejected_p50_us: u64,
    pub rejected_p99_us: u64,
    pub rejected_max_us: u64,
    /// The same answers timed from the actual send (open loop: without the
    /// generator's lateness, up to its timer's millisecond and its own
    /// scheduling).
    pub rejected_from_send_p50_us: u64,
    pub rejected_from_send_p99_us: u64,
    pub rejected_from_send_max_us: u64,
}

impl Report {
    /// Fills the derived figures from the merged statistics.
    pub(crate) fn fill(&mut self, stats: &Stats, dropped: u64) {
        let h = &stats.histogram;
        let q = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        self.ok = stats.ok;
        self.errors = stats.errors.clone();
        self.error_total = stats.errors.values().sum();
        self.dropped_by_client = dropped;
        self.first_error = stats.first_error.clone();
        self.sent = self.ok + self.error_total;
        self.rps = if self.duration_s > 0.0 {
            self.ok as f64 / self.duration_s
        } else {
            0.0
        };
        self.ips = self.rps * self.batch as f64;
        self.p50_us = q(0.5);
        self.p90_us = q(0.9);
        self.p99_us = q(0.99);
        self.p999_us = q(0.999);
        self.max_us = if h.is_empty() { 0 } else { h.max() };
        self.min_us = if h.is_empty() { 0 } else { h.min() };
        self.mean_us = if h.is_empty() { 0.0 } else { h.mean() };
        [
            self.rejected_p50_us,
            self.rejected_p99_us,
            self.rejected_max_us,
        ] = summary(&stats.rejected);
        [
            self.rejected_from_send_p50_us,
            self.rejected_from_send_p99_us,
            self.rejected_from_send_max_us,
        ] = summary(&stats.rejected_from_send);
    }
}

/// p50, p99 and max of a histogram (zeros when empty).
fn summary(histogram: &Histogram<u64>) -> [u64; 3] {
    if histogram.is_empty() {
        return [0; 3];
    }
    [
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.max(),
    ]
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = if self.model_version.is_empty() {
            String::new()
        } else {
            format!(" (version {})", self.model_version)
        };
        writeln!(f, "=== {} ===", self.label)?;
        writeln!(f, "model        {}{version} at {}", self.model, self.url)?;
        match (self.concurrency, self.rate) {
            (Some(c), _) => writeln!(f, "mode         closed loop, concurrency {c}")?,
            (_, Some(r)) => writeln!(
                f,
                "mode         open loop, rate {r}/s, max outstanding {}",
                self.max_outstanding.unwrap_or_default()
            )?,
            _ => writeln!(f, "mode         {}", self.mode)?,
        }
        writeln!(
            f,
            "setup        batch {}, {} connection(s), timeout {} ms",
            self.batch, self.connections, self.timeout_ms
        )?;
        writeln!(
            f,
            "duration     {:.1} s (after {:.1} s warmup)",
            self.duration_s, self.warmup_s
        )?;
        writeln!(f, "requests ok  {}", self.ok)?;
        if self.errors.is_empty() {
            writeln!(f, "errors       none")?;
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            writeln!(f, "errors       {} ({})", self.error_total, list.join(", "))?;
            if let Some(first) = &self.first_error {
                writeln!(f, "first error  {first}")?;
            }
        }
        if self.mode == "open" {
            writeln!(
                f,
                "dropped      {} (by client, max outstanding)",
                self.dropped_by_client
            )?;
        }
        writeln!(
            f,
            "throughput   {:.1} requests/s, {:.1} inferences/s",
            self.rps, self.ips
        )?;
        write!(
            f,
            "latency us   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )?;
        if self.rejected_max_us > 0 {
            write!(
                f,
                "\nrejected us  p50 {}  p99 {}  max {} (RESOURCE_EXHAUSTED answers)",
                self.rejected_p50_us, self.rejected_p99_us, self.rejected_max_us
            )?;
            if self.mode == "open" {
                write!(
                    f,
                    "\n  from send  p50 {}  p99 {}  max {} (without the generator's lateness)",
                    self.rejected_from_send_p50_us,
                    self.rejected_from_send_p99_us,
                    self.rejected_from_send_max_us
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_timed_from_the_intended_and_the_actual_send() {
        let mut stats = Stats::new(Duration::from_secs(5));
        stats.record_error(
            Code::ResourceExhausted,
            "full",
            Duration::from_micros(3_000),
            Duration::from_micros(500),
        );
        stats.record_error(
            Code::Unavailable,
            "down",
            Duration::from_micros(9_000),
            Duration::from_micros(9_000),
        );
        let [p50, _, max] = summary(&stats.rejected);
        assert!((2_990..=3_010).contains(&p50) && (2_990..=3_010).contains(&max));
        let [p50, _, max] = summary(&stats.rejected_from_send);
        assert!((495..=505).contains(&p50) && (495..=505).contains(&max));
        assert_eq!(
            stats.rejected.len(),
            1,
            "only RESOURCE_EXHAUSTED is a rejection"
        );
        assert_eq!(
            summary(&Stats::new(Duration::from_secs(1)).rejected),
            [0; 3]
        );
    }
}
