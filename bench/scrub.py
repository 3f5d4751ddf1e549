"""Scrub throughput on the local store: every object read whole and hashed, as `dicomweb scrub` does.

`--instances` objects of `--rows`x`--rows` 16-bit pixels are stored through the ingest path (embedded
PostgreSQL, a scratch directory), then scrubbed twice by the scrub operation (archive/scrub.py) with no rate
limit: warm (the objects in the page cache, as just written) and cold (this bench's files evicted with
posix_fadvise(DONTNEED) first, which leaves the rest of the machine's cache alone). Figures: MB/s of object
bytes, and this process's CPU seconds per GB (what the machine's other load does not skew).

    python -m bench.scrub [--instances 2000] [--rows 512]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import tempfile
import time
from pathlib import Path

import asyncpg

from archive.ingest import Ingestor
from archive.scrub import SCRUB, ScrubHandler, scrub_params
from bench.common import cpu_seconds
from bench.synthetic import instance_variants, make_study
from indexer.embedded import EmbeddedPostgres
from indexer.migrate import migrate
from indexer.operations import OperationRunner, create_operation, get_operation
from storage import LocalBlobStore


async def load(pool: asyncpg.Pool, store: LocalBlobStore, instances: int, rows: int) -> int:
    rng = random.Random(7)
    total, per_study = 0, 100
    for start in range(0, instances, per_study):
        spec = make_study(rng, series_count=1, modalities=["CT"])
        ingestor = Ingestor(pool, store, 1)
        for data in instance_variants(spec, 0, min(per_study, instances - start), start=start, rows=rows,
                                      columns=rows):  # fmt: skip
            total += len(data)
            await ingestor.add(io.BytesIO(data))
        assert all(o.failure is None for o in await ingestor.finish())
    return total


def evict(root: Path) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def scrub_once(pool: asyncpg.Pool, store: LocalBlobStore) -> tuple[float, float, dict[str, object]]:
    async with pool.acquire() as conn:
        op = await create_operation(conn, SCRUB, scrub_params(0), [])
    runner = OperationRunner(pool, {SCRUB: ScrubHandler(store)})
    cpu, started = cpu_seconds([os.getpid()]), time.perf_counter()
    await runner.run_once(op.id)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds([os.getpid()]) - cpu
    async with pool.acquire() as conn:
        done = await get_operation(conn, op.id)
    assert done is not None and done.status == "succeeded", done
    return elapsed, cpu, done.results


async def run(args: argparse.Namespace, dsn: str, scratch: Path) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    store = LocalBlobStore(scratch / "blobs")
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        size = await load(pool, store, args.instances, args.rows)
        print(f"{args.instances} objects, {size / 1e6:.0f} MB ({size // args.instances} bytes each)")
        for label in ("warm", "cold"):
            if label == "cold":
                evict(store.root)
            elapsed, cpu, results = await scrub_once(pool, store)
            assert results["checkedBytes"] == size and results["clean"], results
            print(f"{label}: {size / elapsed / 1e6:.0f} MB/s ({elapsed:.2f} s), "
                  f"CPU {cpu / (size / 1e9):.2f} s/GB")  # fmt: skip
    finally:
        await store.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=512, help="rows = columns (512: ~500 KB objects)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomweb-bench-scrub-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg", fast_unsafe=True)
        try:
            dsn = server.start()
            asyncio.run(run(args, dsn, Path(tmp)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
