"""UPS-RS over real HTTP: a work item's life as a scheduler, a modality and an AI worker drive it."""

from __future__ import annotations

import asyncio
import copy

import httpx
import orjson
import pytest

from dicomcore.uids import new_uid
from tests.fixtures.server import RunningArchive
from tests.worklist_data import code, performed, ups_archive, workitem

JSON = {"Content-Type": "application/dicom+json"}


__all__ = ["ups_archive"]  # the fixture, imported


@pytest.fixture
async def client(ups_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=ups_archive.url, timeout=30) as c:
        yield c


async def create(client: httpx.AsyncClient, ds: dict, uid: str | None = None) -> str:
    uid = uid or new_uid()
    response = await client.post(f"/workitems?{uid}", content=orjson.dumps([ds]), headers=JSON)
    assert response.status_code == 201, response.text
    return uid


def state_body(state: str, tuid: str | None) -> bytes:
    ds: dict = {"00741000": {"vr": "CS", "Value": [state]}}
    if tuid is not None:
        ds["00081195"] = {"vr": "UI", "Value": [tuid]}
    return orjson.dumps([ds])


async def put_state(client: httpx.AsyncClient, uid: str, state: str, tuid: str | None) -> httpx.Response:
    return await client.put(f"/workitems/{uid}/state", content=state_body(state, tuid), headers=JSON)


