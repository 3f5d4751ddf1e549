"""Extended query tags: definition checks, re-index (with concurrent writes, a killed worker and deletes),
values written by new stores, QIDO matching compared with tests/qido_reference.py, and the HTTP API."""

from __future__ import annotations

import asyncio
import hashlib
import warnings
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomcore.tags import parse_tag, tag_hex
from indexer.attributes import Level
from indexer.extended_tags import (
    DELETE_TAG,
    MAX_TAGS,
    TABLES,
    NewTag,
    TagError,
    add_tags,
    delete_tag,
    get_tag,
    query_tags,
    validate_new_tags,
)
from indexer.extended_values import BadValue, convert
from indexer.operations import LeaseLost, Operation, OperationRunner, get_operation
from indexer.qido import QidoQuery, QueryError, names_extended_tags, parse_query, search
from indexer.reindex import ReindexHandler
from indexer.tag_deletion import TagDeletionHandler
from indexer.writes import InstanceRecord, index_instances
from tests import qido_reference as ref
from tests.fixtures.server import RunningArchive

BASE = "http://archive.test/dicomweb"
CT = "1.2.840.10008.5.1.4.1.1.2"

# --- definitions ------------------------------------------------------------------------------------------


def one(**item: Any) -> list[NewTag]:
    return validate_new_tags([item])


def test_valid_definitions() -> None:
    assert one(Path="00101010", VR="AS", Level="Study") == [NewTag("00101010", "AS", None, Level.STUDY)]
    # keyword, VR from the dictionary, case-insensitive field names and level
    assert one(path="PatientAge", level="study") == [NewTag("00101010", "AS", None, Level.STUDY)]
    assert one(Path="0008103e", Level="Series")[0].path == "0008103E"
    private = one(Path="04011001", VR="SS", PrivateCreator="MicrosoftPC", Level="Instance")
    assert private == [NewTag("04011001", "SS", "MicrosoftPC", Level.INSTANCE)]
    # a dictionary VR "US or SS" needs the VR; either one is accepted
    assert one(Path="00280106", VR="SS", Level="Instance")[0].vr == "SS"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"Path": "00101010", "VR": "XY", "Level": "Study"}, "unknown VR XY"),
        ({"Path": "00101010", "VR": "DA", "Level": "Study"}, "VR DA contradicts the dictionary's AS"),
        ({"Path": "0010101", "Level": "Study"}, "is malformed"),
        ({"Path": "0010 1010", "Level": "Study"}, "is malformed"),
        ({"Path": "NoSuchKeyword", "Level": "Study"}, "is not a DICOM keyword"),
        ({"Path": "00400275.00401001", "Level": "Series"}, "sequence paths"),
        ({"Path": "RequestAttributesSequence", "Level": "Series"}, "is a sequence"),
        ({"Path": "00101010", "VR": "SQ", "Level": "Study"}, "sequences (VR SQ)"),
        ({"Path": "04011001", "VR": "SS", "Level": "Instance"}, "needs its PrivateCreator"),
        ({"Path": "04011001", "PrivateCreator": "X", "Level": "Instance"}, "needs its VR"),
        ({"Path": "04010010", "VR": "LO", "PrivateCreator": "X", "Level": "Instance"}, "private creator"),
        ({"Path": "00101010", "PrivateCreator": "X", "Level": "Study"}, "only allowed for private tags"),
        ({"Path": "00101010"}, "Level is required"),
        ({"Path": "00101010", "Level": "Patient"}, "Level is required"),
        ({"Path": "7FE00010", "Level": "Instance"}, "VR OB or OW is not supported"),
        ({"Path": "00280106", "Level": "Instance"}, "allows VR US or SS; give the VR"),
        (
            {"Path": "00091001", "VR": "LO", "PrivateCreator": "X" * 65, "Level": "Study"},
            "PrivateCreator must",
        ),
        ({"Path": "00020010", "Level": "Instance"}, "file meta"),
        ({"Path": "00301234", "VR": "UL", "Level": "Instance"}, "not a tag of the DICOM dictionary"),
        ({"VR": "LO", "Level": "Instance"}, "Path is required"),
    ],
)
def test_bad_definitions(item: dict, message: str) -> None:
    with pytest.raises(TagError) as caught:
        validate_new_tags([item])
    assert caught.value.status == 400 and message in caught.value.message, caught.value.message


def test_bad_bodies() -> None:
    for body in ({}, [], "x", [1]):
        with pytest.raises(TagError) as caught:
            validate_new_tags(body)
        assert caught.value.status == 400
    with pytest.raises(TagError, match="given more than once"):
        validate_new_tags([{"Path": "PatientAge", "Level": "Study"}, {"Path": "00101010", "Level": "Study"}])
    too_many = [
        {"Path": f"0009{0x1000 + n:04X}", "VR": "LO", "PrivateCreator": "X", "Level": "Study"}
        for n in range(MAX_TAGS + 1)
    ]
    with pytest.raises(TagError, match=f"at most {MAX_TAGS}"):
        validate_new_tags(too_many)


def test_standard_searches_skip_tag_definitions() -> None:
    standard = [("PatientName", "x"), ("limit", "1"), ("includefield", "PatientAge"), ("NoSuchKey", "1")]
    assert not names_extended_tags(standard)
    assert names_extended_tags([("PatientAge", "045Y")]) and names_extended_tags([("00091001", "1")])


@pytest.mark.parametrize(
    ("vr", "value", "stored"),
    [
        ("AS", "045Y", "045Y"),
        ("AS", "45Y", BadValue),
        ("CS", "X" * 17, BadValue),
        ("UI", "1.02", BadValue),
        ("US", 65535, 65535),
        ("US", 65536, BadValue),
        ("SS", -32768, -32768),
        ("UL", -1, BadValue),
        ("IS", "42", 42),
        ("IS", True, BadValue),
        ("DS", "abc", BadValue),
        ("FL", 0.1, 0.10000000149011612),
        ("DA", "2020", BadValue),
        ("DA", "20200229", __import__("datetime").date(2020, 2, 29)),
        ("TM", "2500", BadValue),
        ("DT", "20201301", BadValue),
        ("PN", {"Alphabetic": "Doe^John^^"}, ("Doe^John^^==", "doe^john", "doe john")),
        # a NUL inside a value: PostgreSQL text refuses it, which failed the store (272) instead of
        # recording an error for the instance
        ("LO", "pro\0to", BadValue),
        ("PN", {"Alphabetic": "Doe\0John"}, BadValue),
    ],
)
def test_value_conversion(vr: str, value: Any, stored: Any) -> None:
    if stored is BadValue:
        with pytest.raises(BadValue):
            convert(vr, value)
    else:
        assert convert(vr, value) == stored


# --- database helpers -------------------------------------------------------------------------------------


def record(attrs: dict, partition_key: int = 1) -> InstanceRecord:
    blob = orjson.dumps(attrs)
    sop = attrs["00080018"]["Value"][0]
    return InstanceRecord(
        study_instance_uid=attrs["0020000D"]["Value"][0],
        series_instance_uid=attrs["0020000E"]["Value"][0],
        sop_instance_uid=sop,
        sop_class_uid=CT,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        attrs=attrs,
        storage_key=f"{partition_key}/{sop}",
        size=len(blob),
        sha256=hashlib.sha256(blob).digest(),
        metadata=blob,
    )


