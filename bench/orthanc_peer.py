"""Run Debian's Orthanc with its DICOMweb plugin on loopback, as a peer for the same benchmarks.

    python -m bench.orthanc_peer stow [--instances 4000 --batch 50 --clients 4]

Needs `apt-get install orthanc orthanc-dicomweb`. Orthanc gets a private config: 127.0.0.1 only, no
authentication, its own storage directory, the DICOMweb root at /dicom-web.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx

from bench.common import free_port, wait_ready
from bench.stow_ingest import run as stow_run

PLUGINS = Path("/usr/share/orthanc/plugins")


@contextlib.contextmanager
def orthanc(postgresql: tuple[str, int, str, str] | None = None) -> Iterator[str]:
    """Orthanc with its DICOMweb plugin (its defaults otherwise); yields the DICOMweb root. With
    `postgresql` (host, port, database, user; trust authentication) its index is there, through the
    orthanc-postgresql plugin, instead of in SQLite."""
    binary = shutil.which("Orthanc")
    if binary is None:
        raise SystemExit("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    with tempfile.TemporaryDirectory(prefix="orthanc-bench-") as tmp:
        port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": f"{tmp}/storage",
            "IndexDirectory": f"{tmp}/index",
            "HttpPort": port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": False,
            "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 50,
        }
        if postgresql is not None:
            host, pg_port, database, user = postgresql
            config["Plugins"].append(str(PLUGINS / "libOrthancPostgreSQLIndex.so"))
            config["PostgreSQL"] = {
                "EnableIndex": True, "EnableStorage": False, "Host": host, "Port": pg_port,
                "Database": database, "Username": user, "Password": "", "Lock": False,
            }  # fmt: skip
        (Path(tmp) / "orthanc.json").write_text(json.dumps(config))
        log = open(Path(tmp) / "orthanc.log", "wb")
        proc = subprocess.Popen([binary, str(Path(tmp) / "orthanc.json")], stdout=log, stderr=log)
        try:
            if not wait_ready(f"http://127.0.0.1:{port}/system", proc, timeout=60):
                raise RuntimeError((Path(tmp) / "orthanc.log").read_text()[-3000:])
            yield f"http://127.0.0.1:{port}/dicom-web"
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()


@contextlib.contextmanager
def orthanc_scp(files: Iterable[bytes] = ()) -> Iterator[int]:
    """Orthanc with its DICOM server on free loopback ports (SQLite index, no plugins, C-GET allowed), the
    files loaded through its REST API; yields its DICOM port (AE title ORTHANC)."""
    binary = shutil.which("Orthanc")
    if binary is None:
        raise SystemExit("Orthanc is not installed: apt-get install orthanc")
    with tempfile.TemporaryDirectory(prefix="orthanc-bench-") as tmp:
        http, dicom = free_port(), free_port()
        config = {
            "Name": "bench", "StorageDirectory": f"{tmp}/storage", "IndexDirectory": f"{tmp}/index",
            "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowGet": True, "Plugins": [],
        }  # fmt: skip
        (Path(tmp) / "orthanc.json").write_text(json.dumps(config))
        with open(Path(tmp) / "orthanc.log", "wb") as log:
            proc = subprocess.Popen([binary, str(Path(tmp) / "orthanc.json")], stdout=log, stderr=log)
            try:
                if not wait_ready(f"http://127.0.0.1:{http}/system", proc, timeout=60):
                    raise RuntimeError((Path(tmp) / "orthanc.log").read_text()[-3000:])
                with httpx.Client(timeout=60) as client:
                    for data in files:
                        client.post(f"http://127.0.0.1:{http}/instances", content=data).raise_for_status()
                yield dicom
            finally:
                proc.terminate()
                proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["stow"])
    parser.add_argument("--instances", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with orthanc() as url:
        asyncio.run(stow_run(url, args.instances, args.batch, args.clients))


if __name__ == "__main__":
    main()
