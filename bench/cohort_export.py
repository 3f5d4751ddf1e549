"""Cohort extraction at hospital scale: resolving a 10,000-patient cohort query on 1,000,000 instances, and
the de-identified export of a 1,000-study cohort to a local directory.

    python -m bench.cohort_export resolve --data-dir /work/bench-out/cohort-scale [--rounds 5]
    python -m bench.cohort_export export --data-dir /work/bench-out/cohort-export [--studies 1000] [--runs 3]

`resolve` runs `dicomweb serve` on a data directory loaded by `python -m bench.qido_search load --studies
100000` (index rows only, no stored objects) and times, over HTTP, the creation of a cohort from a query
matching about 10,000 patients: POST /export (202 once the query is resolved to its studies and the
operation is written) and a data request's approval (POST /datarequests/{id}/approve, which resolves the
cohort and starts its export). Each operation is canceled at once, since the objects it would export are
not stored; so use a copy of the loaded directory, not the one other benches read.

`export` stores --studies studies of --per-study CT instances (--size x --size, 16 bit: 526 KB each at 512)
through STOW-RS into an archive in --data-dir (kept, and reused by later runs), then exports them --runs
times with POST /export (a query source matching all of them; the basic profile with Retain Longitudinal
Modified Dates) into a directory under the archive's export directory, polling GET /operations/{id} and
printing the progress figures (instancesProcessed, bytesProcessed, instancesPerSecond, bytesPerSecond)
about once a second. MB/s is the stored bytes of the cohort over the time from the POST to `succeeded`
(1 MB = 10^6 bytes). The outputs of a run are deleted before the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import time
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx

from bench.common import cpu_seconds, embedded_archive, percentile
from bench.deid_export import ct_template
from bench.qido_search import _processes, _tree
from bench.synthetic import ROOT, multipart_body
from indexer.embedded import EmbeddedPostgres
from indexer.operations import cancel_operation, parse_operation_id

# the cohort of `resolve`: every CT study of nine and a half years (one of the bench data set's ~63,000
# patients has a study there about one time in six)
DATE_QUERY = "ModalitiesInStudy=CT&StudyDate=20050101-20140630"
PATIENTS = 10_000  # the PatientID-list query names this many patients
DEID = {"project": "cohort-bench", "options": ["retainLongModifiedDates"]}

# placeholders of ct_template's study, series and patient, replaced per study by values of the same length
_STUDY, _SERIES, _PATIENT = f"{ROOT}7.1000000000000", f"{ROOT}8.1000000000000", "COHORT0000000"
_SOP = "1.2.826.0.1.3680043.10.1234.9.1000000000000"  # bench.deid_export's SOP placeholder


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- resolve --------------------------------------------------------------------------------------------


async def cohort_queries(dsn: str) -> dict[str, tuple[str, int, int]]:
    """name -> (query, patients, studies), the counts straight from the index (what a cohort must hold)."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = [
            r[0]
            for r in await conn.fetch(
                "SELECT DISTINCT patient_id FROM study ORDER BY patient_id LIMIT $1", PATIENTS
            )
        ]
        counts = {
            "CT studies 2005-01..2014-06": (
                DATE_QUERY,
                """SELECT count(DISTINCT patient_key), count(*) FROM study
                   WHERE 'CT' = ANY(modalities) AND study_date BETWEEN '2005-01-01' AND '2014-06-30'""",
                [],
            ),
            f"list of {len(ids)} PatientIDs": (
                "PatientID=" + quote("\\".join(ids)),
                "SELECT count(DISTINCT patient_key), count(*) FROM study WHERE patient_id = ANY($1::text[])",
                [ids],
            ),
        }
        out = {}
        for name, (query, sql, args) in counts.items():
            patients, studies = await conn.fetchrow(sql, *args)
            out[name] = (query, patients, studies)
        return out
    finally:
        await conn.close()


