"""The HL7 v2 front door end to end: real HL7 v2.3.1-2.5.1 messages (tests/data/hl7) over a real MLLP
socket into a running archive, and what they change: work items in UPS-RS and the DIMSE Modality
Worklist, bulk update operations, the message log, the audit log."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomweb.cli import main
from hl7.message import Delimiters, unescape
from tests.fixtures.dimse import DimseArchive, free_port, start_dimse_archive
from tests.mllp_client import MllpClient, ack_fields
from tests.test_dimse_mwl import c_find, mwl_query

DATA = Path(__file__).parent / "data" / "hl7"


def message(name: str) -> bytes:
    return (DATA / name).read_bytes()


class Hl7Archive:
    def __init__(self, dimse: DimseArchive, port: int) -> None:
        self.dimse = dimse
        self.http = dimse.http
        self.port = port

    def send(self, raw: bytes) -> dict[str, list[str]]:
        with MllpClient(self.port) as client:
            return ack_fields(client.send(raw))

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.http.database_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


@pytest.fixture
def hl7_archive(database_url: str, tmp_path: Path) -> Iterator[Hl7Archive]:
    """An archive (access control open) with DIMSE and an MLLP listener on free ports."""
    port = free_port()
    thread, archive = start_dimse_archive(database_url, tmp_path, insecure_open=True, hl7_port=port)
    try:
        yield Hl7Archive(archive, port)
    finally:
        thread.stop()


def reason(ack: dict[str, list[str]]) -> str:
    """ERR-8, the reason for people, unescaped."""
    return unescape(ack["ERR"][8], Delimiters())


def retrieve(archive: Hl7Archive, uid: str) -> dict:
    response = httpx.get(f"{archive.http.url}/workitems/{uid}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()[0]


def workitems(archive: Hl7Archive, **query: str) -> list[dict]:
    response = httpx.get(f"{archive.http.url}/workitems", params=query, timeout=30)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else []


def value(item: dict, *path: str) -> object:
    node: object = item
    for key in path:
        assert isinstance(node, dict)
        element = node[key]
        values = element.get("Value", [])
        node = values[0] if values else None
    return node


# --- orders: ORM^O01 / OMI^O23 -> UPS work items -> Modality Worklist -------------------------------------


async def test_an_order_is_a_scheduled_work_item_in_ups_rs_and_the_modality_worklist(
    hl7_archive: Hl7Archive,
) -> None:
    ack = hl7_archive.send(message("orm_o01_new_v231.hl7"))
    assert ack["MSA"][1:3] == ["AA", "ORM00000001"]
    assert ack["MSH"][3:7] == ["DICOMWEB", "RADIOLOGY", "HIS", "STJOHNS"]  # answered to the sender
    assert ack["MSH"][9] == "ACK^O01^ACK" and ack["MSH"][12] == "2.3.1"
    assert "ERR" not in ack

    (item,) = workitems(hl7_archive, **{"ReferencedRequestSequence.AccessionNumber": "ACC-1001"})
    assert value(item, "00741000") == "SCHEDULED"
    assert value(item, "00100010") == {"Alphabetic": "Doe^John^^Mr."}
    assert (value(item, "00100020"), value(item, "00100021")) == ("PAT-ORD-1", "STJOHNS")
    assert value(item, "00404005") == "20261208093000"
    assert value(item, "00741200") == "MEDIUM"  # R (routine)
    assert value(item, "00741204") == "CT chest with contrast"
    assert value(item, "00380010") == "V0042"
    assert value(item, "0040A370", "00402016") == "ORD-1001"
    assert value(item, "0040A370", "00402017") == "ACC-1001"
    assert value(item, "0040A370", "00321064", "00080100") == "CTCHEST"

    # the same order through DIMSE: a modality's MWL C-FIND for its station and today's schedule
    results, status = c_find(
        hl7_archive.dimse,
        mwl_query(ScheduledStationAETitle="CT01", ScheduledProcedureStepStartDate="20261208"),
    )
    assert status == 0
    (entry,) = results
    assert str(entry.PatientName) == "Doe^John^^Mr."
    assert (entry.PatientID, entry.IssuerOfPatientID, entry.PatientBirthDate, entry.PatientSex) == (
        "PAT-ORD-1",
        "STJOHNS",
        "19650312",
        "M",
    )
    assert (entry.AccessionNumber, entry.RequestedProcedureID) == ("ACC-1001", "RP-1001")
    assert entry.RequestedProcedureDescription == "CT chest with contrast"
    assert entry.StudyInstanceUID == "1.2.826.0.1.3680043.10.1001.1"  # ZDS-1
    sps = entry.ScheduledProcedureStepSequence[0]
    assert (sps.ScheduledStationAETitle, sps.Modality) == ("CT01", "CT")
    start = (sps.ScheduledProcedureStepStartDate, sps.ScheduledProcedureStepStartTime)
    assert start == ("20261208", "093000")
    assert sps.ScheduledProcedureStepDescription == "CT chest with contrast"
    assert sps.ScheduledProcedureStepID == "SPS-1001"  # the order's own (OBR-20), kept on the work item

    # the interface engine sends it again (its ACK was lost): the same work item, no second one
    again = hl7_archive.send(message("orm_o01_new_v231.hl7"))
    assert again["MSA"][1] == "AA" and "already scheduled" in again["MSA"][3]
    assert len(workitems(hl7_archive, **{"ReferencedRequestSequence.AccessionNumber": "ACC-1001"})) == 1


async def test_a_canceled_order_cancels_its_work_item(hl7_archive: Hl7Archive) -> None:
    assert hl7_archive.send(message("orm_o01_new_v231.hl7"))["MSA"][1] == "AA"
    (item,) = workitems(hl7_archive, **{"ReferencedRequestSequence.AccessionNumber": "ACC-1001"})
    uid = value(item, "00080018")

    ack = hl7_archive.send(message("orm_o01_cancel_v231.hl7"))
    assert ack["MSA"][1:3] == ["AA", "ORM00000002"]
    canceled = retrieve(hl7_archive, str(uid))
    assert value(canceled, "00741000") == "CANCELED"
    assert value(canceled, "00741002", "00741238") == "Patient request"  # ORC-16, the reason
    results, status = c_find(hl7_archive.dimse, mwl_query(AccessionNumber="ACC-1001"))
    assert (results, status) == ([], 0)  # gone from the modality's worklist
    again = hl7_archive.send(message("orm_o01_cancel_v231.hl7"))  # sent twice: nothing more to do
    assert again["MSA"][1] == "AA" and again["MSA"][3] == "already canceled: 1"


async def test_a_cancel_of_an_unknown_order_is_an_error_that_changes_nothing(hl7_archive: Hl7Archive) -> None:
    ack = hl7_archive.send(message("orm_o01_cancel_v231.hl7"))
    assert ack["MSA"][1:3] == ["AE", "ORM00000002"]
    assert ack["ERR"][3].startswith("204^Unknown key identifier^HL70357")
    assert ack["ERR"][2] == "ORC^1^2"
    assert "ORD-1001" in reason(ack)
    assert workitems(hl7_archive) == []
    rows = await hl7_archive.fetch("SELECT ack_code, error_code, control_id, message_type FROM hl7_message")
    assert [tuple(r) for r in rows] == [("AE", 204, "ORM00000002", "ORM^O01")]


async def test_an_omi_order_with_its_imaging_procedure_control_segment(hl7_archive: Hl7Archive) -> None:
    ack = hl7_archive.send(message("omi_o23_v251.hl7"))
    assert ack["MSA"][1] == "AA" and ack["MSH"][18] == "UNICODE UTF-8"
    (item,) = workitems(hl7_archive, **{"ScheduledStationNameCodeSequence.CodeValue": "MR01"})
    assert value(item, "00100010") == {"Alphabetic": "Øster^Åse^^Ms."}
    assert value(item, "00741200") == "HIGH"  # TQ1-9 S (stat)
    assert value(item, "00404005") == "20261209141500"  # TQ1-7
    assert value(item, "00404025", "00080104") == "MR1 Station"  # IPC-7
    assert value(item, "00404027", "00080100") == "MRI Suite 1"  # IPC-8
    assert value(item, "00404018", "00080100") == "BRAIN-STD"  # IPC-6, the protocol
    assert value(item, "0040A370", "0020000D") == "1.2.826.0.1.3680043.10.2001.1"  # IPC-3
    assert value(item, "0040A370", "00401001") == "RP-2001"
    assert value(item, "0040A370", "00401002") == "Headache"  # OBR-31
    results, status = c_find(hl7_archive.dimse, mwl_query(Modality="MR", PatientName="øster*"))
    assert status == 0 and [r.AccessionNumber for r in results] == ["ACC-2001"]


# --- ADT -> bulk update operations --------------------------------------------------------------------------


def store_studies(archive: Hl7Archive, patient_id: str, count: int, seed: int, issuer: str = "") -> list[str]:
    rng = random.Random(seed)
    uids, files = [], []
    for _ in range(count):
        spec = make_study(rng, series_count=1, modalities=["CT"])
        spec.patient_id = patient_id
        ds = make_instance(spec, 0, 1, rows=8, columns=8, rng=rng)
        if issuer:
            ds.IssuerOfPatientID = issuer
        files.append(to_bytes(ds))
        uids.append(spec.study_uid)
    body, content_type = multipart_body(files)
    response = httpx.post(
        f"{archive.http.url}/studies", content=body, headers={"Content-Type": content_type}, timeout=60
    )
    assert response.status_code == 200, response.text
    return uids


async def operations(archive: Hl7Archive) -> list[asyncpg.Record]:
    return await archive.fetch("SELECT * FROM operation WHERE type = 'update' ORDER BY created_at")


async def test_a08_queues_a_bulk_update_of_the_patients_studies(hl7_archive: Hl7Archive) -> None:
    mine = store_studies(hl7_archive, "PAT-HL7-1", 10, seed=1)
    store_studies(hl7_archive, "PAT-OTHER", 2, seed=2)
    other_issuer = store_studies(hl7_archive, "PAT-HL7-1", 1, seed=3, issuer="ELSEWHERE")

    ack = hl7_archive.send(message("adt_a08_v25.hl7"))
    assert ack["MSA"][1:3] == ["AA", "ADT00000001"]
    assert "10 studies" in ack["MSA"][3]
    (op,) = await operations(hl7_archive)
    # the bulk update contract: exactly these parameters; the patient's studies, not the other patient's nor
    # those of the same ID from another issuer
    params = orjson.loads(op["params"])
    assert sorted(params["studyInstanceUids"]) == sorted(mine)
    assert params == {
        "partition": "Microsoft.Default",
        "studyInstanceUids": params["studyInstanceUids"],
        "changeDataset": {
            # the legal name (XPN-7 L) of the two PID-5 repetitions
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Meier-Schulz^Anna^Maria^Dr."}]},
            "00100030": {"vr": "DA", "Value": ["19801224"]},
            "00100040": {"vr": "CS", "Value": ["F"]},
        },
    }
    assert other_issuer[0] not in params["studyInstanceUids"]
    (row,) = await hl7_archive.fetch("SELECT ack_code, result, peer FROM hl7_message")
    assert row["ack_code"] == "AA" and row["peer"] == "127.0.0.1"
    assert orjson.loads(row["result"]) == {
        "operations": [op["operation_id"].hex],
        "studies": params["studyInstanceUids"],
    }


async def test_a31_in_latin_1_and_a_patient_without_studies(hl7_archive: Hl7Archive) -> None:
    ack = hl7_archive.send(message("adt_a31_v231.hl7"))
    assert ack["MSA"][1] == "AA" and "no studies of patient PAT-HL7-1" in ack["MSA"][3]
    assert await operations(hl7_archive) == []
    store_studies(hl7_archive, "PAT-HL7-1", 1, seed=4)
    assert hl7_archive.send(message("adt_a31_v231.hl7"))["MSA"][1] == "AA"
    (op,) = await operations(hl7_archive)
    change = orjson.loads(op["params"])["changeDataset"]
    assert change["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen^^Prof. Dr."}]}


async def test_hl7_show_prints_a_message_in_its_own_character_set(
    hl7_archive: Hl7Archive, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Latin-1 message (MSH-18 8859/1) was printed as UTF-8: every umlaut a replacement character."""
    assert hl7_archive.send(message("adt_a31_v231.hl7"))["MSA"][1] == "AA"
    (row,) = await hl7_archive.fetch("SELECT message_id FROM hl7_message")
    argv = ["hl7", "show", str(row["message_id"]), "--database-url", hl7_archive.http.database_url]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert "PAT-HL7-1^^^STJOHNS^MR||Müller^Jürgen^^^Prof. Dr.||19550607" in out and "\ufffd" not in out


