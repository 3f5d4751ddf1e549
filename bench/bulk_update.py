"""Bulk update throughput: a patient merge that touches many studies, through the `update` operation.

    python -m bench.bulk_update [--studies 10000] [--per-study 3] [--size 64] [--database-url URL]

Stores --studies studies of --per-study CT-like instances (--size x --size, 16 bit) into a scratch archive
(embedded PostgreSQL unless --database-url, local blob store) through archive.ingest, then queues one
`update` operation naming every study (what an HL7 ADT^A40 merge or a POST /studies/$bulkUpdate queues:
PatientName, PatientID and IssuerOfPatientID), runs it with the real runner and handler (archive/update.py)
and reports instances/s from queueing the operation to its success, with this process's CPU seconds (the
rewrite, preparation and store writes) and the embedded PostgreSQL's, per instance, and the load average
at the end (the machine is shared: wall clock depends on what else runs, CPU per instance much less).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from archive.ingest import Ingestor
from archive.update import UpdateHandler
from archive.update_request import UPDATE, parse_update_request, update_params
from bench.common import cpu_seconds
from bench.deid_export import database
from bench.synthetic import make_instance, make_study, to_bytes
from indexer.migrate import migrate
from indexer.operations import OperationRunner, create_operation, get_operation
from storage import LocalBlobStore

_ROOT = "1.2.826.0.1.3680043.10.1234.8."
_STUDY, _SERIES, _SOP = (_ROOT + f"{n}.1000000000000" for n in (1, 2, 3))
CHANGES = {
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Merged^Patient^Bench"}]},
    "00100020": {"vr": "LO", "Value": ["MRN-0000042"]},
    "00100021": {"vr": "LO", "Value": ["HOSPITAL-A"]},
}


def template(size: int) -> bytes:
    """One CT slice whose study, series and SOP Instance UIDs are fixed-length placeholders."""
    spec = make_study(random.Random(9), series_count=1, modalities=["CT"])
    spec.study_uid = _STUDY
    spec.series[0] = (_SERIES, "CT", 1)
    return to_bytes(make_instance(spec, 0, 1, rows=size, columns=size, sop_uid=_SOP))


def variants(data: bytes, studies: int, per_study: int) -> Iterator[bytes]:
    for s in range(studies):
        study = data.replace(_STUDY.encode(), f"{_ROOT}1.1{s:012d}".encode()).replace(
            _SERIES.encode(), f"{_ROOT}2.1{s:012d}".encode()
        )
        for n in range(per_study):
            yield study.replace(_SOP.encode(), f"{_ROOT}3.1{s * per_study + n:012d}".encode())


async def load(
    pool: asyncpg.Pool, store: LocalBlobStore, data: bytes, studies: int, per_study: int
) -> list[str]:
    ingestor = Ingestor(pool, store, 1)
    for instance in variants(data, studies, per_study):
        await ingestor.add(io.BytesIO(instance))
    outcomes = await ingestor.finish()
    failed = [o for o in outcomes if o.failure is not None]
    if failed:
        raise SystemExit(f"{len(failed)} instances were not stored: {failed[0].message}")
    return sorted({o.study_instance_uid for o in outcomes if o.study_instance_uid})


def postgres_pids(root: Path) -> list[int]:
    """The embedded PostgreSQL's postmaster and its children (backends, WAL writer, checkpointer...)."""
    pid_files = list(root.rglob("postmaster.pid"))
    if not pid_files:
        return []  # an external database (--database-url): its CPU is not measured
    postmaster = int(pid_files[0].read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return [postmaster, *children]


async def update(
    pool: asyncpg.Pool, store: LocalBlobStore, studies: list[str], database_pids: list[int]
) -> tuple[float, float, float, dict]:
    request = parse_update_request({"studyInstanceUids": studies, "changeDataset": CHANGES})
    runner = OperationRunner(pool, {UPDATE: UpdateHandler(store)}, poll_interval=0.05)
    cpu_before, db_before = cpu_seconds([os.getpid()]), cpu_seconds(database_pids)
    start = time.perf_counter()
    async with pool.acquire() as conn:
        op = await create_operation(conn, UPDATE, update_params("Microsoft.Default", request), [])
    runner.start()
    try:
        while True:
            async with pool.acquire() as conn:
                current = await get_operation(conn, op.id)
            assert current is not None
            if current.status in ("succeeded", "failed", "canceled"):
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - start
        cpu, db = cpu_seconds([os.getpid()]) - cpu_before, cpu_seconds(database_pids) - db_before
    finally:
        await runner.stop()
    if current.status != "succeeded":
        raise SystemExit(f"update {current.status}: {current.results}")
    return elapsed, cpu, db, current.results


async def main_async(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bulk-update-bench-") as tmp,
        database(args.database_url, Path(tmp)) as dsn,
    ):
        root = Path(tmp)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10)
        async with pool.acquire() as conn:
            await migrate(conn)
        store = LocalBlobStore(root / "blobs")
        data = template(args.size)
        t0 = time.perf_counter()
        studies = await load(pool, store, data, args.studies, args.per_study)
        count = args.studies * args.per_study
        print(f"stored {count} instances of {len(data) / 1024:.0f} KiB in {len(studies)} studies "
              f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        await asyncio.to_thread(os.sync)  # the ingest's writeback must not land inside the timed update
        elapsed, cpu, db, results = await update(pool, store, studies, postgres_pids(root))
        count = results["instanceUpdated"]
        load_average = os.getloadavg()[0]
        print(f"bulk update of {len(studies)} studies, {count} instances: {elapsed:.1f} s, "
              f"{count / elapsed:.0f} instances/s; CPU µs/instance: this process {cpu / count * 1e6:.0f}, "
              f"PostgreSQL {db / count * 1e6:.0f}; load average {load_average:.1f}; {results}")  # fmt: skip
        await store.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--per-study", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each instance")
    parser.add_argument("--database-url")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
