//! The spool writer: one task that takes what `record` queued and appends
//! it to the current segment, one `fsync` per group.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shamal_backoff::Backoff;
use shamal_proto::shamal::audit::v1::AuditEvent;
use tokio::sync::{mpsc, oneshot};

use crate::Shared;
use crate::frame;
use crate::spool::{self, Pos, Recovered, SegInfo};

/// Most events written with one `fsync`.
const MAX_GROUP_EVENTS: usize = 4096;

// Nearly every message is an event: boxing it would add an allocation to
// every `record` to save space on the rare flushes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    Event(AuditEvent),
    /// Answered, with the end of the spool, once everything queued before
    /// it is durable; `stop` ends the writer after that.
    Flush {
        reply: oneshot::Sender<Pos>,
        stop: bool,
    },
}

pub(crate) struct SegmentWriter {
    shared: Arc<Shared>,
    segment_bytes: u64,
    /// The segment written to; its file is opened (created) on the first
    /// write after start, so that segments left by an earlier run are
    /// never appended to.
    segment: u64,
    file: Option<File>,
    len: u64,
    frames: u64,
    next_segment: u64,
    buf: Vec<u8>,
    lens: Vec<u64>,
}

impl SegmentWriter {
    pub fn new(shared: Arc<Shared>, segment_bytes: u64, recovered: &Recovered) -> SegmentWriter {
        let end = recovered.durable_end;
        SegmentWriter {
            shared,
            segment_bytes,
            segment: end.segment,
            file: None,
            len: end.offset,
            frames: recovered
                .segments
                .get(&end.segment)
                .map_or(0, |info| info.frames),
            next_segment: recovered.next_segment,
            buf: Vec::new(),
            lens: Vec::new(),
        }
    }

    /// The end of the last durable frame.
    pub fn end(&self) -> Pos {
        Pos {
            segment: self.segment,
            offset: self.len,
        }
    }

    /// Writes `events` durably, retrying failed writes until they succeed
    /// or the auditor stops (then the events are lost, and logged).
    fn commit(&mut self, events: &[AuditEvent]) {
        let mut buf = std::mem::take(&mut self.buf);
        let mut lens = std::mem::take(&mut self.lens);
        buf.clear();
        lens.clear();
        for event in events {
            lens.push(frame::encode(event, &mut buf));
        }
        let mut done = 0;
        let mut offset = 0;
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        while let Err(error) = self.write_from(&buf, &lens, &mut done, &mut offset) {
            self.shared.metrics.write_errors.add(1);
            if self.shared.stopping.load(Ordering::Acquire) {
                tracing::error!(
                    dir = %self.shared.dir.display(),
                    %error,
                    lost = lens.len() - done,
                    "audit spool write failed while stopping; events lost"
                );
                break;
            }
            let delay = backoff.next_delay();
            tracing::error!(
                dir = %self.shared.dir.display(),
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "audit spool write failed; retrying"
            );
            std::thread::sleep(delay);
        }
        self.buf = buf;
        self.lens = lens;
    }

    /// Writes the frames from `done` (at byte `offset` of `buf`) on,
    /// moving both past what is durable.
    fn write_from(
        &mut self,
        buf: &[u8],
        lens: &[u64],
        done: &mut usize,
        offset: &mut usize,
    ) -> io::Result<()> {
        while *done < lens.len() {
            let rotate = self.shared.rotate_requested.swap(false, Ordering::AcqRel);
            let first = lens[*done];
            if self.file.is_none()
                || (self.len > 0 && (rotate || self.len + first > self.segment_bytes))
            {
                self.open_next()?;
            }
            let mut count = 0;
            let mut bytes = 0;
            while *done + count < lens.len() {
                let len = lens[*done + count];
                if count > 0 && self.len + bytes + len > self.segment_bytes {
                    break;
                }
                bytes += len;
                count += 1;
            }
            let chunk = &buf[*offset..*offset + bytes as usize];
            let Some(file) = self.file.as_mut() else {
                return Err(io::Error::other("no open segment"));
            };
            let written = file
                .seek(SeekFrom::Start(self.len))
                .and_then(|_| file.write_all(chunk))
                .and_then(|()| file.sync_data());
            if let Err(error) = written {
                // Cut whatever part made it, so the retry rewrites it whole.
                let _ = file.set_len(self.len);
                return Err(error);
            }
            self.len += bytes;
            self.frames += count as u64;
            *done += count;
            *offset += bytes as usize;
            self.publish();
        }
        Ok(())
    }