async def test_a40_moves_the_merged_patients_studies_to_the_surviving_id(hl7_archive: Hl7Archive) -> None:
    merged = store_studies(hl7_archive, "PAT-HL7-OLD", 3, seed=5)
    store_studies(hl7_archive, "PAT-HL7-1", 2, seed=6)  # the survivor's own studies are not touched
    ack = hl7_archive.send(message("adt_a40_v24.hl7"))
    assert ack["MSA"][1:3] == ["AA", "ADT00000003"]
    (op,) = await operations(hl7_archive)
    params = orjson.loads(op["params"])
    assert sorted(params["studyInstanceUids"]) == sorted(merged)
    assert params["changeDataset"]["00100020"] == {"vr": "LO", "Value": ["PAT-HL7-1"]}
    assert params["changeDataset"]["00100021"] == {"vr": "LO", "Value": ["STJOHNS"]}
    name = {"vr": "PN", "Value": [{"Alphabetic": "Meier-Schulz^Anna^Maria"}]}
    assert params["changeDataset"]["00100010"] == name


# --- refusals, the log, replay, audit -----------------------------------------------------------------------


def with_header(raw: bytes, index: int, new: str) -> bytes:
    """The message with MSH-(index + 1) replaced."""
    lines = raw.split(b"\r")
    fields = lines[0].split(b"|")
    fields[index] = new.encode()
    lines[0] = b"|".join(fields)
    return b"\r".join(lines)


