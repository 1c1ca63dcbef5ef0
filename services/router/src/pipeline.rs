//! The inference pipeline, declared in one place.
//!
//! Every `ModelInfer` call, gRPC or HTTP, runs down one `tower` stack built
//! by [`build`]; the order of its layers is the order of the router's
//! policies, and the comment on each says why it stands where it does. The
//! other calls (metadata, config, readiness, statistics) need no rollout,
//! admission or shadow and go straight to `forward`.
//!
//! Every layer is always ready (refusals are answers, never back-pressure
//! through `poll_ready`): admission refuses at once instead of queueing, so
//! a caller is never left waiting for a slot. Steps that only read or
//! rewrite the request are [`Step`]s, which add no allocation; the
//! policies that act around the rest ([`Policy`]: observation, admission,
//! shadow, traffic) box one future each, a few hundred nanoseconds against
//! a request's hundreds of microseconds (docs/benchmarks.md, the issue 14
//! A/B run).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::{Either, Ready, ready};
use http::HeaderMap;
use shamal_auth::{Authenticator, Credentials, Permission, Principal};
use shamal_idle_poll::KeepAwake;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use shamal_audit_client::Auditor;

use crate::admission::{Admission, Priority};
use crate::audit::{self, AuditNote};
use crate::autoscale::ModelInflight;
use crate::forward::{CallContext, Route, forward_to};
use crate::metrics::RouterMetrics;
use crate::pool::WorkerPool;
use crate::registry_link::{Plan, RegistryRouting};
use crate::residency::{self, RegionPolicy};
use crate::shadow::Shadow;
use crate::traffic::Role;

/// One inference call on its way down the pipeline: the request and its
/// context, and what the steps above decided about it.
pub struct InferCall {
    pub request: ModelInferRequest,
    pub context: CallContext,
    /// Whether some worker has reported the model (asked once per call:
    /// it walks every worker's model set).
    pub known: bool,
    pub priority: Priority,
    /// The regions the request may be processed in; `None`: anywhere.
    pub regions: Option<Arc<RegionPolicy>>,
    /// The rollout's decision, for models the registry routes.
    pub plan: Option<Plan>,
    /// Who is calling (step 2); anonymous until then, and when auth is off.
    pub principal: Principal,
    /// What this call's audit record learns on the way (step 1b), when
    /// auditing is on.
    pub audit: Option<Arc<AuditNote>>,
}

impl InferCall {
    pub fn new(request: ModelInferRequest, context: CallContext) -> InferCall {
        InferCall {
            request,
            context,
            known: false,
            priority: Priority::Normal,
            regions: None,
            plan: None,
            principal: Principal::Anonymous,
            audit: None,
        }
    }
}

type InferResult = Result<ModelInferResponse, Status>;
type BoxInfer = Pin<Box<dyn Future<Output = InferResult> + Send>>;

/// The built pipeline; cloned per call (a handful of `Arc` clones).
pub type Pipeline = BoxCloneSyncService<InferCall, ModelInferResponse, Status>;

/// What the pipeline's steps share with the rest of the router.
pub struct Parts {
    pub pool: Arc<WorkerPool>,
    pub metrics: RouterMetrics,
    pub admission: Arc<Admission>,
    pub retry_budget: Arc<TpsBudget>,
    pub model_inflight: Arc<ModelInflight>,
    /// Rollout routing, when the router follows a registry.
    pub registry: Option<Arc<RegistryRouting>>,
    /// Shadow copies, when the router follows a registry.
    pub shadow: Option<Shadow>,
    /// Idle polling, when this router turned it on (`idle_poll_us`).
    pub keep_awake: Option<&'static KeepAwake>,
    /// Who callers are ([`Authenticator::off`] when auth is off).
    pub auth: Arc<Authenticator>,
    /// The audit trail ([`Auditor::disabled`] when auditing is off).
    pub auditor: Auditor,
}