async def resolve(url: str, dsn: str, rounds: int) -> None:
    queries = await cohort_queries(dsn)
    base = url.removesuffix("/v2")
    conn = await asyncpg.connect(dsn)
    timings: dict[str, list[float]] = {}
    try:
        async with httpx.AsyncClient(timeout=120) as client:

            async def cancel(operation: str | None) -> None:
                operation_id = parse_operation_id(operation or "")
                if operation_id is not None:
                    await cancel_operation(conn, operation_id, "benchmark: no objects are stored")

            async def by_export(query: str) -> tuple[float, str | None]:
                body = {
                    "source": {"type": "query", "settings": {"query": query}},
                    "destination": {"type": "directory", "settings": {"path": "cohort-bench"}},
                    "deidentification": DEID,
                }
                t = time.perf_counter()
                response = await client.post(f"{url}/export", json=body)
                elapsed = time.perf_counter() - t
                if response.status_code != 202:
                    raise SystemExit(f"POST /export: {response.status_code} {response.text[:300]}")
                return elapsed, response.json()["id"]

            async def by_request(query: str) -> tuple[float, str | None]:
                submission = {
                    "title": "cohort bench", "purpose": "timing", "cohort": {"query": query},
                    "deidentification": {"options": DEID["options"]}, "durationDays": 1,
                }  # fmt: skip
                response = await client.post(f"{base}/datarequests", json=submission)
                if response.status_code != 201:
                    raise SystemExit(f"POST /datarequests: {response.status_code} {response.text[:300]}")
                request_id = response.json()["id"]
                t = time.perf_counter()
                response = await client.post(f"{base}/datarequests/{request_id}/approve", json={})
                elapsed = time.perf_counter() - t
                if response.status_code != 200:
                    raise SystemExit(f"approve: {response.status_code} {response.text[:300]}")
                operation = (response.json().get("operation") or {}).get("id")
                await client.post(f"{base}/datarequests/{request_id}/revoke", json={"comment": "done"})
                return elapsed, operation

            for name, (query, patients, studies) in queries.items():
                print(f"{name}: {patients} patients, {studies} studies; query {len(query)} characters")
                for route, run in (("POST /export", by_export), ("approve data request", by_request)):
                    samples = timings.setdefault(f"{name} | {route}", [])
                    for n in range(rounds + 1):  # the first is a warm-up (plans, caches)
                        elapsed, operation = await run(query)
                        await cancel(operation)
                        if n:
                            samples.append(elapsed * 1000)
    finally:
        await conn.close()
    print(f"\n{'cohort | route':62} {'p50 ms':>8} {'max ms':>8}   (load average {load_average()})")
    for name, values in timings.items():
        print(f"{name:62} {percentile(values, 50):8.0f} {max(values):8.0f}")


# --- export ---------------------------------------------------------------------------------------------


def study_files(template: bytes, n: int, per_study: int) -> list[bytes]:
    study = template.replace(_STUDY.encode(), f"{ROOT}7.1{n:012d}".encode())
    study = study.replace(_SERIES.encode(), f"{ROOT}8.1{n:012d}".encode())
    study = study.replace(_PATIENT.encode(), f"COHORT{n:07d}".encode())
    return [study.replace(_SOP.encode(), f"{ROOT}9.1{n:06d}{k:06d}".encode()) for k in range(per_study)]


async def store_studies(url: str, template: bytes, have: int, studies: int, per_study: int) -> None:
    """STOW-RS, one study per request, two requests in flight."""
    todo = list(range(have, studies))
    start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            body, content_type = multipart_body(study_files(template, todo.pop(0), per_study))
            response = await client.post(
                f"{url}/studies", content=body, headers={"Content-Type": content_type}
            )
            if response.status_code != 200:
                raise SystemExit(f"STOW: {response.status_code} {response.text[:300]}")

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(worker(client), worker(client))
    took = time.perf_counter() - start
    print(f"stored {studies - have} studies ({(studies - have) * per_study} instances) in {took:.0f} s")


