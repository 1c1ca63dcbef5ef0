//! Audit service: the append-only, hash-chained audit log with signed checkpoints (gRPC Append, Query, Export, Verify).
