//! Producers' side of the audit log: a durable local spool and a background
//! shipper to the audit service.
//!
//! Services (registry, routers, batch) report every mutation and every
//! inference as an [`AuditEvent`] to the audit service's
//! `shamal.audit.v1.AuditService/Append`. They do it through an
//! [`Auditor`]:
//!
//! ```no_run
//! # async fn example(registry: &prometheus::Registry) -> Result<(), Box<dyn std::error::Error>> {
//! use shamal_audit_client::{AuditClientConfig, Auditor, AuditEvent};
//! let config: AuditClientConfig = toml::from_str(r#"
//!     endpoint = "https://audit:8301"
//!     spool_dir = "/var/lib/shamal/router/audit-spool"
//! "#)?;
//! let auditor = Auditor::start(config, None, "router", "router-0", registry)?;
//! auditor.admit()?; // before doing the work: refuses when the backlog is full
//! auditor.record(AuditEvent { action: "inference".into(), outcome: "ok".into(), ..Default::default() })?;
//! auditor.drain(std::time::Duration::from_secs(5)).await.ok();
//! auditor.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # How an event travels
//!
//! 1. [`Auditor::record`] fills in what the producer left empty (a UUID v4
//!    `event_id`, `occurred_at_ms`, `service`, `instance`), checks the
//!    bound, and hands the event to the spool writer through a bounded
//!    channel. It never waits on I/O or the network.
//! 2. The **writer** task group-commits: it takes everything queued (up to
//!    4096 events), waits up to `flush_interval_ms` for more unless a
//!    [`flush`](Auditor::flush) is waiting, appends the frames to the
//!    current segment and calls `fsync` (`sync_data`) once for the group.
//! 3. The **shipper** task reads the spool in order from the cursor, sends
//!    `AppendRequest`s of at most `batch_size` events (and about 1 MiB), and
//!    after each acknowledged batch moves the cursor past it. A failed call
//!    is retried with a capped exponential backoff with jitter, for ever:
//!    spooled events are never dropped. The channel connects lazily and
//!    reconnects as needed.
//!
//!    The one exception to "retry" is `INVALID_ARGUMENT`: the service
//!    validated the events and will never take them (it refuses a whole
//!    batch for one bad event). The shipper then sends that batch's events
//!    one at a time; each event refused on its own is appended to the
//!    spool's `rejected.frames` file (fsynced), counted in
//!    `shamal_audit_rejected_total`, logged as an error with its
//!    `event_id` and the service's reason, and not sent again. Without
//!    this, one malformed event would block the spool for ever.
//!
//! # The spool
//!
//! `spool_dir` holds:
//!
//! - `<index>.seg` (index: 20 decimal digits, increasing): append-only
//!   segments. A segment is a sequence of frames, each `u32` payload length
//!   (little-endian), `u32` CRC-32/IEEE of the payload (little-endian), then
//!   the payload: the protobuf (prost) encoding of the `AuditEvent`. The
//!   writer starts a new segment when the next frame would take the current
//!   one past `segment_bytes`, and always starts a new one after a restart
//!   (an old segment is never appended to).
//! - `cursor`: one line, `<segment index> <byte offset>`: every frame
//!   before that position has been acknowledged by the audit service. It is
//!   replaced atomically (write `cursor.tmp`, `fsync`, rename, `fsync` the
//!   directory) after every acknowledged batch. Segments wholly before the
//!   cursor are deleted.
//! - `lock`: `flock`ed by the running auditor; a second auditor on the same
//!   directory fails to start with [`Error::SpoolLocked`].
//! - `rejected.frames` (only once the service has refused an event as
//!   invalid): the refused events, in the segments' frame format, for an
//!   operator to inspect. Never read back by the auditor.
//!
//! On start the auditor **recovers**: it deletes segments before the
//! cursor, reads every remaining segment frame by frame, and cuts a segment
//! at its first torn or corrupt frame (a length running past the end of the
//! file or above 64 MiB, a CRC mismatch, an undecodable payload), counting
//! it in `shamal_audit_spool_recovered_frames_total` and logging a warning.
//! Shipping resumes at the cursor. A missing or unreadable cursor means
//! "from the oldest segment".
//!
//! # Guarantees
//!
//! - An event is **durable** once a [`flush`](Auditor::flush) that began
//!   after its `record` has returned: it survives a crash of the process
//!   (and of the machine, as far as `fsync` goes). Events recorded but not
//!   yet flushed are written within `flush_interval_ms` plus the write time;
//!   a crash before that loses them.
//! - Every durable event is delivered **at least once**: the cursor only
//!   moves past acknowledged batches, so a crash or a failed call sends the
//!   unacknowledged ones again. `Append` skips event ids it already has, so
//!   the audit log holds each event **exactly once** — except events the
//!   service refuses as invalid, which end up in `rejected.frames`.
//! - Events reach the service in the order they were spooled.
//! - [`drain`](Auditor::drain) waits until everything recorded before it is
//!   acknowledged; [`shutdown`](Auditor::shutdown) makes everything
//!   recorded before it durable, then stops (what is left is shipped by the
//!   next start on the same spool).
//! - When every handle is dropped without `shutdown`, the writer still
//!   writes what was queued; the shipper stops at once.
//!
//! # When the audit service does not keep up: `on_full`
//!
//! The spool is bounded by `max_spool_bytes`: bytes recorded but not yet
//! acknowledged (queued for the writer plus unshipped frames on disk; frame
//! headers included). At the bound:
//!
//! - `fail_closed` (the default): [`Auditor::admit`] and
//!   [`Auditor::record`] return [`Backlog`] ("audit backlog full: N of M
//!   bytes spooled; the audit service is not keeping up"), counted in
//!   `shamal_audit_refused_total`. A router answers `RESOURCE_EXHAUSTED`
//!   with it, so that no request is served without its audit record. Call
//!   `admit` before doing the work, `record` after.
//! - `fail_open`: `admit` always succeeds and `record` drops the event,
//!   counts it in `shamal_audit_dropped_total` and logs a warning (at most
//!   one every 10 s, with the number dropped since), and returns `Ok`.
//!
//! The bound is checked before adding, so it may be passed by the events of
//! concurrent `record` calls, never by more.
//!
//! # Metrics
//!
//! Labelled `service` (the families are shared by the auditors of one
//! process, as with `shamal up`): `shamal_audit_spool_bytes` and
//! `shamal_audit_spool_events` (gauges of what is recorded and not yet
//! acknowledged), `shamal_audit_shipped_total`,
//! `shamal_audit_ship_failures_total`, `shamal_audit_dropped_total`,
//! `shamal_audit_refused_total`, `shamal_audit_spool_recovered_frames_total`,
//! `shamal_audit_spool_write_errors_total` and `shamal_audit_rejected_total`.

