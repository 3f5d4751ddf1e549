"""HL7 ADT^A08 to committed update: a patient with --studies studies renamed by the HIS, over MLLP.

    python -m bench.hl7_adt [--studies 10] [--per-study 3] [--size 64] [--rounds 50] [--database-url URL]

Stores --studies studies of --per-study CT-like instances (--size x --size, 16 bit) of one patient into a
scratch archive (embedded PostgreSQL unless --database-url, local blob store) through archive.ingest. Then
the archive's own HL7 front door (hl7.server.MllpServer, hl7.service.Hl7Service) and its operation runner
with the bulk update handler (archive/update.py) run in this process, as in `dicomweb serve`, and an MLLP
client sends --rounds ADT^A08 messages, each with a new patient name, one after the other.

Two times per message, from the first byte sent:
* ACK: the AA arrived (the `update` operation is committed, queued);
* committed: the operation's last step committed (every instance of the patient's studies rewritten, as new
  versions, with their change feed entries). Seen through the change feed's NOTIFY, which PostgreSQL
  delivers at commit, then the operation row read once.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from archive.ingest import Ingestor
from archive.update import UpdateHandler
from archive.update_request import UPDATE
from bench.common import cpu_seconds, percentile
from bench.deid_export import database
from bench.synthetic import make_instance, make_study, to_bytes
from changefeed.log import CHANNEL
from hl7.server import END, START, MllpServer
from hl7.service import Hl7Service
from indexer.migrate import migrate
from indexer.operations import OperationRunner
from storage import LocalBlobStore

PATIENT = "PAT-BENCH-1"


def a08(n: int) -> bytes:
    """A realistic ADT^A08 (v2.5: MSH, EVN, PID, PV1) renaming the patient to Name<n>."""
    return "\r".join([
        f"MSH|^~\\&|EPICADT|STJOHNS|DICOMWEB|RADIOLOGY|20261207081500||ADT^A08^ADT_A01|BENCH{n:06d}|P|2.5|||AL|NE",
        "EVN|A08|20261207081500|||JSMITH^Smith^Jane",
        f"PID|1||{PATIENT}^^^STJOHNS^MR~987-65-4321^^^SSA^SS||Bench^Name{n}^Maria^^Dr.^^L||19801224|F|||"
        f"Hauptstr. 5^^Berlin^^10115^DEU^H||^PRN^PH^^49^30^1234567|||M",
        "PV1|1|O|RAD^^^STJOHNS||||1234^Referrer^Rita|||||||||||||V000123^^^STJOHNS^VN",
    ]).encode() + b"\r"  # fmt: skip


async def load(pool: asyncpg.Pool, store: LocalBlobStore, studies: int, per_study: int, size: int) -> int:
    rng = random.Random(7)
    ingestor = Ingestor(pool, store, 1)
    count = 0
    for _ in range(studies):
        spec = make_study(rng, series_count=1, modalities=["CT"])
        spec.patient_id = PATIENT
        for n in range(per_study):
            await ingestor.add(
                io.BytesIO(to_bytes(make_instance(spec, 0, n + 1, rows=size, columns=size, rng=rng)))
            )
            count += 1
    outcomes = await ingestor.finish()
    failed = [o for o in outcomes if o.failure is not None]
    if failed:
        raise SystemExit(f"{len(failed)} instances were not stored: {failed[0].message}")
    return count


async def run(args: argparse.Namespace, dsn: str, root: Path) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=8)
    async with pool.acquire() as conn:
        await migrate(conn)
    store = LocalBlobStore(root / "blobs")
    count = await load(pool, store, args.studies, args.per_study, args.size)
    await asyncio.to_thread(os.sync)  # the ingest's writeback must not land inside the timed updates
    print(f"stored {count} instances in {args.studies} studies of patient {PATIENT}", flush=True)

    runner = OperationRunner(pool, {UPDATE: UpdateHandler(store)})
    service = Hl7Service(pool, "Microsoft.Default", runner.poke)
    server = MllpServer(service, "127.0.0.1", 0)
    await server.start()
    runner.start()
    listener = await asyncpg.connect(dsn)
    committed: asyncio.Queue[None] = asyncio.Queue()
    await listener.add_listener(CHANNEL, lambda *_: committed.put_nowait(None))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    acks, done = [], []
    cpu_before = cpu_seconds([os.getpid()])
    try:
        for n in range(args.rounds + 1):  # the first is a warm-up (hl7apy loads the version's tables)
            while not committed.empty():
                committed.get_nowait()
            start = time.perf_counter()
            writer.write(START + a08(n) + END)
            await writer.drain()
            ack = await reader.readuntil(END)
            acked = time.perf_counter()
            assert b"MSA|AA|" in ack, ack
            while True:
                await committed.get()
                row = await pool.fetchrow(
                    "SELECT status, results, (result->'operations'->>0) AS op FROM hl7_message m "
                    "JOIN operation o ON o.operation_id = uuid((m.result->'operations'->>0)) "
                    "WHERE m.control_id = $1",
                    f"BENCH{n:06d}",
                )
                if row is not None and row["status"] in ("succeeded", "failed"):
                    break
            finished = time.perf_counter()
            assert row["status"] == "succeeded", row
            if n:
                acks.append((acked - start) * 1000)
                done.append((finished - start) * 1000)
    finally:
        cpu = cpu_seconds([os.getpid()]) - cpu_before
        writer.close()
        await listener.close()
        await server.stop()
        await runner.stop()
        await store.close()
        await pool.close()
    print(f"{args.rounds} ADT^A08, each updating {count} instances in {args.studies} studies:")
    for label, values in (("ACK (AA: update queued)", acks), ("update committed", done)):
        print(f"  {label:26s} p50 {percentile(values, 50):6.1f} ms  p95 {percentile(values, 95):6.1f} ms"
              f"  max {max(values):6.1f} ms")  # fmt: skip
    print(
        f"  this process: {cpu / args.rounds * 1000:.1f} CPU ms per message (PostgreSQL's own not included)"
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix=f"hl7-bench-{uuid.uuid4().hex[:6]}-") as tmp:
        with database(args.database_url, Path(tmp)) as dsn:
            await run(args, dsn, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--per-study", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each instance")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--database-url")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
