"""Change feed: read throughput with and without metadata, and commit-to-consumer latency.

    python -m bench.changefeed [--url http://host:port] [--entries 20000] [--page 1000] [--probes 200]
    python -m bench.changefeed --data-dir /work/bench-out/scale-10m --sample-pages 200 [--probes 200]

Without --url it starts `dicomweb serve` on its embedded default (2 workers) in a scratch directory and
fills the feed with STOW first (small synthetic instances, 100 per request). Latency is measured from the
entry's Timestamp (taken in the writer's transaction, just before its commit) to the moment a consumer
long-polling with `wait` has the entry parsed, so it includes the commit itself.

`--data-dir` serves an existing data set (e.g. bench.scale_load's millions of entries) instead of filling one;
with `--sample-pages N` it reads N pages at random offsets (with and without metadata; v2 too) and the
last minute by time instead of the whole feed, which at 10M entries would take minutes per pass and say
nothing more: a page's cost is what grows.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import time
from pathlib import Path

import httpx

from bench.common import embedded_archive, percentile
from bench.synthetic import instance_variants, make_study, multipart_body
from indexer.embedded import EmbeddedPostgres


async def fill(base: str, entries: int) -> None:
    rng = random.Random(11)
    made = 0
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while made < entries:
            spec = make_study(rng, series_count=1, modalities=["CT"])
            files = instance_variants(spec, 0, min(100, entries - made), start=made)
            body, content_type = multipart_body(files)
            r = await client.post(f"{base}/v2/studies", content=body, headers={"Content-Type": content_type})
            r.raise_for_status()
            made += len(files)


async def read_all(base: str, page: int, metadata: bool) -> tuple[int, float]:
    offset, count = 0, 0
    async with httpx.AsyncClient(timeout=300) as client:
        start = time.perf_counter()
        while True:
            r = await client.get(
                f"{base}/v1/changefeed",
                params={"offset": offset, "limit": page, "includemetadata": str(metadata).lower()},
            )
            entries = r.json()
            if not entries:
                break
            count += len(entries)
            offset = entries[-1]["Sequence"]
        return count, time.perf_counter() - start


async def sample_pages(
    base: str,
    page: int,
    pages: int,
    metadata: bool,
    version: str = "v1",
    window: tuple[int, int] | None = None,
) -> None:
    """Pages at random offsets across the whole feed: p50/p95 ms per page and entries/s.

    v1 offsets are sequences (an index range read); v2 offsets count entries of a time window (Azure's
    v2 paging; with no window, the whole feed). `version` may name a partition's feed
    ("v2/partitions/Microsoft.Default"), whose offsets count that partition's entries. `window` is a
    range of sequences whose entries' timestamps become startTime and endTime; offsets are then drawn
    from the window's entries."""
    rng = random.Random(13)
    async with httpx.AsyncClient(timeout=300) as client:
        last = (await client.get(f"{base}/v1/changefeed/latest")).json()["Sequence"]
        params: dict[str, object] = {"limit": page, "includemetadata": str(metadata).lower()}
        span, label = last, f"random offsets of {last} entries"
        if window is not None:
            stamps = []
            for sequence in window:
                entry = await client.get(f"{base}/v1/changefeed", params={"offset": sequence - 1, "limit": 1})
                stamps.append(entry.json()[0]["Timestamp"])
            params |= {"startTime": stamps[0], "endTime": stamps[1]}
            span = window[1] - window[0]
            label = f"random offsets of the window from sequence {window[0]} to {window[1]} ({span} entries)"
        timings, count = [], 0
        for _ in range(pages):
            offset = rng.randrange(max(span - page, 1))
            t = time.perf_counter()
            r = await client.get(f"{base}/{version}/changefeed", params={**params, "offset": offset})
            r.raise_for_status()
            count += len(r.json())
            timings.append(time.perf_counter() - t)
    print(
        f"{version}: {pages} pages of {page} at {label}, "
        f"{'with' if metadata else 'without'} metadata: p50 {percentile(timings, 50) * 1000:.1f} ms, "
        f"p95 {percentile(timings, 95) * 1000:.1f} ms per page, {count / sum(timings):,.0f} entries/s"
    )


async def latest_sequence(base: str) -> int:
    async with httpx.AsyncClient(timeout=60) as client:
        return (await client.get(f"{base}/v1/changefeed/latest")).json()["Sequence"]


