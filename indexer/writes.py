"""Adding instances to the index and removing them, keeping study and series rows and counters exact.

Callers own the transaction (so that the change feed entry and the blob-deletion queue commit with the index
change); these functions run inside it. Rows are locked in UID order so that concurrent batches touching
the same studies cannot deadlock.

New instances get the values of every extended query tag that is Adding or Ready in the same transaction
(study and series values are replaced from the batch's latest instance of each, like their attrs blobs).
The shared INGEST_LOCK taken first orders each batch against tag additions (see indexer.extended_tags).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from indexer.attributes import (
    Level,
    instance_columns,
    patient_identity,
    series_columns,
    study_columns,
)
from indexer.extended_tags import INGEST_LOCK, ExtendedTag, indexing_tags
from indexer.extended_values import Source, collect, delete_values, insert_errors, insert_values
from indexer.levels import level_json, series_attrs, study_attrs
from indexer.lookup import scope_sql
from indexer.qido import stored_members


@dataclass(slots=True)
class InstanceRecord:
    """One stored object to index: its identifying UIDs, its DICOM JSON and where its bytes are."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    attrs: dict
    storage_key: str
    size: int
    sha256: bytes
    metadata: bytes  # orjson of attrs, already serialised by the caller (it has it anyway)
    bulk_index: bytes = b"[]"  # orjson [[path, offset, length, vr], ...] (dicomcore BulkRef)


class Outcome(enum.Enum):
    CREATED = "created"
    ALREADY_STORED = "already-stored"  # the SOP instance is in the index already (45070)
    CONFLICT = "conflict"  # UIDs contradict the index (e.g. series belongs to another study)


@dataclass(slots=True)
class IndexResult:
    outcome: Outcome
    instance_key: int | None = None
    reason: str = ""


@dataclass(slots=True)
class NewVersion:
    """An updated object of an indexed instance, to replace the version it was made from."""

    instance_key: int  # the version it was made from
    storage_key: str  # that version's object: the replacement is refused if the instance moved on since
    record: InstanceRecord


@dataclass(slots=True)
class RemovedInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    storage_key: str
    instance_key: int


_STUDY_COLUMNS = list(study_columns({}).keys())
_SERIES_COLUMNS = list(series_columns({}).keys())
_INSTANCE_COLUMNS = list(instance_columns({}).keys())


async def index_instances(
    conn: asyncpg.Connection, partition_key: int, records: Sequence[InstanceRecord]
) -> list[IndexResult]:
    """Index a batch of instances in the caller's transaction; one result per record, in order.

    A few statements whatever the batch (a lone C-STORE pays each round trip in its response time): the
    lock, the duplicate check, one statement for the patient, study, series, instance and QIDO member rows,
    the extended query tags where any exist, and the counters.
    """
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", INGEST_LOCK)
    results: list[IndexResult | None] = [None] * len(records)
    # after the lock (a statement of its own, so this snapshot sees a tag added before it was granted)
    checked = await conn.fetchrow(
        """SELECT ARRAY(SELECT sop_instance_uid FROM instance
                        WHERE partition_key = $1 AND sop_instance_uid = ANY($2::text[])) AS existing,
                  b.series, b.studies,
                  EXISTS (SELECT 1 FROM extended_query_tag WHERE status IN ('Adding', 'Ready')) AS tagged
           FROM (SELECT array_agg(se.series_instance_uid) AS series,
                        array_agg(st.study_instance_uid) AS studies
                 FROM series se JOIN study st USING (study_key)
                 WHERE se.partition_key = $1 AND se.series_instance_uid = ANY($3::text[])) b""",
        partition_key,
        [r.sop_instance_uid for r in records],
        list({r.series_instance_uid for r in records}),
    )
    existing = set(checked["existing"])
    # the study each series belongs to: as stored, else that of its first instance in the batch
    study_of = dict(zip(checked["series"] or (), checked["studies"] or (), strict=True))
    seen: set[str] = set()
    pending: list[int] = []
    for i, r in enumerate(records):
        if r.sop_instance_uid in existing or r.sop_instance_uid in seen:
            results[i] = IndexResult(Outcome.ALREADY_STORED, reason="the instance is already stored")
        elif study_of.setdefault(r.series_instance_uid, r.study_instance_uid) != r.study_instance_uid:
            results[i] = _series_conflict(r)
        else:
            seen.add(r.sop_instance_uid)
            pending.append(i)
    for start in range(0, len(pending), _ROWS_PER_STATEMENT):
        chunk = pending[start : start + _ROWS_PER_STATEMENT]
        await _insert(conn, partition_key, records, chunk, results, tagged=checked["tagged"])
    return [r if r is not None else IndexResult(Outcome.CONFLICT, reason="not indexed") for r in results]