    /// Seals the current segment (it is already synced) and starts the
    /// next one.
    fn open_next(&mut self) -> io::Result<()> {
        let dir = &self.shared.dir;
        let segment = self.next_segment;
        let path = spool::segment_path(dir, segment);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        spool::sync_dir(dir)?;
        self.next_segment = segment + 1;
        self.segment = segment;
        self.file = Some(file);
        self.len = 0;
        self.frames = 0;
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        self.shared.segments_lock().insert(
            self.segment,
            SegInfo {
                len: self.len,
                frames: self.frames,
            },
        );
        self.shared.durable.send_replace(self.end());
    }
}

/// Adds `msg` to the group; true for a stopping flush.
fn take(msg: Msg, events: &mut Vec<AuditEvent>, waiters: &mut Vec<oneshot::Sender<Pos>>) -> bool {
    match msg {
        Msg::Event(event) => {
            events.push(event);
            false
        }
        Msg::Flush { reply, stop } => {
            waiters.push(reply);
            stop
        }
    }
}

/// Takes what is queued, up to a group's worth, without waiting; true
/// when the channel is closed.
fn drain(
    rx: &mut mpsc::Receiver<Msg>,
    events: &mut Vec<AuditEvent>,
    waiters: &mut Vec<oneshot::Sender<Pos>>,
    stop: &mut bool,
) -> bool {
    while events.len() < MAX_GROUP_EVENTS {
        match rx.try_recv() {
            Ok(msg) => *stop |= take(msg, events, waiters),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// The writer task: group commit until the channel closes or a stopping
/// flush arrives.
pub(crate) async fn run(mut rx: mpsc::Receiver<Msg>, mut writer: SegmentWriter, window: Duration) {
    let mut events: Vec<AuditEvent> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<Pos>> = Vec::new();
    let mut stop = false;
    let mut closed = false;
    while !stop && !closed {
        match rx.recv().await {
            Some(msg) => stop |= take(msg, &mut events, &mut waiters),
            None => break,
        }
        // Everything already queued...
        closed = drain(&mut rx, &mut events, &mut waiters, &mut stop);
        // ...and what arrives within the window, unless someone waits. The
        // writer sleeps through the window and then takes what queued,
        // rather than waking for every event: at thousands of records a
        // second, a wake-up per record (a cross-thread unpark each) costs
        // the request path more than everything else the audit does. A
        // flush cuts the sleep short.
        if !window.is_zero() && !closed && waiters.is_empty() && events.len() < MAX_GROUP_EVENTS {
            tokio::select! {
                () = tokio::time::sleep(window) => {}
                () = writer.shared.flush_requested.notified() => {}
            }
            closed = drain(&mut rx, &mut events, &mut waiters, &mut stop);
        }
        if !events.is_empty() {
            let group = std::mem::take(&mut events);
            let committed = tokio::task::spawn_blocking(move || {
                writer.commit(&group);
                (writer, group)
            })
            .await;
            match committed {
                Ok((back, mut group)) => {
                    writer = back;
                    group.clear();
                    events = group;
                }
                Err(error) => {
                    tracing::error!(%error, "audit spool writer failed; recorded events are no longer written");
                    return;
                }
            }
            writer.shared.update_gauges();
        }
        let end = writer.end();
        for waiter in waiters.drain(..) {
            let _ = waiter.send(end);
        }
    }
    // A stopping flush ends the task; events queued after it are lost
    // (they were recorded while the auditor shut down).
    tracing::debug!(dir = %writer.shared.dir.display(), "audit spool writer stopped");
}
