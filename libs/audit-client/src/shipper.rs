//! The shipper: one task that reads the spool in order from the cursor,
//! sends `Append` batches, and advances the cursor when a batch is
//! acknowledged.

use std::sync::Arc;
use std::time::Duration;

use shamal_backoff::Backoff;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use shamal_proto::shamal::audit::v1::{AppendRequest, AppendResponse, AuditEvent};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::Shared;
use crate::spool::{self, Pos};

/// Encoded events per `Append` past the first one: well under the 4 MiB
/// tonic servers accept by default.
pub(crate) const MAX_BATCH_BYTES: u64 = 1024 * 1024;

pub(crate) struct Shipper {
    pub shared: Arc<Shared>,
    pub client: AuditServiceClient<Channel>,
    /// Everything before is acknowledged.
    pub pos: Pos,
    /// Frames of `pos.segment` before `pos.offset`.
    pub frames_acked: u64,
    pub backoff: Backoff,
    pub stop: watch::Receiver<bool>,
    pub batch_size: usize,
    pub ship_interval: Duration,
    pub request_timeout: Duration,
    /// Where a corrupt frame was met: not shipped, skipped with the rest of
    /// its segment once the writer has moved on.
    pub corrupt_at: Option<Pos>,
}

enum Sent {
    Acked(AppendResponse),
    /// `INVALID_ARGUMENT`: the service will never take this batch.
    Rejected(tonic::Status),
}

/// Completes when the auditor stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