def _series_conflict(r: InstanceRecord) -> IndexResult:
    reason = f"series {r.series_instance_uid} is stored under another study than {r.study_instance_uid}"
    return IndexResult(Outcome.CONFLICT, reason=reason)


# Instances per insert statement: bounds its parameters (~30 a study, ~10 a series, 16 arrays) far below
# PostgreSQL's 32,767 however many studies the instances belong to.
_ROWS_PER_STATEMENT = 500


@functools.lru_cache(maxsize=256)
def _insert_sql(patients: int, study_patients: tuple[int, ...], series: int) -> str:
    """The statement that upserts a batch's patients, studies and series (in UID order, the lock order) and
    inserts its instances with their QIDO members. Parameters: $1 the partition; per patient its ID and
    issuer; per study (`study_patients`: the index of each one's patient) its UID, attrs and typed columns;
    per series its study's UID, its UID, attrs and typed columns; then the instance arrays. Rows: (level
    0 study / 1 series / 2 instance, UID, key) for every row written; a series that a concurrent batch bound
    to another study is not among them, nor are its instances."""
    patient_values = [f"($1, ${2 + 2 * j}, ${3 + 2 * j})" for j in range(patients)]
    n = 2 + 2 * patients
    study_values = []
    for j in study_patients:
        cols = ", ".join(f"${n + 2 + k}" for k in range(len(_STUDY_COLUMNS)))
        patient = f"SELECT patient_key FROM p WHERE patient_id = ${2 + 2 * j}"
        patient += f" AND issuer_of_patient_id = ${3 + 2 * j}"
        study_values.append(f"($1, ({patient}), ${n}, ${n + 1}, {cols})")
        n += 2 + len(_STUDY_COLUMNS)
    series_values = []
    for _ in range(series):
        cols = ", ".join(f"${n + 3 + k}" for k in range(len(_SERIES_COLUMNS)))
        series_values.append(
            f"($1, (SELECT study_key FROM st WHERE study_instance_uid = ${n}), ${n + 1}, ${n + 2}, {cols})"
        )
        n += 3 + len(_SERIES_COLUMNS)
    arrays = [
        "text[]", "text[]", "text[]", "text[]",  # study, series, SOP instance, SOP class UIDs
        "int[]", "int[]", "int[]", "int[]", "int[]",  # the instance columns
        "text[]", "text[]", "bigint[]", "bytea[]", "bytea[]", "bytea[]", "bytea[]",
    ]  # fmt: skip
    a = [f"${n + k}::{t}" for k, t in enumerate(arrays)]
    study_cols, series_cols, instance_cols = (
        ", ".join(c) for c in (_STUDY_COLUMNS, _SERIES_COLUMNS, _INSTANCE_COLUMNS)
    )
    study_updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _STUDY_COLUMNS)
    series_updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _SERIES_COLUMNS)
    return f"""WITH p AS (
               INSERT INTO patient (partition_key, patient_id, issuer_of_patient_id)
               VALUES {", ".join(patient_values)}
               ON CONFLICT (partition_key, patient_id, issuer_of_patient_id)
               DO UPDATE SET patient_id = EXCLUDED.patient_id
               RETURNING patient_key, patient_id, issuer_of_patient_id),
           st AS (
               INSERT INTO study (partition_key, patient_key, study_instance_uid, attrs, {study_cols})
               VALUES {", ".join(study_values)}
               ON CONFLICT (partition_key, study_instance_uid) DO UPDATE SET
                   patient_key = EXCLUDED.patient_key, attrs = EXCLUDED.attrs, updated_at = now(),
                   {study_updates}
               RETURNING study_key, study_instance_uid),
           se AS (
               INSERT INTO series (partition_key, study_key, series_instance_uid, attrs, {series_cols})
               VALUES {", ".join(series_values)}
               ON CONFLICT (partition_key, series_instance_uid) DO UPDATE SET
                   attrs = EXCLUDED.attrs, updated_at = now(), {series_updates}
                   WHERE series.study_key = EXCLUDED.study_key  -- a series stays bound to its study
               RETURNING series_key, series_instance_uid, study_key),
           ins AS (
               INSERT INTO instance (partition_key, study_key, series_key, sop_instance_uid, sop_class_uid,
                   {instance_cols}, transfer_syntax_uid, storage_key, size, sha256, metadata, bulk_index)
               SELECT $1, st.study_key, se.series_key, t.sop, t.class, t.c1, t.c2, t.c3, t.c4, t.c5,
                   t.syntax, t.storage_key, t.size, t.sha256, t.metadata, t.bulk_index
               FROM unnest({", ".join(a[:15])})
                   WITH ORDINALITY AS t(study, series, sop, class, c1, c2, c3, c4, c5, syntax, storage_key,
                                        size, sha256, metadata, bulk_index, n)
               JOIN st ON st.study_instance_uid = t.study
               JOIN se ON se.series_instance_uid = t.series AND se.study_key = st.study_key
               ORDER BY t.n
               ON CONFLICT (partition_key, sop_instance_uid) DO NOTHING
               RETURNING sop_instance_uid, instance_key),
           members AS (
               INSERT INTO instance_qido (instance_key, members)
               SELECT ins.instance_key, m.members
               FROM ins JOIN unnest({a[2]}, {a[15]}) AS m(sop, members) ON m.sop = ins.sop_instance_uid)
           SELECT 0 AS level, study_instance_uid AS uid, study_key AS key FROM st
           UNION ALL SELECT 1, series_instance_uid, series_key FROM se
           UNION ALL SELECT 2, sop_instance_uid, instance_key FROM ins"""