async def tail_by_time(base: str, reads: int = 6) -> None:
    """v2 reads of the last minute's entries (startTime = the latest entry's Timestamp - 60 s), as a consumer
    that follows the feed by time makes them: their cost should not depend on the entries before."""
    async with httpx.AsyncClient(timeout=600) as client:
        latest = (await client.get(f"{base}/v2/changefeed/latest")).json()
        start = dt.datetime.fromisoformat(latest["Timestamp"]) - dt.timedelta(seconds=60)
        timings, count = [], 0
        for _ in range(reads):
            t = time.perf_counter()
            r = await client.get(
                f"{base}/v2/changefeed", params={"startTime": start.isoformat(), "limit": 100}
            )
            r.raise_for_status()
            count = len(r.json())
            timings.append(time.perf_counter() - t)
    print(
        f"v2: the last minute by time ({count} entries, limit 100), {reads} reads: "
        f"median {percentile(timings, 50) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms"
    )


async def latency(base: str, probes: int) -> list[float]:
    rng = random.Random(12)
    async with httpx.AsyncClient(timeout=120) as client:
        offset = (await client.get(f"{base}/v1/changefeed/latest")).json()["Sequence"]
        first_uid = 10_000_000 + offset  # new SOP Instance UIDs on every run against the same data set
        delays: list[float] = []

        async def consumer() -> None:
            nonlocal offset
            while len(delays) < probes:
                r = await client.get(
                    f"{base}/v1/changefeed",
                    params={"offset": offset, "limit": 100, "includemetadata": "false", "wait": 30},
                )
                now = dt.datetime.now(dt.UTC)
                for entry in r.json():
                    stamp = dt.datetime.fromisoformat(entry["Timestamp"])
                    delays.append((now - stamp).total_seconds())
                    offset = entry["Sequence"]

        async def producer() -> None:
            async with httpx.AsyncClient(timeout=60) as writer:
                for n in range(probes):
                    spec = make_study(rng, series_count=1, modalities=["CT"])
                    body, content_type = multipart_body(instance_variants(spec, 0, 1, start=first_uid + n))
                    r = await writer.post(
                        f"{base}/v2/studies", content=body, headers={"Content-Type": content_type}
                    )
                    r.raise_for_status()
                    await asyncio.sleep(rng.uniform(0.02, 0.1))  # commits arrive while the consumer waits

        await asyncio.gather(consumer(), producer())
        return delays


async def run(base: str, entries: int, page: int, probes: int, fill_first: bool, sample: int = 0) -> None:
    if sample:
        for metadata in (False, True):
            await sample_pages(base, page, sample, metadata)
        await sample_pages(base, page, max(sample // 10, 5), False, "v2")
        # v2 windows and one partition's feed, with offsets deep into them (bench.scale_load writes
        # every entry to the default partition, so its feed is the whole feed)
        last = await latest_sequence(base)
        window = (last // 10, last * 9 // 10)
        partition = "v2/partitions/Microsoft.Default"
        for version, in_window in (("v2", True), (partition, False), (partition, True)):
            await sample_pages(base, page, sample, False, version, window if in_window else None)
        await tail_by_time(base)
    elif fill_first:
        t = time.perf_counter()
        await fill(base, entries)
        print(f"filled the feed with {entries} entries by STOW in {time.perf_counter() - t:.1f} s")
    for metadata in (False, True) if not sample else ():
        count, elapsed = await read_all(base, page, metadata)
        print(
            f"read {count} entries {'with' if metadata else 'without'} metadata, {page} per page: "
            f"{elapsed:.2f} s, {count / elapsed:,.0f} entries/s"
        )
    delays = await latency(base, probes)
    print(
        f"commit-to-consumer latency over {len(delays)} entries: p50 {percentile(delays, 50) * 1000:.1f} ms, "
        f"p95 {percentile(delays, 95) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="archive base URL (http://host:port); default: start one")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, help="serve this data set instead of filling a new one")
    parser.add_argument("--sample-pages", type=int, default=0, help="read N random pages, not the whole feed")
    args = parser.parse_args()
    if args.data_dir:
        with (
            EmbeddedPostgres(args.data_dir.resolve() / "postgres") as pg,
            embedded_archive(workers=2, data_dir=args.data_dir.resolve(), database_url=pg.dsn) as root,
        ):
            base = root.removesuffix("/v2")
            asyncio.run(run(base, 0, args.page, args.probes, fill_first=False, sample=args.sample_pages))
        return
    if args.url:
        asyncio.run(run(args.url.rstrip("/"), args.entries, args.page, args.probes, fill_first=False))
        return
    with embedded_archive(workers=2) as root:
        base = root.removesuffix("/v2")
        asyncio.run(run(base, args.entries, args.page, args.probes, fill_first=True))


if __name__ == "__main__":
    main()
