//! The router's link to the model registry: it follows the registry's Watch
//! stream into the routing table, and reports per-version traffic back.
//!
//! The link never gates readiness: while the registry is unreachable the
//! router keeps routing by the last table it applied (none at first: every
//! model is then routed as without a registry), and traffic reports that
//! cannot be delivered are dropped.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderMap;
use prometheus::{IntGaugeVec, Opts};
use shamal_auth::Principal;
use shamal_proto::inference::ModelInferRequest;
use shamal_registry_client::proto::{ReportTrafficRequest, WatchEvent};
use shamal_telemetry::MetricsRegistry;
use shamal_telemetry::register;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

use crate::pool::WorkerPool;
use crate::residency::{self, RegionPolicy};
use crate::rollout::{Change, Draws, ModelRoute, Routes};
use crate::traffic::Traffic;

/// How long one traffic report may take before it is given up.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Routing state the registry drives, shared by the front doors and the
/// link's tasks.
pub struct RegistryRouting {
    pub routes: Routes,
    pub traffic: Traffic,
    rollout_revision: IntGaugeVec,
    /// Set once the first snapshot is applied: until then the router does
    /// not know the rollouts and reports itself not ready.
    synced: std::sync::atomic::AtomicBool,
    /// Tenants' data-residency defaults: tenant -> allowed regions.
    tenants: RwLock<Arc<HashMap<String, Vec<String>>>>,
}

/// How one request of a model the registry knows is routed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// The version chosen (already written into the request), when known.
    pub version: Option<u64>,
    /// Rollout revision the request is routed under (0 without a rollout).
    pub rollout_revision: u64,
    /// Version a copy goes to, off the request path.
    pub shadow: Option<u64>,
}

impl RegistryRouting {
    /// Registers the rollout metrics in `registry`.
    pub fn new(registry: &MetricsRegistry) -> Arc<RegistryRouting> {
        let build = || -> prometheus::Result<RegistryRouting> {
            Ok(RegistryRouting {
                routes: Routes::default(),
                traffic: Traffic::default(),
                rollout_revision: register(
                    registry,
                    IntGaugeVec::new(
                        Opts::new(
                            "shamal_router_rollout_revision",
                            "Revision of each model's rollout as the router applies it (0: no rollout).",
                        ),
                        &["model"],
                    )?,
                )?,
                synced: std::sync::atomic::AtomicBool::new(false),
                tenants: RwLock::new(Arc::new(HashMap::new())),
            })
        };
        match build() {
            Ok(routing) => Arc::new(routing),
            Err(error) => panic!("invalid router rollout metric definition: {error}"),
        }
    }

    /// Chooses the version for an inference request and writes it into the
    /// request's `model_version`; `None` for models the registry does not
    /// know (routed as without a registry). NOT_FOUND for an unknown alias.
    pub fn plan(
        &self,
        request: &mut ModelInferRequest,
        headers: &HeaderMap,
    ) -> Result<Option<Plan>, Status> {
        self.plan_with(request, headers, Draws::random())
    }

    /// [`RegistryRouting::plan`] with given random draws.
    pub fn plan_with(
        &self,
        request: &mut ModelInferRequest,
        headers: &HeaderMap,
        draws: Draws,
    ) -> Result<Option<Plan>, Status> {
        let table = self.routes.current();
        let Some(route) = table.model(&request.model_name) else {
            return Ok(None);
        };
        let model = request.model_name.as_str();
        let parameters = &request.parameters;
        let decision = route.decide(
            model,
            &request.model_version,
            |key| key.bucket(model, parameters, headers),
            draws,
        )?;
        if decision.rewrite
            && let Some(version) = decision.version
        {
            request.model_version.clear();
            let _ = write!(request.model_version, "{version}");
        }
        Ok(Some(Plan {
            version: decision.version,
            rollout_revision: decision.rollout_revision,
            shadow: decision.shadow,
        }))
    }

    /// The version an explicit alias names, for calls that name a version
    /// (metadata, config, readiness); numbers, empty versions and models the
    /// registry does not know pass unchanged.
    pub fn resolve_version(&self, model: &str, version: &str) -> Result<Option<u64>, Status> {
        if version.is_empty() || version.bytes().all(|byte| byte.is_ascii_digit()) {
            return Ok(None);
        }
        match self.routes.current().model(model) {
            Some(route) => route.resolve_explicit(model, version),
            None => Ok(None),
        }
    }

    /// The regions a request may use: its own list, its tenant's default
    /// and its model's policy, combined (see `residency`).
    pub fn region_policy(
        &self,
        model: &str,
        requested: Option<BTreeSet<String>>,
        tenant: Option<&str>,
    ) -> Result<Option<RegionPolicy>, Status> {
        let tenants = self
            .tenants
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let tenant =
            tenant.and_then(|name| tenants.get(name).map(|regions| (name, regions.as_slice())));
        let table = self.routes.current();
        let model_policy = table
            .model(model)
            .map(|route| (model, route.allowed_regions.as_slice()));
        residency::combine(requested, tenant, model_policy)
    }

