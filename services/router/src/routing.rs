//! The routing core shared by the gRPC and HTTP front doors: the
//! inference pipeline (`pipeline`), and the calls that go straight to a
//! worker (`forward`): metadata, config, readiness, statistics and the
//! repository index.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shamal_audit_client::Auditor;
use shamal_auth::Authenticator;
use shamal_idle_poll::KeepAwake;
use shamal_proto::inference::repository_index_response::ModelIndex;
use shamal_proto::inference::*;
use tonic::{Code, Status};
use tower::retry::budget::TpsBudget;

use crate::admission::Admission;
use crate::autoscale::ModelInflight;
use crate::forward::{self, CallContext, Route, forward_to};
use crate::metrics::RouterMetrics;
use crate::pipeline::{self, InferCall, Pipeline};
use crate::pool::{UpstreamClient, WorkerPool};
use crate::registry_link::RegistryRouting;
use crate::residency::RegionPolicy;
use crate::shadow::Shadow;

/// Protocol extensions the router implements in full (HTTP binary tensors
/// included). `model_repository` is not listed: the index is served but
/// load and unload are not.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "statistics"];

/// Overload and retry limits of a router.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_inflight: usize,
    /// Share of `max_inflight` kept for high-priority requests.
    pub priority_reserve_percent: u8,
    /// Share of `max_inflight` low-priority requests may use.
    pub low_priority_percent: u8,
    /// Retries allowed per request (0.2: at most 20% extra load).
    pub retry_budget_ratio: f64,
    /// Retries allowed per second even without traffic.
    pub retry_budget_min_per_second: u32,
    pub default_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight: 4_096,
            priority_reserve_percent: 10,
            low_priority_percent: 70,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
            default_timeout: Duration::from_secs(30),
        }
    }
}

/// The routing core behind the gRPC and HTTP front doors: the declared
/// inference pipeline (`pipeline`) and the calls that need no rollout
/// (metadata, config, readiness, statistics, the repository index).
pub struct RoutingCore {
    pub pool: Arc<WorkerPool>,
    pub metrics: RouterMetrics,
    pipeline: Pipeline,
    admission: Arc<Admission>,
    retry_budget: Arc<TpsBudget>,
    /// Requests in flight per model (autoscaling signal).
    model_inflight: Arc<ModelInflight>,
    pub default_timeout: Duration,
    /// Rollout routing, when the router follows a registry.
    registry: Option<Arc<RegistryRouting>>,
    auth: Arc<Authenticator>,
    auditor: Auditor,
}

/// What a router's core is built from.
pub struct CoreParts {
    pub pool: Arc<WorkerPool>,
    pub metrics: RouterMetrics,
    pub limits: Limits,
    /// Rollout routing and shadow copies, when the router follows a
    /// registry.
    pub registry: Option<(Arc<RegistryRouting>, Shadow)>,
    /// Idle polling, when this router turned it on (`idle_poll_us`).
    pub keep_awake: Option<&'static KeepAwake>,
    /// Who callers are ([`Authenticator::off`] when auth is off).
    pub auth: Arc<Authenticator>,
    /// The audit trail ([`Auditor::disabled`] when auditing is off).
    pub auditor: Auditor,
}

impl RoutingCore {
    pub fn new(parts: CoreParts) -> RoutingCore {
        let CoreParts {
            pool,
            metrics,
            limits,
            registry,
            keep_awake,
            auth,
            auditor,
        } = parts;
        let admission = Arc::new(Admission::new(
            limits.max_inflight,
            limits.priority_reserve_percent,
            limits.low_priority_percent,
        ));
        let retry_budget = Arc::new(forward::retry_budget(
            limits.retry_budget_ratio,
            limits.retry_budget_min_per_second,
        ));
        let model_inflight = Arc::new(ModelInflight::default());
        let (registry, shadow) = match registry {
            Some((routing, shadow)) => (Some(routing), Some(shadow)),
            None => (None, None),
        };
        let pipeline = pipeline::build(pipeline::Parts {
            pool: pool.clone(),
            metrics: metrics.clone(),
            admission: admission.clone(),
            retry_budget: retry_budget.clone(),
            model_inflight: model_inflight.clone(),
            registry: registry.clone(),
            shadow,
            keep_awake,
            auth: auth.clone(),
            auditor: auditor.clone(),
        });
        RoutingCore {
            pool,
            metrics,
            pipeline,
            admission,
            retry_budget,
            model_inflight,
            default_timeout: limits.default_timeout,
            registry,
            auth,
            auditor,
        }
    }

