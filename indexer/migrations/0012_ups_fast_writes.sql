-- UPS-RS state changes and updates of work items nobody subscribes to, in one statement (worklist.store).
--
-- * ups_unsubscribed(key) is called in the RETURNING list of that optimistic UPDATE. RETURNING runs after the
--   row was written, so the statement holds the row lock. The function is VOLATILE, and in READ COMMITTED
--   a volatile function takes a fresh snapshot for each of its queries (PostgreSQL manual, "Function
--   Volatility Categories"): it therefore sees every subscription committed before the lock was granted,
--   including one whose transaction held the row lock while this UPDATE waited. Subscribing locks the row
--   first, so any later subscription waits for our commit. When the item has a subscriber the function raises
--   UPS01, the statement (and its implicit transaction) is rolled back, and the caller takes the locked path
--   that queues the events.
-- * lz4 instead of pglz for the two copies of the data set: every write re-compresses both (rows of ~3 kB
--   exceed the 2 kB TOAST threshold), and lz4 costs a fraction of pglz's CPU. Values written before keep
--   pglz until rewritten; both decompress transparently. Skipped where the server was built without lz4.
-- * fillfactor 80: an update that changes no indexed column (Update Workitem, e.g. the performed procedure)
--   can then stay on its page as a HOT update, without a new entry in each of the table's nine indexes.

CREATE FUNCTION ups_unsubscribed(item bigint) RETURNS boolean VOLATILE LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM ups_subscription WHERE workitem_key = item) THEN
        RAISE EXCEPTION 'work item % has subscribers', item USING ERRCODE = 'UPS01';
    END IF;
    RETURN true;
END
$$;

ALTER TABLE ups_workitem SET (fillfactor = 80);

DO $$
BEGIN
    ALTER TABLE ups_workitem ALTER COLUMN attrs SET COMPRESSION lz4, ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available: work items keep pglz compression';
END
$$;
