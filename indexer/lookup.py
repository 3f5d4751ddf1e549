"""Reading what WADO-RS needs from the index: which objects make up a study/series/instance, and metadata.

Also what the DIMSE operations read (dimse/): a study's instances page by page ($send), what a partition
holds of a study (acquisition), and the SOP classes of given instances (storage commitment).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True, slots=True)
class StoredInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    storage_key: str
    size: int
    # SHA-256 recorded at ingest, where the reader selected it: whole reads check it (storage.digests)
    sha256: bytes | None = None


def scope_sql(study_uid: str, series_uid: str | None, sop_uid: str | None) -> tuple[str, list[object]]:
    """WHERE conditions (aliases st, se, i; parameters from $2, $1 being the partition) addressing a
    study, series or instance, and their arguments."""
    conditions = ["st.study_instance_uid = $2"]
    args: list[object] = [study_uid]
    if series_uid is not None:
        args.append(series_uid)
        conditions.append(f"se.series_instance_uid = ${len(args) + 1}")
    if sop_uid is not None:
        args.append(sop_uid)
        conditions.append(f"i.sop_instance_uid = ${len(args) + 1}")
    return " AND ".join(conditions), args


_FROM = """FROM instance i
    JOIN series se ON se.series_key = i.series_key
    JOIN study st ON st.study_key = i.study_key
    WHERE i.partition_key = $1 AND """
# The first version of updated instances (bulk update), for `msdicom-request-original: true` reads: its
# columns where there is one, the instance's own otherwise.
_ORIGINAL = """ LEFT JOIN instance_original o
    ON o.partition_key = i.partition_key AND o.sop_instance_uid = i.sop_instance_uid"""


def _version(column: str, original: bool) -> str:
    return f"coalesce(o.{column}, i.{column})" if original else f"i.{column}"


def _from(original: bool) -> str:
    return _FROM.replace("\n    WHERE", _ORIGINAL + "\n    WHERE") if original else _FROM


_ORDER = " ORDER BY se.series_number NULLS LAST, se.series_key, i.instance_number NULLS LAST, i.instance_key"


async def find_instances(
    conn: asyncpg.Connection | asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    original: bool = False,
) -> list[StoredInstance]:
    """The stored objects of a study, series or instance, in series/instance-number order (`original`: the
    first version of updated instances)."""
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    v = functools.partial(_version, original=original)
    rows = await conn.fetch(
        f"""SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,
                   {v("transfer_syntax_uid")}, {v("storage_key")}, {v("size")}, {v("sha256")}
            {_from(original)}{where}{_ORDER}""",
        partition_key,
        *args,
    )
    return [StoredInstance(*row) for row in rows]


async def find_metadata(
    conn: asyncpg.Connection | asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    original: bool = False,
) -> list[tuple[str, str, str, bytes]]:
    """(study, series, SOP instance UID, stored DICOM JSON as orjson bytes) of each addressed instance,
    in find_instances order (`original`: of the first version of updated instances)."""
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    rows = await conn.fetch(
        f"""SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid,
                   {_version("metadata", original)} {_from(original)}{where}{_ORDER}""",
        partition_key,
        *args,
    )
    return [tuple(row) for row in rows]


async def find_bulk_index(
    conn: asyncpg.Connection | asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    original: bool = False,
) -> tuple[StoredInstance, bytes] | None:
    """The instance and its bulk-data index (orjson [[path, offset, length, vr], ...])."""
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    v = functools.partial(_version, original=original)
    row = await conn.fetchrow(
        f"""SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,
                   {v("transfer_syntax_uid")}, {v("storage_key")}, {v("size")}, {v("bulk_index")}
            {_from(original)}{where}""",
        partition_key,
        *args,
    )
    if row is None:
        return None
    return StoredInstance(*list(row)[:7]), row["bulk_index"]


@dataclass(frozen=True, slots=True)
class IndexedObject:
    """An instance row as the scrub checks it: where its object is and what it must hash to."""

    instance_key: int
    partition_key: int
    instance: StoredInstance


async def objects_after(
    conn: asyncpg.Connection | asyncpg.Pool, after: int, limit: int
) -> list[IndexedObject]:
    """Instance rows of every partition after instance_key `after`, in key order: a resumable walk of
    everything the index references."""
    rows = await conn.fetch(
        """SELECT i.instance_key, i.partition_key, st.study_instance_uid, se.series_instance_uid,
                  i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.storage_key, i.size, i.sha256
           FROM instance i
           JOIN series se ON se.series_key = i.series_key
           JOIN study st ON st.study_key = i.study_key
           WHERE i.instance_key > $1 ORDER BY i.instance_key LIMIT $2""",
        after,
        limit,
    )
    return [IndexedObject(r[0], r[1], StoredInstance(*r[2:])) for r in rows]


async def originals_after(
    conn: asyncpg.Connection | asyncpg.Pool, after: tuple[int, str], limit: int
) -> list[IndexedObject]:
    """Original versions kept by bulk updates (instance_original), of every partition after (partition_key,
    SOP Instance UID) `after`, in that order (its primary key): a resumable walk of the objects the index
    references besides the current versions. `instance_key` is the current version's."""
    rows = await conn.fetch(
        """SELECT i.instance_key, o.partition_key, st.study_instance_uid, se.series_instance_uid,
                  o.sop_instance_uid, i.sop_class_uid, o.transfer_syntax_uid, o.storage_key, o.size, o.sha256
           FROM instance_original o
           JOIN instance i ON i.partition_key = o.partition_key AND i.sop_instance_uid = o.sop_instance_uid
           JOIN series se ON se.series_key = i.series_key
           JOIN study st ON st.study_key = i.study_key
           WHERE (o.partition_key, o.sop_instance_uid) > ($1, $2::text COLLATE "C")
           ORDER BY o.partition_key, o.sop_instance_uid LIMIT $3""",
        after[0],
        after[1],
        limit,
    )
    return [IndexedObject(r[0], r[1], StoredInstance(*r[2:])) for r in rows]


