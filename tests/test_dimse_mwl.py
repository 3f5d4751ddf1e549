"""Modality Worklist C-FIND from the UPS-RS worklist: work items created over HTTP, queried over DIMSE by
pynetdicom and by DCMTK findscu -W."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from dicomcore.uids import new_uid
from dimse.mwl_map import sps_id, sps_id_matches, start_filter
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive
from tests.worklist_data import code, performed, workitem

JSON = {"Content-Type": "application/dicom+json"}

# (uid, station, start, patient name, patient id, modality, accession, label)
ITEMS = {
    "a": ("CT1", "20261123080000", "Müller^Hans", "PAT-A", "CT", "ACC-A", "CT chest"),
    "b": ("CT1", "20261123140000", "Doe^Jane", "PAT-B", "CT", "ACC-B", "CT abdomen"),
    "c": ("MR1", "20261123090000", "Doe^John", "PAT-C", "MR", "ACC-C", "MR brain"),
    "d": ("CT1", "20261124080000", "Roe^Richard", "PAT-D", "CT", "ACC-D", "CT head"),
    "done": ("CT1", "20261123100000", "Doe^Done", "PAT-E", "CT", "ACC-E", "CT done"),
    "busy": ("CT1", "20261123110000", "Doe^Busy", "PAT-F", "CT", "ACC-F", "CT busy"),
}


def item_body(name: str) -> dict[str, Any]:
    station, start, patient, pid, modality, accession, label = ITEMS[name]
    ds = workitem(station=station, start=start, patient_name=patient, patient_id=pid, label=label)
    ds["00404026"] = {"vr": "SQ", "Value": [code(modality, modality, "DCM")]}
    ds["0040A370"] = {
        "vr": "SQ",
        "Value": [
            {
                "0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.10.999.{ord(name[0])}"]},
                "00080050": {"vr": "SH", "Value": [accession]},
                "00401001": {"vr": "SH", "Value": [f"RP-{name.upper()}"]},
                "00321060": {"vr": "LO", "Value": [f"Requested {label}"]},
                "00321064": {"vr": "SQ", "Value": [code(f"P-{name}", f"Procedure {name}", "99ORD")]},
            }
        ],
    }
    ds["00100021"] = {"vr": "LO", "Value": ["HOSP"]}
    return ds


async def load_worklist(archive: DimseArchive) -> dict[str, str]:
    """The six work items; `done` COMPLETED and `busy` IN PROGRESS. Name -> SOP Instance UID."""
    uids: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=archive.http.url, timeout=30) as client:
        for name in ITEMS:
            uid = uids[name] = new_uid()
            response = await client.post(
                f"/workitems?{uid}", content=orjson.dumps(item_body(name)), headers=JSON
            )
            assert response.status_code == 201, response.text
        for name, final in (("done", True), ("busy", False)):
            tuid = new_uid()
            assert (await _state(client, uids[name], "IN PROGRESS", tuid)).status_code == 200
            if final:
                url = f"/workitems/{uids[name]}?{tuid}"
                assert (
                    await client.post(url, content=orjson.dumps(performed()), headers=JSON)
                ).status_code == 200
                assert (await _state(client, uids[name], "COMPLETED", tuid)).status_code == 200
    return uids


async def _state(client: httpx.AsyncClient, uid: str, state: str, tuid: str) -> httpx.Response:
    body = {"00741000": {"vr": "CS", "Value": [state]}, "00081195": {"vr": "UI", "Value": [tuid]}}
    return await client.put(f"/workitems/{uid}/state", content=orjson.dumps(body), headers=JSON)


def mwl_query(**sps: str) -> Dataset:
    """A typical modality query: patient and request keys at the top, the SPS keys in its item; values of
    `sps` go into the SPS item, except the top-level keys named in TOP_KEYS."""
    ds = Dataset()
    ds.SpecificCharacterSet = ""
    ds.PatientName = sps.pop("PatientName", "")
    ds.PatientID = sps.pop("PatientID", "")
    ds.IssuerOfPatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = sps.pop("AccessionNumber", "")
    ds.RequestedProcedureID = ""
    ds.RequestedProcedureDescription = ""
    ds.StudyInstanceUID = ""
    ds.ReferringPhysicianName = ""  # no UPS counterpart: always zero length
    item = Dataset()
    item.ScheduledStationAETitle = sps.pop("ScheduledStationAETitle", "")
    item.ScheduledProcedureStepStartDate = sps.pop("ScheduledProcedureStepStartDate", "")
    item.ScheduledProcedureStepStartTime = sps.pop("ScheduledProcedureStepStartTime", "")
    item.Modality = sps.pop("Modality", "")
    item.ScheduledProcedureStepDescription = ""
    item.ScheduledProcedureStepID = ""
    item.ScheduledPerformingPhysicianName = ""
    for keyword, value in sps.items():
        setattr(item, keyword, value)
    ds.ScheduledProcedureStepSequence = [item]
    return ds


def c_find(archive: DimseArchive, query: Dataset, calling: str = "MODALITY") -> tuple[list[Dataset], int]:
    """(pending identifiers, final status) of one MWL C-FIND."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(*archive.address, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    try:
        results, final = [], -1
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status.Status in (0xFF00, 0xFF01):
                results.append(identifier)
            else:
                final = status.Status
        return results, final
    finally:
        assoc.release()


