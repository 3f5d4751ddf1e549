"""WADO-RS: series metadata latency, and streaming throughput of a large instance beside `dd`.

    python -m bench.wado_retrieve [--series-size 500] [--rounds 50] [--big-mb 256] [--auth]

Starts `dicomweb serve` on its embedded default (1 worker) in a scratch directory, stores a series of
CT-size instances and one large instance, then times:
- GET series metadata (p50/p95/max over --rounds requests);
- GET the large instance (transfer-syntax=*), read to the end, MB/s; and `dd` of the stored object file.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import embedded_archive, percentile
from bench.synthetic import instance_variants, make_instance, make_study, multipart_body, to_bytes


def series_metadata(url: str, series_size: int, rounds: int, headers: dict[str, str]) -> None:
    spec = make_study(random.Random(5), series_count=1)
    files = instance_variants(spec, 0, series_size)
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for start in range(0, series_size, 100):
            body, content_type = multipart_body(files[start : start + 100])
            client.post("/studies", content=body, headers={"Content-Type": content_type}).raise_for_status()
        path = f"/studies/{spec.study_uid}/series/{spec.series[0][0]}/metadata"
        client.get(path).raise_for_status()
        times = []
        size = 0
        for _ in range(rounds):
            t = time.perf_counter()
            r = client.get(path)
            r.raise_for_status()
            size = len(r.content)
            times.append((time.perf_counter() - t) * 1000)
        assert len(r.json()) == series_size
    print(
        f"series metadata, {series_size} instances ({size / 1e6:.1f} MB JSON): "
        f"p50 {percentile(times, 50):.1f} ms, p95 {percentile(times, 95):.1f} ms, max {max(times):.1f} ms"
    )


def big_instance(url: str, data_dir: Path, megabytes: int, headers: dict[str, str]) -> None:
    spec = make_study(random.Random(6), series_count=1)
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5)
    ds = make_instance(spec, 0, 1, rows=8, columns=8)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, size=side * side, dtype=np.uint16).tobytes()
    data = to_bytes(ds)
    with httpx.Client(base_url=url, timeout=600, headers=headers) as client:
        r = client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        retrieve = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
        best = 0.0
        for _ in range(3):
            # curl as the client: a Python client would measure its own read loop, not the server
            out = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}",
                 "-H", "Accept: application/dicom; transfer-syntax=*",
                 *[arg for k, v in headers.items() for arg in ("-H", f"{k}: {v}")], retrieve],
                capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            assert int(out[0]) == len(data)
            best = max(best, float(out[1]) / 1e6)
    blob = max((data_dir / "blobs").rglob("*.dcm"), key=lambda p: p.stat().st_size)
    dd = (
        subprocess.run(
            ["dd", f"if={blob}", "of=/dev/null", "bs=1M"], capture_output=True, text=True, check=True
        )
        .stderr.strip()
        .splitlines()[-1]
    )
    print(f"retrieve {len(data) / 1e6:.0f} MB instance over HTTP: {best:.0f} MB/s (best of 3, warm cache)")
    print(f"dd of the stored object (warm cache): {dd}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--big-mb", type=int, default=256)
    parser.add_argument("--auth", action="store_true", help="access control on, the owner token sent")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="dicomweb-bench-") as tmp,
        embedded_archive(workers=1, data_dir=Path(tmp), insecure_open=not args.auth) as url,
    ):
        headers = {}
        if args.auth:  # the embedded default's first start wrote it
            headers = {"Authorization": f"Bearer {(Path(tmp) / 'owner-token').read_text().strip()}"}
        series_metadata(url, args.series_size, args.rounds, headers)
        big_instance(url, Path(tmp), args.big_mb, headers)


if __name__ == "__main__":
    main()