async def _insert(
    conn: asyncpg.Connection,
    partition_key: int,
    records: Sequence[InstanceRecord],
    pending: list[int],
    results: list[IndexResult | None],
    *,
    tagged: bool,
) -> None:
    # The latest record of each study/series in the batch supplies the level's attributes.
    study_rep: dict[str, InstanceRecord] = {}
    series_rep: dict[str, InstanceRecord] = {}
    for i in pending:
        r = records[i]
        study_rep[r.study_instance_uid] = r
        series_rep[r.series_instance_uid] = r
    patients = sorted({patient_identity(r.attrs) for r in study_rep.values()})
    studies, series = sorted(study_rep), sorted(series_rep)
    patient_index = {ident: j for j, ident in enumerate(patients)}
    study_patients = tuple(patient_index[patient_identity(study_rep[uid].attrs)] for uid in studies)
    args: list[object] = [partition_key]
    for ident in patients:
        args.extend(ident)
    for uid in studies:
        r = study_rep[uid]
        args.extend((uid, level_json(study_attrs(r.attrs)), *study_columns(r.attrs).values()))
    for uid in series:
        r = series_rep[uid]
        args.extend(
            (
                r.study_instance_uid,
                uid,
                level_json(series_attrs(r.attrs)),
                *series_columns(r.attrs).values(),
            )
        )
    chosen = [records[i] for i in pending]
    args.extend(
        [
            [r.study_instance_uid for r in chosen],
            [r.series_instance_uid for r in chosen],
            [r.sop_instance_uid for r in chosen],
            [r.sop_class_uid for r in chosen],
            *(list(col) for col in zip(*(instance_columns(r.attrs).values() for r in chosen), strict=True)),
            [r.transfer_syntax_uid for r in chosen],
            [r.storage_key for r in chosen],
            [r.size for r in chosen],
            [r.sha256 for r in chosen],
            [r.metadata for r in chosen],
            [r.bulk_index for r in chosen],
            [stored_members(r.attrs) for r in chosen],
        ]
    )
    written = await conn.fetch(_insert_sql(len(patients), study_patients, len(series)), *args)
    study_keys = {row["uid"]: row["key"] for row in written if row["level"] == 0}
    series_keys = {row["uid"]: row["key"] for row in written if row["level"] == 1}
    keys = {row["uid"]: row["key"] for row in written if row["level"] == 2}
    # a study or series of this batch is left empty only when one of its instances was not inserted
    prune = False
    for i in pending:
        r = records[i]
        if r.series_instance_uid not in series_keys:  # bound to another study by a concurrent batch
            results[i], prune = _series_conflict(r), True
        elif (key := keys.get(r.sop_instance_uid)) is None:  # a concurrent batch stored it first
            results[i] = IndexResult(Outcome.ALREADY_STORED, reason="the instance is already stored")
            prune = True
        else:
            results[i] = IndexResult(Outcome.CREATED, instance_key=key)
    if keys and tagged and (tags := await indexing_tags(conn)):
        instances = [
            Source(key, key, records[i].attrs)
            for i in pending
            if (key := keys.get(records[i].sop_instance_uid))
        ]
        await _index_extended(conn, tags, instances, keys, study_rep, study_keys, series_rep, series_keys)
    await refresh_counters(
        conn, sorted(set(study_keys.values())), sorted(set(series_keys.values())), prune=prune
    )


