//! Routing core shared by the gRPC and HTTP front doors: admission, worker
//! choice, deadline propagation, retries on another worker, metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use shamal_proto::inference::repository_index_response::ModelIndex;
use shamal_proto::inference::*;
use shamal_rpc::keep_awake::KeepAwake;
use tokio::sync::oneshot;
use tonic::{Code, Status};

use crate::admission::{Admission, Permit, Priority};
use crate::autoscale::ModelInflight;
use crate::budget::RetryBudget;
use crate::metrics::RouterMetrics;
use crate::outlier::{counts_as_failure, now_ms};
use crate::pool::{InflightGuard, PickError, Upstream, UpstreamClient, WorkerPool};
use crate::registry_link::{Plan, RegistryRouting};
use crate::residency::{self, RegionPolicy};
use crate::shadow::{self, ShadowCopy};
use crate::traffic::Role;

/// Protocol extensions the router implements in full (HTTP binary tensors
/// included). `model_repository` is not listed: the index is served but
/// load and unload are not.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "statistics"];

/// Attempts per request: the first try plus retries on other workers
/// (each retry also needs the retry budget's leave).
const MAX_ATTEMPTS: usize = 3;

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

/// Per-call context: who is asking and until when.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub request_id: String,
    pub deadline: Instant,
    pub protocol: &'static str,
    /// The caller's headers (gRPC metadata), where a rollout's sticky key
    /// may be found; filled for inference calls only, empty otherwise.
    pub headers: HeaderMap,
}

impl CallContext {
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A request to a worker carrying this call's id and the time it has
    /// left (as `grpc-timeout`).
    pub fn outgoing<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        shamal_rpc::set_request_id(request.metadata_mut(), &self.request_id);
        request.set_timeout(self.remaining());
        request
    }
}

/// The router's shared state.
pub struct Frontend {
    pub pool: Arc<WorkerPool>,
    pub metrics: RouterMetrics,
    admission: Admission,
    retry_budget: RetryBudget,
    /// Requests in flight per model (autoscaling signal).
    pub model_inflight: ModelInflight,
    pub default_timeout: Duration,
    /// Rollout routing, when the router follows a registry.
    registry: Option<Arc<RegistryRouting>>,
    /// Idle polling, when this router turned it on (`idle_poll_us`).
    keep_awake: Option<&'static KeepAwake>,
}

type Client = UpstreamClient;

pub(crate) fn pick_status(error: PickError, model: &str, version: &str) -> Status {
    match error {
        PickError::UnknownModel if version.is_empty() => {
            Status::not_found(format!("unknown model '{model}'"))
        }
        PickError::UnknownModel => {
            Status::not_found(format!("unknown version '{version}' of model '{model}'"))
        }
        PickError::NoneHealthy => {
            Status::unavailable(format!("no worker is available for model '{model}'"))
        }
        // Only reachable with a policy (see `forward_to`).
        PickError::NoneInRegion => Status::failed_precondition(format!(
            "data residency: no worker for model '{model}' in an allowed region"
        )),
    }
}

/// Failures worth another worker: the worker said it is unavailable, or
/// the call failed in the transport (connection refused or reset, the
/// worker died mid-request: tonic reports these as UNKNOWN or CANCELLED with
/// the transport error as source, unlike statuses a worker sends). The
/// request may have run, but inference is idempotent, so running it again
/// elsewhere is safe.
fn retriable(status: &Status) -> bool {
    status.code() == Code::Unavailable || transport_failure(status)
}

