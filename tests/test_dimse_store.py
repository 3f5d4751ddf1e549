"""The DIMSE listener: association acceptance by the AE registry, C-ECHO and C-STORE through ingest."""

from __future__ import annotations

import asyncio
import io
import random
import time

import asyncpg
import httpx
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from bench.synthetic import make_instance, make_study
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive


def study(seed: int, count: int = 3) -> list[pydicom.Dataset]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    return [make_instance(spec, 0, i + 1, rng=rng) for i in range(count)]


def associate(archive: DimseArchive, calling: str = "SCANNER", called: str = ARCHIVE_AE, **kw):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate(*archive.address, ae_title=called, **kw)


async def audit_rows(archive: DimseArchive) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(archive.http.database_url)
    try:
        # the audit writer flushes every 0.1 s
        for _ in range(50):
            rows = await conn.fetch("SELECT * FROM audit_event WHERE action = 'dimse' ORDER BY event_id")
            if rows and rows[-1]["path"] in ("A-RELEASE", "A-ABORT", "A-ASSOCIATE-RJ"):
                return rows
            await asyncio.sleep(0.1)
        return rows
    finally:
        await conn.close()


async def instance_count(archive: DimseArchive) -> int:
    conn = await asyncpg.connect(archive.http.database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM instance")
    finally:
        await conn.close()


async def test_unregistered_calling_ae_is_rejected(dimse_archive: DimseArchive) -> None:
    assoc = associate(dimse_archive, "STRANGER")
    assert assoc.is_rejected
    rows = await audit_rows(dimse_archive)
    assert rows[-1]["path"] == "A-ASSOCIATE-RJ"
    assert rows[-1]["subject"] == "ae:STRANGER"
    assert "not registered" in rows[-1]["detail"]


async def test_wrong_host_and_wrong_called_title_are_rejected(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("FARAWAY", host="10.1.2.3")
    assert associate(dimse_archive, "FARAWAY").is_rejected
    await dimse_archive.register("SCANNER")
    assert associate(dimse_archive, "SCANNER", called="ANY-SCP").is_rejected
    assoc = associate(dimse_archive, "SCANNER")
    assert assoc.is_established
    assoc.release()


async def test_wrong_called_title_is_audited_with_the_title_called(dimse_archive: DimseArchive) -> None:
    """The audit record of an association refused for its called AE title names the title the peer
    called (it said 'DEFAULT', pynetdicom's placeholder in the rejection, and the archive's own title)."""
    await dimse_archive.register("SCANNER")
    assert associate(dimse_archive, "SCANNER", called="ANY-SCP").is_rejected
    rows = await audit_rows(dimse_archive)
    assert rows[-1]["path"] == "A-ASSOCIATE-RJ"
    assert rows[-1]["detail"] == f"called AE title 'ANY-SCP' is not {ARCHIVE_AE!r}"
    assert rows[-1]["user_agent"] == "called AE ANY-SCP"


async def test_echo_and_store_then_retrieve_byte_for_byte(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("SCANNER", services=["store"])
    datasets = study(1)
    assoc = associate(dimse_archive)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    assert statuses == [0, 0, 0]
    conn = await asyncpg.connect(dimse_archive.http.database_url)
    try:
        rows = await conn.fetch("SELECT sop_instance_uid, storage_key FROM instance")
        feed = await conn.fetchval("SELECT count(*) FROM changefeed")
    finally:
        await conn.close()
    assert {r["sop_instance_uid"] for r in rows} == {ds.SOPInstanceUID for ds in datasets}
    assert feed == 3
    # the stored object holds exactly the data set that was sent
    store = dimse_archive.http.store
    for row in rows:
        data = await store.read(row["storage_key"])
        stored = pydicom.dcmread(io.BytesIO(data))
        sent = next(ds for ds in datasets if ds.SOPInstanceUID == row["sop_instance_uid"])
        assert stored.PixelData == sent.PixelData
        assert stored.PatientName == sent.PatientName
    rows = await audit_rows(dimse_archive)
    assert [r["path"] for r in rows] == [
        "A-ASSOCIATE",
        "C-ECHO",
        "C-STORE",
        "C-STORE",
        "C-STORE",
        "A-RELEASE",
    ]
    assert {r["subject"] for r in rows} == {"ae:SCANNER"}
    assert rows[2]["instance_uid"] in {ds.SOPInstanceUID for ds in datasets}


async def test_store_refusals(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("SCANNER", services=["find"])
    await dimse_archive.register("MODALITY", services=["store"])
    ds = study(2, 1)[0]
    assoc = associate(dimse_archive, "SCANNER")
    assert assoc.send_c_store(ds).Status == 0x0124  # not registered for store
    assoc.release()
    assoc = associate(dimse_archive, "MODALITY")
    assert assoc.send_c_store(ds).Status == 0
    duplicate = assoc.send_c_store(ds)
    assert duplicate.Status == 0x0111
    assoc.release()
    assert await instance_count(dimse_archive) == 1


def _send_raw(assoc, req, context_id: int):
    """Send a hand-made request and read its response, holding the association's reactor as pynetdicom's
    own send_c_* methods do (otherwise its thread may take the response first)."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context_id)
        return assoc.dimse.get_msg(block=True)[1]
    finally:
        assoc._reactor_checkpoint.set()


def _hand_made_store(archive: DimseArchive, syntax: str, ds: pydicom.Dataset, sop_instance_uid: str):
    """An association of MODALITY proposing CT storage in `syntax`, and a C-STORE request holding `ds` as
    explicit VR little endian under `sop_instance_uid`, whatever the syntax says (for _send_raw)."""
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate(*archive.address, ae_title=ARCHIVE_AE)
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, sop_instance_uid
    req.DataSet = io.BytesIO(encode(ds, False, True))
    return assoc, req


async def test_data_set_not_matching_its_declared_sop_instance_is_refused(
    dimse_archive: DimseArchive,
) -> None:
    """The request's Affected SOP Instance UID must be the data set's; otherwise A900, nothing kept."""
    await dimse_archive.register("MODALITY", services=["store"])
    ds = study(3, 1)[0]
    # the bytes of the data set under another Affected SOP Instance UID
    assoc, req = _hand_made_store(dimse_archive, ExplicitVRLittleEndian, ds, "1.2.3.4.5.6.7")
    rsp = _send_raw(assoc, req, assoc.accepted_contexts[0].context_id)
    assoc.release()
    assert rsp.Status == 0xA900
    assert await instance_count(dimse_archive) == 0


async def test_open_mode_accepts_any_calling_ae(open_dimse_archive: DimseArchive) -> None:
    ds = study(4, 1)[0]
    assoc = associate(open_dimse_archive, "WHOEVER")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    async with httpx.AsyncClient(base_url=open_dimse_archive.http.url) as client:
        found = (await client.get("/studies", params={"StudyInstanceUID": ds.StudyInstanceUID})).json()
    assert len(found) == 1


def _send_half_then_abort(assoc, ds) -> None:
    """Put the command and half the data set's P-DATA PDUs on the wire, then abort the association."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF

    req = C_STORE()
    req.MessageID = 9
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = io.BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID)
    pdus = list(message.encode_msg(context.context_id, 16384))
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    for primitive in pdus[: len(pdus) // 2]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.send(pdu.encode())
    time.sleep(0.3)
    assoc._reactor_checkpoint.set()
    assoc.abort()


async def test_abort_mid_store_keeps_exactly_the_acknowledged_instances(dimse_archive: DimseArchive) -> None:
    """Three instances get a success status; the association is aborted while the fourth (8 MB) is on the
    wire: the archive holds the three, and nothing of the fourth (no row, no object)."""
    await dimse_archive.register("MODALITY", services=["store"])
    rng = random.Random(21)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    small = [make_instance(spec, 0, n + 1, rng=rng) for n in range(3)]
    big = make_instance(spec, 0, 4, rng=rng, rows=2048, columns=2048)
    assoc = associate(dimse_archive, "MODALITY")
    assert [assoc.send_c_store(ds).Status for ds in small] == [0, 0, 0]
    _send_half_then_abort(assoc, big)
    await asyncio.sleep(1)
    conn = await asyncpg.connect(dimse_archive.http.database_url)
    try:
        stored = {r[0] for r in await conn.fetch("SELECT sop_instance_uid FROM instance")}
        keys = [r[0] for r in await conn.fetch("SELECT storage_key FROM instance")]
    finally:
        await conn.close()
    assert stored == {ds.SOPInstanceUID for ds in small}
    objects = [info.key async for info in dimse_archive.http.store.list("")]
    assert sorted(objects) == sorted(keys)
    rows = await audit_rows(dimse_archive)
    assert rows[-1]["path"] == "A-ABORT"


async def test_malformed_data_set_is_c000_and_stores_nothing(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("MODALITY", services=["store"])
    assoc = associate(dimse_archive, "MODALITY")
    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = "1.2.3.4.5.6.8"
    req.Priority = 2
    # an element that claims 4 GB of value in a 20-byte data set
    req.DataSet = io.BytesIO(b"\x08\x00\x16\x00UI\x10\x001.2.840.10008.5\x10\x00\x10\x00PN\xff\xff")
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    rsp = _send_raw(assoc, req, context.context_id)
    assoc.release()
    assert rsp.Status == 0xC000
    assert rsp.ErrorComment
    assert await instance_count(dimse_archive) == 0
    assert [info async for info in dimse_archive.http.store.list("")] == []


async def test_data_set_without_a_required_uid_is_a900(dimse_archive: DimseArchive) -> None:
    """A data set that parses but lacks StudyInstanceUID does not match its SOP class (A900), where an
    unparseable one cannot be understood (C000)."""
    await dimse_archive.register("MODALITY", services=["store"])
    ds = study(31, 1)[0]
    del ds.StudyInstanceUID
    assoc = associate(dimse_archive, "MODALITY")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA900
    assert "StudyInstanceUID" in status.ErrorComment
    assert await instance_count(dimse_archive) == 0


async def test_queries_into_a_new_partition_create_nothing(dimse_archive: DimseArchive) -> None:
    """C-FIND of an AE whose partition holds nothing yet answers no matches and creates no partition; its
    first C-STORE creates it, as a STOW does."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    await dimse_archive.register("NEWSITE", partition="newsite", services=["store", "find"])
    ae = AE(ae_title="NEWSITE")
    ae.add_requested_context(FIND)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(*dimse_archive.address, ae_title=ARCHIVE_AE)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    statuses = [status.Status for status, _ in assoc.send_c_find(query, FIND)]
    conn = await asyncpg.connect(dimse_archive.http.database_url)
    try:
        assert statuses == [0]
        assert await conn.fetchval("SELECT count(*) FROM partition WHERE name = 'newsite'") == 0
        assert assoc.send_c_store(study(41, 1)[0]).Status == 0
        assert await conn.fetchval("SELECT count(*) FROM partition WHERE name = 'newsite'") == 1
    finally:
        assoc.release()
        await conn.close()


async def test_corrupt_deflated_data_set_is_c000(dimse_archive: DimseArchive) -> None:
    """Bytes that do not inflate, on a Deflated Explicit VR Little Endian context, cannot be understood
    (0xC000), as any other unparseable data set; they were 0xA700 (out of resources, "try again")."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    await dimse_archive.register("MODALITY", services=["store"])
    ds = study(51, 1)[0]
    # explicit VR little endian bytes, not deflated
    assoc, req = _hand_made_store(dimse_archive, DeflatedExplicitVRLittleEndian, ds, ds.SOPInstanceUID)
    rsp = _send_raw(assoc, req, assoc.accepted_contexts[0].context_id)
    assoc.release()
    assert rsp.Status == 0xC000
    assert rsp.ErrorComment.startswith("cannot parse DICOM: error: Error -3 while decompressing")
    assert await instance_count(dimse_archive) == 0


def _send_raw_store(assoc, ds: pydicom.Dataset, sop_instance_uid: str) -> None:
    """A C-STORE request laid out by hand (no SCU builds one with an empty Affected SOP Instance UID)."""
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    from dimse.command_sets import encode_elements

    body = encode_elements([
        (0x00000002, "UI", ds.SOPClassUID), (0x00000100, "US", 0x0001), (0x00000110, "US", 9),
        (0x00000700, "US", 2), (0x00000800, "US", 0x0000), (0x00001000, "UI", sop_instance_uid),
    ])  # fmt: skip
    assert body is not None
    command = (encode_elements([(0x00000000, "UL", len(body))]) or b"") + body
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID)
    assoc._reactor_checkpoint.clear()  # the test's thread reads the answer, not pynetdicom's reactor
    while not assoc._is_paused:
        time.sleep(0.0001)
    for pdv in (b"\x03" + command, b"\x02" + encode(ds, context.transfer_syntax[0].is_implicit_VR, True)):
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context.context_id, pdv))
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.send(pdu.encode())
    assoc._reactor_checkpoint.set()


def _spooled() -> set[str]:
    """pynetdicom's temporary files of received objects (NamedTemporaryFile, suffix .dcm)."""
    import glob
    import tempfile

    return set(glob.glob(f"{tempfile.gettempdir()}/tmp*.dcm"))


def _until_ended(assoc, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_an_undecodable_request_aborts_the_association_cleanly(dimse_archive: DimseArchive) -> None:
    """A C-STORE request with an empty Affected SOP Instance UID: the archive sends an A-ABORT, records the
    abort, stores nothing and leaves no temporary file (pynetdicom's DUL thread used to die on it, closing
    the connection without an A-ABORT or an audit record, its temporary file left behind)."""
    await dimse_archive.register("MODALITY", services=["store"])
    before = _spooled()
    assoc = associate(dimse_archive, "MODALITY")
    assert assoc.is_established
    _send_raw_store(assoc, study(31, 1)[0], "")
    await asyncio.to_thread(_until_ended, assoc)
    assert assoc.is_aborted
    rows = await audit_rows(dimse_archive)
    assert rows[-1]["path"] == "A-ABORT"
    assert await instance_count(dimse_archive) == 0
    assert _spooled() <= before
    # the listener goes on: the next association stores
    again = associate(dimse_archive, "MODALITY")
    assert again.send_c_store(study(32, 1)[0]).Status == 0x0000
    again.release()
