//! The serving state of a control-plane service (the registry, the audit
//! service): gRPC health and the `/health/ready` flag say SERVING from the
//! start, and when the shutdown signal completes both turn NOT_SERVING and
//! every task watching `stop` is told to finish.

use std::future::Future;

use shamal_telemetry::Readiness;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// What [`serving`] hands the service: the health service to add to its
/// gRPC server, the readiness flag of its metrics listener, and the stop
/// signal (true once shutdown began).
pub struct Serving {
    pub health_service: HealthServer<HealthService>,
    pub readiness: Readiness,
    pub stop: watch::Receiver<bool>,
}

/// Marks `S` (and the server as a whole, `""`) SERVING and ready, and
/// spawns the task that, once `shutdown` completes, logs "`name`
/// stopping", marks them NOT_SERVING and not ready, and flips `stop`.
/// Listening for `shutdown` starts at once: a SIGTERM during the service's
/// start-up stops it too.
pub async fn serving<S: NamedService>(
    name: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Serving {
    let reporter = HealthReporter::new();
    set_status::<S>(&reporter, ServingStatus::Serving).await;
    let readiness = Readiness::default();
    readiness.set(true);
    let (stop_sender, stop) = watch::channel(false);
    {
        let reporter = reporter.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("{name} stopping");
            readiness.set(false);
            set_status::<S>(&reporter, ServingStatus::NotServing).await;
            let _ = stop_sender.send(true);
        });
    }
    Serving {
        health_service: HealthServer::new(HealthService::from_health_reporter(reporter)),
        readiness,
        stop,
    }
}

async fn set_status<S: NamedService>(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status(S::NAME, status).await;
    reporter.set_service_status("", status).await;
}

/// Completes once `stop` says the service is stopping (a server's
/// graceful-shutdown future).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named;
    impl NamedService for Named {
        const NAME: &'static str = "test.Named";
    }

    #[tokio::test]
    async fn shutdown_turns_readiness_off_and_signals_stop() {
        let (trigger, fired) = tokio::sync::oneshot::channel::<()>();
        let serving = serving::<Named>("test", async move {
            let _ = fired.await;
        })
        .await;
        assert!(serving.readiness.get());
        assert!(!*serving.stop.borrow());
        trigger.send(()).unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stopped(serving.stop.clone()),
        )
        .await
        .unwrap();
        assert!(!serving.readiness.get());
    }
}
