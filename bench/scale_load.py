"""A synthetic index of millions of instances, generated inside PostgreSQL (rows only, no objects).

    python -m bench.scale_load --data-dir /work/bench-out/scale-10m --studies 1000000 --per-study 10

bench.qido_search's `load` goes through indexer.writes at ~3,500 instances/s on a quiet machine (Python
builds and sends every row). This writes the same rows with INSERT ... SELECT FROM generate_series, one
transaction per chunk of studies, with no client in the loop: 4,300-5,000 instances/s measured while four
other sessions shared the 2 cores (5,700/s for a chunk on its own).

The data is bench.qido_search's after `bench.extended_tags prepare`: the same template instance
(bench.synthetic) with the same fifteen attributes varied per study, series and instance, and
AcquisitionDate/AcquisitionNumber appended to each instance's metadata, so `qido_search measure` and
`extended_tags measure` run on it unchanged.

Exactness comes from templates, not from SQL re-implementations of ingest: the instance metadata, the study
and series attrs blobs, their QIDO members and the instance's stored members (indexer.qido) are built once
by the archive's own functions from a template whose varied values are placeholders, and PostgreSQL only
substitutes the placeholders. Typed columns (names case-folded and split into words, dates) come from
indexer.attributes for each vocabulary entry. tests/test_scale_load.py checks that these rows equal those
indexer.writes makes of the same instances, and that QIDO answers for them as for the same instances stored
over STOW-RS.

Restartable: progress is a row in `scale_load_progress`; a chunk commits with its progress, so a killed
load resumes at the next chunk, and a larger --studies grows a loaded data set. Secondary indexes (not
those behind constraints) are dropped before the first chunk and built after the last, which is faster
than maintaining them row by row (2M instances: 25 s to build them all); their definitions are kept in the
progress row until they are rebuilt.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import time
from pathlib import Path

import asyncpg
import orjson

from bench.qido_search import SEED, _set
from bench.synthetic import DESCRIPTIONS, FAMILY, GIVEN, MODALITIES, ROOT, make_instance, make_study, to_bytes
from dicomcore.parse import parse_instance
from indexer.attributes import instance_columns, series_columns, study_columns
from indexer.embedded import EmbeddedPostgres
from indexer.levels import series_attrs, study_attrs
from indexer.migrate import migrate
from indexer.qido import stored_members

PATIENTS = 100_000  # PatientIDs PID00000..PID99999, as bench.qido_search draws them
TABLES = ["patient", "study", "series", "instance", "instance_qido", "changefeed"]
# placeholders of the varied values in the templates: (key, VR, placeholder, quoted in the JSON)
STUDY_SLOTS = [
    ("00100010", "PN", "@PN@"),
    ("00100020", "LO", "@PID@"),
    ("00100030", "DA", "@BD@"),
    ("00100040", "CS", "@SEX@"),
    ("00080020", "DA", "@SD@"),
    ("00080030", "TM", "@ST@"),
    ("00080050", "SH", "@ACC@"),
    ("00080090", "PN", "@REF@"),
    ("00081030", "LO", "@DESC@"),
    ("0020000D", "UI", "@STUID@"),
]
SERIES_SLOTS = [("00080060", "CS", "@MOD@"), ("0020000E", "UI", "@SEUID@"), ("00200011", "IS", "@SN@")]
INSTANCE_SLOTS = [("00080018", "UI", "@SOP@"), ("00200013", "IS", "@IN@")]


def template_attrs() -> dict:
    """bench.qido_search's template instance with placeholders where it varies values."""
    rng = random.Random(SEED)
    spec = make_study(rng, series_count=1)
    attrs = copy.copy(parse_instance(to_bytes(make_instance(spec, 0, 1))).attrs)
    for key, vr, slot in STUDY_SLOTS + SERIES_SLOTS + INSTANCE_SLOTS:
        _set(attrs, key, vr, {"Alphabetic": slot} if vr == "PN" else slot)
    return attrs


def names() -> list[tuple[str, str, str, str]]:
    """Every FAMILY^GIVEN name: (value, column, case-folded column, '|'-joined words), by ingest's rules."""
    out = []
    for family in FAMILY:
        for given in GIVEN:
            value = f"{family}^{given}"
            cols = study_columns({"00100010": {"vr": "PN", "Value": [{"Alphabetic": value}]}})
            out.append(
                (value, cols["patient_name"], cols["patient_name_ci"], "|".join(cols["patient_name_words"]))
            )
    return out


