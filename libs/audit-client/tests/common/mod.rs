//! A stand-in audit service: dedups by event_id like the real one, can be
//! told to be down or to fail calls, and records what it got.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shamal_audit_client::{AuditClientConfig, AuditEvent, Auditor, OnFull};
use shamal_proto::shamal::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use shamal_proto::shamal::audit::v1::{
    AppendRequest, AppendResponse, ExportItem, ExportRequest, PublicKeyRequest, PublicKeyResponse,
    QueryRequest, QueryResponse, VerifyRequest, VerifyResponse,
};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
pub struct State {
    /// The log: each event once, in the order first appended.
    pub log: Vec<AuditEvent>,
    pub ids: HashSet<String>,
    /// How often each event_id arrived in a call that was processed.
    pub received: HashMap<String, u32>,
    /// Append calls, processed or failed.
    pub calls: u64,
    /// Every call fails with UNAVAILABLE, storing nothing.
    pub down: bool,
    /// The next N calls fail before storing.
    pub fail_next: u32,
    /// Calls whose number is a multiple of this fail before storing.
    pub fail_every: Option<u64>,
    /// Calls whose number is a multiple of this store the events, then
    /// fail (a lost response: the producer must resend, the log must not
    /// double them).
    pub lose_response_every: Option<u64>,
    /// Events with this action are invalid: a batch holding one is
    /// refused whole with INVALID_ARGUMENT, as the real service does.
    pub invalid_action: Option<String>,
}

#[derive(Clone, Default)]
pub struct FakeAudit {
    pub state: Arc<Mutex<State>>,
}

impl FakeAudit {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    /// The event_ids of the log, asserting none is there twice.
    pub fn log_ids(&self) -> Vec<String> {
        let state = self.state();
        let ids: Vec<String> = state.log.iter().map(|e| e.event_id.clone()).collect();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "the log holds an event twice");
        ids
    }

    /// Serves on `addr` until the returned handle is dropped or stopped.
    pub async fn serve(&self, addr: SocketAddr) -> Serving {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(error) if tries < 50 => {
                    tries += 1;
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("cannot bind {addr}: {error}"),
            }
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let service = AuditServiceServer::new(self.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        Serving {
            stop: Some(stop),
            task: Some(task),
        }
    }
}

pub struct Serving {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Serving {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[tonic::async_trait]
impl AuditService for FakeAudit {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let mut state = self.state();
        state.calls += 1;
        let call = state.calls;
        if state.down {
            return Err(Status::unavailable("down for the test"));
        }
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Err(Status::internal("told to fail"));
        }
        if state
            .fail_every
            .is_some_and(|every| call.is_multiple_of(every))
        {
            return Err(Status::internal("failing every so often"));
        }
        let request = request.into_inner();
        if let Some(invalid) = &state.invalid_action
            && let Some(index) = request.events.iter().position(|e| &e.action == invalid)
        {
            return Err(Status::invalid_argument(format!(
                "events[{index}].action: {invalid:?} is not an action"
            )));
        }
        let mut appended = 0;
        let mut duplicates = 0;
        for event in request.events {
            *state.received.entry(event.event_id.clone()).or_default() += 1;
            if state.ids.insert(event.event_id.clone()) {
                state.log.push(event);
                appended += 1;
            } else {
                duplicates += 1;
            }
        }
        if state
            .lose_response_every
            .is_some_and(|every| call.is_multiple_of(every))
        {
            return Err(Status::unavailable("stored, but the answer is lost"));
        }
        Ok(Response::new(AppendResponse {
            appended,
            duplicates,
            head_seq: state.log.len() as u64,
        }))
    }

    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Err(Status::unimplemented("query"))
    }

    type ExportStream = tokio_stream::Empty<Result<ExportItem, Status>>;

    async fn export(
        &self,
        _: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("export"))
    }

    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        Err(Status::unimplemented("verify"))
    }

    async fn public_key(
        &self,
        _: Request<PublicKeyRequest>,
    ) -> Result<Response<PublicKeyResponse>, Status> {
        Err(Status::unimplemented("public_key"))
    }
}

/// A local address nothing listens on (yet).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Quick settings for tests: small segments and batches, fast retries.
pub fn config(dir: &Path, addr: SocketAddr) -> AuditClientConfig {
    AuditClientConfig {
        endpoint: Some(format!("http://{addr}")),
        spool_dir: dir.to_owned(),
        on_full: OnFull::FailClosed,
        batch_size: 50,
        flush_interval_ms: 1,
        ship_interval_ms: 1,
        segment_bytes: 4096,
        retry_min_ms: 5,
        retry_max_ms: 50,
        request_timeout_ms: 2_000,
        ..AuditClientConfig::default()
    }
}

pub fn start(config: AuditClientConfig, service: &str) -> Auditor {
    Auditor::start(
        config,
        None,
        service,
        "test-0",
        &prometheus::Registry::new(),
    )
    .unwrap()
}

/// An inference event with a known id.
pub fn event(id: &str) -> AuditEvent {
    AuditEvent {
        event_id: id.to_owned(),
        action: "inference".to_owned(),
        outcome: "ok".to_owned(),
        actor: "alice".to_owned(),
        tenant: "acme".to_owned(),
        model: "resnet".to_owned(),
        version: "3".to_owned(),
        request_id: format!("req-{id}"),
        latency_us: 1234,
        request_sha256: shamal_audit_client::sha256_hex(id.as_bytes()),
        ..AuditEvent::default()
    }
}

/// `prefix-0` .. `prefix-{n-1}`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The spool's segment files, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    segments.sort();
    segments
}

/// Waits (up to 10 s) for `condition`.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that the log holds exactly `expected`, each once.
pub fn assert_log_is(fake: &FakeAudit, expected: &[String]) {
    let logged = fake.log_ids();
    let logged: HashSet<String> = logged.into_iter().collect();
    let expected_set: HashSet<String> = expected.iter().cloned().collect();
    let missing: Vec<_> = expected_set.difference(&logged).take(5).collect();
    let extra: Vec<_> = logged.difference(&expected_set).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "log differs: missing {missing:?}, unexpected {extra:?} ({} logged, {} expected)",
        logged.len(),
        expected_set.len()
    );
}
