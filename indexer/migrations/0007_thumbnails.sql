-- Rendered thumbnails, cached so that a second request (from any process) does not decode again.
--
-- * Keyed by the instance row, which is immutable for its storage_key: a thumbnail can never go stale, and
--   deleting the instance (or its series or study) removes its thumbnails by cascade.
-- * variant names what was rendered: frame, media type, viewport (see indexer.thumbnails).
-- * Kept out of the blob store on purpose: the orphan sweeper deletes every object no instance row names.
CREATE TABLE thumbnail (
    instance_key bigint NOT NULL REFERENCES instance ON DELETE CASCADE,
    variant text COLLATE "C" NOT NULL,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_key, variant)
);
