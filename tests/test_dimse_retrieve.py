"""C-GET and C-MOVE SCP: objects delivered byte for byte as stored (or transcoded when the receiver takes only
uncompressed syntaxes), exact pending counts, refusals, C-CANCEL, and DCMTK getscu/movescu as peers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomweb.config import Settings
from dimse.sending import contexts_for
from indexer.lookup import StoredInstance
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive, free_port, start_dimse_archive
from tests.fixtures.s3 import S3Server, make_s3_store
from tests.fixtures.server import start_archive

SERIES, PER_SERIES = 2, 3


@pytest.fixture
def dimse_settings() -> dict[str, object]:
    """The archive fixtures send a pending response after every sub-operation (the default spaces them
    200 ms apart), so that the tests can check each one's counts; test_pending_responses_are_spaced checks
    the default."""
    return {"dimse_pending_interval_ms": 0}


def study(seed: int, series: int = SERIES, per_series: int = PER_SERIES) -> list[bytes]:
    """CT instances (the SOP class the test SCPs take) of one study, in series and instance order."""
    rng = random.Random(seed)
    spec = make_study(rng, series_count=series, modalities=["CT"])
    return [
        to_bytes(make_instance(spec, s, n + 1, rows=32, columns=32, rng=rng))
        for s in range(series)
        for n in range(per_series)
    ]


def stow(archive: DimseArchive, files: list[bytes]) -> None:
    body, content_type = multipart_body(files)
    response = httpx.post(f"{archive.http.url}/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def dataset_bytes(data: bytes, tmp: Path) -> bytes:
    """A PS3.10 file's data set, file meta left out: what a C-STORE carries."""
    path = tmp / f"split-{time.perf_counter_ns()}.dcm"
    path.write_bytes(data)
    _, offset = split_dataset(path)
    path.unlink()
    return data[offset:]


def uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


class Received:
    """What a storage SCP (the C-GET requestor, or a C-MOVE destination) got: SOP UID -> (syntax, bytes)."""

    def __init__(self, delay: float = 0.0, abort_after: int | None = None) -> None:
        self.objects: dict[str, tuple[str, bytes]] = {}
        self.order: list[str] = []
        self.delay = delay
        self.abort_after = abort_after
        self.lock = threading.Lock()

    def on_store(self, event: evt.Event) -> int:
        if self.abort_after is not None and len(self.order) >= self.abort_after:
            # A-ABORT from another thread, as a receiver that gives up does (not from inside the handler)
            threading.Thread(target=event.assoc.abort).start()
            time.sleep(1)
            return 0xA700
        path = getattr(event, "dataset_path", None)  # the archive in this process turned chunked receive on
        if path is not None:
            data = Path(path).read_bytes()
            _, offset = split_dataset(Path(path))
            data = data[offset:]
        else:
            data = event.request.DataSet.getvalue()
        with self.lock:
            uid = str(event.request.AffectedSOPInstanceUID)
            self.objects[uid] = (str(event.context.transfer_syntax), data)
            self.order.append(uid)
        time.sleep(self.delay)
        return 0x0000


def query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def get(
    archive: DimseArchive,
    identifier: Dataset,
    storage: list[tuple[str, list[str]]] | None = None,
    model: str = StudyRootQueryRetrieveInformationModelGet,
    calling: str = "GETTER",
) -> tuple[list[tuple[int, Dataset | None]], Received]:
    """A C-GET with pynetdicom as SCU: storage contexts with the SCP role; every response and what arrived."""
    received = Received()
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    storage = storage if storage is not None else [(CTImageStorage, [ExplicitVRLittleEndian])]
    for sop_class, syntaxes in storage:
        ae.add_requested_context(sop_class, syntaxes)
    roles = [build_role(sop, scp_role=True) for sop in dict.fromkeys(s for s, _ in storage)]
    assoc = ae.associate(
        *archive.address,
        ae_title=ARCHIVE_AE,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, received.on_store)],
    )
    assert assoc.is_established
    try:
        responses = [(int(status.Status), ident) for status, ident in assoc.send_c_get(identifier, model)]
    finally:
        assoc.release()
    return responses, received