fn transport_failure(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

impl Frontend {
    pub fn new(pool: Arc<WorkerPool>, metrics: RouterMetrics, limits: &Limits) -> Frontend {
        Frontend {
            pool,
            metrics,
            admission: Admission::new(
                limits.max_inflight,
                limits.priority_reserve_percent,
                limits.low_priority_percent,
            ),
            retry_budget: RetryBudget::new(
                limits.retry_budget_ratio,
                limits.retry_budget_min_per_second,
            ),
            default_timeout: limits.default_timeout,
            model_inflight: ModelInflight::default(),
            registry: None,
            keep_awake: None,
        }
    }

    /// Counts inference requests as activity for idle polling.
    pub fn with_keep_awake(mut self, keep_awake: Option<&'static KeepAwake>) -> Frontend {
        self.keep_awake = keep_awake;
        self
    }

    /// Requests admitted and not yet answered.
    pub fn inflight(&self) -> usize {
        self.admission.inflight()
    }

    /// Routes inference by the registry's rollouts (see `rollout`).
    pub fn with_registry(mut self, routing: Arc<RegistryRouting>) -> Frontend {
        self.registry = Some(routing);
        self
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
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let route = Route {
            model,
            version,
            regions: None,
            retry_budget: Some(&self.retry_budget),
        };
        forward_to(&self.pool, &self.metrics, &route, context, call).await
    }

    /// Admission control: a bounded number of requests in flight, the last
    /// slots kept for high priority; beyond its limit an immediate
    /// RESOURCE_EXHAUSTED with no work done.
    fn admit(&self, priority: Priority) -> Result<Permit, Status> {
        self.admission.try_admit(priority).ok_or_else(|| {
            self.metrics.shed(priority);
            Status::resource_exhausted(format!(
                "router is at capacity for {} priority requests, retry later",
                priority.label()
            ))
        })
    }

    /// The regions a request may be processed in (see `residency`).
    pub(crate) fn region_policy(
        &self,
        request: &ModelInferRequest,
        context: &CallContext,
    ) -> Result<Option<RegionPolicy>, Status> {
        let requested = residency::requested_regions(&request.parameters, &context.headers)?;
        let tenant = residency::tenant(&request.parameters, &context.headers)?;
        match &self.registry {
            None => residency::combine(requested, None, None),
            Some(routing) => routing.region_policy(&request.model_name, requested, tenant),
        }
    }

    /// Inference. With a registry, the version is chosen by the model's
    /// rollout (or alias) first, a shadow copy may be sent off the request
    /// path, and the outcome is counted for the traffic report. Failures on
    /// the chosen version are the caller's answer: no other version is
    /// tried.
    pub async fn infer(
        &self,
        mut request: ModelInferRequest,
        context: &CallContext,
    ) -> Result<ModelInferResponse, Status> {
        let started = Instant::now();
        let _awake = self.keep_awake.map(KeepAwake::request);
        let admission = Priority::of(&request.parameters)
            .and_then(|priority| Ok((priority, self.region_policy(&request, context)?)));
        let (priority, regions) = match admission {
            Ok(found) => found,
            Err(status) => {
                self.observe_infer_unplanned(&request.model_name, context, status.clone(), started);
                return Err(status);
            }
        };
        let plan = match &self.registry {
            None => None,
            Some(routing) => match routing.plan(&mut request, &context.headers) {
                Ok(plan) => plan.map(|plan| (routing, plan)),
                Err(status) => {
                    self.observe_infer_unplanned(
                        &request.model_name,
                        context,
                        status.clone(),
                        started,
                    );
                    return Err(status);
                }
            },
        };
        let model = request.model_name.clone();
        let version = request.model_version.clone();
        // Asked once per request: it walks every worker's model set.
        let known = self.pool.knows_model(&model);
        let mut admitted = false;
        let mut primary_answer: Option<oneshot::Sender<Option<ModelInferResponse>>> = None;
        let result = match self.admit(priority) {
            Ok(_permit) => {
                admitted = true;
                self.retry_budget.deposit();
                let _model_inflight = known.then(|| self.model_inflight.enter(&model));
                let regions = regions.map(Arc::new);
                if let Some((routing, plan)) = &plan
                    && let Some(shadow_version) = plan.shadow
                {
                    primary_answer = self.spawn_shadow(
                        routing,
                        &request,
                        shadow_version,
                        plan,
                        context,
                        regions.clone(),
                    );
                }
                let request = &request;
                let route = Route {
                    model: &model,
                    version: &version,
                    regions: regions.as_deref(),
                    retry_budget: Some(&self.retry_budget),
                };
                forward_to(&self.pool, &self.metrics, &route, context, |mut client| {
                    let outgoing = context.outgoing(request.clone());
                    async move { client.model_infer(outgoing).await }
                })
                .await
            }
            Err(status) => Err(status),
        };
        if let Some(sender) = primary_answer {
            let _ = sender.send(result.as_ref().ok().cloned());
        }
        // Requests shed by admission never reached a version: not traffic.
        if admitted && let Some((routing, plan)) = &plan {
            let (code, answered) = match &result {
                Ok(response) => (Code::Ok, response.model_version.parse().ok()),
                Err(status) => (status.code(), None),
            };
            if let Some(answered) = answered.or(plan.version) {
                routing.traffic.record(
                    &model,
                    answered,
                    plan.rollout_revision,
                    Role::Primary,
                    code,
                    started.elapsed(),
                );
            }
        }
        self.observe_infer(&model, known, context, &result, started);
        result
    }

    /// Counts a request refused before a worker was chosen.
    fn observe_infer_unplanned(
        &self,
        model: &str,
        context: &CallContext,
        status: Status,
        started: Instant,
    ) {
        let known = self.pool.knows_model(model);
        self.observe_infer(model, known, context, &Err(status), started);
    }

    /// `known`: whether some worker has reported the model (unknown names
    /// share one label, so callers cannot grow the label set).
    fn observe_infer(
        &self,
        model: &str,
        known: bool,
        context: &CallContext,
        result: &Result<ModelInferResponse, Status>,
        started: Instant,
    ) {
        let label = if known { model } else { "_unknown" };
        let (code, answered_version) = match result {
            Ok(response) => (Code::Ok, response.model_version.as_str()),
            Err(status) => (status.code(), ""),
        };
        self.metrics.observe(
            label,
            answered_version,
            context.protocol,
            code,
            started.elapsed(),
        );
        if let Err(status) = result {
            tracing::debug!(request_id = %context.request_id, model = %model, code = ?status.code(), message = status.message(), "inference failed");
        }
    }

    /// Sends a copy of `request` to `shadow_version` in the background,
    /// when a shadow slot is free. Returns where to send the caller's answer
    /// for comparison.
    fn spawn_shadow(
        &self,
        routing: &Arc<RegistryRouting>,
        request: &ModelInferRequest,
        shadow_version: u64,
        plan: &Plan,
        context: &CallContext,
        regions: Option<Arc<RegionPolicy>>,
    ) -> Option<oneshot::Sender<Option<ModelInferResponse>>> {
        let permit = routing.shadow_permit(&request.model_name)?;
        let mut copy = request.clone();
        copy.model_version = shadow_version.to_string();
        let copy = ShadowCopy {
            model: request.model_name.clone(),
            version: shadow_version,
            rollout_revision: plan.rollout_revision,
            request: copy,
            context: CallContext {
                request_id: context.request_id.clone(),
                deadline: context.deadline,
                protocol: context.protocol,
                headers: HeaderMap::new(),
            },
            regions,
        };
        let (sender, receiver) = oneshot::channel();
        tokio::spawn(shadow::run(
            self.pool.clone(),
            self.metrics.clone(),
            routing.clone(),
            copy,
            receiver,
            permit,
        ));
        Some(sender)
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

/// Where a call goes: a model (and version), the regions it may be
/// processed in, and the budget its retries draw on (`None`: no retries).
pub(crate) struct Route<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub regions: Option<&'a RegionPolicy>,
    pub retry_budget: Option<&'a RetryBudget>,
}

/// Calls one worker serving the route's model in an allowed region,
/// retrying on another worker when the chosen one is unreachable or no
/// longer holds the version (within the retry budget and the call's
/// deadline). Every worker tried is in an allowed region: `pick` offers no
/// other.
pub(crate) async fn forward_to<T, F, Fut>(
    pool: &WorkerPool,
    metrics: &RouterMetrics,
    route: &Route<'_>,
    context: &CallContext,
    call: F,
) -> Result<T, Status>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let Route { model, version, .. } = *route;
    if model.is_empty() {
        return Err(Status::invalid_argument("model name must not be empty"));
    }
    let outlier = &pool.settings().outlier;
    let mut tried: Vec<Arc<Upstream>> = Vec::new();
    let mut last_error: Option<Status> = None;
    for attempt in 0..MAX_ATTEMPTS {
        let remaining = context.remaining();
        if remaining.is_zero() {
            return Err(Status::deadline_exceeded("deadline exceeded in the router"));
        }
        let upstream = match pool.pick(model, version, &tried, route.regions) {
            Ok(picked) => picked,
            Err(PickError::NoneInRegion) if last_error.is_none() => {
                return Err(match route.regions {
                    Some(policy) => residency::no_worker_in_region(model, policy),
                    None => pick_status(PickError::NoneInRegion, model, version),
                });
            }
            Err(error) => {
                return Err(last_error.unwrap_or_else(|| pick_status(error, model, version)));
            }
        };
        if attempt > 0 {
            if !route.retry_budget.is_some_and(RetryBudget::try_withdraw) {
                metrics.retries_refused.inc();
                return Err(last_error.unwrap_or_else(|| {
                    Status::unavailable(format!("no worker is available for model '{model}'"))
                }));
            }
            metrics.retries.inc();
        }
        tried.push(upstream.clone());
        let _inflight = InflightGuard::new(upstream.clone());
        let sent = Instant::now();
        let attempt = tokio::time::timeout(remaining, call(upstream.client())).await;
        match attempt {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "deadline exceeded waiting for the worker",
                ));
            }
            Ok(Ok(response)) => {
                upstream.outlier.record_success(model, sent.elapsed());
                return Ok(response.into_inner());
            }
            // tonic's client enforces the propagated deadline itself and
            // reports it as CANCELLED; the caller asked for a deadline.
            Ok(Err(status))
                if status.code() == Code::Cancelled && context.remaining().is_zero() =>
            {
                return Err(Status::deadline_exceeded(
                    "deadline exceeded waiting for the worker",
                ));
            }
            Ok(Err(status)) => {
                if counts_as_failure(status.code()) || transport_failure(&status) {
                    if upstream.outlier.record_failure(outlier, now_ms()) {
                        tracing::warn!(worker = %upstream.meta.address, "worker ejected after repeated failures");
                    }
                } else {
                    // The worker answered: the request, not the worker, failed.
                    upstream.outlier.record_success(model, sent.elapsed());
                }
                if status.code() == Code::NotFound {
                    // It was picked because its last repository index
                    // listed the model (version); it no longer holds it
                    // (the registry moved the version to other workers).
                    // Another worker that holds it may answer.
                    upstream.forget(model, version);
                    last_error = Some(status);
                    continue;
                }
                if !retriable(&status) {
                    return Err(status);
                }
                tracing::warn!(request_id = %context.request_id, worker = %upstream.meta.address, %status, "worker unavailable, trying another");
                upstream.mark_unhealthy();
                last_error = Some(Status::unavailable(format!(
                    "worker for model '{model}' is unavailable: {}",
                    status.message()
                )));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        Status::unavailable(format!("no worker is available for model '{model}'"))
    }))
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
