-- Integrity (archive/scrub.py, docs/integrity.md): what a scrub found wrong with the stored objects.
--
-- * One row per object and scrub operation: missing (indexed, not in the store), altered (its SHA-256 is
--   not the one recorded at ingest) or unreferenced (in the store, older than the grace period, and neither
--   indexed nor queued for deletion). The unique key makes a step that is replayed after a crash find the
--   same problems without recording them twice.
-- * Rows go with their operation; the report route reads them by operation, in the order they were found.

CREATE TABLE scrub_finding (
    finding_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_id uuid NOT NULL REFERENCES operation ON DELETE CASCADE,
    kind text COLLATE "C" NOT NULL CHECK (kind IN ('missing', 'altered', 'unreferenced')),
    storage_key text COLLATE "C" NOT NULL,
    partition_key integer,
    study_instance_uid text,
    series_instance_uid text,
    sop_instance_uid text,
    recorded_sha256 bytea,        -- what ingest recorded (missing, altered)
    found_sha256 bytea,           -- what the object hashes to now (altered)
    size bigint,                  -- bytes found in the store (altered, unreferenced)
    found_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (operation_id, storage_key)
);
-- the schedule and the metrics: the latest scrub
CREATE INDEX operation_type_created ON operation (type, created_at);

-- Tamper evidence for the audit log (access/audit_chain.py): SHA-256 over the previous record's hash and
-- this record's content. Records written before this migration have none; the chain starts after them.
ALTER TABLE audit_event ADD COLUMN chain_hash bytea;
