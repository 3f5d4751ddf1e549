-- Indexes for QIDO-RS query shapes that 0001 does not serve (see indexer/qido.py).

-- Fuzzy person-name matching asks whether every query word is a prefix of some component of the stored
-- name. No btree or array index answers "is a prefix of some element" directly, and scanning the *_words
-- arrays costs ~150 ms at 100,000 studies. Storing every prefix of every component turns the question into
-- array containment, `*_prefixes @> query_words`, which a GIN index answers. The columns are generated, so
-- they follow the *_words columns that ingest writes without any change to ingest; words are short (a name
-- has a handful of components), so the arrays stay small.
CREATE FUNCTION qido_word_prefixes(words text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT ARRAY(SELECT DISTINCT left(w, n) FROM unnest(words) AS w, generate_series(1, length(w)) AS n
                 ORDER BY 1)
$$;

ALTER TABLE study
    ADD COLUMN patient_name_prefixes text[] COLLATE "C"
        GENERATED ALWAYS AS (qido_word_prefixes(patient_name_words)) STORED,
    ADD COLUMN referring_physician_name_prefixes text[] COLLATE "C"
        GENERATED ALWAYS AS (qido_word_prefixes(referring_physician_name_words)) STORED;
CREATE INDEX study_patient_name_prefixes ON study USING gin (patient_name_prefixes);
CREATE INDEX study_referring_name_prefixes ON study USING gin (referring_physician_name_prefixes);

-- includefield of an attribute that is not in a study's or series' attrs blob is answered from one
-- representative instance, the latest stored one (highest instance_key), fetched for a whole page with
--   ... CROSS JOIN LATERAL (SELECT ... FROM instance WHERE study_key = k ORDER BY instance_key DESC LIMIT 1)
-- Without (study_key, instance_key) / (series_key, instance_key) that reads every instance of each study
-- or series on the page. instance_study (study_key) is widened rather than duplicated: the wider index
-- serves everything the old one did (counting a study's instances stays an index-only scan).
DROP INDEX instance_study;
CREATE INDEX instance_study ON instance (study_key, instance_key);
CREATE INDEX instance_series_latest ON instance (series_key, instance_key);
