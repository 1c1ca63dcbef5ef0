-- Batch jobs and their shards. Append-mostly: a job row is inserted at
-- submit and updated only on its state transitions; its progress is
-- derived from its shards' rows.
CREATE TABLE batch_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    spec_json TEXT NOT NULL,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    regions_json TEXT NOT NULL,
    stream_region TEXT NOT NULL,
    tenant TEXT NOT NULL,
    actor TEXT NOT NULL,
    state TEXT NOT NULL,
    total_rows BIGINT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    manifest TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL DEFAULT 0,
    finished_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX batch_jobs_state ON batch_jobs (state, seq);
CREATE INDEX batch_jobs_model ON batch_jobs (model, seq);

CREATE TABLE batch_shards (
    job_id TEXT NOT NULL REFERENCES batch_jobs (id),
    shard_index BIGINT NOT NULL,
    shard_json TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    failures BIGINT NOT NULL DEFAULT 0,
    queue_id TEXT NOT NULL DEFAULT '',
    planned_rows BIGINT NOT NULL,
    rows_done BIGINT NOT NULL DEFAULT 0,
    part TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL DEFAULT '',
    bytes BIGINT NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    region TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    queued_at_ms BIGINT NOT NULL DEFAULT 0,
    finished_at_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, shard_index)
);