mod config;
mod frame;
mod metrics;
mod refusals;
mod shipper;
mod spool;
mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shamal_backoff::Backoff;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

pub use config::{
    AuditClientConfig, ConfigError, DEFAULT_MAX_SPOOL_BYTES, DEFAULT_SEGMENT_BYTES, OnFull,
};
pub use refusals::{AUTH_REFUSED, RefusalRecorder};
pub use shamal_proto::shamal::audit::v1::AuditEvent;

use metrics::Metrics;
use spool::{Pos, SegInfo};
use writer::Msg;

/// Events the writer's channel holds; past that, `record` treats the
/// spool as full.
const QUEUE_CAPACITY: usize = 65_536;

/// At most one "events dropped" warning per this many milliseconds.
const DROP_WARNING_EVERY_MS: u64 = 10_000;

/// Why an auditor could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid audit endpoint '{endpoint}': {source}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("audit spool {path}: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit spool {dir} is in use by another running auditor")]
    SpoolLocked { dir: PathBuf },
    #[error("audit metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the auditor must be started within a Tokio runtime")]
    NoRuntime,
}

/// The audit backlog is full (`on_full = "fail_closed"`): the request
/// should be refused (`RESOURCE_EXHAUSTED`) with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Backlog {
    /// The spool holds `max_spool_bytes` unacknowledged bytes.
    #[error(
        "audit backlog full: {spooled_bytes} of {max_spool_bytes} bytes spooled; the audit service is not keeping up"
    )]
    Spool {
        spooled_bytes: u64,
        max_spool_bytes: u64,
    },
    /// The writer's queue is full: the spool's disk is not keeping up.
    #[error(
        "audit backlog full: {queued} events wait to be written to the spool; the spool disk is not keeping up"
    )]
    Queue { queued: usize },
}