async def get(client: httpx.AsyncClient, uid: str) -> dict:
    response = await client.get(f"/workitems/{uid}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    items = response.json()
    assert len(items) == 1
    return items[0]


async def test_full_life_cycle(client: httpx.AsyncClient, ups_archive: RunningArchive) -> None:
    # the scheduler creates it; the UID comes in the query
    uid = new_uid()
    response = await client.post(f"/workitems?{uid}", content=orjson.dumps([workitem()]), headers=JSON)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"{ups_archive.url}/workitems/{uid}"
    assert "warning" not in response.headers
    item = await get(client, uid)
    assert item["00741000"]["Value"] == ["SCHEDULED"]
    assert item["00080018"]["Value"] == [uid]
    assert item["00080016"]["Value"] == ["1.2.840.10008.5.1.4.34.6.1"]
    assert item["00741202"]["Value"] == ["DICOMWEB"]  # Worklist Label filled in by the archive
    assert "00081195" not in item

    # the same UID again: 409, the stored one unchanged
    again = await client.post(f"/workitems?{uid}", content=orjson.dumps([workitem(label="x")]), headers=JSON)
    assert again.status_code == 409
    assert (await get(client, uid))["00741204"]["Value"] == ["CT chest AI triage"]

    # the AI worker finds it among SCHEDULED items of its station
    response = await client.get(
        "/workitems",
        params={"ProcedureStepState": "SCHEDULED", "ScheduledStationNameCodeSequence.CodeValue": "CT1"},
    )
    assert response.status_code == 200
    assert [i["00080018"]["Value"][0] for i in response.json()] == [uid]

    # claims it with its own Transaction UID
    tuid = new_uid()
    response = await put_state(client, uid, "IN PROGRESS", tuid)
    assert response.status_code == 200, response.text
    item = await get(client, uid)
    assert item["00741000"]["Value"] == ["IN PROGRESS"]
    assert "00081195" not in item  # the lock is never handed out

    # updates progress; without the Transaction UID the update is refused and changes nothing
    progress = {"00741002": {"vr": "SQ", "Value": [{"00741004": {"vr": "DS", "Value": [50]}}]}}
    response = await client.post(f"/workitems/{uid}", content=orjson.dumps([progress]), headers=JSON)
    assert response.status_code == 409
    assert "claimed Workitem" in response.headers["warning"]
    assert "00741002" not in await get(client, uid)
    response = await client.post(f"/workitems/{uid}?{tuid}", content=orjson.dumps([progress]), headers=JSON)
    assert response.status_code == 200, response.text
    assert (await get(client, uid))["00741002"] == progress["00741002"]

    # completing before the final state requirements are met: 409 naming what is missing
    response = await put_state(client, uid, "COMPLETED", tuid)
    assert response.status_code == 409
    assert response.json()["error"]["message"].endswith(
        "missing: UnifiedProcedureStepPerformedProcedureSequence (0074,1216)"
    )
    assert (await get(client, uid))["00741000"]["Value"] == ["IN PROGRESS"]

    response = await client.post(
        f"/workitems/{uid}?{tuid}", content=orjson.dumps([performed()]), headers=JSON
    )
    assert response.status_code == 200, response.text
    response = await put_state(client, uid, "COMPLETED", tuid)
    assert response.status_code == 200, response.text
    item = await get(client, uid)
    assert item["00741000"]["Value"] == ["COMPLETED"]

    # completing again: success with the PS3.18 warning; updates and cancel: refused, nothing changed
    response = await put_state(client, uid, "COMPLETED", tuid)
    assert response.status_code == 200
    assert "already in the requested state of COMPLETED" in response.headers["warning"]
    response = await client.post(f"/workitems/{uid}?{tuid}", content=orjson.dumps([progress]), headers=JSON)
    assert response.status_code == 409
    response = await put_state(client, uid, "CANCELED", tuid)
    assert response.status_code == 409
    response = await client.post(f"/workitems/{uid}/cancelrequest")
    assert response.status_code == 409
    assert await get(client, uid) == item

    # no DICOMweb study search ever shows a work item
    response = await client.get("/studies")
    assert response.status_code == 200 and response.json() == []


async def test_modality_cancels_scheduled_and_in_progress(client: httpx.AsyncClient) -> None:
    scheduled = await create(client, workitem())
    reason = {"00741238": {"vr": "LT", "Value": ["patient left"]}}
    response = await client.post(
        f"/workitems/{scheduled}/cancelrequest", content=orjson.dumps([reason]), headers=JSON
    )
    assert response.status_code == 202
    item = await get(client, scheduled)
    assert item["00741000"]["Value"] == ["CANCELED"]
    assert item["00741002"]["Value"][0]["00741238"]["Value"] == ["patient left"]
    response = await client.post(f"/workitems/{scheduled}/cancelrequest")
    assert response.status_code == 202
    assert "already in the requested state of CANCELED" in response.headers["warning"]

    claimed = await create(client, workitem())
    tuid = new_uid()
    assert (await put_state(client, claimed, "IN PROGRESS", tuid)).status_code == 200
    response = await client.post(f"/workitems/{claimed}/cancelrequest")
    assert response.status_code == 202  # the owner decides; the state stays
    assert (await get(client, claimed))["00741000"]["Value"] == ["IN PROGRESS"]
    # the owner cancels: CANCELED needs only the R attributes, which a created item has
    assert (await put_state(client, claimed, "CANCELED", tuid)).status_code == 200
    assert (await get(client, claimed))["00741000"]["Value"] == ["CANCELED"]
    response = await put_state(client, claimed, "CANCELED", tuid)
    assert response.status_code == 200 and "CANCELED" in response.headers["warning"]


async def test_two_workers_race_to_claim(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        uid = await create(client, workitem())
        responses = await asyncio.gather(
            put_state(client, uid, "IN PROGRESS", new_uid()), put_state(client, uid, "IN PROGRESS", new_uid())
        )
        assert sorted(r.status_code for r in responses) == [200, 409]
        loser = next(r for r in responses if r.status_code == 409)
        assert loser.headers["warning"].startswith('299 dicomweb "The Transaction UID is incorrect.')


async def test_uid_from_dataset_or_generated(client: httpx.AsyncClient, ups_archive: RunningArchive) -> None:
    ds = workitem()
    uid = new_uid()
    ds["00080018"] = {"vr": "UI", "Value": [uid]}
    response = await client.post("/workitems", content=orjson.dumps(ds), headers=JSON)
    assert response.status_code == 201
    assert response.headers["location"].endswith(f"/workitems/{uid}")
    response = await client.post("/workitems", content=orjson.dumps([workitem()]), headers=JSON)
    assert response.status_code == 201
    generated = response.headers["location"].rsplit("/", 1)[1]
    assert generated.startswith("2.25.")
    assert (await get(client, generated))["00080018"]["Value"] == [generated]
    # a different UID in the query and the data set: 400
    response = await client.post(f"/workitems?{new_uid()}", content=orjson.dumps(ds), headers=JSON)
    assert response.status_code == 400


BAD_CREATES = [
    ("not json", b"{", "not JSON"),
    ("two data sets", orjson.dumps([workitem(), workitem()]), "exactly one"),
    ("bad key", orjson.dumps({"0074100": {"vr": "CS"}}), "not an attribute tag"),
    ("wrong vr", orjson.dumps({**workitem(), "00741000": {"vr": "LO", "Value": ["SCHEDULED"]}}), "VR LO"),
    (
        "missing label",
        orjson.dumps({k: v for k, v in workitem().items() if k != "00741204"}),
        "ProcedureStepLabel (0074,1204) is required",
    ),
    (
        "missing type 2",
        orjson.dumps({k: v for k, v in workitem().items() if k != "00100030"}),
        "PatientBirthDate (0010,0030) is required",
    ),
    (
        "not scheduled",
        orjson.dumps({**workitem(), "00741000": {"vr": "CS", "Value": ["IN PROGRESS"]}}),
        "SCHEDULED",
    ),
    ("bad priority", orjson.dumps({**workitem(), "00741200": {"vr": "CS", "Value": ["URGENT"]}}), "URGENT"),
    (
        "bad date-time",
        orjson.dumps({**workitem(), "00404005": {"vr": "DT", "Value": ["tomorrow"]}}),
        "date-time",
    ),
    ("owned", orjson.dumps({**workitem(), "00081195": {"vr": "UI", "Value": ["1.2.3"]}}), "TransactionUID"),
    ("bad code", orjson.dumps({**workitem(), "00404025": {"vr": "SQ", "Value": [{}]}}), "Code Value"),
    ("bulk", orjson.dumps({**workitem(), "00420011": {"vr": "OB", "BulkDataURI": "http://x"}}), "bulk data"),
    # a NUL, which PostgreSQL text and jsonb cannot hold, was a 500
    ("NUL", orjson.dumps({**workitem(), "00741204": {"vr": "LO", "Value": ["a\x00b"]}}), "NUL character"),
    (
        "NUL in a name",
        orjson.dumps({**workitem(), "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe\x00"}]}}),
        "NUL character",
    ),
    ("NUL in a number", orjson.dumps({**workitem(), "00101020": {"vr": "DS", "Value": ["1\x00"]}}), "NUL"),
    # longer than the VR allows: stored, and handed to modalities in the Modality Worklist as it was
    (
        "long code value",
        orjson.dumps({**workitem(), "00404025": {"vr": "SQ", "Value": [code("LONGSTATION" * 4, "station")]}}),
        "is longer than SH allows (16 characters)",
    ),
    ("long label", orjson.dumps({**workitem(), "00741204": {"vr": "LO", "Value": ["L" * 65]}}), "LO allows"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
async def test_malformed_create_is_400_and_stores_nothing(
    client: httpx.AsyncClient, case: str, body: bytes, message: str
) -> None:
    uid = new_uid()
    response = await client.post(f"/workitems?{uid}", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert (await client.get(f"/workitems/{uid}")).status_code == 404


async def test_errors_change_nothing(client: httpx.AsyncClient) -> None:
    unknown = new_uid()
    assert (await client.get(f"/workitems/{unknown}")).status_code == 404
    assert (await client.get("/workitems/1.02")).status_code == 400
    assert (await put_state(client, unknown, "IN PROGRESS", new_uid())).status_code == 404
    body = orjson.dumps([{"00741204": {"vr": "LO", "Value": ["x"]}}])
    assert (await client.post(f"/workitems/{unknown}", content=body, headers=JSON)).status_code == 404
    assert (await client.post(f"/workitems/{unknown}/cancelrequest")).status_code == 404

    uid = await create(client, workitem())
    before = await get(client, uid)
    # state changes a SCHEDULED item cannot take
    for state, status in (("COMPLETED", 409), ("CANCELED", 409), ("SCHEDULED", 409), ("DONE", 400)):
        response = await put_state(client, uid, state, new_uid())
        assert response.status_code == status, (state, response.text)
    response = await put_state(client, uid, "IN PROGRESS", None)
    assert response.status_code == 400
    assert response.headers["warning"] == '299 dicomweb "The Transaction UID is missing."'
    # two states, or two Transaction UIDs, in one request (VM 1): the first was taken, a 200
    for key, two in (("00741000", ["IN PROGRESS", "COMPLETED"]), ("00081195", [new_uid(), new_uid()])):
        ds = orjson.loads(state_body("IN PROGRESS", new_uid()))[0]
        ds[key]["Value"] = two
        response = await client.put(f"/workitems/{uid}/state", content=orjson.dumps([ds]), headers=JSON)
        assert response.status_code == 400, response.text
        assert "holds one value, not 2" in response.json()["error"]["message"]
    # updates the table forbids
    for forbidden in ("00741000", "00080018", "00081195"):
        element = copy.deepcopy(before.get(forbidden, {"vr": "UI", "Value": ["1.2.3"]}))
        response = await client.post(
            f"/workitems/{uid}", content=orjson.dumps([{forbidden: element}]), headers=JSON
        )
        assert response.status_code == 400, forbidden
    emptied = orjson.dumps([{"00741204": {"vr": "LO"}}])
    assert (await client.post(f"/workitems/{uid}", content=emptied, headers=JSON)).status_code == 400
    wrong_type = await client.post(
        f"/workitems/{uid}", content=b"[{}]", headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    assert await get(client, uid) == before

    # an owner's item: a wrong Transaction UID is refused
    tuid = new_uid()
    assert (await put_state(client, uid, "IN PROGRESS", tuid)).status_code == 200
    claimed = await get(client, uid)
    response = await put_state(client, uid, "CANCELED", new_uid())
    assert response.status_code == 409
    update = orjson.dumps([{"00741204": {"vr": "LO", "Value": ["changed"]}}])
    assert (
        await client.post(f"/workitems/{uid}?{new_uid()}", content=update, headers=JSON)
    ).status_code == 409
    # an empty transaction-uid is a missing one (409 with its warning; it was 400 'unknown query parameter'),
    # and two different ones are 400 (the last was used)
    response = await client.post(f"/workitems/{uid}?transaction-uid=", content=update, headers=JSON)
    assert response.status_code == 409
    assert (
        response.headers["warning"] == '299 dicomweb "The target URI did not reference a claimed Workitem."'
    )
    response = await client.post(f"/workitems/{uid}?{new_uid()}&{tuid}", content=update, headers=JSON)
    assert (response.status_code, response.json()["error"]["message"]) == (
        400,
        "more than one Transaction UID",
    )
    assert (await put_state(client, uid, "IN PROGRESS", tuid)).status_code == 409  # already IN PROGRESS
    assert await get(client, uid) == claimed


async def test_assignment_update_while_scheduled(client: httpx.AsyncClient) -> None:
    uid = await create(client, workitem(station=None))
    assign = {"00404025": {"vr": "SQ", "Value": [code("MR2", "MR 2")]}}
    response = await client.post(f"/workitems/{uid}", content=orjson.dumps([assign]), headers=JSON)
    assert response.status_code == 200, response.text
    response = await client.get("/workitems", params={"ScheduledStationNameCodeSequence.CodeValue": "MR2"})
    assert [i["00080018"]["Value"][0] for i in response.json()] == [uid]


async def test_service_roots_and_partitions(client: httpx.AsyncClient, ups_archive: RunningArchive) -> None:
    uid = await create(client, workitem())
    async with httpx.AsyncClient(base_url=ups_archive.base, timeout=30) as root:
        # /v1 and /v2 are one worklist (the default partition)
        assert (await root.get(f"/v1/workitems/{uid}")).status_code == 200
        # a partition is its own worklist; an unknown one is 404
        assert (await root.get("/v2/partitions/nowhere/workitems")).status_code == 404
        response = await root.post(
            "/v2/partitions/nowhere/workitems", content=orjson.dumps(workitem()), headers=JSON
        )
        assert response.status_code == 404
        assert (await root.get("/v2/partitions/bad!name/workitems")).status_code == 400


async def test_websocket_refuses_bad_subscribers(ups_archive: RunningArchive) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    ws_root = "ws" + ups_archive.url.removeprefix("http")
    for path, code_expected in (
        (f"/ws/subscribers/{'A' * 17}", 1008),
        ("/ws/subscribers/AE1?after=x", 1008),
        ("/ws/subscribers/AE1?after=99999999999999999999", 1008),  # past bigint: a traceback, 1011
    ):
        async with connect(ws_root + path) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code_expected
    # past bigint, an acknowledgement failed in the database and acknowledgements silently stopped
    for message in ("hello", '{"ack": 18446744073709551615}'):
        async with connect(ws_root + "/ws/subscribers/AE1") as ws:
            await ws.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


async def test_accept_header_is_negotiated(client: httpx.AsyncClient) -> None:
    """Retrieve and search answer with the JSON type the Accept header prefers (dicomweb.negotiation.select):
    400 for a malformed header, 406 with what is available when it allows neither."""
    uid = await create(client, workitem())
    for path in (f"/workitems/{uid}", f"/workitems?SOPInstanceUID={uid}"):
        plain = await client.get(path, headers={"Accept": "application/json"})
        assert plain.status_code == 200, plain.text
        assert plain.headers["content-type"] == "application/json"
        preferred = await client.get(
            path, headers={"Accept": "application/json;q=0.5, application/dicom+json"}
        )
        assert preferred.headers["content-type"] == "application/dicom+json"
        anything = await client.get(path, headers={"Accept": "*/*"})
        assert anything.headers["content-type"] == "application/dicom+json"
        refused = await client.get(path, headers={"Accept": "image/png"})
        assert refused.status_code == 406
        assert "application/dicom+json" in refused.text
        malformed = await client.get(path, headers={"Accept": "application/json;q=x"})
        assert malformed.status_code == 400
        assert "malformed Accept header" in malformed.text
