"""QIDO-RS latency at scale: load N studies (10 instances each) into an index, then time typical searches.

    python -m bench.qido_search load --data-dir bench/out/qido --studies 100000
    python -m bench.qido_search measure --data-dir bench/out/qido [--rounds 200] [--auth]
    python -m bench.qido_search explain --data-dir bench/out/qido [--rounds 20]
    python -m bench.qido_search throughput --data-dir bench/out/qido [--clients 8 --workers 2 --seconds 30]

`load` writes the index directly through indexer.writes (the same code STOW uses, minus object storage), so
that a million instances load in minutes; `measure` starts `dicomweb serve` on that data directory and times
each query over HTTP (keep-alive, one client), printing p50/p95/max per query shape; `--cpu` adds the mean
CPU time per request of the server process and of PostgreSQL (all its processes), read from /proc with
nanosecond resolution (`schedstat`), which a shared machine moves less than the wall clock. `--auth`
runs the server with access control on and sends a reader's API token (every request authenticated,
authorized, audited). `explain` runs each shape's SQL under EXPLAIN (ANALYZE, BUFFERS) and prints the
median execution time and buffers touched, which show whether a plan stays flat as the index grows.
`throughput` runs the same shapes from concurrent clients and prints searches per second.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import os
import random
import time
import urllib.parse
from pathlib import Path

import asyncpg
import httpx
import orjson

from access import tokens
from access.clock import Clock
from bench.common import embedded_archive, percentile
from bench.synthetic import DESCRIPTIONS, FAMILY, GIVEN, make_instance, make_study, to_bytes, uid
from dicomcore.parse import parse_instance
from indexer.attributes import Level
from indexer.embedded import EmbeddedPostgres
from indexer.migrate import migrate
from indexer.qido import QidoQuery, _compile, _plan, parse_query, statement_settings
from indexer.writes import InstanceRecord, index_instances

INSTANCES_PER_STUDY = 10
SEED = 2024


def _set(attrs: dict, key: str, vr: str, value: object) -> None:
    attrs[key] = {"vr": vr, "Value": [value]}


def study_records(rng: random.Random, template: dict, study_index: int) -> list[InstanceRecord]:
    """One study of two series (CT + one other modality), INSTANCES_PER_STUDY instances."""
    spec = make_study(rng, series_count=2)
    records = []
    for n in range(INSTANCES_PER_STUDY):
        series_uid, modality, series_number = spec.series[n % 2]
        attrs = copy.copy(template)
        sop = f"{uid(rng)}.{n}"
        _set(attrs, "00100010", "PN", {"Alphabetic": spec.patient_name})
        _set(attrs, "00100020", "LO", spec.patient_id)
        _set(attrs, "00100030", "DA", spec.birth_date)
        _set(attrs, "00100040", "CS", spec.sex)
        _set(attrs, "00080020", "DA", spec.study_date)
        _set(attrs, "00080030", "TM", spec.study_time)
        _set(attrs, "00080050", "SH", spec.accession)
        _set(attrs, "00080090", "PN", {"Alphabetic": spec.referring})
        _set(attrs, "00081030", "LO", spec.description)
        _set(attrs, "00080060", "CS", modality)
        _set(attrs, "0020000D", "UI", spec.study_uid)
        _set(attrs, "0020000E", "UI", series_uid)
        _set(attrs, "00080018", "UI", sop)
        _set(attrs, "00200011", "IS", series_number)
        _set(attrs, "00200013", "IS", n + 1)
        metadata = orjson.dumps(attrs)
        records.append(
            InstanceRecord(
                study_instance_uid=spec.study_uid,
                series_instance_uid=series_uid,
                sop_instance_uid=sop,
                sop_class_uid=attrs["00080016"]["Value"][0],
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                attrs=attrs,
                storage_key=f"bench/{study_index}/{sop}.dcm",
                size=34_000,
                sha256=hashlib.sha256(sop.encode()).digest(),
                metadata=metadata,
            )
        )
    return records


async def load(dsn: str, studies: int, concurrency: int = 4) -> None:
    rng = random.Random(SEED)
    template_spec = make_study(rng, series_count=1)
    template = parse_instance(to_bytes(make_instance(template_spec, 0, 1))).attrs
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    async with pool.acquire() as conn:
        await migrate(conn)
        existing = await conn.fetchval("SELECT count(*) FROM study")
    queue: asyncio.Queue[list[InstanceRecord] | None] = asyncio.Queue(maxsize=concurrency * 2)
    start = time.perf_counter()
    done = 0

    async def writer() -> None:
        nonlocal done
        while (batch := await queue.get()) is not None:
            async with pool.acquire() as conn, conn.transaction():
                await index_instances(conn, 1, batch)
            done += len(batch)
            if done % 50_000 < len(batch):
                rate = done / (time.perf_counter() - start)
                print(f"  {done} instances ({rate:.0f}/s)", flush=True)

    writers = [asyncio.create_task(writer()) for _ in range(concurrency)]
    batch: list[InstanceRecord] = []
    for i in range(existing, studies):
        batch.extend(study_records(rng, template, i))
        if len(batch) >= 100:
            await queue.put(batch)
            batch = []
    if batch:
        await queue.put(batch)
    for _ in writers:
        await queue.put(None)
    await asyncio.gather(*writers)
    async with pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE")
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM study) s, (SELECT count(*) FROM series) se, "
            "(SELECT count(*) FROM instance) i"
        )
    await pool.close()
    elapsed = time.perf_counter() - start
    print(
        f"index holds {counts['s']} studies, {counts['se']} series, {counts['i']} instances ({elapsed:.0f} s)"
    )


CPU_HELP = "also report CPU ms per request of the server and of PostgreSQL (the client then reads /proc)"


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                out[int(entry.name)] = (ppid, (entry / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                continue
    return out


def _tree(processes: dict[int, tuple[int, bytes]], roots: set[int]) -> set[int]:
    members, grew = set(roots), True
    while grew:
        more = {pid for pid, (ppid, _) in processes.items() if ppid in members} - members
        members |= more
        grew = bool(more)
    return members


class CpuMeter:
    """CPU time of the archive under test: the `dicomweb serve` process tree listening on `url`'s port and
    the PostgreSQL cluster in `data_dir`, each with every thread (/proc/PID/task/TID/schedstat, in ns).

    The schedstat files are opened once and re-read with pread, so a sample costs the client ~0.1 ms (the
    client shares the machine with what it measures). Threads started after the meter are not counted.
    """

    def __init__(self, url: str, data_dir: Path, *, enabled: bool = True) -> None:
        self.fds: dict[str, list[int]] = {}
        if not enabled:
            return
        processes = _processes()
        port = str(httpx.URL(url).port).encode()
        serve = {pid for pid, (_, cmd) in processes.items() if b"serve" in cmd.split(b"\0") and port in cmd}
        postmaster = int((data_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
        groups = {"server": _tree(processes, serve), "postgres": _tree(processes, {postmaster})}
        for name, pids in groups.items():
            fds = self.fds[name] = []
            for pid in pids:
                try:
                    for task in Path(f"/proc/{pid}/task").iterdir():
                        fds.append(os.open(task / "schedstat", os.O_RDONLY))
                except OSError:
                    continue

    def sample(self) -> dict[str, int]:
        out = {}
        for name, fds in self.fds.items():
            total = 0
            for fd in fds:
                try:
                    total += int(os.pread(fd, 64, 0).split()[0])
                except (OSError, ValueError, IndexError):
                    continue  # the thread ended: its time stops counting, it never goes negative
            out[name] = total
        return out

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)


def queries(rng: random.Random, sample: list[dict]) -> dict[str, str]:
    """One concrete URL (relative to the service root) per query shape."""
    row = rng.choice(sample)
    year = rng.randint(2000, 2025)
    month = rng.randint(1, 12)
    return {
        "PatientID exact": f"/studies?PatientID={row['patient_id']}",
        "AccessionNumber exact": f"/studies?AccessionNumber={row['accession_number']}",
        "StudyInstanceUID": f"/studies?StudyInstanceUID={row['study_instance_uid']}",
        "PatientName prefix*": f"/studies?PatientName={rng.choice(FAMILY)[:3]}*&limit=100",
        "PatientName fuzzy": (
            f"/studies?PatientName={rng.choice(GIVEN)[:3].lower()}&fuzzymatching=true&limit=100"
        ),
        "StudyDate month range": f"/studies?StudyDate={year}{month:02d}01-{year}{month:02d}28&limit=100",
        # narrower ranges: where reading the matches from the date index costs most (docs/scaling.md);
        # they draw no values of their own, so the other shapes' values stay those of earlier runs
        "StudyDate one-week range": f"/studies?StudyDate={year}{month:02d}01-{year}{month:02d}07&limit=100",
        "StudyDate two-week range": f"/studies?StudyDate={year}{month:02d}01-{year}{month:02d}14&limit=100",
        "ModalitiesInStudy + date": (
            f"/studies?ModalitiesInStudy=MR&StudyDate={year}0101-{year}1231&limit=100"
        ),
        "StudyDescription* + date": (
            f"/studies?StudyDescription={rng.choice(DESCRIPTIONS)[:4]}*&StudyDate={year}0101-&limit=50"
        ),
        "list page (offset 5000)": "/studies?limit=100&offset=5000",
        "includefield=all by PatientID": f"/studies?PatientID={row['patient_id']}&includefield=all",
        "series of a study": f"/studies/{row['study_instance_uid']}/series",
        "instances of a study": f"/studies/{row['study_instance_uid']}/instances",
    }


async def timed_get(
    client: httpx.AsyncClient,
    path: str,
    meter: CpuMeter,
    timings: list[float],
    cpu: dict[str, list[int]],
) -> httpx.Response:
    """One request: its wall-clock ms into `timings`, the server's and PostgreSQL's CPU ns into `cpu`."""
    before = meter.sample()
    t = time.perf_counter()
    response = await client.get(path)
    timings.append((time.perf_counter() - t) * 1000)
    after = meter.sample()
    for name, ns in after.items():
        cpu.setdefault(name, []).append(ns - before[name])
    response.raise_for_status()
    return response


def cpu_ms(cpu: dict[str, list[int]], name: str) -> str:
    """Mean CPU ms per request of one process group, formatted ("-" when not measured)."""
    values = cpu.get(name, [])
    return f"{sum(values) / len(values) / 1e6:.2f}" if values else "-"


async def measure(
    url: str, dsn: str, rounds: int, data_dir: Path, *, auth: bool = False, cpu_meter: bool = False
) -> None:
    conn = await asyncpg.connect(dsn)
    headers = {}
    if auth:  # a reader's API token, as a client of an archive with access control on would send
        token, _ = await tokens.create(conn, "reader", now=Clock().now(), name="qido-bench")
        headers = {"Authorization": f"Bearer {token}"}
    sample = [
        dict(r)
        for r in await conn.fetch(
            """SELECT patient_id, accession_number, study_instance_uid
               FROM study TABLESAMPLE SYSTEM (1) LIMIT 2000"""
        )
    ]
    await conn.close()
    rng = random.Random(1)
    timings: dict[str, list[float]] = {}
    cpu: dict[str, dict[str, list[int]]] = {}
    sizes: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as client:
        for _ in range(5):  # warm-up: connections, plans, caches
            for path in queries(rng, sample).values():
                (await client.get(path)).raise_for_status()
        meter = CpuMeter(url, data_dir, enabled=cpu_meter)  # after the warm-up: the pool's backends exist
        for _ in range(rounds):
            for name, path in queries(rng, sample).items():
                response = await timed_get(
                    client, path, meter, timings.setdefault(name, []), cpu.setdefault(name, {})
                )
                sizes[name] = max(sizes.get(name, 0), len(response.json()))
        meter.close()
    print(
        f"{'query':34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'max rows':>9}"
        f" {'server CPU ms':>14} {'PG CPU ms':>10}"
    )
    for name, values in timings.items():
        print(
            f"{name:34} {percentile(values, 50):8.1f} {percentile(values, 95):8.1f} "
            f"{max(values):8.1f} {sizes[name]:9d} {cpu_ms(cpu[name], 'server'):>14}"
            f" {cpu_ms(cpu[name], 'postgres'):>10}"
        )


def _query_of(path: str) -> QidoQuery:
    """The parsed QIDO query of one of `queries`' URLs (the route's level and scope, its parameters)."""
    url = urllib.parse.urlsplit(path)
    parts = url.path.strip("/").split("/")
    level = {"studies": Level.STUDY, "series": Level.SERIES, "instances": Level.INSTANCE}[parts[-1]]
    study = parts[1] if len(parts) > 2 else None
    return parse_query(level, urllib.parse.parse_qsl(url.query), study_uid=study)


async def explain(dsn: str, rounds: int) -> None:
    """Per query shape, as the archive compiles it: PostgreSQL's execution ms and the buffers it touched
    (shared hit + read), median over `rounds` random values. Buffers per query are what grows with the
    index where a plan does not stay flat; they do not depend on the machine's load."""
    conn = await asyncpg.connect(dsn)
    sample = [
        dict(r)
        for r in await conn.fetch(
            """SELECT patient_id, accession_number, study_instance_uid
               FROM study TABLESAMPLE SYSTEM (1) LIMIT 2000"""
        )
    ]
    rng = random.Random(3)
    found: dict[str, list[tuple[float, int, int]]] = {}
    for _ in range(rounds):
        for name, path in queries(rng, sample).items():
            query = _query_of(path)
            sql, args = _compile(query, 1, _plan(query))
            async with conn.transaction():
                await conn.execute(statement_settings(query))
                plan = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
            top = orjson.loads(plan)[0]
            node = top["Plan"]
            found.setdefault(name, []).append(
                (top["Execution Time"], node.get("Shared Hit Blocks", 0), node.get("Shared Read Blocks", 0))
            )
    await conn.close()
    print(f"{'query':34} {'exec ms p50':>12} {'buffers hit p50':>16} {'read p50':>9} {'max buffers':>12}")
    for name, values in found.items():
        print(
            f"{name:34} {percentile([v[0] for v in values], 50):12.2f}"
            f" {percentile([v[1] for v in values], 50):16.0f} {percentile([v[2] for v in values], 50):9.0f}"
            f" {max(v[1] + v[2] for v in values):12d}"
        )


