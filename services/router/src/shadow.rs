//! Shadow traffic: copies of a share of a model's requests sent to its
//! rollout's shadow version off the request path. The caller never waits
//! for a copy nor sees its answer; the router records its outcome, whether
//! it agreed with the answer the caller got, and reports it to the registry
//! as `shadow` traffic.

use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;
use prometheus::{IntCounterVec, Opts};
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use shamal_telemetry::MetricsRegistry;
use shamal_telemetry::register;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::Code;

use crate::forward::{CallContext, Route, forward_to};
use crate::metrics::{RouterMetrics, code_label};
use crate::pool::WorkerPool;
use crate::registry_link::RegistryRouting;
use crate::residency::RegionPolicy;
use crate::traffic::Role;

/// Where a caller's answer goes for comparison with its shadow copy's.
pub type PrimaryAnswer = oneshot::Sender<Option<ModelInferResponse>>;

/// The shadow copies of a router: a bounded number in flight (beyond it a
/// copy is skipped and counted, never queued), their metrics, and what
/// they need to be sent and reported. Exists only when the router follows
/// a registry, whose rollouts name shadow versions.
#[derive(Clone)]
pub struct Shadow {
    slots: Arc<Semaphore>,
    metrics: ShadowMetrics,
    pool: Arc<WorkerPool>,
    router_metrics: RouterMetrics,
    /// Where the copies' outcomes are reported (as `shadow` traffic).
    routing: Arc<RegistryRouting>,
}

impl Shadow {
    /// Registers the shadow metrics in `registry`; at most `max_inflight`
    /// copies run at once.
    pub fn new(
        registry: &MetricsRegistry,
        max_inflight: usize,
        pool: Arc<WorkerPool>,
        router_metrics: RouterMetrics,
        routing: Arc<RegistryRouting>,
    ) -> prometheus::Result<Shadow> {
        Ok(Shadow {
            slots: Arc::new(Semaphore::new(max_inflight)),
            metrics: ShadowMetrics::new(registry)?,
            pool,
            router_metrics,
            routing,
        })
    }

    /// Sends a copy of `request` to `version` in the background, when a
    /// slot is free (a skipped copy is counted). Returns where to send the
    /// caller's answer for comparison.
    pub fn spawn(
        &self,
        request: &ModelInferRequest,
        version: u64,
        rollout_revision: u64,
        context: &CallContext,
        regions: Option<Arc<RegionPolicy>>,
    ) -> Option<PrimaryAnswer> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.metrics.skipped(&request.model_name);
            return None;
        };
        let mut copy = request.clone();
        copy.model_version = version.to_string();
        let copy = ShadowCopy {
            model: request.model_name.clone(),
            version,
            rollout_revision,
            request: copy,
            context: CallContext {
                request_id: context.request_id.clone(),
                deadline: context.deadline,
                protocol: context.protocol,
                headers: HeaderMap::new(),
                peer: None,
            },
            regions,
        };
        let (sender, receiver) = oneshot::channel();
        tokio::spawn(run(self.clone(), copy, receiver, permit));
        Some(sender)
    }
}

/// Shadow metrics, registered only when a registry is configured.
#[derive(Clone)]
struct ShadowMetrics {
    requests: IntCounterVec,
    agreement: IntCounterVec,
    skipped: IntCounterVec,
}

impl ShadowMetrics {
    fn new(registry: &MetricsRegistry) -> prometheus::Result<ShadowMetrics> {
        Ok(ShadowMetrics {
            requests: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "shamal_router_shadow_requests_total",
                        "Shadow copies sent, by model, shadow version and gRPC code.",
                    ),
                    &["model", "version", "code"],
                )?,
            )?,
            agreement: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "shamal_router_shadow_agreement_total",
                        "Shadow answers compared with the caller's answer (both succeeded), by result: match or mismatch.",
                    ),
                    &["model", "version", "result"],
                )?,
            )?,
            skipped: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "shamal_router_shadow_skipped_total",
                        "Shadow copies not sent because max_shadow_inflight copies were in flight.",
                    ),
                    &["model"],
                )?,
            )?,
        })
    }

    fn skipped(&self, model: &str) {
        self.skipped.with_label_values(&[model]).inc();
    }
}

