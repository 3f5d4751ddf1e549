-- UPS-RS event queue bound (worklist.retention): a subscriber that never acknowledges must not make its queue
-- grow without end. Unacknowledged events beyond a count per subscriber, or older than a retention, are
-- dropped by a periodic prune; dropped_sequence records the highest sequence so dropped, so that a subscriber
-- reconnecting from an older cursor is told which events it will never get (dicomweb/routes/ws.py).
ALTER TABLE ups_subscriber ADD COLUMN dropped_sequence bigint NOT NULL DEFAULT 0;

-- SCP Status Change events (worklist.scp_status): whether the last thing reported to subscribers was GOING DOWN.
-- A process that starts while the last one is still reporting GOING DOWN is no "first" process by the lock
-- protocol, so this row is what makes it report RESTARTED after all. One row.
CREATE TABLE ups_scp_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    down boolean NOT NULL DEFAULT false
);
INSERT INTO ups_scp_state DEFAULT VALUES;
