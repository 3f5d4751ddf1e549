"""WADO-RS frames: latency of one frame of a 100-frame instance, as stored and transcoded.

    python -m bench.frame_retrieve [--frames 100] [--size 512] [--rounds 200]
        [--storage-url s3://bucket/prefix --s3-endpoint-url http://host:port] [--direct-only]

Builds two multi-frame instances (--frames frames of --size x --size 16-bit CT-like images): one native
(Explicit VR Little Endian), one RLE-compressed. First it times the storage side alone: the stored bulk index
parsed, the frame's pieces found, one ranged read (no HTTP, no database), on a scratch local store or on
--storage-url. Then it starts `dicomweb serve` on its embedded default (1 worker, local blob store) in a
scratch directory, stores both, and times GET .../frames/{n} for random n, --rounds requests per case, on one
keep-alive connection, reading the whole body:
- native frame, multipart octet-stream, transfer-syntax=*  (one ranged read of the stored object);
- native frame, single part application/octet-stream;
- RLE frame as stored (transfer-syntax=*);
- RLE frame decoded to Explicit VR Little Endian (a transcode per request, for comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time

import httpx
import numpy as np
import orjson
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import RLELossless

from bench.common import embedded_archive, percentile
from bench.synthetic import make_instance, make_study, to_bytes
from dicomcore.frames import frames_from_index
from dicomcore.parse import parse_instance
from dicomweb.routes.frames import read_frame
from storage import open_store

MULTIPART_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def multiframe(frames: int, size: int, *, rle: bool) -> tuple[bytes, str]:
    spec = make_study(random.Random(11 + rle), series_count=1)
    ds = make_instance(spec, 0, 1, rows=8, columns=8)
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(3)
    # smooth-ish images so RLE has runs to find, as in real CT
    base = (np.add.outer(np.arange(size), np.arange(size)) % 4096).astype(np.uint16)
    stack = [(base + rng.integers(0, 4, size=(size, size), dtype=np.uint16)) for _ in range(frames)]
    if rle:
        encoder = get_encoder(RLELossless)
        encoded = [
            encoder.encode(
                frame,
                rows=size,
                columns=size,
                samples_per_pixel=1,
                bits_allocated=16,
                bits_stored=12,
                pixel_representation=0,
                photometric_interpretation="MONOCHROME2",
                number_of_frames=1,
            )
            for frame in stack
        ]
        ds.PixelData = encapsulate(encoded, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = RLELossless
    else:
        ds.PixelData = np.stack(stack).tobytes()
    return to_bytes(ds), ds.SOPInstanceUID


def time_frames(client: httpx.Client, url: str, frames: int, rounds: int, accept: str) -> list[float]:
    rng = random.Random(1)
    client.get(f"{url}/frames/1", headers={"Accept": accept}).raise_for_status()  # warm-up
    times = []
    for _ in range(rounds):
        n = rng.randint(1, frames)
        t = time.perf_counter()
        r = client.get(f"{url}/frames/{n}", headers={"Accept": accept})
        r.raise_for_status()
        _ = r.content
        times.append((time.perf_counter() - t) * 1000)
    return times


async def direct_reads(
    data: bytes, frames: int, rounds: int, storage_url: str | None, s3_endpoint_url: str | None
) -> list[float]:
    """The storage side of a frame request without HTTP or the database: parse the stored bulk index,
    find the frame's pieces, one ranged read from the blob store (a scratch local one by default)."""
    parsed = parse_instance(data)
    index = orjson.dumps([[b.path, b.offset, b.length, b.vr] for b in parsed.bulk])
    with tempfile.TemporaryDirectory(prefix="dicomweb-bench-") as tmp:
        store = open_store(storage_url or f"file://{tmp}", s3_endpoint_url=s3_endpoint_url)
        key = f"bench-frames-{random.randrange(1 << 30)}.dcm"
        await store.put(key, data)
        try:
            rng = random.Random(2)
            times = []
            for _ in range(rounds):
                n = rng.randint(1, frames)
                t = time.perf_counter()
                table = frames_from_index(orjson.loads(index))
                assert table is not None
                await read_frame(store, key, table[n - 1])
                times.append((time.perf_counter() - t) * 1000)
        finally:
            await store.delete(key)
            await store.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument(
        "--storage-url",
        help="blob store for the direct (no HTTP) reads, e.g. s3://bucket/prefix (AWS_* credentials); "
        "default: a scratch local directory",
    )
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint for --storage-url s3://...")
    parser.add_argument("--direct-only", action="store_true", help="skip the HTTP measurements")
    args = parser.parse_args()
    # the benchmark measures frames, not access control: run the archive open, as the test fixtures do
    os.environ.setdefault("DICOMWEB_INSECURE_OPEN", "true")
    native, _ = multiframe(args.frames, args.size, rle=False)
    rle, _ = multiframe(args.frames, args.size, rle=True)
    for label, data in (("native", native), ("RLE", rle)):
        times = asyncio.run(
            direct_reads(data, args.frames, args.rounds, args.storage_url, args.s3_endpoint_url)
        )
        where = args.storage_url or "a local blob store"
        print(
            f"{label} frame from {where}, no HTTP: p50 {percentile(times, 50):.2f} ms, "
            f"p95 {percentile(times, 95):.2f} ms"
        )
    if args.direct_only:
        return
    with embedded_archive(workers=1) as root, httpx.Client(base_url=root, timeout=120) as client:
        urls = []
        for data in (native, rle):
            r = client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
            r.raise_for_status()
            urls.append(r.json()["00081199"]["Value"][0]["00081190"]["Value"][0])
        cases = [
            ("native frame, multipart, transfer-syntax=*", urls[0], MULTIPART_ANY),
            ("native frame, single part octet-stream", urls[0], "application/octet-stream"),
            ("RLE frame as stored, multipart", urls[1], MULTIPART_ANY),
            (
                "RLE frame decoded to Explicit VR LE",
                urls[1],
                'multipart/related; type="application/octet-stream"',
            ),
        ]
        print(
            f"{args.frames}-frame instances, {args.size}x{args.size} 16-bit "
            f"(native {len(native) / 1e6:.1f} MB, RLE {len(rle) / 1e6:.1f} MB), "
            f"{args.rounds} random frames each"
        )
        # the fixed cost of a request on this machine (routing, access control, audit, one indexed query)
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            client.get(f"{urls[0]}/metadata").raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
        print(
            f"baseline, instance metadata: p50 {percentile(times, 50):.2f} ms, "
            f"p95 {percentile(times, 95):.2f} ms"
        )
        for label, url, accept in cases:
            times = time_frames(client, url, args.frames, args.rounds, accept)
            print(
                f"{label}: p50 {percentile(times, 50):.2f} ms, p95 {percentile(times, 95):.2f} ms, "
                f"max {max(times):.2f} ms"
            )


if __name__ == "__main__":
    main()
