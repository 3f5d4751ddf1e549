"""C-GET of a series beside WADO-RS retrieval of the same series, from one archive.

    python -m bench.dimse_retrieve [--instances 500 --rounds 3] [--workers N]

Stores one series of synthetic CT instances (bench/synthetic.py, 128x128, ~40 KB) through STOW-RS into
`dicomweb serve` (embedded default, --insecure-open), then retrieves the whole series, each way `--rounds`
times: C-GET at SERIES level with DCMTK's getscu (files written to a scratch directory) and with pynetdicom
as the SCU (objects counted, not written), and WADO-RS `GET .../series/{uid}` (multipart, transfer-syntax=*)
with curl writing the body to a file. Reports instances/s and MB/s (of stored object bytes), best and median.
With --orthanc, the same series is also fetched with getscu from Orthanc (Debian's, SQLite index, no plugins;
loaded through its REST API) for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from bench.common import embedded_archive, free_port
from bench.orthanc_peer import orthanc_scp
from bench.synthetic import make_instance, make_study, multipart_body, to_bytes


def series_files(count: int) -> tuple[str, str, list[bytes]]:
    """One series of `count` CT instances: (study, series, the PS3.10 files)."""
    rng = random.Random(11)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    files = [to_bytes(make_instance(spec, 0, n + 1, rng=rng)) for n in range(count)]
    return spec.study_uid, spec.series[0][0], files


def load(url: str, files: list[bytes]) -> None:
    """STOW the files, 50 per request."""
    with httpx.Client(timeout=120) as client:
        for start in range(0, len(files), 50):
            body, content_type = multipart_body(files[start : start + 50])
            response = client.post(f"{url}/studies", content=body, headers={"Content-Type": content_type})
            response.raise_for_status()


def getscu(port: int, study: str, series: str, out: Path, called: str = "DICOMWEB") -> int:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run(
        ["getscu", "-aet", "BENCH", "-aec", called, "-S", "-k", "QueryRetrieveLevel=SERIES",
         "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}", "-od", str(out),
         "127.0.0.1", str(port)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return len(list(out.iterdir()))


def pynetdicom_get(port: int, study: str, series: str) -> int:
    received = 0

    def on_store(event: evt.Event) -> int:
        nonlocal received
        received += 1
        return 0

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.maximum_pdu_size = 0
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="DICOMWEB", ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    try:
        for status, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet):
            if status and status.Status not in (0xFF00, 0x0000):
                raise RuntimeError(f"C-GET status 0x{status.Status:04X}")
    finally:
        assoc.release()
    return received


WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def wado(url: str, study: str, series: str, out: Path) -> int:
    subprocess.run(
        ["curl", "-sf", "-o", str(out), "-H", f"Accept: {WADO_ACCEPT}",
         f"{url}/studies/{study}/series/{series}"],
        check=True,
    )  # fmt: skip
    return out.read_bytes().count(b"Content-Type: application/dicom")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="archive processes (default: one per core)")
    parser.add_argument("--orthanc", action="store_true", help="also C-GET the series from Orthanc")
    args = parser.parse_args()
    port = free_port()
    study, series, files = series_files(args.instances)
    total = sum(map(len, files))
    with (
        embedded_archive(workers=args.workers, extra_args=["--dimse-port", str(port)]) as url,
        tempfile.TemporaryDirectory(prefix="dimse-retrieve-bench-") as tmp,
        orthanc_scp(files) if args.orthanc else contextlib.nullcontext(0) as orthanc_port,
    ):
        load(url, files)
        print(
            f"{args.instances} instances, {total / args.instances / 1024:.1f} KB each, {total / 1e6:.1f} MB"
        )
        ways = {
            "C-GET, DCMTK getscu (files written)": lambda: getscu(port, study, series, Path(tmp) / "got"),
            "C-GET, pynetdicom SCU (in memory)": lambda: pynetdicom_get(port, study, series),
            "WADO-RS series, curl (body to a file)": lambda: wado(url, study, series, Path(tmp) / "body"),
        }
        if orthanc_port:
            ways["Orthanc C-GET, DCMTK getscu (files written)"] = lambda: getscu(
                orthanc_port, study, series, Path(tmp) / "orthanc", "ORTHANC"
            )
        print("\n| client | instances/s best | median | MB/s best |")
        print("|---|---|---|---|")
        for name, run in ways.items():
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                got = run()
                times.append(time.perf_counter() - started)
                if got != args.instances:
                    raise RuntimeError(f"{name}: {got} instances, expected {args.instances}")
            best, median = min(times), statistics.median(times)
            print(
                f"| {name} | {args.instances / best:,.0f} | {args.instances / median:,.0f} "
                f"| {total / best / 1e6:,.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
