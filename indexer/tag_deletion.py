"""Deletion of an extended query tag as a background operation (type deleteExtendedQueryTag).

DELETE /extendedquerytags/{tag} only marks the tag Deleting and queues this operation
(indexer.extended_tags.delete_tag). From that commit on nothing adds values of the tag: QIDO refuses it,
stores skip it and a re-index has dropped it. So the steps need no lock but the operation row's: each one
deletes a batch of the tag's values, then of its elements (migration 0013), then of its errors, and commits
with the checkpoint (the heartbeat of indexer.operations). The last step removes the tag row, after which the
same path can be added again.

A worker killed mid-deletion loses its uncommitted batch only; whoever claims the operation next simply
goes on deleting what is left, so the checkpoint holds counts, not a position.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from indexer.extended_tags import TABLES, delete_tag
from indexer.operations import Operation, Step

ERRORS = "extended_query_tag_error"
ELEMENTS = "ext_element"  # the tag's elements as QIDO returns them (migration 0013)


class TagDeletionHandler:
    """params {"tag": tag_key, "path": GGGGEEEE, "table": its value table}."""

    def __init__(self, batch_size: int = 5000) -> None:
        self.batch_size = batch_size

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        tag_key, table = int(op.params["tag"]), str(op.params["table"])
        if table not in TABLES:  # it is interpolated into SQL below
            raise ValueError(f"unknown value table {table!r}")
        checkpoint: dict[str, Any] = dict(op.checkpoint or {})
        if "total" not in checkpoint:  # first step: how much there is, for percentComplete
            checkpoint["total"] = sum([await _count(conn, t, tag_key) for t in (table, ELEMENTS, ERRORS)])
            checkpoint.update(values=0, errors=0)
        checkpoint.setdefault("elements", 0)  # not in checkpoints written before migration 0013
        for source, counter in ((table, "values"), (ELEMENTS, "elements"), (ERRORS, "errors")):
            deleted = await _delete_batch(conn, source, tag_key, self.batch_size)
            if deleted:
                checkpoint[counter] += deleted
                done = checkpoint["values"] + checkpoint["elements"] + checkpoint["errors"]
                total = max(checkpoint["total"], done)
                return Step(checkpoint, int(99 * done / total) if total else 99)
        await conn.execute(
            "DELETE FROM extended_query_tag WHERE tag_key = $1 AND status = 'Deleting'", tag_key
        )
        results = {
            "tag": op.params.get("path"),
            "deletedValues": checkpoint["values"],
            "deletedErrors": checkpoint["errors"],
        }
        return Step(checkpoint, 100, done=True, results=results)


async def _count(conn: asyncpg.Connection, table: str, tag_key: int) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tag_key = $1", tag_key))


async def _delete_batch(conn: asyncpg.Connection, table: str, tag_key: int, limit: int) -> int:
    """Delete up to `limit` rows of the tag from `table` (found through its (tag_key, ...) index)."""
    status = await conn.execute(
        f"""DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {table} WHERE tag_key = $1 LIMIT $2))""",
        tag_key,
        limit,
    )
    return int(status.split()[-1])


async def delete_now(conn: asyncpg.Connection, tag: int) -> bool:
    """Delete a tag with all its values in the caller's transaction, without the runner (benches, tools);
    False when it does not exist. The API never does this: it is what made a DELETE block stores."""
    op = await delete_tag(conn, tag)
    if op is None:
        return False
    handler = TagDeletionHandler(batch_size=1_000_000)
    while not (step := await handler.step(conn, op)).done:
        op.checkpoint = step.checkpoint
    await conn.execute(
        """UPDATE operation SET status = 'succeeded', percent_complete = 100, checkpoint = $2::jsonb,
               results = $3::jsonb, finished_at = clock_timestamp(), updated_at = clock_timestamp()
           WHERE operation_id = $1""",
        op.id,
        orjson.dumps(step.checkpoint).decode(),
        orjson.dumps(step.results).decode(),
    )
    return True
