-- Placement: how a model's versions are spread over workers. Keep in step
-- with migrations/postgres.

-- The model's placement policy: mode `all` (every capable worker holds
-- every active version) or `weighted` (each version on workers of its
-- own, in proportion to its traffic, at least `placement_min_replicas`
-- per region), and who set it last.
ALTER TABLE models ADD COLUMN placement_mode TEXT NOT NULL DEFAULT 'all';
ALTER TABLE models ADD COLUMN placement_min_replicas BIGINT NOT NULL DEFAULT 1;
ALTER TABLE models ADD COLUMN placement_updated_by TEXT NOT NULL DEFAULT '';
ALTER TABLE models ADD COLUMN placement_updated_at BIGINT NOT NULL DEFAULT 0;

-- The assignment the registry computed for a `weighted` model: the workers
-- that should hold each version (`assigned`) and those that keep it until
-- its new holders have it ready (`releasing`, make-before-break), each
-- since when. Rewritten by the registry's planner; nothing else writes it.
CREATE TABLE placement_assignments (
    model      TEXT NOT NULL REFERENCES models(name),
    version    BIGINT NOT NULL,
    worker_id  TEXT NOT NULL,
    role       TEXT NOT NULL,
    since      BIGINT NOT NULL,
    PRIMARY KEY (model, version, worker_id)
);