@pytest.mark.parametrize(
    ("raw", "code", "error", "why"),
    [
        (with_header(message("adt_a08_v25.hl7"), 8, "ADT^A01"), "AR", "201", "ADT^A01 is not handled"),
        (with_header(message("adt_a08_v25.hl7"), 8, "ORU^R01"), "AR", "200", "message type ORU"),
        (with_header(message("adt_a08_v25.hl7"), 11, "2.1"), "AR", "203", "version '2.1'"),
        (with_header(message("adt_a08_v25.hl7"), 10, "X"), "AR", "202", "processing ID 'X'"),
        (with_header(message("adt_a08_v25.hl7"), 17, "KOI8-R"), "AR", "103", "character set 'KOI8-R'"),
        (message("adt_a08_v25.hl7").replace(b"19801224", b"19801332"), "AE", "102", "PID-7 '19801332'"),
        (message("adt_a08_v25.hl7").replace(b"PAT-HL7-1^^^STJOHNS^MR~987-65-4321^^^SSA^SS", b""), "AE", "101",
         "PID-3"),
        (message("adt_a40_v24.hl7").replace(b"MRG|", b"ZZZ|"), "AE", "100", "no MRG segment"),
        (message("orm_o01_new_v231.hl7").replace(b"ORC|NW|", b"ORC|XO|"), "AE", "103", "order control XO"),
        (b"PID|1||PAT-1\rMSH|^~\\&|HIS", "AR", "100", "does not start with an MSH segment"),
        # a NUL (PostgreSQL text cannot hold one) was AR 207 "could not process", which senders resend
        (with_header(message("adt_a08_v25.hl7"), 2, "EPIC\x00ADT"), "AR", "102", "NUL character"),
        (message("adt_a08_v25.hl7").replace(b"Meier-Schulz", b"Meier\x00Schulz"), "AR", "102",
         "PID segment holds a NUL character"),
        (message("orm_o01_new_v231.hl7").replace(b"Doe^John", b"Do\\X00\\e^John"), "AE", "102",
         "PID-5 holds a NUL character"),
        # the accession number taken from the filler order number (OBR-18, OBR-19 empty): named OBR-18
        (message("orm_o01_new_v231.hl7").replace(b"|ACC-1001|RP-1001|", b"|||")
         .replace(b"ACC-1001^RIS", b"FILLER-NUMBER-0000000001^RIS"), "AE", "102",
         "ORC-3 'FILLER-NUMBER-0000000001' is longer than DICOM SH allows"),
        # MSH-2 with fewer than two characters: building the ACK failed, the connection closed without one
        (with_header(message("adt_a08_v25.hl7"), 1, "^"), "AR", "102", "MSH-2"),
        (with_header(message("adt_a08_v25.hl7"), 1, ""), "AR", "102", "MSH-2"),
    ],
)  # fmt: skip
async def test_a_refused_message_is_answered_kept_and_changes_nothing(
    hl7_archive: Hl7Archive, raw: bytes, code: str, error: str, why: str
) -> None:
    store_studies(hl7_archive, "PAT-HL7-1", 1, seed=7)
    ack = hl7_archive.send(raw)
    assert ack["MSA"][1] == code
    assert ack["ERR"][3].split("^")[0] == error
    assert why in reason(ack), reason(ack)
    assert await operations(hl7_archive) == [] and workitems(hl7_archive) == []
    (row,) = await hl7_archive.fetch("SELECT raw, ack_code, error_code, detail FROM hl7_message")
    assert (bytes(row["raw"]), row["ack_code"], str(row["error_code"])) == (raw, code, error)
    assert why in row["detail"]


