"""How long deleting an extended query tag with many values holds stores up, before and after the deletion
became a background operation (indexer.tag_deletion).

One tag (IS, instance level) gets `--values` rows in ext_long. A prober takes INGEST_LOCK shared in a loop,
as every store does first (indexer.writes), and records how long each acquisition waited:

* synchronous (as the DELETE request did before): one transaction that takes INGEST_LOCK exclusively and
  deletes the tag and all its values; it is rolled back, so the same rows serve the second measurement;
* background: the DELETE request's transaction (indexer.extended_tags.delete_tag: mark Deleting, queue the
  operation), then the operation run to its end by an OperationRunner, as a server process would.

CPU is the PostgreSQL backends' user + system time (from /proc), which the machine's other load does not skew.

    python -m bench.tag_deletion --values 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench.common import cpu_seconds
from indexer.embedded import EmbeddedPostgres
from indexer.extended_tags import DELETE_TAG, INGEST_LOCK, delete_tag
from indexer.migrate import migrate
from indexer.operations import OperationRunner
from indexer.tag_deletion import TagDeletionHandler

TAG = 0x00200012  # AcquisitionNumber


@contextlib.contextmanager
def database(url: str | None, scratch: Path) -> Iterator[str]:
    if url:
        yield url
        return
    server = EmbeddedPostgres(scratch / "pg", fast_unsafe=True)
    try:
        yield server.start()
    finally:
        server.stop()


class Prober:
    """Takes INGEST_LOCK shared every millisecond, as a store's transaction does; the longest wait."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn, self.longest, self.count = conn, 0.0, 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            async with self.conn.transaction():
                await self.conn.execute("SELECT pg_advisory_xact_lock_shared($1)", INGEST_LOCK)
            self.longest = max(self.longest, time.perf_counter() - started)
            self.count += 1
            await asyncio.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()


async def fill(conn: asyncpg.Connection, values: int) -> int:
    tag_key = await conn.fetchval(
        """INSERT INTO extended_query_tag (path, vr, level, status)
           VALUES ('00200012', 'IS', 'Instance', 'Ready') RETURNING tag_key"""
    )
    await conn.execute(
        "INSERT INTO ext_long SELECT $1, g, g % 1000 FROM generate_series(1, $2) AS g", tag_key, values
    )
    await conn.execute("VACUUM ANALYZE ext_long")
    return tag_key


async def measure(dsn: str, values: int, batch: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        conn = await asyncpg.connect(dsn)
        stack.push_async_callback(conn.close)
        await migrate(conn)
        tag_key = await fill(conn, values)
        probe_conn = await asyncpg.connect(dsn)
        stack.push_async_callback(probe_conn.close)
        print(f"{values:,} values of one tag; batch {batch:,}")

        # synchronous, as before: rolled back so that the rows stay for the second measurement
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        prober = Prober(probe_conn)
        probing = asyncio.create_task(prober.run())
        await asyncio.sleep(0.05)
        cpu0, started = cpu_seconds([pid]), time.perf_counter()
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT pg_advisory_xact_lock($1)", INGEST_LOCK)
        await conn.execute("DELETE FROM extended_query_tag WHERE tag_key = $1", tag_key)
        await conn.execute("DELETE FROM ext_long WHERE tag_key = $1", tag_key)
        held = time.perf_counter() - started
        await tx.rollback()
        cpu = cpu_seconds([pid]) - cpu0
        await asyncio.sleep(0.05)
        prober.stop()
        await probing
        print(f"synchronous: INGEST_LOCK held {held * 1000:.0f} ms, longest store wait "
              f"{prober.longest * 1000:.0f} ms, backend CPU {cpu:.2f} s")  # fmt: skip

        # background: the DELETE request's transaction, then the operation
        await conn.execute("VACUUM ext_long")
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
        stack.push_async_callback(pool.close)
        pids = [
            r[0] for r in await asyncio.gather(*(pool.fetchrow("SELECT pg_backend_pid()") for _ in range(4)))
        ]
        pids = sorted(set(pids) | {pid})
        prober = Prober(probe_conn)
        probing = asyncio.create_task(prober.run())
        await asyncio.sleep(0.05)
        cpu0, started = cpu_seconds(pids), time.perf_counter()
        async with conn.transaction():
            op = await delete_tag(conn, TAG)
        request = time.perf_counter() - started
        assert op is not None
        runner = OperationRunner(pool, {DELETE_TAG: TagDeletionHandler(batch)})
        while await runner.run_once():
            pass
        total = time.perf_counter() - started
        cpu = cpu_seconds(pids) - cpu0
        prober.stop()
        await probing
        left = await conn.fetchval("SELECT count(*) FROM ext_long")
        print(f"background: DELETE request {request * 1000:.0f} ms, deletion done after {total:.2f} s, "
              f"longest store wait {prober.longest * 1000:.0f} ms, backend CPU {cpu:.2f} s; "
              f"values left {left}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--database-url", help="an empty database (default: an embedded PostgreSQL)")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="tag-deletion-bench-") as tmp,
        database(args.database_url, Path(tmp)) as dsn,
    ):
        asyncio.run(measure(dsn, args.values, args.batch))


if __name__ == "__main__":
    main()