def counts(status: Dataset | int, response: Dataset) -> tuple[int | None, int, int, int]:
    return (
        response.get("NumberOfRemainingSuboperations"),
        response.NumberOfCompletedSuboperations,
        response.NumberOfFailedSuboperations,
        response.NumberOfWarningSuboperations,
    )


def get_responses(archive: DimseArchive, identifier: Dataset, **kw: object):
    """Like get(), with the full response data sets (for the counts)."""
    received = Received()
    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    model = kw.get("model", StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(model)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        *archive.address, ae_title=ARCHIVE_AE, ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, received.on_store)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(identifier, model))
    finally:
        assoc.release()
    return responses, received


def assert_counts(responses: list[tuple[Dataset, Dataset | None]], total: int, final: int = 0x0000) -> None:
    """Exact pending counts: one pending response per sub-operation but the last, then the final one."""
    statuses = [int(r.Status) for r, _ in responses]
    assert statuses == [0xFF00] * (total - 1) + [final]
    for k, (rsp, _) in enumerate(responses[:-1]):
        assert counts(0xFF00, rsp) == (total - 1 - k, k + 1, 0, 0)
    last = responses[-1][0]
    assert (last.NumberOfCompletedSuboperations, last.NumberOfFailedSuboperations) == (total, 0)
    assert last.NumberOfWarningSuboperations == 0
    assert "NumberOfRemainingSuboperations" not in last


# --- C-GET ------------------------------------------------------------------------------------------------