async def test_a_failed_message_is_replayed_from_the_log(hl7_archive: Hl7Archive) -> None:
    """The cancel came before the order (the HIS resent them out of order): AE, then replayed once the order
    is there."""
    assert hl7_archive.send(message("orm_o01_cancel_v231.hl7"))["MSA"][1] == "AE"
    assert hl7_archive.send(message("orm_o01_new_v231.hl7"))["MSA"][1] == "AA"
    (failed,) = await hl7_archive.fetch("SELECT message_id FROM hl7_message WHERE ack_code = 'AE'")
    args = ["--database-url", hl7_archive.http.database_url]
    code = await asyncio.to_thread(main, ["hl7", "replay", str(failed["message_id"]), *args])
    assert code == 0
    (item,) = workitems(hl7_archive, **{"ReferencedRequestSequence.AccessionNumber": "ACC-1001"})
    assert value(item, "00741000") == "CANCELED"
    rows = await hl7_archive.fetch("SELECT message_id, ack_code, replay_of, peer FROM hl7_message ORDER BY 1")
    assert [(r["ack_code"], r["replay_of"], r["peer"]) for r in rows] == [
        ("AE", None, "127.0.0.1"),
        ("AA", None, "127.0.0.1"),
        ("AA", failed["message_id"], "replay"),
    ]
    # the replay is audited as the messages were (it was not: a change without an audit record)
    audited = await hl7_archive.fetch(
        "SELECT path, status, client_address FROM audit_event WHERE action = 'hl7' AND client_address = "
        "'replay'"
    )
    assert [tuple(r) for r in audited] == [("ORM^O01", 0, "replay")]
    # the log is append-only: the failed row keeps its outcome
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await hl7_archive.fetch("UPDATE hl7_message SET ack_code = 'AA'")


