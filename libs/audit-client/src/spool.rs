//! The files of the spool: segments, the cursor, the lock, and what
//! start-up recovery makes of them. Everything here is blocking I/O; the
//! tasks call it through `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use shamal_proto::shamal::audit::v1::AuditEvent;

use crate::Error;
use crate::frame::{self, HEADER_BYTES, MAX_PAYLOAD_BYTES};

/// Segment files are `<index, 20 digits>.seg`.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// The acknowledged position: one line, `<segment> <offset>`.
pub const CURSOR_FILE: &str = "cursor";
const CURSOR_TEMP: &str = "cursor.tmp";
/// Events the audit service refused as invalid, in the segments' frame
/// format, for an operator to inspect.
pub const REJECTED_FILE: &str = "rejected.frames";
/// Held (`flock`) by the running producer.
pub const LOCK_FILE: &str = "lock";

/// A place in the spool: a segment and a byte offset in it. Ordered as the
/// events are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub segment: u64,
    pub offset: u64,
}

/// What is durably written in one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegInfo {
    /// Bytes of whole, synced frames.
    pub len: u64,
    pub frames: u64,
}

pub fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}{SEGMENT_SUFFIX}"))
}

fn io_error(path: &Path, source: io::Error) -> Error {
    Error::Spool {
        path: path.to_owned(),
        source,
    }
}

/// Makes `dir`'s entries (a created, renamed or removed file) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` if needed and takes its lock: one producer per spool.
pub fn lock(dir: &Path) -> Result<File, Error> {
    fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| io_error(&path, source))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::SpoolLocked {
            dir: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(io_error(&path, source)),
    }
}

/// Appends `event` to the rejected file, durably.
pub fn append_rejected(dir: &Path, event: &AuditEvent) -> io::Result<()> {
    let path = dir.join(REJECTED_FILE);
    let created = !path.exists();
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    let mut frame = Vec::new();
    frame::encode(event, &mut frame);
    file.write_all(&frame)?;
    file.sync_data()?;
    if created {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Writes the cursor atomically: temporary file, `fsync`, rename, `fsync`
/// of the directory.
pub fn write_cursor(dir: &Path, pos: Pos) -> io::Result<()> {
    let temp = dir.join(CURSOR_TEMP);
    let mut file = File::create(&temp)?;
    file.write_all(format!("{} {}\n", pos.segment, pos.offset).as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, dir.join(CURSOR_FILE))?;
    sync_dir(dir)
}

fn parse_cursor(text: &str) -> Option<Pos> {
    let mut parts = text.split_whitespace();
    let segment = parts.next()?.parse().ok()?;
    let offset = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Pos { segment, offset })
}

/// The cursor, `None` when there is none (a new spool) or it cannot be
/// read (then shipping restarts from the oldest segment: Append is
/// idempotent, so the resend is harmless).
fn read_cursor(dir: &Path) -> Option<Pos> {
    let path = dir.join(CURSOR_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let pos = parse_cursor(&text);
            if pos.is_none() {
                tracing::warn!(path = %path.display(), "unreadable audit spool cursor; shipping restarts from the oldest segment");
            }
            pos
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the audit spool cursor; shipping restarts from the oldest segment");
            None
        }
    }
}

/// What reading the next frame found.
// Short-lived: boxing the event would only add an allocation per frame.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    Frame {
        event: AuditEvent,
        len: u64,
    },
    /// `pos == limit`: nothing more.
    End,
    /// A frame that is cut short, too long for what remains, or fails its
    /// CRC or decoding.
    Corrupt,
}