async def _index_extended(
    conn: asyncpg.Connection,
    tags: list[ExtendedTag],
    instances: list[Source],
    created: dict[str, int],
    study_rep: dict[str, InstanceRecord],
    study_keys: dict[str, int],
    series_rep: dict[str, InstanceRecord],
    series_keys: dict[str, int],
) -> None:
    """Values of the extended query tags for the batch's new instances and the studies/series they touched.

    Values that do not fit the VR are recorded as the tag's errors (the instance is stored all the same).
    """
    instance_tags = [t for t in tags if t.level is Level.INSTANCE]
    study_tags = [t for t in tags if t.level is Level.STUDY]
    series_tags = [t for t in tags if t.level is Level.SERIES]
    sources: list[tuple[list[ExtendedTag], list[Source]]] = []
    if instance_tags:
        sources.append((instance_tags, instances))
    if study_tags:
        studies = [
            Source(study_keys[uid], created.get(r.sop_instance_uid), r.attrs) for uid, r in study_rep.items()
        ]
        await delete_values(conn, study_tags, [s.row_key for s in studies])
        sources.append((study_tags, studies))
    if series_tags:
        series = [
            Source(series_keys[uid], created.get(r.sop_instance_uid), r.attrs)
            for uid, r in series_rep.items()
            if uid in series_keys
        ]
        await delete_values(conn, series_tags, [s.row_key for s in series])
        sources.append((series_tags, series))
    for level_tags, level_sources in sources:
        collected = collect(level_tags, level_sources)
        await insert_values(conn, collected.rows)
        await insert_errors(conn, collected.errors)


async def refresh_counters(
    conn: asyncpg.Connection, study_keys: list[int], series_keys: list[int], *, prune: bool = True
) -> None:
    """Recompute counters and modalities of the given rows and drop those left without instances.

    Recounting (an index-only scan over a study's instances) instead of incrementing keeps the rows exact
    whatever mix of inserts, duplicates and deletes a transaction made. One statement: its parts all see
    the rows as they were before it, so each count leaves out the series it drops itself. `prune=False`
    when no row can be left empty (every instance of the batch was inserted): no DELETE then, whose
    statement triggers (the extended values of deleted rows) cost more than the counting.
    """
    if not study_keys and not series_keys:
        return
    gone_series = gone_study = "SELECT NULL::bigint AS key WHERE false"
    if prune:
        gone_series = """DELETE FROM series s WHERE s.series_key = ANY($2::bigint[])
                   AND NOT EXISTS (SELECT 1 FROM instance i WHERE i.series_key = s.series_key)
               RETURNING s.series_key AS key"""
        gone_study = """DELETE FROM study s WHERE s.study_key = ANY($1::bigint[])
                   AND NOT EXISTS (SELECT 1 FROM instance i WHERE i.study_key = s.study_key)
               RETURNING s.study_key AS key"""
    await conn.execute(
        f"""WITH gone_series AS ({gone_series}),
           counted_series AS (
               UPDATE series s SET instance_count =
                   (SELECT count(*) FROM instance i WHERE i.series_key = s.series_key)
               WHERE s.series_key = ANY($2::bigint[]) AND s.series_key NOT IN (SELECT key FROM gone_series)),
           gone_study AS ({gone_study})
           UPDATE study s SET
               instance_count = (SELECT count(*) FROM instance i WHERE i.study_key = s.study_key),
               series_count = (SELECT count(*) FROM series x WHERE x.study_key = s.study_key
                               AND x.series_key NOT IN (SELECT key FROM gone_series)),
               modalities = coalesce((SELECT array_agg(DISTINCT x.modality ORDER BY x.modality)
                             FROM series x WHERE x.study_key = s.study_key AND x.modality IS NOT NULL
                             AND x.modality <> ''
                             AND x.series_key NOT IN (SELECT key FROM gone_series)), '{{}}')
           WHERE s.study_key = ANY($1::bigint[]) AND s.study_key NOT IN (SELECT key FROM gone_study)""",
        study_keys,
        series_keys,
    )