def dataset(study: str, series: str, sop: str, **elements: dict) -> dict:
    """DICOM JSON with the hierarchy's UIDs and the given elements (keyword or GGGGEEEE -> element)."""
    out = {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080016": {"vr": "UI", "Value": [CT]},
    }
    for name, element in elements.items():
        out[tag_hex(parse_tag(name))] = element
    return dict(sorted(out.items()))


async def store(pool: asyncpg.Pool, instances: list[dict], batch: int = 16) -> None:
    for start in range(0, len(instances), batch):
        async with pool.acquire() as conn, conn.transaction():
            results = await index_instances(conn, 1, [record(a) for a in instances[start : start + batch]])
        assert all(r.instance_key is not None for r in results), results


async def define(pool: asyncpg.Pool, *items: dict) -> Any:
    async with pool.acquire() as conn, conn.transaction():
        op, _ = await add_tags(conn, validate_new_tags(list(items)))
    return op


async def reindex(pool: asyncpg.Pool, batch_size: int = 100) -> None:
    runner = OperationRunner(pool, {"reindex": ReindexHandler(batch_size)})
    while await runner.run_once():
        pass


async def delete(pool: asyncpg.Pool, name: str) -> Operation | None:
    """DELETE as the API does it: the tag is marked Deleting and its deletion operation queued."""
    async with pool.acquire() as conn, conn.transaction():
        return await delete_tag(conn, parse_tag(name))


async def run_deletions(pool: asyncpg.Pool, batch_size: int = 100) -> None:
    runner = OperationRunner(pool, {DELETE_TAG: TagDeletionHandler(batch_size)})
    while await runner.run_once():
        pass


async def find(pool: asyncpg.Pool, level: Level, params: list[tuple[str, str]], **kw: Any) -> list[str]:
    key = {Level.STUDY: "0020000D", Level.SERIES: "0020000E", Level.INSTANCE: "00080018"}[level]
    async with pool.acquire() as conn:
        query = parse_query(level, params, extended=await query_tags(conn), **kw)
        return [r[key]["Value"][0] for r in await search(conn, 1, query, BASE)]


async def tag_state(pool: asyncpg.Pool, name: str) -> tuple[str, str, int]:
    async with pool.acquire() as conn:
        tag = await get_tag(conn, parse_tag(name))
    assert tag is not None
    return tag.status, tag.query_status, tag.error_count


# --- re-index and writes ----------------------------------------------------------------------------------


async def test_reindex_fills_every_level_and_records_errors(pool: asyncpg.Pool) -> None:
    ages = ["045Y", "030Y", "4Y"]  # the third study's age is malformed
    instances = [
        dataset(
            f"1.2.{s}",
            f"1.2.{s}.{se}",
            f"1.2.{s}.{se}.{i}",
            PatientAge={"vr": "AS", "Value": [ages[s]]},
            ProtocolName={"vr": "LO", "Value": [f"proto {se}"]},
            SliceThickness={"vr": "DS", "Value": [1.25 * i, 5]},
            ContentDate={"vr": "DA", "Value": ["20200101" if i else "2020"]},
        )
        for s in range(3)
        for se in range(2)
        for i in range(3)
    ]
    await store(pool, instances)
    op = await define(
        pool,
        {"Path": "PatientAge", "Level": "Study"},
        {"Path": "ProtocolName", "Level": "Series"},
        {"Path": "SliceThickness", "Level": "Instance"},
        {"Path": "ContentDate", "Level": "Instance"},
    )
    assert await tag_state(pool, "PatientAge") == ("Adding", "Enabled", 0)
    with pytest.raises(QueryError, match="not ready"):
        await find(pool, Level.STUDY, [("PatientAge", "045Y")])
    await reindex(pool, batch_size=4)
    async with pool.acquire() as conn:
        done = await get_operation(conn, op.id)
    assert done is not None and done.status == "succeeded" and done.percent_complete == 100
    assert done.results == {
        "tags": ["00080023", "00101010", "00180050", "00181030"],
        "processedRows": 3 + 6 + 18,
        "errors": 1 + 6,
    }
    assert await tag_state(pool, "PatientAge") == ("Ready", "Disabled", 1)  # the study's latest instance
    assert await tag_state(pool, "ContentDate") == ("Ready", "Disabled", 6)
    assert await tag_state(pool, "SliceThickness") == ("Ready", "Enabled", 0)
    assert await find(pool, Level.SERIES, [("ProtocolName", "proto 1")]) == ["1.2.0.1", "1.2.1.1", "1.2.2.1"]
    assert await find(pool, Level.SERIES, [("ProtocolName", "*0")]) == ["1.2.0.0", "1.2.1.0", "1.2.2.0"]
    # multiple values: any may match; the study scope applies too
    assert await find(pool, Level.INSTANCE, [("SliceThickness", "5")], study_uid="1.2.1") == [
        f"1.2.1.{se}.{i}" for se in range(2) for i in range(3)
    ]
    assert await find(pool, Level.INSTANCE, [("SliceThickness", "2.5\\0")], study_uid="1.2.0") == [
        "1.2.0.0.0", "1.2.0.0.2", "1.2.0.1.0", "1.2.0.1.2"
    ]  # fmt: skip
    with pytest.raises(QueryError, match="disabled"):
        await find(pool, Level.STUDY, [("PatientAge", "045Y")])
    async with pool.acquire() as conn:
        await conn.execute("UPDATE extended_query_tag SET query_status = 'Enabled'")
    assert await find(pool, Level.STUDY, [("PatientAge", "0*")]) == ["1.2.0", "1.2.1"]
    async with pool.acquire() as conn:
        query = parse_query(Level.STUDY, [("PatientAge", "045Y")], extended=await query_tags(conn))
    assert query.erroneous == ("PatientAge",)
    # an instance-level tag is not a key of study searches
    with pytest.raises(QueryError, match="not a matching key of study searches"):
        await find(pool, Level.STUDY, [("SliceThickness", "5")])


async def test_new_stores_fill_tags_and_replace_study_values(pool: asyncpg.Pool) -> None:
    await define(pool, {"Path": "PatientAge", "Level": "Study"}, {"Path": "ContentTime", "Level": "Instance"})
    await reindex(pool)
    first = dataset("1.3.1", "1.3.1.1", "1.3.1.1.1", PatientAge={"vr": "AS", "Value": ["010Y"]},
                    ContentTime={"vr": "TM", "Value": ["101500"]})  # fmt: skip
    await store(pool, [first])
    assert await find(pool, Level.STUDY, [("PatientAge", "010Y")]) == ["1.3.1"]
    assert await find(pool, Level.INSTANCE, [("ContentTime", "10-1015")]) == ["1.3.1.1.1"]
    # a later instance of the study supplies the study's values, as it does the study's attributes
    second = dataset("1.3.1", "1.3.1.1", "1.3.1.1.2", PatientAge={"vr": "AS", "Value": ["011Y"]})
    await store(pool, [second])
    assert await find(pool, Level.STUDY, [("PatientAge", "010Y")]) == []
    assert await find(pool, Level.STUDY, [("PatientAge", "011Y")]) == ["1.3.1"]
    # a bad value is stored all the same and recorded as an error, without disabling the tag
    await store(pool, [dataset("1.3.2", "1.3.2.1", "1.3.2.1.1", ContentTime={"vr": "TM", "Value": ["99"]})])
    assert await tag_state(pool, "ContentTime") == ("Ready", "Enabled", 1)
    # deleting instances removes their values and errors
    async with pool.acquire() as conn, conn.transaction():
        from indexer.writes import remove_instances

        await remove_instances(conn, 1, "1.3.2")
        await remove_instances(conn, 1, "1.3.1")
    assert await tag_state(pool, "ContentTime") == ("Ready", "Enabled", 0)
    counts = [await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ("ext_string", "ext_time")]
    assert counts == [0, 0]


