"""UPS-RS subscriptions beyond the basics, with real servers, PostgreSQL and the WebSocket channel: when a
filtered worklist subscription takes an item, SCP Status Change reports once per archive start and stop, and
the bound on the queue of a subscriber that does not acknowledge."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from dicomweb.config import Settings
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive, ServerThread, start_archive
from tests.test_worklist_events import (
    FILTERED,
    JSON,
    WORKLIST,
    create,
    nothing_more,
    receive,
    subscribe,
    summary,
)
from tests.worklist_data import code, ups_archive, workitem
from worklist.retention import prune
from worklist.scp_status import ALIVE_LOCK, ScpStatus

__all__ = ["ups_archive"]


@pytest.fixture
async def client(ups_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=ups_archive.url, timeout=30) as c:
        yield c


async def assign(client: httpx.AsyncClient, uid: str, station: str) -> None:
    body = {"00404025": {"vr": "SQ", "Value": [code(station, f"Station {station}")]}}
    response = await client.post(f"/workitems/{uid}", content=orjson.dumps([body]), headers=JSON)
    assert response.status_code == 200, response.text


# --- filtered worklist subscriptions ------------------------------------------------------------------


async def test_a_filter_takes_items_when_subscribing_and_when_created_only(client: httpx.AsyncClient) -> None:
    """PS3.4 CC.2.3.3: a filtered global subscription covers the existing and future items that match;
    Table CC.2.3-2 changes an AE's subscription to an item only on subscription actions and on creation.
    An N-SET that makes an item match therefore subscribes nobody, and one that makes it stop matching
    unsubscribes nobody (dcm4chee evaluates the filter on creation only, too)."""
    url = await subscribe(client, FILTERED, "MR_AI", filter="ScheduledStationNameCodeSequence.CodeValue=MR1")
    elsewhere = await create(client, workitem(station="CT1"))
    await assign(client, elsewhere, "MR1")  # now it matches: not subscribed
    taken = await create(client, workitem(station="MR1"))
    await assign(client, taken, "CT2")  # no longer matches: still subscribed, so told of the assignment
    async with connect(url) as ws:
        events = await receive(ws, 3)
        await nothing_more(ws)
    assert [summary(e)[1:3] for e in events] == [(taken, 1), (taken, 5), (taken, 5)]
    assert events[2]["00404025"]["Value"][0]["00080100"]["Value"] == ["CT2"]


# --- SCP Status Change ----------------------------------------------------------------------------------


def serve(database_url: str, tmp_path: Path, name: str) -> tuple[ServerThread, RunningArchive]:
    settings = Settings(data_dir=tmp_path / name, max_instance_size=64 << 20, insecure_open=True)
    store = LocalBlobStore(tmp_path / "blobs")
    return start_archive(settings, database_url, store, store)


async def status_events(database_url: str) -> list[tuple[str, int, bytes]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT ae_title, sequence, payload FROM ups_event WHERE event_type = 4
               ORDER BY ae_title, sequence"""
        )
    finally:
        await conn.close()
    return [(r["ae_title"], r["sequence"], r["payload"]) for r in rows]


