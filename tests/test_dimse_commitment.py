"""Storage Commitment Push Model SCP: instances stored by C-STORE, commitment asked by a pynetdicom SCU, the
report received on the request's association or, after an early release, on one the archive opens."""

from __future__ import annotations

import asyncio
import io
import random
import threading
from typing import Any

import asyncpg
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel

from bench.synthetic import make_instance, make_study
from dicomcore.uids import new_uid
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive, free_port

WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def instances(seed: int, count: int = 3) -> list[pydicom.Dataset]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=1)
    return [make_instance(spec, 0, i + 1, rng=rng) for i in range(count)]


def scu(calling: str = "MODALITY") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def commitment_request(transaction: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


class Reports:
    """N-EVENT-REPORTs received by the SCU side: (event type, event information, association's AE titles)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Dataset, str]] = []
        self.arrived = threading.Event()

    def handler(self, event: evt.Event) -> tuple[int, None]:
        self.received.append((event.event_type, event.event_information, event.assoc.requestor.ae_title))
        self.arrived.set()
        return 0x0000, None


def refs_of(info: Dataset, keyword: str) -> list[tuple[str, str, int | None]]:
    return [
        (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID), i.get("FailureReason"))
        for i in info.get(keyword, [])
    ]


async def audit_paths(archive: DimseArchive, wanted: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(archive.http.database_url)
    try:
        for _ in range(100):  # the audit writer flushes every 0.1 s
            rows = await conn.fetch(
                "SELECT path, status, subject, detail FROM audit_event "
                "WHERE path IN ('N-ACTION', 'N-EVENT-REPORT') ORDER BY event_id"
            )
            if any(r["path"] == wanted for r in rows):
                return rows
            await asyncio.sleep(0.1)
        return rows
    finally:
        await conn.close()


def request_of(
    datasets: list[pydicom.Dataset], unknown: str, conflict: pydicom.Dataset
) -> list[tuple[str, str]]:
    """The stored instances, one unknown instance, and a stored one named with another SOP class."""
    return [
        *((str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets),
        (CTImageStorage, unknown),
        (MRImageStorage, str(conflict.SOPInstanceUID)),
    ]


async def test_report_on_the_same_association(open_dimse_archive: DimseArchive) -> None:
    datasets = instances(1)
    conflict = instances(2, 1)[0]
    unknown = new_uid()
    reports = Reports()
    assoc = scu().associate(
        *open_dimse_archive.address,
        ae_title=ARCHIVE_AE,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert assoc.is_established
    assert [assoc.send_c_store(ds).Status for ds in [*datasets, conflict]] == [0, 0, 0, 0]
    transaction = new_uid()
    refs = request_of(datasets, unknown, conflict)
    status, _ = assoc.send_n_action(
        commitment_request(transaction, refs), 1, StorageCommitmentPushModel, WELL_KNOWN
    )
    assert status.Status == 0
    assert reports.arrived.wait(20), "no N-EVENT-REPORT on the association"
    assoc.release()

    ((event_type, info, requestor),) = reports.received
    assert event_type == 2  # some failed
    assert requestor.strip() == "MODALITY"  # the report came on the SCU's own association
    assert info.TransactionUID == transaction
    assert info.RetrieveAETitle == ARCHIVE_AE
    assert refs_of(info, "ReferencedSOPSequence") == [(c, i, None) for c, i in refs[:3]]
    assert refs_of(info, "FailedSOPSequence") == [
        (CTImageStorage, unknown, 0x0112),
        (MRImageStorage, str(conflict.SOPInstanceUID), 0x0119),
    ]
    rows = await audit_paths(open_dimse_archive, "N-EVENT-REPORT")
    assert [(r["path"], r["status"]) for r in rows] == [("N-ACTION", 0), ("N-EVENT-REPORT", 0)]
    assert rows[1]["detail"].startswith(
        f"storage commitment {transaction}: 3 committed, 2 failed; sent on the"
    )


async def test_all_committed_is_event_type_1(open_dimse_archive: DimseArchive) -> None:
    datasets = instances(3, 2)
    reports = Reports()
    assoc = scu().associate(
        *open_dimse_archive.address,
        ae_title=ARCHIVE_AE,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert [assoc.send_c_store(ds).Status for ds in datasets] == [0, 0]
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]
    status, _ = assoc.send_n_action(
        commitment_request(new_uid(), refs), 1, StorageCommitmentPushModel, WELL_KNOWN
    )
    assert status.Status == 0
    assert reports.arrived.wait(20)
    assoc.release()
    ((event_type, info, _),) = reports.received
    assert event_type == 1
    assert refs_of(info, "ReferencedSOPSequence") == [(c, i, None) for c, i in refs]
    assert "FailedSOPSequence" not in info


async def test_report_on_a_new_association_after_an_early_release(dimse_archive: DimseArchive) -> None:
    port = free_port()
    await dimse_archive.register("MODALITY", port=port, services=["store", "commitment"])
    reports = Reports()
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)]
    )
    try:
        datasets = instances(4, 2)
        unknown = new_uid()
        assoc = scu().associate(*dimse_archive.address, ae_title=ARCHIVE_AE)
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [0, 0]
        transaction = new_uid()
        refs = [
            *((str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets),
            (CTImageStorage, unknown),
        ]
        # the N-ACTION and the release right behind it: the SCU does not wait on this association
        send_request(assoc, transaction, refs, message_id=5)
        assoc.release()
        assert reports.arrived.wait(20), "no N-EVENT-REPORT on a new association"
    finally:
        server.shutdown()
    ((event_type, info, requestor),) = reports.received
    assert requestor.strip() == ARCHIVE_AE  # the archive opened this association
    assert event_type == 2
    assert info.TransactionUID == transaction
    assert refs_of(info, "ReferencedSOPSequence") == [(c, i, None) for c, i in refs[:2]]
    assert refs_of(info, "FailedSOPSequence") == [(CTImageStorage, unknown, 0x0112)]
    rows = await audit_paths(dimse_archive, "N-EVENT-REPORT")
    assert [(r["path"], r["status"], r["subject"]) for r in rows] == [
        ("N-ACTION", 0, "ae:MODALITY"),
        ("N-EVENT-REPORT", 0, "ae:MODALITY"),
    ]
    assert f"sent on a new association to MODALITY at 127.0.0.1:{port} (attempt 1)" in rows[1]["detail"]


async def test_refusals(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("STORER", services=["store"])
    await dimse_archive.register("MODALITY", services=["commitment"])
    reports = Reports()
    handlers: list[Any] = [(evt.EVT_N_EVENT_REPORT, reports.handler)]
    refs = [(CTImageStorage, new_uid())]

    assoc = scu("STORER").associate(*dimse_archive.address, ae_title=ARCHIVE_AE, evt_handlers=handlers)
    status, _ = assoc.send_n_action(
        commitment_request(new_uid(), refs), 1, StorageCommitmentPushModel, WELL_KNOWN
    )
    assert status.Status == 0x0124
    assoc.release()

    assoc = scu("MODALITY").associate(*dimse_archive.address, ae_title=ARCHIVE_AE, evt_handlers=handlers)
    status, _ = assoc.send_n_action(
        commitment_request(new_uid(), refs), 1, StorageCommitmentPushModel, "1.2.3.4"
    )
    assert status.Status == 0x0117  # not the well-known instance
    status, _ = assoc.send_n_action(
        commitment_request(new_uid(), refs), 2, StorageCommitmentPushModel, WELL_KNOWN
    )
    assert status.Status == 0x0123  # no such action
    missing = commitment_request(new_uid(), refs)
    del missing.TransactionUID
    status, _ = assoc.send_n_action(missing, 1, StorageCommitmentPushModel, WELL_KNOWN)
    assert status.Status == 0x0115
    assert "Transaction UID" in status.ErrorComment
    assoc.release()
    assert not reports.arrived.wait(1)  # a refused request gets no report
    rows = await audit_paths(dimse_archive, "N-ACTION")
    for _ in range(20):
        if len(rows) == 4:
            break
        await asyncio.sleep(0.1)
        rows = await audit_paths(dimse_archive, "N-ACTION")
    assert [(r["status"], r["subject"]) for r in rows] == [
        (0x0124, "ae:STORER"), (0x0117, "ae:MODALITY"), (0x0123, "ae:MODALITY"), (0x0115, "ae:MODALITY"),
    ]  # fmt: skip


async def test_commitment_covers_the_partition_of_the_calling_ae(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("STORER", services=["store", "commitment"], partition="east")
    await dimse_archive.register("MODALITY", services=["commitment"])  # the default partition
    datasets = instances(5, 1)
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]
    received = {}
    for calling, store in (("STORER", True), ("MODALITY", False)):
        reports = Reports()
        assoc = scu(calling).associate(
            *dimse_archive.address,
            ae_title=ARCHIVE_AE,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
        )
        if store:
            assert assoc.send_c_store(datasets[0]).Status == 0
        status, _ = assoc.send_n_action(
            commitment_request(new_uid(), refs), 1, StorageCommitmentPushModel, WELL_KNOWN
        )
        assert status.Status == 0
        assert reports.arrived.wait(20)
        assoc.release()
        received[calling] = reports.received[0]
    assert received["STORER"][0] == 1
    assert received["MODALITY"][0] == 2
    assert refs_of(received["MODALITY"][1], "FailedSOPSequence") == [(*refs[0], 0x0112)]


def send_request(assoc: Any, transaction: str, refs: list[tuple[str, str]], *, message_id: int) -> None:
    """A storage commitment N-ACTION on `assoc`, without waiting for its response."""
    request = N_ACTION()
    request.MessageID = message_id
    request.RequestedSOPClassUID = StorageCommitmentPushModel
    request.RequestedSOPInstanceUID = WELL_KNOWN
    request.ActionTypeID = 1
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == StorageCommitmentPushModel)
    syntax = context.transfer_syntax[0]
    request.ActionInformation = io.BytesIO(
        encode(commitment_request(transaction, refs), syntax.is_implicit_VR, syntax.is_little_endian)
    )
    assoc.dimse.send_msg(request, context.context_id)
