"""The change feed: exact entries for STOW and DELETE, both API versions, long-polling, bad input, and
exactly-once reading under concurrent writers."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from changefeed import log
from dicomweb.config import Settings
from indexer.migrate import migrate
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive, start_archive


def study_files(seed: int, count: int) -> tuple[object, list[bytes]]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=2)
    return spec, [to_bytes(make_instance(spec, i % 2, i + 1, rng=rng)) for i in range(count)]


async def stow(client: httpx.AsyncClient, files: list[bytes], path: str = "/studies") -> dict:
    body, content_type = multipart_body(files)
    response = await client.post(path, content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    return response.json()


def stored_uids(result: dict) -> list[tuple[str, str, str]]:
    """(study, series, sop) of each stored instance, from a STOW response."""
    out = []
    for item in result["00081199"]["Value"]:
        url = item["00081190"]["Value"][0]
        parts = url.split("/")
        out.append((parts[-5], parts[-3], parts[-1]))
    return out


@pytest.fixture
async def client(local_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=local_archive.base, timeout=30) as c:
        yield c


async def test_entries_for_store_and_delete(client: httpx.AsyncClient) -> None:
    _, files = study_files(1, 3)
    uids = stored_uids(await stow(client, files, "/v2/studies"))
    study, series, sop = uids[0]
    assert (await client.delete(f"/v2/studies/{study}/series/{series}/instances/{sop}")).status_code == 204

    feed = (await client.get("/v1/changefeed", params={"offset": 0})).json()
    assert [e["Sequence"] for e in feed] == [1, 2, 3, 4]
    assert [e["Action"] for e in feed] == ["create", "create", "create", "delete"]
    assert sorted((e["StudyInstanceUid"], e["SeriesInstanceUid"], e["SopInstanceUid"]) for e in feed[:3]) == (
        sorted(uids)
    )
    assert (feed[3]["StudyInstanceUid"], feed[3]["SeriesInstanceUid"], feed[3]["SopInstanceUid"]) == uids[0]
    states = {(e["SopInstanceUid"], e["Action"]): e["State"] for e in feed}
    assert states[(sop, "create")] == "deleted"
    assert states[(sop, "delete")] == "deleted"
    assert {states[(u[2], "create")] for u in uids[1:]} == {"current"}
    for entry in feed:
        assert entry["PartitionName"] == "Microsoft.Default"
        assert entry["Timestamp"].endswith("Z")
        # metadata only for the versions still current, and then the instance's own DICOM JSON
        if entry["State"] == "current":
            assert entry["Metadata"]["00080018"]["Value"] == [entry["SopInstanceUid"]]
        else:
            assert "Metadata" not in entry
    stamps = [dt.datetime.fromisoformat(e["Timestamp"]) for e in feed]
    assert stamps == sorted(stamps)

    without = (await client.get("/v1/changefeed", params={"offset": 1, "includemetadata": "false"})).json()
    assert [e["Sequence"] for e in without] == [2, 3, 4]
    assert all("Metadata" not in e for e in without)
    assert (await client.get("/v1/changefeed", params={"offset": 4})).json() == []

    latest = (await client.get("/v2/changefeed/latest")).json()
    assert latest["Sequence"] == 4 and latest["Action"] == "delete"


async def test_bulk_data_uris_in_metadata_resolve(client: httpx.AsyncClient) -> None:
    _, files = study_files(2, 1)
    await stow(client, files, "/v2/studies")
    entry = (await client.get("/v2/changefeed")).json()[0]
    uri = entry["Metadata"]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(f"{client.base_url}/v2/studies/{entry['StudyInstanceUid']}/series/")
    response = await client.get(uri, headers={"Accept": "application/octet-stream"})
    assert response.status_code == 200 and len(response.content) > 0


async def test_empty_feed(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/changefeed")).json() == []
    assert (await client.get("/v2/changefeed")).json() == []
    assert (await client.get("/v1/changefeed/latest")).json() == {"Sequence": 0}


async def test_duplicates_and_restores(client: httpx.AsyncClient) -> None:
    _, files = study_files(3, 2)
    uids = stored_uids(await stow(client, files, "/v2/studies"))
    # a re-store of what is stored (45070) is no change and gets no entry
    body, content_type = multipart_body(files[:1])
    response = await client.post("/v2/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 409
    study, series, sop = uids[0]
    assert (await client.delete(f"/v2/studies/{study}/series/{series}/instances/{sop}")).status_code == 204
    await stow(client, files[:1], "/v2/studies")  # stored again after the delete: a new version
    feed = (await client.get("/v1/changefeed")).json()
    mine = [(e["Action"], e["State"]) for e in feed if e["SopInstanceUid"] == sop]
    assert mine == [("create", "replaced"), ("delete", "replaced"), ("create", "current")]
    assert [e["Sequence"] for e in feed] == [1, 2, 3, 4]


async def test_v2_time_window_and_offset(client: httpx.AsyncClient) -> None:
    _, first = study_files(4, 2)
    await stow(client, first, "/v2/studies")
    await asyncio.sleep(0.05)
    middle = dt.datetime.now(dt.UTC)
    await asyncio.sleep(0.05)
    _, second = study_files(5, 3)
    await stow(client, second, "/v2/studies")

    everything = (await client.get("/v2/changefeed")).json()
    assert [e["Sequence"] for e in everything] == [1, 2, 3, 4, 5]
    after = (await client.get("/v2/changefeed", params={"startTime": middle.isoformat()})).json()
    assert [e["Sequence"] for e in after] == [3, 4, 5]
    before = (await client.get("/v2/changefeed", params={"endTime": middle.isoformat()})).json()
    assert [e["Sequence"] for e in before] == [1, 2]
    paged = (
        await client.get("/v2/changefeed", params={"startTime": middle.isoformat(), "offset": 1, "limit": 1})
    ).json()
    assert [e["Sequence"] for e in paged] == [4]
    # Azure's docs spell the parameters in both cases; a naive time is UTC
    naive = middle.replace(tzinfo=None).isoformat()
    lowercase = await client.get(f"/v2/changefeed?starttime={naive}")
    assert [e["Sequence"] for e in lowercase.json()] == [3, 4, 5]
    assert [e["Sequence"] for e in (await client.get("/v1/changefeed", params={"limit": 2})).json()] == [1, 2]


async def test_v2_offset_past_every_sequence(client: httpx.AsyncClient) -> None:
    """An offset as large as a sequence can be skips everything (it was added to the window's first
    sequence and overflowed PostgreSQL's bigint: a 500); a larger one is not a valid offset (400)."""
    _, files = study_files(8, 1)
    await stow(client, files, "/v2/partitions/research/studies")
    largest = 2**63 - 1
    for path in ("/v2/changefeed", "/v2/partitions/research/changefeed"):
        response = await client.get(path, params={"offset": largest})
        assert (response.status_code, response.json()) == (200, [])
        response = await client.get(path, params={"offset": largest + 1})
        assert response.status_code == 400
        assert response.json()["error"]["message"] == (
            f"offset must be between 0 and {largest}, not {largest + 1}"
        )
    response = await client.get("/v1/changefeed", params={"offset": "99999999999999999999"})
    assert response.status_code == 400


async def test_partition_routes_filter(client: httpx.AsyncClient) -> None:
    _, files = study_files(6, 2)
    await stow(client, files[:1], "/v2/studies")
    await stow(client, files[1:], "/v2/partitions/research/studies")
    everything = (await client.get("/v1/changefeed")).json()
    assert [e["PartitionName"] for e in everything] == ["Microsoft.Default", "research"]
    # metadata URLs of another partition's entries point into that partition
    assert "/v1/partitions/research/studies/" in everything[1]["Metadata"]["7FE00010"]["BulkDataURI"]
    research = (await client.get("/v1/partitions/research/changefeed")).json()
    assert [(e["Sequence"], e["PartitionName"]) for e in research] == [(2, "research")]
    assert (await client.get("/v2/partitions/research/changefeed/latest")).json()["Sequence"] == 2
    assert (await client.get("/v2/partitions/nowhere/changefeed")).status_code == 404


@pytest.mark.parametrize(
    ("path", "params", "needle"),
    [
        ("/v1/changefeed", {"offset": "-1"}, "offset must be between 0 and 9223372036854775807, not -1"),
        ("/v1/changefeed", {"offset": "abc"}, "offset must be an integer"),
        ("/v1/changefeed", {"limit": "0"}, "limit must be between 1 and 10000"),
        ("/v1/changefeed", {"limit": "10001"}, "limit must be between 1 and 10000"),
        ("/v1/changefeed", {"includemetadata": "yes"}, "includemetadata must be true or false"),
        ("/v1/changefeed", {"wait": "61"}, "wait must be between 0 and 60"),
        ("/v1/changefeed", {"startTime": "2026-01-01"}, "unknown query parameter 'startTime'"),
        ("/v1/changefeed", {"offset": "5"}, "offset 5 is beyond the end of the change feed (latest sequence"),
        ("/v2/changefeed", {"startTime": "yesterday"}, "startTime must be an ISO 8601"),
        (
            "/v2/changefeed",
            {"startTime": "2026-02-01T00:00:00Z", "endTime": "2026-01-01T00:00:00Z"},
            "endTime is before startTime",
        ),
        ("/v2/changefeed", {"bogus": "1"}, "unknown query parameter 'bogus'"),
        ("/v2/changefeed/latest", {"limit": "3"}, "takes only includemetadata"),
    ],
)
async def test_bad_parameters(client: httpx.AsyncClient, path: str, params: dict, needle: str) -> None:
    response = await client.get(path, params=params)
    assert response.status_code == 400
    assert needle in response.json()["error"]["message"]


async def test_repeated_parameter_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/changefeed?limit=1&limit=2")
    assert response.status_code == 400
    assert "more than once" in response.json()["error"]["message"]


async def test_long_poll_wakes_on_commit_in_another_process(
    local_archive: RunningArchive, database_url: str, tmp_path: Path
) -> None:
    """A reader waiting on one server is woken by a STOW committed through another sharing the database."""
    settings = Settings(data_dir=tmp_path / "other", max_instance_size=64 << 20)
    blobs = tmp_path / "blobs"  # same blob directory as local_archive
    thread, other = start_archive(settings, database_url, LocalBlobStore(blobs), LocalBlobStore(blobs))
    try:
        async with (
            httpx.AsyncClient(base_url=local_archive.base, timeout=60) as reader,
            httpx.AsyncClient(base_url=other.base, timeout=60) as writer,
        ):
            started = time.monotonic()
            waiting = asyncio.create_task(reader.get("/v1/changefeed", params={"offset": 0, "wait": 30}))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # nothing committed yet: the request is held
            _, files = study_files(7, 1)
            await stow(writer, files, "/v2/studies")
            response = await asyncio.wait_for(waiting, 20)
            assert [e["Sequence"] for e in response.json()] == [1]
            assert time.monotonic() - started < 20  # woken by the commit, not by the 30 s wait

            # a wait that nothing ends returns an empty page when it runs out
            quiet = await reader.get("/v1/changefeed", params={"offset": 1, "wait": 1})
            assert quiet.json() == []
    finally:
        thread.stop()


async def test_concurrent_writers_and_tailing_reader(client: httpx.AsyncClient) -> None:
    """Eight writers store and delete while a reader tails: it sees exactly the feed, in order, once."""
    writers, studies_each = 8, 3
    stored: list[tuple[str, str, str]] = []
    deleted: list[tuple[str, str, str]] = []
    done = asyncio.Event()

    async def writer(n: int) -> None:
        rng = random.Random(100 + n)
        for s in range(studies_each):
            spec = make_study(rng, series_count=2)
            files = [to_bytes(make_instance(spec, i % 2, i + 1, rng=rng)) for i in range(4)]
            uids = stored_uids(await stow(client, files, "/v2/studies"))
            stored.extend(uids)
            if s % 2 == 0:  # delete one series, instance by instance or whole
                study, series, _ = uids[0]
                victims = [u for u in uids if u[1] == series]
                assert (await client.delete(f"/v2/studies/{study}/series/{series}")).status_code == 204
                deleted.extend(victims)

    tailed: list[dict] = []

    async def reader() -> None:
        checkpoint = 0
        while True:
            finished = done.is_set()
            page = (
                await client.get(
                    "/v1/changefeed",
                    params={"offset": checkpoint, "limit": 7, "includemetadata": "false", "wait": 1},
                )
            ).json()
            tailed.extend(page)
            if page:
                checkpoint = page[-1]["Sequence"]
            elif finished:
                return

    tail = asyncio.create_task(reader())
    await asyncio.gather(*(writer(n) for n in range(writers)))
    done.set()
    await asyncio.wait_for(tail, 60)

    from_scratch = (
        await client.get("/v1/changefeed", params={"limit": 10000, "includemetadata": "false"})
    ).json()
    sequences = [e["Sequence"] for e in tailed]
    assert sequences == list(range(1, len(stored) + len(deleted) + 1))  # dense, ordered, no repeats
    assert [(e["Sequence"], e["SopInstanceUid"], e["Action"]) for e in tailed] == [
        (e["Sequence"], e["SopInstanceUid"], e["Action"]) for e in from_scratch
    ]
    creates = sorted(e["SopInstanceUid"] for e in from_scratch if e["Action"] == "create")
    deletes = sorted(e["SopInstanceUid"] for e in from_scratch if e["Action"] == "delete")
    assert creates == sorted(u[2] for u in stored)
    assert deletes == sorted(u[2] for u in deleted)
    gone = {u[2] for u in deleted}
    for entry in from_scratch:  # states reflect later deletes
        assert entry["State"] == ("deleted" if entry["SopInstanceUid"] in gone else "current")


async def test_sequences_visible_in_commit_order(database_url: str) -> None:
    """At the log level: writers that hold their transaction open after appending (slow commits) never let
    a reader see a later sequence before an earlier one."""
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=12)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        rng = random.Random(7)
        delays = [rng.uniform(0, 0.02) for _ in range(60)]

        async def write(n: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                change = log.Change("1.2", "1.2.3", f"1.2.3.{n}", n + 1, log.Action.CREATE)
                await log.append(conn, 1, [change, change])
                await asyncio.sleep(delays[n])  # between taking the numbers and committing

        seen: list[int] = []
        stop = asyncio.Event()

        async def read() -> None:
            async with pool.acquire() as conn:
                while not stop.is_set() or len(seen) < 120:
                    page = await log.read_after(conn, seen[-1] if seen else 0, 50)
                    for entry in page:
                        # a gap would mean an earlier sequence was skipped for ever
                        assert entry.sequence == (seen[-1] if seen else 0) + 1
                        seen.append(entry.sequence)
                    await asyncio.sleep(0)

        reader = asyncio.create_task(read())
        await asyncio.gather(*(write(n) for n in range(60)))
        stop.set()
        await asyncio.wait_for(reader, 30)
        assert seen == list(range(1, 121))
        assert await log.last_sequence(pool) == 120
    finally:
        await pool.close()


async def test_partition_ordinals_dense_under_concurrent_writers(database_url: str) -> None:
    """Writers to three partitions that hold their transactions open after appending, some rolling back:
    each partition's ordinals are 1..n with no gap or repeat, in the order of the sequences."""
    from indexer.lookup import partition_key

    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=12)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        parts = [1] + [await partition_key(pool, f"p{n}", create=True) for n in range(2)]
        rng = random.Random(5)
        plan = [
            (rng.choice(parts), rng.randint(1, 3), rng.uniform(0, 0.02), rng.random() < 0.2)
            for _ in range(60)
        ]

        async def write(n: int) -> None:
            part, count, delay, fail = plan[n]
            try:
                async with pool.acquire() as conn, conn.transaction():
                    change = log.Change("1.2", "1.2.3", f"1.2.3.{n}", n + 1, log.Action.CREATE)
                    await log.append(conn, part, [change] * count)
                    await asyncio.sleep(delay)  # between taking the numbers and committing
                    if fail:
                        raise RuntimeError("rolled back")
            except RuntimeError:
                pass

        await asyncio.gather(*(write(n) for n in range(60)))
        rows = await pool.fetch("SELECT partition_key, partition_ordinal FROM changefeed ORDER BY sequence")
        committed = sum(count for _, count, _, fail in plan if not fail)
        assert len(rows) == committed == await log.last_sequence(pool)
        for part in parts:
            ordinals = [r["partition_ordinal"] for r in rows if r["partition_key"] == part]
            assert ordinals == list(range(1, len(ordinals) + 1)), part
    finally:
        await pool.close()


