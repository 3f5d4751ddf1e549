-- Bulk update (POST /studies/$bulkUpdate, archive/update.py): the original version of updated instances.
--
-- An update writes each instance as a new object under a new key and indexes it as a new instance row (a
-- new instance_key, so the change feed's earlier entries of the instance read as `replaced`). The version
-- the instance had before its first update is kept, as Azure keeps it, and served to WADO-RS requests with
-- `msdicom-request-original: true`. Later updates keep that first version and queue the intermediate one's
-- object for deletion. A DELETE of the instance removes the row here and queues its object too.
--
-- Keyed by SOP Instance UID within the partition, not by instance_key: the key changes with every version.
-- storage_key is UNIQUE, which is also the index the orphan sweeper's "is this object referenced" needs.
CREATE TABLE instance_original (
    partition_key integer NOT NULL REFERENCES partition,
    sop_instance_uid text COLLATE "C" NOT NULL,
    transfer_syntax_uid text COLLATE "C" NOT NULL,
    storage_key text COLLATE "C" NOT NULL UNIQUE,
    size bigint NOT NULL,
    sha256 bytea NOT NULL,
    metadata bytea NOT NULL,
    bulk_index bytea NOT NULL,
    created_at timestamptz NOT NULL,  -- when the original was stored
    PRIMARY KEY (partition_key, sop_instance_uid)
);
