-- Retention and expiry (retention/, docs/retention.md): per-partition policies, legal holds on studies, and
-- the objects of deleted instances kept for a restore window.
--
-- * A partition without a retention_policy row has no minimum, no expiry and no delay (deletion at once).
-- * A legal hold names a study by UID, not by study_key: the study row goes when its last instance goes
--   (indexer.writes.refresh_counters), while a hold must outlive it (a study in its restore window).
-- * deleted_object: with a delete delay, a DELETE removes the index rows through the normal path (change feed
--   entries, counters) but keeps each object and the columns needed to index it again here, instead of in
--   blob_deletion. A restore indexes them again; once purge_after has passed the sweep moves the keys to
--   blob_deletion. The orphan sweep, the scrub and backups count these objects as referenced.

CREATE TABLE retention_policy (
    partition_key integer PRIMARY KEY REFERENCES partition,
    minimum_retention_days integer CHECK (minimum_retention_days > 0),
    expire_after_days integer CHECK (expire_after_days > 0),
    delete_delay_days integer NOT NULL DEFAULT 0 CHECK (delete_delay_days >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (expire_after_days IS NULL OR minimum_retention_days IS NULL
           OR expire_after_days >= minimum_retention_days)
);

CREATE TABLE legal_hold (
    partition_key integer NOT NULL REFERENCES partition,
    study_instance_uid text COLLATE "C" NOT NULL,
    held_since timestamptz NOT NULL,
    held_by text NOT NULL,
    reason text,
    PRIMARY KEY (partition_key, study_instance_uid)
);

CREATE TABLE deleted_object (
    storage_key text COLLATE "C" PRIMARY KEY,
    partition_key integer NOT NULL REFERENCES partition,
    study_instance_uid text COLLATE "C" NOT NULL,
    series_instance_uid text COLLATE "C" NOT NULL,
    sop_instance_uid text COLLATE "C" NOT NULL,
    -- the instance's first version kept by a bulk update (instance_original), not its current version
    original boolean NOT NULL,
    sop_class_uid text COLLATE "C" NOT NULL,
    transfer_syntax_uid text COLLATE "C" NOT NULL,
    size bigint NOT NULL,
    sha256 bytea NOT NULL,
    metadata bytea NOT NULL,
    bulk_index bytea NOT NULL,
    created_at timestamptz NOT NULL,        -- when this version was stored
    study_created_at timestamptz NOT NULL,  -- the study's first ingest, given back on restore
    deleted_at timestamptz NOT NULL,
    purge_after timestamptz NOT NULL
);
CREATE INDEX deleted_object_study ON deleted_object (partition_key, study_instance_uid);
CREATE INDEX deleted_object_purge ON deleted_object (purge_after);
-- expiry finds studies by first ingest time
CREATE INDEX study_created ON study (partition_key, created_at);