async def test_private_tags_are_found_through_their_creator(pool: asyncpg.Pool) -> None:
    def private(sop: str, block: int, value: int) -> dict:
        attrs = dataset("1.4.1", "1.4.1.1", sop)
        attrs[f"0009{block:02X}10"[:4] + f"00{block:02X}"] = {"vr": "LO", "Value": ["ACME 1"]}
        attrs[f"0009{block:02X}01"] = {"vr": "US", "Value": [value]}
        attrs["00090011"] = {"vr": "LO", "Value": ["OTHER"]}  # another creator's block
        attrs["00091101"] = {"vr": "US", "Value": [999]}
        return attrs

    await store(pool, [private("1.4.1.1.1", 0x10, 7), private("1.4.1.1.2", 0x12, 8)])
    await define(pool, {"Path": "00091001", "VR": "US", "PrivateCreator": "ACME 1", "Level": "Instance"})
    await reindex(pool)
    assert await find(pool, Level.INSTANCE, [("00091001", "7")]) == ["1.4.1.1.1"]
    assert await find(pool, Level.INSTANCE, [("00091001", "8")]) == ["1.4.1.1.2"]
    assert await find(pool, Level.INSTANCE, [("00091001", "999")]) == []


async def test_study_level_tag_outside_the_study_blob_is_returned(pool: asyncpg.Pool) -> None:
    """A study-level private tag is not in the study attrs blob: results take it from the latest instance."""
    attrs = dataset("1.4.4", "1.4.4.1", "1.4.4.1.1")
    attrs["00290010"] = {"vr": "LO", "Value": ["ACME"]}
    attrs["00291005"] = {"vr": "CS", "Value": ["ARM"]}
    await store(pool, [attrs, dataset("1.4.5", "1.4.5.1", "1.4.5.1.1")])
    await define(pool, {"Path": "00291005", "VR": "CS", "PrivateCreator": "ACME", "Level": "Study"})
    await reindex(pool)
    async with pool.acquire() as conn:
        query = parse_query(Level.STUDY, [("00291005", "A*")], extended=await query_tags(conn))
        (result,) = await search(conn, 1, query, BASE)
    assert result["0020000D"]["Value"] == ["1.4.4"]
    assert result["00291005"] == {"vr": "CS", "Value": ["ARM"]}


async def test_tags_are_global_and_partitions_stay_apart(pool: asyncpg.Pool) -> None:
    other = await pool.fetchval("INSERT INTO partition (name) VALUES ('other') RETURNING partition_key")
    await store(pool, [dataset("1.4.2", "1.4.2.1", "1.4.2.1.1", StationName={"vr": "SH", "Value": ["ONE"]})])
    async with pool.acquire() as conn, conn.transaction():
        copy = dataset("1.4.3", "1.4.3.1", "1.4.3.1.1", StationName={"vr": "SH", "Value": ["ONE"]})
        await index_instances(conn, other, [record(copy, partition_key=other)])
    await define(pool, {"Path": "StationName", "Level": "Instance"})
    await reindex(pool)
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 2  # both partitions indexed
    async with pool.acquire() as conn:
        extended = await query_tags(conn)
        for key, expected in ((1, "1.4.2.1.1"), (other, "1.4.3.1.1")):
            query = parse_query(Level.INSTANCE, [("StationName", "ONE")], extended=extended)
            assert [r["00080018"]["Value"][0] for r in await search(conn, key, query, BASE)] == [expected]


async def test_reindex_while_stores_continue(pool: asyncpg.Pool) -> None:
    """Writers keep storing while the tag is added and re-indexed: every instance ends with exactly one value
    (none missed, none twice), whichever of the re-index and the writes filled it."""

    def inst(n: int) -> dict:
        return dataset(f"1.5.{n // 10}", f"1.5.{n // 10}.1", f"1.5.{n // 10}.1.{n % 10}",
                       AcquisitionNumber={"vr": "IS", "Value": [n]})  # fmt: skip

    await store(pool, [inst(n) for n in range(300)])
    stop = asyncio.Event()
    counter = iter(range(300, 100_000))

    async def writer() -> int:
        written = 0
        while not stop.is_set():
            await store(pool, [inst(next(counter)) for _ in range(7)], batch=7)
            written += 7
            await asyncio.sleep(0)
        return written

    writers = [asyncio.create_task(writer()) for _ in range(3)]
    await asyncio.sleep(0.05)
    await define(pool, {"Path": "AcquisitionNumber", "Level": "Instance"})
    runner = OperationRunner(pool, {"reindex": ReindexHandler(batch_size=25)})
    await runner.run_once()
    stop.set()
    written = sum(await asyncio.gather(*writers))
    assert written > 0
    total = 300 + written
    rows = await pool.fetch(
        """SELECT i.instance_key, count(v.row_key) AS n, min(v.value) AS value
           FROM instance i LEFT JOIN ext_long v ON v.row_key = i.instance_key GROUP BY i.instance_key"""
    )
    assert len(rows) == total
    assert all(r["n"] == 1 for r in rows), [dict(r) for r in rows if r["n"] != 1][:5]
    assert sorted(r["value"] for r in rows) == list(range(total))
    assert await find(pool, Level.INSTANCE, [("AcquisitionNumber", "299")]) == ["1.5.29.1.9"]


async def test_killed_reindex_resumes_on_another_worker(pool: asyncpg.Pool) -> None:
    instances = [
        dataset(
            f"1.6.{n // 10}",
            f"1.6.{n // 10}.1",
            f"1.6.{n // 10}.1.{n % 10}",
            StationName={"vr": "SH", "Value": [f"S{n}"]},
        )
        for n in range(95)
    ]
    await store(pool, instances)
    op = await define(pool, {"Path": "StationName", "Level": "Instance"})
    dying = OperationRunner(pool, {"reindex": ReindexHandler(10)}, worker="dying", lease_seconds=0.3)
    assert await dying.claim() is not None
    token = dying._token
    assert token is not None
    for _ in range(3):
        assert await dying.run_step(op.id, token)
    # killed: the lease is left to expire; another process resumes from the checkpoint
    await asyncio.sleep(0.4)
    survivor = OperationRunner(pool, {"reindex": ReindexHandler(10)}, worker="survivor")
    resumed = await survivor.claim()
    assert resumed is not None and resumed.checkpoint is not None
    assert resumed.checkpoint["after"] == 30 and resumed.percent_complete == 31
    assert survivor._token is not None
    while await survivor.run_step(op.id, survivor._token):
        pass
    with pytest.raises(LeaseLost):
        await dying.run_step(op.id, token)
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 95
    assert await pool.fetchval("SELECT count(DISTINCT row_key) FROM ext_string") == 95
    assert await tag_state(pool, "StationName") == ("Ready", "Enabled", 0)