/// Declares the inference pipeline, outermost layer first.
pub fn build(parts: Parts) -> Pipeline {
    let Parts {
        pool,
        metrics,
        admission,
        retry_budget,
        model_inflight,
        registry,
        shadow,
        keep_awake,
        auth,
        auditor,
    } = parts;
    let residency_registry = registry.clone();
    let stack = ServiceBuilder::new()
        // 1. Observe: outermost, so that every call is counted and timed,
        //    whichever step below refuses it, and so that idle polling
        //    (when on) covers the whole call.
        .layer(Around::layer(Observe {
            pool: pool.clone(),
            metrics: metrics.clone(),
            keep_awake,
        }))
        // 1b. Audit: one record per call, refusals of every step below
        //     included (metadata and payload digests, see `audit`). Fail
        //     closed: a full audit spool refuses the call here, before any
        //     work. Costs nothing when auditing is off.
        .layer(Around::layer(AuditStep { auditor }))
        // 2. Authentication and authorisation: after observation, so that
        //    refusals are counted and timed like any answer, and before any
        //    step reads the request on the caller's behalf (residency
        //    takes the tenant from the principal this step admits). A
        //    token seen before costs a hash and a lookup; an unseen one is
        //    validated off the fast path.
        .layer(Around::layer(Authenticate { auth }))
        // 3. Priority: read first, because admission depends on it; a
        //    malformed `priority` is the caller's error, INVALID_ARGUMENT.
        .layer(Step::new(|call: &mut InferCall| {
            call.priority = Priority::of(&call.request.parameters)?;
            Ok(())
        }))
        // 4. Model access and residency: whether the caller may call this
        //    model at all (a model limited to listed tenants or groups),
        //    then where the request may be processed (its own regions, its
        //    tenant's and its model's policies). Before the rollout plan,
        //    so that a request no region can take is refused before it
        //    draws a version or a shadow copy.
        .layer(Step::new(move |call: &mut InferCall| {
            let policy = region_policy(
                residency_registry.as_deref(),
                &call.request,
                &call.context.headers,
                &call.principal,
            )?;
            call.regions = policy.map(Arc::new);
            if let Some(note) = &call.audit
                && let Ok(Some(named)) =
                    residency::tenant(&call.request.parameters, &call.context.headers)
            {
                note.tenant_if_unset(named);
            }
            Ok(())
        }))
        // 5. Rollout plan: the version the model's rollout (or alias)
        //    chooses, written into the request. Before admission, so that
        //    an unknown alias is NOT_FOUND even under overload.
        .option_layer(registry.clone().map(|routing| {
            Step::new(move |call: &mut InferCall| {
                call.plan = routing.plan(&mut call.request, &call.context.headers)?;
                Ok(())
            })
        }))
        // 6. Admission (load shedding): a bounded number of requests in
        //    flight, the last slots kept for high priority; beyond its
        //    limit an immediate RESOURCE_EXHAUSTED. Hand-written rather
        //    than tower's `ConcurrencyLimit` + `LoadShed`, which know no
        //    priorities. Admitted requests deposit in the retry budget:
        //    refused ones are no traffic to retry on behalf of.
        .layer(Around::layer(Admit {
            admission,
            retry_budget: retry_budget.clone(),
            model_inflight,
            metrics: metrics.clone(),
        }))
        // 7. Shadow: a copy to the rollout's shadow version, off the
        //    request path. Below admission, so that a shed request sends
        //    no copy; above the traffic report, which counts the caller's
        //    answer only.
        .option_layer(shadow.map(Around::layer))
        // 8. Traffic report: each admitted request's outcome per version,
        //    for the registry's canary analysis. Shed requests never
        //    reached a version and are not traffic.
        .option_layer(registry.map(|routing| Around::layer(TrafficReport { routing })))
        // 9. Forward: replica choice (least loaded of two, in an allowed
        //    region), retries on another replica within the retry budget,
        //    the caller's deadline, outlier ejection (see `forward`).
        .service(Forward {
            pool,
            metrics,
            retry_budget,
        });
    BoxCloneSyncService::new(stack)
}

/// Runs one call down a pipeline.
pub async fn call(pipeline: &Pipeline, call: InferCall) -> InferResult {
    pipeline.clone().oneshot(call).await
}