    /// The audit trail (disabled when auditing is off).
    pub fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// Who callers are.
    pub fn auth(&self) -> &Arc<Authenticator> {
        &self.auth
    }

    /// Requests admitted and not yet answered.
    pub fn inflight(&self) -> usize {
        self.admission.inflight()
    }

    /// Requests in flight per model, for the autoscaling signals.
    pub fn model_inflight(&self) -> Arc<ModelInflight> {
        self.model_inflight.clone()
    }

    pub fn registry(&self) -> Option<&Arc<RegistryRouting>> {
        self.registry.as_ref()
    }

    /// A version the caller named by alias, as its number; other versions
    /// unchanged.
    fn resolve_version<'a>(
        &self,
        model: &str,
        version: &'a str,
    ) -> Result<std::borrow::Cow<'a, str>, Status> {
        let Some(routing) = &self.registry else {
            return Ok(version.into());
        };
        Ok(match routing.resolve_version(model, version)? {
            Some(number) => number.to_string().into(),
            None => version.into(),
        })
    }

    /// The deadline of a call: the caller's timeout, or the default.
    pub fn deadline(&self, received: Instant, caller_timeout: Option<Duration>) -> Instant {
        received + caller_timeout.unwrap_or(self.default_timeout)
    }

    /// Ready when a worker serves a ready model and, with a registry, once
    /// the registry's rollouts are known: a router that has never seen them
    /// could send traffic to a version no rollout allows.
    pub fn ready(&self) -> bool {
        self.pool.ready()
            && self
                .registry
                .as_ref()
                .is_none_or(|routing| routing.synced())
    }

    pub fn server_metadata(&self) -> ServerMetadataResponse {
        ServerMetadataResponse {
            name: "shamal".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS
                .iter()
                .map(|extension| (*extension).to_owned())
                .collect(),
        }
    }

    /// Calls one worker serving `model`, retrying on another worker when the
    /// chosen one is unreachable, all within the call's deadline.
    async fn forward<T, F, Fut>(
        &self,
        model: &str,
        version: &str,
        context: &CallContext,
        call: F,
    ) -> Result<T, Status>
    where
        F: Fn(UpstreamClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let route = Route {
            model,
            version,
            regions: None,
            retry_budget: Some(&self.retry_budget),
            audit: None,
        };
        forward_to(&self.pool, &self.metrics, &route, context, call).await
    }

    /// The regions a request may be processed in (see `residency`).
    pub(crate) fn region_policy(
        &self,
        request: &ModelInferRequest,
        context: &CallContext,
        principal: &shamal_auth::Principal,
    ) -> Result<Option<RegionPolicy>, Status> {
        pipeline::region_policy(
            self.registry.as_deref(),
            request,
            &context.headers,
            principal,
        )
    }

    /// Inference, down the declared pipeline (see `pipeline::build`). With
    /// a registry, the version is chosen by the model's rollout (or alias)
    /// first, a shadow copy may be sent off the request path, and the
    /// outcome is counted for the traffic report. Failures on the chosen
    /// version are the caller's answer: no other version is tried.
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        context: CallContext,
    ) -> Result<ModelInferResponse, Status> {
        pipeline::call(&self.pipeline, InferCall::new(request, context)).await
    }

    pub async fn model_metadata(
        &self,
        name: &str,
        version: &str,
        context: &CallContext,
    ) -> Result<ModelMetadataResponse, Status> {
        let version = self.resolve_version(name, version)?;
        let version = version.as_ref();
        let message = ModelMetadataRequest {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        self.forward(name, version, context, |mut client| {
            let outgoing = context.outgoing(message.clone());
            async move { client.model_metadata(outgoing).await }
        })
        .await
    }

    pub async fn model_config(
        &self,
        name: &str,
        version: &str,
        context: &CallContext,
    ) -> Result<ModelConfigResponse, Status> {
        let version = self.resolve_version(name, version)?;
        let version = version.as_ref();
        let message = ModelConfigRequest {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        self.forward(name, version, context, |mut client| {
            let outgoing = context.outgoing(message.clone());
            async move { client.model_config(outgoing).await }
        })
        .await
    }

    /// Whether the model (version) is ready on some worker. Unknown models
    /// are NOT_FOUND; known ones that no worker can serve now are not ready.
    pub async fn model_ready(
        &self,
        name: &str,
        version: &str,
        context: &CallContext,
    ) -> Result<bool, Status> {
        let version = self.resolve_version(name, version)?;
        let version = version.as_ref();
        let message = ModelReadyRequest {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        let answer = self
            .forward(name, version, context, |mut client| {
                let outgoing = context.outgoing(message.clone());
                async move { client.model_ready(outgoing).await }
            })
            .await;
        match answer {
            Ok(response) => Ok(response.ready),
            Err(status) if status.code() == Code::Unavailable => Ok(false),
            Err(status) => Err(status),
        }
    }

    /// Statistics summed over every worker that serves the model(s).
    pub async fn statistics(
        &self,
        name: &str,
        version: &str,
        context: &CallContext,
    ) -> Result<ModelStatisticsResponse, Status> {
        let upstreams = self.pool.serving(name);
        if !name.is_empty() && upstreams.is_empty() {
            return Err(if self.pool.knows_model(name) {
                Status::unavailable(format!("no worker is available for model '{name}'"))
            } else {
                Status::not_found(format!("unknown model '{name}'"))
            });
        }
        let message = ModelStatisticsRequest {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        let calls = upstreams.iter().map(|upstream| {
            let mut client = upstream.client();
            let outgoing = context.outgoing(message.clone());
            async move { client.model_statistics(outgoing).await }
        });
        let mut merged: BTreeMap<(String, String), ModelStatistics> = BTreeMap::new();
        for answer in futures::future::join_all(calls).await {
            match answer {
                Ok(response) => {
                    for stats in response.into_inner().model_stats {
                        let key = (stats.name.clone(), stats.version.clone());
                        match merged.get_mut(&key) {
                            Some(total) => merge_statistics(total, &stats),
                            None => {
                                merged.insert(key, stats);
                            }
                        }
                    }
                }
                // A version a worker does not hold is no reason to fail.
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        if !name.is_empty() && merged.is_empty() {
            return Err(Status::not_found(format!(
                "unknown version '{version}' of model '{name}'"
            )));
        }
        Ok(ModelStatisticsResponse {
            model_stats: merged.into_values().collect(),
        })
    }

    /// Union of the workers' repository indexes; a version ready anywhere
    /// is listed as ready.
    pub async fn repository_index(
        &self,
        ready_only: bool,
        context: &CallContext,
    ) -> Result<RepositoryIndexResponse, Status> {
        let upstreams = self.pool.upstreams();
        let calls = upstreams.iter().map(|upstream| {
            let mut client = upstream.client();
            let outgoing = context.outgoing(RepositoryIndexRequest {
                repository_name: String::new(),
                ready: ready_only,
            });
            async move { client.repository_index(outgoing).await }
        });
        let mut entries: BTreeMap<(String, String), ModelIndex> = BTreeMap::new();
        for response in futures::future::join_all(calls).await.into_iter().flatten() {
            for entry in response.into_inner().models {
                let key = (entry.name.clone(), entry.version.clone());
                let replace = entries
                    .get(&key)
                    .is_none_or(|existing| existing.state != "READY");
                if replace {
                    entries.insert(key, entry);
                }
            }
        }
        Ok(RepositoryIndexResponse {
            models: entries.into_values().collect(),
        })
    }
}

fn add(total: &mut Option<StatisticDuration>, other: &Option<StatisticDuration>) {
    if let Some(other) = other {
        let total = total.get_or_insert_with(StatisticDuration::default);
        total.count += other.count;
        total.ns += other.ns;
    }
}

fn merge_statistics(total: &mut ModelStatistics, other: &ModelStatistics) {
    total.last_inference = total.last_inference.max(other.last_inference);
    total.inference_count += other.inference_count;
    total.execution_count += other.execution_count;
    if let Some(other_stats) = &other.inference_stats {
        let stats = total
            .inference_stats
            .get_or_insert_with(InferStatistics::default);
        add(&mut stats.success, &other_stats.success);
        add(&mut stats.fail, &other_stats.fail);
        add(&mut stats.queue, &other_stats.queue);
        add(&mut stats.compute_input, &other_stats.compute_input);
        add(&mut stats.compute_infer, &other_stats.compute_infer);
        add(&mut stats.compute_output, &other_stats.compute_output);
    }
    for other_batch in &other.batch_stats {
        match total
            .batch_stats
            .iter_mut()
            .find(|batch| batch.batch_size == other_batch.batch_size)
        {
            Some(batch) => {
                add(&mut batch.compute_input, &other_batch.compute_input);
                add(&mut batch.compute_infer, &other_batch.compute_infer);
                add(&mut batch.compute_output, &other_batch.compute_output);
            }
            None => total.batch_stats.push(*other_batch),
        }
    }
}
