"""C-STORE throughput with DCMTK's storescu: the archive's DIMSE listener beside Orthanc's C-STORE SCP.

    python -m bench.dimse_store [--instances 2000 --associations 1,4] [--workers N] [--no-orthanc]
    python -m bench.dimse_store --no-orthanc --code ../other-checkout   # A/B: that checkout's archive

Writes the synthetic CT instances (bench/synthetic.py, 128x128, ~40 KB) to files once, then for each peer and
each association count runs that many `storescu` processes at once (one association each, the files split
between them) and reports instances/s from the first start to the last exit. The archive runs as the README
starts it (`dicomweb serve`, embedded default, a worker per core unless --workers), with --insecure-open so
any calling AE is accepted; Orthanc 1.10 from Debian (SQLite index, its defaults). Needs `apt-get install
dcmtk orthanc`.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import embedded_archive, free_port
from bench.orthanc_peer import orthanc_scp
from bench.synthetic import make_instance, make_study, to_bytes


def write_instances(directory: Path, count: int, per_study: int = 50) -> list[Path]:
    rng = random.Random(7)
    paths: list[Path] = []
    while len(paths) < count:
        spec = make_study(rng, series_count=1)
        for n in range(min(per_study, count - len(paths))):
            path = directory / f"{len(paths):06d}.dcm"
            path.write_bytes(to_bytes(make_instance(spec, 0, n + 1, rng=rng)))
            paths.append(path)
    return paths


def storescu(files: list[Path], port: int, called: str, associations: int) -> float:
    """instances/s of `associations` storescu processes sending `files` between them at once."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return len(files) / (time.perf_counter() - started)


def serve_null(port: int) -> None:
    """A pynetdicom acceptor that stores nothing (every C-STORE answered 0x0000 at once), on the archive's
    own server class (immediate ACKs): what pynetdicom alone costs per C-STORE, the archive's ceiling."""
    from pynetdicom import AE, _config, evt

    from dimse.pacing import make_responsive
    from dimse.server import _ReusePortServer

    _config.UNRESTRICTED_STORAGE_SERVICE = True
    ae = AE(ae_title="DICOMWEB")
    ae.maximum_pdu_size = 0
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification: the bench waits for a C-ECHO
    server = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[
            (evt.EVT_C_STORE, lambda event: 0),
            (evt.EVT_CONN_OPEN, lambda event: make_responsive(event.assoc)),  # as the archive's listener
        ],
        server_class=_ReusePortServer,
    )
    server.serve_forever()


@contextlib.contextmanager
def null_scp() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.dimse_store", "--serve-null", str(port)])
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["echoscu", "-aec", "DICOMWEB", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the null SCP did not start")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts (1,4)")
    parser.add_argument(
        "--workers", type=int, default=None, help="archive processes (default: the server's, one per core)"
    )
    parser.add_argument("--no-orthanc", action="store_true", help="measure the archive only")
    parser.add_argument(
        "--code", type=Path, help="run another checkout's archive (A/B runs, interleaved with this one's)"
    )
    parser.add_argument(
        "--null-scp", action="store_true", help="also measure a pynetdicom acceptor that stores nothing"
    )
    parser.add_argument("--serve-null", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_null:
        serve_null(args.serve_null)
        return
    if shutil.which("storescu") is None:
        raise SystemExit("DCMTK is not installed: apt-get install dcmtk")
    counts = [int(n) for n in args.associations.split(",")]
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dimse-bench-") as tmp:
        files = write_instances(Path(tmp), args.instances)
        size = sum(p.stat().st_size for p in files) / len(files)
        print(f"{len(files)} instances of {size / 1024:.1f} KB", flush=True)
        for n in counts:
            # a fresh archive per run: every run stores new instances into an empty index
            port = free_port()
            extra = ["--dimse-port", str(port)]
            with embedded_archive(workers=args.workers, extra_args=extra, code=args.code):
                rate = storescu(files, port, "DICOMWEB", n)
            results.setdefault("archive", {})[n] = rate
            print(f"archive, {n} association(s): {rate:,.0f} instances/s", flush=True)
            if not args.no_orthanc:
                with orthanc_scp() as oport:
                    rate = storescu(files, oport, "ORTHANC", n)
                results.setdefault("orthanc", {})[n] = rate
                print(f"orthanc, {n} association(s): {rate:,.0f} instances/s", flush=True)
            if args.null_scp:
                with null_scp() as nport:
                    rate = storescu(files, nport, "DICOMWEB", n)
                print(f"pynetdicom storing nothing, {n} association(s): {rate:,.0f} instances/s", flush=True)
    print("\n| associations | archive (instances/s) | Orthanc (instances/s) | ratio |")
    print("|---|---|---|---|")
    for n in counts:
        ours, theirs = results["archive"][n], results.get("orthanc", {}).get(n)
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        print(f"| {n} | {ours:,.0f} | {f'{theirs:,.0f}' if theirs else '-'} | {ratio} |")


if __name__ == "__main__":
    main()
