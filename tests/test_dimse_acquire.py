"""Acquisition from a remote PACS (C-FIND + C-MOVE / C-GET SCU) and $send (C-STORE SCU), against Orthanc."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomweb.config import Settings
from dimse import scu
from dimse.acquire import AcquireError, Listed, ScuSettings, check_source, plan, split
from dimse.aes import RegisteredAe
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive, free_port
from tests.fixtures.orthanc import ORTHANC_AE, Orthanc
from tests.fixtures.s3 import S3Server, make_s3_store
from tests.fixtures.server import start_archive

JPEG_FILE = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")  # JPEG Baseline, Secondary Capture


def synthetic_study(seed: int, series: list[int], patient_id: str | None = None) -> list[bytes]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=len(series), modalities=["CT"])
    if patient_id:
        spec.patient_id = patient_id
    return [
        to_bytes(make_instance(spec, s, i + 1, rng=rng))
        for s, count in enumerate(series)
        for i in range(count)
    ]


def study_uid(files: list[bytes]) -> str:
    return str(
        pydicom.dcmread(pydicom.filebase.DicomBytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID
    )


def sop_uids(files: list[bytes]) -> set[str]:
    return {
        str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(f), stop_before_pixels=True).SOPInstanceUID)
        for f in files
    }


class Pacs:
    """Orthanc loaded with three studies: two of patient PACS-1 (CT), one JPEG Secondary Capture."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.a = synthetic_study(1, [4, 3], "PACS-1")
        self.b = synthetic_study(2, [5], "PACS-1")
        with open(JPEG_FILE, "rb") as fp:
            self.c = [fp.read()]
        for data in [*self.a, *self.b, *self.c]:
            assert orthanc.upload(data)["Status"] == "Success"
        self.uid_a, self.uid_b, self.uid_c = study_uid(self.a), study_uid(self.b), study_uid(self.c)


@pytest.fixture
async def pacs(open_dimse_archive: DimseArchive, orthanc_factory: Callable[..., Orthanc]) -> Pacs:
    orthanc = orthanc_factory(open_dimse_archive.port)
    await open_dimse_archive.register(
        ORTHANC_AE, port=orthanc.dicom_port, services=["store", "find", "retrieve"]
    )
    return Pacs(orthanc)


async def start(archive: DimseArchive, path: str, body: dict[str, Any], status: int = 202) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(f"{archive.http.url}{path}", json=body)
    assert reply.status_code == status, reply.text
    return reply.json()


