-- Storage Commitment reports still owed to peers (dimse/commitment_queue.py, docs/dimse.md).
--
-- A row is written, and committed, before the N-ACTION is answered with Success, so a request the
-- archive accepted is never forgotten: the N-EVENT-REPORT is built from the index when it is sent, and the
-- row is deleted once the peer has answered it (or once it expires). Any process on the database may send
-- it: a process claims a due row by moving next_attempt_at past the attempt's longest duration (the
-- claim's token guards its later writes), so two processes never send one report at once, and the report
-- of a process that dies is due again once the claim runs out.
--
-- * peer_address: where the request came from, the address to connect to when the AE's registration is a
--   network or '*'. The AE's port and host are read from dimse_ae when the report is sent.
-- * refs: [[SOP Class UID, SOP Instance UID], ...] in the request's order.
-- * (Separate number 0030: the migrations numbered after 0020 may come from other branches.)

CREATE TABLE dimse_commitment (
    commitment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_uid text NOT NULL,
    ae_title text COLLATE "C" NOT NULL,
    partition_name text NOT NULL,
    peer_address text NOT NULL,
    refs jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    claim uuid,
    attempts integer NOT NULL DEFAULT 0,
    last_error text
);

CREATE INDEX dimse_commitment_due ON dimse_commitment (next_attempt_at);
CREATE INDEX dimse_commitment_expiry ON dimse_commitment (expires_at);