async def test_every_message_is_audited(hl7_archive: Hl7Archive) -> None:
    hl7_archive.send(message("orm_o01_new_v231.hl7"))
    hl7_archive.send(with_header(message("adt_a08_v25.hl7"), 8, "ADT^A01"))
    for _ in range(50):
        rows = await hl7_archive.fetch(
            "SELECT subject, method, path, status, outcome, client_address FROM audit_event "
            "WHERE action = 'hl7' ORDER BY event_id"
        )
        if len(rows) == 2:
            break
        await asyncio.sleep(0.1)
    assert [tuple(r) for r in rows] == [
        ("hl7:HIS@STJOHNS", "HL7", "ORM^O01", 0, 0, "127.0.0.1"),
        ("hl7:EPICADT@STJOHNS", "HL7", "ADT^A01", 201, 4, "127.0.0.1"),
    ]


async def test_several_messages_on_one_connection_in_order(hl7_archive: Hl7Archive) -> None:
    """An interface engine keeps its connection: each message waits for the ACK of the one before."""
    with MllpClient(hl7_archive.port) as client:
        sent = ["orm_o01_new_v231.hl7", "omi_o23_v251.hl7", "orm_o01_cancel_v231.hl7"]
        acks = [ack_fields(client.send(message(name))) for name in sent]
    assert [a["MSA"][1:3] for a in acks] == [
        ["AA", "ORM00000001"],
        ["AA", "OMI00000001"],
        ["AA", "ORM00000002"],
    ]
    # noise between blocks is skipped, and a block without its <VT> is refused
    with MllpClient(hl7_archive.port) as client:
        noisy = b"\r\n" + b"\x0b" + message("adt_a31_v231.hl7") + b"\x1c\r"
        ack = ack_fields(client.send(noisy, framed=False))
        assert ack["MSA"][1] == "AA"
        refused = ack_fields(client.send(message("adt_a31_v231.hl7") + b"\x1c\r", framed=False))
        assert refused["MSA"][1] == "AR" and "no <VT>" in reason(refused)


