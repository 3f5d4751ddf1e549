-- Background operations (re-index of extended query tags; later exports): rows that any dicomweb process
-- can claim, so that long work survives a crash or restart of the process running it.
--
-- * A worker claims a row with FOR UPDATE SKIP LOCKED and takes a lease: lease_token names this claim,
--   leased_until bounds it. Each step of the work commits together with the advanced checkpoint and a
--   renewed lease, in a transaction that first re-locks the row and checks that the lease token is still
--   its own. A worker whose lease expired and was taken over therefore cannot commit anything more, so an
--   operation never runs twice at once, and a successor resumes exactly where the last commit left off.
-- * checkpoint is the handler's resume state (e.g. the last key of a keyset scan); params are its input.
-- * resources are paths relative to a service root (responses prefix them with the request's root).

CREATE TABLE operation (
    operation_id uuid PRIMARY KEY,
    type text COLLATE "C" NOT NULL,
    status text COLLATE "C" NOT NULL DEFAULT 'notStarted'
        CHECK (status IN ('notStarted', 'running', 'succeeded', 'failed', 'canceled')),
    params jsonb NOT NULL DEFAULT '{}',
    checkpoint jsonb,
    percent_complete integer NOT NULL DEFAULT 0 CHECK (percent_complete BETWEEN 0 AND 100),
    resources jsonb NOT NULL DEFAULT '[]',
    results jsonb NOT NULL DEFAULT '{}',
    lease_token uuid,
    leased_by text,
    leased_until timestamptz,
    attempts integer NOT NULL DEFAULT 0,  -- claims, resumptions included
    failures integer NOT NULL DEFAULT 0,  -- steps that raised; the operation fails after a few
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
-- the runner's claim query: unfinished operations, oldest first
CREATE INDEX operation_unfinished ON operation (created_at) WHERE status IN ('notStarted', 'running');
