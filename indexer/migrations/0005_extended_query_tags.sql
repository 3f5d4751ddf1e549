-- Extended query tags (Azure DICOM service's API): attributes that QIDO-RS can match beyond the standard
-- matching keys, with their values in typed tables (see indexer/extended_tags.py).
--
-- * Tags are global: one definition serves every data partition (as in Azure). Values hang off the rows of
--   the tag's level (study_key, series_key or instance_key, all identity columns that are never reused), so
--   partitions stay apart through the level's own partition_key.
-- * One value table per VR family, with the value in its native type so that ranges and equality use btree
--   indexes: (tag_key, value, row_key) answers "which rows have a matching value" by an index-only scan,
--   (row_key, tag_key) answers "does this row match" and serves deletes. A multi-valued attribute has one
--   row per value (multiple value matching: any value may match).
-- * There is no foreign key from values to the level rows (the row_key's table depends on the tag's level);
--   statement-level triggers remove the values and errors of deleted studies, series and instances.

CREATE TABLE extended_query_tag (
    tag_key integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path text COLLATE "C" NOT NULL UNIQUE CHECK (path ~ '^[0-9A-F]{8}$'),
    vr text COLLATE "C" NOT NULL,
    private_creator text COLLATE "C",
    level text COLLATE "C" NOT NULL CHECK (level IN ('Study', 'Series', 'Instance')),
    status text COLLATE "C" NOT NULL DEFAULT 'Adding' CHECK (status IN ('Adding', 'Ready', 'Deleting')),
    query_status text COLLATE "C" NOT NULL DEFAULT 'Enabled' CHECK (query_status IN ('Enabled', 'Disabled')),
    operation_id uuid REFERENCES operation ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Instances whose value could not be indexed (re-index or STOW): one row per tag and instance.
CREATE TABLE extended_query_tag_error (
    tag_key integer NOT NULL REFERENCES extended_query_tag ON DELETE CASCADE,
    instance_key bigint NOT NULL,
    partition_key integer NOT NULL,
    study_instance_uid text COLLATE "C" NOT NULL,
    series_instance_uid text COLLATE "C" NOT NULL,
    sop_instance_uid text COLLATE "C" NOT NULL,
    message text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tag_key, instance_key)
);
CREATE INDEX extended_query_tag_error_instance ON extended_query_tag_error (instance_key);

-- AE AS CS LO SH UI
CREATE TABLE ext_string (tag_key integer NOT NULL, row_key bigint NOT NULL, value text COLLATE "C" NOT NULL);
-- IS SL SS UL US
CREATE TABLE ext_long (tag_key integer NOT NULL, row_key bigint NOT NULL, value bigint NOT NULL);
-- DS FD FL
CREATE TABLE ext_double (tag_key integer NOT NULL, row_key bigint NOT NULL, value double precision NOT NULL);
CREATE TABLE ext_date (tag_key integer NOT NULL, row_key bigint NOT NULL, value date NOT NULL);
CREATE TABLE ext_time (tag_key integer NOT NULL, row_key bigint NOT NULL, value time NOT NULL);
-- DT: the first instant the value denotes (its UTC offset, if any, is ignored as for StudyDate/StudyTime)
CREATE TABLE ext_datetime (tag_key integer NOT NULL, row_key bigint NOT NULL, value timestamp NOT NULL);
-- PN: the value as stored (all groups), the case-folded alphabetic group (literal and wildcard matching)
-- and the folded name components with all their prefixes (fuzzy matching), as for PatientName (0001/0002).
CREATE TABLE ext_person_name (
    tag_key integer NOT NULL,
    row_key bigint NOT NULL,
    value text COLLATE "C" NOT NULL,
    value_ci text COLLATE "C",
    value_words text[] COLLATE "C" NOT NULL DEFAULT '{}',
    value_prefixes text[] COLLATE "C" GENERATED ALWAYS AS (qido_word_prefixes(value_words)) STORED
);

CREATE INDEX ext_string_match ON ext_string (tag_key, value, row_key);
CREATE INDEX ext_string_row ON ext_string (row_key, tag_key);
CREATE INDEX ext_long_match ON ext_long (tag_key, value, row_key);
CREATE INDEX ext_long_row ON ext_long (row_key, tag_key);
CREATE INDEX ext_double_match ON ext_double (tag_key, value, row_key);
CREATE INDEX ext_double_row ON ext_double (row_key, tag_key);
CREATE INDEX ext_date_match ON ext_date (tag_key, value, row_key);
CREATE INDEX ext_date_row ON ext_date (row_key, tag_key);
CREATE INDEX ext_time_match ON ext_time (tag_key, value, row_key);
CREATE INDEX ext_time_row ON ext_time (row_key, tag_key);
CREATE INDEX ext_datetime_match ON ext_datetime (tag_key, value, row_key);
CREATE INDEX ext_datetime_row ON ext_datetime (row_key, tag_key);
CREATE INDEX ext_person_name_match ON ext_person_name (tag_key, value_ci, row_key);
CREATE INDEX ext_person_name_row ON ext_person_name (row_key, tag_key);
CREATE INDEX ext_person_name_prefixes ON ext_person_name USING gin (value_prefixes);

-- Row estimates must be per tag: a value common under one tag (BodyPartExamined=CHEST) says nothing about
-- another tag in the same table. Without these, a prefix that no ProtocolName has was estimated at 25,000
-- rows and planned as a scan of all series probing each (1.7 s instead of 0.1 ms).
CREATE STATISTICS ext_string_tag_value (mcv) ON tag_key, value FROM ext_string;
CREATE STATISTICS ext_long_tag_value (mcv) ON tag_key, value FROM ext_long;
CREATE STATISTICS ext_double_tag_value (mcv) ON tag_key, value FROM ext_double;
CREATE STATISTICS ext_date_tag_value (mcv) ON tag_key, value FROM ext_date;
CREATE STATISTICS ext_time_tag_value (mcv) ON tag_key, value FROM ext_time;
CREATE STATISTICS ext_datetime_tag_value (mcv) ON tag_key, value FROM ext_datetime;
CREATE STATISTICS ext_person_name_tag_value (mcv) ON tag_key, value_ci FROM ext_person_name;

-- Instance searches on extended tags order all candidates by (series_key, instance_number) before cutting the
-- page (indexer.qido._compile_instance_page). This covering index gives those columns without heap reads,
-- and study_key for joining study-level matching keys.
CREATE INDEX instance_page ON instance (instance_key)
    INCLUDE (partition_key, study_key, series_key, instance_number);

-- Values of the rows a statement deleted, for the tags of that level; errors go with their instances.
CREATE FUNCTION ext_forget(level text, keys bigint[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tags integer[];
BEGIN
    SELECT array_agg(tag_key) INTO tags FROM extended_query_tag t WHERE t.level = ext_forget.level;
    IF tags IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM ext_string WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
    DELETE FROM ext_long WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
    DELETE FROM ext_double WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
    DELETE FROM ext_date WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
    DELETE FROM ext_time WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
    DELETE FROM ext_datetime WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
    DELETE FROM ext_person_name WHERE row_key = ANY(keys) AND tag_key = ANY(tags);
END $$;

CREATE FUNCTION ext_forget_instances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM extended_query_tag) THEN
        PERFORM ext_forget('Instance', ARRAY(SELECT instance_key FROM gone));
        DELETE FROM extended_query_tag_error WHERE instance_key IN (SELECT instance_key FROM gone);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION ext_forget_series() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM extended_query_tag) THEN
        PERFORM ext_forget('Series', ARRAY(SELECT series_key FROM gone));
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION ext_forget_studies() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM extended_query_tag) THEN
        PERFORM ext_forget('Study', ARRAY(SELECT study_key FROM gone));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER instance_ext_forget AFTER DELETE ON instance REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION ext_forget_instances();
CREATE TRIGGER series_ext_forget AFTER DELETE ON series REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION ext_forget_series();
CREATE TRIGGER study_ext_forget AFTER DELETE ON study REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION ext_forget_studies();
