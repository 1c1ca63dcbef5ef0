//! Placement reports, sent in the background.

use std::collections::BTreeMap;
use std::time::Duration;

use shamal_backoff::Backoff;
use shamal_registry_client::proto::ReportPlacementRequest;
use shamal_registry_client::proto::registry_client::RegistryClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::{CALL_TIMEOUT, Key, stopped};

/// Sends placement reports in the background, latest state per version,
/// retrying those that fail until they go through or the worker stops.
#[derive(Clone)]
pub(super) struct Reporter {
    sender: mpsc::UnboundedSender<ReportPlacementRequest>,
}

impl Reporter {
    pub(super) fn spawn(
        client: RegistryClient<Channel>,
        stop: watch::Receiver<bool>,
    ) -> (Reporter, JoinHandle<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(report_loop(client, receiver, stop));
        (Reporter { sender }, task)
    }

    pub(super) fn send(&self, request: ReportPlacementRequest) {
        let _ = self.sender.send(request);
    }
}

async fn report_loop(
    mut client: RegistryClient<Channel>,
    mut receiver: mpsc::UnboundedReceiver<ReportPlacementRequest>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: BTreeMap<Key, ReportPlacementRequest> = BTreeMap::new();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut delay = backoff.next_delay();
    loop {
        while let Ok(request) = receiver.try_recv() {
            pending.insert((request.model.clone(), request.version), request);
        }
        while let Some((key, request)) = pending.pop_first() {
            if *stop.borrow() {
                return;
            }
            let sent =
                tokio::time::timeout(CALL_TIMEOUT, client.report_placement(request.clone())).await;
            match sent {
                Ok(Ok(_)) => {
                    tracing::debug!(model = %request.model, version = request.version, state = %request.state, "placement reported");
                    backoff.reset();
                    delay = backoff.next_delay();
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound | tonic::Code::InvalidArgument
                    ) =>
                {
                    // The version is gone (e.g. the registry restored an
                    // older database) or the report is refused for good:
                    // retrying would hold up every report queued after it.
                    tracing::warn!(model = %request.model, version = request.version, state = %request.state, %status, "placement report refused; dropped");
                }
                Ok(Err(status)) => {
                    tracing::warn!(model = %request.model, version = request.version, state = %request.state, %status, "cannot report placement; will retry");
                    pending.entry(key).or_insert(request);
                    break;
                }
                Err(_) => {
                    tracing::warn!(model = %request.model, version = request.version, state = %request.state, "placement report timed out; will retry");
                    pending.entry(key).or_insert(request);
                    break;
                }
            }
            // Newer states replace queued ones before they are sent.
            while let Ok(request) = receiver.try_recv() {
                pending.insert((request.model.clone(), request.version), request);
            }
        }
        let retry = !pending.is_empty();
        tokio::select! {
            _ = stopped(&mut stop) => return,
            request = receiver.recv() => match request {
                Some(request) => {
                    pending.insert((request.model.clone(), request.version), request);
                }
                None => return,
            },
            _ = tokio::time::sleep(delay), if retry => {
                delay = backoff.next_delay();
            }
        }
    }
}
