//! The audit log's format: events, records, the hash chain, signed checkpoints and tombstones, the export format and an offline verifier.