def _update_sql(table: str, key: str, columns: list[str]) -> str:
    sets = ", ".join(f"{c} = ${n}" for n, c in enumerate(columns, start=3))
    return f"UPDATE {table} SET attrs = $2, updated_at = now(), {sets} WHERE {key} = $1"


_STUDY_REFRESH = _update_sql("study", "study_key", _STUDY_COLUMNS)
_SERIES_REFRESH = _update_sql("series", "series_key", _SERIES_COLUMNS)


async def _refresh_level_attrs(
    conn: asyncpg.Connection, study_keys: list[int], series_keys: list[int]
) -> None:
    """Give studies and series that lost instances their attributes from the latest instance left.

    At ingest the latest stored instance supplies a level's attributes; after a delete that instance may be
    gone, and QIDO must not keep answering with the values of a deleted instance. Rows left without
    instances were already removed by refresh_counters.
    """
    for level_key, keys, update_sql, level_attrs, columns in (
        ("series_key", series_keys, _SERIES_REFRESH, series_attrs, series_columns),
        ("study_key", study_keys, _STUDY_REFRESH, study_attrs, study_columns),
    ):
        if not keys:
            continue
        latest = await conn.fetch(
            f"""SELECT DISTINCT ON ({level_key}) {level_key} AS key, metadata FROM instance
                WHERE {level_key} = ANY($1::bigint[]) ORDER BY {level_key}, instance_key DESC""",
            keys,
        )
        await conn.executemany(
            update_sql,
            [
                (row["key"], level_json(level_attrs(attrs)), *columns(attrs).values())
                for row in latest
                for attrs in (orjson.loads(row["metadata"]),)
            ],
        )


