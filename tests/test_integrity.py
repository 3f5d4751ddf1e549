"""Faults between storage and index, concurrent migrators, oversized bodies: nothing half-stored or lost."""

from __future__ import annotations

import asyncio
import io
import random
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from archive import ingest
from archive.ingest import FailureReason, Ingestor
from archive.maintenance import drain_deletions, sweep_orphans
from bench.synthetic import instance_variants, make_study, multipart_body
from indexer.lookup import find_instances
from indexer.migrate import available_migrations, migrate
from indexer.writes import remove_instances
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive


def files(seed: int, count: int) -> tuple[object, list[bytes]]:
    spec = make_study(random.Random(seed), series_count=1)
    return spec, instance_variants(spec, 0, count, start=seed * 1000)


async def test_concurrent_migrators_apply_each_migration_once(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [name for r in results for name in r]
        assert sorted(applied) == sorted(name for _, name, _ in available_migrations())
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == [v for v, _, _ in available_migrations()]
        assert await migrate(conns[0]) == []
    finally:
        for c in conns:
            await c.close()


async def test_index_failure_leaves_no_object_and_no_instance(
    pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    spec, data = files(1, 3)

    async def broken(*args: object, **kwargs: object) -> None:
        raise asyncpg.PostgresError("simulated failure while indexing")

    monkeypatch.setattr(ingest, "index_instances", broken)
    ingestor = Ingestor(pool, store, 1)
    for d in data:
        await ingestor.add(io.BytesIO(d))
    outcomes = await ingestor.finish()
    assert [o.failure for o in outcomes] == [FailureReason.PROCESSING_FAILURE] * 3
    assert [b async for b in store.list("")] == []
    assert await find_instances(pool, 1, spec.study_uid) == []


async def test_sweeper_removes_only_unreferenced_objects(pool: asyncpg.Pool, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    spec, data = files(2, 2)
    ingestor = Ingestor(pool, store, 1)
    for d in data:
        await ingestor.add(io.BytesIO(d))
    assert all(o.failure is None for o in await ingestor.finish())
    kept = sorted([b.key async for b in store.list("")])
    # a crash between storing an object and committing its row leaves this behind
    await store.put("p1/1.2.3/1.2.3.4/1.2.3.4.5.deadbeef.dcm", data[0])
    # young orphans are spared: their upload may still be on its way to the index
    assert await sweep_orphans(pool, store, grace=timedelta(hours=1)) == 0
    assert await sweep_orphans(pool, store, grace=timedelta(0)) == 1
    assert sorted([b.key async for b in store.list("")]) == kept
    # deleted instances' objects go through the queue, never through the sweeper
    async with pool.acquire() as conn, conn.transaction():
        removed = await remove_instances(conn, 1, spec.study_uid)
    assert len(removed) == 2
    assert await drain_deletions(pool, store) == 2
    assert [b async for b in store.list("")] == []
    assert await pool.fetchval("SELECT count(*) FROM blob_deletion") == 0
    assert await pool.fetchval("SELECT count(*) FROM study") == 0


async def test_oversized_instance_is_413_and_server_keeps_serving(local_archive: RunningArchive) -> None:
    _, data = files(3, 1)
    big = data[0] + b"\0" * (64 << 20)  # over the fixture's 64 MiB limit
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=60) as client:
        body, content_type = multipart_body([big])
        r = await client.post("/studies", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 413
        r = await client.post("/studies", content=big, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 413
        body, content_type = multipart_body(data)
        r = await client.post("/studies", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 200
    assert len([b async for b in local_archive.store.list("")]) == 1
