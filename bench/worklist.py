"""UPS-RS worklist: station search over 100,000 work items, claim/complete throughput, event latency.

    python -m bench.worklist [--items 100000] [--stations 50] [--searches 300] [--cycles 3000]
                             [--concurrency 32] [--probes 300] [--data-dir bench/out/worklist]
                             [--cycles-only] [--reschedule] [--py-spy FILE]

Starts a private PostgreSQL in the data directory and `dicomweb serve` on it (2 workers, --insecure-open),
then:

1. creates the work items through `POST /workitems` (concurrently), spread over `--stations` stations and
   a week of scheduled start times, and moves 60% of them to COMPLETED in SQL (a worklist with history:
   most rows are not SCHEDULED);
2. search: `GET /workitems?ProcedureStepState=SCHEDULED&ScheduledStationNameCodeSequence.CodeValue=STnn`
   (first page of 100, soonest first), one station at random per request, sequentially; p50/p95;
3. cycles: `--concurrency` workers each claim a SCHEDULED item (PUT state IN PROGRESS), set the performed
   procedure (POST, the final state requirement) and complete it (PUT state COMPLETED); cycles/s over
   `--cycles` cycles, with the CPU (archive, PostgreSQL) and WAL (bytes, full-page images, fsyncs, commits)
   per cycle. Once without subscribers, once more with a Worklist subscriber;
4. event latency: a WebSocket subscriber to the whole worklist while items are claimed at ~50/s; latency is
   from the event row's creation (clock_timestamp() in the writer's transaction, just before commit) to
   the moment the subscriber has parsed the report, so it includes the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import uvloop
from websockets.asyncio.client import connect

from bench.common import embedded_archive, percentile, serve_processes, tree_cpu_seconds
from bench.ups_synthetic import code, performed, workitem
from indexer.embedded import EmbeddedPostgres
from worklist import store
from worklist.validate import parse_dataset, prepare_create

JSON = {"Content-Type": "application/dicom+json"}


def uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


async def load(dsn: str, items: int, stations: int, concurrency: int = 8) -> float:
    """Items made by worklist.store.create (what POST /workitems runs after parsing and validation, which
    are validated once here): loading 100,000 over HTTP would dominate the run."""
    rng = random.Random(7)
    base = dt.datetime(2026, 11, 23, 7, 0)
    _, template, _ = prepare_create(parse_dataset(orjson.dumps(workitem())), "1.2.3")
    plan = []
    for _ in range(items):
        attrs = dict(template)
        item = uid()
        start = base + dt.timedelta(minutes=rng.randrange(7 * 24 * 60))
        attrs["00080018"] = {"vr": "UI", "Value": [item]}
        attrs["00404005"] = {"vr": "DT", "Value": [start.strftime("%Y%m%d%H%M%S")]}
        attrs["00404025"] = {"vr": "SQ", "Value": [code(f"ST{rng.randrange(stations):02d}", "station")]}
        attrs["00100020"] = {"vr": "LO", "Value": [f"P{rng.randrange(10**6)}"]}
        plan.append((item, attrs))
    queue = iter(plan)
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    started = time.perf_counter()

    async def worker() -> None:
        for item, attrs in queue:
            await store.create(pool, 1, item, attrs)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await pool.close()
    return time.perf_counter() - started


async def create_over_http(root: str, count: int, concurrency: int = 16) -> float:
    async def worker(client: httpx.AsyncClient, n: int) -> None:
        for _ in range(n):
            r = await client.post(f"{root}/workitems?{uid()}", content=orjson.dumps(workitem()), headers=JSON)
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, count // concurrency) for _ in range(concurrency)))
        return time.perf_counter() - started


async def age(dsn: str) -> None:
    """60% of the items COMPLETED, as in a worklist that has been in use for a while."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """UPDATE ups_workitem SET state = 2,
                   attrs = jsonb_set(attrs, '{00741000}', '{"vr": "CS", "Value": ["COMPLETED"]}'),
                   body = convert_to(
                       jsonb_set(attrs, '{00741000}', '{"vr": "CS", "Value": ["COMPLETED"]}')::text, 'UTF8')
               WHERE workitem_key % 5 < 3"""
        )
        await conn.execute("VACUUM ANALYZE ups_workitem, ups_queue")
    finally:
        await conn.close()


async def reschedule_used(dsn: str) -> int:
    """Items that earlier runs' cycles claimed (they have a Transaction UID) back to SCHEDULED, without the
    performed procedure, so that reruns on one data directory do not run out of SCHEDULED items."""
    scheduled = '{"00741000": {"vr": "CS", "Value": ["SCHEDULED"]}}'
    conn = await asyncpg.connect(dsn)
    try:
        status = await conn.execute(
            f"""UPDATE ups_workitem SET state = 0, transaction_uid = NULL,
                   attrs = (attrs - '00741216') || '{scheduled}',
                   body = convert_to(((attrs - '00741216') || '{scheduled}')::text, 'UTF8')
               WHERE transaction_uid IS NOT NULL"""
        )
        # the queue rows too (migration 0015), and the subscriptions the last run's start deleted
        await conn.execute("VACUUM ANALYZE ups_workitem, ups_queue, ups_subscription")
        return int(status.split()[-1])
    finally:
        await conn.close()


async def search(root: str, stations: int, rounds: int) -> list[float]:
    rng = random.Random(8)
    times = []
    async with httpx.AsyncClient(timeout=60) as client:
        for n in range(rounds + 20):
            params = {
                "ProcedureStepState": "SCHEDULED",
                "ScheduledStationNameCodeSequence.CodeValue": f"ST{rng.randrange(stations):02d}",
            }
            t = time.perf_counter()
            r = await client.get(f"{root}/workitems", params=params)
            elapsed = time.perf_counter() - t
            assert r.status_code in (200, 206), r.text
            assert len(r.json()) == 100
            if n >= 20:  # warm-up
                times.append(elapsed)
    return times


async def scheduled_uids(dsn: str, count: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT sop_instance_uid FROM ups_workitem WHERE state = 0 ORDER BY random() LIMIT $1", count
        )
        return [r[0] for r in rows]
    finally:
        await conn.close()


async def put_state(client: httpx.AsyncClient, root: str, item: str, state: str, tuid: str) -> None:
    body = {"00741000": {"vr": "CS", "Value": [state]}, "00081195": {"vr": "UI", "Value": [tuid]}}
    r = await client.put(f"{root}/workitems/{item}/state", content=orjson.dumps(body), headers=JSON)
    assert r.status_code == 200, r.text


class RawConnection:
    """A bare HTTP/1.1 keep-alive connection for the throughput phase.

    httpx costs the client several ms of CPU per request, more than the server spends; on a 2-core machine
    the load generator would then measure itself. This sends fixed requests and reads Content-Length
    bodies, which is all the phase needs.
    """

    def __init__(self, root: str) -> None:
        url = httpx.URL(root)
        self.host, self.port, self.prefix = url.host, url.port or 80, url.path.rstrip("/")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/dicom+json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await self.reader.readexactly(length)
        return int(status_line.split()[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def cycles(root: str, items: list[str], concurrency: int) -> float:
    queue = iter(items)
    payload = orjson.dumps(performed())

    def state(value: str, tuid: str) -> bytes:
        return orjson.dumps(
            {"00741000": {"vr": "CS", "Value": [value]}, "00081195": {"vr": "UI", "Value": [tuid]}}
        )

    async def worker() -> None:
        conn = RawConnection(root)
        try:
            for item in queue:
                tuid = uid()
                assert (
                    await conn.request("PUT", f"/workitems/{item}/state", state("IN PROGRESS", tuid)) == 200
                )
                assert await conn.request("POST", f"/workitems/{item}?{tuid}", payload) == 200
                assert await conn.request("PUT", f"/workitems/{item}/state", state("COMPLETED", tuid)) == 200
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def wal_counters(dsn: str) -> tuple[int, int, int, int]:
    """(WAL bytes, full-page images, WAL fsyncs, commits) so far: what each cycle costs PostgreSQL in WAL.

    Bytes from the WAL position (exact); the rest from the statistics, which backends publish within a
    second of going idle, hence the wait.
    """
    await asyncio.sleep(1.2)
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT pg_current_wal_lsn() - '0/0' AS bytes, w.wal_fpi, w.wal_sync,
                      (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits
               FROM pg_stat_wal w"""
        )
        return int(row["bytes"]), int(row["wal_fpi"]), int(row["wal_sync"]), int(row["commits"])
    finally:
        await conn.close()