async def test_deleting_a_tag_while_its_reindex_runs(pool: asyncpg.Pool) -> None:
    instances = [
        dataset(
            f"1.7.{n}",
            f"1.7.{n}.1",
            f"1.7.{n}.1.1",
            StationName={"vr": "SH", "Value": ["A"]},
            ProtocolName={"vr": "LO", "Value": ["B"]},
        )
        for n in range(60)
    ]
    await store(pool, instances)
    op = await define(
        pool, {"Path": "StationName", "Level": "Instance"}, {"Path": "ProtocolName", "Level": "Instance"}
    )
    runner = OperationRunner(pool, {"reindex": ReindexHandler(10)})
    await runner.claim()
    token = runner._token
    assert token is not None and await runner.run_step(op.id, token)
    station_key = await pool.fetchval("SELECT tag_key FROM extended_query_tag WHERE path = '00081010'")
    assert await pool.fetchval("SELECT count(*) FROM ext_string WHERE tag_key = $1", station_key) == 10
    # one of two tags: the operation goes on without it; its values stay until the deletion runs
    assert await delete(pool, "StationName") is not None
    async with pool.acquire() as conn:
        reindexing = await get_operation(conn, op.id)
    assert reindexing is not None and reindexing.status == "running"
    assert reindexing.params["tags"] == [station_key + 1]
    assert await runner.run_step(op.id, token)
    assert await pool.fetchval("SELECT count(*) FROM ext_string WHERE tag_key = $1", station_key) == 10
    # the last one: the re-index is canceled
    assert await delete(pool, "ProtocolName") is not None
    with pytest.raises(TagError, match="being deleted already"):
        await delete(pool, "ProtocolName")
    with pytest.raises(LeaseLost):
        await runner.run_step(op.id, token)
    async with pool.acquire() as conn:
        canceled = await get_operation(conn, op.id)
        assert {t.path: t.status for t in (await query_tags(conn)).values()} == {
            "00081010": "Deleting",
            "00181030": "Deleting",
        }
    assert canceled is not None and canceled.status == "canceled"
    assert canceled.results == {"reason": "its extended query tags were deleted"}
    with pytest.raises(QueryError, match="not ready for queries \\(status Deleting\\)"):
        await find(pool, Level.INSTANCE, [("ProtocolName", "B")])
    await run_deletions(pool)
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 0
    async with pool.acquire() as conn:
        assert await query_tags(conn) == {}
    with pytest.raises(QueryError, match="not a matching key"):
        await find(pool, Level.INSTANCE, [("ProtocolName", "B")])


async def test_deleting_while_a_step_runs_waits_for_it(pool: asyncpg.Pool) -> None:
    """A DELETE during a re-index step waits for the step's commit; the deletion removes what it wrote too."""
    instances = [dataset(f"1.8.{n}", f"1.8.{n}.1", f"1.8.{n}.1.1", StationName={"vr": "SH", "Value": ["A"]})
                 for n in range(40)]  # fmt: skip
    await store(pool, instances)
    await define(pool, {"Path": "StationName", "Level": "Instance"})

    written = asyncio.Event()

    class Slow(ReindexHandler):
        async def step(self, conn: asyncpg.Connection, op: Any) -> Any:
            result = await super().step(conn, op)
            written.set()  # the batch's values are written, not yet committed
            # until the DELETE waits for this step's lock (a fixed pause lost that race on a loaded machine)
            waiting = """SELECT EXISTS (SELECT FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock')"""
            async with asyncio.timeout(30):
                while True:
                    if await pool.fetchval(waiting):
                        return result
                    await asyncio.sleep(0.01)

    runner = OperationRunner(pool, {"reindex": Slow(10)})
    task = asyncio.create_task(runner.run_once())
    await asyncio.wait_for(written.wait(), 30)
    assert await delete(pool, "StationName") is not None
    # it returned after the step committed: that step's 10 values are there. (A next step may have taken the
    # row first: PostgreSQL lets a new locker of a row that was just released in before a waiter.)
    written_values = await pool.fetchval("SELECT count(*) FROM ext_string")
    assert written_values in (10, 20, 30, 40), written_values
    await task
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == written_values  # no step after it
    assert await pool.fetchval("SELECT status FROM operation WHERE type = 'reindex'") == "canceled"
    await run_deletions(pool)
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 0


async def test_reindex_and_a_store_of_several_studies_do_not_deadlock(pool: asyncpg.Pool) -> None:
    """A store locks its studies in UID order; a re-index batch locks them too, and must take the same order
    as a range of keys does not: study 1.2.9 is stored (and keyed) before 1.2.10, whose UID sorts first."""
    station = {"StationName": {"vr": "SH", "Value": ["S1"]}}
    for s in (9, 10):  # one at a time: 1.2.9 gets the smaller key
        await store(pool, [dataset(f"1.2.{s}", f"1.2.{s}.1", f"1.2.{s}.1.1", **station)])
    await define(pool, {"Path": "StationName", "Level": "Study"})
    failures: list[BaseException] = []

    class Recording(ReindexHandler):
        async def step(self, conn: asyncpg.Connection, op: Any) -> Any:
            try:
                return await super().step(conn, op)
            except BaseException as exc:
                failures.append(exc)
                raise

    async def waiting(count: int) -> None:
        query = """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"""
        async with asyncio.timeout(30):
            while True:
                if await pool.fetchval(query) >= count:
                    return
                await asyncio.sleep(0.01)

    later = [dataset(f"1.2.{s}", f"1.2.{s}.1", f"1.2.{s}.1.2", **station) for s in (9, 10)]
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT FROM study WHERE study_instance_uid = '1.2.10' FOR UPDATE")
        storing = asyncio.create_task(store(pool, later))  # holds nothing yet: 1.2.10 is its first lock
        await waiting(1)
        runner = OperationRunner(pool, {"reindex": Recording(10)})
        reindexing = asyncio.create_task(runner.run_once())
        await waiting(2)
        await tx.rollback()
    await asyncio.wait_for(storing, 30)
    await asyncio.wait_for(reindexing, 30)
    assert failures == []
    while await runner.run_once():
        pass
    assert sorted(await find(pool, Level.STUDY, [("StationName", "S1")])) == ["1.2.10", "1.2.9"]


