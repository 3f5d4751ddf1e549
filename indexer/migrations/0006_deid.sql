-- De-identification (deid/): project secrets, the pseudonym/original mapping, and export errors.
--
-- * deid_project.secret keys every HMAC of a project (UIDs, patient pseudonyms, date shifts): with it and
--   the mapping below, exported data can be linked back to patients. deid_project and deid_mapping are
--   therefore the re-identification tables: only the deid module reads them (deid/mapping.py), and
--   deployments should grant SELECT on them to an authorised role only (re-identification is a deliberate,
--   audited act; see docs/deidentification.md).
-- * deid_mapping rows are written in the same transaction as the export step that produced them, so a
--   resumed export never records a mapping twice or misses one (ON CONFLICT DO NOTHING for re-exports).
-- * deid_export_error holds one row per instance an export skipped or failed; each step commits its rows
--   with its checkpoint, so the errors log (written from these rows) lists each error exactly once.

CREATE TABLE deid_project (
    project text COLLATE "C" PRIMARY KEY,
    secret bytea NOT NULL CHECK (length(secret) >= 16),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deid_mapping (
    project text COLLATE "C" NOT NULL REFERENCES deid_project,
    kind text COLLATE "C" NOT NULL CHECK (kind IN ('patient', 'study', 'series', 'instance')),
    pseudonym text COLLATE "C" NOT NULL,
    original text COLLATE "C" NOT NULL,
    issuer text COLLATE "C" NOT NULL DEFAULT '',  -- IssuerOfPatientID of patient rows
    first_operation uuid,                         -- the export that first produced it (NULL: the CLI)
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, kind, pseudonym)
);
CREATE INDEX deid_mapping_original ON deid_mapping (project, kind, original);

CREATE TABLE deid_export_error (
    operation_id uuid NOT NULL REFERENCES operation ON DELETE CASCADE,
    error_key bigint GENERATED ALWAYS AS IDENTITY,
    identifier text COLLATE "C" NOT NULL,  -- study[/series[/instance]] of the source
    kind text COLLATE "C" NOT NULL CHECK (kind IN ('skipped', 'failed')),
    error text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operation_id, error_key)
);
