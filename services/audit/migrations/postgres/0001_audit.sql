-- Audit log schema (PostgreSQL). Keep in step with migrations/sqlite: the
-- same queries run on both. Times are Unix milliseconds; hashes are
-- lower-case hex SHA-256; signatures are raw Ed25519 bytes.
--
-- APPEND-ONLY. Triggers refuse every UPDATE (and TRUNCATE) on every table;
-- DELETE is refused everywhere except on audit_records rows that a
-- tombstone already covers, so retention can remove only whole ranges it
-- first recorded, signed, in audit_tombstones (in the same transaction).
-- No table has a row that ever changes: the chain's head is its last
-- record (or, when retention removed every record, the last tombstone).

CREATE TABLE audit_records (
    seq              BIGINT PRIMARY KEY CHECK (seq > 0),
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
    seq           BIGINT PRIMARY KEY CHECK (seq > 0),
    head_hash     TEXT NOT NULL,
    signed_at_ms  BIGINT NOT NULL,
    key_id        TEXT NOT NULL,
    signature     BYTEA NOT NULL
);

-- A signed statement that records first_seq..=last_seq were removed by
-- retention; last_hash is the hash of record last_seq.
CREATE TABLE audit_tombstones (
    first_seq      BIGINT PRIMARY KEY CHECK (first_seq > 0),
    last_seq       BIGINT NOT NULL UNIQUE CHECK (last_seq >= first_seq),
    last_hash      TEXT NOT NULL,
    removed_at_ms  BIGINT NOT NULL,
    key_id         TEXT NOT NULL,
    signature      BYTEA NOT NULL
);

-- One row, never changed: appenders lock it (SELECT ... FOR UPDATE) so
-- that two replicas on one database append one after the other and can
-- never fork the chain.
CREATE TABLE audit_append_lock (
    id  INTEGER PRIMARY KEY CHECK (id = 1)
);
INSERT INTO audit_append_lock (id) VALUES (1);

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE FUNCTION audit_records_guard_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM audit_tombstones t
        WHERE t.first_seq <= OLD.seq AND OLD.seq <= t.last_seq
    ) THEN
        RAISE EXCEPTION 'audit log is append-only: DELETE of record % refused (no tombstone covers it)', OLD.seq
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_records_guard_delete BEFORE DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_records_guard_delete();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_tombstones_no_update BEFORE UPDATE OR DELETE ON audit_tombstones
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_tombstones_no_truncate BEFORE TRUNCATE ON audit_tombstones
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

CREATE TRIGGER audit_append_lock_no_update BEFORE UPDATE OR DELETE ON audit_append_lock
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_append_lock_no_truncate BEFORE TRUNCATE ON audit_append_lock
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
