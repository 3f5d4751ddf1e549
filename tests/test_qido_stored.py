"""Stored QIDO members (instance_qido, migration 0010) and the study page index: instance results built from
the stored members must equal, byte for byte, those built from the whole metadata; study searches on
StudyDate / ModalitiesInStudy read their keys from study_page and return the same pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from indexer.attributes import Level
from indexer.migrate import migrate
from indexer.qido import STORED_MEMBERS, _compile, _plan, parse_query, search_page, stored_members
from indexer.writes import remove_instances
from tests.test_qido import ARCHIVE, BASE, STUDY_A, instance, load

# the backfill of migration 0010
BACKFILL = (
    "INSERT INTO instance_qido (instance_key, members)"
    " SELECT instance_key, qido_instance_members(metadata) FROM instance"
)

INST = Level.INSTANCE
# searches: (level, params, study, series) - defaults, scopes, matching keys inside and outside the stored
# instance members, includefield of a stored key, of a key only the metadata has, of bulk data, and paging;
# study and series searches (their members hold every attribute of the level's attrs blob)
SEARCHES: list[tuple[Level, list[tuple[str, str]], str | None, str | None]] = [
    (INST, [], None, None),
    (INST, [], "1.2.1", None),
    (INST, [], "1.2.1", "1.2.1.1"),
    (INST, [("Modality", "CT")], None, None),
    (INST, [("PatientName", "m*"), ("StudyDescription", "*")], None, None),
    (INST, [("ManufacturerModelName", "Model*")], None, None),
    (INST, [("includefield", "SliceThickness,ImageType")], None, None),
    (INST, [("includefield", "PixelData,NumberOfFrames")], None, None),
    (INST, [("includefield", "SeriesDescription")], "1.2.1", "1.2.1.1"),
    (INST, [("includefield", "PatientID")], "1.2.1", None),
    (INST, [("InstanceNumber", "1"), ("limit", "1"), ("offset", "1")], None, None),
    (INST, [("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")], "1.2.1", None),
    (Level.STUDY, [], None, None),
    (Level.STUDY, [("ModalitiesInStudy", "CT"), ("StudyDate", "20191231-")], None, None),
    (Level.STUDY, [("PatientName", "m*"), ("includefield", "StudyDescription,00081030")], None, None),
    (Level.STUDY, [("includefield", "SliceThickness")], None, None),  # from a representative instance
    (Level.STUDY, [("limit", "1"), ("offset", "1")], None, None),
    (Level.SERIES, [], None, None),
    (Level.SERIES, [], "1.2.1", None),
    (Level.SERIES, [("Modality", "CT"), ("includefield", "PatientID,SpecificCharacterSet")], "1.2.1", None),
    (Level.SERIES, [("includefield", "ManufacturerModelName")], None, None),
]


async def pages(
    conn: asyncpg.Connection,
    level: Level,
    params: list[tuple[str, str]],
    study: str | None,
    series: str | None,
) -> tuple[bytes, list[Any], bool]:
    """(the HTTP body from encoded results, the dict results, whether more follow)"""
    query = parse_query(level, params, study_uid=study, series_uid=series)
    encoded = await search_page(conn, 1, query, BASE, encoded=True)
    plain = await search_page(conn, 1, query, BASE)
    assert encoded.more == plain.more
    return orjson.dumps(encoded.results), plain.results, plain.more


async def from_metadata(conn: asyncpg.Connection) -> list[tuple[bytes, list[Any], bool]]:
    """Every search's results with no stored members (each row then parses its blobs), undone after."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("DELETE FROM instance_qido")
        await conn.execute("UPDATE study SET members = NULL")
        await conn.execute("UPDATE series SET members = NULL")
        return [await pages(conn, *search) for search in SEARCHES]
    finally:
        await transaction.rollback()