/// [`Auditor::drain`] ran out of time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the audit spool was not drained in time: {events} events ({bytes} bytes) not yet acknowledged by the audit service"
)]
pub struct DrainTimeout {
    pub events: u64,
    pub bytes: u64,
}

/// A snapshot of one auditor's counts (also exported as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Bytes recorded, not yet acknowledged (queued + spooled).
    pub spool_bytes: u64,
    /// Events recorded, not yet acknowledged.
    pub spool_events: u64,
    pub shipped: u64,
    pub ship_failures: u64,
    pub dropped: u64,
    pub refused: u64,
    pub recovered_frames: u64,
    pub write_errors: u64,
    /// Events the audit service refused as invalid (set aside).
    pub rejected: u64,
}

/// What the handles and the tasks share.
pub(crate) struct Shared {
    dir: PathBuf,
    service: String,
    instance: String,
    max_spool_bytes: u64,
    on_full: OnFull,
    spooled_bytes: AtomicU64,
    spooled_events: AtomicU64,
    metrics: Metrics,
    /// Segments on disk with their durable length (writer) — the shipper
    /// reads no further and removes the ones it is done with.
    segments: Mutex<BTreeMap<u64, SegInfo>>,
    /// The end of the last durable frame.
    durable: watch::Sender<Pos>,
    /// Everything before is acknowledged.
    acked: watch::Sender<Pos>,
    /// The shipper met a corrupt frame: the writer should leave the
    /// segment.
    rotate_requested: AtomicBool,
    /// Shutting down: the writer stops retrying failed writes.
    stopping: AtomicBool,
    /// A flush is queued: the writer ends its gathering window early.
    flush_requested: tokio::sync::Notify,
    next_drop_warning_ms: AtomicU64,
    drops_unlogged: AtomicU64,
    /// Held (locked) while any handle or task lives.
    _lock: File,
}

impl Shared {
    fn segments_lock(&self) -> MutexGuard<'_, BTreeMap<u64, SegInfo>> {
        self.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Segment `segment`'s durable extent, and the next segment if there
    /// is one (then `segment` is complete).
    fn segment_view(&self, segment: u64) -> (Option<SegInfo>, Option<u64>) {
        let segments = self.segments_lock();
        let info = segments.get(&segment).copied();
        let next = segments
            .range(segment.saturating_add(1)..)
            .next()
            .map(|(index, _)| *index);
        (info, next)
    }

    /// Acknowledged (or skipped) events leave the bound.
    fn unspool(&self, bytes: u64, events: u64) {
        self.spooled_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.spooled_events.fetch_sub(events, Ordering::AcqRel);
    }