def server_processes(root: str, data_dir: Path) -> tuple[set[int], set[int]]:
    """(the `dicomweb serve` process, the postmaster) of this run, found by port and data directory."""
    serve = serve_processes(root)
    postmaster = int((data_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    return serve, {postmaster}


async def latency(root: str, dsn: str, items: list[str], ae: str) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{root}/workitems/1.2.840.10008.5.1.4.34.5/subscribers/{ae}")
        assert r.status_code == 201, r.text
        url = r.headers["content-location"]
        conn = await asyncpg.connect(dsn)
        last = await conn.fetchval("SELECT last_sequence FROM ups_subscriber WHERE ae_title = $1", ae)
        received: dict[int, float] = {}
        async with connect(f"{url}?after={last}", max_queue=None) as ws:

            async def consume() -> None:
                while len(received) < len(items):
                    message = orjson.loads(await ws.recv())
                    received[message["00771001"]["Value"][0]] = time.time()

            consumer = asyncio.create_task(consume())
            rng = random.Random(9)
            for item in items:
                await put_state(client, root, item, "IN PROGRESS", uid())
                await asyncio.sleep(rng.uniform(0.01, 0.03))
            await asyncio.wait_for(consumer, timeout=60)
        rows = await conn.fetch(
            """SELECT sequence, extract(epoch FROM created_at) FROM ups_event
               WHERE ae_title = $1 AND sequence > $2""",
            ae,
            last,
        )
        await conn.close()
    return [received[r[0]] - float(r[1]) for r in rows]


async def run(root: str, dsn: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    existing = await conn.fetchval("SELECT count(*) FROM ups_workitem")
    # a rerun on the same data starts without the subscribers of the last run
    await conn.execute("DELETE FROM ups_subscription; DELETE FROM ups_global_subscription")
    await conn.close()
    if existing < args.items:
        elapsed = await load(dsn, args.items - existing, args.stations)
        print(f"stored {args.items - existing} work items with worklist.store.create in {elapsed:.1f} s "
              f"({(args.items - existing) / elapsed:,.0f}/s)")  # fmt: skip
        await age(dsn)
        elapsed = await create_over_http(root, 1600)
        print(f"POST /workitems: 1600 in {elapsed:.1f} s = {1600 / elapsed:,.0f}/s (16 concurrent clients)")
    if args.reschedule:
        print(f"set {await reschedule_used(dsn)} items claimed by earlier runs back to SCHEDULED")
    if not args.cycles_only:
        times = await search(root, args.stations, args.searches)
        print(
            f"search SCHEDULED of one station ({args.items} items, {args.stations} stations, first 100): "
            f"p50 {percentile(times, 50) * 1000:.1f} ms, p95 {percentile(times, 95) * 1000:.1f} ms"
        )
    pool = await scheduled_uids(dsn, 2 * args.cycles + args.probes)
    phases: list[tuple[str, list[str] | None]] = [("no subscriber", pool[: args.cycles])]
    if not args.cycles_only:
        phases.append(("a worklist subscriber", None))
    for label, items in phases:
        if items is None:
            async with httpx.AsyncClient(timeout=600) as client:
                t = time.perf_counter()
                r = await client.post(f"{root}/workitems/1.2.840.10008.5.1.4.34.5/subscribers/BENCH_ALL")
                assert r.status_code == 201
                print(f"Worklist subscription (reports for all live items): {time.perf_counter() - t:.1f} s")
            items = pool[args.cycles : 2 * args.cycles]
        serve, postgres = server_processes(root, args.data_dir.resolve())
        spy = None
        if args.py_spy and label == "no subscriber":
            spy = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("py-spy")), "record", "--subprocesses", "--nonblocking",
                "--format", "raw", "-r", "250", "-o", str(args.py_spy), "--pid", str(min(serve)),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1)
        wal = await wal_counters(dsn)
        cpu = tree_cpu_seconds(serve), tree_cpu_seconds(postgres), time.process_time()
        elapsed = await cycles(root, items, args.concurrency)
        app_cpu, db_cpu = tree_cpu_seconds(serve) - cpu[0], tree_cpu_seconds(postgres) - cpu[1]
        client_cpu = time.process_time() - cpu[2]
        wal = tuple(b - a for a, b in zip(wal, await wal_counters(dsn), strict=True))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.wait_for(spy.wait(), timeout=60)
            print(f"py-spy samples of the server during the cycles without subscribers: {args.py_spy}")
        print(
            f"claim/update/complete cycles with {label}: {len(items)} in {elapsed:.1f} s = "
            f"{len(items) / elapsed:,.0f} cycles/s ({3 * len(items) / elapsed:,.0f} requests/s); "
            f"CPU per cycle: archive {app_cpu / len(items) * 1000:.2f} ms, "
            f"PostgreSQL {db_cpu / len(items) * 1000:.2f} ms "
            f"(so at most {2 / ((app_cpu + db_cpu) / len(items)):,.0f} cycles/s on 2 idle cores), "
            f"load generator {client_cpu / len(items) * 1000:.2f} ms; "
            f"WAL per cycle: {wal[0] / len(items):,.0f} bytes, {wal[1] / len(items):.2f} full-page images, "
            f"{wal[2] / len(items):.2f} fsyncs, {wal[3] / len(items):.2f} commits"
        )
    if args.cycles_only:
        return
    delays = await latency(root, dsn, pool[2 * args.cycles :], "BENCH_WS")
    print(
        f"event delivery latency over {len(delays)} events (commit to parsed by a WebSocket subscriber): "
        f"p50 {percentile(delays, 50) * 1000:.1f} ms, p95 {percentile(delays, 95) * 1000:.1f} ms, "
        f"max {max(delays) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/worklist"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--stations", type=int, default=50)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cycles-only", action="store_true",
        help="only the cycles without subscribers (no search, subscriber or latency phase): for iterating",
    )  # fmt: skip
    parser.add_argument(
        "--reschedule", action="store_true", help="first set items earlier runs claimed back to SCHEDULED"
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="FILE",
        help="record the server's stacks (py-spy raw format, all workers) in the cycles without subscribers",
    )  # fmt: skip
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    with (
        EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg,
        embedded_archive(workers=args.workers, data_dir=args.data_dir.resolve(), database_url=pg.dsn) as root,
    ):
        # the load generator shares the 2 cores with the server: uvloop takes ~20% less of them than asyncio's
        # own loop (0.22-0.27 against 0.28-0.32 ms a cycle)
        uvloop.run(run(root, pg.dsn, args))


if __name__ == "__main__":
    main()
