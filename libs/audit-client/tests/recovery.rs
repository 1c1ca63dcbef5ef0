//! A torn or corrupt spool: what precedes the damage is shipped, the
//! damaged frame is counted, and shipping goes on.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::{
    FakeAudit, assert_log_is, config, event, eventually, free_addr, ids, segments, start,
};

const DRAIN: Duration = Duration::from_secs(30);

enum Damage {
    /// The last frame cut short (a crash mid-write).
    Truncate,
    /// Bytes after the last frame (a header without its payload).
    Garbage,
    /// A flipped bit in the last frame's payload.
    FlipLastByte,
}

/// Spools 50 events with the service down, stops, damages the last segment
/// as told, restarts with the service up and returns the ids logged and
/// the frames counted as recovered.
async fn spool_damage_and_restart(
    damage: Damage,
    service: &str,
) -> (Vec<String>, Vec<String>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut cfg = config(dir.path(), addr);
    cfg.segment_bytes = 1024 * 1024;
    let first = start(cfg.clone(), service);
    let recorded = ids(service, 50);
    for id in &recorded {
        first.record(event(id)).unwrap();
    }
    first.shutdown().await;

    let segs = segments(dir.path());
    assert_eq!(segs.len(), 1, "{segs:?}");
    let ends = frame_ends(&std::fs::read(&segs[0]).unwrap());
    assert_eq!(ends.len(), 50);
    let cut_to = match damage {
        Damage::Garbage => ends[49],
        Damage::Truncate | Damage::FlipLastByte => ends[48],
    };
    damage_segment(&segs[0], damage);

    let fake = FakeAudit::default();
    let serving = fake.serve(addr).await;
    let second = start(cfg, service);
    let recovered = second.stats().recovered_frames;
    assert_eq!(
        std::fs::metadata(&segs[0]).unwrap().len(),
        cut_to as u64,
        "the segment is cut after its last whole frame"
    );
    second.drain(DRAIN).await.unwrap();
    let logged = fake.log_ids();
    assert_eq!(second.stats().spool_events, 0);
    second.shutdown().await;
    serving.stop().await;
    (recorded, logged, recovered)
}

/// Where each frame of a segment ends.
fn frame_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut offset = 0;
    while offset + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        offset += 8 + len;
        ends.push(offset);
    }
    assert_eq!(offset, bytes.len());
    ends
}

fn damage_segment(path: &Path, damage: Damage) {
    let len = std::fs::metadata(path).unwrap().len();
    let file = OpenOptions::new().write(true).open(path).unwrap();
    match damage {
        Damage::Truncate => file.set_len(len - 5).unwrap(),
        Damage::Garbage => {
            let mut file = OpenOptions::new().append(true).open(path).unwrap();
            // A plausible length (40) and CRC, then too few bytes.
            file.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]).unwrap();
        }
        Damage::FlipLastByte => {
            let mut bytes = std::fs::read(path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x01;
            std::fs::write(path, bytes).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_last_frame_is_cut_and_counted() {
    let (recorded, logged, recovered) = spool_damage_and_restart(Damage::Truncate, "torn").await;
    assert_eq!(recovered, 1);
    assert_eq!(logged, recorded[..49], "every frame before the torn one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_last_frame_is_cut_and_counted() {
    let (recorded, logged, recovered) = spool_damage_and_restart(Damage::Garbage, "garbage").await;
    assert_eq!(recovered, 1);
    assert_eq!(logged, recorded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_failing_its_crc_is_cut_and_counted() {
    let (recorded, logged, recovered) = spool_damage_and_restart(Damage::FlipLastByte, "crc").await;
    assert_eq!(recovered, 1);
    assert_eq!(logged, recorded[..49]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_frame_met_while_shipping_skips_the_rest_of_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let fake = FakeAudit::default();
    fake.set_down(true);
    let serving = fake.serve(addr).await;
    let mut cfg = config(dir.path(), addr);
    cfg.segment_bytes = 1024 * 1024;
    cfg.batch_size = 5;
    let auditor = start(cfg, "bitrot");
    let recorded = ids("bitrot", 50);
    for id in &recorded {
        auditor.record(event(id)).unwrap();
    }
    auditor.flush().await;
    eventually("a failed Append", || auditor.stats().ship_failures > 0).await;

    // Flip a byte inside frame 20's payload: the shipper holds frames 0..5
    // in memory, the rest it reads later.
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 1);
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mut offset = 0;
    for _ in 0..20 {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        offset += 8 + len;
    }
    bytes[offset + 12] ^= 0xff;
    std::fs::write(&segs[0], bytes).unwrap();

    fake.set_down(false);
    eventually("the corrupt frame to be met", || {
        auditor.stats().recovered_frames == 1
    })
    .await;
    // The writer leaves the damaged segment for the next events, and the
    // shipper skips what followed the damage.
    let after = ids("after", 10);
    for id in &after {
        auditor.record(event(id)).unwrap();
    }
    auditor.drain(DRAIN).await.unwrap();
    let expected: Vec<String> = [recorded[..20].to_vec(), after].concat();
    assert_log_is(&fake, &expected);
    let stats = auditor.stats();
    assert_eq!((stats.spool_events, stats.spool_bytes), (0, 0), "{stats:?}");
    assert_eq!(stats.recovered_frames, 1);
    assert_eq!(segments(dir.path()).len(), 1, "the damaged segment is gone");
    auditor.shutdown().await;
    serving.stop().await;
}