/// The regions a request may be processed in (see `residency`): its own
/// list, its tenant's default and its model's policy, once the caller is
/// known to be one the model admits (its tenant and group limit:
/// PERMISSION_DENIED otherwise). The async API asks the same question
/// before it queues a job.
///
/// With auth on, a user's tenant is the one in their token: a request
/// naming another is refused (PERMISSION_DENIED), so that no header can
/// move a caller under a laxer tenant's policy. Services (a batch
/// coordinator acting for a tenant) and anonymous callers (auth off) name
/// it in the request.
pub(crate) fn region_policy(
    registry: Option<&RegistryRouting>,
    request: &ModelInferRequest,
    headers: &HeaderMap,
    principal: &Principal,
) -> Result<Option<RegionPolicy>, Status> {
    if let Some(routing) = registry {
        routing.check_access(&request.model_name, principal)?;
    }
    let requested = residency::requested_regions(&request.parameters, headers)?;
    let named = residency::tenant(&request.parameters, headers)?;
    let tenant = match principal {
        Principal::User(user) => {
            let own = user.tenant.as_deref();
            if let Some(named) = named
                && Some(named) != own
            {
                return Err(Status::permission_denied(format!(
                    "the request names tenant '{named}', but the caller's token says {}; \
                     with auth on the tenant comes from the token",
                    own.map_or("none".to_owned(), |own| format!("'{own}'"))
                )));
            }
            own
        }
        _ => named,
    };
    match registry {
        None => residency::combine(requested, None, None),
        Some(routing) => routing.region_policy(&request.model_name, requested, tenant),
    }
}

/// A step that only reads or rewrites the call, or refuses it: no future
/// of its own, no allocation.
#[derive(Clone)]
pub struct Step<F> {
    step: F,
}

impl<F> Step<F> {
    pub fn new(step: F) -> Step<F>
    where
        F: Fn(&mut InferCall) -> Result<(), Status>,
    {
        Step { step }
    }
}

impl<F: Clone, S> Layer<S> for Step<F> {
    type Service = StepService<F, S>;

    fn layer(&self, inner: S) -> Self::Service {
        StepService {
            step: self.step.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct StepService<F, S> {
    step: F,
    inner: S,
}

impl<F, S> Service<InferCall> for StepService<F, S>
where
    F: Fn(&mut InferCall) -> Result<(), Status>,
    S: Service<InferCall, Response = ModelInferResponse, Error = Status>,
{
    type Response = ModelInferResponse;
    type Error = Status;
    type Future = Either<S::Future, Ready<InferResult>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: InferCall) -> Self::Future {
        match (self.step)(&mut call) {
            Ok(()) => Either::Left(self.inner.call(call)),
            Err(status) => Either::Right(ready(Err(status))),
        }
    }
}

/// Takes the inner service for one call, leaving a clone behind: every
/// service in this pipeline is always ready, so the clone needs no
/// `poll_ready` of its own.
fn take<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// The rest of the pipeline as a policy sees it.
trait Next:
    Service<InferCall, Response = ModelInferResponse, Error = Status, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Next for S where
    S: Service<InferCall, Response = ModelInferResponse, Error = Status, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// A policy that acts around the rest of the pipeline: before it, on the
/// call, and after it, on the answer. [`Around`] makes it a layer, so each
/// policy is one `impl` rather than a layer, a service and their plumbing.
trait Policy: Clone {
    /// Runs the policy around `next`, the rest of the pipeline; `Right`
    /// hands back `next`'s own future when the policy has nothing to do
    /// after it.
    fn around<S: Next>(&self, call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future>;
}

/// The layer, and the service, of a [`Policy`].
#[derive(Clone)]
struct Around<P, S = ()> {
    policy: P,
    inner: S,
}

impl<P> Around<P> {
    fn layer(policy: P) -> Around<P> {
        Around { policy, inner: () }
    }
}

impl<P: Clone, S> Layer<S> for Around<P> {
    type Service = Around<P, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Around {
            policy: self.policy.clone(),
            inner,
        }
    }
}

impl<P: Policy, S: Next> Service<InferCall> for Around<P, S> {
    type Response = ModelInferResponse;
    type Error = Status;
    type Future = Either<BoxInfer, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: InferCall) -> Self::Future {
        self.policy.around(call, &mut self.inner)
    }
}

/// Authenticates the caller and checks it may call models: a token in
/// `authorization`, or the peer's mTLS identity (a batch coordinator).
/// Step 2 of [`build`].
#[derive(Clone)]
struct Authenticate {
    auth: Arc<Authenticator>,
}

impl Authenticate {
    fn admit(&self, principal: Principal, call: &mut InferCall) -> Result<(), Status> {
        if let Some(note) = &call.audit {
            note.caller(&principal);
        }
        match principal.require(Permission::InferenceCall) {
            Ok(()) => {
                call.principal = principal;
                Ok(())
            }
            Err(error) => Err(self.refuse(&error)),
        }
    }