/// Reads the frame at `pos` from `reader` (positioned there), not going
/// past `limit`.
pub fn next_frame<R: Read>(
    reader: &mut R,
    pos: u64,
    limit: u64,
    payload: &mut Vec<u8>,
) -> io::Result<Next> {
    if pos >= limit {
        return Ok(Next::End);
    }
    if pos + HEADER_BYTES > limit {
        return Ok(Next::Corrupt);
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    if let Err(error) = reader.read_exact(&mut header) {
        return if error.kind() == io::ErrorKind::UnexpectedEof {
            Ok(Next::Corrupt)
        } else {
            Err(error)
        };
    }
    let (len, crc) = frame::parse_header(&header);
    if len > MAX_PAYLOAD_BYTES || pos + HEADER_BYTES + u64::from(len) > limit {
        return Ok(Next::Corrupt);
    }
    payload.clear();
    payload.resize(len as usize, 0);
    if let Err(error) = reader.read_exact(payload) {
        return if error.kind() == io::ErrorKind::UnexpectedEof {
            Ok(Next::Corrupt)
        } else {
            Err(error)
        };
    }
    Ok(match frame::decode(payload, crc) {
        Some(event) => Next::Frame {
            event,
            len: HEADER_BYTES + u64::from(len),
        },
        None => Next::Corrupt,
    })
}

/// Frames read for one `Append`.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<AuditEvent>,
    /// Offset after the last frame read.
    pub end: u64,
    /// Bytes of the frames read.
    pub bytes: u64,
    /// Reading stopped at a corrupt frame at `end`.
    pub corrupt: bool,
}

/// Reads frames of segment `path` from `offset`, up to `limit` (a frame
/// boundary), at most `max_events` and — past the first frame —
/// `max_bytes`.
pub fn read_batch(
    path: &Path,
    offset: u64,
    limit: u64,
    max_events: usize,
    max_bytes: u64,
) -> io::Result<Batch> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let capacity = (limit.saturating_sub(offset)).clamp(HEADER_BYTES, 1 << 20);
    let mut reader = BufReader::with_capacity(capacity as usize, file);
    let mut batch = Batch {
        end: offset,
        ..Batch::default()
    };
    let mut payload = Vec::new();
    while batch.events.len() < max_events {
        // Peek at the next frame's size first so that a batch never
        // exceeds max_bytes (unless it is a single frame).
        if !batch.events.is_empty() && batch.end + HEADER_BYTES <= limit {
            let buffered = reader.fill_buf_peek_len()?;
            if let Some(len) = buffered
                && batch.bytes + HEADER_BYTES + u64::from(len) > max_bytes
            {
                break;
            }
        }
        match next_frame(&mut reader, batch.end, limit, &mut payload)? {
            Next::Frame { event, len } => {
                batch.events.push(event);
                batch.end += len;
                batch.bytes += len;
            }
            Next::End => break,
            Next::Corrupt => {
                batch.corrupt = true;
                break;
            }
        }
    }
    Ok(batch)
}

/// Peeking at the length of the next frame without consuming it.
trait PeekLen {
    fn fill_buf_peek_len(&mut self) -> io::Result<Option<u32>>;
}

impl<R: Read> PeekLen for BufReader<R> {
    fn fill_buf_peek_len(&mut self) -> io::Result<Option<u32>> {
        use std::io::BufRead;
        let buffered = self.fill_buf()?;
        if buffered.len() < 4 {
            // Too little buffered to tell; the frame is read regardless
            // (the byte bound is a soft one).
            return Ok(None);
        }
        Ok(Some(u32::from_le_bytes([
            buffered[0],
            buffered[1],
            buffered[2],
            buffered[3],
        ])))
    }
}

/// What start-up found in the spool directory.
#[derive(Debug)]
pub struct Recovered {
    /// Every segment left, with its valid length and frame count.
    pub segments: BTreeMap<u64, SegInfo>,
    /// Where shipping resumes.
    pub ship_from: Pos,
    /// Frames of `ship_from.segment` before `ship_from.offset`.
    pub frames_before: u64,
    /// The index the writer's first new segment gets.
    pub next_segment: u64,
    /// The end of the last frame on disk.
    pub durable_end: Pos,
    pub unshipped_bytes: u64,
    pub unshipped_events: u64,
    /// Torn or corrupt frames found (each one cut off with what followed).
    pub torn_frames: u64,
}

