"""Page keys of extended query tag values (migration 0014): every value row of an instance-level tag carries
its instance's partition, study, series and InstanceNumber, on every write path (store, re-index, a change of
the instance's columns, delete) and through the migration's backfill; pages cut from them keep the
reference's order across ties and NULL InstanceNumbers, with any limit and offset."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest

from indexer.attributes import Level
from indexer.extended_tags import query_tags
from indexer.migrate import available_migrations, migrate
from indexer.qido import _compile, _plan, parse_query, search, search_page, statement_settings
from indexer.writes import index_instances
from tests import qido_reference as ref
from tests.test_extended_query_tags import BASE, dataset, define, record, reindex, store

TABLES = ("ext_string", "ext_long", "ext_double", "ext_date", "ext_time", "ext_datetime", "ext_person_name")
KEYS = "partition_key, study_key, series_key, instance_number"

# every value row against its row: instance-level ones must carry the instance's columns, others NULLs
_COPIED = ", ".join(f"x.{k}" for k in KEYS.split(", "))
_EXPECTED = ", ".join(f"i.{k}" for k in KEYS.split(", "))
CHECK = " UNION ALL ".join(
    f"""SELECT '{table}' AS tbl, t.level, x.row_key, ({_COPIED})::text AS copied,
               CASE WHEN t.level = 'Instance' THEN ({_EXPECTED})::text ELSE '(,,,)' END AS expected
        FROM {table} x JOIN extended_query_tag t USING (tag_key)
        LEFT JOIN instance i ON t.level = 'Instance' AND i.instance_key = x.row_key"""
    for table in TABLES
)


async def wrong_keys(conn: asyncpg.Connection) -> list[tuple]:
    rows = await conn.fetch(f"SELECT * FROM ({CHECK}) c WHERE copied IS DISTINCT FROM expected")
    return [tuple(r) for r in rows]


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


def instance(n: int, series: int, number: int | None, **elements: dict) -> dict:
    """Instance n of series 1.8.(series // 2).(series) (two series per study)."""
    study = f"1.8.{series // 2}"
    attrs = dataset(study, f"{study}.{series}", f"{study}.{series}.{n}", **elements)
    if number is not None:
        attrs["00200013"] = {"vr": "IS", "Value": [number]}
    return dict(sorted(attrs.items()))


def elements(n: int) -> dict[str, dict]:
    return {
        "AcquisitionNumber": {"vr": "IS", "Value": [n % 3]},
        "AcquisitionDate": {"vr": "DA", "Value": [f"2020010{1 + n % 4}"]},
        "OperatorsName": {"vr": "PN", "Value": [{"Alphabetic": f"Op^{n % 2}"}]},
        "ProtocolName": {"vr": "LO", "Value": ["HEAD"]},
        "PatientAge": {"vr": "AS", "Value": ["045Y"]},
    }


INSTANCE_TAGS = [
    {"Path": "AcquisitionNumber", "Level": "Instance"},
    {"Path": "AcquisitionDate", "Level": "Instance"},
    {"Path": "OperatorsName", "Level": "Instance"},
]
LEVEL_TAGS = [{"Path": "ProtocolName", "Level": "Series"}, {"Path": "PatientAge", "Level": "Study"}]


async def test_every_write_path_keeps_the_page_keys(pool: asyncpg.Pool) -> None:
    # re-index of what is stored, then stores that know the tags, then a re-index of a tag added later
    await store(pool, [instance(n, n % 3, n // 3, **elements(n)) for n in range(9)], batch=4)
    await define(pool, *INSTANCE_TAGS[:2], *LEVEL_TAGS)
    await reindex(pool, batch_size=4)
    await store(pool, [instance(n, n % 3, None, **elements(n)) for n in range(9, 14)], batch=2)
    await define(pool, INSTANCE_TAGS[2])
    await reindex(pool, batch_size=3)
    async with pool.acquire() as conn:
        assert await counts(conn) == {
            "ext_string": 3 + 2,  # ProtocolName of three series, PatientAge of two studies
            "ext_long": 14,
            "ext_double": 0,
            "ext_date": 14,
            "ext_time": 0,
            "ext_datetime": 0,
            "ext_person_name": 14,
        }
        assert await wrong_keys(conn) == []
        copied = await conn.fetch(
            f"SELECT row_key, {KEYS} FROM ext_long ORDER BY series_key, instance_number, row_key"
        )
        stored = await conn.fetch(
            f"SELECT instance_key, {KEYS} FROM instance ORDER BY series_key, instance_number, instance_key"
        )
        assert [tuple(r) for r in copied] == [tuple(r) for r in stored]
        assert await conn.fetchval("SELECT count(*) FROM ext_long WHERE instance_number IS NULL") == 5

        # a change of an instance's own columns is followed by its values' copies (and only by them)
        key = await conn.fetchval("SELECT instance_key FROM instance WHERE sop_instance_uid = '1.8.0.1.1'")
        await conn.execute("UPDATE instance SET instance_number = 70 WHERE instance_key = $1", key)
        assert await wrong_keys(conn) == []
        assert await conn.fetchval("SELECT instance_number FROM ext_date WHERE row_key = $1", key) == 70
        assert (
            await conn.fetchval("SELECT instance_number FROM ext_person_name WHERE row_key = $1", key) == 70
        )

        # deletes take the values along
        await conn.execute("DELETE FROM instance WHERE instance_key = $1", key)
        assert await conn.fetchval("SELECT count(*) FROM ext_long WHERE row_key = $1", key) == 0
        assert (await counts(conn))["ext_long"] == 13
        assert await wrong_keys(conn) == []


async def test_other_partitions_stay_apart(pool: asyncpg.Pool) -> None:
    await define(pool, *INSTANCE_TAGS[:1])
    await reindex(pool)
    other = await pool.fetchval("INSERT INTO partition (name) VALUES ('other') RETURNING partition_key")
    same = instance(1, 0, 1, **elements(3))  # the same UIDs and value in both partitions
    await store(pool, [same])
    async with pool.acquire() as conn, conn.transaction():
        await index_instances(conn, other, [record(same, partition_key=other)])
    async with pool.acquire() as conn:
        assert await wrong_keys(conn) == []
        assert await conn.fetchval("SELECT array_agg(partition_key ORDER BY row_key) FROM ext_long") == [
            1,
            other,
        ]
        extended = await query_tags(conn)
        query = parse_query(Level.INSTANCE, [("AcquisitionNumber", "0")], extended=extended)
        for partition in (1, other):
            results = await search(conn, partition, query, BASE)
            assert [r["00081190"]["Value"][0] for r in results] == [
                f"{BASE}/studies/1.8.0/series/1.8.0.0/instances/1.8.0.0.1"
            ]
            assert len(await search(conn, 1, query, BASE)) == 1


EXTENDED_REF = {
    "AcquisitionNumber": ("00200012", "IS", "instance"),
    "AcquisitionDate": ("00080022", "DA", "instance"),
    "OperatorsName": ("00081070", "PN", "instance"),
    "ProtocolName": ("00181030", "LO", "series"),
}


def tied(n: int) -> dict:
    """Four series; InstanceNumbers 1, 1, 2, NULL repeating (ties and missing numbers in each series);
    AcquisitionDate multi-valued, so a range can match one instance twice."""
    first = dt.date(2020, 1, 1) + dt.timedelta(days=n % 5)
    dates = [f"{first:%Y%m%d}", f"{first + dt.timedelta(days=1):%Y%m%d}"]
    number = [1, 1, 2, None][n % 4]
    series = (n * 7) % 4
    return instance(
        n,
        series,
        number,
        ProtocolName={"vr": "LO", "Value": [f"P{series}"]},
        AcquisitionNumber={"vr": "IS", "Value": [n % 2]},
        AcquisitionDate={"vr": "DA", "Value": dates},
        OperatorsName={"vr": "PN", "Value": [{"Alphabetic": f"Op^{n % 3}"}]},
    )


async def test_pages_keep_the_reference_order(pool: asyncpg.Pool) -> None:
    archive = [tied(n) for n in range(40)]
    # stored in an order unlike their series and numbers: keys alone do not give the result order
    await store(pool, archive[::2] + archive[1::2], batch=1)
    await define(pool, *INSTANCE_TAGS, LEVEL_TAGS[0])
    await reindex(pool, batch_size=9)
    ordered = archive[::2] + archive[1::2]  # the reference's first_seen is the storing order
    async with pool.acquire() as conn:
        extended = await query_tags(conn)
        shapes = [
            [("AcquisitionNumber", "1")],
            [("AcquisitionNumber", "0\\1")],
            [("AcquisitionDate", "20200102-20200104")],
            [("AcquisitionDate", "20200103")],
            [("AcquisitionDate", "20200101-20200102"), ("AcquisitionNumber", "0")],
            [("OperatorsName", "op*"), ("AcquisitionDate", "-20200102")],
            [("AcquisitionNumber", "1"), ("InstanceNumber", "1")],
            [("AcquisitionNumber", "0"), ("SeriesInstanceUID", "1.8.1.2")],
            [("AcquisitionDate", "20200102-"), ("StudyInstanceUID", "1.8.0")],
            [("AcquisitionNumber", "1"), ("ProtocolName", "P1")],
        ]
        compared = 0
        for params in shapes:
            full = ref.search(ordered, "instance", params, extended=EXTENDED_REF)
            assert full, params
            for limit, offset in ((1, 0), (3, 2), (5, 7), (100, 0), (2, len(full) - 1), (4, len(full))):
                paged = [*params, ("limit", str(limit)), ("offset", str(offset))]
                query = parse_query(Level.INSTANCE, paged, extended=extended)
                expected = ref.search(ordered, "instance", paged, extended=EXTENDED_REF)
                results = await search(conn, 1, query, BASE)
                assert [r["00080018"]["Value"][0] for r in results] == expected, paged
                compared += 1
        assert compared == 60


@pytest.mark.parametrize(
    ("params", "driver", "distinct"),
    [
        ([("AcquisitionNumber", "5")], "ext_long", False),
        ([("AcquisitionNumber", "5\\6")], "ext_long", True),
        ([("AcquisitionDate", "20200101-20200131")], "ext_date", True),
        ([("AcquisitionDate", "20200101-20200131"), ("AcquisitionNumber", "5")], "ext_long", False),
        ([("AcquisitionDate", "20200101-20200131"), ("PatientName", "M*")], "ext_date", True),
    ],
)
async def test_pages_come_from_the_value_index(
    pool: asyncpg.Pool, params: list[tuple[str, str]], driver: str, distinct: bool
) -> None:
    await define(pool, *INSTANCE_TAGS)
    await reindex(pool)
    async with pool.acquire() as conn:
        query = parse_query(Level.INSTANCE, params, extended=await query_tags(conn))
    sql, _ = _compile(query, 1, _plan(query))
    keys = sql[: sql.index(" LIMIT ")]
    assert keys.startswith(
        f"WITH page AS MATERIALIZED (SELECT {'DISTINCT ' if distinct else ''}v.row_key AS instance_key,"
        f" v.study_key, v.series_key, v.instance_number FROM {driver} v "
    )
    assert "instance i" not in keys  # no probe of the candidates' instance rows
    assert keys.endswith(" ORDER BY v.series_key, v.instance_number, v.row_key")
    assert statement_settings(query) == (
        "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL max_parallel_workers_per_gather = 0"
    )


def test_other_searches_keep_their_plans() -> None:
    query = parse_query(Level.INSTANCE, [("SOPClassUID", "1.2")])
    assert statement_settings(query) == "SET LOCAL plan_cache_mode = force_custom_plan"


async def test_values_of_a_vanished_instance_are_skipped(pool: asyncpg.Pool) -> None:
    """A re-index batch can insert the values of an instance deleted as it ran (the delete's trigger does
    not see them yet): a page must not return it."""
    await define(pool, *INSTANCE_TAGS[:1])
    await reindex(pool)
    await store(pool, [instance(n, 0, n, **elements(3)) for n in (1, 2)])
    async with pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT tag_key, {KEYS} FROM ext_long ORDER BY row_key LIMIT 1")
        gone = await conn.fetchval("SELECT max(instance_key) + 1 FROM instance")
        await conn.execute(
            f"INSERT INTO ext_long (tag_key, row_key, value, {KEYS}) VALUES ($1, $2, 0, $3, $4, $5, 1)",
            row["tag_key"],
            gone,
            *(row[k] for k in ("partition_key", "study_key", "series_key")),
        )
        query = parse_query(Level.INSTANCE, [("AcquisitionNumber", "0")], extended=await query_tags(conn))
        page = await search_page(conn, 1, query, BASE)
    assert [r["00080018"]["Value"][0] for r in page.results] == ["1.8.0.0.1", "1.8.0.0.2"]


async def test_backfill_of_existing_values(database_url: str) -> None:
    """Migration 0014 on a database that has values of the earlier schema (as a re-index wrote them)."""
    conn = await asyncpg.connect(database_url)
    try:
        import indexer.migrate as migrate_module

        earlier = [m for m in available_migrations() if m[0] < 14]
        original = migrate_module.available_migrations
        migrate_module.available_migrations = lambda: earlier  # type: ignore[assignment]
        try:
            await migrate(conn)
        finally:
            migrate_module.available_migrations = original
        async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
            await store(pool, [instance(n, n % 3, [3, None][n % 2], **elements(n)) for n in range(6)])
        await conn.execute(
            """INSERT INTO extended_query_tag (path, vr, level, status) VALUES
                   ('00200012', 'IS', 'Instance', 'Ready'), ('00080022', 'DA', 'Instance', 'Ready'),
                   ('00181030', 'LO', 'Series', 'Ready')"""
        )
        tags = dict(await conn.fetch("SELECT path, tag_key FROM extended_query_tag"))
        await conn.execute(
            "INSERT INTO ext_long (tag_key, row_key, value) SELECT $1, instance_key, 1 FROM instance",
            tags["00200012"],
        )
        await conn.execute(
            "INSERT INTO ext_date (tag_key, row_key, value) SELECT $1, instance_key, now() FROM instance",
            tags["00080022"],
        )
        await conn.execute(
            "INSERT INTO ext_string (tag_key, row_key, value) SELECT $1, series_key, 'HEAD' FROM series",
            tags["00181030"],
        )
        assert await conn.fetchval("SELECT count(*) FROM ext_long") == 6
        assert (await migrate(conn))[0] == "0014_ext_page_keys.sql"
        assert await wrong_keys(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM ext_long WHERE series_key IS NOT NULL") == 6
        assert await conn.fetchval("SELECT count(*) FROM ext_date WHERE instance_number = 3") == 3
        assert await conn.fetchval("SELECT count(*) FROM ext_string WHERE series_key IS NULL") == 3
        definition = await conn.fetchval("SELECT pg_get_indexdef('ext_long_match'::regclass)")
        assert definition.endswith(
            "(tag_key, value, series_key, instance_number, row_key) INCLUDE (partition_key, study_key)"
        )
    finally:
        await conn.close()


def test_migration_number() -> None:
    assert [name for version, name, _ in available_migrations() if version == 14] == [
        "0014_ext_page_keys.sql"
    ]


async def test_reindex_and_a_concurrent_delete_leave_no_values_behind(pool: asyncpg.Pool) -> None:
    """An instance deleted while a re-index batch reads it: the batch waits for the delete and skips the row,
    instead of inserting values the delete's trigger has already missed."""
    await store(pool, [instance(n, 0, n, **elements(n)) for n in (1, 2, 3)])
    await define(pool, *INSTANCE_TAGS[:1])
    async with pool.acquire() as deleter:
        victim = await deleter.fetchval(
            "SELECT instance_key FROM instance ORDER BY instance_key OFFSET 1 LIMIT 1"
        )
        transaction = deleter.transaction()
        await transaction.start()
        await deleter.execute("DELETE FROM instance WHERE instance_key = $1", victim)
        running = asyncio.create_task(reindex(pool))
        await asyncio.sleep(0.5)
        assert not running.done()  # the batch waits for the delete's row lock
        await transaction.commit()
        await asyncio.wait_for(running, 30)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT row_key FROM ext_long ORDER BY row_key")
        keys = [r["instance_key"] for r in await conn.fetch("SELECT instance_key FROM instance ORDER BY 1")]
        assert [r["row_key"] for r in rows] == keys and victim not in keys and len(keys) == 2
        assert await wrong_keys(conn) == []
