-- DIMSE peers (dimse/): the application entities that may associate with the archive, and where the
-- archive reaches them (C-MOVE destinations, acquisition sources, $send destinations).
--
-- * ae_title is the calling AE title exactly as sent, trailing spaces removed (PS3.8 9.3.2: AE titles are
--   compared without their padding); upper and lower case differ, as they do in DICOM.
-- * host is an address, a network (CIDR), a host name or '*': where associations from this AE may come
--   from. The archive connects to host:port when it is a single address or name.
-- * services: what the AE may ask for on its associations (store, find, retrieve, worklist, commitment);
--   C-ECHO is always allowed.

CREATE TABLE dimse_ae (
    ae_title text COLLATE "C" PRIMARY KEY,
    host text NOT NULL,
    port integer CHECK (port BETWEEN 1 AND 65535),
    partition_name text NOT NULL,
    services text[] NOT NULL,
    description text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- DIMSE statuses are 16-bit unsigned (0xA900, 0xC000, 0xFE00 ...): the audit log's status column, a
-- smallint for HTTP codes, must hold them too.
ALTER TABLE audit_event ALTER COLUMN status TYPE integer;
