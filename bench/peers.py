"""Side by side with Orthanc: the same data into both, one table of figures and ratios.

    python -m bench.peers [--studies 40] [--per-study 50] [--rows 128] [--clients 4] [--rounds 40]
                          [--passes 1]

Starts this archive as the README does (`dicomweb serve` with its defaults: embedded PostgreSQL, local
store, as many workers as cores; only a scratch --data-dir, a free port and --insecure-open, since Orthanc
runs without authentication too) and Orthanc 1.x with its DICOMweb plugin from Debian (installed by
scripts/dimse-deps if missing; SQLite index, 127.0.0.1 only). Then, one peer after the other on the same
machine, it measures:

- STOW-RS ingest: `--clients` concurrent clients, one study (`--per-study` instances) per request;
- QIDO-RS by PatientID: p50 and p95 of sequential requests on one keep-alive connection;
- series metadata: median;
- series retrieval (multipart, transfer-syntax=*): MB/s with `--clients` concurrent `curl` clients, each
  reading every series `--passes` times (curl as the client, so a Python client's read loop is not what
  is measured);
- single instance (multipart, transfer-syntax=*), one frame (octet-stream, transfer-syntax=*) and rendered
  (image/jpeg): median latency.

`--rows 512` makes ~500 KB instances instead of ~40 KB ones. Ratios are "times better than Orthanc".

    python -m bench.peers --large 100000 [--rounds 100]

The large size, for QIDO-RS: `--large` studies of two series and 10 small instances each (8x8 pixels; the
attributes of bench.qido_search's data set: random patients, dates, accession numbers, descriptions),
loaded into both by STOW-RS (100 instances a request, `--clients` at once; the load rates are printed),
Orthanc's index on PostgreSQL through the orthanc-postgresql plugin (a PostgreSQL the bench starts, as the
archive's embedded one). Then p50/p95 per query shape, each peer measured alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom import dcmread

from bench.common import embedded_archive, free_port, percentile
from bench.orthanc_peer import orthanc
from bench.synthetic import StudySpec, instance_variants, make_study, multipart_body
from indexer.embedded import SUPERUSER, EmbeddedPostgres

MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
JSON = "application/dicom+json"
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
JPEG = "image/jpeg"


@dataclass
class PeerData:
    studies: list[StudySpec]
    bodies: list[tuple[bytes, str]]  # one STOW request per study
    sop_uids: list[list[str]]  # per study, the SOP Instance UIDs of its one series
    instance_bytes: int

    @property
    def instances(self) -> int:
        return sum(len(s) for s in self.sop_uids)


@dataclass
class Figures:
    values: dict[str, float] = field(default_factory=dict)


def make_dataset(studies: int, per_study: int, rows: int) -> PeerData:
    rng = random.Random(11)
    specs, bodies, sops, size = [], [], [], 0
    for n in range(studies):
        spec = make_study(rng, series_count=1, modalities=["CT"])
        files = instance_variants(spec, 0, per_study, start=n * per_study, rows=rows, columns=rows)
        specs.append(spec)
        bodies.append(multipart_body(files))
        sops.append([_sop_uid(data) for data in files])
        size += sum(len(f) for f in files)
    return PeerData(specs, bodies, sops, size // (studies * per_study))


def _sop_uid(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def stow(root: str, data: PeerData, clients: int) -> float:
    """Instances per second, `clients` posting one study per request at once."""

    async def run() -> float:
        queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
        for item in data.bodies:
            queue.put_nowait(item)

        async def client() -> None:
            async with httpx.AsyncClient(timeout=600) as http:
                while not queue.empty():
                    body, content_type = queue.get_nowait()
                    headers = {"Content-Type": content_type}
                    r = await http.post(f"{root}/studies", content=body, headers=headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"STOW to {root} failed: {r.status_code} {r.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return data.instances / (time.perf_counter() - start)

    return asyncio.run(run())


def latencies(root: str, paths: list[str], accept: str, rounds: int) -> list[float]:
    """Milliseconds per GET, sequential on one keep-alive connection, after one warm-up pass."""
    times = []
    with httpx.Client(base_url=root, timeout=120, headers={"Accept": accept}) as http:
        for path in paths[: min(len(paths), 5)]:
            http.get(path).raise_for_status()
        for n in range(rounds):
            path = paths[n % len(paths)]
            t = time.perf_counter()
            r = http.get(path)
            r.raise_for_status()
            _ = r.content
            times.append((time.perf_counter() - t) * 1000)
    return times


def series_paths(data: PeerData) -> list[str]:
    return [f"/studies/{s.study_uid}/series/{s.series[0][0]}" for s in data.studies]


def retrieval(root: str, data: PeerData, clients: int, passes: int = 1) -> float:
    """MB/s of series retrieval: `clients` curl processes, each reading every series `passes` times (its
    own order)."""
    total, elapsed = retrieve_series(root, data, clients, passes)
    return total / elapsed / 1e6


def retrieve_series(root: str, data: PeerData, clients: int, passes: int = 1) -> tuple[int, float]:
    """(bytes, seconds) of `clients` curl processes each reading every series `passes` times."""
    paths = series_paths(data)

    def one_client(n: int) -> int:
        order = (paths[n:] + paths[:n]) * passes
        args = ["curl", "-s", "-f", "-H", f"Accept: {MULTIPART_ANY}", "-w", "%{size_download}\n"]
        for path in order:
            args += ["-o", "/dev/null", f"{root}{path}"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
        return sum(int(x) for x in out)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(one_client, range(clients)))
    elapsed = time.perf_counter() - start
    expected = clients * passes * data.instances * data.instance_bytes
    if total < expected * 0.99:
        raise RuntimeError(f"{root}: series retrieval returned {total} bytes, expected ~{expected}")
    return total, elapsed


def check_series_parts(root: str, data: PeerData) -> None:
    """Each peer answers a series with one part per instance (so the figures compare the same work)."""
    with httpx.Client(base_url=root, timeout=120, headers={"Accept": MULTIPART_ANY}) as http:
        r = http.get(series_paths(data)[0])
        r.raise_for_status()
        boundary = r.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
        parts = r.content.count(b"--" + boundary.encode() + b"\r\n")
        if parts != len(data.sop_uids[0]):
            raise RuntimeError(f"{root}: a series came back in {parts} parts, not {len(data.sop_uids[0])}")


def measure(root: str, data: PeerData, clients: int, rounds: int, passes: int = 1) -> Figures:
    figures = Figures()
    values = figures.values
    values["stow"] = stow(root, data, clients)
    qido = [f"/studies?PatientID={s.patient_id}" for s in data.studies]
    times = latencies(root, qido, JSON, rounds)
    values["qido_p50"], values["qido_p95"] = percentile(times, 50), percentile(times, 95)
    metadata = [p + "/metadata" for p in series_paths(data)]
    values["metadata"] = statistics.median(latencies(root, metadata, JSON, rounds))
    check_series_parts(root, data)
    values["retrieval"] = retrieval(root, data, clients, passes)
    instances = [
        f"{series}/instances/{sops[len(sops) // 2]}"
        for series, sops in zip(series_paths(data), data.sop_uids, strict=True)
    ]
    frames, rendered = [i + "/frames/1" for i in instances], [i + "/rendered" for i in instances]
    values["instance"] = statistics.median(latencies(root, instances, MULTIPART_ANY, rounds))
    values["frame"] = statistics.median(latencies(root, frames, FRAME_ANY, rounds))
    values["rendered"] = statistics.median(latencies(root, rendered, JPEG, rounds))
    return figures


ROWS: list[tuple[str, str, str, Callable[[float, float], float]]] = [
    ("stow", "STOW-RS ingest", "instances/s", lambda a, o: a / o),
    ("qido_p50", "QIDO-RS by PatientID p50", "ms", lambda a, o: o / a),
    ("qido_p95", "QIDO-RS by PatientID p95", "ms", lambda a, o: o / a),
    ("metadata", "series metadata, median", "ms", lambda a, o: o / a),
    ("retrieval", "series retrieval (multipart, transfer-syntax=*)", "MB/s", lambda a, o: a / o),
    ("instance", "single instance, median", "ms", lambda a, o: o / a),
    ("frame", "one frame, median", "ms", lambda a, o: o / a),
    ("rendered", "rendered JPEG, median", "ms", lambda a, o: o / a),
]


LARGE_PER_STUDY = 10
LOAD_BATCH = 10  # studies per STOW request


@dataclass
class StudyKeys:
    patient_id: str
    patient_name: str
    accession: str
    study_uid: str
    study_date: str


def large_bodies(studies: int, keys: list[StudyKeys]) -> Iterator[tuple[bytes, str]]:
    """STOW bodies of LOAD_BATCH studies each, made as they are sent; every 100th study's keys are kept."""
    rng = random.Random(2024)
    files: list[bytes] = []
    for n in range(studies):
        spec = make_study(rng, series_count=2)
        for series in range(2):
            half = LARGE_PER_STUDY // 2
            files += instance_variants(
                spec, series, half, start=n * LARGE_PER_STUDY + series * half, rows=8, columns=8
            )
        if n % 100 == 0:
            keys.append(
                StudyKeys(spec.patient_id, spec.patient_name, spec.accession, spec.study_uid, spec.study_date)
            )
        if (n + 1) % LOAD_BATCH == 0 or n + 1 == studies:
            yield multipart_body(files)
            files = []