def _sub(expr: str, slots: list[tuple[str, str, str]], values: dict[str, str]) -> str:
    """SQL that replaces each placeholder in the text `expr` by its value expression (IS: unquoted)."""
    for _, vr, slot in slots:
        target = f"'\"{slot}\"'" if vr == "IS" else f"'{slot}'"
        expr = f"replace({expr}, {target}, {values[slot]})"
    return expr


# Per-study values, drawn from hashes of the study number so that any chunk can be generated alone.
_H = "(hashint8extended(s, {k}) & 2147483647)"
_STUDY_VALUES = f"""
    SELECT s, s + 1 AS study_key, {_H.format(k=1)} % {PATIENTS} AS pid,
           {_H.format(k=2)} % 100 AS name_i, {_H.format(k=3)} % 100 AS ref_i,
           date '1930-01-01' + ({_H.format(k=4)} % 33000)::int AS birth_date,
           (ARRAY['M','F','O'])[{_H.format(k=5)} % 3 + 1] AS sex,
           date '2000-01-01' + ({_H.format(k=6)} % 9497)::int AS study_date,
           make_time(({_H.format(k=7)} % 24)::int, ({_H.format(k=8)} % 60)::int,
                     ({_H.format(k=9)} % 60)::int) AS study_time,
           'ACC' || lpad(({_H.format(k=10)} % 10000000)::text, 7, '0') AS accession,
           $DESCS::text[] AS descs, {_H.format(k=11)} % {len(DESCRIPTIONS)} AS desc_i,
           '{ROOT}7.' || s AS study_uid
    FROM generate_series($A::bigint, $B::bigint - 1) AS s"""


# bench.extended_tags prepare's two varied attributes, appended to the metadata as it appends them
_EXT_VALUES = r"""format(',"00080022":{"vr":"DA","Value":["%s"]},"00200012":{"vr":"IS","Value":[%s]}}',
                  to_char(date '2000-01-01' + (i.instance_key % 9000)::int, 'YYYYMMDD'),
                  i.instance_key % 5000)"""


def _modality(j: str) -> str:
    return f"($MODS::text[])[{_H.replace('{k}', f'100 + {j}')} % {len(MODALITIES)} + 1]"


