-- Batch jobs and their shards. Append-mostly: a job row is inserted at
-- submit and updated only on its state transitions; its progress is
-- derived from its shards' rows.
CREATE TABLE batch_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    spec_json TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    regions_json TEXT NOT NULL,
    stream_region TEXT NOT NULL,
    tenant TEXT NOT NULL,
    actor TEXT NOT NULL,
    state TEXT NOT NULL,
    total_rows INTEGER NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    manifest TEXT NOT NULL DEFAULT '',
    created_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL DEFAULT 0,
    finished_at_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batch_jobs_state ON batch_jobs (state, seq);
CREATE INDEX batch_jobs_model ON batch_jobs (model, seq);

CREATE TABLE batch_shards (
    job_id TEXT NOT NULL REFERENCES batch_jobs (id),
    shard_index INTEGER NOT NULL,
    shard_json TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    queue_id TEXT NOT NULL DEFAULT '',
    planned_rows INTEGER NOT NULL,
    rows_done INTEGER NOT NULL DEFAULT 0,
    part TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL DEFAULT '',
    bytes INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    region TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    queued_at_ms INTEGER NOT NULL DEFAULT 0,
    finished_at_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, shard_index)
);