def test_get_study_series_and_instances_byte_for_byte(
    open_dimse_archive: DimseArchive, tmp_path: Path
) -> None:
    archive = open_dimse_archive
    files = study(1)
    stow(archive, files + study(2))  # a second study that must not come along
    expected = {uids(f)[2]: dataset_bytes(f, tmp_path) for f in files}
    study_uid, first_series, _ = uids(files[0])

    responses, received = get_responses(archive, query("STUDY", StudyInstanceUID=study_uid))
    assert_counts(responses, len(files))
    assert {uid: data for uid, (_, data) in received.objects.items()} == expected
    assert {ts for ts, _ in received.objects.values()} == {ExplicitVRLittleEndian}
    assert received.order == [uids(f)[2] for f in files]  # series then instance number order

    responses, received = get_responses(
        archive, query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=first_series)
    )
    assert_counts(responses, PER_SERIES)
    assert set(received.objects) == {uids(f)[2] for f in files[:PER_SERIES]}

    # IMAGE level, a list of SOP Instance UIDs (backslash-separated on the wire), one unknown
    wanted = [uids(files[0])[2], uids(files[2])[2], "1.2.3.4.5.999"]
    responses, received = get_responses(
        archive,
        query("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=first_series, SOPInstanceUID=wanted),
    )
    assert_counts(responses, 2)
    assert {uid: data for uid, (_, data) in received.objects.items()} == {u: expected[u] for u in wanted[:2]}

    # several studies at STUDY level, and a patient at PATIENT level (Patient Root)
    other = uids(study(2)[0])[0]
    responses, received = get_responses(archive, query("STUDY", StudyInstanceUID=[study_uid, other]))
    assert_counts(responses, 2 * len(files))
    patient = pydicom.dcmread(pydicom.filebase.DicomBytesIO(files[0])).PatientID
    responses, received = get_responses(
        archive, query("PATIENT", PatientID=patient), model=PatientRootQueryRetrieveInformationModelGet
    )
    assert_counts(responses, len(files))
    assert {uid: data for uid, (_, data) in received.objects.items()} == expected


def test_get_unknown_uids_and_bad_identifiers(open_dimse_archive: DimseArchive) -> None:
    archive = open_dimse_archive
    # nothing matches: success with no sub-operations (as dcm4che/dcm4chee answer; Orthanc answers 0xC000)
    responses, received = get(archive, query("STUDY", StudyInstanceUID="1.2.3.999"))
    assert [s for s, _ in responses] == [0x0000] and not received.objects
    # the level's unique key or a key above it missing, a level the model does not have
    for identifier in (
        query("STUDY"),
        query("SERIES", SeriesInstanceUID="1.2.3"),
        query("IMAGE", StudyInstanceUID="1.2", SOPInstanceUID="1.2.3"),
        query("PATIENT", PatientID="P1"),  # Study Root has no PATIENT level
        query("FRAME", StudyInstanceUID="1.2"),
    ):
        responses, _ = get(archive, identifier)
        assert [s for s, _ in responses] == [0xA900], identifier


def test_a_uid_key_that_is_no_uid_is_a900(open_dimse_archive: DimseArchive) -> None:
    """A wildcard or other non-UID in a unique key (PS3.4 C.4.2.2.1 allows single UIDs and UID lists) is
    0xA900 with the key named, as dimse.md says and the C-FIND answers it; it matched nothing (0x0000).
    Checked before the Move Destination, as the identifier is."""
    for identifier, key in (
        (query("STUDY", StudyInstanceUID="1.2*"), "StudyInstanceUID"),
        (query("STUDY", StudyInstanceUID="1.2.3\\abc"), "StudyInstanceUID"),
        (query("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.?"), "SeriesInstanceUID"),
        (
            query("IMAGE", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.4", SOPInstanceUID="x"),
            "SOPInstanceUID",
        ),
    ):
        responses, _ = get(open_dimse_archive, identifier)
        assert [s for s, _ in responses] == [0xA900], identifier
        ((status, _),) = move(open_dimse_archive, identifier, "NOBODY")
        assert int(status.Status) == 0xA900
        assert str(status.ErrorComment).startswith(f"{key} "), status.ErrorComment


async def test_retrieve_needs_the_retrieve_service(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("GETTER", services=["find", "store"])
    responses, _ = await asyncio.to_thread(get, dimse_archive, query("STUDY", StudyInstanceUID="1.2.3"))
    assert [s for s, _ in responses] == [0x0124]
    await dimse_archive.register("GETTER", services=["retrieve"])
    responses, _ = await asyncio.to_thread(get, dimse_archive, query("STUDY", StudyInstanceUID="1.2.3"))
    assert [s for s, _ in responses] == [0x0000]
    rows = await audit_rows(dimse_archive, "C-GET")
    assert [(r["status"], r["action_code"]) for r in rows] == [(0x0124, "R"), (0, "R")]


def test_get_without_a_storage_context_fails_every_sub_operation(open_dimse_archive: DimseArchive) -> None:
    files = study(3, series=1, per_series=2)
    stow(open_dimse_archive, files)
    responses, received = get(
        open_dimse_archive,
        query("STUDY", StudyInstanceUID=uids(files[0])[0]),
        storage=[(MRImageStorage, [ExplicitVRLittleEndian])],
    )
    assert [s for s, _ in responses] == [0xFF00, 0xA702]
    assert not received.objects
    assert sorted(responses[-1][1].FailedSOPInstanceUIDList) == sorted(uids(f)[2] for f in files)


async def test_retrieve_reads_the_peers_partition_only(dimse_archive: DimseArchive) -> None:
    """Stored by C-STORE into partition A; an AE of partition B finds nothing to retrieve."""
    await dimse_archive.register("MODALITY", services=["store"], partition="A")
    await dimse_archive.register("READER-A", services=["retrieve"], partition="A")
    await dimse_archive.register("READER-B", services=["retrieve"], partition="B")
    files = study(11, series=1, per_series=3)

    def store() -> list[int]:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(*dimse_archive.address, ae_title=ARCHIVE_AE)
        try:
            return [
                int(assoc.send_c_store(pydicom.dcmread(pydicom.filebase.DicomBytesIO(f))).Status)
                for f in files
            ]
        finally:
            assoc.release()

    assert await asyncio.to_thread(store) == [0, 0, 0]
    identifier = query("STUDY", StudyInstanceUID=uids(files[0])[0])
    responses, received = await asyncio.to_thread(get, dimse_archive, identifier, calling="READER-B")
    assert [s for s, _ in responses] == [0x0000] and not received.objects
    responses, received = await asyncio.to_thread(get, dimse_archive, identifier, calling="READER-A")
    assert [s for s, _ in responses] == [0xFF00, 0xFF00, 0x0000]
    assert set(received.objects) == {uids(f)[2] for f in files}


def test_pending_responses_are_spaced(database_url: str, tmp_path: Path) -> None:
    """By default one pending response after the first sub-operation, then at most one per interval (a
    minute here: none), then the final one with every count."""
    thread, archive = start_dimse_archive(
        database_url, tmp_path, insecure_open=True, dimse_pending_interval_ms=60_000
    )
    try:
        files = study(3, series=1, per_series=12)
        stow(archive, files)
        responses, received = get_responses(archive, query("STUDY", StudyInstanceUID=uids(files[0])[0]))
    finally:
        thread.stop()
    assert [int(r.Status) for r, _ in responses] == [0xFF00, 0x0000]
    assert counts(0xFF00, responses[0][0]) == (11, 1, 0, 0)
    assert responses[-1][0].NumberOfCompletedSuboperations == 12 and len(received.objects) == 12


def test_cancel_during_a_get(open_dimse_archive: DimseArchive) -> None:
    files = study(12, series=1, per_series=30)
    stow(open_dimse_archive, files)
    received = Received(delay=0.05)
    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        *open_dimse_archive.address, ae_title=ARCHIVE_AE, ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, received.on_store)],
    )  # fmt: skip
    context_id = next(
        cx.context_id for cx in assoc.accepted_contexts
        if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
    )  # fmt: skip
    responses = []
    try:
        identifier = query("STUDY", StudyInstanceUID=uids(files[0])[0])
        for rsp, ident in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=9):
            responses.append((rsp, ident))
            if len(responses) == 2:
                assoc.send_c_cancel(9, context_id)
    finally:
        assoc.release()
    final, _ = responses[-1]
    assert int(final.Status) == 0xFE00
    remaining, completed, failed, warning = counts(final, final)
    assert (failed, warning) == (0, 0) and 0 < completed < len(files)
    assert completed + remaining == len(files) and completed == len(received.objects)