async def replace_instances(
    conn: asyncpg.Connection, partition_key: int, versions: Sequence[NewVersion]
) -> list[int | None]:
    """Index new versions of instances in the caller's transaction; per version its new instance_key, or
    None when the instance was deleted or replaced since the version was read (nothing done for it).

    The old row goes and the new one is indexed like a new instance (study, series and patient rows,
    counters, QIDO members, extended query tags), under a new instance_key: change feed entries of the old
    version then read as replaced. The instance's first version is kept in instance_original; an
    intermediate version's object is queued for deletion.
    """
    # The patient and study rows first, in ingest's order (see lock_study_row), then the instance rows. The
    # patients are those the instances have and those the new versions will have (an update can change
    # PatientID): upserted here, in ingest's order, as the re-index below will upsert them, so that a STOW
    # carrying the new PatientID (which locks that patient, then the study) cannot hold it meanwhile.
    keys = [v.instance_key for v in versions]
    identities = sorted({patient_identity(v.record.attrs) for v in versions})
    await conn.execute(
        """INSERT INTO patient (partition_key, patient_id, issuer_of_patient_id)
           SELECT $1, p.patient_id, p.issuer_of_patient_id FROM (
               SELECT patient_id, issuer_of_patient_id FROM patient WHERE patient_key IN
                   (SELECT st.patient_key FROM instance i JOIN study st USING (study_key)
                    WHERE i.instance_key = ANY($2::bigint[]))
               UNION SELECT * FROM unnest($3::text[], $4::text[])) p
           ORDER BY p.patient_id, p.issuer_of_patient_id
           ON CONFLICT (partition_key, patient_id, issuer_of_patient_id)
           DO UPDATE SET patient_id = EXCLUDED.patient_id""",
        partition_key,
        keys,
        [i[0] for i in identities],
        [i[1] for i in identities],
    )
    await conn.execute(
        """SELECT FROM study WHERE study_key IN
               (SELECT study_key FROM instance WHERE instance_key = ANY($1::bigint[]))
           ORDER BY study_instance_uid FOR UPDATE""",
        keys,
    )
    rows = await conn.fetch(
        """SELECT instance_key, storage_key FROM instance
           WHERE instance_key = ANY($1::bigint[]) ORDER BY instance_key FOR UPDATE""",
        [v.instance_key for v in versions],
    )
    current = {row["instance_key"]: row["storage_key"] for row in rows}
    fresh = [v for v in versions if current.get(v.instance_key) == v.storage_key]
    if not fresh:
        return [None] * len(versions)
    keys = [v.instance_key for v in fresh]
    kept = await conn.fetch(keep_originals_sql("instance", "instance_key = ANY($1::bigint[])"), keys)
    originals = {row["storage_key"] for row in kept}
    intermediate = [(v.storage_key,) for v in fresh if v.storage_key not in originals]
    if intermediate:
        await conn.executemany(
            "INSERT INTO blob_deletion (storage_key) VALUES ($1) ON CONFLICT DO NOTHING", intermediate
        )
    await conn.execute("DELETE FROM instance WHERE instance_key = ANY($1::bigint[])", keys)
    results = await index_instances(conn, partition_key, [v.record for v in fresh])
    new_keys: dict[int, int | None] = {}
    for version, result in zip(fresh, results, strict=True):
        if result.outcome is not Outcome.CREATED:  # cannot happen under the row locks; never half-done
            raise RuntimeError(f"instance {version.record.sop_instance_uid} not re-indexed: {result.reason}")
        new_keys[version.instance_key] = result.instance_key
    return [new_keys.get(v.instance_key) for v in versions]


def keep_originals_sql(source: str, where: str) -> str:
    """INSERT of instance_original rows from `source` (a table with the instance's columns: `instance`, or
    retention's `deleted_object` on a restore); keeps an existing original, returns the keys it kept."""
    columns = "partition_key, sop_instance_uid, transfer_syntax_uid, storage_key, size, sha256, metadata, "
    columns += "bulk_index, created_at"
    return f"""INSERT INTO instance_original ({columns}) SELECT {columns} FROM {source} WHERE {where}
               ON CONFLICT (partition_key, sop_instance_uid) DO NOTHING RETURNING storage_key"""


async def lock_study_row(conn: asyncpg.Connection, partition_key: int, study_uid: str) -> bool:
    """Lock the study's row before removing any of its instances; False when the study is not indexed.

    Every ingest into the study locks this row (its upsert) before it inserts instances, and holds it to its
    commit. A delete that read and deleted instances first and met that lock only at its recount would
    recount, and prune empty series and studies, with a snapshot taken before the ingest committed: the
    counters would leave the new instances out, and the prune would delete their series or study row, whose
    ON DELETE CASCADE removes the new instance rows with no change feed entry and no queued object. With the
    row locked first, each later statement of the delete starts after any such ingest has committed (or the
    ingest waits for the delete). Bulk update (replace_instances) locks the study rows before the instance
    rows too, in this order.
    """
    # Its patient's row before it, in ingest's order (patient, study, series): a STOW locks the patient row
    # and then waits for the study, and the delete's second update of the study row (its level attributes,
    # after the recount updated it) checks the patient foreign key, which waits for the STOW's lock. A STOW
    # with another PatientID can move the study to another patient between the two locks: then both are
    # given back (the savepoint) and taken again, rather than the new patient locked after the study.
    for attempt in range(_RELOCK_TRIES):
        try:
            async with conn.transaction():
                patient_key = await conn.fetchval(
                    """SELECT patient_key FROM patient WHERE patient_key =
                           (SELECT patient_key FROM study
                            WHERE partition_key = $1 AND study_instance_uid = $2)
                       FOR KEY SHARE""",
                    partition_key,
                    study_uid,
                )
                locked = await conn.fetchrow(
                    """SELECT patient_key FROM study WHERE partition_key = $1 AND study_instance_uid = $2
                       FOR UPDATE""",
                    partition_key,
                    study_uid,
                )
                if locked is None:
                    return False
                if locked["patient_key"] == patient_key or attempt == _RELOCK_TRIES - 1:
                    return True
                raise _Moved  # leaves the savepoint: both row locks are released
        except _Moved:
            continue
    return True  # not reached


