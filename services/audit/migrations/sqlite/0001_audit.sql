-- Audit log schema (SQLite). Keep in step with migrations/postgres: the
-- same queries run on both. Times are Unix milliseconds; hashes are
-- lower-case hex SHA-256; signatures are raw Ed25519 bytes.
--
-- APPEND-ONLY. Triggers refuse every UPDATE on every table; DELETE is
-- refused everywhere except on audit_records rows that a tombstone already
-- covers, so retention can remove only whole ranges it first recorded,
-- signed, in audit_tombstones (in the same transaction). No table has a
-- row that ever changes: the chain's head is its last record (or, when
-- retention removed every record, the last tombstone).

CREATE TABLE audit_records (
    seq              INTEGER PRIMARY KEY CHECK (seq > 0),
    event_id         TEXT NOT NULL UNIQUE,
    recorded_at_ms   BIGINT NOT NULL,
    occurred_at_ms   BIGINT NOT NULL,
    service          TEXT NOT NULL,
    instance         TEXT NOT NULL,
    action           TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    actor            TEXT NOT NULL,
    client_id        TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    model            TEXT NOT NULL,
    version          TEXT NOT NULL,
    region           TEXT NOT NULL,
    worker           TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    -- u64 stored bit for bit (values above i64::MAX read back negative).
    latency_us       BIGINT NOT NULL,
    request_sha256   TEXT NOT NULL,
    response_sha256  TEXT NOT NULL,
    before_json      TEXT NOT NULL,
    after_json       TEXT NOT NULL,
    reason           TEXT NOT NULL,
    prev_hash        TEXT NOT NULL,
    hash             TEXT NOT NULL
);
-- Query's filters, each then paged by seq.
CREATE INDEX audit_records_model ON audit_records (model, occurred_at_ms, seq);
CREATE INDEX audit_records_actor ON audit_records (actor, occurred_at_ms, seq);
CREATE INDEX audit_records_tenant ON audit_records (tenant, occurred_at_ms, seq);
CREATE INDEX audit_records_occurred ON audit_records (occurred_at_ms, seq);
-- Export's bounds (recorded_at_ms never decreases along seq).
CREATE INDEX audit_records_recorded ON audit_records (recorded_at_ms, seq);

-- A signed statement that the chain up to seq ends in head_hash.
CREATE TABLE audit_checkpoints (
    seq           INTEGER PRIMARY KEY CHECK (seq > 0),
    head_hash     TEXT NOT NULL,
    signed_at_ms  BIGINT NOT NULL,
    key_id        TEXT NOT NULL,
    signature     BLOB NOT NULL
);

-- A signed statement that records first_seq..=last_seq were removed by
-- retention; last_hash is the hash of record last_seq.
CREATE TABLE audit_tombstones (
    first_seq      INTEGER PRIMARY KEY CHECK (first_seq > 0),
    last_seq       BIGINT NOT NULL UNIQUE CHECK (last_seq >= first_seq),
    last_hash      TEXT NOT NULL,
    removed_at_ms  BIGINT NOT NULL,
    key_id         TEXT NOT NULL,
    signature      BLOB NOT NULL
);

-- One row, never changed (Postgres's appenders lock it; SQLite's take the
-- database's write lock first, see store.rs).
CREATE TABLE audit_append_lock (
    id  INTEGER PRIMARY KEY CHECK (id = 1)
);
INSERT INTO audit_append_lock (id) VALUES (1);

CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: UPDATE on audit_records refused');
END;
CREATE TRIGGER audit_records_guard_delete BEFORE DELETE ON audit_records
WHEN NOT EXISTS (
    SELECT 1 FROM audit_tombstones t
    WHERE t.first_seq <= OLD.seq AND OLD.seq <= t.last_seq
)
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: DELETE on audit_records refused (no tombstone covers the record)');
END;

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: UPDATE on audit_checkpoints refused');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: DELETE on audit_checkpoints refused');
END;

CREATE TRIGGER audit_tombstones_no_update BEFORE UPDATE ON audit_tombstones
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: UPDATE on audit_tombstones refused');
END;
CREATE TRIGGER audit_tombstones_no_delete BEFORE DELETE ON audit_tombstones
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: DELETE on audit_tombstones refused');
END;

CREATE TRIGGER audit_append_lock_no_update BEFORE UPDATE ON audit_append_lock
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: UPDATE on audit_append_lock refused');
END;
CREATE TRIGGER audit_append_lock_no_delete BEFORE DELETE ON audit_append_lock
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: DELETE on audit_append_lock refused');
END;
