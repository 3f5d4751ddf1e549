"""Replication lag under ingest: how long after the source commits an instance the standby has it.

    python -m bench.replication [--rate 500] [--seconds 30] [--per-request 10] [--workers 1]

Starts two `dicomweb serve` processes on their embedded defaults (source and standby, each in a scratch
directory, `--workers` each) and `dicomweb replicate --follow` between them as a third process, then stores
synthetic CT instances (128x128, 16 bit, ~33 KB) on the source at `--rate` instances/s in requests of
`--per-request`, for `--seconds`. When the standby has caught up, each instance's lag is the standby's
change feed Timestamp minus the source's (both taken just before the commit, on the same clock), read from
the two feeds afterwards, so the measurement adds nothing to the path it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import orjson

from bench.common import embedded_archive, percentile, serve_processes, tree_cpu_seconds
from bench.synthetic import instance_variants, make_study, multipart_body


def request_bodies(rate: float, seconds: float, per_request: int) -> list[tuple[bytes, str]]:
    """Every STOW request of the run, made beforehand so that making them costs the run no CPU."""
    rng = random.Random(7)
    bodies = []
    for n in range(int(rate * seconds / per_request) + 1):
        spec = make_study(rng, series_count=1, modalities=["CT"])
        bodies.append(multipart_body(instance_variants(spec, 0, per_request, start=n * per_request)))
    return bodies


async def ingest(
    root: str, bodies: list[tuple[bytes, str]], rate: float, per_request: int
) -> tuple[int, float]:
    """Store `bodies` at `rate` instances/s (paced by request start times); returns (instances, elapsed s).

    aiohttp, not httpx: the load generator shares the two cores with what it measures, and httpx spent
    ~8 ms of CPU on each 340 KB request (aiohttp comes with aiobotocore)."""
    interval = per_request / rate
    stored = 0
    pending: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:

        async def post(body: bytes, content_type: str) -> int:
            async with session.post(
                f"{root}/studies", data=body, headers={"Content-Type": content_type}
            ) as r:
                await r.read()
                return r.status

        async def send(body: bytes, content_type: str) -> None:
            nonlocal stored
            try:
                status = await post(body, content_type)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # a kept-alive connection the server closed as the request went out: sent again, a STOW
                # that did arrive the first time answers 409 (already stored), which counts as stored
                status = await post(body, content_type)
            if status not in (200, 409):
                raise RuntimeError(f"STOW answered {status}")
            stored += per_request

        start = time.monotonic()
        for n, (body, content_type) in enumerate(bodies):
            due = start + n * interval
            if due > (now := time.monotonic()):
                await asyncio.sleep(due - now)
            task = asyncio.create_task(send(body, content_type))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        return stored, time.monotonic() - start


def feed_times(base: str) -> dict[str, float]:
    """SOP Instance UID -> the Timestamp of its create entry, from the whole v1 change feed."""
    times: dict[str, float] = {}
    offset = 0
    with httpx.Client(timeout=120) as client:
        while True:
            page = client.get(f"{base}/v1/changefeed", params={"offset": offset, "limit": 10000}).json()
            if not page:
                return times
            for entry in page:
                if entry["Action"] == "create":
                    stamp = dt.datetime.fromisoformat(entry["Timestamp"].replace("Z", "+00:00"))
                    times[entry["SopInstanceUid"]] = stamp.timestamp()
            offset = page[-1]["Sequence"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="instances/s stored on the source")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--per-request", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="server processes of each archive")
    parser.add_argument("--batch-size", type=int, default=500, help="replicate --batch-size")
    parser.add_argument("--parallel", type=int, default=8, help="replicate --parallel")
    args = parser.parse_args()
    extra = ["--dimse-port", "0"]
    with (
        tempfile.TemporaryDirectory(prefix="dicomweb-bench-repl-") as scratch,
        embedded_archive(args.workers, extra_args=extra) as source,
        embedded_archive(args.workers, extra_args=extra) as standby,
    ):
        status = Path(scratch) / "status.json"
        replicator = subprocess.Popen(
            [sys.executable, "-m", "dicomweb.cli", "replicate", "--source", source, "--target", standby,
             "--checkpoint", f"{scratch}/checkpoint", "--follow", "--status-file", str(status),
             "--batch-size", str(args.batch_size), "--parallel", str(args.parallel)],
            start_new_session=True,
        )  # fmt: skip
        bodies = request_bodies(args.rate, args.seconds, args.per_request)
        parts = {
            "source": serve_processes(source), "standby": serve_processes(standby),
            "replicate": {replicator.pid},
        }  # fmt: skip
        own = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before = {name: tree_cpu_seconds(pids) for name, pids in parts.items()}
        try:
            load_before = os.getloadavg()
            stored, elapsed = asyncio.run(ingest(source, bodies, args.rate, args.per_request))
            load_after = os.getloadavg()
            source_base = source.removesuffix("/v2")
            latest = httpx.get(f"{source_base}/v1/changefeed/latest").json()["Sequence"]
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if status.exists() and orjson.loads(status.read_bytes())["position"] >= latest:
                    break
                time.sleep(0.2)
            caught_up = time.monotonic() - (deadline - 600)
            cpu = {name: tree_cpu_seconds(pids) - cpu_before[name] for name, pids in parts.items()}
            used = resource.getrusage(resource.RUSAGE_SELF)
            cpu["load generator"] = used.ru_utime + used.ru_stime - own.ru_utime - own.ru_stime
        finally:
            replicator.send_signal(signal.SIGTERM)
            replicator.wait(timeout=30)
        src, dst = feed_times(source_base), feed_times(standby.removesuffix("/v2"))
    lags = [dst[sop] - src[sop] for sop in src if sop in dst]
    first = min(src.values())
    by_second: dict[int, float] = {}
    for sop, t in src.items():
        if sop in dst:
            second = int(t - first)
            by_second[second] = max(by_second.get(second, 0.0), dst[sop] - t)
    print(f"stored {stored} instances in {elapsed:.1f} s: {stored / elapsed:.0f} instances/s on the source")
    print(f"standby holds {len(lags)} of {len(src)}; caught up {caught_up:.1f} s after the load ended")
    p50, p95, p99 = (percentile(lags, p) for p in (50, 95, 99))
    print(f"lag (s): min {min(lags):.2f}  p50 {p50:.2f}  p95 {p95:.2f}  p99 {p99:.2f}  max {max(lags):.2f}")
    print(
        "largest lag of each second of ingest (s): "
        + " ".join(f"{v:.1f}" for _, v in sorted(by_second.items()))
    )
    print(
        "CPU seconds per 1,000 instances: "
        + ", ".join(f"{k} {v / stored * 1000:.2f}" for k, v in cpu.items())
    )
    print(f"load average before / after the load: {load_before[0]:.2f} / {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