# --- compressed objects -----------------------------------------------------------------------------------

RLE_FILE, JPEG_FILE = "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"


def test_compressed_objects_sent_as_stored_or_transcoded(
    open_dimse_archive: DimseArchive, tmp_path: Path
) -> None:
    archive = open_dimse_archive
    rle = Path(get_testdata_file(RLE_FILE)).read_bytes()
    jpeg = Path(get_testdata_file(JPEG_FILE)).read_bytes()
    stow(archive, [rle, jpeg])
    rle_ds, jpeg_ds = (pydicom.dcmread(pydicom.filebase.DicomBytesIO(d)) for d in (rle, jpeg))

    # the stored syntax accepted: the stored bytes, compressed pixel data untouched
    responses, received = get(
        archive, query("STUDY", StudyInstanceUID=str(rle_ds.StudyInstanceUID)),
        storage=[(MRImageStorage, [str(rle_ds.file_meta.TransferSyntaxUID)])],
    )  # fmt: skip
    assert [s for s, _ in responses] == [0x0000]
    assert received.objects[str(rle_ds.SOPInstanceUID)] == (
        "1.2.840.10008.1.2.5",
        dataset_bytes(rle, tmp_path),
    )
    responses, received = get(
        archive, query("STUDY", StudyInstanceUID=str(jpeg_ds.StudyInstanceUID)),
        storage=[(SecondaryCaptureImageStorage, ["1.2.840.10008.1.2.4.50"])],
    )  # fmt: skip
    assert received.objects[str(jpeg_ds.SOPInstanceUID)][1] == dataset_bytes(jpeg, tmp_path)

    # only Explicit VR Little Endian accepted: transcoded, lossless RLE back to the very same pixels
    responses, received = get(
        archive, query("STUDY", StudyInstanceUID=str(rle_ds.StudyInstanceUID)),
        storage=[(MRImageStorage, [ExplicitVRLittleEndian])],
    )  # fmt: skip
    assert [s for s, _ in responses] == [0x0000]
    syntax, data = received.objects[str(rle_ds.SOPInstanceUID)]
    assert syntax == ExplicitVRLittleEndian
    got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
    got.file_meta = Dataset()
    got.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, rle_ds.pixel_array)
    assert got.SOPInstanceUID == rle_ds.SOPInstanceUID and got.PatientName == rle_ds.PatientName
    # and Implicit VR Little Endian only
    responses, received = get(
        archive, query("STUDY", StudyInstanceUID=str(jpeg_ds.StudyInstanceUID)),
        storage=[(SecondaryCaptureImageStorage, [ImplicitVRLittleEndian])],
    )  # fmt: skip
    assert [s for s, _ in responses] == [0x0000]
    assert received.objects[str(jpeg_ds.SOPInstanceUID)][0] == ImplicitVRLittleEndian