def archive_cpu(url: str, data_dir: Path) -> dict[int, float]:
    """CPU seconds of each process of the archive: `dicomweb serve` on url's port, its workers and their
    de-identifying pools, and the PostgreSQL cluster in data_dir. A process started during a run (a pool
    spawned by the first export) counts from zero; /proc/PID/stat includes the process's ended threads."""
    processes = _processes()
    port = str(httpx.URL(url).port).encode()
    serve = {pid for pid, (_, cmd) in processes.items() if b"serve" in cmd.split(b"\0") and port in cmd}
    postmaster = int((data_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    out = {}
    for pid in _tree(processes, serve | {postmaster}):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = cpu_seconds([pid])
    return out


async def export_once(url: str, export_dir: Path, run: int, expected: int) -> tuple[float, dict, float]:
    """One export of the whole cohort: (seconds, final results, archive CPU seconds)."""
    path = f"cohort-run-{run}"
    body = {
        "source": {"type": "query", "settings": {"query": "PatientID=COHORT*"}},
        "destination": {"type": "directory", "settings": {"path": path}},
        "deidentification": DEID,
    }
    cpu_before = archive_cpu(url, export_dir.parent)
    async with httpx.AsyncClient(timeout=120) as client:
        start = time.perf_counter()
        response = await client.post(f"{url}/export", json=body)
        if response.status_code != 202:
            raise SystemExit(f"POST /export: {response.status_code} {response.text[:300]}")
        href = response.json()["href"]
        shown = -1.0
        while True:
            response = await client.get(href)
            operation = response.json()
            results = operation["results"]
            now = time.perf_counter()
            # what a client polling the operation sees, about once a second
            if "instancesProcessed" in results and (now - shown >= 1 or response.status_code == 200):
                shown = now
                print(
                    f"  {time.perf_counter() - start:6.1f} s  {operation['status']:9} "
                    f"{operation['percentComplete']:3d}%  {results['instancesProcessed']:6d} instances "
                    f"{results['bytesProcessed'] / 1e6:8.0f} MB  {results['instancesPerSecond']:7.1f} inst/s "
                    f"{results['bytesPerSecond'] / 1e6:6.1f} MB/s",
                    flush=True,
                )
            if response.status_code == 200:
                break
            await asyncio.sleep(0.25)
    elapsed = time.perf_counter() - start
    cpu_after = archive_cpu(url, export_dir.parent)
    cpu = sum(seconds - cpu_before.get(pid, 0.0) for pid, seconds in cpu_after.items())
    if operation["status"] != "succeeded" or results["exported"] != expected:
        raise SystemExit(f"export {operation['status']}: {results}")
    await asyncio.to_thread(shutil.rmtree, export_dir / path)
    await asyncio.to_thread(os.sync)  # the deletion's writeback does not land in the next run
    return elapsed, results, cpu


async def export(url: str, dsn: str, export_dir: Path, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    have = await conn.fetchval("SELECT count(*) FROM study")
    await conn.close()
    template = ct_template(args.size, patient_id=_PATIENT, study_uid=_STUDY, series_uid=_SERIES)
    if have < args.studies:
        await store_studies(url, template, have, args.studies, args.per_study)
        await asyncio.to_thread(os.sync)  # the ingest's writeback does not land in the export
    expected = args.studies * args.per_study
    rates = []
    for run in range(1, args.runs + 1):
        print(f"run {run} (load average before: {load_average()})")
        elapsed, results, cpu = await export_once(url, export_dir, run, expected)
        mb = results["bytesProcessed"] / 1e6
        rates.append(mb / elapsed)
        print(
            f"run {run}: {args.studies} studies, {expected} instances, {mb:.0f} MB in {elapsed:.1f} s = "
            f"{mb / elapsed:.1f} MB/s, {expected / elapsed:.0f} instances/s; archive CPU "
            f"{1000 * cpu / expected:.2f} ms/instance ({cpu / elapsed:.2f} cores); load average "
            f"{load_average()}"
        )
    each = ", ".join(f"{r:.1f}" for r in rates)
    print(f"median {statistics.median(rates):.1f} MB/s over {len(rates)} runs ({each})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["resolve", "export"])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5, help="resolve: timed requests per cohort and route")
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with (
        EmbeddedPostgres(data_dir / "postgres") as pg,
        embedded_archive(data_dir=data_dir, database_url=pg.dsn) as url,
    ):
        if args.command == "resolve":
            asyncio.run(resolve(url, pg.dsn, args.rounds))
        else:
            asyncio.run(export(url, pg.dsn, data_dir / "exports", args))


if __name__ == "__main__":
    main()