_RELOCK_TRIES = 5


async def lock_study_rows(conn: asyncpg.Connection, partition_key: int, study_uids: list[str]) -> None:
    """Lock the patient and study rows of several studies at once, in ingest's order, before a transaction
    deletes them one after the other (the expiry sweep's step).

    Each deletion appends to the change feed, and the counter row it locks is held to the commit. Were the
    next study's rows locked only then, a STOW holding them and waiting for the counter would deadlock with
    the step. A study that moves to another patient meanwhile is locked again by lock_study_row.
    """
    await conn.execute(
        """SELECT FROM patient WHERE patient_key IN
               (SELECT patient_key FROM study
                WHERE partition_key = $1 AND study_instance_uid = ANY($2::text[]))
           ORDER BY patient_id, issuer_of_patient_id FOR KEY SHARE""",
        partition_key,
        study_uids,
    )
    await conn.execute(
        """SELECT FROM study WHERE partition_key = $1 AND study_instance_uid = ANY($2::text[])
           ORDER BY study_instance_uid FOR UPDATE""",
        partition_key,
        study_uids,
    )


class _Moved(Exception):
    """The study moved to another patient between the two locks of lock_study_row."""


async def remove_instances(
    conn: asyncpg.Connection,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    keep_objects: bool = False,
) -> list[RemovedInstance]:
    """Delete the addressed instances from the index and queue their objects for deletion.

    Runs in the caller's transaction; returns what was removed (empty: nothing matched, i.e. 404).
    `keep_objects`: queue nothing, because the caller keeps the objects for a restore window (retention/).
    """
    if not await lock_study_row(conn, partition_key, study_uid):
        return []
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    rows = await conn.fetch(
        f"""SELECT i.instance_key, i.study_key, i.series_key, i.sop_instance_uid, i.storage_key,
                   st.study_instance_uid, se.series_instance_uid
            FROM instance i JOIN series se USING (series_key) JOIN study st ON st.study_key = i.study_key
            WHERE i.partition_key = $1 AND {where}
            ORDER BY i.instance_key
            FOR UPDATE OF i""",
        partition_key,
        *args,
    )
    if not rows:
        return []
    instance_keys = [r["instance_key"] for r in rows]
    await conn.execute("DELETE FROM instance WHERE instance_key = ANY($1::bigint[])", instance_keys)
    # the originals of updated instances go with them (Azure deletes both versions)
    originals = await conn.fetch(
        """DELETE FROM instance_original WHERE partition_key = $1 AND sop_instance_uid = ANY($2::text[])
           RETURNING storage_key""",
        partition_key,
        [r["sop_instance_uid"] for r in rows],
    )
    if not keep_objects:
        await conn.executemany(
            "INSERT INTO blob_deletion (storage_key) VALUES ($1) ON CONFLICT DO NOTHING",
            [(r["storage_key"],) for r in [*rows, *originals]],
        )
    study_keys, series_keys = sorted({r["study_key"] for r in rows}), sorted({r["series_key"] for r in rows})
    await refresh_counters(conn, study_keys, series_keys)
    await _refresh_level_attrs(conn, study_keys, series_keys)
    return [
        RemovedInstance(
            r["study_instance_uid"],
            r["series_instance_uid"],
            r["sop_instance_uid"],
            r["storage_key"],
            r["instance_key"],
        )
        for r in rows
    ]