async def throughput(url: str, dsn: str, clients: int, seconds: float) -> None:
    """Searches per second with `clients` concurrent keep-alive clients, each cycling through the query
    shapes with random values for `seconds`: what a server (or a read replica) of this size takes."""
    conn = await asyncpg.connect(dsn)
    sample = [
        dict(r)
        for r in await conn.fetch(
            """SELECT patient_id, accession_number, study_instance_uid
               FROM study TABLESAMPLE SYSTEM (1) LIMIT 2000"""
        )
    ]
    await conn.close()
    timings: list[float] = []

    async def client(n: int) -> None:
        rng = random.Random(100 + n)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while time.perf_counter() < deadline:
                for path in queries(rng, sample).values():
                    t = time.perf_counter()
                    (await http.get(path)).raise_for_status()
                    timings.append((time.perf_counter() - t) * 1000)

    deadline = time.perf_counter() + 2  # warm-up: connections, plans
    await asyncio.gather(*(client(n) for n in range(clients)))
    timings.clear()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - start
    print(
        f"{clients} clients, {len(timings)} searches in {elapsed:.1f} s: {len(timings) / elapsed:.0f}/s,"
        f" p50 {percentile(timings, 50):.1f} ms, p95 {percentile(timings, 95):.1f} ms (all 12 shapes mixed)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["load", "measure", "explain", "throughput"])
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/qido"))
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--auth", action="store_true", help="measure with access control on (reader token)")
    parser.add_argument("--cpu", action="store_true", help=CPU_HELP)
    parser.add_argument("--clients", type=int, default=8, help="throughput: concurrent clients")
    parser.add_argument("--workers", type=int, default=2, help="throughput: server workers")
    parser.add_argument("--seconds", type=float, default=30, help="throughput: how long")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "load":
        with EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg:
            asyncio.run(load(pg.dsn, args.studies))
    elif args.command == "explain":
        with EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg:
            asyncio.run(explain(pg.dsn, min(args.rounds, 20)))
    elif args.command == "throughput":
        with (
            EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg,
            embedded_archive(
                workers=args.workers, data_dir=args.data_dir.resolve(), database_url=pg.dsn
            ) as url,
        ):
            asyncio.run(throughput(url, pg.dsn, args.clients, args.seconds))
    else:
        with (
            EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg,
            embedded_archive(
                workers=1,
                data_dir=args.data_dir.resolve(),
                database_url=pg.dsn,
                insecure_open=not args.auth,
            ) as url,
        ):
            asyncio.run(
                measure(url, pg.dsn, args.rounds, args.data_dir.resolve(), auth=args.auth, cpu_meter=args.cpu)
            )


if __name__ == "__main__":
    main()