/// Scans `dir`: removes fully shipped segments and a stale temporary
/// cursor, cuts each segment after its last valid frame, and finds where
/// shipping resumes.
pub fn recover(dir: &Path) -> Result<Recovered, Error> {
    let _ = fs::remove_file(dir.join(CURSOR_TEMP));
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).map_err(|source| io_error(dir, source))? {
        let entry = entry.map_err(|source| io_error(dir, source))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(index) = name.strip_suffix(SEGMENT_SUFFIX)
            && let Ok(index) = index.parse::<u64>()
        {
            indexes.push(index);
        }
    }
    indexes.sort_unstable();
    let cursor = read_cursor(dir);
    let mut removed = false;
    if let Some(cursor) = cursor {
        for index in indexes.iter().filter(|index| **index < cursor.segment) {
            let path = segment_path(dir, *index);
            fs::remove_file(&path).map_err(|source| io_error(&path, source))?;
            removed = true;
        }
        indexes.retain(|index| *index >= cursor.segment);
    }
    if removed {
        sync_dir(dir).map_err(|source| io_error(dir, source))?;
    }

    let mut recovered = Recovered {
        segments: BTreeMap::new(),
        ship_from: Pos::default(),
        frames_before: 0,
        next_segment: 0,
        durable_end: Pos::default(),
        unshipped_bytes: 0,
        unshipped_events: 0,
        torn_frames: 0,
    };
    let cursor = cursor.unwrap_or_default();
    let mut ship_from: Option<Pos> = None;
    for index in &indexes {
        let path = segment_path(dir, *index);
        let acked_to = (*index == cursor.segment).then_some(cursor.offset);
        let scan = scan_segment(&path, acked_to)?;
        if scan.torn {
            recovered.torn_frames += 1;
        }
        recovered.segments.insert(
            *index,
            SegInfo {
                len: scan.len,
                frames: scan.frames,
            },
        );
        let start = match ship_from {
            Some(_) => 0,
            None => {
                let pos = Pos {
                    segment: *index,
                    offset: scan.acked_boundary,
                };
                ship_from = Some(pos);
                recovered.frames_before = scan.acked_frames;
                pos.offset
            }
        };
        recovered.unshipped_bytes += scan.len - start;
        recovered.unshipped_events += if start == 0 {
            scan.frames
        } else {
            scan.frames - scan.acked_frames
        };
        recovered.durable_end = Pos {
            segment: *index,
            offset: scan.len,
        };
    }
    let last = indexes.last().copied();
    recovered.next_segment = match last {
        Some(last) => last.max(cursor.segment) + 1,
        None => cursor.segment + 1,
    };
    recovered.ship_from = ship_from.unwrap_or(Pos {
        segment: recovered.next_segment,
        offset: 0,
    });
    Ok(recovered)
}

struct Scan {
    /// Bytes of valid frames (the file is cut to this).
    len: u64,
    frames: u64,
    /// The last frame boundary at or before the cursor's offset, and the
    /// frames before it.
    acked_boundary: u64,
    acked_frames: u64,
    torn: bool,
}

fn scan_segment(path: &Path, acked_to: Option<u64>) -> Result<Scan, Error> {
    let file = File::open(path).map_err(|source| io_error(path, source))?;
    let file_len = file
        .metadata()
        .map_err(|source| io_error(path, source))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut scan = Scan {
        len: 0,
        frames: 0,
        acked_boundary: 0,
        acked_frames: 0,
        torn: false,
    };
    let acked_to = acked_to.unwrap_or(0);
    let mut payload = Vec::new();
    loop {
        match next_frame(&mut reader, scan.len, file_len, &mut payload)
            .map_err(|source| io_error(path, source))?
        {
            Next::Frame { len, .. } => {
                scan.len += len;
                scan.frames += 1;
                if scan.len <= acked_to {
                    scan.acked_boundary = scan.len;
                    scan.acked_frames = scan.frames;
                }
            }
            Next::End => break,
            Next::Corrupt => {
                scan.torn = true;
                break;
            }
        }
    }
    if scan.torn {
        tracing::warn!(
            path = %path.display(),
            valid_bytes = scan.len,
            cut_bytes = file_len - scan.len,
            "audit spool segment ends in a torn or corrupt frame; cutting it off"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| io_error(path, source))?;
        file.set_len(scan.len)
            .and_then(|()| file.sync_all())
            .map_err(|source| io_error(path, source))?;
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let pos = Pos {
            segment: 7,
            offset: 1234,
        };
        write_cursor(dir.path(), pos).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(read_cursor(dir.path()), Some(pos));
        assert_eq!(parse_cursor("7"), None);
        assert_eq!(parse_cursor("7 x"), None);
        assert_eq!(parse_cursor("1 2 3"), None);
        assert_eq!(
            parse_cursor(" 1 2\n"),
            Some(Pos {
                segment: 1,
                offset: 2
            })
        );
    }
}
