"""The DIMSE listener as `dicomweb serve` runs it: every worker process listens on the one port."""

from __future__ import annotations

import concurrent.futures
import random
import time

import httpx
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from bench.common import embedded_archive, free_port
from bench.synthetic import make_instance, make_study


def _send(port: int, datasets: list) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMWEB")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def test_two_workers_share_the_dimse_port(tmp_path) -> None:
    """Eight concurrent associations spread over both workers' listeners (SO_REUSEPORT); every instance is
    stored once and found through HTTP, whichever process took it."""
    rng = random.Random(5)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    datasets = [make_instance(spec, 0, n + 1, rng=rng) for n in range(40)]
    port = free_port()
    with embedded_archive(
        workers=2, data_dir=tmp_path / "data", extra_args=["--dimse-port", str(port)]
    ) as url:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(_send, [port] * 8, [datasets[i::8] for i in range(8)]))
        assert [s for batch in statuses for s in batch] == [0] * 40
        found = httpx.get(f"{url}/studies", params={"StudyInstanceUID": spec.study_uid}, timeout=60).json()
        assert [s["00201208"]["Value"] for s in found] == [[40]]
        # each worker writes its audit buffer every 0.1 s: wait for both
        deadline, stored = time.monotonic() + 10, 0
        while stored < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
            audit = httpx.get(url.removesuffix("/v2") + "/audit", params={"action": "dimse", "limit": "1000"})
            stored = sum(1 for r in audit.json() if r["path"] == "C-STORE" and r["status"] == 0)
        assert stored == 40
