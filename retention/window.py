"""The restore window of delayed deletion: keeping deleted instances' objects, restoring, purging.

A delayed delete removes the index rows through the normal path (change feed `delete` entries, counters,
level attributes), so the instances are gone for QIDO, WADO and the change feed exactly as after any
delete; only their objects stay, with what is needed to index them again, in `deleted_object`. A restore
indexes them again like a store (change feed `create` entries); the purge hands them to the normal
deletion queue once the window has passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from archive.ingest import created_changes
from changefeed.log import append
from indexer.lookup import scope_sql
from indexer.writes import InstanceRecord, Outcome, index_instances, keep_originals_sql
from retention.guard import lock_study

_COLUMNS = """storage_key, partition_key, study_instance_uid, series_instance_uid, sop_instance_uid, original,
    sop_class_uid, transfer_syntax_uid, size, sha256, metadata, bulk_index, created_at, study_created_at,
    deleted_at, purge_after"""


async def keep_objects(
    conn: asyncpg.Connection,
    partition_key: int,
    scope: tuple[str, str | None, str | None],
    deleted_at: datetime,
    purge_after: datetime,
) -> set[str]:
    """Copy the addressed instances (and their bulk-update originals) into deleted_object, locking their
    rows as the removal will; the storage keys kept. Run right before removing them, in one transaction."""
    where, args = scope_sql(*scope)
    n = len(args) + 2
    rows = await conn.fetch(
        f"""WITH doomed AS (
                SELECT i.*, st.study_instance_uid, se.series_instance_uid, st.created_at AS study_created_at
                FROM instance i JOIN series se USING (series_key) JOIN study st ON st.study_key = i.study_key
                WHERE i.partition_key = $1 AND {where}
                FOR UPDATE OF i)
            INSERT INTO deleted_object ({_COLUMNS})
            SELECT storage_key, partition_key, study_instance_uid, series_instance_uid, sop_instance_uid,
                   false, sop_class_uid, transfer_syntax_uid, size, sha256, metadata, bulk_index, created_at,
                   study_created_at, ${n}::timestamptz, ${n + 1}::timestamptz
            FROM doomed
            UNION ALL
            SELECT o.storage_key, d.partition_key, d.study_instance_uid, d.series_instance_uid,
                   d.sop_instance_uid, true, d.sop_class_uid, o.transfer_syntax_uid, o.size, o.sha256,
                   o.metadata, o.bulk_index, o.created_at, d.study_created_at, ${n}::timestamptz,
                   ${n + 1}::timestamptz
            FROM doomed d JOIN instance_original o
              ON o.partition_key = d.partition_key AND o.sop_instance_uid = d.sop_instance_uid
            ON CONFLICT (storage_key) DO NOTHING
            RETURNING storage_key""",
        partition_key,
        *args,
        deleted_at,
        purge_after,
    )
    return {row[0] for row in rows}


async def queue_for_deletion(conn: asyncpg.Connection, storage_keys: list[str]) -> None:
    """Hand objects to the normal deletion queue (archive.maintenance removes them)."""
    if storage_keys:  # one statement: a purged study can have many thousands
        await conn.execute(
            "INSERT INTO blob_deletion (storage_key) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            storage_keys,
        )


def _record(r: asyncpg.Record) -> InstanceRecord:
    """A kept instance as ingest hands it to the index (its metadata is the DICOM JSON ingest built)."""
    return InstanceRecord(
        r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"], r["sop_class_uid"],
        r["transfer_syntax_uid"], orjson.loads(r["metadata"]), r["storage_key"], r["size"], r["sha256"],
        r["metadata"], r["bulk_index"],
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Restored:
    restored: int  # instances indexed again
    superseded: int  # kept objects not restored: the instance was stored again meanwhile; now queued

    def as_json(self) -> dict[str, int]:
        return {"restoredInstances": self.restored, "supersededObjects": self.superseded}


async def restore_in(conn: asyncpg.Connection, partition_key: int, study_uid: str, now: datetime) -> Restored:
    """Index again every instance of the study deleted within its window (under the study's lock). An
    instance stored again since its deletion stays as stored; the kept object is queued for deletion.
    Of an instance deleted several times in the window, the last deleted version comes back."""
    await lock_study(conn, partition_key, study_uid)
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM deleted_object
            WHERE partition_key = $1 AND study_instance_uid = $2 AND purge_after > $3
            ORDER BY original, deleted_at DESC, storage_key
            FOR UPDATE""",
        partition_key,
        study_uid,
        now,
    )
    if not rows:
        return Restored(0, 0)
    latest: dict[str, asyncpg.Record] = {}
    for row in rows:
        if not row["original"]:
            latest.setdefault(row["sop_instance_uid"], row)
    # oldest first: the latest stored instance of a study or series supplies its attributes, as at ingest
    current = sorted(latest.values(), key=lambda r: (r["created_at"], r["storage_key"]))
    records = [_record(r) for r in current]
    results = await index_instances(conn, partition_key, records)
    back = {
        rec.storage_key for rec, res in zip(records, results, strict=True) if res.outcome is Outcome.CREATED
    }
    back_sops = {r["sop_instance_uid"] for r in current if r["storage_key"] in back}
    originals = [r for r in rows if r["original"] and r["sop_instance_uid"] in back_sops]
    kept_originals = await conn.fetch(
        keep_originals_sql("deleted_object", "storage_key = ANY($1::text[])"),
        [r["storage_key"] for r in originals],
    )
    back |= {row[0] for row in kept_originals}
    # the restored rows keep their ingest times, and the study its first ingest (minimum retention)
    await conn.execute(
        """UPDATE instance i SET created_at = d.created_at FROM deleted_object d
           WHERE i.storage_key = d.storage_key AND d.storage_key = ANY($1::text[])""",
        list(back),
    )
    await conn.execute(
        """UPDATE study SET created_at = least(created_at, $3)
           WHERE partition_key = $1 AND study_instance_uid = $2""",
        partition_key,
        study_uid,
        min(r["study_created_at"] for r in rows),
    )
    superseded = [r["storage_key"] for r in rows if r["storage_key"] not in back]
    await queue_for_deletion(conn, superseded)
    await conn.execute(
        "DELETE FROM deleted_object WHERE storage_key = ANY($1::text[])", [r["storage_key"] for r in rows]
    )
    await append(conn, partition_key, created_changes(records, results))  # last: the counter lock
    return Restored(sum(r.outcome is Outcome.CREATED for r in results), len(superseded))


