"""Acquisition from a PACS: Orthanc holds CT studies, the archive pulls them with POST /acquire.

    python -m bench.dimse_acquire [--instances 500 --per-study 100] [--methods C-MOVE,C-GET]
    python -m bench.dimse_acquire --code ../other-checkout   # A/B: that checkout's archive

Loads synthetic CT instances (bench/synthetic.py, 128x128, ~40 KB) into a private Orthanc (Debian's 1.10,
SQLite index, no plugins) over its REST API, then for each method starts a fresh archive (`dicomweb serve`,
embedded default, --insecure-open, a worker per core unless --workers), registers Orthanc as an AE and times
POST /acquire of all its studies until GET /operations/{id} says succeeded: instances/s end to end (the C-FIND
listing, the retrieval, ingest, the operation's steps). After the C-GET run, $send of every study to a
second, empty Orthanc. Needs `apt-get install orthanc`.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import embedded_archive, free_port
from bench.synthetic import make_instance, make_study, to_bytes
from tests.fixtures.orthanc import Orthanc


def load(orthanc: Orthanc, instances: int, per_study: int) -> None:
    rng = random.Random(11)
    done = 0
    while done < instances:
        spec = make_study(rng, series_count=1, modalities=["CT"])
        for n in range(min(per_study, instances - done)):
            orthanc.upload(to_bytes(make_instance(spec, 0, n + 1, rng=rng)))
            done += 1


def acquire(root: str, orthanc: Orthanc, method: str) -> dict[str, object]:
    base = root.rsplit("/v2", 1)[0]
    with httpx.Client(timeout=60) as client:
        ae = {"aeTitle": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
        client.put(f"{base}/aes/{orthanc.ae_title}", json=ae).raise_for_status()
        started = time.perf_counter()
        reply = client.post(
            f"{root}/acquire", json={"source": orthanc.ae_title, "query": {}, "method": method}
        )
        reply.raise_for_status()
        href = reply.json()["href"]
        while (op := client.get(href)).status_code == 202:
            time.sleep(0.01)
        body = op.json()
        body["seconds"] = time.perf_counter() - started
        return body


def send_all(root: str, orthanc: Orthanc) -> float:
    """$send every study the archive holds to `orthanc` (one operation each, queued at once); instances/s."""
    base = root.rsplit("/v2", 1)[0]
    with httpx.Client(timeout=60) as client:
        ae = {"aeTitle": "TARGET", "host": "127.0.0.1", "port": orthanc.dicom_port}
        client.put(f"{base}/aes/TARGET", json=ae).raise_for_status()
        studies = [s["0020000D"]["Value"][0] for s in client.get(f"{root}/studies").json()]
        started = time.perf_counter()
        hrefs = []
        for study in studies:
            reply = client.post(f"{root}/studies/{study}/$send", json={"destination": "TARGET"})
            reply.raise_for_status()
            hrefs.append(reply.json()["href"])
        sent = 0
        for href in hrefs:
            while (op := client.get(href)).status_code == 202:
                time.sleep(0.01)
            assert op.json()["status"] == "succeeded", op.json()
            sent += op.json()["results"]["instancesSent"]
        return sent / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--per-study", type=int, default=100)
    parser.add_argument("--methods", default="C-MOVE,C-GET")
    parser.add_argument("--workers", type=int, default=None, help="archive processes (default: one per core)")
    parser.add_argument(
        "--code", type=Path, help="run another checkout's archive (A/B runs, interleaved with this one's)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="acquire-bench-") as tmp:
        archive_port = free_port()
        orthanc = Orthanc(Path(tmp) / "orthanc", archive_port)
        orthanc.start()
        try:
            load(orthanc, args.instances, args.per_study)
            print(f"Orthanc holds {args.instances} instances in studies of {args.per_study}", flush=True)
            for method in args.methods.split(","):
                extra = ["--dimse-port", str(archive_port)]
                with embedded_archive(workers=args.workers, extra_args=extra, code=args.code) as root:
                    op = acquire(root, orthanc, method)
                    if method == "C-GET":
                        target = Orthanc(Path(tmp) / "target", archive_port, ae_title="TARGET")
                        target.start()
                        try:
                            send_rate = send_all(root, target)
                        finally:
                            target.stop()
                        print(f"$send: {send_rate:,.0f} instances/s", flush=True)
                results = op["results"]
                assert op["status"] == "succeeded", op
                stored = results["instancesStored"]  # type: ignore[index]
                rate = stored / op["seconds"]  # type: ignore[operator]
                print(
                    f"{method}: {stored} instances in {op['seconds']:.2f} s: {rate:,.0f} instances/s",
                    flush=True,
                )
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
