"""STOW-RS ingest throughput: batched multipart requests of CT-size instances from several clients.

    python -m bench.stow_ingest [--url http://host:port/v2] [--instances 4000] [--batch 50] [--clients 4]

Without --url it starts `dicomweb serve` on its embedded default (2 workers) in a scratch directory.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import httpx

from bench.common import embedded_archive
from bench.synthetic import instance_variants, make_study, multipart_body


async def run(url: str, instances: int, batch: int, clients: int) -> None:
    rng = random.Random(7)
    bodies: list[tuple[bytes, str]] = []
    made = 0
    while made < instances:
        spec = make_study(rng, series_count=1, modalities=["CT"])
        files = instance_variants(spec, 0, min(batch, instances - made), start=made)
        bodies.append(multipart_body(files))
        made += len(files)
    size = sum(len(b) for b, _ in bodies) / instances
    queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    latencies: list[float] = []

    async def worker() -> None:
        # a connection per request: keep-alive would pin each client to one server process
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not queue.empty():
                body, content_type = queue.get_nowait()
                t = time.perf_counter()
                r = await client.post(f"{url}/studies", content=body, headers={"Content-Type": content_type})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"STOW failed: {r.status_code} {r.text[:300]}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    print(
        f"stored {instances} instances of {size / 1024:.1f} KiB in {elapsed:.2f} s: "
        f"{instances / elapsed:.0f} instances/s, {instances * size / elapsed / 1e6:.1f} MB/s "
        f"({clients} clients, {batch} instances per request, "
        f"mean request {sum(latencies) / len(latencies) * 1000:.0f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url")
    parser.add_argument("--instances", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.instances, args.batch, args.clients))
    else:
        with embedded_archive(workers=args.workers) as url:
            asyncio.run(run(url, args.instances, args.batch, args.clients))


if __name__ == "__main__":
    main()
