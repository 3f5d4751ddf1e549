-- Matching keys of instance-level extended query tags without parsing the metadata (docs/performance.md,
-- "Extended query tags at 1,000,000 instances").
--
-- PS3.18 returns each matching key with each result. For an extended tag that value was found by parsing
-- every result's metadata blob (100 blobs of ~2.7 kB a page: half the server's CPU of such a page). The
-- typed value tables cannot stand in for it: they hold converted values (IS strings become integers, PN
-- groups are folded), nothing for empty or malformed elements, and no multi-value layout.
--
-- * ext_element keeps, per instance-level tag (public tags; private ones are found through their creator,
--   and QIDO reads the metadata for them) and instance that has the element, the member `"GGGGEEEE":{...}`
--   exactly as the metadata path builds it (orjson text of the element). Written with the values
--   (indexer.extended_values: at ingest and by the re-index); upserts, so a repeated batch is harmless.
-- * (tag_key, row_key) serves the page's probes (one per result and tag) and the tag's removal.
-- * The rows go with their instance (statement trigger, as the values: no per-insert foreign key check)
--   and with their tag (when the tag row is deleted, the last step of a tag deletion), and follow metadata
--   updates.

CREATE TABLE ext_element (
    tag_key integer NOT NULL,
    row_key bigint NOT NULL,
    member bytea NOT NULL,
    PRIMARY KEY (tag_key, row_key)
);

-- The member of `path` in a DICOM JSON blob, or NULL when it has none. The json type (not jsonb) keeps the
-- element's text as orjson wrote it (as migration 0010's qido_members).
CREATE FUNCTION ext_element_member(metadata bytea, path text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN position(convert_to('"' || path || '":', 'UTF8') IN metadata) > 0 THEN
        convert_to('"' || path || '":' || (convert_from(metadata, 'UTF8')::json -> path)::text, 'UTF8') END
$$;

CREATE FUNCTION ext_element_forget_instances() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tags integer[];
BEGIN
    SELECT array_agg(tag_key) INTO tags FROM extended_query_tag WHERE level = 'Instance';
    IF tags IS NOT NULL THEN
        DELETE FROM ext_element WHERE tag_key = ANY(tags) AND row_key = ANY(ARRAY(SELECT instance_key FROM gone));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER instance_ext_element_forget AFTER DELETE ON instance REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION ext_element_forget_instances();

CREATE FUNCTION ext_element_forget_tags() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM ext_element WHERE tag_key IN (SELECT tag_key FROM gone);
    RETURN NULL;
END $$;
CREATE TRIGGER extended_query_tag_element_forget AFTER DELETE ON extended_query_tag REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION ext_element_forget_tags();

CREATE FUNCTION ext_element_refresh() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM ext_element WHERE row_key = NEW.instance_key
        AND tag_key IN (SELECT tag_key FROM extended_query_tag WHERE level = 'Instance');
    INSERT INTO ext_element (tag_key, row_key, member)
    SELECT t.tag_key, NEW.instance_key, m.member FROM extended_query_tag t
    CROSS JOIN LATERAL (SELECT ext_element_member(NEW.metadata, t.path) AS member) m
    WHERE t.level = 'Instance' AND t.private_creator IS NULL AND t.status <> 'Deleting' AND m.member IS NOT NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER instance_ext_element_refresh AFTER UPDATE OF metadata ON instance
    FOR EACH ROW WHEN (OLD.metadata IS DISTINCT FROM NEW.metadata) EXECUTE FUNCTION ext_element_refresh();

-- Tags defined before this migration (a re-index in progress included: its later batches upsert).
INSERT INTO ext_element (tag_key, row_key, member)
SELECT t.tag_key, i.instance_key, m.member
FROM extended_query_tag t CROSS JOIN instance i
CROSS JOIN LATERAL (SELECT ext_element_member(i.metadata, t.path) AS member) m
WHERE t.level = 'Instance' AND t.private_creator IS NULL AND t.status <> 'Deleting' AND m.member IS NOT NULL;
