-- UPS-RS: the searchable state of work items in a narrow table of its own, so that a state change is cheap.
--
-- * Before, `state` was a key of two of ups_workitem's nine indexes (the station search and the state/start
--   index) and in the predicate of a third. A state change (two a claim/complete cycle) could therefore never
--   be a HOT update: each new version of the wide row (~3 kB, TOASTed data set) went into all nine indexes.
-- * ups_queue mirrors what the state searches need: partition, state, station, scheduled start, key (and the
--   station code values of the few items that do not name exactly one station). The indexes that contain
--   `state` move here. ups_workitem keeps its `state` column (the authoritative value, read by the UPS-RS
--   transactions and by matching) but no index on it, so its state changes are HOT; the state change then
--   rewrites only the narrow ups_queue row and its three btree entries.
-- * Triggers keep the mirror: every writer (the archive, SQL maintenance, the benches) goes through them, in
--   the writer's own statement and transaction, so ups_queue is always exactly ups_workitem's state. The
--   row trigger fires only when one of the mirrored columns changes, so Update Workitem (HOT) leaves
--   ups_queue alone. Writers lock the work item row before its ups_queue row, always in that order.
-- * Backfill: existing items are copied under a lock that keeps writers out until commit.

LOCK TABLE ups_workitem IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE ups_queue (
    workitem_key bigint PRIMARY KEY REFERENCES ups_workitem ON DELETE CASCADE,
    partition_key integer NOT NULL,
    state smallint NOT NULL,
    station text COLLATE "C",
    scheduled_start timestamp,
    station_names text[] COLLATE "C"  -- ups_workitem.station_names when station is NULL, else NULL
);

CREATE FUNCTION ups_queue_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ups_queue (workitem_key, partition_key, state, station, scheduled_start, station_names)
        VALUES (NEW.workitem_key, NEW.partition_key, NEW.state, NEW.station, NEW.scheduled_start,
                CASE WHEN NEW.station IS NULL THEN NEW.station_names END);
    ELSE
        UPDATE ups_queue SET state = NEW.state, station = NEW.station, scheduled_start = NEW.scheduled_start,
                             station_names = CASE WHEN NEW.station IS NULL THEN NEW.station_names END
        WHERE workitem_key = NEW.workitem_key;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER ups_queue_insert AFTER INSERT ON ups_workitem FOR EACH ROW EXECUTE FUNCTION ups_queue_sync();
CREATE TRIGGER ups_queue_update AFTER UPDATE OF state, station, station_names, scheduled_start ON ups_workitem
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.station IS DISTINCT FROM NEW.station
          OR OLD.station_names IS DISTINCT FROM NEW.station_names
          OR OLD.scheduled_start IS DISTINCT FROM NEW.scheduled_start)
    EXECUTE FUNCTION ups_queue_sync();

INSERT INTO ups_queue (workitem_key, partition_key, state, station, scheduled_start, station_names)
SELECT workitem_key, partition_key, state, station, scheduled_start,
       CASE WHEN station IS NULL THEN station_names END
FROM ups_workitem;

-- the same three indexes as on ups_workitem before (migration 0008), on the narrow rows
CREATE INDEX ups_queue_one_station ON ups_queue (partition_key, state, station, scheduled_start, workitem_key);
CREATE INDEX ups_queue_live_stations ON ups_queue USING gin (station_names)
    WHERE state IN (0, 1) AND station IS NULL;
CREATE INDEX ups_queue_state_start ON ups_queue (partition_key, state, scheduled_start, workitem_key);

DROP INDEX ups_workitem_one_station;
DROP INDEX ups_workitem_live_stations;
DROP INDEX ups_workitem_state_start;

ANALYZE ups_queue;
