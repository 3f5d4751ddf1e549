-- Pages of instance searches on extended query tags from the value index alone (docs/performance.md,
-- "Extended query tags at 1,000,000 instances", session 4).
--
-- An instance page is ordered by (series_key, instance_number, instance_key) (indexer.qido). Finding it
-- probed instance_page once per candidate value row for those columns: ~3 ms for 200 candidates, 9-18 ms for
-- a one-month range's 3,441. Each value row of an instance-level tag now carries them (and partition_key
-- and study_key, which the page's filter and second half need), so that:
--
-- * the match index (tag_key, value, series_key, instance_number, row_key) INCLUDE (partition_key,
--   study_key) gives an equality page in result order (the scan stops after limit + offset rows), and a
--   range page as a top-N sort over index-only tuples, with no instance probe;
-- * it replaces (tag_key, value, row_key): rows of study/series-level tags have NULLs there, so their
--   entries stay in (value, row_key) order for the semijoins.
--
-- The columns are written with the values (indexer.extended_values.insert_values joins the instance rows:
-- ingest and re-index), follow changes of an instance's own columns (trigger below), and go with the
-- instance (the delete triggers of 0005). Study/series-level rows keep NULLs.

-- Per value table: add the columns; drop the match index (updating it row by row would cost more); backfill
-- the rows of instance-level tags, 100,000 instances per statement (bounded work per join; the migration is
-- one transaction all the same; a re-index in progress fills its later batches itself); rebuild the row
-- index, which got a second entry per updated row; create the new match index.
DO $$
DECLARE
    tags integer[];
    tbl text;
    low bigint;
    high bigint;
BEGIN
    SELECT array_agg(tag_key) INTO tags FROM extended_query_tag WHERE level = 'Instance';
    SELECT min(instance_key) - 1, max(instance_key) INTO low, high FROM instance;
    FOREACH tbl IN ARRAY ARRAY['ext_string', 'ext_long', 'ext_double', 'ext_date', 'ext_time',
                                'ext_datetime', 'ext_person_name'] LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN partition_key integer, ADD COLUMN study_key bigint,'
                       ' ADD COLUMN series_key bigint, ADD COLUMN instance_number integer', tbl);
        EXECUTE format('DROP INDEX %I', tbl || '_match');
        IF tags IS NOT NULL AND high IS NOT NULL THEN
            FOR step IN 0 .. (high - low) / 100000 LOOP
                EXECUTE format(
                    'UPDATE %I x SET partition_key = i.partition_key, study_key = i.study_key,'
                    ' series_key = i.series_key, instance_number = i.instance_number FROM instance i'
                    ' WHERE x.row_key > $1 AND x.row_key <= $2 AND x.tag_key = ANY($3)'
                    ' AND i.instance_key = x.row_key', tbl)
                USING low + step * 100000, low + (step + 1) * 100000, tags;
            END LOOP;
            EXECUTE format('REINDEX INDEX %I', tbl || '_row');
        END IF;
        EXECUTE format('CREATE INDEX %I ON %I (tag_key, %I, series_key, instance_number, row_key)'
                       ' INCLUDE (partition_key, study_key)',
                       tbl || '_match', tbl, CASE WHEN tbl = 'ext_person_name' THEN 'value_ci' ELSE 'value' END);
    END LOOP;
END $$;

-- Instance pages that combine an extended tag with a PatientName prefix (or value) probe study for each
-- candidate's name: ~10 us per study row read. With study_key in the name index, the planner hashes the
-- matching studies from an index-only scan instead (measured on the bench data, a one-month range with
-- PatientName=M*: 11.1 -> 4.3 ms execution at p50).
DROP INDEX study_patient_name_ci;
CREATE INDEX study_patient_name_ci ON study (partition_key, patient_name_ci) INCLUDE (study_key);

-- An instance whose own columns change (none of the archive's writes does it today) takes its values' copies
-- along.
CREATE FUNCTION ext_page_keys_refresh() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tags integer[];
    tbl text;
BEGIN
    SELECT array_agg(tag_key) INTO tags FROM extended_query_tag WHERE level = 'Instance';
    IF tags IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH tbl IN ARRAY ARRAY['ext_string', 'ext_long', 'ext_double', 'ext_date', 'ext_time',
                                'ext_datetime', 'ext_person_name'] LOOP
        EXECUTE format(
            'UPDATE %I SET partition_key = $1, study_key = $2, series_key = $3, instance_number = $4'
            ' WHERE row_key = $5 AND tag_key = ANY($6)', tbl)
        USING NEW.partition_key, NEW.study_key, NEW.series_key, NEW.instance_number, NEW.instance_key, tags;
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER instance_ext_page_keys AFTER UPDATE OF partition_key, study_key, series_key, instance_number
    ON instance FOR EACH ROW
    WHEN ((OLD.partition_key, OLD.study_key, OLD.series_key, OLD.instance_number)
          IS DISTINCT FROM (NEW.partition_key, NEW.study_key, NEW.series_key, NEW.instance_number))
    EXECUTE FUNCTION ext_page_keys_refresh();