impl Shipper {
    pub async fn run(mut self) {
        let mut durable = self.shared.durable.subscribe();
        loop {
            if *self.stop.borrow() {
                return;
            }
            durable.borrow_and_update();
            let (info, next) = self.shared.segment_view(self.pos.segment);
            if let Some(info) = info
                && self.pos.offset < info.len
                && self.corrupt_at != Some(self.pos)
            {
                if !self.ship(info.len).await {
                    return;
                }
                continue;
            }
            if let Some(next) = next {
                self.advance(next).await;
                continue;
            }
            // Caught up: wait for the writer, then let a batch gather.
            tokio::select! {
                changed = durable.changed() => if changed.is_err() { return },
                () = stopped(&mut self.stop) => return,
            }
            if !self.ship_interval.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(self.ship_interval) => {}
                    () = stopped(&mut self.stop) => return,
                }
            }
        }
    }

    /// Reads and sends one batch of `pos.segment` (valid up to `limit`);
    /// false when stopped.
    async fn ship(&mut self, limit: u64) -> bool {
        let path = spool::segment_path(&self.shared.dir, self.pos.segment);
        let offset = self.pos.offset;
        let batch_size = self.batch_size;
        let read = tokio::task::spawn_blocking(move || {
            spool::read_batch(&path, offset, limit, batch_size, MAX_BATCH_BYTES)
        })
        .await;
        let batch = match read {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                let delay = self.backoff.next_delay();
                tracing::error!(
                    dir = %self.shared.dir.display(),
                    segment = self.pos.segment,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot read the audit spool; retrying"
                );
                return self.pause(delay).await;
            }
            Err(error) => {
                tracing::error!(%error, "audit spool reader failed");
                let delay = self.backoff.next_delay();
                return self.pause(delay).await;
            }
        };
        if !batch.events.is_empty() {
            let count = batch.events.len() as u64;
            let request = AppendRequest {
                events: batch.events,
            };
            let rejected = match self.append(&request).await {
                None => return false,
                Some(Sent::Acked(response)) => {
                    tracing::debug!(
                        events = count,
                        appended = response.appended,
                        duplicates = response.duplicates,
                        head_seq = response.head_seq,
                        "audit events shipped"
                    );
                    0
                }
                Some(Sent::Rejected(status)) => match self.one_by_one(request, status).await {
                    None => return false,
                    Some(rejected) => rejected,
                },
            };
            self.pos.offset = batch.end;
            self.frames_acked += count;
            self.shared.unspool(batch.bytes, count);
            self.shared.metrics.shipped.add(count - rejected);
            self.acknowledge().await;
        }
        if batch.corrupt {
            self.corrupt();
        }
        true
    }

    /// Sends one batch until it is acknowledged or refused as invalid;
    /// `None` when stopped.
    async fn append(&mut self, request: &AppendRequest) -> Option<Sent> {
        let count = request.events.len();
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(self.request_timeout);
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(self.request_timeout, self.client.append(call)) => outcome,
                () = stopped(&mut self.stop) => return None,
            };
            let error = match outcome {
                Ok(Ok(response)) => {
                    self.backoff.reset();
                    if attempt > 1 {
                        tracing::info!(events = count, attempt, "audit Append succeeded again");
                    }
                    return Some(Sent::Acked(response.into_inner()));
                }
                // The service validated the events and refuses (one of)
                // them: sending the same again cannot succeed.
                Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                    self.backoff.reset();
                    return Some(Sent::Rejected(status));
                }
                Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                Err(_) => format!("timed out after {:?}", self.request_timeout),
            };
            self.shared.metrics.ship_failures.add(1);
            let delay = self.backoff.next_delay();
            tracing::warn!(
                events = count,
                attempt,
                error,
                retry_in_ms = delay.as_millis() as u64,
                "audit Append failed; the events stay spooled and are sent again"
            );
            if !self.pause(delay).await {
                return None;
            }
        }
    }

    /// A batch the service refused as invalid: sends its events one at a
    /// time so that only the invalid ones are set aside (in the rejected
    /// file). The number set aside; `None` when stopped.
    async fn one_by_one(&mut self, request: AppendRequest, status: tonic::Status) -> Option<u64> {
        if request.events.len() == 1 {
            let event = request.events.into_iter().next()?;
            return self.reject(event, &status).await.then_some(1);
        }
        tracing::warn!(
            events = request.events.len(),
            error = status.message(),
            "the audit service refuses a batch as invalid; sending its events one at a time"
        );
        let mut rejected = 0;
        for event in request.events {
            let single = AppendRequest {
                events: vec![event],
            };
            match self.append(&single).await? {
                Sent::Acked(_) => {}
                Sent::Rejected(status) => {
                    let event = single.events.into_iter().next()?;
                    if !self.reject(event, &status).await {
                        return None;
                    }
                    rejected += 1;
                }
            }
        }
        Some(rejected)
    }

    /// Keeps an event the service refuses in the rejected file (durably,
    /// retrying), counts and logs it; false when stopped first.
    async fn reject(&mut self, event: AuditEvent, status: &tonic::Status) -> bool {
        tracing::error!(
            event_id = %event.event_id,
            action = %event.action,
            service = %event.service,
            error = status.message(),
            file = %self.shared.dir.join(spool::REJECTED_FILE).display(),
            "the audit service refuses an event as invalid; it is set aside in the rejected file and not sent again"
        );
        let event = Arc::new(event);
        loop {
            let dir = self.shared.dir.clone();
            let kept = event.clone();
            let written =
                tokio::task::spawn_blocking(move || spool::append_rejected(&dir, &kept)).await;
            match written {
                Ok(Ok(())) => {
                    self.shared.metrics.rejected.add(1);
                    return true;
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "cannot write the audit rejected file; retrying")
                }
                Err(error) => {
                    tracing::error!(%error, "audit rejected-file writer failed; retrying")
                }
            }
            let delay = self.backoff.next_delay();
            if !self.pause(delay).await {
                return false;
            }
        }
    }

    /// Sleeps `delay`; false when stopped meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = stopped(&mut self.stop) => false,
        }
    }

    /// A corrupt frame at `pos`: counted and logged once; the writer is
    /// asked to start a new segment so that this one can be skipped.
    fn corrupt(&mut self) {
        if self.corrupt_at == Some(self.pos) {
            return;
        }
        self.corrupt_at = Some(self.pos);
        self.shared.metrics.recovered.add(1);
        self.shared
            .rotate_requested
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::error!(
            path = %spool::segment_path(&self.shared.dir, self.pos.segment).display(),
            offset = self.pos.offset,
            "corrupt frame in the audit spool; the rest of this segment will be skipped"
        );
    }

    /// Moves to segment `next` (the current one is complete: the writer
    /// has moved on), deleting the segments before it.
    async fn advance(&mut self, next: u64) {
        let (info, _) = self.shared.segment_view(self.pos.segment);
        if let Some(info) = info {
            // Only what follows a corrupt frame is left unshipped here.
            let bytes = info.len.saturating_sub(self.pos.offset);
            let events = info.frames.saturating_sub(self.frames_acked);
            if bytes > 0 || events > 0 {
                tracing::error!(
                    segment = self.pos.segment,
                    bytes,
                    events,
                    "skipping the corrupt rest of an audit spool segment"
                );
                self.shared.unspool(bytes, events);
            }
        }
        self.pos = Pos {
            segment: next,
            offset: 0,
        };
        self.frames_acked = 0;
        self.corrupt_at = None;
        self.acknowledge().await;
        let old: Vec<u64> = {
            let mut segments = self.shared.segments_lock();
            let old: Vec<u64> = segments.range(..next).map(|(index, _)| *index).collect();
            for index in &old {
                segments.remove(index);
            }
            old
        };
        let dir = self.shared.dir.clone();
        let removed = tokio::task::spawn_blocking(move || {
            for index in old {
                let path = spool::segment_path(&dir, index);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
            spool::sync_dir(&dir)
        })
        .await;
        if let Ok(Err(error)) = removed {
            tracing::warn!(dir = %self.shared.dir.display(), %error, "cannot remove a shipped audit spool segment");
        }
    }

    /// Persists the cursor and tells `drain` waiters.
    async fn acknowledge(&mut self) {
        let dir = self.shared.dir.clone();
        let pos = self.pos;
        let written = tokio::task::spawn_blocking(move || spool::write_cursor(&dir, pos)).await;
        match written {
            Ok(Ok(())) => {}
            // Shipping goes on: after a restart the events since the last
            // cursor written are sent again, which Append skips.
            Ok(Err(error)) => {
                tracing::warn!(dir = %self.shared.dir.display(), %error, "cannot write the audit spool cursor")
            }
            Err(error) => tracing::warn!(%error, "audit spool cursor writer failed"),
        }
        self.shared.acked.send_replace(pos);
        self.shared.update_gauges();
    }
}
