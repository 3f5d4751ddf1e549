"""UPS-RS subscriptions and event reports over the WebSocket channel, with real servers and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from dicomcore.uids import new_uid
from dicomweb.config import Settings
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive, start_archive
from tests.worklist_data import code, performed, ups_archive, workitem

__all__ = ["ups_archive"]

JSON = {"Content-Type": "application/dicom+json"}
WORKLIST = "1.2.840.10008.5.1.4.34.5"
FILTERED = "1.2.840.10008.5.1.4.34.5.1"


@pytest.fixture
async def client(ups_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=ups_archive.url, timeout=30) as c:
        yield c


@pytest.fixture
def second_process(ups_archive: RunningArchive, tmp_path: Path) -> Iterator[RunningArchive]:
    """Another archive process on the same database (its own pool, listener and WebSocket senders)."""
    settings = Settings(data_dir=tmp_path / "second", max_instance_size=64 << 20, insecure_open=True)
    store = LocalBlobStore(tmp_path / "second" / "blobs")
    thread, running = start_archive(settings, ups_archive.database_url, store, store)
    try:
        yield running
    finally:
        thread.stop()


async def create(client: httpx.AsyncClient, ds: dict | None = None) -> str:
    """A new work item; by default without a station, whose creation is a state report only (with one,
    subscribers also get UPS Assigned)."""
    uid = new_uid()
    ds = ds or workitem(station=None)
    response = await client.post(f"/workitems?{uid}", content=orjson.dumps([ds]), headers=JSON)
    assert response.status_code == 201, response.text
    return uid


async def put_state(client: httpx.AsyncClient, uid: str, state: str, tuid: str) -> None:
    body = {"00741000": {"vr": "CS", "Value": [state]}, "00081195": {"vr": "UI", "Value": [tuid]}}
    response = await client.put(f"/workitems/{uid}/state", content=orjson.dumps([body]), headers=JSON)
    assert response.status_code == 200, response.text


async def subscribe(client: httpx.AsyncClient, target: str, ae: str, **params: str) -> str:
    response = await client.post(f"/workitems/{target}/subscribers/{ae}", params=params)
    assert response.status_code == 201, response.text
    return response.headers["content-location"]


def summary(event: dict) -> tuple:
    """(sequence, workitem, event type, state or None) of an event report."""
    state = event.get("00741000", {}).get("Value", [None])[0]
    return (
        event["00771001"]["Value"][0],
        event["00001000"]["Value"][0],
        event["00001002"]["Value"][0],
        state,
    )


async def receive(ws: ClientConnection, count: int, *, ack: bool = True) -> list[dict]:
    events = []
    for _ in range(count):
        event = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        events.append(event)
        if ack:
            await ws.send(orjson.dumps({"ack": event["00771001"]["Value"][0]}).decode())
    return events


async def nothing_more(ws: ClientConnection) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), timeout=0.5)


async def test_reconnecting_subscriber_gets_every_event_once_in_order(
    client: httpx.AsyncClient, ups_archive: RunningArchive
) -> None:
    url = await subscribe(client, WORKLIST, "AI_WORKER")
    assert url == f"ws{ups_archive.url.removeprefix('http')}/ws/subscribers/AI_WORKER"
    first, second = await create(client), await create(client)
    received: list[dict] = []
    async with connect(url) as ws:
        received += await receive(ws, 2)
        await nothing_more(ws)
    # while it is away: a claim, a completion, a cancellation request
    tuid = new_uid()
    await put_state(client, first, "IN PROGRESS", tuid)
    response = await client.post(
        f"/workitems/{first}?{tuid}", content=orjson.dumps([performed()]), headers=JSON
    )
    assert response.status_code == 200
    await put_state(client, first, "COMPLETED", tuid)
    # refused requests change nothing, so they report nothing
    body = {"00741000": {"vr": "CS", "Value": ["COMPLETED"]}, "00081195": {"vr": "UI", "Value": [new_uid()]}}
    response = await client.put(f"/workitems/{second}/state", content=orjson.dumps(body), headers=JSON)
    assert response.status_code == 409
    assert (await client.post(f"/workitems/{first}/cancelrequest")).status_code == 409  # COMPLETED
    assert (await client.post(f"/workitems/{second}/cancelrequest")).status_code == 202
    async with connect(url) as ws:
        received += await receive(ws, 4)
        await nothing_more(ws)
    assert [summary(e) for e in received] == [
        (1, first, 1, "SCHEDULED"),
        (2, second, 1, "SCHEDULED"),
        (3, first, 1, "IN PROGRESS"),
        (4, first, 1, "COMPLETED"),
        (5, second, 1, "IN PROGRESS"),  # a SCHEDULED item is canceled through IN PROGRESS (Table CC.1.1-2)
        (6, second, 1, "CANCELED"),
    ]


async def test_unacknowledged_events_come_again_and_after_overrides(client: httpx.AsyncClient) -> None:
    url = await subscribe(client, WORKLIST, "VIEWER")
    uids = [await create(client) for _ in range(3)]
    async with connect(url) as ws:
        events = await receive(ws, 3, ack=False)
    assert [summary(e)[:2] for e in events] == [(1, uids[0]), (2, uids[1]), (3, uids[2])]
    async with connect(url) as ws:  # nothing acknowledged: all three again
        assert [summary(e)[0] for e in await receive(ws, 3, ack=False)] == [1, 2, 3]
    async with connect(url + "?after=2") as ws:  # the client's own record wins
        assert [summary(e)[0] for e in await receive(ws, 1)] == [3]
        await nothing_more(ws)
    async with connect(url) as ws:  # 3 was acknowledged
        await nothing_more(ws)


async def test_live_delivery_from_another_process(
    client: httpx.AsyncClient, second_process: RunningArchive
) -> None:
    """The subscriber is connected to one process; the changes are committed through another."""
    url = await subscribe(client, WORKLIST, "MODALITY")
    other = httpx.AsyncClient(base_url=second_process.url, timeout=30)
    try:
        async with connect(url) as ws:
            await nothing_more(ws)
            uid = await create(other)
            tuid = new_uid()
            await put_state(other, uid, "IN PROGRESS", tuid)
            events = await receive(ws, 2)
            assert [summary(e)[1:] for e in events] == [(uid, 1, "SCHEDULED"), (uid, 1, "IN PROGRESS")]
            assert events[0]["00000002"]["Value"] == ["1.2.840.10008.5.1.4.34.6.4"]
            assert events[0]["00000110"]["Value"] == [1]
    finally:
        await other.aclose()


async def test_workitem_filtered_suspend_and_unsubscribe(client: httpx.AsyncClient) -> None:
    existing = await create(client, workitem(station="CT1"))
    # a work item subscription: an initial state report; a cancel request reaches the subscriber
    url = await subscribe(client, existing, "WATCHER", deletionlock="true")
    tuid = new_uid()
    await put_state(client, existing, "IN PROGRESS", tuid)
    reason = {"00741238": {"vr": "LT", "Value": ["wrong patient"]}}
    response = await client.post(
        f"/workitems/{existing}/cancelrequest", content=orjson.dumps(reason), headers=JSON
    )
    assert response.status_code == 202
    async with connect(url) as ws:
        events = await receive(ws, 3)
        await nothing_more(ws)
    assert [summary(e)[1:] for e in events] == [
        (existing, 1, "SCHEDULED"),
        (existing, 1, "IN PROGRESS"),
        (existing, 2, None),
    ]
    assert events[2]["00741238"]["Value"] == ["wrong patient"]

    # a filtered worklist subscription: only new items of station MR1, and the existing ones matching
    mr_old = await create(client, workitem(station="MR1"))
    url = await subscribe(client, FILTERED, "MR_AI", filter="ScheduledStationNameCodeSequence.CodeValue=MR1")
    mr_new = await create(client, workitem(station="MR1"))
    await create(client, workitem(station="CT1"))
    async with connect(url) as ws:
        events = await receive(ws, 3)
        await nothing_more(ws)
    assert [summary(e)[1:3] for e in events] == [(mr_old, 1), (mr_new, 1), (mr_new, 5)]

    # assignment to the station the AE watches is reported as UPS Assigned (5) to existing subscribers
    assign = {"00404025": {"vr": "SQ", "Value": [code("MR9", "MR 9")]}}
    response = await client.post(f"/workitems/{mr_new}", content=orjson.dumps([assign]), headers=JSON)
    assert response.status_code == 200
    async with connect(url) as ws:
        (event,) = await receive(ws, 1)
    assert summary(event)[1:3] == (mr_new, 5)
    assert event["00404025"] == assign["00404025"]

    # suspended: no new items, existing subscriptions stay
    assert (await client.post(f"/workitems/{FILTERED}/subscribers/MR_AI/suspend")).status_code == 200
    await create(client, workitem(station="MR1"))
    await put_state(client, mr_new, "IN PROGRESS", new_uid())
    async with connect(url) as ws:
        (event,) = await receive(ws, 1)
        await nothing_more(ws)
    assert summary(event)[1:] == (mr_new, 1, "IN PROGRESS")

    # unsubscribed from the worklist: nothing at all any more
    assert (await client.delete(f"/workitems/{FILTERED}/subscribers/MR_AI")).status_code == 200
    assert (await client.delete(f"/workitems/{FILTERED}/subscribers/MR_AI")).status_code == 404
    assert (await client.post(f"/workitems/{mr_old}/cancelrequest")).status_code == 202
    async with connect(url) as ws:
        await nothing_more(ws)

    # unsubscribing from one item
    assert (await client.delete(f"/workitems/{existing}/subscribers/WATCHER")).status_code == 200
    assert (await client.delete(f"/workitems/{existing}/subscribers/WATCHER")).status_code == 404


async def test_subscription_errors(client: httpx.AsyncClient) -> None:
    unknown = new_uid()
    assert (await client.post(f"/workitems/{unknown}/subscribers/AE1")).status_code == 404
    assert (await client.post(f"/workitems/{FILTERED}/subscribers/AE1")).status_code == 400  # no filter
    bad_filter = await client.post(f"/workitems/{FILTERED}/subscribers/AE1", params={"filter": "NoSuchKey=1"})
    assert bad_filter.status_code == 400 and "NoSuchKey" in bad_filter.json()["error"]["message"]
    too_long = await client.post(f"/workitems/{WORKLIST}/subscribers/{'A' * 17}")
    assert too_long.status_code == 400
    assert (
        await client.post(f"/workitems/{WORKLIST}/subscribers/AE1", params={"deletionlock": "yes"})
    ).status_code == 400
    assert (await client.post(f"/workitems/{WORKLIST}/subscribers/AE1/suspend")).status_code == 404
    assert (await client.post(f"/workitems/{unknown}/subscribers/AE1/suspend")).status_code == 400