async def wait(href: str, limit: float = 60, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The operation once finished; every state polled on the way into `seen`."""
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            reply = await client.get(href)
            body = reply.json()
            if seen is not None:
                seen.append(body)
            if reply.status_code == 200:
                return body
            assert reply.status_code == 202, reply.text
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.02)


async def acquire(
    archive: DimseArchive, body: dict[str, Any], partition: str | None = None
) -> dict[str, Any]:
    root = f"/partitions/{partition}" if partition else ""
    started = await start(archive, f"{root}/acquire", {"source": ORTHANC_AE, **body})
    op = await wait(started["href"])
    assert op["type"] == "acquire" and op["status"] == "succeeded", op
    assert op["percentComplete"] == 100
    return op["results"]


async def stored_files(archive: DimseArchive, partition: str = "Microsoft.Default") -> dict[str, bytes]:
    """SOP Instance UID -> the stored object, for every instance in the partition."""
    conn = await asyncpg.connect(archive.http.database_url)
    try:
        rows = await conn.fetch(
            """SELECT i.sop_instance_uid, i.storage_key FROM instance i JOIN partition p USING (partition_key)
               WHERE p.name = $1""",
            partition,
        )
    finally:
        await conn.close()
    return {r["sop_instance_uid"]: await archive.http.store.read(r["storage_key"]) for r in rows}


def same_pixels(ours: bytes, theirs: bytes) -> bool:
    a = pydicom.dcmread(pydicom.filebase.DicomBytesIO(ours))
    b = pydicom.dcmread(pydicom.filebase.DicomBytesIO(theirs))
    return a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID and a.PixelData == b.PixelData


def assert_same_as_orthanc(stored: dict[str, bytes], orthanc: Orthanc, study: str) -> None:
    theirs = orthanc.study_instances(study)
    assert theirs and set(theirs) <= set(stored)
    for sop, instance_id in theirs.items():
        assert same_pixels(stored[sop], orthanc.file(instance_id)), sop


async def qido_studies(archive: DimseArchive, partition: str | None = None) -> set[str]:
    root = f"/partitions/{partition}" if partition else ""
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.get(f"{archive.http.url}{root}/studies")
    if reply.status_code == 204:
        return set()
    return {s["0020000D"]["Value"][0] for s in reply.json()}


async def test_acquire_by_query_with_c_move_then_skip_everything(
    open_dimse_archive: DimseArchive, pacs: Pacs
) -> None:
    archive = open_dimse_archive
    results = await acquire(archive, {"query": {"PatientID": "PACS-1"}})
    counts = ("studiesTotal", "studiesDone", "instancesStored", "instancesSkipped", "failures")
    assert [results[k] for k in counts] == [2, 2, 12, 0, 0]
    assert results["errors"] == []
    assert results["bytes"] == sum(len(f) for f in (await stored_files(archive)).values())
    assert await qido_studies(archive) == {pacs.uid_a, pacs.uid_b}
    stored = await stored_files(archive)
    assert set(stored) == sop_uids(pacs.a) | sop_uids(pacs.b)
    assert_same_as_orthanc(stored, pacs.orthanc, pacs.uid_a)
    assert_same_as_orthanc(stored, pacs.orthanc, pacs.uid_b)

    # the same again, and all of Orthanc: what the partition holds is skipped, the rest is retrieved
    again = await acquire(archive, {"studies": [pacs.uid_a, pacs.uid_b]})
    assert (again["instancesStored"], again["instancesSkipped"], again["failures"]) == (0, 12, 0)
    everything = await acquire(archive, {"query": {}, "method": "C-MOVE"})
    assert (everything["studiesTotal"], everything["instancesStored"], everything["instancesSkipped"]) == (
        3,
        1,
        12,
    )
    stored = await stored_files(archive)
    assert_same_as_orthanc(stored, pacs.orthanc, pacs.uid_c)  # the JPEG object, as Orthanc holds it


async def test_acquire_study_list_with_c_get_into_another_partition(
    open_dimse_archive: DimseArchive, pacs: Pacs
) -> None:
    archive = open_dimse_archive
    results = await acquire(archive, {"studies": [pacs.uid_c, pacs.uid_a], "method": "C-GET"}, "research")
    assert (results["studiesTotal"], results["instancesStored"], results["instancesSkipped"],
            results["failures"]) == (2, 8, 0, 0)  # fmt: skip
    assert await qido_studies(archive, "research") == {pacs.uid_a, pacs.uid_c}
    assert await qido_studies(archive) == set()
    stored = await stored_files(archive, "research")
    assert set(stored) == sop_uids(pacs.a) | sop_uids(pacs.c)
    assert_same_as_orthanc(stored, pacs.orthanc, pacs.uid_a)
    assert_same_as_orthanc(stored, pacs.orthanc, pacs.uid_c)  # compressed: sent as stored, no transcoding

    again = await acquire(archive, {"query": {"PatientID": "PACS-1"}, "method": "C-GET"}, "research")
    assert (again["instancesStored"], again["instancesSkipped"], again["failures"]) == (5, 7, 0)


async def test_acquire_requests_that_cannot_be_served(open_dimse_archive: DimseArchive, pacs: Pacs) -> None:
    archive = open_dimse_archive
    await archive.register("NOPORT")
    for body, why in [
        ({"source": "NOBODY", "studies": [pacs.uid_a]}, "not a registered AE"),
        ({"source": "NOPORT", "studies": [pacs.uid_a]}, "has no port"),
        ({"source": ORTHANC_AE}, "either query"),
        ({"source": ORTHANC_AE, "query": {"NotAKeyword": "1"}}, "neither a DICOM keyword"),
        ({"source": ORTHANC_AE, "studies": ["not a uid"]}, "Study Instance UIDs"),
        ({"source": ORTHANC_AE, "studies": [pacs.uid_a], "method": "C-ECHO"}, "method"),
    ]:
        problem = await start(archive, "/acquire", body, 400)
        assert why in str(problem), problem
    # C-MOVE results land where the listener puts the source's objects: the default partition here
    body = {"source": ORTHANC_AE, "studies": [pacs.uid_a]}
    problem = await start(archive, "/partitions/research/acquire", body, 400)
    assert "stores into partition 'Microsoft.Default'" in str(problem)


async def test_source_lost_mid_acquisition_is_retried(
    open_dimse_archive: DimseArchive,
    orthanc_factory: Callable[..., Orthanc],
) -> None:
    archive = open_dimse_archive
    orthanc = orthanc_factory(archive.port)
    await archive.register(ORTHANC_AE, port=orthanc.dicom_port, services=["store", "find", "retrieve"])
    studies = [synthetic_study(10 + n, [40, 40], "PACS-2") for n in range(3)]
    for files in studies:
        for data in files:
            orthanc.upload(data)
    started = await start(archive, "/acquire", {"source": ORTHANC_AE, "query": {"PatientID": "PACS-2"}})
    seen: list[dict[str, Any]] = []
    waiting = asyncio.create_task(wait(started["href"], seen=seen))
    deadline = time.monotonic() + 30
    while not seen or (seen[-1]["results"].get("studiesDone") or 0) < 1:
        assert time.monotonic() < deadline and not waiting.done()
        await asyncio.sleep(0.01)
    orthanc.kill()
    await asyncio.sleep(1.5)
    orthanc.start()
    op = await waiting
    assert op["status"] == "succeeded", op
    assert any(state["results"].get("lastError") for state in seen), "the source's loss was not noticed"
    results = op["results"]
    assert (results["studiesDone"], results["instancesStored"], results["instancesSkipped"],
            results["failures"]) == (3, 240, 0, 0)  # fmt: skip
    stored = await stored_files(archive)
    assert set(stored) == set().union(*(sop_uids(files) for files in studies))


async def test_unreachable_source_fails_after_its_attempts(
    open_dimse_archive: DimseArchive, pacs: Pacs
) -> None:
    archive = open_dimse_archive
    pacs.orthanc.kill()
    started = await start(archive, "/acquire", {"source": ORTHANC_AE, "studies": [pacs.uid_a],
                                                "maxAttempts": 2})  # fmt: skip
    op = await wait(started["href"], limit=30)
    assert op["status"] == "failed"
    assert "gave up after" in op["results"]["error"] and "ORTHANC" in op["results"]["error"]


async def test_send_study_to_orthanc(open_dimse_archive: DimseArchive, pacs: Pacs) -> None:
    archive = open_dimse_archive
    files = synthetic_study(20, [3, 2])
    jpeg = pydicom.dcmread(JPEG_FILE)
    study = study_uid(files)
    first = pydicom.dcmread(pydicom.filebase.DicomBytesIO(files[0]), stop_before_pixels=True)
    jpeg.StudyInstanceUID = study  # a compressed object in the same study: sent as stored
    jpeg.PatientID, jpeg.PatientName = first.PatientID, first.PatientName
    jpeg.SeriesInstanceUID = pydicom.uid.generate_uid()
    jpeg.SOPInstanceUID = pydicom.uid.generate_uid()
    jpeg.file_meta.MediaStorageSOPInstanceUID = jpeg.SOPInstanceUID
    files.append(to_bytes(jpeg))
    body, content_type = multipart_body(files)
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(f"{archive.http.url}/studies", content=body,
                                  headers={"Content-Type": content_type})  # fmt: skip
        assert reply.status_code == 200, reply.text
    started = await start(archive, f"/studies/{study}/$send", {"destination": ORTHANC_AE})
    op = await wait(started["href"])
    assert op["type"] == "send" and op["status"] == "succeeded", op
    assert op["resources"] == [f"{archive.http.url}/studies/{study}"]
    results = op["results"]
    assert (results["instancesTotal"], results["instancesSent"], results["failures"]) == (6, 6, 0)
    theirs = pacs.orthanc.study_instances(study)
    assert set(theirs) == sop_uids(files)
    stored = await stored_files(archive)
    for sop, instance_id in theirs.items():
        assert same_pixels(stored[sop], pacs.orthanc.file(instance_id)), sop

    await start(archive, "/studies/1.2.3.4/$send", {"destination": ORTHANC_AE}, 404)
    await start(archive, f"/studies/{study}/$send", {"destination": "NOBODY"}, 400)


async def test_orthanc_finds_and_moves_from_the_archive(open_dimse_archive: DimseArchive, pacs: Pacs) -> None:
    """The other way round: Orthanc is the client (its REST drives C-FIND and C-MOVE to the archive)."""
    archive = open_dimse_archive
    files = synthetic_study(30, [2, 2], "FROM-ARCHIVE")
    study = study_uid(files)
    body, content_type = multipart_body(files)
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(
            f"{archive.http.url}/studies", content=body, headers={"Content-Type": content_type}
        )
        assert reply.status_code == 200, reply.text
    orthanc = pacs.orthanc
    query = {"Level": "Study", "Query": {"PatientID": "FROM-ARCHIVE", "StudyInstanceUID": ""}}
    reply = orthanc.client.post("/modalities/archive/query", json=query)
    assert reply.status_code == 200, reply.text
    query_id = reply.json()["ID"]
    answers = orthanc.get(f"/queries/{query_id}/answers?expand")
    assert [a["0020,000d"]["Value"] for a in answers] == [study]  # type: ignore[index,union-attr]
    reply = orthanc.client.post(
        f"/queries/{query_id}/retrieve", json={"TargetAet": ORTHANC_AE, "Synchronous": True}
    )
    assert reply.status_code == 200, reply.text
    theirs = orthanc.study_instances(study)
    assert set(theirs) == sop_uids(files)
    stored = await stored_files(archive)
    for sop, instance_id in theirs.items():
        assert same_pixels(stored[sop], orthanc.file(instance_id)), sop


async def test_send_resumes_after_the_destination_is_lost(
    open_dimse_archive: DimseArchive,
    orthanc_factory: Callable[..., Orthanc],
) -> None:
    archive = open_dimse_archive
    orthanc = orthanc_factory(archive.port)
    await archive.register(ORTHANC_AE, port=orthanc.dicom_port, services=["store"])
    files = synthetic_study(40, [300])
    study = study_uid(files)
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(0, len(files), 100):
            body, content_type = multipart_body(files[i : i + 100])
            reply = await client.post(
                f"{archive.http.url}/studies", content=body, headers={"Content-Type": content_type}
            )
            assert reply.status_code == 200, reply.text
    started = await start(archive, f"/studies/{study}/$send", {"destination": ORTHANC_AE})
    seen: list[dict[str, Any]] = []
    waiting = asyncio.create_task(wait(started["href"], seen=seen))
    deadline = time.monotonic() + 30
    while int(orthanc.get("/statistics")["CountInstances"]) < 30:  # type: ignore[index]
        assert time.monotonic() < deadline and not waiting.done()
        await asyncio.sleep(0.01)
    orthanc.kill()
    await asyncio.sleep(1.5)
    orthanc.start()
    op = await waiting
    assert op["status"] == "succeeded", op
    results = op["results"]
    assert results["lastError"], "the destination's loss was not noticed"
    assert (results["instancesTotal"], results["instancesSent"], results["failures"]) == (300, 300, 0)
    assert set(orthanc.study_instances(study)) == sop_uids(files)


def test_c_move_lands_in_the_sources_registered_partition() -> None:
    """Registry enforced: the listener stores what the source sends in the source's partition."""
    source = RegisteredAe("PACS", "10.0.0.5", 104, "radiology", ("store", "find"))
    enforced = ScuSettings("DICOMWEB")
    assert check_source(source, "PACS", "C-MOVE", "radiology", enforced) == scu.Peer("PACS", "10.0.0.5", 104)
    with pytest.raises(AcquireError, match="stores into partition 'radiology'"):
        check_source(source, "PACS", "C-MOVE", "Microsoft.Default", enforced)
    check_source(source, "PACS", "C-GET", "Microsoft.Default", enforced)  # C-GET: anywhere
    with pytest.raises(AcquireError, match="'store' service"):
        check_source(dataclasses.replace(source, services=("find",)), "PACS", "C-MOVE", "radiology", enforced)
    with pytest.raises(AcquireError, match="no port"):
        check_source(dataclasses.replace(source, port=None), "PACS", "C-GET", "radiology", enforced)
    with pytest.raises(AcquireError, match="not an address"):
        check_source(dataclasses.replace(source, host="10.0.0.0/8"), "PACS", "C-GET", "radiology", enforced)


def test_retrieve_requests() -> None:
    listing = [Listed("s1", f"1.{n}", "c") for n in range(5)] + [
        Listed("s2", f"2.{n}", "c") for n in range(3)
    ]
    assert plan(listing, listing) == [("STUDY", {})]
    assert plan(listing, listing[5:]) == [("SERIES", {"SeriesInstanceUID": "s2"})]
    assert plan(listing, [listing[1], *listing[5:]]) == [
        ("IMAGE", {"SeriesInstanceUID": "s1", "SOPInstanceUID": "1.1"}),
        ("SERIES", {"SeriesInstanceUID": "s2"}),
    ]
    assert split(listing, 3) == [
        ("IMAGE", {"SeriesInstanceUID": "s1", "SOPInstanceUID": ["1.0", "1.1", "1.2"]}),
        ("IMAGE", {"SeriesInstanceUID": "s1", "SOPInstanceUID": ["1.3", "1.4"]}),
        ("IMAGE", {"SeriesInstanceUID": "s2", "SOPInstanceUID": ["2.0", "2.1", "2.2"]}),
    ]


async def test_c_get_and_send_on_s3_storage(
    database_url: str,
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    orthanc_factory: Callable[..., Orthanc],
) -> None:
    """Objects on S3: received ones are ingested there, sent ones go out through a temporary file."""
    port = free_port()
    prefix = f"acquire-{uuid.uuid4().hex}"
    settings = Settings(data_dir=tmp_path, dimse_port=port, dimse_ae_title=ARCHIVE_AE)
    store, test_store = (
        make_s3_store(s3_server, s3_bucket, prefix),
        make_s3_store(s3_server, s3_bucket, prefix),
    )
    thread, running = start_archive(settings, database_url, store, test_store)
    try:
        archive = DimseArchive(running, port)
        source = orthanc_factory(port, "source")
        target = orthanc_factory(port, "target")
        await archive.register(ORTHANC_AE, port=source.dicom_port)
        await archive.register("TARGET", port=target.dicom_port)
        pacs = Pacs(source)
        results = await acquire(archive, {"studies": [pacs.uid_a, pacs.uid_c], "method": "C-GET"})
        assert (results["instancesStored"], results["failures"]) == (8, 0)
        stored = await stored_files(archive)
        assert_same_as_orthanc(stored, source, pacs.uid_a)
        assert_same_as_orthanc(stored, source, pacs.uid_c)
        for study, files in ((pacs.uid_a, pacs.a), (pacs.uid_c, pacs.c)):
            op = await wait(
                (await start(archive, f"/studies/{study}/$send", {"destination": "TARGET"}))["href"]
            )
            assert op["status"] == "succeeded" and op["results"]["instancesSent"] == len(files), op
            assert set(target.study_instances(study)) == sop_uids(files)
            assert_same_as_orthanc(stored, target, study)
    finally:
        thread.stop()
        await test_store.close()


async def test_the_next_study_is_listed_while_one_is_retrieved(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step takes the listing made ahead when it is fresh and succeeded, and lists anew otherwise."""
    from dimse import acquire as acquire_module
    from dimse.acquire import AcquireHandler
    from indexer.operations import Operation

    handler = AcquireHandler(None, None, ScuSettings("ARCHIVE"))  # type: ignore[arg-type]
    calls: list[str] = []
    failing: set[str] = set()

    def listing(assocs: object, peer: scu.Peer, study: str) -> list[Listed]:
        calls.append(study)
        if study in failing:
            raise scu.PeerUnavailable("gone")
        return [Listed("1.9", f"{study}.1", "1.2.840.10008.5.1.4.1.1.2")]

    monkeypatch.setattr(handler, "_list", listing)
    now = time.time()
    op = Operation(uuid.uuid4(), "acquire", "running", {}, None, 0, [], {}, now, now)  # type: ignore[arg-type]
    peer = scu.Peer("PACS", "127.0.0.1", 104)
    studies = ["1.1", "1.2", "1.3", "1.4"]
    handler._list_ahead(op, peer, {"index": 0, "studies": studies})
    assert await handler._listing(op, peer, "1.2") == [Listed("1.9", "1.2.1", "1.2.840.10008.5.1.4.1.1.2")]
    assert calls == ["1.2"]  # made ahead, not again
    failing.add("1.3")
    handler._list_ahead(op, peer, {"index": 1, "studies": studies})
    with pytest.raises(
        scu.PeerUnavailable
    ):  # the one made ahead failed: listed again, that failure is the step's
        await handler._listing(op, peer, "1.3")
    assert calls == ["1.2", "1.3", "1.3"]
    monkeypatch.setattr(acquire_module, "LIST_AHEAD_FRESH", 0.0)
    handler._list_ahead(op, peer, {"index": 2, "studies": studies})
    await asyncio.sleep(0.05)
    assert await handler._listing(op, peer, "1.4") == [Listed("1.9", "1.4.1", "1.2.840.10008.5.1.4.1.1.2")]
    assert calls == ["1.2", "1.3", "1.3", "1.4", "1.4"]  # too old: listed again
    handler._list_ahead(op, peer, {"index": 3, "studies": studies})  # the last study: nothing follows
    assert handler._ahead == {}
    monkeypatch.setattr(acquire_module, "LIST_AHEAD_MAX", 2)
    for n in range(4):  # a bounded number of listings made ahead, the oldest dropped
        handler._list_ahead(op, peer, {"index": 0, "studies": ["2.0", f"2.{n + 1}"]})
    assert [study for _, study in handler._ahead] == ["2.3", "2.4"]
    await asyncio.gather(*(task for _, task in handler._ahead.values()), return_exceptions=True)