async def assert_stored_equals_metadata(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT count(*) FROM study WHERE members IS NULL") == 0
    expected = await from_metadata(conn)
    for search, (body, plain, more) in zip(SEARCHES, expected, strict=True):
        got_body, got_plain, got_more = await pages(conn, *search)
        assert got_body == body, search
        assert got_plain == plain and got_more == more, search
        assert [list(r) for r in got_plain] == [list(r) for r in plain], search  # tag order too
        assert orjson.dumps(got_plain) == body, search


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await migrate(connection)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def archive(conn: asyncpg.Connection) -> asyncpg.Connection:
    await load(conn, ARCHIVE)
    return conn


async def test_stored_member_keys_match_the_migration(conn: asyncpg.Connection) -> None:
    every = {
        key: {"vr": "LO", "Value": [key]} for key in [*STORED_MEMBERS, "00081030", "00180050", "7FE00010"]
    }
    members = await conn.fetchval("SELECT qido_instance_members($1)", orjson.dumps(every))
    assert members == stored_members(every)  # what indexer.writes stores for new instances
    parts = members.split(b"\x01")
    assert parts == sorted(parts)
    assert [orjson.loads(b"{" + p + b"}") for p in parts] == [{k: every[k]} for k in sorted(STORED_MEMBERS)]


async def test_every_instance_gets_members_at_ingest(archive: asyncpg.Connection) -> None:
    rows = await archive.fetch(
        "SELECT i.metadata, q.members FROM instance i LEFT JOIN instance_qido q USING (instance_key)"
    )
    assert len(rows) == len(ARCHIVE)
    for row in rows:
        metadata = orjson.loads(row["metadata"])
        members = orjson.loads(b"{" + row["members"].replace(b"\x01", b",") + b"}")
        assert members == {k: v for k, v in metadata.items() if k in STORED_MEMBERS}


async def test_stored_results_equal_metadata_results(archive: asyncpg.Connection) -> None:
    await assert_stored_equals_metadata(archive)
    body, plain, _ = await pages(archive, Level.INSTANCE, [("includefield", "PixelData")], None, None)
    (us,) = [r for r in plain if "7FE00010" in r]
    assert (
        us["7FE00010"]["BulkDataURI"]
        == f"{BASE}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.1/bulkdata/7FE00010"
    )
    assert orjson.loads(body) == plain


async def test_after_updates_and_deletes_of_the_levels_above(archive: asyncpg.Connection) -> None:
    # a new series of another modality and more instances change ModalitiesInStudy and the counters
    await load(
        archive,
        [
            instance(
                "1.2.1", "1.2.1.3", "1.2.1.3.1", **STUDY_A, Modality="PT", SeriesNumber=3, InstanceNumber=1
            ),
            instance(
                "1.2.1", "1.2.1.1", "1.2.1.1.3", **STUDY_A, Modality="CT", SeriesNumber=2, InstanceNumber=3
            ),
        ],
    )
    query = parse_query(Level.INSTANCE, [("SOPInstanceUID", "1.2.1.1.1")])
    (result,) = (await search_page(archive, 1, query, BASE)).results
    assert result["00080061"] == {"vr": "CS", "Value": ["CT", "MR", "PT"]}
    assert result["00201208"] == {"vr": "IS", "Value": [5]}
    assert result["00201209"] == {"vr": "IS", "Value": [3]}
    await assert_stored_equals_metadata(archive)
    async with archive.transaction():
        removed = await remove_instances(archive, 1, "1.2.1", "1.2.1.2")
    assert [r.sop_instance_uid for r in removed] == ["1.2.1.2.1"]
    (result,) = (await search_page(archive, 1, query, BASE)).results
    assert result["00080061"] == {"vr": "CS", "Value": ["CT", "PT"]}
    assert result["00201206"] == {"vr": "IS", "Value": [2]}
    assert result["00201208"] == {"vr": "IS", "Value": [4]}
    assert await archive.fetchval("SELECT count(*) FROM instance_qido") == len(ARCHIVE) + 2 - 1
    await assert_stored_equals_metadata(archive)


async def test_instances_indexed_before_the_migration_are_backfilled(archive: asyncpg.Connection) -> None:
    written = dict(await archive.fetch("SELECT instance_key, members FROM instance_qido"))
    await archive.execute("DELETE FROM instance_qido")
    await archive.execute(BACKFILL)
    assert dict(await archive.fetch("SELECT instance_key, members FROM instance_qido")) == written
    for table in ("study", "series"):  # members written by the trigger equal the backfill's
        rows = await archive.fetch(f"SELECT members, qido_members(attrs) AS backfill, attrs FROM {table}")
        assert rows and all(r["members"] == r["backfill"] is not None for r in rows)
        for row in rows:
            members = orjson.loads(b"{" + row["members"].replace(b"\x01", b",") + b"}")
            assert list(members.items()) == sorted(orjson.loads(row["attrs"]).items())
    await assert_stored_equals_metadata(archive)


async def test_members_with_bulk_data_are_not_stored(conn: asyncpg.Connection) -> None:
    attrs = instance("1.9", "1.9.1", "1.9.1.1", Modality="SR", InstanceNumber=1)
    attrs["00400275"] = {
        "vr": "SQ",
        "Value": [{"00420011": {"vr": "OB", "BulkDataURI": "bulkdata/00400275/0/00420011"}}],
    }
    await load(conn, [dict(sorted(attrs.items()))])
    assert await conn.fetchval("SELECT members FROM instance_qido") is None
    assert await conn.fetchval("SELECT qido_instance_members(metadata) FROM instance") is None  # backfill
    body, (result,), _ = await pages(conn, Level.INSTANCE, [], None, None)
    prefix = f"{BASE}/studies/1.9/series/1.9.1/instances/1.9.1.1/"
    item = result["00400275"]["Value"][0]
    assert item["00420011"] == {"vr": "OB", "BulkDataURI": prefix + "bulkdata/00400275/0/00420011"}
    assert orjson.loads(body) == [result]


async def test_metadata_updates_refresh_the_members(archive: asyncpg.Connection) -> None:
    sop = "1.2.3.1.1"
    metadata = orjson.loads(
        await archive.fetchval("SELECT metadata FROM instance WHERE sop_instance_uid = $1", sop)
    )
    metadata["00200013"] = {"vr": "IS", "Value": [70]}
    await archive.execute(
        "UPDATE instance SET metadata = $1 WHERE sop_instance_uid = $2", orjson.dumps(metadata), sop
    )
    query = parse_query(Level.INSTANCE, [("SOPInstanceUID", sop)])
    (result,) = (await search_page(archive, 1, query, BASE)).results
    assert result["00200013"] == {"vr": "IS", "Value": [70]}
    await assert_stored_equals_metadata(archive)


STUDIES = [
    instance(f"1.7.{n}", f"1.7.{n}.1", f"1.7.{n}.1.1", Modality=modality, StudyDate=f"2020{month:02d}15")
    for n, (modality, month) in enumerate(
        [("CT", 1), ("MR", 2), ("MR", 3), ("CT", 3), ("US", 12), ("MR", 12), ("MR", 6)], start=1
    )
]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([("ModalitiesInStudy", "MR"), ("StudyDate", "20200201-20200630")], ["1.7.2", "1.7.3", "1.7.7"]),
        (
            [("ModalitiesInStudy", "MR"), ("StudyDate", "20200201-20200630"), ("limit", "2")],
            ["1.7.2", "1.7.3"],
        ),
        ([("ModalitiesInStudy", "MR"), ("StudyDate", "20200201-"), ("offset", "2")], ["1.7.6", "1.7.7"]),
        ([("Modality", "CT\\US"), ("StudyDate", "-20201231")], ["1.7.1", "1.7.4", "1.7.5"]),
        ([("ModalitiesInStudy", "U*")], ["1.7.5"]),
        ([("StudyDate", "20200315")], ["1.7.3", "1.7.4"]),
        ([("limit", "3"), ("offset", "5")], ["1.7.6", "1.7.7"]),
    ],
)
async def test_study_pages_from_the_covering_index(
    conn: asyncpg.Connection,
    params: list[tuple[str, str]],
    expected: list[str],
) -> None:
    await load(conn, STUDIES)
    query = parse_query(Level.STUDY, params)
    sql, _ = _compile(query, 1, _plan(query))
    assert sql.startswith("WITH page AS MATERIALIZED (SELECT st.study_key FROM study st")
    page = await search_page(conn, 1, query, BASE)
    assert [r["0020000D"]["Value"][0] for r in page.results] == expected
    assert page.more == (("limit", "2") in params)
    (first,) = [s for s in STUDIES if s["0020000D"]["Value"][0] == expected[0]]
    assert page.results[0]["00080020"] == first["00080020"]
    assert page.results[0]["00201208"] == {"vr": "IS", "Value": [1]}