async def test_killed_deletion_resumes_on_another_worker(pool: asyncpg.Pool) -> None:
    """Values, then elements, then errors go in batches; a worker killed mid-way leaves the rest to the next
    claimant."""
    instances = [
        dataset(
            f"1.9.{n // 10}",
            f"1.9.{n // 10}.1",
            f"1.9.{n // 10}.1.{n % 10}",
            StationName={"vr": "SH", "Value": [f"S{n}", f"T{n}"] if n < 20 else ["x" * 17]},  # SH <= 16
        )
        for n in range(95)
    ]
    await store(pool, instances)
    await define(pool, {"Path": "StationName", "Level": "Instance"})
    await reindex(pool)
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 40
    assert await pool.fetchval("SELECT count(*) FROM extended_query_tag_error") == 75
    assert await pool.fetchval("SELECT count(*) FROM ext_element") == 95  # malformed values have theirs
    op = await delete(pool, "StationName")
    assert op is not None and op.type == DELETE_TAG and op.status == "notStarted"
    assert await tag_state(pool, "StationName") == ("Deleting", "Disabled", 75)
    dying = OperationRunner(pool, {DELETE_TAG: TagDeletionHandler(15)}, worker="dying", lease_seconds=0.3)
    assert await dying.claim() is not None
    token = dying._token
    assert token is not None
    for _ in range(4):  # 15 + 15 + 10 values, then 15 elements
        assert await dying.run_step(op.id, token)
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 0
    assert await pool.fetchval("SELECT count(*) FROM ext_element") == 80
    assert await pool.fetchval("SELECT count(*) FROM extended_query_tag_error") == 75
    # killed: the lease is left to expire; another process resumes
    await asyncio.sleep(0.4)
    survivor = OperationRunner(pool, {DELETE_TAG: TagDeletionHandler(15)}, worker="survivor")
    resumed = await survivor.claim()
    assert resumed is not None
    assert resumed.checkpoint == {"total": 210, "values": 40, "elements": 15, "errors": 0}
    assert resumed.percent_complete == 25  # 55 of 210
    assert survivor._token is not None
    while await survivor.run_step(op.id, survivor._token):
        pass
    with pytest.raises(LeaseLost):
        await dying.run_step(op.id, token)
    async with pool.acquire() as conn:
        done = await get_operation(conn, op.id)
        assert await get_tag(conn, parse_tag("StationName")) is None
    assert done is not None and done.status == "succeeded" and done.attempts == 2
    assert done.results == {"tag": "00081010", "deletedValues": 40, "deletedErrors": 75}
    assert await pool.fetchval("SELECT count(*) FROM extended_query_tag_error") == 0
    assert await pool.fetchval("SELECT count(*) FROM ext_element") == 0


async def test_stores_during_a_deletion_skip_the_tag(pool: asyncpg.Pool) -> None:
    """Once DELETE has committed, stores write no values or errors of the tag, nor wait for the deletion's
    steps; the path can be added again only when the deletion has finished."""

    def inst(n: int, station: str) -> dict:
        age = "4Y" if n % 2 else "045Y"  # malformed in odd studies
        station_name, patient_age = {"vr": "SH", "Value": [station]}, {"vr": "AS", "Value": [age]}
        return dataset(
            f"1.10.{n}", f"1.10.{n}.1", f"1.10.{n}.1.1", StationName=station_name, PatientAge=patient_age
        )

    await store(pool, [inst(n, "OLD") for n in range(30)])
    await define(pool, {"Path": "StationName", "Level": "Instance"}, {"Path": "PatientAge", "Level": "Study"})
    await reindex(pool)
    assert await delete(pool, "StationName") is not None
    assert await delete(pool, "PatientAge") is not None
    counts = "SELECT (SELECT count(*) FROM ext_string), (SELECT count(*) FROM extended_query_tag_error)"
    assert tuple(await pool.fetchrow(counts)) == (45, 15)  # AS values are strings too

    release = asyncio.Event()
    stepping = asyncio.Event()

    class Held(TagDeletionHandler):
        """Keeps its first step's transaction open (values deleted, not committed) until released."""

        async def step(self, conn: asyncpg.Connection, op: Any) -> Any:
            result = await super().step(conn, op)
            if not stepping.is_set():
                stepping.set()
                await release.wait()
            return result

    runner = OperationRunner(pool, {DELETE_TAG: Held(10)})
    task = asyncio.create_task(run_all(runner))
    await asyncio.wait_for(stepping.wait(), 10)
    # a store while the step is open neither waits for it nor writes values or errors of the tags
    await asyncio.wait_for(store(pool, [inst(n, "NEW") for n in range(30, 40)]), 10)
    assert tuple(await pool.fetchrow(counts)) == (45, 15)  # AS values are strings too
    with pytest.raises(TagError, match="still being deleted: 00081010"):
        await define(pool, {"Path": "StationName", "Level": "Instance"})
    with pytest.raises(QueryError, match="status Deleting"):
        await find(pool, Level.INSTANCE, [("StationName", "NEW")])
    release.set()
    await asyncio.wait_for(task, 30)
    assert tuple(await pool.fetchrow(counts)) == (0, 0)
    assert await pool.fetchval("SELECT count(*) FROM extended_query_tag") == 0
    # added again: a new re-index fills it for everything, the stores made during the deletion included
    await define(pool, {"Path": "StationName", "Level": "Instance"})
    await reindex(pool)
    assert len(await find(pool, Level.INSTANCE, [("StationName", "NEW")])) == 10
    assert len(await find(pool, Level.INSTANCE, [("StationName", "OLD")])) == 30


async def test_a_failed_deletion_is_queued_again_by_delete(pool: asyncpg.Pool) -> None:
    await store(pool, [dataset("1.11.1", "1.11.1.1", "1.11.1.1.1", StationName={"vr": "SH", "Value": ["A"]})])
    await define(pool, {"Path": "StationName", "Level": "Instance"})
    await reindex(pool)
    first = await delete(pool, "StationName")
    assert first is not None
    async with pool.acquire() as conn:
        await conn.execute("UPDATE operation SET status = 'failed' WHERE operation_id = $1", first.id)
    second = await delete(pool, "StationName")
    assert second is not None and second.id != first.id
    await run_deletions(pool)
    assert await pool.fetchval("SELECT count(*) FROM extended_query_tag") == 0
    assert await pool.fetchval("SELECT count(*) FROM ext_string") == 0


async def run_all(runner: OperationRunner) -> None:
    while await runner.run_once():
        pass


# --- hypothesis: matching compared with the reference ------------------------------------------------------

