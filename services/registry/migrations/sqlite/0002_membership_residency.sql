-- Membership (worker capacity and state, heartbeats), data residency
-- (per-model allowed regions, per-tenant policies) and a typed change log.
-- Keep in step with migrations/postgres.

-- Worker state: serving | draining | lost | gone. `last_seen` is the last
-- heartbeat persisted (at most every few seconds; the registry keeps the
-- live figure in memory).
ALTER TABLE workers ADD COLUMN capacity BIGINT NOT NULL DEFAULT 1;
ALTER TABLE workers ADD COLUMN state TEXT NOT NULL DEFAULT 'serving';
ALTER TABLE workers ADD COLUMN state_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN state_changed_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN registered_at BIGINT NOT NULL DEFAULT 0;

-- Regions a model's requests may be processed in (JSON array; empty: no
-- model-level restriction), and who set them last.
ALTER TABLE models ADD COLUMN allowed_regions TEXT NOT NULL DEFAULT '[]';
ALTER TABLE models ADD COLUMN residency_updated_by TEXT NOT NULL DEFAULT '';
ALTER TABLE models ADD COLUMN residency_updated_at BIGINT NOT NULL DEFAULT 0;

-- Regions a tenant's requests may be processed in (JSON array, never empty).
CREATE TABLE tenant_policies (
    tenant           TEXT PRIMARY KEY,
    allowed_regions  TEXT NOT NULL,
    updated_by       TEXT NOT NULL,
    updated_at       BIGINT NOT NULL
);

-- Every residency change: scope `model` or `tenant`, the subject (model or
-- tenant name), the regions after the change (NULL: tenant policy deleted).
CREATE TABLE residency_history (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    scope            TEXT NOT NULL,
    subject          TEXT NOT NULL,
    allowed_regions  TEXT,
    actor            TEXT NOT NULL,
    at               BIGINT NOT NULL
);

-- What a change is about: `model` (the `model` column names it), `worker`
-- (the `model` column holds the worker id) or `tenants` (the tenant
-- policies; `model` is the tenant).
ALTER TABLE changes ADD COLUMN kind TEXT NOT NULL DEFAULT 'model';
