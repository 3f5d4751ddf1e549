"""Rendered JPEG throughput of 512x512 CT slices over HTTP, and the render step alone.

    python -m bench.rendered [--instances 50] [--seconds 15] [--concurrency 8] [--workers 2]

Starts `dicomweb serve` on its embedded default (--workers uvicorn processes) in a scratch directory,
stores --instances synthetic 512x512 16-bit CT slices (Explicit VR Little Endian, window 40/400, rescale
-1024), then keeps --concurrency requests for `.../rendered` (image/jpeg, default window and quality) in
flight for --seconds and reports images per second and latency percentiles. Every request renders: rendered
images are not cached (thumbnails are). The load generator runs on the same machine and takes its share of
the cores. Also reports the single-thread rate of dicomcore.render.render on one slice held in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import time

import httpx
import numpy as np

from bench.common import embedded_archive, percentile
from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomcore.render import RenderOptions, render


def ct_slices(count: int) -> tuple[list[str], list[bytes]]:
    rng = random.Random(7)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    y, x = np.mgrid[0:512, 0:512]
    body = ((x - 256) ** 2 + (y - 256) ** 2 < 200**2).astype(np.int32)
    paths, files = [], []
    for n in range(1, count + 1):
        ds = make_instance(spec, 0, n, rng=rng, rows=512, columns=512)
        noise = np.random.default_rng(n).normal(0, 20, size=(512, 512))
        ds.PixelData = np.clip(body * 1040 + 24 + noise, 0, 4095).astype(np.uint16).tobytes()
        paths.append(f"/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
        files.append(to_bytes(ds))
    return paths, files


async def load(
    url: str, paths: list[str], seconds: float, concurrency: int
) -> tuple[int, list[float], float]:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await client.get(paths[i % len(paths)] + "/rendered", headers={"Accept": "image/jpeg"})
                r.raise_for_status()
                assert r.content[:2] == b"\xff\xd8"
                times.append((time.perf_counter() - t) * 1000)
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(times), times, elapsed


def render_alone(data: bytes, rounds: int = 200) -> float:
    options = RenderOptions("image/jpeg")
    render(io.BytesIO(data), None, options)
    start = time.perf_counter()
    for _ in range(rounds):
        render(io.BytesIO(data), None, options)
    return rounds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    paths, files = ct_slices(args.instances)
    print(f"render() alone, one thread: {render_alone(files[0]):.0f} images/s (512x512 CT -> JPEG)")
    with embedded_archive(workers=args.workers) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            body, content_type = multipart_body(files)
            client.post("/studies", content=body, headers={"Content-Type": content_type}).raise_for_status()
        asyncio.run(load(url, paths, 2, args.concurrency))  # warm up: connections, imports, caches
        count, times, elapsed = asyncio.run(load(url, paths, args.seconds, args.concurrency))
    print(
        f"GET .../rendered (image/jpeg), {args.workers} workers, {args.concurrency} in flight: "
        f"{count / elapsed:.0f} images/s over {elapsed:.1f} s; latency p50 {percentile(times, 50):.1f} ms, "
        f"p95 {percentile(times, 95):.1f} ms, max {max(times):.1f} ms"
    )


if __name__ == "__main__":
    main()
