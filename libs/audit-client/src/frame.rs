//! One spooled event: `u32` length (little-endian) of the payload, `u32`
//! CRC-32 (IEEE, little-endian) of the payload, then the payload: the
//! prost encoding of the `AuditEvent`.

use shamal_proto::prost::Message;
use shamal_proto::shamal::audit::v1::AuditEvent;

/// Length + CRC.
pub const HEADER_BYTES: u64 = 8;

/// A length above this is taken for corruption (no event is this large).
pub const MAX_PAYLOAD_BYTES: u32 = 64 * 1024 * 1024;

/// Bytes `event` takes in the spool.
pub fn frame_len(event: &AuditEvent) -> u64 {
    HEADER_BYTES + event.encoded_len() as u64
}

/// Appends `event`'s frame to `buf`; returns the frame's length.
pub fn encode(event: &AuditEvent, buf: &mut Vec<u8>) -> u64 {
    let start = buf.len();
    let len = event.encoded_len();
    buf.extend_from_slice(&[0; HEADER_BYTES as usize]);
    buf.reserve(len);
    // Cannot fail: the buffer grows as needed.
    let _ = event.encode(buf);
    let payload = &buf[start + HEADER_BYTES as usize..];
    let crc = crc32fast::hash(payload);
    let len_bytes = (payload.len() as u32).to_le_bytes();
    buf[start..start + 4].copy_from_slice(&len_bytes);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    (buf.len() - start) as u64
}

/// A frame header: payload length and CRC.
pub fn parse_header(header: &[u8; HEADER_BYTES as usize]) -> (u32, u32) {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (len, crc)
}

/// The event of a payload whose CRC is `crc`, or `None` when the payload
/// is corrupt.
pub fn decode(payload: &[u8], crc: u32) -> Option<AuditEvent> {
    if crc32fast::hash(payload) != crc {
        return None;
    }
    AuditEvent::decode(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_detect_corruption() {
        let event = AuditEvent {
            event_id: "e1".into(),
            action: "inference".into(),
            latency_us: 42,
            ..Default::default()
        };
        let mut buf = Vec::new();
        let len = encode(&event, &mut buf);
        assert_eq!(len, frame_len(&event));
        assert_eq!(buf.len() as u64, len);
        let mut header = [0u8; 8];
        header.copy_from_slice(&buf[..8]);
        let (payload_len, crc) = parse_header(&header);
        assert_eq!(payload_len as u64 + HEADER_BYTES, len);
        assert_eq!(decode(&buf[8..], crc), Some(event));
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        assert_eq!(decode(&buf[8..], crc), None);
    }
}
