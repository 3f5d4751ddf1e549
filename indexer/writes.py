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
from indexer.levels import series_attrs, study_attrs
from indexer.lookup import scope_sql
from indexer.qido import store_members


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


def _upsert_parts(columns: list[str], first_param: int) -> tuple[str, str, str]:
    """Column list, $n placeholders and SET clause for the typed columns of an upsert."""
    params = ", ".join(f"${n}" for n in range(first_param, first_param + len(columns)))
    return ", ".join(columns), params, ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)


_cols, _params, _updates = _upsert_parts(_STUDY_COLUMNS, 5)
_STUDY_UPSERT = f"""INSERT INTO study (partition_key, patient_key, study_instance_uid, attrs, {_cols})
    VALUES ($1, $2, $3, $4, {_params})
    ON CONFLICT (partition_key, study_instance_uid) DO UPDATE SET
        patient_key = EXCLUDED.patient_key, attrs = EXCLUDED.attrs, updated_at = now(), {_updates}
    RETURNING study_key"""
_cols, _params, _updates = _upsert_parts(_SERIES_COLUMNS, 5)
# The WHERE keeps a series bound to its study: a series UID reused under another study is refused.
_SERIES_UPSERT = f"""INSERT INTO series (partition_key, study_key, series_instance_uid, attrs, {_cols})
    VALUES ($1, $2, $3, $4, {_params})
    ON CONFLICT (partition_key, series_instance_uid) DO UPDATE SET
        attrs = EXCLUDED.attrs, updated_at = now(), {_updates}
        WHERE series.study_key = EXCLUDED.study_key
    RETURNING series_key"""
del _cols, _params, _updates