    /// Counted, not reported to the refusal observer: the call's own
    /// inference record (step 1b) records the refusal.
    fn refuse(&self, error: &shamal_auth::AuthError) -> Status {
        self.auth
            .count_refusal(crate::auth::API, "ModelInfer", error);
        error.to_status()
    }
}

impl Policy for Authenticate {
    fn around<S: Next>(&self, mut call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future> {
        if !self.auth.is_on() {
            return Either::Right(take(next).call(call));
        }
        let known = self.auth.authenticate_now(credentials(&call.context));
        match known {
            Some(Ok(principal)) => match self.admit(principal, &mut call) {
                Ok(()) => Either::Right(take(next).call(call)),
                Err(status) => Either::Left(Box::pin(ready(Err(status)))),
            },
            Some(Err(error)) => Either::Left(Box::pin(ready(Err(self.refuse(&error))))),
            None => {
                let policy = self.clone();
                let next = take(next);
                Either::Left(Box::pin(async move {
                    let authenticated = policy.auth.authenticate(credentials(&call.context)).await;
                    let admitted = match authenticated {
                        Ok(principal) => policy.admit(principal, &mut call),
                        Err(error) => Err(policy.refuse(&error)),
                    };
                    admitted?;
                    next.oneshot(call).await
                }))
            }
        }
    }
}

fn credentials(context: &CallContext) -> Credentials<'_> {
    Credentials {
        peer: context.peer.as_ref(),
        authorization: context
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or("\u{0}")),
    }
}

/// Opens each call's audit record and writes it when the answer is known
/// (see `audit`). Step 1b of [`build`].
#[derive(Clone)]
struct AuditStep {
    auditor: Auditor,
}