def test_contexts_proposed_for_a_move() -> None:
    def stored(sop_class: str, syntax: str, n: int = 0) -> StoredInstance:
        return StoredInstance("1.2", "1.2.3", f"1.2.3.{n}", sop_class, syntax, "key", 1)

    jpeg = "1.2.840.10008.1.2.4.50"
    instances = [stored(CTImageStorage, ExplicitVRLittleEndian), stored(CTImageStorage, jpeg),
                 stored(MRImageStorage, ExplicitVRLittleEndian), stored(CTImageStorage, jpeg, 1)]  # fmt: skip
    proposed = [(cx.abstract_syntax, cx.transfer_syntax) for cx in contexts_for(instances)]
    assert proposed == [
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [jpeg]),
        (MRImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    # at most 128: the stored syntaxes first
    many = [stored(f"1.2.840.10008.5.1.4.1.1.{n}", jpeg, n) for n in range(100)]
    proposed = [(cx.abstract_syntax, cx.transfer_syntax) for cx in contexts_for(many)]
    assert len(proposed) == 128 and all(ts == [jpeg] for _, ts in proposed[:100])


# --- C-MOVE -----------------------------------------------------------------------------------------------


class StorageScp:
    """A pynetdicom storage SCP on a free loopback port: the C-MOVE destination."""

    def __init__(
        self, title: str = "DEST", received: Received | None = None, require_calling: str | None = None
    ):
        self.title = title
        self.port = free_port()
        self.received = received or Received()
        ae = AE(ae_title=title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if require_calling:
            ae.require_calling_aet = [require_calling]
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.received.on_store)]
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def destination() -> Iterator[StorageScp]:
    scp = StorageScp()
    try:
        yield scp
    finally:
        scp.stop()