async def test_scp_status_change_once_per_archive_start_and_stop(database_url: str, tmp_path: Path) -> None:
    first, archive = serve(database_url, tmp_path, "a")
    second = third = fourth = None
    try:
        async with httpx.AsyncClient(base_url=archive.url, timeout=30) as client:
            url = await subscribe(client, WORKLIST, "WATCH")
            item = await create(client)
            await subscribe(client, item, "ITEM_AE")
            await subscribe(client, WORKLIST, "GONE")
            assert (await client.delete(f"/workitems/{WORKLIST}/subscribers/GONE")).status_code == 200
        # two processes: starting and stopping either one is no start or stop of the archive
        second, _ = serve(database_url, tmp_path, "b")
        first.stop()
        assert await status_events(database_url) == []
        second.stop()  # the last one: GOING DOWN to every AE with a subscription, once
        going_down = await status_events(database_url)
        assert [(ae, seq) for ae, seq, _ in going_down] == [("ITEM_AE", 2), ("WATCH", 2)]
        third, archive = serve(database_url, tmp_path, "c")  # RESTARTED, once
        fourth, _ = serve(database_url, tmp_path, "d")
        assert [(ae, seq) for ae, seq, _ in await status_events(database_url)] == [
            ("ITEM_AE", 2), ("ITEM_AE", 3), ("WATCH", 2), ("WATCH", 3),
        ]  # fmt: skip
        url = url.replace(url.split("/v2/")[0], archive.base.replace("http", "ws"))
        async with connect(url) as ws:
            events = await receive(ws, 3)
            await nothing_more(ws)
    finally:
        for thread in (first, second, third, fourth):
            if thread is not None:
                thread.stop()
    assert [summary(e) for e in events] == [
        (1, item, 1, "SCHEDULED"),
        (2, "1.2.840.10008.5.1.4.34.5", 4, None),
        (3, "1.2.840.10008.5.1.4.34.5", 4, None),
    ]
    assert events[0]["00000002"] == events[1]["00000002"]  # UPS Event SOP Class
    assert {k: v for k, v in events[1].items() if k.startswith("0074")} == {
        "00741242": {"vr": "CS", "Value": ["GOING DOWN"]},
    }
    assert {k: v for k, v in events[2].items() if k.startswith("0074")} == {
        "00741242": {"vr": "CS", "Value": ["RESTARTED"]},
        "00741244": {"vr": "CS", "Value": ["WARM START"]},
        "00741246": {"vr": "CS", "Value": ["WARM START"]},
    }
    # all four stopped: the last one reported GOING DOWN again
    assert [(ae, seq) for ae, seq, _ in await status_events(database_url)][-1] == ("WATCH", 4)


async def test_a_start_during_the_last_going_down_reports_restarted(
    client: httpx.AsyncClient, ups_archive: RunningArchive
) -> None:
    """A process that starts while the last one is still reporting GOING DOWN is not the first by the lock
    (the other holds it); the recorded GOING DOWN makes it report RESTARTED all the same, and only once."""
    await subscribe(client, WORKLIST, "WATCH")
    conn = await asyncpg.connect(ups_archive.database_url)
    try:
        await conn.execute("UPDATE ups_scp_state SET down = true")  # as a GOING DOWN just committed
        late, later = ScpStatus(ups_archive.database_url), ScpStatus(ups_archive.database_url)
        assert await late.start() is True
        assert await later.start() is False
        assert await conn.fetchval("SELECT down FROM ups_scp_state") is False
        assert await late.stop() is False and await later.stop() is False  # ups_archive still runs
    finally:
        await conn.close()
    reported = await status_events(ups_archive.database_url)
    assert [(ae, seq) for ae, seq, _ in reported] == [("WATCH", 1)]
    assert orjson.loads(reported[0][2])["00741242"]["Value"] == ["RESTARTED"]


async def alive_holders(conn: asyncpg.Connection) -> set[int]:
    """Backends holding the alive lock shared (an advisory lock on a bigint: classid high, objid low word)."""
    rows = await conn.fetch(
        """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock'
           AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1""",
        ALIVE_LOCK,
    )
    return {r["pid"] for r in rows}


async def test_a_lost_alive_lock_is_taken_again(
    client: httpx.AsyncClient, ups_archive: RunningArchive
) -> None:
    """The connection holding a process's alive lock is terminated (as by a PostgreSQL restart): the process
    connects again and holds the lock shared again, reporting nothing, so that neither it nor another
    process takes itself for the first or the last of the archive."""
    await subscribe(client, WORKLIST, "WATCH")
    conn = await asyncpg.connect(ups_archive.database_url)
    status = ScpStatus(ups_archive.database_url, retry_seconds=0.05)
    try:
        others = await alive_holders(conn)
        assert others  # ups_archive's process
        assert await status.start() is False
        mine = await alive_holders(conn) - others
        assert len(mine) == 1
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", *mine) is True
        for _ in range(200):
            if status.rejoined:
                break
            await asyncio.sleep(0.05)
        assert status.rejoined == 1
        again = await alive_holders(conn) - others
        assert len(again) == 1 and again != mine
        assert await status.stop() is False  # ups_archive still runs
        assert await alive_holders(conn) == others
    finally:
        await status.stop()
        await conn.close()
    assert await status_events(ups_archive.database_url) == []