class Loader:
    """The SQL of one data set shape (studies of `per_study` instances in `series` series)."""

    def __init__(self, per_study: int, series: int) -> None:
        self.per_study, self.series = per_study, series
        attrs = template_attrs()
        self.metadata = orjson.dumps(attrs).decode()
        self.study_attrs = orjson.dumps(study_attrs(attrs)).decode()
        self.series_attrs = orjson.dumps(series_attrs(attrs)).decode()
        members = stored_members(attrs)
        assert members is not None
        self.instance_members = members.decode()
        self.study_const = study_columns(attrs)
        self.series_const = series_columns(attrs)
        self.instance_const = instance_columns(attrs)
        self.names = names()

    def params(self) -> dict[str, object]:
        return {
            "$DESCS": DESCRIPTIONS,
            "$MODS": MODALITIES,
            "$NAMES": [n[0] for n in self.names],
            "$NCOL": [n[1] for n in self.names],
            "$NCI": [n[2] for n in self.names],
            "$NWORDS": [n[3] for n in self.names],
        }

    def chunk_sql(self) -> str:
        """One transaction's statements for studies [$A, $B), as one DO-free script of CTE inserts."""
        n, sc = self.per_study, self.series
        study_values = {
            "@PN@": "($NAMES::text[])[v.name_i + 1]",
            "@PID@": "'PID' || lpad(v.pid::text, 5, '0')",
            "@BD@": "to_char(v.birth_date, 'YYYYMMDD')",
            "@SEX@": "v.sex",
            "@SD@": "to_char(v.study_date, 'YYYYMMDD')",
            "@ST@": "to_char(v.study_time, 'HH24MISS')",
            "@ACC@": "v.accession",
            "@REF@": "($NAMES::text[])[v.ref_i + 1]",
            "@DESC@": "v.descs[v.desc_i + 1]",
            "@STUID@": "v.study_uid",
        }
        series_values = {"@MOD@": "x.modality", "@SEUID@": "x.series_uid", "@SN@": "(x.j + 1)::text"}
        instance_values = {"@SOP@": "i.sop", "@IN@": "(i.n + 1)::text"}
        sc_const, se_const, in_const = self.study_const, self.series_const, self.instance_const
        study_json = _sub(_sub("$STUDY_ATTRS::text", STUDY_SLOTS, study_values), SERIES_SLOTS, series_values)
        series_json = _sub(
            _sub("$SERIES_ATTRS::text", STUDY_SLOTS, study_values), SERIES_SLOTS, series_values
        )
        # the latest instance of a study (the last one) gives the study row its attributes, as at ingest
        last_j = (n - 1) % sc
        return f"""
CREATE TEMP TABLE g_study ON COMMIT DROP AS {_STUDY_VALUES};
CREATE TEMP TABLE g_series ON COMMIT DROP AS
    SELECT v.s, v.study_key, j, v.s * {sc} + j + 1 AS series_key, {_modality("j")} AS modality,
           '{ROOT}7.' || v.s || '.' || (j + 1) AS series_uid,
           {n // sc} + (j < {n % sc})::int AS instance_count
    FROM g_study v, generate_series(0, {sc - 1}) AS j;
ANALYZE g_study;
ANALYZE g_series;
CREATE TEMP TABLE g_modalities ON COMMIT DROP AS
    SELECT s, array_agg(DISTINCT modality ORDER BY modality) AS modalities FROM g_series GROUP BY s;
-- per series: the instance metadata and stored members with the study's and series' values in place
CREATE TEMP TABLE g_filled ON COMMIT DROP AS
    SELECT x.series_key,
           {_sub(_sub("$METADATA::text", STUDY_SLOTS, study_values), SERIES_SLOTS, series_values)} AS meta,
           {_sub(_sub("$MEMBERS::text", STUDY_SLOTS, study_values), SERIES_SLOTS, series_values)} AS mem
    FROM g_series x JOIN g_study v ON v.s = x.s;
ANALYZE g_filled;
INSERT INTO study (study_key, partition_key, patient_key, study_instance_uid, attrs, members, patient_id,
        patient_name, patient_name_ci, patient_name_words, patient_birth_date, patient_sex, study_date,
        study_time, accession_number, referring_physician_name, referring_physician_name_ci,
        referring_physician_name_words, study_id, study_description, modalities, series_count,
        instance_count)
    OVERRIDING SYSTEM VALUE
    SELECT v.study_key, 1, v.pid + 1, v.study_uid, b.attrs, qido_members(b.attrs),
           'PID' || lpad(v.pid::text, 5, '0'), ($NCOL::text[])[v.name_i + 1], ($NCI::text[])[v.name_i + 1],
           string_to_array(($NWORDS::text[])[v.name_i + 1], '|'), v.birth_date, v.sex, v.study_date,
           v.study_time, v.accession, ($NCOL::text[])[v.ref_i + 1], ($NCI::text[])[v.ref_i + 1],
           string_to_array(($NWORDS::text[])[v.ref_i + 1], '|'), {_lit(sc_const["study_id"])},
           v.descs[v.desc_i + 1],
           m.modalities, {sc}, {n}
    FROM g_study v JOIN g_series x ON x.s = v.s AND x.j = {last_j} JOIN g_modalities m ON m.s = v.s,
         LATERAL (SELECT convert_to({study_json}, 'UTF8') AS attrs) b;
INSERT INTO series (series_key, partition_key, study_key, series_instance_uid, attrs, members, modality,
        series_number, series_description, performed_procedure_step_start_date,
        performed_procedure_step_start_time, manufacturer_model_name, instance_count)
    OVERRIDING SYSTEM VALUE
    SELECT x.series_key, 1, x.study_key, x.series_uid, b.attrs, qido_members(b.attrs), x.modality, x.j + 1,
           {_lit(se_const["series_description"])},
           {_lit(se_const["performed_procedure_step_start_date"])}::date,
           {_lit(se_const["performed_procedure_step_start_time"])}::time,
           {_lit(se_const["manufacturer_model_name"])}, x.instance_count
    FROM g_series x JOIN g_study v ON v.s = x.s,
         LATERAL (SELECT convert_to({series_json}, 'UTF8') AS attrs) b;
CREATE TEMP TABLE g_instance ON COMMIT DROP AS
    SELECT v.s * {n} + i.n + 1 AS instance_key, x.study_key, x.series_key, i.sop, i.n, v.study_uid,
           x.series_uid, f.meta, f.mem
    FROM g_study v JOIN g_series x ON x.s = v.s JOIN g_filled f ON f.series_key = x.series_key,
         LATERAL (SELECT n, '{ROOT}8.' || v.s || '.' || n AS sop FROM generate_series(0, {n - 1}) AS n
                  WHERE n % {sc} = x.j) AS i;
INSERT INTO instance (instance_key, partition_key, study_key, series_key, sop_instance_uid, sop_class_uid,
        instance_number, rows, columns, bits_allocated, number_of_frames, transfer_syntax_uid, storage_key,
        size, sha256, metadata)
    OVERRIDING SYSTEM VALUE
    SELECT i.instance_key, 1, i.study_key, i.series_key, i.sop, $SOP_CLASS, i.n + 1,
           {_lit(in_const["rows"])}::int, {_lit(in_const["columns"])}::int,
           {_lit(in_const["bits_allocated"])}::int, {_lit(in_const["number_of_frames"])}::int,
           '1.2.840.10008.1.2.1', 'bench/' || (i.study_key - 1) || '/' || i.sop || '.dcm', 34000,
           sha256(convert_to(i.sop, 'UTF8')),
           convert_to(left({_sub("i.meta", INSTANCE_SLOTS, instance_values)}, -1) || {_EXT_VALUES}, 'UTF8')
    FROM g_instance i ORDER BY i.instance_key;
INSERT INTO instance_qido (instance_key, members)
    SELECT i.instance_key, convert_to({_sub("i.mem", INSTANCE_SLOTS, instance_values)}, 'UTF8')
    FROM g_instance i ORDER BY i.instance_key;
-- one partition, sequences dense from 1: an entry's ordinal within the partition is its sequence
INSERT INTO changefeed (sequence, partition_key, partition_ordinal, study_instance_uid, series_instance_uid,
        sop_instance_uid, instance_key, action, "timestamp")
    SELECT i.instance_key, 1, i.instance_key, i.study_uid, i.series_uid, i.sop, i.instance_key, 0,
           clock_timestamp()
    FROM g_instance i ORDER BY i.instance_key;
"""

    def bind(self, sql: str, a: int, b: int, sop_class: str) -> str:
        """Substitute the $NAME parameters as literals (a multi-statement script takes no bind parameters)."""
        values: dict[str, object] = {
            **self.params(),
            "$STUDY_ATTRS": self.study_attrs,
            "$SERIES_ATTRS": self.series_attrs,
            "$METADATA": self.metadata,
            "$MEMBERS": self.instance_members,
            "$SOP_CLASS": sop_class,
            "$A": a,
            "$B": b,
        }
        for name in sorted(values, key=len, reverse=True):
            sql = sql.replace(name, _lit(values[name]))
        return sql