/// Whether two answers agree: the same outputs (by name) with the same
/// datatype, shape and contents, typed or raw, byte for byte.
pub fn outputs_agree(primary: &ModelInferResponse, shadow: &ModelInferResponse) -> bool {
    if primary.outputs.len() != shadow.outputs.len() {
        return false;
    }
    primary.outputs.iter().enumerate().all(|(index, output)| {
        let Some((shadow_index, shadow_output)) = shadow
            .outputs
            .iter()
            .enumerate()
            .find(|(_, candidate)| candidate.name == output.name)
        else {
            return false;
        };
        output.datatype == shadow_output.datatype
            && output.shape == shadow_output.shape
            && output.contents == shadow_output.contents
            && primary.raw_output_contents.get(index)
                == shadow.raw_output_contents.get(shadow_index)
    })
}

/// One copy to send.
struct ShadowCopy {
    model: String,
    version: u64,
    rollout_revision: u64,
    /// The caller's request, naming the shadow version.
    request: ModelInferRequest,
    /// The caller's id and deadline: the copy gets the same budget.
    context: CallContext,
    /// The caller's data-residency policy: the copy obeys it too.
    regions: Option<Arc<RegionPolicy>>,
}

/// Sends the copy, then compares its answer with the caller's (sent on
/// `primary` once known; `None` or a dropped sender when the caller got
/// none). Holds `permit` until done.
async fn run(
    shadow: Shadow,
    copy: ShadowCopy,
    primary: oneshot::Receiver<Option<ModelInferResponse>>,
    permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let version_label = copy.version.to_string();
    let request = &copy.request;
    let context = &copy.context;
    // Shadow copies are never retried: they must not add load to a fleet
    // that is already failing.
    let route = Route {
        model: &copy.model,
        version: &version_label,
        regions: copy.regions.as_deref(),
        retry_budget: None,
        audit: None,
    };
    let result = forward_to(
        &shadow.pool,
        &shadow.router_metrics,
        &route,
        context,
        |mut client| {
            let outgoing = context.outgoing(request.clone());
            async move { client.model_infer(outgoing).await }
        },
    )
    .await;
    drop(permit);
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    shadow.routing.traffic.record(
        &copy.model,
        copy.version,
        copy.rollout_revision,
        Role::Shadow,
        code,
        started.elapsed(),
    );
    let shadow_metrics = &shadow.metrics;
    shadow_metrics
        .requests
        .with_label_values(&[
            copy.model.as_str(),
            version_label.as_str(),
            code_label(code),
        ])
        .inc();
    match &result {
        Ok(_) => {}
        Err(status) => {
            tracing::debug!(request_id = %context.request_id, model = %copy.model, version = copy.version, code = ?status.code(), message = status.message(), "shadow copy failed");
        }
    }
    let (Ok(shadow_answer), Ok(Some(primary_answer))) = (result, primary.await) else {
        return;
    };
    let agreement = if outputs_agree(&primary_answer, &shadow_answer) {
        "match"
    } else {
        "mismatch"
    };
    shadow_metrics
        .agreement
        .with_label_values(&[copy.model.as_str(), version_label.as_str(), agreement])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shamal_proto::inference::model_infer_response::InferOutputTensor;

    fn answer(outputs: &[(&str, &[u8])]) -> ModelInferResponse {
        ModelInferResponse {
            outputs: outputs
                .iter()
                .map(|(name, data)| InferOutputTensor {
                    name: (*name).to_owned(),
                    datatype: "UINT8".to_owned(),
                    shape: vec![data.len() as i64],
                    ..Default::default()
                })
                .collect(),
            raw_output_contents: outputs
                .iter()
                .map(|(_, data)| Bytes::copy_from_slice(data))
                .collect(),
            model_version: "1".to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn answers_agree_on_outputs_whatever_their_order_or_version() {
        let primary = answer(&[("a", &[1, 2]), ("b", &[3])]);
        let mut same = answer(&[("b", &[3]), ("a", &[1, 2])]);
        same.model_version = "2".to_owned();
        assert!(outputs_agree(&primary, &same));
        assert!(!outputs_agree(
            &primary,
            &answer(&[("a", &[1, 2]), ("b", &[4])])
        ));
        assert!(!outputs_agree(&primary, &answer(&[("a", &[1, 2])])));
        assert!(!outputs_agree(
            &primary,
            &answer(&[("a", &[1, 2]), ("c", &[3])])
        ));
        let mut reshaped = answer(&[("a", &[1, 2]), ("b", &[3])]);
        reshaped.outputs[0].shape = vec![2, 1];
        assert!(!outputs_agree(&primary, &reshaped));
    }
}