TAGS: dict[str, str] = {  # keyword -> VR, one standard attribute per supported VR
    "StationAETitle": "AE", "PatientAge": "AS", "BodyPartExamined": "CS", "ContentDate": "DA",
    "SliceThickness": "DS", "AcquisitionDateTime": "DT", "EventTimeOffset": "FD",
    "RecommendedDisplayFrameRateInFloat": "FL", "AcquisitionNumber": "IS", "ProtocolName": "LO",
    "PerformingPhysicianName": "PN", "StationName": "SH", "ReferencePixelX0": "SL",
    "TagAngleSecondAxis": "SS", "ContentTime": "TM", "FrameOfReferenceUID": "UI",
    "NumberOfStudyRecordsInInstance": "UL", "Rows": "US",
}  # fmt: skip
STORED: dict[str, list[Any]] = {
    "AE": ["STORESCP", "store", "AE_1", "A" * 17],
    "AS": ["045Y", "003M", "45Y", "120D"],
    "CS": ["HEAD", "CHEST", "head", "ABDOMEN PELVIS", "X" * 17],
    "LO": ["Brain MRI", "brain mri", "Spine_1", "P%1", "x" * 65],
    "SH": ["SCANNER1", "scanner2", "S_1", "s" * 17],
    "UI": ["1.2.3", "1.2.30", "1.02", "1.2.3.4"],
    "PN": [{"Alphabetic": "Doe^John"}, {"Alphabetic": "Müller^Ann"}, {"Alphabetic": "DOE^JANE^^"},
           {"Ideographic": "山田^太郎"}],
    "DA": ["20200101", "20200229", "20201301", "19991231"],
    "TM": ["10", "1030", "103015.5", "2500", "235959.999999"],
    "DT": ["2020", "202002", "20200229133059", "20200229133060.5", "2020022913+0100", "20201301"],
    "IS": [1, 2, -5, 2**31],
    "SL": [0, -(2**31), 2**31 - 1, 2**31],
    "SS": [1, -32768, 40000],
    "UL": [0, 4294967295, -1],
    "US": [0, 65535, 65536, 1],
    "DS": [1.25, 0.1, -3.0, 1e10, "abc"],
    "FD": [0.1, 1.5, -2.25],
    "FL": [0.10000000149011612, 1.5, 3.4e38],
}  # fmt: skip
QUERY_EXTRAS: dict[str, list[str]] = {
    "string": ["*", "?", "S*", "*1", "h??d", "x", ""],
    "PN": ["doe", "doe*", "DOE^JOHN", "müller", "ann", "yam", "=山田", "d?e^j*"],
    "DA": ["20200101-20200229", "-20200101", "2020", "20200230", "20201231-20200101"],
    "TM": ["10-11", "1030-", "0930-1030", "25", "10:30"],
    "DT": ["2020-2021", "202002-", "-2019", "20200229133059.5", "2020+0100", "2021-2020", "x"],
    "int": ["0", "1", "-1", "1.5", "70000", "4294967296", "a", "1*"],
    "float": ["0.1", "1.5", "1e10", "-3", "1e999", "x", ".5"],
}
_KIND = {**dict.fromkeys(("AE", "AS", "CS", "LO", "SH", "UI"), "string"), "PN": "PN", "DA": "DA", "TM": "TM",
         "DT": "DT", **dict.fromkeys(("IS", "SL", "SS", "UL", "US"), "int"),
         **dict.fromkeys(("DS", "FD", "FL"), "float")}  # fmt: skip
EXTENDED_REF = {k: (tag_hex(parse_tag(k)), vr, "instance") for k, vr in TAGS.items()}


@st.composite
def ext_archives(draw: st.DrawFn) -> list[dict]:
    out = []
    for n in range(draw(st.integers(1, 6))):
        elements = {}
        for keyword in draw(st.lists(st.sampled_from(sorted(TAGS)), max_size=8, unique=True)):
            vr = TAGS[keyword]
            values = draw(st.lists(st.sampled_from(STORED[vr]), min_size=1, max_size=2))
            elements[keyword] = {"vr": vr, "Value": values}
        out.append(dataset(f"1.9.{n % 2}", f"1.9.{n % 2}.1", f"1.9.{n % 2}.1.{n}", **elements))
    return out


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("Alphabetic", "")
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def ext_query(draw: st.DrawFn, archive: list[dict]) -> list[tuple[str, str]]:
    params = []
    for keyword in draw(st.lists(st.sampled_from(sorted(TAGS)), min_size=1, max_size=2, unique=True)):
        vr = TAGS[keyword]
        kind = _KIND[vr]
        values = (draw(st.sampled_from(archive)).get(tag_hex(parse_tag(keyword))) or {}).get("Value") or []
        if values and draw(st.integers(0, 3)):
            stored = _text(draw(st.sampled_from(values)))
            if kind == "string" and stored and draw(st.booleans()):
                cut = draw(st.integers(0, len(stored) - 1))
                stored = draw(st.sampled_from([stored[:cut] + "*", stored[:cut] + "?" + stored[cut + 1 :],
                                               stored.lower()]))  # fmt: skip
            elif kind in ("DA", "DT") and draw(st.booleans()):
                stored = draw(
                    st.sampled_from([f"{stored}-", f"-{stored}", stored[:4], f"{stored[:4]}-{stored}"])
                )
            elif kind == "TM" and draw(st.booleans()):
                stored = draw(st.sampled_from([f"{stored}-", f"-{stored}", stored[:2]]))
            elif kind == "PN" and draw(st.booleans()):
                stored = stored.split("^")[0][:3] + "*"
            value = stored
        else:
            value = draw(st.sampled_from(QUERY_EXTRAS[kind]))
        if draw(st.integers(0, 4)) == 0:
            value = f"{value}\\{draw(st.sampled_from(QUERY_EXTRAS[kind]))}"
        params.append((keyword, value))
    if draw(st.integers(0, 3)) == 0:
        params.append(("fuzzymatching", "true"))
    if draw(st.integers(0, 3)) == 0:
        params.append(("limit", draw(st.sampled_from(["1", "2"]))))
        params.append(("offset", draw(st.sampled_from(["0", "1"]))))
    return params


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_matching_agrees_with_reference(pool: asyncpg.Pool, data: st.DataObject) -> None:
    archive = data.draw(ext_archives(), label="archive")
    async with pool.acquire() as conn:
        await conn.execute(
            "TRUNCATE instance, series, study, patient, extended_query_tag, extended_query_tag_error,"
            " operation, ext_string, ext_long, ext_double, ext_date, ext_time, ext_datetime,"
            " ext_person_name CASCADE"
        )
    before = data.draw(st.booleans(), label="tags defined before the instances are stored")
    items = [{"Path": k, "Level": "Instance"} for k in TAGS]
    if before:
        await define(pool, *items)
        await reindex(pool)
        await store(pool, archive, batch=3)
    else:
        await store(pool, archive, batch=3)
        await define(pool, *items)
        await reindex(pool, batch_size=2)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE extended_query_tag SET query_status = 'Enabled'")
        extended = await query_tags(conn)
    for _ in range(8):
        params = data.draw(ext_query(archive), label="query")
        try:
            expected = ref.search(archive, "instance", params, extended=EXTENDED_REF)
        except ref.ReferenceQueryError:
            event("invalid query")
            with pytest.raises(QueryError):
                parse_query(Level.INSTANCE, params, extended=extended)
            continue
        query: QidoQuery = parse_query(Level.INSTANCE, params, extended=extended)
        async with pool.acquire() as conn:
            results = await search(conn, 1, query, BASE)
        event(f"{'no' if not results else 'some'} matches")
        assert [r["00080018"]["Value"][0] for r in results] == expected, params


# --- HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture
async def client(local_archive: RunningArchive) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=30) as client:
        yield client


