"""What the rendered and thumbnail resources need from the index: the representative image of a study or
series, and the thumbnail cache (migration 0007)."""

from __future__ import annotations

import contextlib

import asyncpg

from indexer.lookup import StoredInstance, scope_sql

_SELECT = """SELECT st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid,
           i.transfer_syntax_uid, i.storage_key, i.size, i.instance_key, i.number_of_frames,
           i.rows IS NOT NULL AS is_image
    FROM instance i
    JOIN series se ON se.series_key = i.series_key
    JOIN study st ON st.study_key = i.study_key
    WHERE i.partition_key = $1 AND """


async def representative(
    conn: asyncpg.Connection | asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> tuple[StoredInstance, int, int] | None:
    """(instance, instance_key, number of frames) of the image that stands for a study, series or instance.

    For a study: the first series (by number) that holds images; within a series: the middle image by
    instance number (for a CT or MR series a slice through the middle of the volume). Instances without
    Rows are not images and are chosen only when nothing else is there (rendering then reports why).
    """
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    rows = await conn.fetch(
        f"""{_SELECT}{where}
            ORDER BY (i.rows IS NULL), se.series_number NULLS LAST, se.series_key,
                     i.instance_number NULLS LAST, i.instance_key""",
        partition_key,
        *args,
    )
    if not rows:
        return None
    first = rows[0]
    same = [r for r in rows if r["series_instance_uid"] == first["series_instance_uid"]]
    if first["number_of_frames"] is None and len(same) > 1:
        images = [r for r in same if r["is_image"]] or same
        row = images[(len(images) - 1) // 2]
    else:
        row = first
    instance = StoredInstance(*list(row)[:7])
    return instance, row["instance_key"], row["number_of_frames"] or 1


async def find_image(
    conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, study_uid: str, series_uid: str, sop_uid: str
) -> tuple[StoredInstance, int, int] | None:
    """(instance, instance_key, number of frames) of one instance."""
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    row = await conn.fetchrow(f"{_SELECT}{where}", partition_key, *args)
    if row is None:
        return None
    return StoredInstance(*list(row)[:7]), row["instance_key"], row["number_of_frames"] or 1


async def cached_thumbnail(
    conn: asyncpg.Connection | asyncpg.Pool, instance_key: int, variant: str
) -> bytes | None:
    return await conn.fetchval(
        "SELECT body FROM thumbnail WHERE instance_key = $1 AND variant = $2", instance_key, variant
    )


async def store_thumbnail(
    conn: asyncpg.Connection | asyncpg.Pool, instance_key: int, variant: str, body: bytes
) -> None:
    """Keep a rendered thumbnail; a concurrent render of the same one, or a delete meanwhile, is harmless."""
    with contextlib.suppress(asyncpg.ForeignKeyViolationError):  # the instance went away meanwhile
        await conn.execute(
            """INSERT INTO thumbnail (instance_key, variant, body)
           SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM instance WHERE instance_key = $1)
           ON CONFLICT DO NOTHING""",
            instance_key,
            variant,
            body,
        )
