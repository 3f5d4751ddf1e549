"""Extended query tags at scale: re-index speed and QIDO latency on the 1M-instance index of qido_search.

    python -m bench.qido_search load --data-dir bench/out/qido --studies 100000   # once: the data set
    python -m bench.extended_tags prepare --data-dir bench/out/qido                # once: varied values
    python -m bench.extended_tags measure --data-dir bench/out/qido [--rounds 200] [--reuse-tags]

The bench data's series all have ProtocolName "ABDOMEN PELVIS" (the generator's template), so the
series-level searches are "no match" and "all 200,000 match", the two ends of the planner's choice.

`prepare` gives every instance two attributes the generator leaves constant or out, so that an extended tag
has selective values: AcquisitionNumber (IS) = instance_key mod 5000 (200 instances per value) and
AcquisitionDate (DA) = 2000-01-01 + instance_key mod 9000 days (~111 instances per day). It appends them to
the stored metadata (idempotent; standard QIDO results are unaffected).

`measure` starts `dicomweb serve` on the data directory and, over HTTP as a client would:
1. adds AcquisitionNumber (instance level) and times its re-index operation (createdTime to the last
   update of the finished operation), then AcquisitionDate, then eight study/series-level tags (ten in all);
2. times QIDO on the extended tags (equality, range, prefix) and the standard study searches of
   bench.qido_search with the ten tags defined, printing p50/p95/max per query shape;
3. prints EXPLAIN (ANALYZE, BUFFERS) of the extended-tag searches as the archive compiles them.
`--cpu` adds each shape's CPU ms per request of the server and of PostgreSQL (see bench.qido_search).
`--one-tag` adds AcquisitionNumber alone and times only its searches (bench.scale_load's larger indexes).
Tags it defines are deleted first, so it can be run again.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import time
from pathlib import Path

import asyncpg
import httpx

from bench.common import embedded_archive, percentile
from bench.qido_search import CPU_HELP, CpuMeter, cpu_ms, timed_get
from bench.qido_search import queries as standard_queries
from dicomcore.tags import parse_tag
from indexer.attributes import Level
from indexer.embedded import EmbeddedPostgres
from indexer.extended_tags import query_tags
from indexer.migrate import migrate
from indexer.qido import _compile, _plan, parse_query, statement_settings
from indexer.tag_deletion import delete_now

MEASURED = [
    {"Path": "AcquisitionNumber", "Level": "Instance"},  # IS: equality
    {"Path": "AcquisitionDate", "Level": "Instance"},  # DA: ranges
]
OTHERS = [
    {"Path": "PatientAge", "Level": "Study"},
    {"Path": "ProtocolName", "Level": "Series"},
    {"Path": "BodyPartExamined", "Level": "Series"},
    {"Path": "PatientPosition", "Level": "Series"},
    {"Path": "StationName", "Level": "Series"},
    {"Path": "InstitutionName", "Level": "Series"},
    {"Path": "DeviceSerialNumber", "Level": "Series"},
    {"Path": "SoftwareVersions", "Level": "Series"},
]
_EPOCH = dt.date(2000, 1, 1)


async def prepare(dsn: str, step: int = 50_000) -> None:
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    high = await conn.fetchval("SELECT max(instance_key) FROM instance")
    start = time.perf_counter()
    for low in range(0, high, step):
        done = await conn.execute(
            r"""UPDATE instance SET metadata = substring(metadata FOR length(metadata) - 1) || convert_to(
                    format(',"00080022":{"vr":"DA","Value":["%s"]},"00200012":{"vr":"IS","Value":[%s]}}',
                           to_char(date '2000-01-01' + (instance_key % 9000)::int, 'YYYYMMDD'),
                           instance_key % 5000), 'UTF8')
                WHERE instance_key > $1 AND instance_key <= $2
                  AND position('"00200012"'::bytea IN metadata) = 0""",
            low,
            low + step,
        )
        print(f"  up to {low + step}: {done} ({time.perf_counter() - start:.0f} s)", flush=True)
    await conn.execute("VACUUM ANALYZE instance")
    await conn.close()


async def _wait(client: httpx.AsyncClient, href: str) -> dict:
    while True:
        response = await client.get(href)
        if response.status_code == 200:
            return response.json()
        response.raise_for_status()
        await asyncio.sleep(0.5)


def _seconds(operation: dict) -> float:
    created = dt.datetime.fromisoformat(operation["createdTime"].replace("Z", "+00:00"))
    updated = dt.datetime.fromisoformat(operation["lastUpdatedTime"].replace("Z", "+00:00"))
    return (updated - created).total_seconds()


async def _add(client: httpx.AsyncClient, tags: list[dict], label: str, rows: int) -> None:
    response = await client.post("/extendedquerytags", json=tags)
    response.raise_for_status()
    operation = await _wait(client, response.json()["href"])
    assert operation["status"] == "succeeded", operation
    seconds = _seconds(operation)
    print(
        f"re-index {label}: {operation['results']['processedRows']} rows in {seconds:.1f} s"
        f" ({rows / seconds:,.0f} rows/s)",
        flush=True,
    )


def ext_queries(rng: random.Random) -> dict[str, str]:
    number = rng.randrange(5000)
    day = _EPOCH + dt.timedelta(days=rng.randrange(9000 - 31))
    month_end = day + dt.timedelta(days=30)
    return {
        "ext IS equality (200 match)": f"/instances?AcquisitionNumber={number}",
        "ext DA single day (~111)": f"/instances?AcquisitionDate={day:%Y%m%d}",
        "ext DA month range (~3400)": f"/instances?AcquisitionDate={day:%Y%m%d}-{month_end:%Y%m%d}",
        "ext DA range + PatientName*": (
            f"/instances?AcquisitionDate={day:%Y%m%d}-{month_end:%Y%m%d}&PatientName=M*"
        ),
        "ext IS equality, limit 10": f"/instances?AcquisitionNumber={number}&limit=10",
        "ext DA month range, limit 10": (
            f"/instances?AcquisitionDate={day:%Y%m%d}-{month_end:%Y%m%d}&limit=10"
        ),
        "ext series LO prefix, no match": f"/series?ProtocolName={rng.choice(['CHE', 'HEA', 'KNE', 'SPI'])}*",
        "ext series LO prefix, all match": "/series?ProtocolName=ABD*",
        "ext IS eq in a study": f"/studies/{{study}}/instances?AcquisitionNumber={number}",
    }


async def measure(
    url: str, dsn: str, rounds: int, reuse: bool, data_dir: Path, cpu_meter: bool, one: bool = False
) -> None:
    """Add the tags (all ten, or with `one` AcquisitionNumber alone), then time the searches on them."""
    tags = MEASURED[:1] if one else MEASURED + OTHERS
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        ready = [t for t in (await query_tags(conn)).values() if t.status == "Ready"]
        reuse = reuse and len(ready) == len(tags)
        for item in [] if reuse else MEASURED + OTHERS:
            async with conn.transaction():
                await delete_now(conn, parse_tag(item["Path"]))
        instances = await conn.fetchval("SELECT count(*) FROM instance")
        sample = [
            dict(r)
            for r in await conn.fetch(
                """SELECT patient_id, accession_number, study_instance_uid
                   FROM study TABLESAMPLE SYSTEM (1) LIMIT 2000"""
            )
        ]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        if not reuse:
            await _add(client, MEASURED[:1], "AcquisitionNumber (IS, instance level)", instances)
            if not one:
                await _add(client, MEASURED[1:], "AcquisitionDate (DA, instance level)", instances)
                label = "8 study/series-level tags (100,000 studies + 200,000 series)"
                await _add(client, OTHERS, label, 300_000)
            async with pool.acquire() as conn:
                await conn.execute("VACUUM ANALYZE")
        rng = random.Random(7)
        timings: dict[str, list[float]] = {}
        cpu: dict[str, dict[str, list[int]]] = {}
        meter: CpuMeter | None = None
        for n in range(rounds + 5):  # 5 rounds of warm-up
            if n == 5:
                meter = CpuMeter(url, data_dir, enabled=cpu_meter)  # the pool's backends exist by now
            row = rng.choice(sample)
            shapes = {
                k: v.replace("{study}", row["study_instance_uid"])
                for k, v in ext_queries(rng).items()
                if not one or "AcquisitionNumber" in v
            }
            shapes |= {f"std {k}": v for k, v in standard_queries(rng, sample).items()}
            for name, path in shapes.items():
                if meter is None:
                    (await client.get(path)).raise_for_status()
                else:
                    await timed_get(
                        client, path, meter, timings.setdefault(name, []), cpu.setdefault(name, {})
                    )
    print(
        f"\n{f'query ({len(tags)} extended tags defined)':40} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}"
        f" {'server CPU ms':>14} {'PG CPU ms':>10}"
    )
    for name, values in timings.items():
        print(
            f"{name:40} {percentile(values, 50):8.1f} {percentile(values, 95):8.1f} {max(values):8.1f}"
            f" {cpu_ms(cpu[name], 'server'):>14} {cpu_ms(cpu[name], 'postgres'):>10}"
        )
    async with pool.acquire() as conn:
        await explain(conn, rng, one)
    await pool.close()


async def explain(conn: asyncpg.Connection, rng: random.Random, one: bool = False) -> None:
    extended = await query_tags(conn)
    day = _EPOCH + dt.timedelta(days=rng.randrange(9000 - 31))
    cases = {
        "AcquisitionNumber equality": (Level.INSTANCE, [("AcquisitionNumber", str(rng.randrange(5000)))]),
        "AcquisitionDate month range": (
            Level.INSTANCE,
            [("AcquisitionDate", f"{day:%Y%m%d}-{day + dt.timedelta(days=30):%Y%m%d}")],
        ),
        "AcquisitionDate month range + PatientName prefix": (
            Level.INSTANCE,
            [
                ("AcquisitionDate", f"{day:%Y%m%d}-{day + dt.timedelta(days=30):%Y%m%d}"),
                ("PatientName", "M*"),
            ],
        ),
        "ProtocolName prefix, no match (series level)": (Level.SERIES, [("ProtocolName", "CHE*")]),
        "ProtocolName prefix, all 200,000 match": (Level.SERIES, [("ProtocolName", "ABD*")]),
    }
    for name, (level, params) in cases.items():
        if one and params[0][0] != "AcquisitionNumber":
            continue
        query = parse_query(level, params, extended=extended)
        sql, args = _compile(query, 1, _plan(query))
        async with conn.transaction():
            await conn.execute(statement_settings(query))
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args)
        print(f"\n-- {name}: {params}\n" + "\n".join(r[0] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["prepare", "measure"])
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/qido"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--reuse-tags", action="store_true", help="keep the ten tags if already Ready")
    parser.add_argument("--cpu", action="store_true", help=CPU_HELP)
    parser.add_argument(
        "--one-tag", action="store_true", help="AcquisitionNumber alone (a 10M index: minutes, not an hour)"
    )
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    with EmbeddedPostgres(data_dir / "postgres") as pg:
        if args.command == "prepare":
            asyncio.run(prepare(pg.dsn))
        else:
            with embedded_archive(workers=1, data_dir=data_dir, database_url=pg.dsn) as url:
                asyncio.run(
                    measure(url, pg.dsn, args.rounds, args.reuse_tags, data_dir, args.cpu, args.one_tag)
                )


if __name__ == "__main__":
    main()
