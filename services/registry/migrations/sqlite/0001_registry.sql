-- Registry schema (SQLite). Keep in step with migrations/postgres: the same
-- queries run on both. Times are Unix milliseconds; JSON is stored as text.

CREATE TABLE models (
    name            TEXT PRIMARY KEY,
    description     TEXT NOT NULL DEFAULT '',
    created_by      TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    latest_version  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE artifacts (
    sha256      TEXT PRIMARY KEY,
    size_bytes  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE versions (
    model        TEXT NOT NULL REFERENCES models(name),
    version      BIGINT NOT NULL,
    sha256       TEXT NOT NULL REFERENCES artifacts(sha256),
    size_bytes   BIGINT NOT NULL,
    format       TEXT NOT NULL,
    signature    TEXT,
    metadata     TEXT NOT NULL,
    lineage      TEXT NOT NULL,
    lifecycle    TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (model, version)
);

CREATE TABLE aliases (
    model       TEXT NOT NULL REFERENCES models(name),
    alias       TEXT NOT NULL,
    version     BIGINT NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES versions(model, version)
);

CREATE TABLE rollouts (
    model       TEXT PRIMARY KEY REFERENCES models(name),
    revision    BIGINT NOT NULL,
    policy      TEXT NOT NULL
);

CREATE TABLE rollout_history (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    model     TEXT NOT NULL REFERENCES models(name),
    revision  BIGINT NOT NULL,
    action    TEXT NOT NULL,
    actor     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    at        BIGINT NOT NULL,
    policy    TEXT NOT NULL
);
CREATE INDEX rollout_history_model ON rollout_history (model, id);

CREATE TABLE workers (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    region      TEXT NOT NULL,
    formats     TEXT NOT NULL,
    device      TEXT NOT NULL,
    last_seen   BIGINT NOT NULL
);

CREATE TABLE placements (
    worker_id   TEXT NOT NULL REFERENCES workers(id),
    model       TEXT NOT NULL,
    version     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (worker_id, model, version),
    FOREIGN KEY (model, version) REFERENCES versions(model, version)
);

-- Change log behind Watch: one row per change of a model's routed state.
CREATE TABLE changes (
    revision  INTEGER PRIMARY KEY AUTOINCREMENT,
    model     TEXT NOT NULL,
    at        BIGINT NOT NULL
);
