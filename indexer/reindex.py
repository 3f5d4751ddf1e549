"""Re-index: fills newly added extended query tags for everything already stored, as a background operation.

Values come from the metadata the index keeps (instance.metadata: the full DICOM JSON of each instance),
never from the stored objects. Each level of the operation's tags is a keyset scan over that level's rows
(study_key, series_key, instance_key) up to the bound recorded when the tags were added: rows above it were
indexed by writes that already knew the tags (see indexer.extended_tags). Each step handles one batch and
commits its values with the checkpoint (indexer.operations), so a resumed operation continues after the
last committed batch and never stores a value twice.

Study and series values come from the level's latest stored instance, as their attrs blobs do. Their rows
are locked (FOR SHARE) while a batch computes them, so a concurrent write of a newer instance either
commits first (and the batch reads it) or waits and then replaces the values itself. Instance rows are
locked FOR KEY SHARE for the same reason against deletes: the delete triggers that remove an instance's
values cannot see a batch's uncommitted rows, so a delete must either commit first (the batch then skips
the row) or wait for the batch. Metadata updates take weaker locks and are not held up.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from indexer.attributes import Level
from indexer.extended_tags import LEVEL_NAMES, ExtendedTag, query_tags
from indexer.extended_values import Collected, Source, collect, delete_values, insert_errors, insert_values
from indexer.operations import Operation, Step

ORDER = (Level.STUDY, Level.SERIES, Level.INSTANCE)
_KEY = {Level.STUDY: "study_key", Level.SERIES: "series_key"}
_UID = {Level.STUDY: "study_instance_uid", Level.SERIES: "series_instance_uid"}


class ReindexHandler:
    """The `reindex` operation type: params {"tags": [tag_key], "bounds": {level name: last key}}."""

    def __init__(self, batch_size: int = 2000) -> None:
        self.batch_size = batch_size

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        wanted = set(op.params.get("tags", []))
        tags = [t for t in (await query_tags(conn)).values() if t.tag_key in wanted and t.status == "Adding"]
        checkpoint: dict[str, Any] = dict(op.checkpoint or {"level": None, "after": 0, "processed": 0})
        levels = [lvl for lvl in ORDER if any(t.level is lvl for t in tags)]
        level = _current_level(checkpoint.get("level"), levels)
        if level is None:
            return await self._finish(conn, op, tags, checkpoint)
        if checkpoint.get("level") != LEVEL_NAMES[level]:
            checkpoint.update(level=LEVEL_NAMES[level], after=0)
        bound = int(op.params["bounds"][LEVEL_NAMES[level]])
        level_tags = [t for t in tags if t.level is level]
        last = await self._batch(conn, level, level_tags, int(checkpoint["after"]), bound, checkpoint)
        index = levels.index(level)
        if last is None:  # this level is done
            following = levels[index + 1 :]
            if not following:
                return await self._finish(conn, op, tags, checkpoint)
            checkpoint.update(level=LEVEL_NAMES[following[0]], after=0)
            return Step(checkpoint, int(100 * (index + 1) / len(levels)))
        checkpoint["after"] = last
        fraction = min(1.0, last / bound) if bound else 1.0
        return Step(checkpoint, int(100 * (index + fraction) / len(levels)))

    async def _batch(
        self,
        conn: asyncpg.Connection,
        level: Level,
        tags: list[ExtendedTag],
        after: int,
        bound: int,
        checkpoint: dict[str, Any],
    ) -> int | None:
        """Index one batch of the level's rows after `after`; the last key done, None when none were left."""
        if level is Level.INSTANCE:
            rows = await conn.fetch(
                """SELECT instance_key AS row_key, instance_key, metadata FROM instance
                   WHERE instance_key > $1 AND instance_key <= $2 ORDER BY instance_key LIMIT $3
                   FOR KEY SHARE""",
                after,
                bound,
                self.batch_size,
            )
            if not rows:
                return None
            last = rows[-1]["row_key"]
        else:
            key, uid = _KEY[level], _UID[level]
            table = level.value
            # The batch is a range of keys, but its rows are locked in UID order, the order in which a STOW
            # batch locks the studies (then the series) it writes: locked in key order, a batch and a STOW
            # of several studies can each hold a row the other waits for (a deadlock, and one of them fails).
            batch = await conn.fetch(
                f"SELECT {key} FROM {table} WHERE {key} > $1 AND {key} <= $2 ORDER BY {key} LIMIT $3",
                after,
                bound,
                self.batch_size,
            )
            if not batch:
                return None
            last = batch[-1][0]
            rows = await conn.fetch(
                f"""SELECT s.{key} AS row_key, r.instance_key, r.metadata
                    FROM (SELECT {key} FROM {table} WHERE {key} = ANY($1::bigint[])
                          ORDER BY {uid} FOR SHARE) AS s
                    CROSS JOIN LATERAL (SELECT i.instance_key, i.metadata FROM instance i
                                        WHERE i.{key} = s.{key} ORDER BY i.instance_key DESC LIMIT 1) AS r
                    ORDER BY s.{key}""",
                [r[0] for r in batch],
            )
        sources = [Source(r["row_key"], r["instance_key"], r["metadata"]) for r in rows]
        collected: Collected = await asyncio.to_thread(collect, tags, sources)
        if level is not Level.INSTANCE:
            await delete_values(conn, tags, [s.row_key for s in sources])
        await insert_values(conn, collected.rows)
        failed = await insert_errors(conn, collected.errors)
        if failed:
            await conn.execute(
                """UPDATE extended_query_tag SET query_status = 'Disabled', updated_at = now()
                   WHERE tag_key = ANY($1::int[])""",
                failed,
            )
        checkpoint["processed"] = int(checkpoint.get("processed", 0)) + len(rows)
        return last

    async def _finish(
        self, conn: asyncpg.Connection, op: Operation, tags: list[ExtendedTag], checkpoint: dict[str, Any]
    ) -> Step:
        keys = [t.tag_key for t in tags]
        await conn.execute(
            """UPDATE extended_query_tag SET status = 'Ready', updated_at = now()
               WHERE tag_key = ANY($1::int[]) AND status = 'Adding'""",
            keys,
        )
        errors = await conn.fetchval(
            "SELECT count(*) FROM extended_query_tag_error WHERE tag_key = ANY($1::int[])", keys
        )
        # fresh per-tag statistics (migration 0005) before the tags are queried: the plans depend on them
        for table in sorted({t.table for t in tags}):
            await conn.execute(f"ANALYZE {table}")
        results = {
            "tags": sorted(t.path for t in tags),
            "processedRows": int(checkpoint.get("processed", 0)),
            "errors": errors,
        }
        return Step(checkpoint, 100, done=True, results=results)


def _current_level(name: str | None, levels: list[Level]) -> Level | None:
    """The level to work on: the checkpoint's, or the next one that still has tags (some may be deleted)."""
    if name is None:
        return levels[0] if levels else None
    position = next(i for i, lvl in enumerate(ORDER) if LEVEL_NAMES[lvl] == name)
    for lvl in levels:
        if ORDER.index(lvl) >= position:
            return lvl
    return None