async def window_objects_after(
    conn: asyncpg.Connection | asyncpg.Pool, after: str, limit: int
) -> list[IndexedObject]:
    """Objects of deleted instances kept for their restore window (retention, deleted_object), after storage
    key `after`, in key order: what a restore would bring back. `instance_key` is 0: no row indexes them."""
    rows = await conn.fetch(
        """SELECT 0, partition_key, study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid,
                  transfer_syntax_uid, storage_key, size, sha256
           FROM deleted_object WHERE storage_key > $1 ORDER BY storage_key LIMIT $2""",
        after,
        limit,
    )
    return [IndexedObject(r[0], r[1], StoredInstance(*r[2:])) for r in rows]


async def all_objects(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """(storage_key, sha256 as hex, size) of every object the index references, current versions, the
    originals bulk updates keep and deleted instances' objects kept for a restore window (retention/), by
    key: what a backup must copy."""
    return await conn.fetch(
        """SELECT storage_key, encode(sha256, 'hex'), size FROM instance
           UNION ALL SELECT storage_key, encode(sha256, 'hex'), size FROM instance_original
           UNION ALL SELECT storage_key, encode(sha256, 'hex'), size FROM deleted_object
           ORDER BY 1"""
    )


async def is_indexed(conn: asyncpg.Connection | asyncpg.Pool, storage_keys: list[str]) -> set[str]:
    """Which of these object keys the index references, as a current or an original version, or as a
    deleted instance's object kept for its restore window (the orphan sweeper and the scrub ask)."""
    rows = await conn.fetch(
        """SELECT storage_key FROM instance WHERE storage_key = ANY($1::text[])
           UNION ALL SELECT storage_key FROM instance_original WHERE storage_key = ANY($1::text[])
           UNION ALL SELECT storage_key FROM deleted_object WHERE storage_key = ANY($1::text[])""",
        storage_keys,
    )
    return {row[0] for row in rows}


def valid_partition_name(name: str) -> bool:
    """Azure's rule for a partition name (1-64 letters, digits, '_', '.', '-'), less '.' and '..': those are
    URL dot segments, which clients remove from a path (RFC 3986 5.2.4), so a partition named '..' would
    hand out URLs (/partitions/../studies/...) that every client resolves into another partition."""
    return (
        1 <= len(name) <= 64
        and name.isascii()
        and all(c.isalnum() or c in "_.-" for c in name)
        and name not in (".", "..")
    )


async def partition_key(conn: asyncpg.Connection | asyncpg.Pool, name: str, *, create: bool) -> int | None:
    """The key of a data partition by name; created on first use when `create` (as Azure does on STOW)."""
    key = await conn.fetchval("SELECT partition_key FROM partition WHERE name = $1", name)
    if key is None and create:
        key = await conn.fetchval(
            """INSERT INTO partition (name) VALUES ($1)
               ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING partition_key""",
            name,
        )
    return key


async def all_partitions(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    """Every data partition (partition_key, name, created_at), by key: partitions are few (one per
    source or research request), never renamed or removed."""
    return await conn.fetch("SELECT partition_key, name, created_at FROM partition ORDER BY partition_key")


async def find_patient_studies(
    conn: asyncpg.Connection | asyncpg.Pool,
    partition_key: int,
    patient_ids: Sequence[str],
    issuers: Sequence[str] | None = None,
) -> list[str]:
    """The Study Instance UIDs of these patients: PATIENT-level C-MOVE/C-GET (by Patient ID, any issuer),
    HL7 patient updates (`issuers[n]` the Issuer of Patient ID of `patient_ids[n]`; a study stored without an
    issuer, or an identifier given without one, matches on the ID alone)."""
    rows = await conn.fetch(
        """SELECT st.study_instance_uid FROM study st JOIN patient p ON p.patient_key = st.patient_key
           JOIN unnest($2::text[], $3::text[]) AS ident(id, issuer) ON st.patient_id = ident.id
               AND (ident.issuer = '' OR p.issuer_of_patient_id IN ('', ident.issuer))
           WHERE st.partition_key = $1 GROUP BY st.study_key ORDER BY st.study_key""",
        partition_key,
        list(patient_ids),
        list(issuers) if issuers is not None else [""] * len(patient_ids),
    )
    return [row[0] for row in rows]


async def study_instance_count(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, study_uid: str
) -> int:
    return await conn.fetchval(
        """SELECT count(*) FROM study s JOIN instance i ON i.study_key = s.study_key
           WHERE s.partition_key = $1 AND s.study_instance_uid = $2""",
        partition_key,
        study_uid,
    )


_WALK = """SELECT i.instance_key, s.study_instance_uid, se.series_instance_uid, i.sop_instance_uid,
                  i.sop_class_uid, i.transfer_syntax_uid, i.storage_key, i.size
           FROM study s JOIN instance i ON i.study_key = s.study_key
           JOIN series se ON se.series_key = i.series_key
           WHERE s.partition_key = $1 AND """


async def study_instances_after(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, study_uid: str, after: int, limit: int
) -> list[tuple[int, StoredInstance]]:
    """(instance_key, instance) of a study after `after`, in instance_key order: a resumable walk."""
    rows = await conn.fetch(
        _WALK + "s.study_instance_uid = $2 AND i.instance_key > $3 ORDER BY i.instance_key LIMIT $4",
        partition_key,
        study_uid,
        after,
        limit,
    )
    return [(r[0], StoredInstance(*r[1:])) for r in rows]


async def study_instances_after_uid(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, study_uid: str, after: str, limit: int
) -> list[tuple[int, StoredInstance]]:
    """(instance_key, instance) of a study after SOP Instance UID `after`, in UID order: a resumable walk
    over instances that get new rows (bulk update), which keeps their UIDs but not their instance_keys."""
    rows = await conn.fetch(
        _WALK + "s.study_instance_uid = $2 AND i.sop_instance_uid > $3 ORDER BY i.sop_instance_uid LIMIT $4",
        partition_key,
        study_uid,
        after,
        limit,
    )
    return [(r[0], StoredInstance(*r[1:])) for r in rows]


async def instances_by_uid(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, sop_uids: Sequence[str]
) -> list[tuple[int, StoredInstance]]:
    """(instance_key, instance) of those of these SOP instances the partition holds."""
    rows = await conn.fetch(_WALK + "i.sop_instance_uid = ANY($2::text[])", partition_key, list(sop_uids))
    return [(r[0], StoredInstance(*r[1:])) for r in rows]


@dataclass(frozen=True, slots=True)
class HeldInstance:
    size: int
    created_at: datetime


async def held_instances(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, study_uid: str
) -> dict[str, HeldInstance]:
    """A study's instances in the partition, by SOP Instance UID."""
    rows = await conn.fetch(
        """SELECT i.sop_instance_uid, i.size, i.created_at
           FROM study s JOIN instance i ON i.study_key = s.study_key
           WHERE s.partition_key = $1 AND s.study_instance_uid = $2""",
        partition_key,
        study_uid,
    )
    return {r["sop_instance_uid"]: HeldInstance(r["size"], r["created_at"]) for r in rows}


async def stored_sop_classes(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, sop_uids: Sequence[str]
) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of those of the instances the partition holds."""
    rows = await conn.fetch(
        "SELECT sop_instance_uid, sop_class_uid FROM instance WHERE partition_key = $1 "
        "AND sop_instance_uid = ANY($2::text[])",
        partition_key,
        list(set(sop_uids)),
    )
    return {r["sop_instance_uid"]: r["sop_class_uid"] for r in rows}