def test_other_study_searches_keep_the_plain_plan() -> None:
    for params in (
        [("PatientID", "P1")],
        [("StudyDate", "20200101"), ("PatientName", "A*")],
        [("ModalitiesInStudy", "CT"), ("PatientID", "P1")],
    ):
        query = parse_query(Level.STUDY, params)
        assert not _compile(query, 1, _plan(query))[0].startswith("WITH page")


# --- matching keys of extended query tags (ext_element, migration 0013) ----------------------------------

# the backfill of migration 0013
ELEMENT_BACKFILL = """INSERT INTO ext_element (tag_key, row_key, member)
    SELECT t.tag_key, i.instance_key, m.member
    FROM extended_query_tag t CROSS JOIN instance i
    CROSS JOIN LATERAL (SELECT ext_element_member(i.metadata, t.path) AS member) m
    WHERE t.level = 'Instance' AND t.private_creator IS NULL AND t.status <> 'Deleting'
      AND m.member IS NOT NULL"""

EXT_TAGS = [
    {"Path": "AcquisitionNumber", "Level": "Instance"},  # IS
    {"Path": "AcquisitionDate", "Level": "Instance"},  # DA
    {"Path": "SliceThickness", "Level": "Instance"},  # DS
    {"Path": "OperatorsName", "Level": "Instance"},  # PN
    {"Path": "ProtocolName", "Level": "Series"},  # a series-level tag: instance results read the metadata
    {"Path": "00091001", "VR": "US", "PrivateCreator": "ACME 1", "Level": "Instance"},  # via its creator
]


