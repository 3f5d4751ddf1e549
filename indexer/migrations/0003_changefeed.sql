-- The change feed: one row per create/update/delete of an instance, append-only.
--
-- Exactly-once reading needs sequences that become visible in order. A PostgreSQL sequence hands numbers out
-- before commit, so a reader could see 11 before 10 commits and skip 10 for ever. Instead the writer takes
-- the next numbers from the single changefeed_counter row as the last statement of its transaction: the row
-- lock is held until commit, so a transaction that gets N+1 starts only after the one that got N committed
-- (and became visible: PostgreSQL releases locks after it marks the transaction committed). Sequences are
-- therefore dense (no gaps: a rollback returns its numbers with the lock) and visible in order, and a reader
-- that asks for "everything after my last sequence" never misses or repeats an entry.
-- The counter also keeps the last timestamp so that timestamps never go backwards along the sequence (a
-- clock step would otherwise break time-window reads).
CREATE TABLE changefeed_counter (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_sequence bigint NOT NULL,
    last_timestamp timestamptz NOT NULL
);
INSERT INTO changefeed_counter VALUES (true, 0, '-infinity');

CREATE TABLE changefeed (
    sequence bigint PRIMARY KEY,
    partition_key integer NOT NULL REFERENCES partition,
    study_instance_uid text COLLATE "C" NOT NULL,
    series_instance_uid text COLLATE "C" NOT NULL,
    sop_instance_uid text COLLATE "C" NOT NULL,
    -- the version of the instance the entry is about; no foreign key: the row goes away on delete, and the
    -- entry's state (current, replaced, deleted) is derived from whether that version is still indexed
    instance_key bigint NOT NULL,
    action smallint NOT NULL CHECK (action IN (0, 1, 2)),  -- create, update, delete
    "timestamp" timestamptz NOT NULL
);
CREATE INDEX changefeed_timestamp ON changefeed ("timestamp");
CREATE INDEX changefeed_partition_sequence ON changefeed (partition_key, sequence);
-- state lookups for entries whose version is gone: is the SOP instance indexed under another version?
-- (instance already has UNIQUE (partition_key, sop_instance_uid))