impl Policy for AuditStep {
    fn around<S: Next>(&self, mut call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future> {
        if !self.auditor.is_enabled() {
            return Either::Right(take(next).call(call));
        }
        if let Err(backlog) = self.auditor.admit() {
            return Either::Left(Box::pin(ready(Err(audit::backlog_status(&backlog)))));
        }
        let pending = audit::Pending::open(&call.request, &call.context.request_id);
        call.audit = Some(pending.note.clone());
        let auditor = self.auditor.clone();
        let answer = take(next).call(call);
        Either::Left(Box::pin(async move {
            let result = answer.await;
            let event = match &result {
                Ok(response) => pending.event(
                    audit::INFERENCE,
                    Ok((&response.model_version, Some(response))),
                ),
                Err(status) => pending.event(audit::INFERENCE, Err(status)),
            };
            audit::record(&auditor, event, result)
        }))
    }
}

/// Counts and times every call by model, answered version, protocol and
/// code; unknown model names share one label, so callers cannot grow the
/// label set. Step 1 of [`build`].
#[derive(Clone)]
struct Observe {
    pool: Arc<WorkerPool>,
    metrics: RouterMetrics,
    keep_awake: Option<&'static KeepAwake>,
}

impl Policy for Observe {
    fn around<S: Next>(&self, mut call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future> {
        let started = Instant::now();
        let awake = self.keep_awake.map(KeepAwake::request);
        call.known = self.pool.knows_model(&call.request.model_name);
        let known = call.known;
        let model = call.request.model_name.clone();
        let protocol = call.context.protocol;
        let request_id = call.context.request_id.clone();
        let metrics = self.metrics.clone();
        let answer = take(next).call(call);
        Either::Left(Box::pin(async move {
            let _awake = awake;
            let result = answer.await;
            let label = if known { model.as_str() } else { "_unknown" };
            let (code, answered_version) = match &result {
                Ok(response) => (Code::Ok, response.model_version.as_str()),
                Err(status) => (status.code(), ""),
            };
            metrics.observe(label, answered_version, protocol, code, started.elapsed());
            if let Err(status) = &result {
                tracing::debug!(request_id = %request_id, model = %model, code = ?status.code(), message = status.message(), "inference failed");
            }
            result
        }))
    }
}

/// Admission control; step 6 of [`build`].
#[derive(Clone)]
struct Admit {
    admission: Arc<Admission>,
    retry_budget: Arc<TpsBudget>,
    model_inflight: Arc<ModelInflight>,
    metrics: RouterMetrics,
}

impl Policy for Admit {
    fn around<S: Next>(&self, call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future> {
        let priority = call.priority;
        let Some(permit) = self.admission.try_admit(priority) else {
            self.metrics.shed(priority);
            let refusal = Status::resource_exhausted(format!(
                "router is at capacity for {} priority requests, retry later",
                priority.label()
            ));
            return Either::Left(Box::pin(ready(Err(refusal))));
        };
        self.retry_budget.deposit();
        // Known models only: callers cannot grow the autoscaling signal's
        // label set with made-up names.
        let model_inflight = call
            .known
            .then(|| self.model_inflight.enter(&call.request.model_name));
        let answer = take(next).call(call);
        Either::Left(Box::pin(async move {
            let _held = (permit, model_inflight);
            answer.await
        }))
    }
}

/// Sends the shadow copy the plan asks for and hands it the caller's
/// answer for comparison; step 7 of [`build`].
impl Policy for Shadow {
    fn around<S: Next>(&self, call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future> {
        let primary_answer = match &call.plan {
            Some(Plan {
                shadow: Some(version),
                rollout_revision,
                ..
            }) => self.spawn(
                &call.request,
                *version,
                *rollout_revision,
                &call.context,
                call.regions.clone(),
            ),
            _ => None,
        };
        let answer = take(next).call(call);
        let Some(sender) = primary_answer else {
            return Either::Right(answer);
        };
        Either::Left(Box::pin(async move {
            let result = answer.await;
            let _ = sender.send(result.as_ref().ok().cloned());
            result
        }))
    }
}

/// Records each planned request's outcome under the version that
/// answered (or was chosen); step 8 of [`build`].
#[derive(Clone)]
struct TrafficReport {
    routing: Arc<RegistryRouting>,
}

impl Policy for TrafficReport {
    fn around<S: Next>(&self, call: InferCall, next: &mut S) -> Either<BoxInfer, S::Future> {
        let Some(plan) = call.plan else {
            return Either::Right(take(next).call(call));
        };
        let started = Instant::now();
        let model = call.request.model_name.clone();
        let routing = self.routing.clone();
        let answer = take(next).call(call);
        Either::Left(Box::pin(async move {
            let result = answer.await;
            let (code, answered) = match &result {
                Ok(response) => (Code::Ok, response.model_version.parse().ok()),
                Err(status) => (status.code(), None),
            };
            if let Some(version) = answered.or(plan.version) {
                routing.traffic.record(
                    &model,
                    version,
                    plan.rollout_revision,
                    Role::Primary,
                    code,
                    started.elapsed(),
                );
            }
            result
        }))
    }
}

/// The bottom of the pipeline: the request to a worker (see `forward`).
#[derive(Clone)]
struct Forward {
    pool: Arc<WorkerPool>,
    metrics: RouterMetrics,
    retry_budget: Arc<TpsBudget>,
}

impl Service<InferCall> for Forward {
    type Response = ModelInferResponse;
    type Error = Status;
    type Future = BoxInfer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: InferCall) -> Self::Future {
        let forward = self.clone();
        Box::pin(async move {
            let InferCall {
                request,
                context,
                regions,
                audit,
                ..
            } = call;
            let route = Route {
                model: &request.model_name,
                version: &request.model_version,
                regions: regions.as_deref(),
                retry_budget: Some(&forward.retry_budget),
                audit: audit.as_deref(),
            };
            let request = &request;
            let context = &context;
            forward_to(
                &forward.pool,
                &forward.metrics,
                &route,
                context,
                |mut client| {
                    let outgoing = context.outgoing(request.clone());
                    async move { client.model_infer(outgoing).await }
                },
            )
            .await
        })
    }
}