async def test_migration_numbers_an_existing_feed(database_url: str) -> None:
    """Migration 0021 gives the entries written before it their ordinals, and appends continue from them."""
    import indexer.migrate as migrate_module
    from indexer.migrate import available_migrations

    conn = await asyncpg.connect(database_url)
    try:
        original = migrate_module.available_migrations
        migrate_module.available_migrations = lambda: [m for m in original() if m[0] < 21]  # type: ignore[assignment]
        try:
            await migrate(conn)
        finally:
            migrate_module.available_migrations = original
        other = await conn.fetchval("INSERT INTO partition (name) VALUES ('other') RETURNING partition_key")
        parts = [1, other, other, 1, 1, other, 1]
        await conn.executemany(
            """INSERT INTO changefeed (sequence, partition_key, study_instance_uid, series_instance_uid,
                   sop_instance_uid, instance_key, action, "timestamp")
               VALUES ($1, $2, '1', '2', '3', $1, 0, now())""",
            [(n + 1, p) for n, p in enumerate(parts)],
        )
        await conn.execute("UPDATE changefeed_counter SET last_sequence = $1", len(parts))
        assert (await migrate(conn))[0] == "0021_changefeed_partition_ordinal.sql"
        async with conn.transaction():
            await log.append(conn, other, [log.Change("1", "2", "4", 99, log.Action.CREATE)])
        rows = await conn.fetch("SELECT partition_key, partition_ordinal FROM changefeed ORDER BY sequence")
        assert [(r["partition_key"], r["partition_ordinal"]) for r in rows] == [
            (1, 1),
            (other, 1),
            (other, 2),
            (1, 2),
            (1, 3),
            (other, 3),
            (1, 4),
            (other, 4),
        ]
        page = await log.read_window(conn, None, None, 2, 10, partition_key=other)
        assert [e.sequence for e in page] == [6, 8]
        assert available_migrations()[-1][0] >= 21
    finally:
        await conn.close()


