-- Access control (access/): API tokens, the audit log, research data requests and their transitions.
--
-- * Times are written by the application from its clock (tests control it), not by DEFAULT now().
-- * audit_event and data_request_event are append-only: triggers raise on UPDATE, DELETE and TRUNCATE, so
--   not even the archive's own database role can rewrite history without dropping the trigger (which a
--   database audit of DDL would show).

CREATE TABLE access_token (
    token_id text PRIMARY KEY,             -- the public part of the token (dwa_<token_id>_<secret>)
    secret_sha256 bytea NOT NULL,          -- SHA-256 of the 256-bit secret; the secret itself is never stored
    name text NOT NULL,
    role text NOT NULL,
    partition_name text,                   -- NULL: every partition
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz
);

CREATE TABLE audit_event (
    event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_time timestamptz NOT NULL,       -- when the request arrived
    subject text NOT NULL,                 -- who: JWT sub, 'token:<id>', 'anonymous' (open mode or no credential)
    auth text NOT NULL,                    -- how: jwt, token, open, none (no credential), invalid
    token_id text,
    token_name text,
    roles text[] NOT NULL,                 -- role or role@partition, as held at the time
    client_address text,                   -- from where (X-Forwarded-For only from trusted proxies)
    user_agent text,
    method text NOT NULL,
    path text NOT NULL,
    query text,
    action text NOT NULL,                  -- route family (access.policy.Family)
    action_code char(1) NOT NULL,          -- ATNA EventActionCode: C R U D E
    partition_name text,
    study_uid text,
    series_uid text,
    instance_uid text,
    status smallint NOT NULL,              -- HTTP status sent (499: client went away before a response)
    outcome smallint NOT NULL,             -- ATNA EventOutcomeIndicator: 0 success, 4 minor (4xx), 8 serious (5xx)
    detail text,                           -- why a request was refused, when it was
    duration_ms real NOT NULL
);
CREATE INDEX audit_event_time ON audit_event (event_time);
CREATE INDEX audit_event_subject ON audit_event (subject, event_time);
CREATE INDEX audit_event_study ON audit_event (study_uid) WHERE study_uid IS NOT NULL;

CREATE FUNCTION access_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event
    FOR EACH ROW EXECUTE FUNCTION access_append_only();
CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
    FOR EACH STATEMENT EXECUTE FUNCTION access_append_only();

CREATE TABLE data_request (
    request_id uuid PRIMARY KEY,
    researcher text NOT NULL,              -- subject of the submitter; the only one who may read its partition
    title text NOT NULL,
    purpose text NOT NULL,
    source_partition text NOT NULL,
    cohort jsonb NOT NULL,                 -- {"studies": [...]} or {"filters": {QIDO parameters}}
    deid_options jsonb NOT NULL,           -- de-identification option names (deid.profile.Options)
    duration_seconds integer NOT NULL CHECK (duration_seconds > 0),
    state text NOT NULL CHECK (state IN ('submitted', 'approved', 'rejected', 'active', 'expired', 'revoked')),
    research_partition text UNIQUE,
    operation_id uuid,                     -- the de-identified export filling the research partition
    created_at timestamptz NOT NULL,
    decided_by text,
    decided_at timestamptz,
    decision_comment text,
    activated_at timestamptz,
    expires_at timestamptz
);
CREATE INDEX data_request_researcher ON data_request (researcher, state);

CREATE TABLE data_request_event (
    event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id uuid NOT NULL REFERENCES data_request,
    event_time timestamptz NOT NULL,
    actor text NOT NULL,
    from_state text,
    to_state text NOT NULL,
    comment text
);
CREATE INDEX data_request_event_request ON data_request_event (request_id, event_id);
CREATE TRIGGER data_request_event_append_only BEFORE UPDATE OR DELETE ON data_request_event
    FOR EACH ROW EXECUTE FUNCTION access_append_only();
CREATE TRIGGER data_request_event_no_truncate BEFORE TRUNCATE ON data_request_event
    FOR EACH STATEMENT EXECUTE FUNCTION access_append_only();