    fn update_gauges(&self) {
        let bytes = self.spooled_bytes.load(Ordering::Acquire);
        let events = self.spooled_events.load(Ordering::Acquire);
        self.metrics
            .spool_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics
            .spool_events
            .set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// The spool (or queue) is full: refuse or drop as configured.
    fn full(&self, backlog: Backlog) -> Result<(), Backlog> {
        match self.on_full {
            OnFull::FailClosed => {
                self.metrics.refused.add(1);
                Err(backlog)
            }
            OnFull::FailOpen => {
                self.dropped(&backlog.to_string());
                Ok(())
            }
        }
    }

    /// Counts a dropped event; warns at most once per 10 s.
    fn dropped(&self, why: &str) {
        self.metrics.dropped.add(1);
        self.drops_unlogged.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let next = self.next_drop_warning_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_drop_warning_ms
                .compare_exchange(
                    next,
                    now + DROP_WARNING_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let dropped = self.drops_unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(
                service = %self.service,
                dropped,
                reason = why,
                "audit events dropped (on_full = fail_open)"
            );
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The shipper stops; the writer writes what is queued and stops
        // when the channel closes (`tx` is dropped right after this).
        let _ = self.stop.send(true);
    }
}

impl Inner {
    fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The audit sink of one producing service: cheap to clone (an `Arc`
/// inside), shared by every request path. See the crate documentation.
#[derive(Clone)]
pub struct Auditor {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Auditor(disabled)"),
            Some(inner) => f
                .debug_struct("Auditor")
                .field("service", &inner.shared.service)
                .field("spool_dir", &inner.shared.dir)
                .finish(),
        }
    }
}

impl Auditor {
    /// Validates `config`, recovers the spool in `config.spool_dir` and
    /// starts the writer and shipper tasks (so it must be called within a
    /// Tokio runtime). `tls`: the service's client certificate for an mTLS
    /// channel (pass `tls.expect_service("audit")` to also require the
    /// server to be the audit service). `service` and `instance` fill
    /// events that leave them empty and `service` labels the metrics,
    /// registered into `registry`. With no `endpoint` configured, returns
    /// [`Auditor::disabled`].
    ///
    /// Recovery reads the whole unshipped spool once (blocking).
    pub fn start(
        config: AuditClientConfig,
        tls: Option<&shamal_tls::ClientTls>,
        service: &str,
        instance: &str,
        registry: &prometheus::Registry,
    ) -> Result<Auditor, Error> {
        config.validate()?;
        let Some(endpoint) = config.endpoint.as_deref() else {
            tracing::info!(service, "audit off: no audit endpoint configured");
            return Ok(Auditor::disabled());
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let channel = {
            let _guard = runtime.enter();
            let url = config::endpoint_url(endpoint, tls.is_some());
            let endpoint_config = Endpoint::from_shared(url)
                .map_err(|source| Error::InvalidEndpoint {
                    endpoint: endpoint.to_owned(),
                    source,
                })?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            match tls {
                Some(tls) => tls.connect_lazy(endpoint_config),
                None => endpoint_config.connect_lazy(),
            }
        };
        let metrics = Metrics::new(registry, service)?;
        let dir = config.spool_dir.clone();
        let lock = spool::lock(&dir)?;
        let recovered = spool::recover(&dir)?;
        if recovered.torn_frames > 0 {
            metrics.recovered.add(recovered.torn_frames);
        }
        tracing::info!(
            service,
            dir = %dir.display(),
            unshipped_events = recovered.unshipped_events,
            unshipped_bytes = recovered.unshipped_bytes,
            torn_frames = recovered.torn_frames,
            endpoint,
            "audit spool recovered"
        );

        let (durable, _) = watch::channel(recovered.durable_end);
        let (acked, _) = watch::channel(recovered.ship_from);
        let shared = Arc::new(Shared {
            dir,
            service: service.to_owned(),
            instance: instance.to_owned(),
            max_spool_bytes: config.max_spool_bytes,
            on_full: config.on_full,
            spooled_bytes: AtomicU64::new(recovered.unshipped_bytes),
            spooled_events: AtomicU64::new(recovered.unshipped_events),
            metrics,
            segments: Mutex::new(recovered.segments.clone()),
            durable,
            acked,
            rotate_requested: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            flush_requested: tokio::sync::Notify::new(),
            next_drop_warning_ms: AtomicU64::new(0),
            drops_unlogged: AtomicU64::new(0),
            _lock: lock,
        });
        shared.update_gauges();

        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (stop, stop_rx) = watch::channel(false);
        let segment_writer =
            writer::SegmentWriter::new(shared.clone(), config.segment_bytes, &recovered);
        let writer_task = runtime.spawn(writer::run(
            rx,
            segment_writer,
            Duration::from_millis(config.flush_interval_ms),
        ));
        let shipper = shipper::Shipper {
            shared: shared.clone(),
            client: AuditServiceClient::new(channel),
            pos: recovered.ship_from,
            frames_acked: recovered.frames_before,
            backoff: Backoff::new(
                Duration::from_millis(config.retry_min_ms),
                Duration::from_millis(config.retry_max_ms),
            ),
            stop: stop_rx,
            batch_size: config.batch_size,
            ship_interval: Duration::from_millis(config.ship_interval_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            corrupt_at: None,
        };
        let shipper_task = runtime.spawn(shipper.run());
        Ok(Auditor {
            inner: Some(Arc::new(Inner {
                shared,
                tx,
                stop,
                tasks: Mutex::new(vec![writer_task, shipper_task]),
            })),
        })
    }

    /// An auditor that records nothing: `admit` and `record` always
    /// succeed, `flush` and `drain` return at once.
    pub fn disabled() -> Auditor {
        Auditor { inner: None }
    }

    /// Whether events go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The cheap check a request path makes before doing the work: with
    /// `fail_closed`, `Err` when the spool is at its bound (or the writer's
    /// queue is full). Always `Ok` with `fail_open` or when disabled.
    pub fn admit(&self) -> Result<(), Backlog> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let shared = &inner.shared;
        if shared.on_full == OnFull::FailOpen {
            return Ok(());
        }
        let spooled = shared.spooled_bytes.load(Ordering::Acquire);
        if spooled >= shared.max_spool_bytes {
            shared.metrics.refused.add(1);
            return Err(Backlog::Spool {
                spooled_bytes: spooled,
                max_spool_bytes: shared.max_spool_bytes,
            });
        }
        if inner.tx.capacity() == 0 {
            shared.metrics.refused.add(1);
            return Err(Backlog::Queue {
                queued: QUEUE_CAPACITY,
            });
        }
        Ok(())
    }

    /// Hands `event` to the spool writer; never waits on I/O or the
    /// network. Fills an empty `event_id` (UUID v4), a zero
    /// `occurred_at_ms` (now) and empty `service` / `instance` (this
    /// auditor's). At the bound: `Err(Backlog)` with `fail_closed`; with
    /// `fail_open` the event is dropped and counted, and the result is
    /// `Ok`. After `shutdown`, events are dropped and counted.
    pub fn record(&self, mut event: AuditEvent) -> Result<(), Backlog> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let shared = &inner.shared;
        if event.event_id.is_empty() {
            event.event_id = uuid::Uuid::new_v4().to_string();
        }
        if event.occurred_at_ms == 0 {
            event.occurred_at_ms = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        }
        if event.service.is_empty() {
            event.service.clone_from(&shared.service);
        }
        if event.instance.is_empty() {
            event.instance.clone_from(&shared.instance);
        }
        let len = frame::frame_len(&event);
        let before = shared.spooled_bytes.fetch_add(len, Ordering::AcqRel);
        if before >= shared.max_spool_bytes {
            shared.spooled_bytes.fetch_sub(len, Ordering::AcqRel);
            return shared.full(Backlog::Spool {
                spooled_bytes: before,
                max_spool_bytes: shared.max_spool_bytes,
            });
        }
        shared.spooled_events.fetch_add(1, Ordering::AcqRel);
        match inner.tx.try_send(Msg::Event(event)) {
            Ok(()) => Ok(()),
            Err(error) => {
                shared.unspool(len, 1);
                match error {
                    mpsc::error::TrySendError::Full(_) => shared.full(Backlog::Queue {
                        queued: QUEUE_CAPACITY,
                    }),
                    mpsc::error::TrySendError::Closed(_) => {
                        shared.dropped("the auditor has shut down");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Waits until every event recorded before this call is durable in the
    /// spool (written and `fsync`ed).
    pub async fn flush(&self) {
        let _ = self.flush_to().await;
    }

    async fn flush_to(&self) -> Option<Pos> {
        let inner = self.inner.as_ref()?;
        let (reply, answer) = oneshot::channel();
        inner
            .tx
            .send(Msg::Flush { reply, stop: false })
            .await
            .ok()?;
        inner.shared.flush_requested.notify_one();
        answer.await.ok()
    }

    /// Waits until every event recorded before this call has been
    /// acknowledged by the audit service, for at most `timeout`: for
    /// graceful shutdown (then [`shutdown`](Self::shutdown)) and tests.
    pub async fn drain(&self, timeout: Duration) -> Result<(), DrainTimeout> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let target = tokio::time::timeout_at(deadline, self.flush_to()).await;
        if let Ok(Some(target)) = target {
            let mut acked = inner.shared.acked.subscribe();
            let done =
                tokio::time::timeout_at(deadline, acked.wait_for(|pos| *pos >= target)).await;
            if matches!(done, Ok(Ok(_))) {
                return Ok(());
            }
        }
        let stats = self.stats();
        Err(DrainTimeout {
            events: stats.spool_events,
            bytes: stats.spool_bytes,
        })
    }

    /// Makes everything recorded before this call durable, then stops the
    /// writer and the shipper (unshipped events stay in the spool for the
    /// next start). Call [`drain`](Self::drain) first to ship them now.
    /// Other clones of this auditor then drop what they record.
    pub async fn shutdown(self) {
        let Some(inner) = self.inner else {
            return;
        };
        let (reply, answer) = oneshot::channel();
        if inner
            .tx
            .send(Msg::Flush { reply, stop: true })
            .await
            .is_ok()
        {
            inner.shared.flush_requested.notify_one();
            let _ = answer.await;
        }
        inner.shared.stopping.store(true, Ordering::Release);
        let _ = inner.stop.send(true);
        for task in inner.take_tasks() {
            let _ = task.await;
        }
    }

    /// Stops the tasks at once, as a crash would: what is queued and not
    /// yet written is lost, the shipper's call in flight is abandoned.
    /// For tests of recovery.
    #[doc(hidden)]
    pub async fn kill(self) {
        let Some(inner) = self.inner else {
            return;
        };
        inner.shared.stopping.store(true, Ordering::Release);
        let tasks = inner.take_tasks();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// This auditor's counts.
    pub fn stats(&self) -> AuditStats {
        let Some(inner) = &self.inner else {
            return AuditStats::default();
        };
        let shared = &inner.shared;
        let metrics = &shared.metrics;
        AuditStats {
            spool_bytes: shared.spooled_bytes.load(Ordering::Acquire),
            spool_events: shared.spooled_events.load(Ordering::Acquire),
            shipped: metrics.shipped.get(),
            ship_failures: metrics.ship_failures.get(),
            dropped: metrics.dropped.get(),
            refused: metrics.refused.get(),
            recovered_frames: metrics.recovered.get(),
            write_errors: metrics.write_errors.get(),
            rejected: metrics.rejected.get(),
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`: the `request_sha256` /
/// `response_sha256` of inference events.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha2::Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_is_lower_case_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn backlog_names_the_audit_backlog() {
        let backlog = Backlog::Spool {
            spooled_bytes: DEFAULT_MAX_SPOOL_BYTES,
            max_spool_bytes: DEFAULT_MAX_SPOOL_BYTES,
        };
        assert_eq!(
            backlog.to_string(),
            "audit backlog full: 268435456 of 268435456 bytes spooled; the audit service is not keeping up"
        );
    }

    #[test]
    fn auditors_can_be_shared_between_tasks() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Auditor>();
    }

    #[test]
    fn a_disabled_auditor_accepts_everything() {
        let auditor = Auditor::disabled();
        assert!(!auditor.is_enabled());
        assert!(auditor.admit().is_ok());
        assert!(auditor.record(AuditEvent::default()).is_ok());
        assert_eq!(auditor.stats(), AuditStats::default());
    }
}