def move_assoc(archive: DimseArchive, calling: str = "MOVER"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(*archive.address, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    return assoc


def move(
    archive: DimseArchive, identifier: Dataset, destination: str
) -> list[tuple[Dataset, Dataset | None]]:
    assoc = move_assoc(archive)
    try:
        return list(assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()


async def audit_rows(archive: DimseArchive, operation: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(archive.http.database_url)
    try:
        rows: list[asyncpg.Record] = []
        for _ in range(50):  # the audit writer flushes every 0.1 s
            rows = await conn.fetch("SELECT * FROM audit_event WHERE path = $1 ORDER BY event_id", operation)
            if rows and all(r["status"] is not None for r in rows):
                await asyncio.sleep(0.3)
                return await conn.fetch(
                    "SELECT * FROM audit_event WHERE path = $1 ORDER BY event_id", operation
                )
            await asyncio.sleep(0.1)
        return rows
    finally:
        await conn.close()


async def test_move_to_a_registered_destination(
    open_dimse_archive: DimseArchive, destination: StorageScp, tmp_path: Path
) -> None:
    archive = open_dimse_archive
    files = study(4)
    await asyncio.to_thread(stow, archive, files)
    await archive.register("DEST", port=destination.port)
    study_uid = uids(files[0])[0]
    responses = await asyncio.to_thread(move, archive, query("STUDY", StudyInstanceUID=study_uid), "DEST")
    assert_counts(responses, len(files))
    expected = {uids(f)[2]: dataset_bytes(f, tmp_path) for f in files}
    assert {uid: data for uid, (_, data) in destination.received.objects.items()} == expected
    rows = await audit_rows(archive, "C-MOVE")
    assert len(rows) == 1 and rows[0]["status"] == 0 and rows[0]["action_code"] == "R"
    assert rows[0]["study_uid"] == study_uid
    assert rows[0]["detail"] == f"C-MOVE to DEST: {len(files)} completed, 0 failed, 0 warning, 0 remaining"


@contextlib.contextmanager
def _storescp(archive: DimseArchive, out: Path, *flags: str) -> Iterator[None]:
    """DCMTK's storescp as move destination STORESCP, writing what it receives to `out`, while the block
    runs."""
    port = free_port()
    out.mkdir()
    assert shutil.which("storescp"), "storescp (DCMTK) is not installed: scripts/dimse-deps installs it"
    scp = subprocess.Popen(["storescp", *flags, "-aet", "STORESCP", "-od", str(out), str(port)])
    try:
        asyncio.run(archive.register("STORESCP", port=port))
        for _ in range(50):  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def test_move_to_dcmtk_storescp_transcodes_what_it_does_not_take(
    open_dimse_archive: DimseArchive, tmp_path: Path
) -> None:
    """DCMTK's storescp (uncompressed syntaxes only, by default) as the move destination: a CT series
    arrives as stored, an RLE object is transcoded to Explicit VR Little Endian."""
    files = study(13, series=1, per_series=3)
    rle = Path(get_testdata_file(RLE_FILE)).read_bytes()
    original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(rle))
    stow(open_dimse_archive, [*files, rle])
    out = tmp_path / "storescp"
    with _storescp(open_dimse_archive, out):
        for study_uid in (uids(files[0])[0], str(original.StudyInstanceUID)):
            responses = move(open_dimse_archive, query("STUDY", StudyInstanceUID=study_uid), "STORESCP")
            assert int(responses[-1][0].Status) == 0x0000
    received = {uids(path.read_bytes())[2]: path.read_bytes() for path in out.iterdir()}
    assert set(received) == {uids(f)[2] for f in files} | {str(original.SOPInstanceUID)}
    for f in files:
        assert dataset_bytes(received[uids(f)[2]], tmp_path) == dataset_bytes(f, tmp_path)
    moved = pydicom.dcmread(pydicom.filebase.DicomBytesIO(received[str(original.SOPInstanceUID)]))
    assert moved.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(moved.pixel_array, original.pixel_array)


def test_move_of_an_odd_length_deflated_object_to_dcmtk_storescp(
    open_dimse_archive: DimseArchive, tmp_path: Path
) -> None:
    """pydicom's image_dfl.dcm holds a deflated stream of odd length (4303 bytes), unpadded (PS3.5 A.5 adds
    one NUL). Sent as stored, DCMTK refused the odd fragment and aborted ('Odd Fragment Length'): 0xA702.
    The archive now adds the padding byte when it sends such an object; the data set is the same."""
    data = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert len(dataset_bytes(data, tmp_path)) % 2 == 1
    stow(open_dimse_archive, [data])
    out = tmp_path / "storescp"
    with _storescp(open_dimse_archive, out, "--accept-all"):
        identifier = query("STUDY", StudyInstanceUID=str(original.StudyInstanceUID))
        responses = move(open_dimse_archive, identifier, "STORESCP")
    assert [int(r.Status) for r, _ in responses][-1] == 0x0000
    (received,) = [pydicom.dcmread(path) for path in out.iterdir()]
    assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.PixelData == original.PixelData


async def test_move_destination_unknown_or_unreachable(open_dimse_archive: DimseArchive) -> None:
    archive = open_dimse_archive
    files = study(5, series=1, per_series=2)
    await asyncio.to_thread(stow, archive, files)
    identifier = query("STUDY", StudyInstanceUID=uids(files[0])[0])
    # not registered, registered without a port, registered with a network as host: 0xA801
    await archive.register("NOPORT")
    await archive.register("NET", host="10.0.0.0/8", port=104)
    for title in ("NOBODY", "NOPORT", "NET"):
        responses = await asyncio.to_thread(move, archive, identifier, title)
        assert [int(r.Status) for r, _ in responses] == [0xA801], title
    # registered, nobody listening: the sub-operations cannot be performed
    await archive.register("GONE", port=free_port())
    responses = await asyncio.to_thread(move, archive, identifier, "GONE")
    ((final, failures),) = responses
    assert int(final.Status) == 0xA702
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 2)
    assert sorted(failures.FailedSOPInstanceUIDList) == sorted(uids(f)[2] for f in files)


def test_dcmtk_movescu_with_an_empty_move_destination_is_a801(open_dimse_archive: DimseArchive) -> None:
    """movescu -aem "" sends a zero-length Move Destination: 0xA801 (Move Destination unknown), where
    pynetdicom refused to decode the request and aborted the association (a traceback in the log)."""
    result = dcmtk(
        "movescu", "-v", "-aet", "MOVESCU", "-aem", "", "-aec", ARCHIVE_AE, "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
        *map(str, open_dimse_archive.address),
    )  # fmt: skip
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in result.stderr, result.stderr
    assert "Peer aborted" not in result.stderr


async def test_move_destination_rejects_or_aborts(open_dimse_archive: DimseArchive) -> None:
    archive = open_dimse_archive
    files = study(6, series=1, per_series=4)
    await asyncio.to_thread(stow, archive, files)
    identifier = query("STUDY", StudyInstanceUID=uids(files[0])[0])

    rejecting = StorageScp("PICKY", require_calling="SOMEONE")
    try:
        await archive.register("PICKY", port=rejecting.port)
        ((final, failures),) = await asyncio.to_thread(move, archive, identifier, "PICKY")
        assert int(final.Status) == 0xA702 and final.NumberOfFailedSuboperations == 4
        assert "rejected" in final.ErrorComment
    finally:
        rejecting.stop()

    aborting = StorageScp("FLAKY", received=Received(abort_after=2))
    try:
        await archive.register("FLAKY", port=aborting.port)
        responses = await asyncio.to_thread(move, archive, identifier, "FLAKY")
        final, failures = responses[-1]
        assert int(final.Status) == 0xB000  # some completed, the rest failed
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 2)
        assert sorted(failures.FailedSOPInstanceUIDList) == sorted(uids(f)[2] for f in files[2:])
        assert set(aborting.received.objects) == {uids(f)[2] for f in files[:2]}
    finally:
        aborting.stop()


async def test_cancel_during_a_move(open_dimse_archive: DimseArchive) -> None:
    archive = open_dimse_archive
    files = study(7, series=1, per_series=40)
    await asyncio.to_thread(stow, archive, files)
    slow = StorageScp("SLOW", received=Received(delay=0.05))
    try:
        await archive.register("SLOW", port=slow.port)

        def cancel_after_three() -> list[tuple[Dataset, Dataset | None]]:
            assoc = move_assoc(archive)
            context_id = next(
                cx.context_id for cx in assoc.accepted_contexts
                if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelMove
            )  # fmt: skip
            identifier = query("STUDY", StudyInstanceUID=uids(files[0])[0])
            responses = []
            try:
                for rsp, ident in assoc.send_c_move(
                    identifier, "SLOW", StudyRootQueryRetrieveInformationModelMove, msg_id=7
                ):
                    responses.append((rsp, ident))
                    if len(responses) == 3:
                        assoc.send_c_cancel(7, context_id)
            finally:
                assoc.release()
            return responses

        responses = await asyncio.to_thread(cancel_after_three)
    finally:
        slow.stop()
    final, _ = responses[-1]
    assert int(final.Status) == 0xFE00
    remaining, completed, failed, warning = counts(final, final)
    assert failed == warning == 0 and remaining > 0
    assert completed + remaining == len(files)
    assert completed == len(slow.received.objects) < len(files)
    rows = await audit_rows(archive, "C-MOVE")
    assert [r["status"] for r in rows] == [0xFE00]
    assert rows[0]["detail"].endswith(f"{completed} completed, 0 failed, 0 warning, {remaining} remaining")


async def test_failure_statuses_are_audited(open_dimse_archive: DimseArchive) -> None:
    """DIMSE statuses run to 0xFFFF (audit_event.status is an integer since migration 0016)."""
    responses = await asyncio.to_thread(
        move, open_dimse_archive, query("STUDY", StudyInstanceUID="1.2.3"), "NOBODY"
    )
    assert [int(r.Status) for r, _ in responses] == [0xA801]
    rows = await audit_rows(open_dimse_archive, "C-MOVE")
    assert [(r["status"], r["action_code"]) for r in rows] == [(0xA801, "R")]
    assert "NOBODY is not a registered AE" in rows[0]["detail"]


# --- DCMTK as the peer ------------------------------------------------------------------------------------


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which(args[0]), f"{args[0]} (DCMTK) is not installed: scripts/dimse-deps installs it"
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def compare_files(directory: Path, files: list[bytes], tmp_path: Path) -> None:
    received = {}
    for path in directory.iterdir():
        data = path.read_bytes()
        received[uids(data)[2]] = dataset_bytes(data, tmp_path)
    assert received == {uids(f)[2]: dataset_bytes(f, tmp_path) for f in files}


def test_dcmtk_getscu(open_dimse_archive: DimseArchive, tmp_path: Path) -> None:
    archive = open_dimse_archive
    files = study(8)
    stow(archive, files)
    out = tmp_path / "got"
    out.mkdir()
    result = dcmtk(
        "getscu", "-aet", "GETSCU", "-aec", ARCHIVE_AE, "-S", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={uids(files[0])[0]}", "-od", str(out), *map(str, archive.address),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    compare_files(out, files, tmp_path)


async def test_dcmtk_movescu(open_dimse_archive: DimseArchive, tmp_path: Path) -> None:
    archive = open_dimse_archive
    files = study(9)
    await asyncio.to_thread(stow, archive, files)
    port = free_port()
    await archive.register("MOVESCU", port=port)
    out = tmp_path / "moved"
    out.mkdir()
    series = uids(files[0])[1]
    result = await asyncio.to_thread(
        dcmtk,
        "movescu", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", ARCHIVE_AE, "+P", str(port), "-S",
        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={uids(files[0])[0]}",
        "-k", f"SeriesInstanceUID={series}", "-od", str(out), *map(str, archive.address),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    compare_files(out, files[:PER_SERIES], tmp_path)


# --- the S3 store -----------------------------------------------------------------------------------------


async def test_get_from_the_s3_store(
    database_url: str, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    """Objects in S3 are streamed into a temporary file, then sent as from the local store."""
    port = free_port()
    store, test_store = make_s3_store(s3_server, s3_bucket), make_s3_store(s3_server, s3_bucket)
    settings = Settings(
        data_dir=tmp_path, max_instance_size=64 << 20, dimse_port=port, dimse_ae_title=ARCHIVE_AE,
        dimse_pending_interval_ms=0,
    )  # fmt: skip
    thread, running = start_archive(settings, database_url, store, test_store)
    archive = DimseArchive(running, port)
    try:
        files = study(10)
        await asyncio.to_thread(stow, archive, files)
        identifier = query("STUDY", StudyInstanceUID=uids(files[0])[0])
        responses, received = await asyncio.to_thread(get_responses, archive, identifier)
        assert_counts(responses, len(files))
        expected = {uids(f)[2]: dataset_bytes(f, tmp_path) for f in files}
        assert {uid: data for uid, (_, data) in received.objects.items()} == expected
    finally:
        thread.stop()
        await test_store.close()