async def test_v2_windows_equal_a_filter_of_the_whole_feed(database_url: str) -> None:
    """read_window finds a window as a sequence range, and within a partition as a range of the partition's
    ordinals; its pages must equal filtering every entry by timestamp (ties included: one append stamps all
    its entries alike), per partition and across them, at offsets up to past the window's end."""
    from indexer.lookup import partition_key

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        other = await partition_key(pool, "other", create=True)
        third = await partition_key(pool, "third", create=True)
        assert other is not None and third is not None
        names = {1: "Microsoft.Default", other: "other", third: "third"}
        rng = random.Random(11)
        for n in range(60):
            async with pool.acquire() as conn, conn.transaction():
                part = rng.choices([1, other, third], [5, 3, 2])[0]
                change = log.Change("1.2", "1.2.3", f"1.2.3.{n}", n + 1, log.Action.CREATE)
                await log.append(conn, part, [change] * rng.randint(1, 4))
        everything = await log.read_after(pool, 0, 1000)
        stamps = sorted({e.timestamp for e in everything})
        assert len(stamps) == 60 and len(everything) > 60
        tick = dt.timedelta(microseconds=1)
        moments = [None, stamps[0] - tick, *stamps, stamps[-1] + tick]
        for _ in range(600):
            start, end = rng.choice(moments), rng.choice(moments)
            if start is not None and end is not None and end < start:
                start, end = end, start
            offset, limit = rng.choice([0, 1, 2, 5, 17, 30, 45, 70, 200]), rng.choice([1, 3, 100])
            part = rng.choice([None, 1, other, third])
            expected = [
                e.sequence
                for e in everything
                if (start is None or e.timestamp >= start)
                and (end is None or e.timestamp < end)
                and (part is None or e.partition_name == names[part])
            ][offset : offset + limit]
            got = await log.read_window(pool, start, end, offset, limit, partition_key=part)
            assert [e.sequence for e in got] == expected, (start, end, offset, limit, part)
    finally:
        await pool.close()