# --- the queue bound ----------------------------------------------------------------------------------------


def gap(message: dict) -> tuple[int, int]:
    assert "00771001" not in message and "00001002" not in message  # no event
    assert message["00770010"]["Value"] == ["DICOMWEB ARCHIVE UPS"]
    return message["00771002"]["Value"][0], message["00771003"]["Value"][0]


async def test_unacknowledged_events_beyond_the_bound_are_dropped_and_announced(
    client: httpx.AsyncClient, ups_archive: RunningArchive
) -> None:
    url = await subscribe(client, WORKLIST, "SLOW")
    await subscribe(client, WORKLIST, "FAST")
    uids = [await create(client) for _ in range(5)]
    conn = await asyncpg.connect(ups_archive.database_url)
    try:
        # by count: at most 2 unacknowledged per subscriber
        assert await prune(conn, 2, dt.timedelta(days=1)) == 6  # 3 of each
        assert await prune(conn, 2, dt.timedelta(days=1)) == 0
        position = "SELECT acked_sequence, dropped_sequence FROM ups_subscriber WHERE ae_title = $1"
        assert tuple(await conn.fetchrow(position, "SLOW")) == (0, 3)
        async with connect(url) as ws:
            assert gap(orjson.loads(await ws.recv())) == (1, 3)
            events = await receive(ws, 2)  # acknowledged
            await nothing_more(ws)
        assert [summary(e)[:2] for e in events] == [(4, uids[3]), (5, uids[4])]
        assert tuple(await conn.fetchrow(position, "SLOW")) == (5, 3)
        async with connect(url) as ws:  # told once: the loss is behind the acknowledged cursor now
            await nothing_more(ws)

        # by age: a zero retention drops everything still queued
        for _ in range(2):
            await create(client)
        assert await prune(conn, 100, dt.timedelta(0)) == 2 + 4  # SLOW's 6 and 7, FAST's 4 to 7
        assert await conn.fetchval("SELECT count(*) FROM ups_event") == 0
        async with connect(url + "?after=5") as ws:
            assert gap(orjson.loads(await ws.recv())) == (6, 7)
            await nothing_more(ws)
        later = await create(client)
        fast = url.replace("/SLOW", "/FAST")
        async with connect(fast) as ws:  # never acknowledged anything: told, then served on
            assert gap(orjson.loads(await ws.recv())) == (1, 7)
            (event,) = await receive(ws, 1)
            await nothing_more(ws)
        assert summary(event)[:2] == (8, later)

        # events gone while a sender reads (a prune committing between its position read and its first batch)
        await create(client)
        await create(client)
        await conn.execute("DELETE FROM ups_event WHERE ae_title = 'SLOW' AND sequence = 8")
        async with connect(url + "?after=7") as ws:
            assert gap(orjson.loads(await ws.recv())) == (8, 8)
            assert [summary(e)[0] for e in await receive(ws, 2)] == [9, 10]
            await nothing_more(ws)
    finally:
        await conn.close()


def test_queue_bound_settings() -> None:
    settings = Settings.from_env(
        {"DICOMWEB_UPS_EVENT_QUEUE_MAX": "500", "DICOMWEB_UPS_EVENT_RETENTION_HOURS": "24"}
    )
    assert (settings.ups_event_queue_max, settings.ups_event_retention_hours) == (500, 24)
    assert (Settings().ups_event_queue_max, Settings().ups_event_retention_hours) == (10_000, 168)