def sps_ids(results: list[Dataset]) -> list[str]:
    return [r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for r in results]


def derived_sps_id(uid: str) -> str:
    """The SPS ID of a work item without its own: 16 hex digits of its UID's SHA-256 (an SH is <= 16)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16].upper()


async def test_worklist_queries_select_exactly_the_scheduled_items(open_dimse_archive: DimseArchive) -> None:
    uids = await load_worklist(open_dimse_archive)

    def find(**keys: str) -> list[str]:
        results, final = c_find(open_dimse_archive, mwl_query(**keys))
        assert final == 0
        return [name for sid in sps_ids(results) for name, u in uids.items() if derived_sps_id(u) == sid]

    # everything scheduled, in scheduled order; COMPLETED and IN PROGRESS items are not worklist entries
    assert find() == ["a", "c", "b", "d"]
    assert find(ScheduledStationAETitle="CT1") == ["a", "b", "d"]
    assert find(ScheduledStationAETitle="CT1", ScheduledProcedureStepStartDate="20261123") == ["a", "b"]
    assert find(ScheduledProcedureStepStartDate="20261123-20261124") == ["a", "c", "b", "d"]
    assert find(ScheduledProcedureStepStartDate="20261124-") == ["d"]
    assert find(ScheduledProcedureStepStartDate="-20261123") == ["a", "c", "b"]
    # date and time combined (PS3.4 C.2.2.2.5.1): from 23 Nov 09:00 to 24 Nov 08:00
    both = {
        "ScheduledProcedureStepStartDate": "20261123-20261124",
        "ScheduledProcedureStepStartTime": "0900-0800",
    }
    assert find(**both) == ["c", "b", "d"]
    assert find(ScheduledProcedureStepStartDate="20261123", ScheduledProcedureStepStartTime="0800-1200") == [
        "a",
        "c",
    ]
    # a time without a date: the time of day, any day
    assert find(ScheduledProcedureStepStartTime="0800") == ["a", "d"]
    assert find(Modality="MR") == ["c"]
    assert find(Modality="CT", ScheduledStationAETitle="MR1") == []
    assert find(PatientName="doe*") == ["c", "b"]  # case-insensitive, as QIDO and UPS-RS match PN
    assert find(PatientName="Müller^Hans") == ["a"]
    assert find(PatientID="PAT-D") == ["d"]
    assert find(AccessionNumber="ACC-B") == ["b"]
    assert find(AccessionNumber="ACC-E") == []  # COMPLETED
    assert find(ScheduledProcedureStepID=derived_sps_id(uids["c"])) == ["c"]
    both_ids = "\\".join(derived_sps_id(uids[n]) for n in ("d", "a"))
    assert find(ScheduledProcedureStepID=both_ids) == ["a", "d"]  # a list: any of them
    assert find(ScheduledProcedureStepID=derived_sps_id(uids["b"])[:5] + "*") == ["b"]
    lowered = derived_sps_id(uids["b"]).lower()
    if lowered != derived_sps_id(uids["b"]):  # hex digits only: nothing to lower, then
        assert find(ScheduledProcedureStepID=lowered) == []  # SH: case counts
    assert find(ScheduledProcedureStepID=uids["c"]) == []  # the UID is not the ID (64 characters: no SH)
    assert find(ScheduledProcedureStepID="42") == []
    assert find(ScheduledProcedureStepStatus="STARTED") == []


async def test_worklist_response_carries_the_requested_keys(open_dimse_archive: DimseArchive) -> None:
    uids = await load_worklist(open_dimse_archive)
    results, final = c_find(open_dimse_archive, mwl_query(AccessionNumber="ACC-A"))
    assert final == 0
    (r,) = results
    assert r.SpecificCharacterSet == "ISO_IR 192"  # the name is not ASCII
    assert str(r.PatientName) == "Müller^Hans"
    assert (r.PatientID, r.IssuerOfPatientID, r.PatientBirthDate, r.PatientSex) == (
        "PAT-A",
        "HOSP",
        "19700101",
        "F",
    )
    assert (r.AccessionNumber, r.RequestedProcedureID) == ("ACC-A", "RP-A")
    assert r.RequestedProcedureDescription == "Requested CT chest"
    assert r.StudyInstanceUID == f"1.2.826.0.1.3680043.10.999.{ord('a')}"
    assert "ReferringPhysicianName" in r and r.ReferringPhysicianName == ""  # requested, no counterpart
    assert "RequestedProcedureCodeSequence" not in r  # not requested, not returned
    sps = r.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledStationAETitle == "CT1"
    assert (sps.ScheduledProcedureStepStartDate, sps.ScheduledProcedureStepStartTime) == (
        "20261123",
        "080000",
    )
    assert sps.Modality == "CT"
    assert sps.ScheduledProcedureStepDescription == "CT chest"
    assert sps.ScheduledProcedureStepID == derived_sps_id(uids["a"])  # 16 characters: an SH
    assert sps.ScheduledPerformingPhysicianName == ""
    assert set(sps.keys()) == set(mwl_query().ScheduledProcedureStepSequence[0].keys())

    # a zero-length SPS sequence is universal: every SPS attribute of the mapping comes back
    query = Dataset()
    query.PatientID = "PAT-C"
    query.RequestedProcedureCodeSequence = []
    query.ScheduledProcedureStepSequence = []
    (r,), final = c_find(open_dimse_archive, query)
    assert final == 0
    assert r.RequestedProcedureCodeSequence[0].CodeValue == "P-c"
    sps = r.ScheduledProcedureStepSequence[0]
    assert (sps.ScheduledStationAETitle, sps.ScheduledStationName, sps.Modality) == (
        "MR1",
        "Station MR1",
        "MR",
    )
    assert sps.ScheduledProcedureStepStatus == "SCHEDULED"
    assert sps.ScheduledProtocolCodeSequence[0].CodeValue == "AI-TRIAGE"
    assert "SpecificCharacterSet" not in r  # ASCII only, and not requested


async def test_unsupported_matching_key_gives_ff01_and_bad_values_a900(
    open_dimse_archive: DimseArchive,
) -> None:
    await load_worklist(open_dimse_archive)
    query = mwl_query(ScheduledStationAETitle="MR1")
    query.ReferringPhysicianName = "Smith"  # no UPS counterpart: not matched, the responses say so
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(*open_dimse_archive.address, ae_title=ARCHIVE_AE)
    statuses = [s.Status for s, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)]
    assert statuses == [0xFF01, 0]
    bad = mwl_query(ScheduledProcedureStepStartDate="2026-11-23x")
    responses = list(assoc.send_c_find(bad, ModalityWorklistInformationFind))
    assoc.release()
    assert [s.Status for s, _ in responses] == [0xA900]
    assert "ScheduledProcedureStepStartDateTime" in responses[0][0].ErrorComment


async def test_a_start_time_alone_that_is_no_time_is_a900(open_dimse_archive: DimseArchive) -> None:
    """A Start Time without a date is checked as a time is with one (and as a date is): hour 25, minute 61,
    a range that ends before it starts and a range with no end are 0xA900. They matched nothing (0x0000)
    or, for "-", everything."""
    await load_worklist(open_dimse_archive)
    for value in ("25", "2500", "1261", "0800-0700", "-"):
        responses = _one_find(open_dimse_archive, mwl_query(ScheduledProcedureStepStartTime=value))
        assert [int(s.Status) for s, _ in responses] == [0xA900], value
        assert str(responses[0][0].ErrorComment).startswith("ScheduledProcedureStepStartTime "), value
    results, final = c_find(open_dimse_archive, mwl_query(ScheduledProcedureStepStartTime="0700-0900"))
    assert final == 0
    assert [r.PatientID for r in results] == ["PAT-A", "PAT-C", "PAT-D"]


async def test_undecodable_identifier_is_c000(open_dimse_archive: DimseArchive) -> None:
    """An identifier pydicom cannot decode (the Scheduled Procedure Step Sequence sent as an LO value) is
    0xC000 (unable to process), as the Q/R C-FIND answers it; it was 0xA700, out of resources."""
    await load_worklist(open_dimse_archive)
    query = Dataset()
    query.PatientName = ""
    query.add_new(0x00400100, "LO", "x")
    responses = [
        (status.Status, status.get("ErrorComment")) for status, _ in _one_find(open_dimse_archive, query)
    ]
    assert len(responses) == 1, responses
    assert responses[0][0] == 0xC000
    assert responses[0][1].startswith("identifier cannot be decoded: ")


def _one_find(archive: DimseArchive, query: Dataset) -> list[tuple[Dataset, Dataset | None]]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(*archive.address, ae_title=ARCHIVE_AE)
    try:
        return list(assoc.send_c_find(query, ModalityWorklistInformationFind))
    finally:
        assoc.release()


async def test_worklist_refused_without_the_service_and_audited(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("STORER", services=["store"])
    await dimse_archive.register("MODALITY", services=["worklist"])
    assert c_find(dimse_archive, mwl_query(), "STORER") == ([], 0x0124)
    assert c_find(dimse_archive, mwl_query(), "MODALITY") == ([], 0)
    conn = await asyncpg.connect(dimse_archive.http.database_url)
    try:
        for _ in range(50):
            rows = await conn.fetch("SELECT * FROM audit_event WHERE path = 'C-FIND' ORDER BY event_id")
            if len(rows) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert [(r["subject"], r["status"]) for r in rows] == [("ae:STORER", 0x0124), ("ae:MODALITY", 0)]
    assert rows[1]["detail"] == "worklist: 0 matches"


async def test_cancel_stops_the_responses(open_dimse_archive: DimseArchive) -> None:
    async with httpx.AsyncClient(base_url=open_dimse_archive.http.url, timeout=30) as client:

        async def create(n: int) -> None:
            start = f"2026112{3 + n // 100}{n % 100 // 60:02d}{n % 60:02d}00"
            body = orjson.dumps(workitem(station="CT9", start=start))
            response = await client.post(f"/workitems?{new_uid()}", content=body, headers=JSON)
            assert response.status_code == 201, response.text

        for first in range(0, 300, 50):
            await asyncio.gather(*(create(n) for n in range(first, first + 50)))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(*open_dimse_archive.address, ae_title=ARCHIVE_AE)
    statuses = []
    for status, _ in assoc.send_c_find(mwl_query(), ModalityWorklistInformationFind, msg_id=7):
        statuses.append(status.Status)
        if len(statuses) == 1:
            assoc.send_c_cancel(7, query_model=ModalityWorklistInformationFind)
    assoc.release()
    assert statuses[0] == 0xFF00
    assert statuses[-1] == 0xFE00
    assert len(statuses) < 300  # the cancel came before the last of the 300 matches


def test_start_filter_combines_date_and_time() -> None:
    assert start_filter("", "") == (None, None)
    assert start_filter("20261123", "") == ("20261123", None)
    assert start_filter("20261123-20261125", "") == ("20261123-20261125", None)
    assert start_filter("20261123", "0930") == ("202611230930", None)
    assert start_filter("20261123", "0930-1200") == ("202611230930-202611231200", None)
    assert start_filter("-20261123", "-1200") == ("-202611231200", None)
    assert start_filter("20261123-", "0930-") == ("202611230930-", None)
    assert start_filter("", "09:30-12:00") == (None, ("0930", "1200"))
    assert start_filter("*", "*") == (None, None)
    assert start_filter("20261123", "*") == ("20261123", None)


async def test_dcmtk_findscu_gets_the_same_items(open_dimse_archive: DimseArchive, tmp_path: Path) -> None:
    uids = await load_worklist(open_dimse_archive)
    out = tmp_path / "findscu"
    out.mkdir()
    host, port = open_dimse_archive.address
    keys = [
        "PatientName", "PatientID", "AccessionNumber",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT1",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261123-20261124",
        "ScheduledProcedureStepSequence[0].Modality=CT",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    ]  # fmt: skip
    args = ["findscu", "-W", "-aet", "MODALITY", "-aec", ARCHIVE_AE, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    proc = await asyncio.to_thread(
        subprocess.run, [*args, host, str(port)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    results = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert [r.AccessionNumber for r in results] == ["ACC-A", "ACC-B", "ACC-D"]
    assert sps_ids(results) == [derived_sps_id(uids[n]) for n in ("a", "b", "d")]
    same, final = c_find(
        open_dimse_archive,
        mwl_query(
            ScheduledStationAETitle="CT1", ScheduledProcedureStepStartDate="20261123-20261124", Modality="CT"
        ),
    )
    assert final == 0
    assert sps_ids(same) == sps_ids(results)
    assert [r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime for r in results] == [
        "080000", "140000", "080000",
    ]  # fmt: skip


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


async def test_each_ae_sees_the_worklist_of_its_partition(dimse_archive: DimseArchive) -> None:
    """Work items written straight through the worklist package (HTTP needs tokens here) into two
    partitions; an AE queries its own."""
    from indexer.lookup import partition_key
    from worklist import store
    from worklist.validate import prepare_create

    await dimse_archive.register("CT-EAST", services=["worklist"], partition="east")
    await dimse_archive.register("CT-WEST", services=["worklist"], partition="west")
    assert c_find(dimse_archive, mwl_query(), "CT-EAST") == ([], 0)  # no partition yet: an empty worklist
    pool = await asyncpg.create_pool(dimse_archive.http.database_url, min_size=1, max_size=2)
    try:
        created = {}
        for partition, name in (("east", "a"), ("west", "b"), ("west", "c")):
            key = await partition_key(pool, partition, create=True)
            uid, attrs, _ = prepare_create(item_body(name), new_uid())
            await store.create(pool, key, uid, attrs)
            created[derived_sps_id(uid)] = name
    finally:
        await pool.close()
    east, final = c_find(dimse_archive, mwl_query(), "CT-EAST")
    assert final == 0
    assert [created[u] for u in sps_ids(east)] == ["a"]
    west, _ = c_find(dimse_archive, mwl_query(), "CT-WEST")
    assert [created[u] for u in sps_ids(west)] == ["c", "b"]


@given(
    uid=st.from_regex(r"[12](\.[1-9][0-9]{0,8}){2,6}", fullmatch=True),
    own=st.text(alphabet="ABC-0123456789 ", max_size=24),
)
def test_every_sps_id_is_an_sh_and_matches_itself(uid: str, own: str) -> None:
    item = Dataset()
    item.SOPInstanceUID = uid
    if own:
        item.ScheduledProcedureStepID = own
    ident = sps_id(item)
    assert 0 < len(ident) <= 16
    kept = own.strip()
    assert ident == (kept if kept and len(kept) <= 16 else derived_sps_id(uid))
    assert sps_id_matches(item, [ident]) and sps_id_matches(item, ["*"])
    assert sps_id_matches(item, ["nothing", ident[:1] + "*"])
    assert not sps_id_matches(item, [ident + "?"])