@dataclass(frozen=True, slots=True)
class Purged:
    partition_key: int
    study_instance_uid: str
    objects: int


async def purge_due(conn: asyncpg.Connection, now: datetime, *, studies: int = 50) -> list[Purged]:
    """Queue for deletion the kept objects whose window has passed, of up to `studies` studies, except
    those of studies under legal hold (a hold keeps them until it is removed); per study, what was purged.
    Each study's lock is taken first, so a hold or a restore committing meanwhile is respected."""
    due = await conn.fetch(
        """SELECT DISTINCT d.partition_key, d.study_instance_uid FROM deleted_object d
           WHERE d.purge_after <= $1 AND NOT EXISTS (
               SELECT 1 FROM legal_hold h
               WHERE h.partition_key = d.partition_key AND h.study_instance_uid = d.study_instance_uid)
           ORDER BY 1, 2 LIMIT $2""",
        now,
        studies,
    )
    purged = []
    for partition_key, study_uid in due:
        await lock_study(conn, partition_key, study_uid)
        keys = await conn.fetch(
            """DELETE FROM deleted_object d
               WHERE d.partition_key = $1 AND d.study_instance_uid = $2 AND d.purge_after <= $3
                 AND NOT EXISTS (SELECT 1 FROM legal_hold h
                                 WHERE h.partition_key = $1 AND h.study_instance_uid = $2)
               RETURNING storage_key""",
            partition_key,
            study_uid,
            now,
        )
        await queue_for_deletion(conn, [row[0] for row in keys])
        if keys:
            purged.append(Purged(partition_key, study_uid, len(keys)))
    return purged