def _lit(value: object) -> str:
    """An SQL literal of a str, int, list of str or None."""
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_lit(v) for v in value) + "]::text[]"
    return "'" + str(value).replace("'", "''") + "'"


async def _secondary_indexes(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """(name, definition) of the indexes of the loaded tables that no constraint owns."""
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_indexdef(x.indexrelid) AS def FROM pg_index x
           JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
           WHERE t.relname = ANY($1::text[]) AND t.relnamespace = 'public'::regnamespace
             AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid)
           ORDER BY c.relname""",
        TABLES,
    )
    return [(r["relname"], r["def"]) for r in rows]


async def _refuse_foreign_keys(conn: asyncpg.Connection, next_study: int, per_study: int) -> None:
    """Growing writes the keys and sequences after the last loaded study's; rows written since by anything
    else (a benchmark's STOWs) hold some of them, and the first chunk would fail on a unique key."""
    taken = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM study WHERE study_key > $1)
               OR EXISTS (SELECT 1 FROM changefeed WHERE sequence > $2)""",
        next_study,
        next_study * per_study,
    )
    if taken:
        raise SystemExit(
            f"rows this loader did not write hold the keys after study {next_study} (stored over STOW-RS"
            " after the load?); delete them, or load a new data set"
        )


async def load(dsn: str, studies: int, per_study: int, series: int = 2, chunk: int = 10_000) -> None:
    """Load studies 0..`studies`-1 (continuing a previous run), then build the dropped indexes."""
    loader = Loader(per_study, series)
    sop_class = template_attrs()["00080016"]["Value"][0]
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS scale_load_progress (
               singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
               per_study integer NOT NULL, series integer NOT NULL, next_study bigint NOT NULL,
               index_defs text[])"""
    )
    progress = await conn.fetchrow("SELECT * FROM scale_load_progress")
    if progress is None:
        if await conn.fetchval("SELECT count(*) FROM instance"):
            raise SystemExit("the index already holds instances that this loader did not write")
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO patient (patient_key, partition_key, patient_id, issuer_of_patient_id)
                   OVERRIDING SYSTEM VALUE
                   SELECT p + 1, 1, 'PID' || lpad(p::text, 5, '0'), '' FROM generate_series(0, $1 - 1) p""",
                PATIENTS,
            )
            await conn.execute(
                "INSERT INTO scale_load_progress VALUES (true, $1, $2, 0, NULL)", per_study, series
            )
        progress = await conn.fetchrow("SELECT * FROM scale_load_progress")
    elif (progress["per_study"], progress["series"]) != (per_study, series):
        raise SystemExit(
            f"this data set has {progress['per_study']} instances in {progress['series']} series"
        )
    if progress["next_study"] < studies:
        await _refuse_foreign_keys(conn, progress["next_study"], per_study)
    if progress["index_defs"] is None and progress["next_study"] < studies:
        # growing a loaded data set: rebuilding its indexes after is faster than maintaining them per row
        async with conn.transaction():
            indexes = await _secondary_indexes(conn)
            for name, _ in indexes:
                await conn.execute(f"DROP INDEX {name}")
            await conn.execute("UPDATE scale_load_progress SET index_defs = $1", [d for _, d in indexes])
    sql = loader.chunk_sql()
    start, first = time.perf_counter(), progress["next_study"]
    for a in range(first, studies, chunk):
        b = min(a + chunk, studies)
        async with conn.transaction():
            # no FK checks or row triggers: keys are consistent by construction, members are computed
            # here by the same function the trigger calls (qido_members)
            await conn.execute(
                "SET LOCAL session_replication_role = replica; SET LOCAL synchronous_commit = off"
            )
            await conn.execute(loader.bind(sql, a, b, sop_class))
            await conn.execute("UPDATE scale_load_progress SET next_study = $1", b)
        elapsed = time.perf_counter() - start
        rate = (b - first) * per_study / elapsed
        print(
            f"  {b} studies, {b * per_study} instances ({rate:.0f} instances/s, {elapsed:.0f} s)", flush=True
        )
    done = await conn.fetchval("SELECT next_study FROM scale_load_progress")
    await conn.execute(
        """SELECT setval(pg_get_serial_sequence('study', 'study_key'), greatest($1, 1));
           SELECT setval(pg_get_serial_sequence('series', 'series_key'), greatest($1 * $2, 1));
           SELECT setval(pg_get_serial_sequence('instance', 'instance_key'), greatest($1 * $3, 1));
           SELECT setval(pg_get_serial_sequence('patient', 'patient_key'), $4);
           UPDATE changefeed_counter SET last_sequence = $1 * $3,
               last_timestamp = coalesce((SELECT max("timestamp") FROM changefeed), '-infinity')""".replace(
            "$1", str(done)
        )
        .replace("$2", str(series))
        .replace("$3", str(per_study))
        .replace("$4", str(PATIENTS))
    )
    defs = (await conn.fetchval("SELECT index_defs FROM scale_load_progress")) or []
    for definition in defs:
        t = time.perf_counter()
        await conn.execute(definition.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1))
        print(f"  {definition[:100]}: {time.perf_counter() - t:.0f} s", flush=True)
    await conn.execute("UPDATE scale_load_progress SET index_defs = NULL")
    t = time.perf_counter()
    await conn.execute("VACUUM ANALYZE")
    print(f"  VACUUM ANALYZE: {time.perf_counter() - t:.0f} s")
    total = time.perf_counter() - start
    size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    await conn.close()
    print(
        f"index holds {done} studies, {done * series} series, {done * per_study} instances;"
        f" {size}; {total:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/scale"))
    parser.add_argument("--studies", type=int, default=1_000_000)
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=10_000, help="studies per transaction")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg:
        asyncio.run(load(pg.dsn, args.studies, args.per_study, chunk=args.chunk))


if __name__ == "__main__":
    main()
