"""A batch's objects are flushed while its index statements run, and its rows commit only after the flush."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path

import asyncpg

from archive.ingest import FailureReason, Ingestor, StoreOutcome
from bench.synthetic import instance_variants, make_study
from storage import LocalBlobStore


class _HeldFlushStore(LocalBlobStore):
    """The local store whose make_durable waits for the test to let it finish (or fail)."""

    def __init__(self, root: Path, *, fail: bool = False) -> None:
        super().__init__(root)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = fail
        self.flushed: list[str] = []

    async def make_durable(self, keys: list[str]) -> None:
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise OSError(5, "Input/output error")
        await super().make_durable(keys)
        self.flushed.extend(keys)


def _study(seed: int, count: int) -> tuple[str, list[bytes]]:
    spec = make_study(random.Random(seed), series_count=1)
    return spec.study_uid, instance_variants(spec, 0, count, start=seed * 1000)


async def _ingest(pool: asyncpg.Pool, store: LocalBlobStore, parts: list[bytes]) -> list[StoreOutcome]:
    ingestor = Ingestor(pool, store, 1)
    for data in parts:
        await ingestor.add(io.BytesIO(data))
    return await ingestor.finish()


async def _wait_for_open_transaction(pool: asyncpg.Pool) -> None:
    """Until another backend has written the batch's rows and waits, in its open transaction, to commit."""
    for _ in range(500):
        waiting = await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND pid <> pg_backend_pid() AND state = 'idle in transaction'
               AND backend_xid IS NOT NULL"""
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the index statements did not run while the flush was held")


async def _counts(pool: asyncpg.Pool, study_uid: str) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM study WHERE study_instance_uid = $1) AS studies,
                  (SELECT count(*) FROM instance) AS instances,
                  (SELECT count(*) FROM changefeed) AS changes""",
        study_uid,
    )
    return row["studies"], row["instances"], row["changes"]


async def test_rows_commit_only_once_the_objects_are_durable(pool: asyncpg.Pool, tmp_path: Path) -> None:
    store = _HeldFlushStore(tmp_path / "blobs")
    study, data = _study(1, 5)
    task = asyncio.create_task(_ingest(pool, store, data))
    try:
        await asyncio.wait_for(store.started.wait(), 30)
        # the statements ran while the flush is held, and nothing of the batch is visible yet
        await _wait_for_open_transaction(pool)
        assert await _counts(pool, study) == (0, 0, 0)
        assert not task.done()
    finally:
        store.release.set()  # a failed check must not leave the batch's connection busy forever
    outcomes = await asyncio.wait_for(task, 30)
    assert [o.failure for o in outcomes] == [None] * 5
    assert await _counts(pool, study) == (1, 5, 5)
    keys = await pool.fetch("SELECT storage_key FROM instance ORDER BY storage_key")
    assert sorted(store.flushed) == [r["storage_key"] for r in keys]
    await store.close()


async def test_a_failed_flush_commits_nothing(pool: asyncpg.Pool, tmp_path: Path) -> None:
    store = _HeldFlushStore(tmp_path / "blobs", fail=True)
    study, data = _study(2, 3)
    task = asyncio.create_task(_ingest(pool, store, data))
    try:
        await asyncio.wait_for(store.started.wait(), 30)
        await _wait_for_open_transaction(pool)
    finally:
        store.release.set()
    outcomes = await asyncio.wait_for(task, 30)
    assert [(o.failure, o.message) for o in outcomes] == [
        (FailureReason.PROCESSING_FAILURE, "index write failed: OSError")
    ] * 3
    assert await _counts(pool, study) == (0, 0, 0)
    assert [b.key async for b in store.list("")] == []  # the objects of the refused batch are removed
    await store.close()


async def test_failed_statements_do_not_lose_the_flush_outcome(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """The statements fail while the flush still runs: the batch fails as a whole, nothing is left behind."""
    store = _HeldFlushStore(tmp_path / "blobs", fail=True)
    study, data = _study(3, 2)
    await pool.execute("ALTER TABLE changefeed ADD CONSTRAINT test_refuse CHECK (sequence < 0)")
    outcomes = await asyncio.wait_for(_ingest(pool, store, data), 30)
    assert [(o.failure, o.message) for o in outcomes] == [
        (FailureReason.PROCESSING_FAILURE, "index write failed: CheckViolationError")
    ] * 2
    assert await _counts(pool, study) == (0, 0, 0)
    assert [b.key async for b in store.list("")] == []
    store.release.set()  # the abandoned flush now fails; its error is retrieved, not reported as lost
    await asyncio.sleep(0.05)
    await store.close()