    /// Model access: whether `principal` may call `model` (the model's
    /// tenant and group limit; none for models the registry does not
    /// know, admins and service identities). PERMISSION_DENIED otherwise.
    pub fn check_access(&self, model: &str, principal: &Principal) -> Result<(), Status> {
        let table = self.routes.current();
        let Some(route) = table.model(model) else {
            return Ok(());
        };
        if principal.within(&route.allowed_tenants, &route.allowed_groups) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "model '{model}' is limited to listed tenants or groups, and {} is in none of them",
            principal.describe()
        )))
    }

    /// Whether the registry's first snapshot has been applied.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Applies a Watch event to the routing table, logging and exporting
    /// each model whose routing changed.
    pub fn apply(&self, event: &WatchEvent) {
        if let Some(policies) = &event.tenant_policies {
            let tenants: HashMap<String, Vec<String>> = policies
                .policies
                .iter()
                .map(|policy| (policy.tenant.clone(), policy.allowed_regions.clone()))
                .collect();
            tracing::info!(
                tenants = tenants.len(),
                registry_revision = event.revision,
                "tenant residency policies applied"
            );
            *self
                .tenants
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(tenants);
        }
        let changes = self.routes.apply(event);
        if event.snapshot && !self.synced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(
                registry_revision = event.revision,
                "routing table in step with the registry"
            );
        }
        for change in changes {
            match change {
                Change::Updated { model, route } => {
                    let revision = route.rollout.as_ref().map_or(0, |rollout| rollout.revision);
                    self.rollout_revision
                        .with_label_values(&[model.as_str()])
                        .set(i64::try_from(revision).unwrap_or(i64::MAX));
                    log_route(&model, &route, event.revision);
                }
                Change::Removed { model } => {
                    let _ = self.rollout_revision.remove_label_values(&[model.as_str()]);
                    tracing::info!(model = %model, registry_revision = event.revision, "model routing removed");
                }
            }
        }
    }
}

fn log_route(model: &str, route: &ModelRoute, registry_revision: u64) {
    let aliases = route
        .aliases
        .iter()
        .map(|(alias, version)| format!("{alias}={version}"))
        .collect::<Vec<_>>()
        .join(",");
    match &route.rollout {
        Some(rollout) => {
            let splits = rollout
                .effective_splits()
                .iter()
                .map(|(version, weight)| format!("{version}:{weight}%"))
                .collect::<Vec<_>>()
                .join(",");
            let shadow = rollout
                .shadow
                .map(|shadow| format!("{}@{}%", shadow.version, shadow.percent))
                .unwrap_or_default();
            let sticky_key = rollout
                .sticky_key
                .as_ref()
                .map(|key| key.name.as_str())
                .unwrap_or_default();
            tracing::info!(
                model = %model,
                registry_revision,
                revision = rollout.revision,
                state = %rollout.state,
                stable_version = rollout.stable_version,
                splits = %splits,
                sticky_key = %sticky_key,
                shadow = %shadow,
                aliases = %aliases,
                "model routing applied"
            );
        }
        None => {
            tracing::info!(model = %model, registry_revision, aliases = %aliases, "model routing applied (no rollout)");
        }
    }
}

/// The running link; stop it with [`RegistryLink::stop`].
pub struct RegistryLink {
    channel: Channel,
    router_id: String,
    routing: Arc<RegistryRouting>,
    watch: JoinHandle<()>,
    report: JoinHandle<()>,
}

/// Starts following the registry at `address` and reporting traffic to it
/// every `report_interval`. Each event first refreshes the worker pool (so
/// that versions workers just loaded are routable), then is applied.
pub fn spawn(
    address: &str,
    tls: Option<&shamal_tls::ClientTls>,
    router_id: &str,
    report_interval: Duration,
    pool: Arc<WorkerPool>,
    routing: Arc<RegistryRouting>,
) -> Result<RegistryLink, shamal_registry_client::Error> {
    let channel = shamal_registry_client::channel_with(address, tls)?;
    let watch = {
        let mut events = shamal_registry_client::watch(channel.clone(), router_id);
        let routing = routing.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                // Workers first: a version is routable once a worker that
                // holds it is in the pool and has been asked what it serves.
                pool.apply_workers(&event.workers, event.snapshot);
                pool.refresh().await;
                routing.apply(&event);
            }
        })
    };
    let report = {
        let channel = channel.clone();
        let router_id = router_id.to_owned();
        let routing = routing.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(report_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                report_traffic(&channel, &router_id, &routing, REPORT_TIMEOUT).await;
            }
        })
    };
    tracing::info!(registry = %address, router_id = %router_id, "following the registry");
    Ok(RegistryLink {
        channel,
        router_id: router_id.to_owned(),
        routing,
        watch,
        report,
    })
}

impl RegistryLink {
    /// Stops following the registry and sends the traffic not yet reported
    /// (giving up after a second).
    pub async fn stop(self) {
        self.watch.abort();
        self.report.abort();
        let _ = self.report.await;
        report_traffic(
            &self.channel,
            &self.router_id,
            &self.routing,
            Duration::from_secs(1),
        )
        .await;
    }
}

/// Sends the traffic since the last report; drops it when the registry
/// cannot take it.
async fn report_traffic(
    channel: &Channel,
    router_id: &str,
    routing: &RegistryRouting,
    timeout: Duration,
) {
    let traffic = routing.traffic.take();
    if traffic.is_empty() {
        return;
    }
    let request = ReportTrafficRequest {
        router_id: router_id.to_owned(),
        traffic,
    };
    let mut client = shamal_registry_client::client(channel.clone());
    match tokio::time::timeout(timeout, client.report_traffic(request)).await {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => {
            tracing::debug!(%status, "traffic report refused by the registry; dropped");
        }
        Err(_) => tracing::debug!("registry unreachable; traffic report dropped"),
    }
}