def test_a_block_restarted_after_a_stray_start_byte_is_read(hl7_archive: Hl7Archive) -> None:
    """Bytes before a block's last <VT> are noise, a <VT> among them too (a sender that restarted a block
    it had begun): the message was read with the noise in front of it and refused AR 100."""
    with MllpClient(hl7_archive.port, timeout=10) as client:
        restarted = b"\x0bMSH|^~\\&|HIS|ST\r\x0b" + message("adt_a31_v231.hl7") + b"\x1c\r"
        ack = ack_fields(client.send(restarted, framed=False))
        assert ack["MSA"][1:3] == ["AA", "ADT00000002"], ack
        assert ack_fields(client.send(message("adt_a31_v231.hl7")))["MSA"][1] == "AA"


def test_a_block_ended_by_fs_alone_is_answered(hl7_archive: Hl7Archive) -> None:
    """A sender that ends its blocks with <FS> and no <CR> waits for the ACK: the archive waited for the
    <CR>, so both waited until the sender gave up (and sent the message again)."""
    with MllpClient(hl7_archive.port, timeout=10) as client:
        for _ in range(2):
            bare = b"\x0b" + message("adt_a31_v231.hl7") + b"\x1c"
            assert ack_fields(client.send(bare, framed=False))["MSA"][1:3] == ["AA", "ADT00000002"]
        assert ack_fields(client.send(message("adt_a31_v231.hl7")))["MSA"][1] == "AA"  # and framed again
        refused = ack_fields(client.send(message("adt_a31_v231.hl7") + b"\x1c\r", framed=False))
        assert refused["MSA"][1:3] == ["AR", "ADT00000002"] and "no <VT>" in reason(refused)


def test_garbage_over_the_socket_is_refused_kept_and_changes_nothing(hl7_archive: Hl7Archive) -> None:
    """Any block gets exactly one ACK; unless it is AA nothing changes; every block is kept."""
    store_studies(hl7_archive, "PAT-HL7-1", 1, seed=8)

    def counts() -> tuple[int, int, int]:
        async def query() -> tuple[int, int, int]:
            rows = await hl7_archive.fetch(
                "SELECT (SELECT count(*) FROM operation), (SELECT count(*) FROM ups_workitem), "
                "(SELECT count(*) FROM hl7_message)"
            )
            return tuple(rows[0])  # type: ignore[return-value]

        return asyncio.run(query())

    header = "MSH|^~\\&|HIS|HOSP|DICOMWEB|RAD|20261207120000||{kind}|CTRL|P|2.5\r"
    blocks = st.one_of(
        st.binary(max_size=300).filter(lambda b: b"\x1c" not in b),
        st.builds(
            lambda kind, rest: (header.format(kind=kind) + rest).encode(),
            st.sampled_from(["ADT^A08", "ADT^A40", "ORM^O01", "OMI^O23", "ADT^A01", "QRY^Q01", ""]),
            st.text(alphabet=st.sampled_from(list("|^~\\&\r PIDMRGORCOBR0123456789ABC-")), max_size=200),
        ).filter(lambda b: b"\x1c" not in b),
    )
    with MllpClient(hl7_archive.port) as client:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(blocks)
        def check(raw: bytes) -> None:
            before = counts()
            ack = ack_fields(client.send(raw))
            after = counts()
            assert ack["MSA"][1] in ("AA", "AE", "AR")
            assert after[2] == before[2] + 1  # kept
            if ack["MSA"][1] != "AA":
                assert ack["ERR"][3].split("^")[0].isdigit() and reason(ack)
                assert after[:2] == before[:2]  # nothing changed

        check()


