"""Change feed consumers: the helper's drain rate (with a durable file checkpoint per batch), the FHIR
ImagingStudy sync's rate in studies per second, and commit-to-handler latency through the helper.

    python -m bench.changefeed_consumer [--url http://host:port] [--studies 100] [--per-study 20]
                                        [--batch 1000]

Without --url it starts `dicomweb serve` on its embedded default (2 workers) in a scratch directory and
stores the studies first (synthetic CT, one series each, one request per study). The FHIR server is the
in-memory one the tests use (tests/fixtures/fhir.py), validating every resource with fhir.resources, on
loopback in this process's own thread: its validation cost is part of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import random
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import embedded_archive, percentile
from bench.synthetic import instance_variants, make_study, multipart_body
from changefeed.checkpoint import FileCheckpoint, MemoryCheckpoint
from changefeed.consumer import ChangeFeedConsumer, Entry
from changefeed.fhirsync import ArchiveReader, FhirClient, FhirSync
from tests.fixtures.fhir import FhirStore, fhir_app
from tests.fixtures.server import ServerThread


async def fill(base: str, studies: int, per_study: int) -> None:
    rng = random.Random(5)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for n in range(studies):
            spec = make_study(rng, series_count=1, modalities=["CT"])
            body, content_type = multipart_body(instance_variants(spec, 0, per_study, start=n * per_study))
            r = await client.post(f"{base}/v2/studies", content=body, headers={"Content-Type": content_type})
            r.raise_for_status()


async def drain(base: str, batch: int, metadata: bool, scratch: Path) -> tuple[int, float]:
    count = 0

    async def handler(entries: list[Entry]) -> None:
        nonlocal count
        count += len(entries)

    checkpoint = FileCheckpoint(scratch / f"drain-{metadata}.checkpoint")
    consumer = ChangeFeedConsumer(
        f"{base}/v1", checkpoint, handler, batch_size=batch, include_metadata=metadata
    )
    start = time.perf_counter()
    await consumer.run(follow=False)
    return count, time.perf_counter() - start


async def fhir_sync(base: str, fhir_url: str, checkpoint: Path) -> tuple[dict[str, int], float]:
    async with httpx.AsyncClient(timeout=300) as client:
        sync = FhirSync(ArchiveReader(client), FhirClient(client, fhir_url), f"{base}/v2")
        consumer = ChangeFeedConsumer(
            f"{base}/v1", FileCheckpoint(checkpoint), sync, batch_size=1000, include_metadata=False
        )
        start = time.perf_counter()
        await consumer.run(follow=False)
        return sync.stats, time.perf_counter() - start


async def latency(base: str, probes: int) -> list[float]:
    """Commit-to-handler latency through the helper: a consumer long-polls while a producer stores one
    instance at a time, 20-100 ms apart; each entry's Timestamp (taken just before its commit) is compared
    with the moment the handler receives it (same machine, same clock)."""
    arrivals: list[float] = []
    done = asyncio.Event()

    async def handler(entries: list[Entry]) -> None:
        now = dt.datetime.now(dt.UTC)
        for entry in entries:
            arrivals.append((now - dt.datetime.fromisoformat(entry["Timestamp"])).total_seconds() * 1000)
        if len(arrivals) >= probes:
            done.set()

    async with httpx.AsyncClient(timeout=60) as client:
        latest = (await client.get(f"{base}/v1/changefeed/latest")).json()["Sequence"]
    consumer = ChangeFeedConsumer(f"{base}/v1", MemoryCheckpoint(latest), handler, wait=30)
    task = asyncio.create_task(consumer.run())
    rng = random.Random(9)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    files = instance_variants(spec, 0, probes, start=10**6)
    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.sleep(0.5)
        for data in files:
            body, content_type = multipart_body([data])
            r = await client.post(f"{base}/v2/studies", content=body, headers={"Content-Type": content_type})
            r.raise_for_status()
            await asyncio.sleep(rng.uniform(0.02, 0.1))
    await asyncio.wait_for(done.wait(), 60)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return arrivals


async def run(base: str, studies: int, per_study: int, batch: int, fill_first: bool) -> None:
    if fill_first:
        t = time.perf_counter()
        await fill(base, studies, per_study)
        print(f"stored {studies * per_study} instances in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory(prefix="bench-consumer-") as tmp:
        scratch = Path(tmp)
        for metadata in (False, True):
            count, seconds = await drain(base, batch, metadata, scratch)
            label = "with metadata" if metadata else "without metadata"
            print(
                f"consumer drain {label}: {count} entries in {seconds:.2f} s "
                f"= {count / seconds:,.0f} entries/s"
            )
        store = FhirStore()
        server = ServerThread(fhir_app(store))
        fhir_url = f"http://127.0.0.1:{await asyncio.to_thread(server.start)}"
        try:
            stats, seconds = await fhir_sync(base, fhir_url, scratch / "fhir.checkpoint")
            written = stats["updated"]
            print(
                f"fhir-sync: {written} ImagingStudy written ({len(store.of_type('ImagingStudy'))} held) in "
                f"{seconds:.2f} s = {written / seconds:.1f} studies/s, "
                f"{written * per_study / seconds:,.0f} instances/s"
            )
            # a replay from 0 (a lost checkpoint): every study is rebuilt and found unchanged
            stats, seconds = await fhir_sync(base, fhir_url, scratch / "replay.checkpoint")
            print(
                f"fhir-sync replay: {stats['unchanged']} unchanged, {stats['updated']} written "
                f"in {seconds:.2f} s"
            )
        finally:
            await asyncio.to_thread(server.stop)
    values = await latency(base, 200)
    print(
        f"commit-to-handler latency over {len(values)} entries: p50 {percentile(values, 50):.1f} ms, "
        f"p95 {percentile(values, 95):.1f} ms, max {max(values):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running archive (http://host:port); default: start one")
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--per-study", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url.rstrip("/"), args.studies, args.per_study, args.batch, fill_first=False))
        return
    with embedded_archive(workers=2) as v2:
        asyncio.run(run(v2.removesuffix("/v2"), args.studies, args.per_study, args.batch, fill_first=True))


if __name__ == "__main__":
    main()