async def stow_study(client: httpx.AsyncClient, seed: int, count: int = 3, **overrides: Any) -> Any:
    import random

    spec = make_study(random.Random(seed), series_count=1)
    files = []
    for n in range(count):
        ds = make_instance(spec, 0, n + 1, rows=8, columns=8)
        with warnings.catch_warnings():  # pydicom warns about the malformed values some tests want
            warnings.simplefilter("ignore")
            for keyword, value in overrides.items():
                setattr(ds, keyword, value)
        files.append(to_bytes(ds))
    body, content_type = multipart_body(files)
    response = await client.post("/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    return spec


async def wait_done(client: httpx.AsyncClient, href: str) -> dict:
    for _ in range(300):
        response = await client.get(href)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        await asyncio.sleep(0.1)
    raise AssertionError("the operation did not finish")


async def test_http_api(client: httpx.AsyncClient, local_archive: RunningArchive) -> None:
    spec = await stow_study(client, 1)
    spec2 = await stow_study(client, 2, PatientAge="4Y")  # malformed AS
    body = [
        {"Path": "PatientAge", "Level": "Study"},
        {"Path": "00181030", "VR": "LO", "Level": "Series"},  # ProtocolName
        {"Path": "SliceLocation", "Level": "Instance"},
    ]
    response = await client.post("/extendedquerytags", json=body)
    assert response.status_code == 202, response.text
    reference = response.json()
    assert set(reference) == {"id", "href"} and len(reference["id"]) == 32
    assert reference["href"] == f"{local_archive.url}/operations/{reference['id']}"
    operation = await wait_done(client, reference["href"])
    assert operation["status"] == "succeeded" and operation["percentComplete"] == 100
    assert operation["type"] == "reindex" and operation["id"] == reference["id"]
    assert operation["resources"] == [
        f"{local_archive.url}/extendedquerytags/{p}" for p in ("00101010", "00181030", "00201041")
    ]
    assert operation["createdTime"].endswith("Z") and operation["lastUpdatedTime"] >= operation["createdTime"]
    assert operation["results"]["errors"] == 1

    listed = (await client.get("/extendedquerytags")).json()
    assert listed == [
        {"path": "00101010", "vr": "AS", "level": "Study", "status": "Ready", "queryStatus": "Disabled",
         "errors": {"count": 1, "href": f"{local_archive.url}/extendedquerytags/00101010/errors"}},
        {"path": "00181030", "vr": "LO", "level": "Series", "status": "Ready", "queryStatus": "Enabled"},
        {"path": "00201041", "vr": "DS", "level": "Instance", "status": "Ready", "queryStatus": "Enabled"},
    ]  # fmt: skip
    assert [t["path"] for t in (await client.get("/extendedquerytags?limit=1&offset=1")).json()] == [
        "00181030"
    ]
    assert (await client.get("/extendedquerytags?limit=0")).status_code == 400
    assert (await client.get("/extendedquerytags/SliceLocation")).json()["path"] == "00201041"
    assert (await client.get("/extendedquerytags/00100020")).status_code == 404
    assert (await client.get("/extendedquerytags/0010002")).status_code == 400
    # tags are global: other service roots show the same ones
    v1 = orjson.loads(orjson.dumps(listed).replace(b"/v2/", b"/v1/"))
    assert (await client.get(f"{local_archive.base}/v1/extendedquerytags")).json() == v1

    errors = (await client.get("/extendedquerytags/PatientAge/errors")).json()
    assert (
        len(errors) == 1
        and errors[0]["errorMessage"] == "00101010: '4Y' is not a valid AS (nnnD, nnnW, nnnM or nnnY)"
    )
    assert set(errors[0]) == {"studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "createdTime",
                              "errorMessage", "partitionName"}  # fmt: skip
    assert errors[0]["partitionName"] == "Microsoft.Default"

    # QIDO
    found = await client.get("/instances", params={"SliceLocation": "-2.5", "includefield": "00181030"})
    assert found.status_code == 200 and "erroneous-dicom-attributes" not in found.headers
    assert [r["0020000D"]["Value"][0] for r in found.json()] == [spec.study_uid, spec2.study_uid]
    assert [r["00201041"]["Value"] for r in found.json()] == [[-2.5], [-2.5]]
    assert [r["00181030"]["Value"] for r in found.json()] == [[spec.description], [spec2.description]]
    series = (await client.get("/series", params={"ProtocolName": spec.description})).json()
    expected = [s.series[0][0] for s in (spec, spec2) if s.description == spec.description]
    assert [s["0020000E"]["Value"][0] for s in series] == expected
    disabled = await client.get("/studies", params={"PatientAge": "045Y"})
    assert disabled.status_code == 400 and "disabled" in disabled.json()["error"]["message"]
    patched = await client.patch("/extendedquerytags/PatientAge", json={"QueryStatus": "Enabled"})
    assert patched.status_code == 200 and patched.json()["queryStatus"] == "Enabled"
    studies = await client.get("/studies", params={"PatientAge": "045Y"})
    assert studies.status_code == 200 and studies.headers["erroneous-dicom-attributes"] == "PatientAge"
    assert [s["0020000D"]["Value"][0] for s in studies.json()] == [spec.study_uid]
    assert studies.json()[0]["00101010"] == {"vr": "AS", "Value": ["045Y"]}
    assert (
        await client.patch("/extendedquerytags/PatientAge", json={"QueryStatus": "Maybe"})
    ).status_code == 400
    assert (await client.patch("/extendedquerytags/PatientAge", json={"Level": "Series"})).status_code == 400

    # a new store is searchable at once; a series-level tag is no key of study searches
    later = await stow_study(client, 3, ProtocolName="LATER")
    found_series = (await client.get("/series", params={"ProtocolName": "LAT*"})).json()
    assert [s["0020000E"]["Value"][0] for s in found_series] == [later.series[0][0]]
    assert (await client.get("/studies", params={"ProtocolName": "LATER"})).status_code == 400

    # conflicts and bad input
    again = await client.post("/extendedquerytags", json=[{"Path": "PatientAge", "Level": "Study"}])
    assert again.status_code == 409 and "already defined: 00101010" in again.json()["error"]["message"]
    bad = await client.post("/extendedquerytags", json=[{"Path": "PatientAge", "VR": "DA", "Level": "Study"}])
    assert bad.status_code == 400 and "contradicts" in bad.json()["error"]["message"]
    post = client.post
    json_type, text_type = {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}
    assert (await post("/extendedquerytags", content=b"[", headers=json_type)).status_code == 400
    assert (await post("/extendedquerytags", content=b"[]", headers=text_type)).status_code == 415

    # delete: 204 at once with the tag Deleting; its values go in the background. A transaction holding
    # the values' row locks keeps the deletion operation waiting so that the Deleting state can be seen.
    blocker = await asyncpg.connect(local_archive.database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        held = await blocker.fetch(
            """SELECT 1 FROM ext_double
               WHERE tag_key = (SELECT tag_key FROM extended_query_tag WHERE path = '00201041') FOR UPDATE"""
        )
        assert len(held) == 9  # three instances of each of three studies
        assert (await client.delete("/extendedquerytags/SliceLocation")).status_code == 204
        deleting = (await client.get("/extendedquerytags/SliceLocation")).json()
        operation_id = deleting["operation"]["id"]
        assert deleting == {
            "path": "00201041", "vr": "DS", "level": "Instance", "status": "Deleting",
            "queryStatus": "Enabled",
            "operation": {"id": operation_id, "href": f"{local_archive.url}/operations/{operation_id}"},
        }  # fmt: skip
        assert (await client.get("/extendedquerytags")).json()[2] == deleting
        refused = await client.get("/instances", params={"SliceLocation": "-2.5"})
        assert refused.status_code == 400
        assert "not ready for queries (status Deleting)" in refused.json()["error"]["message"]
        again = await client.delete("/extendedquerytags/SliceLocation")
        assert again.status_code == 409 and "being deleted already" in again.json()["error"]["message"]
        readd = await client.post("/extendedquerytags", json=[{"Path": "SliceLocation", "Level": "Instance"}])
        assert readd.status_code == 409, readd.text
        assert "still being deleted: 00201041" in readd.json()["error"]["message"]
        patch = await client.patch("/extendedquerytags/SliceLocation", json={"QueryStatus": "Disabled"})
        assert patch.status_code == 409 and "is being deleted" in patch.json()["error"]["message"]
        pending = await client.get(deleting["operation"]["href"])
        assert pending.status_code == 202 and pending.json()["type"] == "deleteExtendedQueryTag"
    finally:
        await blocker.close()  # rolls back: the deletion goes on
    deleted = await wait_done(client, deleting["operation"]["href"])
    assert deleted["status"] == "succeeded" and deleted["percentComplete"] == 100
    assert deleted["results"] == {"tag": "00201041", "deletedValues": 9, "deletedErrors": 0}
    assert deleted["resources"] == [f"{local_archive.url}/extendedquerytags/00201041"]
    assert (await client.get("/extendedquerytags/SliceLocation")).status_code == 404
    assert (await client.delete("/extendedquerytags/SliceLocation")).status_code == 404
    gone = await client.get("/instances", params={"SliceLocation": "-2.5"})
    assert gone.status_code == 400 and "not a matching key" in gone.json()["error"]["message"]
    readd = await client.post("/extendedquerytags", json=[{"Path": "SliceLocation", "Level": "Instance"}])
    assert readd.status_code == 202
    assert (await wait_done(client, readd.json()["href"]))["status"] == "succeeded"
    found = await client.get("/instances", params={"SliceLocation": "-2.5"})
    expected_studies = [spec.study_uid, spec2.study_uid, later.study_uid]  # the later store too
    assert [r["0020000D"]["Value"][0] for r in found.json()] == expected_studies
    assert (await client.get("/operations/0123")).status_code == 400
    assert (await client.get("/operations/" + "0" * 32)).status_code == 404


async def ext_rows(database_url: str) -> int:
    """Every extended query tag value and element stored, whatever its table."""
    conn = await asyncpg.connect(database_url)
    try:
        return sum(
            [await conn.fetchval(f"SELECT count(*) FROM {table}") for table in (*TABLES, "ext_element")]
        )
    finally:
        await conn.close()


async def test_tags_the_index_keeps_natively(
    client: httpx.AsyncClient, local_archive: RunningArchive
) -> None:
    """An Azure client adds ManufacturerModelName (which Azure does not index natively) and goes on: 202
    as for any tag, Ready at once, served by the native column, no values stored, deletion removes only the
    entry."""
    alpha = await stow_study(client, 11, ManufacturerModelName="Alpha 1")
    beta = await stow_study(client, 12, ManufacturerModelName="Beta 2")
    searches = [("/series", {"ManufacturerModelName": "Alpha*"}), ("/instances", {"00081090": "Beta 2"})]
    before = [(await client.get(path, params=params)).json() for path, params in searches]
    assert [s["0020000E"]["Value"][0] for s in before[0]] == [alpha.series[0][0]]
    assert {i["0020000D"]["Value"][0] for i in before[1]} == {beta.study_uid} and len(before[1]) == 3

    response = await client.post(
        "/extendedquerytags", json=[{"Path": "00081090", "VR": "LO", "Level": "Series"}]
    )
    assert response.status_code == 202, response.text
    reference = response.json()
    assert reference == {"id": reference["id"], "href": f"{local_archive.url}/operations/{reference['id']}"}
    ready = {"path": "00081090", "vr": "LO", "level": "Series", "status": "Ready", "queryStatus": "Enabled"}
    for path in ("/extendedquerytags/00081090", "/extendedquerytags/ManufacturerModelName"):
        got = await client.get(path)  # at once, before the operation has run
        assert (got.status_code, got.json()) == (200, ready)
    assert (await client.get("/extendedquerytags")).json() == [ready]
    operation = await wait_done(client, reference["href"])
    assert (operation["type"], operation["status"], operation["results"]) == (
        "reindex", "succeeded", {"tags": [], "processedRows": 0, "errors": 0}
    )  # fmt: skip
    assert operation["resources"] == [f"{local_archive.url}/extendedquerytags/00081090"]
    for (path, params), expected in zip(searches, before, strict=True):
        found = await client.get(path, params=params)
        assert found.status_code == 200 and "erroneous-dicom-attributes" not in found.headers
        assert found.json() == expected
    later = await stow_study(client, 13, ManufacturerModelName="Alpha 3")
    found = (await client.get("/series", params={"ManufacturerModelName": "Alpha*"})).json()
    assert [s["0020000E"]["Value"][0] for s in found] == [alpha.series[0][0], later.series[0][0]]
    assert await ext_rows(local_archive.database_url) == 0  # nothing indexed twice, by the add or the store

    # a tag already defined stays 409; a level above the native one, or a tag that can't be one, stays 400
    again = await client.post(
        "/extendedquerytags", json=[{"Path": "ManufacturerModelName", "Level": "Series"}]
    )
    assert again.status_code == 409 and "already defined: 00081090" in again.json()["error"]["message"]
    study = await client.post("/extendedquerytags", json=[{"Path": "Modality", "Level": "Study"}])
    assert study.status_code == 400
    assert study.json()["error"]["message"] == (
        "00080060 (Modality) is indexed natively at Series level, so it cannot be a Study-level tag:"
        " use Level Series or Instance"
    )
    pixel = await client.post("/extendedquerytags", json=[{"Path": "PixelData", "Level": "Instance"}])
    assert pixel.status_code == 400

    # a body mixing native and new tags: the native one is Ready at once, the operation indexes the other
    mixed = [{"Path": "PatientID", "Level": "Instance"}, {"Path": "ProtocolName", "Level": "Series"}]
    response = await client.post("/extendedquerytags", json=mixed)
    assert response.status_code == 202
    assert (await client.get("/extendedquerytags/PatientID")).json()["status"] == "Ready"
    operation = await wait_done(client, response.json()["href"])
    assert operation["results"] == {"tags": ["00181030"], "processedRows": 3, "errors": 0}
    assert (await client.get("/extendedquerytags/ProtocolName")).json()["status"] == "Ready"
    assert await ext_rows(local_archive.database_url) == 3  # ProtocolName of the three series only

    # QueryStatus is recorded; the native key keeps matching either way
    patched = await client.patch("/extendedquerytags/00081090", json={"QueryStatus": "Disabled"})
    assert (patched.status_code, patched.json()) == (200, ready | {"queryStatus": "Disabled"})
    assert (await client.get(searches[1][0], params=searches[1][1])).json() == before[1]

    # deleting removes the entry only: native search keeps working
    assert (await client.delete("/extendedquerytags/00081090")).status_code == 204
    for _ in range(300):
        if (await client.get("/extendedquerytags/00081090")).status_code == 404:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/extendedquerytags/00081090")).status_code == 404
    assert [t["path"] for t in (await client.get("/extendedquerytags")).json()] == ["00100020", "00181030"]
    assert (await client.get(searches[1][0], params=searches[1][1])).json() == before[1]
    assert await ext_rows(local_archive.database_url) == 3
    readd = await client.post(
        "/extendedquerytags", json=[{"Path": "00081090", "VR": "LO", "Level": "Instance"}]
    )
    assert readd.status_code == 202
    assert (await client.get("/extendedquerytags/00081090")).json() == ready | {"level": "Instance"}
