-- Model access: a model limited to listed tenants or groups (from the
-- caller's token). Keep in step with migrations/postgres.

-- JSON arrays; both empty: every caller with the right role may call it.
ALTER TABLE models ADD COLUMN allowed_tenants TEXT NOT NULL DEFAULT '[]';
ALTER TABLE models ADD COLUMN allowed_groups TEXT NOT NULL DEFAULT '[]';
ALTER TABLE models ADD COLUMN access_updated_by TEXT NOT NULL DEFAULT '';
ALTER TABLE models ADD COLUMN access_updated_at BIGINT NOT NULL DEFAULT 0;

-- Every change of a model's access limit: the lists after the change.
CREATE TABLE access_history (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    model            TEXT NOT NULL,
    allowed_tenants  TEXT NOT NULL,
    allowed_groups   TEXT NOT NULL,
    actor            TEXT NOT NULL,
    at               BIGINT NOT NULL
);