def load_large(root: str, studies: int, clients: int) -> tuple[float, list[StudyKeys]]:
    """Instances per second of the load, and the sample of study keys to query by."""
    keys: list[StudyKeys] = []
    bodies = large_bodies(studies, keys)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    body = next(bodies, None)
                if body is None:
                    return
                r = http.post(f"{root}/studies", content=body[0], headers={"Content-Type": body[1]})
                if r.status_code != 200:
                    raise RuntimeError(f"STOW to {root} failed: {r.status_code} {r.text[:300]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return studies * LARGE_PER_STUDY / (time.perf_counter() - start), keys


def large_queries(keys: list[StudyKeys], rounds: int) -> dict[str, list[str]]:
    """Per query shape, `rounds` concrete paths (both peers get the same ones)."""
    rng = random.Random(5)
    shapes: dict[str, list[str]] = {}
    for _ in range(rounds):
        k = rng.choice(keys)
        year = rng.randint(2000, 2025)
        month = rng.randint(1, 12)
        for name, path in {
            "PatientID": f"/studies?PatientID={k.patient_id}",
            "AccessionNumber": f"/studies?AccessionNumber={k.accession}",
            "StudyInstanceUID": f"/studies?StudyInstanceUID={k.study_uid}",
            "PatientName prefix*, limit 100": f"/studies?PatientName={k.patient_name[:3]}*&limit=100",
            "StudyDate month, limit 100": (
                f"/studies?StudyDate={year}{month:02d}01-{year}{month:02d}28&limit=100"
            ),
            "ModalitiesInStudy + year, limit 100": (
                f"/studies?ModalitiesInStudy=MR&StudyDate={year}0101-{year}1231&limit=100"
            ),
            "series of a study": f"/studies/{k.study_uid}/series",
            "instances of a study": f"/studies/{k.study_uid}/instances",
        }.items():
            shapes.setdefault(name, []).append(path)
    return shapes


def measure_large(root: str, shapes: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, paths in shapes.items():
        times = latencies(root, paths, JSON, len(paths))
        out[name] = (percentile(times, 50), percentile(times, 95))
    return out


def large_table(archive: dict[str, tuple[float, float]], peer: dict[str, tuple[float, float]]) -> str:
    lines = [
        "| QIDO-RS shape | archive p50 / p95 ms | Orthanc p50 / p95 ms | times better p50 / p95 |",
        "|---|---|---|---|",
    ]
    for name, (a50, a95) in archive.items():
        o50, o95 = peer[name]
        ratios = f"{o50 / a50:.2f}x / {o95 / a95:.2f}x"
        lines.append(f"| {name} | {a50:.1f} / {a95:.1f} | {o50:.1f} / {o95:.1f} | {ratios} |")
    return "\n".join(lines)


@contextlib.contextmanager
def orthanc_on_postgresql() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="orthanc-pg-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg", port=free_port(), database="orthanc")
        server.start()
        try:
            with orthanc(postgresql=("127.0.0.1", server.port, "orthanc", SUPERUSER)) as root:
                yield root
        finally:
            server.stop()


def run_large(args: argparse.Namespace) -> None:
    subprocess.run([str(SCRIPTS / "dimse-deps"), "orthanc-dicomweb", "orthanc-postgresql"], check=True)
    results = {}
    for name, start in {"archive": archive_on_defaults, "orthanc": orthanc_on_postgresql}.items():
        if args.only and name != args.only:
            continue
        with start() as root:
            rate, keys = load_large(root, args.large, args.clients)
            print(f"{name}: loaded {args.large * LARGE_PER_STUDY} instances at {rate:.0f}/s", flush=True)
            results[name] = measure_large(root, large_queries(keys, args.rounds))
        print(name, {k: (round(a, 1), round(b, 1)) for k, (a, b) in results[name].items()}, flush=True)
    if len(results) == 2:
        print(large_table(results["archive"], results["orthanc"]))


def table(archive: Figures, peer: Figures) -> str:
    lines = ["| figure | unit | this archive | Orthanc | times better |", "|---|---|---|---|---|"]
    for key, label, unit, ratio in ROWS:
        a, o = archive.values[key], peer.values[key]
        lines.append(f"| {label} | {unit} | {a:.1f} | {o:.1f} | {ratio(a, o):.2f}x |")
    return "\n".join(lines)


def data_set_arguments(parser: argparse.ArgumentParser, *, studies: int, rows: int) -> None:
    """The data set's options (make_dataset) and the number of concurrent clients."""
    parser.add_argument("--studies", type=int, default=studies)
    parser.add_argument("--per-study", type=int, default=50)
    parser.add_argument("--rows", type=int, default=rows, help="rows = columns (128: ~40 KB, 512: ~500 KB)")
    parser.add_argument("--clients", type=int, default=4)


@contextlib.contextmanager
def archive_on_defaults() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="dicomweb-peers-") as tmp:
        with embedded_archive(workers=None, data_dir=Path(tmp), extra_args=["--dimse-port", "0"]) as root:
            yield root


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    data_set_arguments(parser, studies=40, rows=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--passes", type=int, default=1, help="series retrievals per client (one takes <1 s: noisy, loaded)"
    )
    parser.add_argument("--only", choices=["archive", "orthanc"], help="measure one peer (profiling)")
    parser.add_argument("--large", type=int, metavar="STUDIES", help="the QIDO-RS comparison at this size")
    args = parser.parse_args()
    if args.large:
        run_large(args)
        return
    subprocess.run([str(SCRIPTS / "dimse-deps"), "orthanc-dicomweb"], check=True)
    data = make_dataset(args.studies, args.per_study, args.rows)
    size = data.instance_bytes / 1024
    print(f"data: {args.studies} studies x {args.per_study} CT instances of {size:.0f} KiB")
    results: dict[str, Figures] = {}
    peers = {"archive": archive_on_defaults, "orthanc": orthanc}
    for name, start in peers.items():
        if args.only and name != args.only:
            continue
        with start() as root:
            results[name] = measure(root, data, args.clients, args.rounds, args.passes)
        print(name, {k: round(v, 1) for k, v in results[name].values.items()}, flush=True)
    if len(results) == 2:
        print(table(results["archive"], results["orthanc"]))


if __name__ == "__main__":
    main()
