-- Study searches by a StudyDate range read their page's keys from the date index alone.
--
-- A date range's page is "the study keys with partition_key = p and study_date in [a, b], in key order".
-- On study_date_time (partition_key, study_date, study_time) that cost one heap fetch per matching study
-- to read its key, before the sort: 640 matches of a month at 2M instances were 1,002 buffers, and the
-- alternative walk of study_page filtering on the date costs ~101 / selectivity index tuples, so the worst
-- range width cost grows with the square root of the number of studies (docs/scaling.md). With the key
-- (and the modalities, for ModalitiesInStudy with a narrow range) in the index the date path is an
-- index-only scan: about one buffer per ~200 matches instead of one per match.
--
-- The index is replaced rather than joined by a second one: its key columns stay as they were (StudyDate
-- with StudyTime ranges still use them), so study writes maintain as many indexes as before, and the
-- included columns are already indexed elsewhere (study_page), which leaves HOT updates as they were.
DROP INDEX study_date_time;
CREATE INDEX study_date_time ON study (partition_key, study_date, study_time) INCLUDE (study_key, modalities);
