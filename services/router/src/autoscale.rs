//! Demand signals for autoscalers (HorizontalPodAutoscaler, KEDA).
//!
//! Every 200 ms the router samples what it holds: requests in flight per
//! model and per worker pool (region and device), and the pools' replicas
//! and capacity. Each second it exports the mean of the samples, and the
//! replicas that demand needs at `autoscale_target_inflight` requests per
//! replica:
//!
//! - `shamal_router_model_inflight{model}` and
//!   `shamal_router_model_desired_replicas{model}`;
//! - `shamal_router_pool_inflight{region,device}`,
//!   `shamal_router_pool_replicas{region,device}` (healthy workers),
//!   `shamal_router_pool_capacity{region,device}` and
//!   `shamal_router_pool_desired_replicas{region,device}`.
//!
//! The workers' own queue depth (`shamal_worker_queue_depth`) and the async
//! backlog complete the picture (docs/operations.md, infra/k8s).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{GaugeVec, IntGaugeVec, Opts};
use shamal_telemetry::MetricsRegistry;
use shamal_telemetry::register;

use crate::pool::WorkerPool;

/// Requests in flight per model (known models only: callers cannot grow
/// the label set with made-up names).
#[derive(Default)]
pub struct ModelInflight {
    counts: RwLock<HashMap<String, Arc<AtomicUsize>>>,
}

/// Counts one request of a model until dropped.
pub struct ModelInflightGuard(Arc<AtomicUsize>);

impl Drop for ModelInflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ModelInflight {
    pub fn enter(&self, model: &str) -> ModelInflightGuard {
        let existing = self
            .counts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(model)
            .cloned();
        let count = existing.unwrap_or_else(|| {
            self.counts
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry(model.to_owned())
                .or_default()
                .clone()
        });
        count.fetch_add(1, Ordering::Relaxed);
        ModelInflightGuard(count)
    }

    fn sample(&self) -> Vec<(String, usize)> {
        self.counts
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(model, count)| (model.clone(), count.load(Ordering::Relaxed)))
            .collect()
    }
}

struct Gauges {
    model_inflight: GaugeVec,
    model_desired: IntGaugeVec,
    pool_inflight: GaugeVec,
    pool_replicas: IntGaugeVec,
    pool_capacity: IntGaugeVec,
    pool_desired: IntGaugeVec,
}

impl Gauges {
    fn new(registry: &MetricsRegistry) -> prometheus::Result<Gauges> {
        let pool = ["region", "device"];
        Ok(Gauges {
            model_inflight: register(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "shamal_router_model_inflight",
                        "Inference requests in flight per model (mean over the last second).",
                    ),
                    &["model"],
                )?,
            )?,
            model_desired: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "shamal_router_model_desired_replicas",
                        "Worker replicas a model's demand needs at autoscale_target_inflight per replica.",
                    ),
                    &["model"],
                )?,
            )?,
            pool_inflight: register(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "shamal_router_pool_inflight",
                        "Requests in flight on a worker pool (mean over the last second).",
                    ),
                    &pool,
                )?,
            )?,
            pool_replicas: register(
                registry,
                IntGaugeVec::new(
                    Opts::new("shamal_router_pool_replicas", "Healthy workers in a pool."),
                    &pool,
                )?,
            )?,
            pool_capacity: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "shamal_router_pool_capacity",
                        "Declared capacity (concurrent requests) of a pool's healthy workers.",
                    ),
                    &pool,
                )?,
            )?,
            pool_desired: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "shamal_router_pool_desired_replicas",
                        "Worker replicas a pool's demand needs at autoscale_target_inflight per replica.",
                    ),
                    &pool,
                )?,
            )?,
        })
    }
}

/// Replicas needed to carry `inflight` at `target` per replica (at least
/// one while there is any demand).
pub fn desired_replicas(inflight: f64, target: u32) -> i64 {
    if inflight <= 0.0 {
        return 0;
    }
    (inflight / f64::from(target.max(1))).ceil() as i64
}

const SAMPLE: Duration = Duration::from_millis(200);
const SAMPLES_PER_EXPORT: u32 = 5;

/// Starts sampling what it reads: the requests in flight per model and
/// the worker pool's members; abort the task to stop.
pub fn spawn(
    registry: &MetricsRegistry,
    pool: Arc<WorkerPool>,
    model_inflight: Arc<ModelInflight>,
    target: u32,
) -> tokio::task::JoinHandle<()> {
    let gauges = match Gauges::new(registry) {
        Ok(gauges) => gauges,
        Err(error) => panic!("invalid autoscaling metric definition: {error}"),
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(SAMPLE);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut models: BTreeMap<String, f64> = BTreeMap::new();
        let mut pools: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut samples = 0;
        loop {
            ticker.tick().await;
            for (model, count) in model_inflight.sample() {
                *models.entry(model).or_default() += count as f64;
            }
            let members = pool.upstreams();
            for upstream in members.iter() {
                let key = (upstream.meta.region.clone(), upstream.meta.device.clone());
                *pools.entry(key).or_default() += upstream.inflight.load(Ordering::Relaxed) as f64;
            }
            samples += 1;
            if samples < SAMPLES_PER_EXPORT {
                continue;
            }
            let count = f64::from(samples);
            for (model, total) in std::mem::take(&mut models) {
                let mean = total / count;
                gauges.model_inflight.with_label_values(&[&model]).set(mean);
                gauges
                    .model_desired
                    .with_label_values(&[&model])
                    .set(desired_replicas(mean, target));
            }
            let mut replicas: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
            for upstream in members.iter().filter(|upstream| upstream.healthy()) {
                let entry = replicas
                    .entry((upstream.meta.region.clone(), upstream.meta.device.clone()))
                    .or_default();
                entry.0 += 1;
                entry.1 += i64::from(upstream.meta.capacity);
            }
            for ((region, device), total) in std::mem::take(&mut pools) {
                let labels = [region.as_str(), device.as_str()];
                let mean = total / count;
                let (healthy, capacity) = replicas
                    .get(&(region.clone(), device.clone()))
                    .copied()
                    .unwrap_or_default();
                gauges.pool_inflight.with_label_values(&labels).set(mean);
                gauges.pool_replicas.with_label_values(&labels).set(healthy);
                gauges
                    .pool_capacity
                    .with_label_values(&labels)
                    .set(capacity);
                // An idle pool that still has workers asks for one, not
                // zero: scaling a pool to zero is the operator's call.
                gauges
                    .pool_desired
                    .with_label_values(&labels)
                    .set(desired_replicas(mean, target).max(healthy.min(1)));
            }
            samples = 0;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_replicas_round_up() {
        assert_eq!(desired_replicas(0.0, 8), 0);
        assert_eq!(desired_replicas(0.2, 8), 1);
        assert_eq!(desired_replicas(8.0, 8), 1);
        assert_eq!(desired_replicas(8.1, 8), 2);
        assert_eq!(desired_replicas(100.0, 8), 13);
    }

    #[test]
    fn model_inflight_counts_until_dropped() {
        let inflight = ModelInflight::default();
        let first = inflight.enter("a");
        let second = inflight.enter("a");
        let _third = inflight.enter("b");
        let mut sample = inflight.sample();
        sample.sort();
        assert_eq!(sample, vec![("a".to_owned(), 2), ("b".to_owned(), 1)]);
        drop((first, second));
        let mut sample = inflight.sample();
        sample.sort();
        assert_eq!(sample, vec![("a".to_owned(), 0), ("b".to_owned(), 1)]);
    }
}
