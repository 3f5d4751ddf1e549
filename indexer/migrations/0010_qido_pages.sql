-- QIDO pages at 1M instances (docs/performance.md, "QIDO-RS at 100,000 studies / 1,000,000 instances").
--
-- * instance_qido keeps, per instance, the members of its default instance-level QIDO result (PS3.18
--   Table 10.6.3-3/-4/-5, without the attributes computed from study/series rows at query time) as the
--   orjson text cut from the stored metadata, sorted by tag and separated by \x01 (a byte compact JSON
--   never holds). A page is then 100 narrow reads and a byte concatenation instead of parsing 100 whole
--   metadata blobs. The key list must equal indexer.qido.STORED_MEMBERS (a test checks it). NULL members:
--   some member holds a BulkDataURI (its prefix depends on the URL), and QIDO reads the metadata instead.
-- * It is a side table, not a column of instance: adding a column means rewriting all 1M wide rows and
--   every index entry to backfill it, while filling a new narrow table is one INSERT ... SELECT.
-- * New instances get theirs from indexer.writes (indexer.qido.stored_members, from the parsed attributes:
--   ~15 us per instance). Parsing the stored JSON again in PostgreSQL, as the backfill below does, costs
--   ~107 us of server CPU per 2.7 kB instance (measured: 1M instances in 110 s), too much for every store.
--   A metadata update refreshes them by trigger; the ON DELETE CASCADE removes them with their instance.
-- * The json type (not jsonb) keeps the text of each value exactly as orjson wrote it, so the backfill
--   writes the same bytes as stored_members.

-- The members of a DICOM JSON object (all, or those named by `keys`): their texts in tag order, \x01 apart.
CREATE FUNCTION qido_members(blob bytea, keys text[] DEFAULT NULL) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN bool_or(strpos(m.value::text, 'BulkDataURI') > 0) THEN NULL
                ELSE convert_to(string_agg('"' || m.key || '":' || m.value::text, E'\x01' ORDER BY m.key COLLATE "C"),
                                'UTF8') END
    FROM json_each(convert_from(blob, 'UTF8')::json) AS m
    WHERE keys IS NULL OR m.key = ANY (keys)
$$;

CREATE FUNCTION qido_instance_members(metadata bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT qido_members(metadata, '{00080005,00080016,00080018,00080020,00080030,00080050,00080060,00080090,
                                    00080201,0008103E,00100010,00100020,00100030,00100040,0020000D,0020000E,
                                    00200010,00200011,00200013,00280008,00280010,00280011,00280100,00400244,
                                    00400245,00400275}')
$$;

CREATE TABLE instance_qido (
    instance_key bigint PRIMARY KEY REFERENCES instance ON DELETE CASCADE,
    members bytea
);

CREATE FUNCTION instance_qido_refresh() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE instance_qido SET members = qido_instance_members(NEW.metadata) WHERE instance_key = NEW.instance_key;
    RETURN NULL;
END $$;

CREATE TRIGGER instance_qido_refresh AFTER UPDATE OF metadata ON instance
    FOR EACH ROW WHEN (OLD.metadata IS DISTINCT FROM NEW.metadata) EXECUTE FUNCTION instance_qido_refresh();

INSERT INTO instance_qido (instance_key, members)
SELECT instance_key, qido_instance_members(metadata) FROM instance;

-- Study and series results are built the same way from `members`: every member of the level's attrs blob,
-- split as above (NULL: one holds a BulkDataURI, and QIDO parses attrs). Those blobs are small (~0.7 kB), so
-- a trigger derives members whenever attrs is written (a study and a series upsert per index batch), and
-- the backfill rewrites the 100,000 study and 200,000 series rows of the bench data set in ~1 minute.
ALTER TABLE study ADD COLUMN members bytea;
ALTER TABLE series ADD COLUMN members bytea;

CREATE FUNCTION level_members_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.members := qido_members(NEW.attrs);
    RETURN NEW;
END $$;

CREATE TRIGGER study_members BEFORE INSERT OR UPDATE OF attrs ON study
    FOR EACH ROW EXECUTE FUNCTION level_members_fill();
CREATE TRIGGER series_members BEFORE INSERT OR UPDATE OF attrs ON series
    FOR EACH ROW EXECUTE FUNCTION level_members_fill();

UPDATE study SET members = qido_members(attrs);
UPDATE series SET members = qido_members(attrs);

-- Study searches whose keys are only StudyDate and ModalitiesInStudy (and plain list pages) find the page's
-- keys in this covering index, in study_key order, without reading study rows: the filter runs on the index
-- tuples and the scan stops after the page (indexer.qido._compile_study_page). Before, ModalitiesInStudy=MR
-- with a one-year range read ~10,000 whole study rows in study_key order, or intersected a GIN bitmap
-- with a year-wide date range.
CREATE INDEX study_page ON study (partition_key, study_key) INCLUDE (study_date, modalities);