async def index_instances(
    conn: asyncpg.Connection, partition_key: int, records: Sequence[InstanceRecord]
) -> list[IndexResult]:
    """Index a batch of instances in the caller's transaction; one result per record, in order."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", INGEST_LOCK)
    results: list[IndexResult | None] = [None] * len(records)
    sop_uids = [r.sop_instance_uid for r in records]
    existing = {
        row["sop_instance_uid"]
        for row in await conn.fetch(
            "SELECT sop_instance_uid FROM instance WHERE partition_key = $1 AND sop_instance_uid = ANY($2)",
            partition_key,
            sop_uids,
        )
    }
    seen: set[str] = set()
    pending: list[int] = []
    for i, r in enumerate(records):
        if r.sop_instance_uid in existing or r.sop_instance_uid in seen:
            results[i] = IndexResult(Outcome.ALREADY_STORED, reason="the instance is already stored")
        else:
            seen.add(r.sop_instance_uid)
            pending.append(i)
    if pending:
        await _insert(conn, partition_key, records, pending, results)
    return [r if r is not None else IndexResult(Outcome.CONFLICT, reason="not indexed") for r in results]


async def _insert(
    conn: asyncpg.Connection,
    partition_key: int,
    records: Sequence[InstanceRecord],
    pending: list[int],
    results: list[IndexResult | None],
) -> None:
    # The latest record of each study/series in the batch supplies the level's attributes.
    study_rep: dict[str, InstanceRecord] = {}
    series_rep: dict[str, InstanceRecord] = {}
    for i in pending:
        r = records[i]
        study_rep[r.study_instance_uid] = r
        series_rep[r.series_instance_uid] = r

    patient_keys: dict[tuple[str, str], int] = {}
    for ident in sorted({patient_identity(r.attrs) for r in study_rep.values()}):
        patient_keys[ident] = await conn.fetchval(
            """INSERT INTO patient (partition_key, patient_id, issuer_of_patient_id) VALUES ($1, $2, $3)
               ON CONFLICT (partition_key, patient_id, issuer_of_patient_id)
               DO UPDATE SET patient_id = EXCLUDED.patient_id
               RETURNING patient_key""",
            partition_key,
            *ident,
        )

    study_keys: dict[str, int] = {}
    for uid in sorted(study_rep):
        r = study_rep[uid]
        study_keys[uid] = await conn.fetchval(
            _STUDY_UPSERT,
            partition_key,
            patient_keys[patient_identity(r.attrs)],
            uid,
            orjson.dumps(study_attrs(r.attrs)),
            *study_columns(r.attrs).values(),
        )

    series_keys: dict[str, int] = {}
    conflicting_series: dict[str, str] = {}
    for uid in sorted(series_rep):
        r = series_rep[uid]
        key = await conn.fetchval(
            _SERIES_UPSERT,
            partition_key,
            study_keys[r.study_instance_uid],
            uid,
            orjson.dumps(series_attrs(r.attrs)),
            *series_columns(r.attrs).values(),
        )
        if key is None:
            conflicting_series[uid] = (
                f"series {uid} is stored under another study than {r.study_instance_uid}"
            )
        else:
            series_keys[uid] = key

    rows = []
    for i in pending:
        r = records[i]
        if r.series_instance_uid in conflicting_series:
            results[i] = IndexResult(Outcome.CONFLICT, reason=conflicting_series[r.series_instance_uid])
            continue
        rows.append(
            (
                i,
                study_keys[r.study_instance_uid],
                series_keys[r.series_instance_uid],
                r.sop_instance_uid,
                r.sop_class_uid,
                *instance_columns(r.attrs).values(),
                r.transfer_syntax_uid,
                r.storage_key,
                r.size,
                r.sha256,
                r.metadata,
                r.bulk_index,
            )
        )
    if rows:
        cols = ", ".join(_INSTANCE_COLUMNS)
        inserted = await conn.fetch(
            f"""INSERT INTO instance (partition_key, study_key, series_key, sop_instance_uid, sop_class_uid,
                    {cols}, transfer_syntax_uid, storage_key, size, sha256, metadata, bulk_index)
                SELECT $1, t.* FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[],
                    $6::int[], $7::int[], $8::int[], $9::int[], $10::int[],
                    $11::text[], $12::text[], $13::bigint[], $14::bytea[], $15::bytea[], $16::bytea[]) AS t
                ON CONFLICT (partition_key, sop_instance_uid) DO NOTHING
                RETURNING sop_instance_uid, instance_key""",
            partition_key,
            *(list(col) for col in list(zip(*rows, strict=True))[1:]),
        )
        keys = {row["sop_instance_uid"]: row["instance_key"] for row in inserted}
        for row in rows:
            i = row[0]
            key = keys.get(records[i].sop_instance_uid)
            if key is None:  # a concurrent batch stored it first
                results[i] = IndexResult(Outcome.ALREADY_STORED, reason="the instance is already stored")
            else:
                results[i] = IndexResult(Outcome.CREATED, instance_key=key)
        created = [records[row[0]] for row in rows if records[row[0]].sop_instance_uid in keys]
        # their default QIDO results, pre-encoded (indexer.qido)
        await store_members(conn, [(keys[r.sop_instance_uid], r.attrs) for r in created])
        tags = await indexing_tags(conn)
        if tags:
            instances = [
                Source(key, key, records[row[0]].attrs)
                for row in rows
                if (key := keys.get(records[row[0]].sop_instance_uid)) is not None
            ]
            await _index_extended(conn, tags, instances, keys, study_rep, study_keys, series_rep, series_keys)
    touched_series = sorted(set(series_keys.values()))
    touched_studies = sorted(set(study_keys.values()))
    await refresh_counters(conn, touched_studies, touched_series)


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


async def refresh_counters(conn: asyncpg.Connection, study_keys: list[int], series_keys: list[int]) -> None:
    """Recompute counters and modalities of the given rows and drop those left without instances.

    Recounting (an index-only scan over a study's instances) instead of incrementing keeps the rows exact
    whatever mix of inserts, duplicates and deletes a transaction made.
    """
    if series_keys:
        await conn.execute(
            """UPDATE series s SET instance_count =
                   (SELECT count(*) FROM instance i WHERE i.series_key = s.series_key)
               WHERE s.series_key = ANY($1::bigint[])""",
            series_keys,
        )
        await conn.execute(
            "DELETE FROM series WHERE series_key = ANY($1::bigint[]) AND instance_count = 0", series_keys
        )
    if study_keys:
        await conn.execute(
            """UPDATE study s SET
                   instance_count = (SELECT count(*) FROM instance i WHERE i.study_key = s.study_key),
                   series_count = (SELECT count(*) FROM series x WHERE x.study_key = s.study_key),
                   modalities = coalesce((SELECT array_agg(DISTINCT x.modality ORDER BY x.modality)
                                 FROM series x WHERE x.study_key = s.study_key AND x.modality IS NOT NULL
                                 AND x.modality <> ''), '{}')
               WHERE s.study_key = ANY($1::bigint[])""",
            study_keys,
        )
        await conn.execute(
            "DELETE FROM study WHERE study_key = ANY($1::bigint[]) AND instance_count = 0", study_keys
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
                (row["key"], orjson.dumps(level_attrs(attrs)), *columns(attrs).values())
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