async def test_a_sender_outside_the_allowed_hosts_is_refused(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    thread, archive = start_dimse_archive(
        database_url, tmp_path, insecure_open=True, hl7_port=port, hl7_allowed_hosts="10.0.0.0/8, 192.0.2.7"
    )
    try:
        hl7 = Hl7Archive(archive, port)
        with pytest.raises(OSError), MllpClient(port) as client:
            await asyncio.to_thread(client.send, message("orm_o01_new_v231.hl7"))
        assert workitems(hl7) == [] and await hl7.fetch("SELECT 1 FROM hl7_message") == []
        for _ in range(50):
            rows = await hl7.fetch("SELECT path, outcome, detail FROM audit_event WHERE action = 'hl7'")
            if rows:
                break
            await asyncio.sleep(0.1)
        assert [(r["path"], r["outcome"]) for r in rows] == [("connect", 4)]
        assert "127.0.0.1 is not an allowed sender" in rows[0]["detail"]
    finally:
        thread.stop()


# --- end to end with the bulk update: the index and the objects follow the HIS -----------------------------


async def wait_for(check, seconds: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        result = await asyncio.to_thread(check)
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.1)


def qido(archive: Hl7Archive, **query: str) -> list[dict]:
    response = httpx.get(f"{archive.http.url}/studies", params=query, timeout=30)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else []


async def test_a08_end_to_end_qido_shows_the_new_name(hl7_archive: Hl7Archive) -> None:
    mine = store_studies(hl7_archive, "PAT-HL7-1", 10, seed=11)
    assert hl7_archive.send(message("adt_a08_v25.hl7"))["MSA"][1] == "AA"

    def renamed() -> bool:
        found = qido(hl7_archive, PatientID="PAT-HL7-1", includefield="PatientBirthDate,PatientSex")
        return len(found) == 10 and all(
            value(s, "00100010") == {"Alphabetic": "Meier-Schulz^Anna^Maria^Dr."} for s in found
        )

    assert await wait_for(renamed)
    found = qido(hl7_archive, PatientName="meier-schulz*", includefield="PatientBirthDate,PatientSex")
    assert sorted(value(s, "0020000D") for s in found) == sorted(mine)
    assert {(value(s, "00100030"), value(s, "00100040")) for s in found} == {("19801224", "F")}
    (op,) = await operations(hl7_archive)
    assert op["status"] == "succeeded"
    # the objects are rewritten too: WADO-RS metadata carries the new name
    response = await asyncio.to_thread(
        httpx.get, f"{hl7_archive.http.url}/studies/{mine[0]}/metadata", timeout=30
    )
    assert value(response.json()[0], "00100010") == {"Alphabetic": "Meier-Schulz^Anna^Maria^Dr."}


async def test_a40_end_to_end_studies_under_the_surviving_patient_id(hl7_archive: Hl7Archive) -> None:
    merged = store_studies(hl7_archive, "PAT-HL7-OLD", 3, seed=12)
    own = store_studies(hl7_archive, "PAT-HL7-1", 2, seed=13)
    assert hl7_archive.send(message("adt_a40_v24.hl7"))["MSA"][1] == "AA"

    def moved() -> bool:
        return (
            not qido(hl7_archive, PatientID="PAT-HL7-OLD")
            and len(qido(hl7_archive, PatientID="PAT-HL7-1")) == 5
        )

    assert await wait_for(moved)
    found = qido(hl7_archive, PatientID="PAT-HL7-1")
    assert sorted(value(s, "0020000D") for s in found) == sorted(merged + own)
    for uid in merged:  # the objects carry the survivor's ID and issuer
        response = await asyncio.to_thread(
            httpx.get, f"{hl7_archive.http.url}/studies/{uid}/metadata", timeout=30
        )
        (instance,) = response.json()
        assert (value(instance, "00100020"), value(instance, "00100021")) == ("PAT-HL7-1", "STJOHNS")


async def test_an_order_with_two_procedure_steps_and_its_cancel(hl7_archive: Hl7Archive) -> None:
    """Two ORC/OBR groups of one placer order, without OBR-20 (step IDs): two work items; one cancel of the
    order cancels both."""
    lines = message("orm_o01_new_v231.hl7").decode().replace("|SPS-1001|", "||").split("\r")
    orc, obr = lines[3], lines[4]
    second = obr.replace("CTCHEST^CT chest with contrast^L", "CTABD^CT abdomen^L").replace("OBR|1|", "OBR|2|")
    raw = "\r".join([*lines[:5], orc, second, *lines[5:]]).encode()
    ack = hl7_archive.send(raw)
    assert ack["MSA"][1] == "AA" and ack["MSA"][3] == "work items created: 2"
    items = workitems(hl7_archive, **{"ReferencedRequestSequence.AccessionNumber": "ACC-1001"})
    assert sorted(str(value(i, "00741204")) for i in items) == ["CT abdomen", "CT chest with contrast"]
    assert hl7_archive.send(raw)["MSA"][3] == "already scheduled (sent before): 2"
    assert hl7_archive.send(message("orm_o01_cancel_v231.hl7"))["MSA"][3] == "work items canceled: 2"
    states = {value(retrieve(hl7_archive, str(value(i, "00080018"))), "00741000") for i in items}
    assert states == {"CANCELED"}
