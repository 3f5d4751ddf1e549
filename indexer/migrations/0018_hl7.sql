-- HL7 v2 messages received over MLLP (hl7/): every message as it arrived, with what came of it.
--
-- * Append-only (the access_append_only trigger of migration 0009): a message is never rewritten. A replay
--   of a failed message is a new row whose replay_of names the original, with its own outcome.
-- * raw is the message as received, MLLP framing removed, in the sender's character set; replaying it runs
--   exactly what ran the first time.
-- * The row of a message that changed something (AA) commits in the same transaction as the change (the
--   bulk update operation, the work item); a refused message (AE, AR) has a row and nothing else.
-- * result holds what the message did: the operations it queued, the work items it created or canceled.

CREATE TABLE hl7_message (
    message_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    peer text,                               -- address the message came from; 'replay' for replays
    sending_application text,                -- MSH-3 (namespace ID), when the header could be read
    sending_facility text,                   -- MSH-4
    control_id text,                         -- MSH-10
    message_type text,                       -- MSH-9 as 'ADT^A08'
    partition_name text,
    raw bytea NOT NULL,
    ack_code text NOT NULL CHECK (ack_code IN ('AA', 'AE', 'AR')),
    error_code integer,                      -- HL7 table 0357 (101 required field missing, 200, 207, ...)
    detail text,                             -- why a message was refused; what a message that was accepted did
    result jsonb NOT NULL DEFAULT '{}',
    replay_of bigint REFERENCES hl7_message
);
CREATE INDEX hl7_message_received ON hl7_message (received_at);
CREATE INDEX hl7_message_failed ON hl7_message (message_id) WHERE ack_code <> 'AA';

CREATE TRIGGER hl7_message_append_only BEFORE UPDATE OR DELETE ON hl7_message
    FOR EACH ROW EXECUTE FUNCTION access_append_only();
CREATE TRIGGER hl7_message_no_truncate BEFORE TRUNCATE ON hl7_message
    FOR EACH STATEMENT EXECUTE FUNCTION access_append_only();
