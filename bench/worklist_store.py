"""UPS-RS claim/update/complete through `worklist.store` in-process (no HTTP), remembered versions off and on.

    python -m bench.worklist_store [--data-dir bench/out/worklist] [--cycles 1000] [--rounds 3]

Runs on the PostgreSQL data directory `bench.worklist` made (its SCHEDULED items; rerun that bench with
--reschedule to put them back). Each round runs `--cycles` cycles with the remembered versions off, then as
many on (worklist.store._REMEMBER_SECONDS), 8 concurrent workers, and prints cycles/s and CPU per cycle of
this process and of the PostgreSQL cluster. Alternating in one process keeps the machine's changing load out
of the comparison as far as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
import uuid
from pathlib import Path

import asyncpg

from bench.common import tree_cpu_seconds
from bench.ups_synthetic import performed
from dicomweb.app import keep_session
from indexer.embedded import EmbeddedPostgres
from worklist import store
from worklist.states import State


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(dsn: str, postmaster: int, items: list[str], remember: bool) -> None:
    store._REMEMBER_SECONDS = 30.0 if remember else 0.0
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8, reset=keep_session)
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            tuid = f"2.25.{uuid.uuid4().int}"
            await store.set_state(pool, 1, item, State.IN_PROGRESS, tuid)
            await store.update(pool, 1, item, tuid, performed())
            await store.set_state(pool, 1, item, State.COMPLETED, tuid)

    try:
        db, own, started = tree_cpu_seconds({postmaster}), _own_cpu(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(8)))
        elapsed = time.perf_counter() - started
        own, db = _own_cpu() - own, tree_cpu_seconds({postmaster}) - db
    finally:
        await pool.close()
    n = len(items)
    print(
        f"remembered versions {'on ' if remember else 'off'}: {n / elapsed:,.0f} cycles/s; CPU per cycle: "
        f"this process {own / n * 1000:.2f} ms, PostgreSQL {db / n * 1000:.2f} ms",
        flush=True,
    )


async def main_async(dsn: str, postmaster: int, cycles: int, rounds: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        items = [
            r[0]
            for r in await conn.fetch(
                "SELECT sop_instance_uid FROM ups_workitem WHERE state = 0 ORDER BY random() LIMIT $1",
                2 * cycles * rounds,
            )
        ]
    finally:
        await conn.close()
    if len(items) < 2 * cycles * rounds:
        raise SystemExit(f"only {len(items)} SCHEDULED items: run bench.worklist --reschedule first")
    for n in range(2 * rounds):
        await run(dsn, postmaster, items[n * cycles : (n + 1) * cycles], remember=n % 2 == 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/worklist"))
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    directory = args.data_dir.resolve() / "postgres"
    with EmbeddedPostgres(directory) as pg:
        postmaster = int((directory / "data" / "postmaster.pid").read_text().split()[0])
        asyncio.run(main_async(pg.dsn, postmaster, args.cycles, args.rounds))


if __name__ == "__main__":
    main()