def ext_instance(n: int, **elements: dict) -> dict:
    """Instance n of series 1.5.(n % 2).1 with the extended tags' elements."""
    from tests.test_extended_query_tags import dataset

    attrs = dataset(f"1.5.{n % 2}", f"1.5.{n % 2}.1", f"1.5.{n % 2}.1.{n}", **elements)
    attrs["00200013"] = {"vr": "IS", "Value": [n]}
    return attrs


IS, DA, DS, PN = "AcquisitionNumber", "AcquisitionDate", "SliceThickness", "OperatorsName"
EXT_ELEMENTS: list[dict[str, dict]] = [
    {IS: {"vr": "IS", "Value": [5]}, DA: {"vr": "DA", "Value": ["20200101"]}},
    {IS: {"vr": "IS", "Value": ["5 "]}, DS: {"vr": "DS", "Value": [1.5, 0.25]}},
    {IS: {"vr": "IS", "Value": [5, 7]},
     PN: {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jo ", "Ideographic": "ド"}]}},
    {IS: {"vr": "IS"}, DA: {"vr": "DA", "Value": ["2020"]}},  # an empty element; a malformed date
    {IS: {"vr": "IS", "Value": [7]}, DS: {"vr": "DS", "Value": ["1.50"]}},  # DS as a string: an error
    {IS: {"vr": "IS", "Value": [5]}, PN: {"vr": "PN", "Value": [{"Alphabetic": "Doe^Al"}, None]},
     "ProtocolName": {"vr": "LO", "Value": ["P5"]}},
    {IS: {"vr": "IS", "Value": [7]}, DA: {"vr": "OB", "BulkDataURI": "bulkdata/00080022"}},
    {DA: {"vr": "DA", "Value": ["20200102", "20200101"]}, "00090010": {"vr": "LO", "Value": ["ACME 1"]},
     "00091001": {"vr": "US", "Value": [3]}},
]  # fmt: skip
EXT_INSTANCES = [ext_instance(n, **elements) for n, elements in enumerate(EXT_ELEMENTS)]
EXT_INSTANCES[7]["00090010"] = {"vr": "LO", "Value": ["ACME 1"]}
EXT_INSTANCES[7]["00091001"] = {"vr": "US", "Value": [3]}
EXT_INSTANCES[7] = dict(sorted(EXT_INSTANCES[7].items()))

EXT_SEARCHES: list[tuple[list[tuple[str, str]], str | None]] = [
    ([("AcquisitionNumber", "5")], None),
    ([("AcquisitionNumber", "5\\7"), ("limit", "2"), ("offset", "1")], None),
    ([("AcquisitionNumber", "*")], None),  # universal: returned, not matched
    ([(IS, "*"), (DA, "*"), (DS, ""), (PN, "")], None),
    ([("AcquisitionDate", "20200101-20200131")], None),  # instance 6's BulkDataURI: from its metadata
    ([("AcquisitionNumber", "7"), ("AcquisitionDate", "")], "1.5.0"),
    ([("SliceThickness", "1.5")], None),
    ([("OperatorsName", "doe*")], "1.5.1"),
    ([("OperatorsName", "jo"), ("fuzzymatching", "true")], None),
    ([("AcquisitionNumber", "5"), ("includefield", "SliceThickness,PatientID")], None),  # metadata anyway
    ([("AcquisitionNumber", "5"), ("includefield", "all")], None),
    ([("ProtocolName", "P*"), ("AcquisitionNumber", "*")], None),
    ([("00091001", "3"), ("AcquisitionDate", "*")], None),
]  # fmt: skip


async def ext_pages(conn: asyncpg.Connection) -> list[tuple[bytes, list[Any], bool]]:
    from indexer.extended_tags import query_tags

    extended = await query_tags(conn)
    out = []
    for params, study in EXT_SEARCHES:
        query = parse_query(INST, params, study_uid=study, extended=extended)
        encoded = await search_page(conn, 1, query, BASE, encoded=True)
        plain = await search_page(conn, 1, query, BASE)
        assert encoded.more == plain.more
        out.append((orjson.dumps(encoded.results), plain.results, plain.more))
    return out


async def assert_ext_equals_metadata(conn: asyncpg.Connection) -> list[list[Any]]:
    """Results with ext_element equal, byte for byte, those built from the metadata (no stored members)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("DELETE FROM instance_qido")
        await conn.execute("DELETE FROM ext_element")
        expected = await ext_pages(conn)
    finally:
        await transaction.rollback()
    got = await ext_pages(conn)
    for search, (body, plain, more), (got_body, got_plain, got_more) in zip(
        EXT_SEARCHES, expected, got, strict=True
    ):
        assert got_body == body, search
        assert got_plain == plain and got_more == more, search
        assert orjson.dumps(got_plain) == body, search
    return [plain for _, plain, _ in got]


@pytest.fixture
async def ext_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as connection:
        await migrate(connection)
    try:
        yield pool
    finally:
        await pool.close()


async def elements(pool: asyncpg.Pool) -> dict[tuple[str, str], bytes]:
    rows = await pool.fetch(
        """SELECT t.path, i.sop_instance_uid, e.member FROM ext_element e
           JOIN extended_query_tag t USING (tag_key) JOIN instance i ON i.instance_key = e.row_key"""
    )
    return {(r["path"], r["sop_instance_uid"]): r["member"] for r in rows}


async def test_extended_tag_keys_come_from_elements(ext_pool: asyncpg.Pool) -> None:
    from tests.test_extended_query_tags import define, reindex, store

    await store(ext_pool, EXT_INSTANCES[:5])  # before the tags: the re-index writes their elements
    await define(ext_pool, *EXT_TAGS)
    await reindex(ext_pool, batch_size=2)
    await store(ext_pool, EXT_INSTANCES[5:], batch=2)  # after: the stores write them
    await ext_pool.execute("UPDATE extended_query_tag SET query_status = 'Enabled'")  # despite errors
    written = await elements(ext_pool)
    # every public instance-level element, as the metadata path returns it; none of the other tags
    expected = {
        (key, attrs["00080018"]["Value"][0]): b'"' + key.encode() + b'":' + orjson.dumps(attrs[key])
        for attrs in EXT_INSTANCES
        for key in ("00080022", "00180050", "00200012", "00081070")
        if key in attrs
    }
    assert written == expected
    async with ext_pool.acquire() as conn:
        results = await assert_ext_equals_metadata(conn)
        # the fast path was taken: the page's SQL reads ext_element, not the metadata
        from indexer.extended_tags import query_tags

        query = parse_query(INST, EXT_SEARCHES[0][0], extended=await query_tags(conn))
        sql, _ = _compile(query, 1, _plan(query))
        assert "ext_element" in sql and "metadata" not in sql
        assert "JOIN instance" not in sql  # the page's rows are not read: the UID comes from the members
        # migration 0013's backfill writes the same bytes
        await conn.execute("DELETE FROM ext_element")
        await conn.execute(ELEMENT_BACKFILL)
    assert await elements(ext_pool) == written
    sops = [[r["00080018"]["Value"][0] for r in page] for page in results]
    assert sops[0] == ["1.5.0.1.0", "1.5.0.1.2", "1.5.1.1.1", "1.5.1.1.5"]
    assert results[0][1]["00200012"] == {"vr": "IS", "Value": [5, 7]}
    assert results[0][2]["00200012"] == {"vr": "IS", "Value": ["5 "]}  # as stored, not the indexed 5
    assert sops[4] == ["1.5.0.1.0", "1.5.1.1.7"]
    every = {r["00080018"]["Value"][0]: r for r in results[3]}
    assert every["1.5.0.1.6"]["00080022"] == {
        "vr": "OB",
        "BulkDataURI": f"{BASE}/studies/1.5.0/series/1.5.0.1/instances/1.5.0.1.6/bulkdata/00080022",
    }
    assert every["1.5.1.1.3"]["00200012"] == {"vr": "IS"}  # an empty element is returned empty
    assert every["1.5.0.1.4"]["00180050"] == {"vr": "DS", "Value": ["1.50"]}  # not indexed (an error)
    assert sops[12] == ["1.5.1.1.7"] and results[12][0]["00091001"] == {"vr": "US", "Value": [3]}


async def test_elements_follow_deletes_updates_and_tag_removal(ext_pool: asyncpg.Pool) -> None:
    from tests.test_extended_query_tags import define, delete, reindex, run_deletions, store

    await define(ext_pool, *EXT_TAGS)
    await reindex(ext_pool)
    await store(ext_pool, EXT_INSTANCES)
    await ext_pool.execute("UPDATE extended_query_tag SET query_status = 'Enabled'")
    before = await elements(ext_pool)
    async with ext_pool.acquire() as conn, conn.transaction():
        removed = await remove_instances(conn, 1, "1.5.0", "1.5.0.1", "1.5.0.1.2")
    assert [r.sop_instance_uid for r in removed] == ["1.5.0.1.2"]
    assert await elements(ext_pool) == {k: v for k, v in before.items() if k[1] != "1.5.0.1.2"}
    # a metadata update (the trigger of migration 0013) replaces the instance's elements
    attrs = {**EXT_INSTANCES[0], "00200012": {"vr": "IS", "Value": [9, 5]}}
    del attrs["00080022"]
    await ext_pool.execute(
        "UPDATE instance SET metadata = $1 WHERE sop_instance_uid = '1.5.0.1.0'", orjson.dumps(attrs)
    )
    now = await elements(ext_pool)
    assert now[("00200012", "1.5.0.1.0")] == b'"00200012":{"vr":"IS","Value":[9,5]}'
    assert ("00080022", "1.5.0.1.0") not in now
    async with ext_pool.acquire() as conn:
        await assert_ext_equals_metadata(conn)
    await delete(ext_pool, "AcquisitionNumber")
    await run_deletions(ext_pool)
    left = await elements(ext_pool)
    assert left and not any(path == "00200012" for path, _ in left)
    assert await ext_pool.fetchval("SELECT count(*) FROM ext_element") == len(left)  # no orphans
