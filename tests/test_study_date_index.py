"""Migration 0022: a StudyDate range's page keys come from study_date_time alone (an index-only scan), and
the answers are those of filtering every study by date."""

from __future__ import annotations

import datetime as dt

import asyncpg
import orjson

from bench import scale_load
from indexer.attributes import Level
from indexer.qido import _compile, _plan, parse_query, search_page, statement_settings

BASE = "http://archive.test/v2"


def _nodes(plan: dict) -> list[dict]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def test_date_range_keys_come_from_the_index_alone(database_url: str) -> None:
    await scale_load.load(database_url, 400, 2, chunk=200)  # loads, builds the indexes, VACUUM ANALYZE
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("VACUUM study")
        definition = await conn.fetchval("SELECT pg_get_indexdef('study_date_time'::regclass)")
        assert definition.endswith("(partition_key, study_date, study_time) INCLUDE (study_key, modalities)")
        for low, high in (("20100101", "20101231"), ("20180101", "20180630"), ("20030301", "20030831")):
            query = parse_query(Level.STUDY, [("StudyDate", f"{low}-{high}"), ("limit", "50")])
            sql, args = _compile(query, 1, _plan(query))
            async with conn.transaction():
                await conn.execute(statement_settings(query))
                # 400 studies fit in a few pages, where a sequential scan would win; the date path is
                # what a large index takes for a narrow range, and it must need no heap fetch
                await conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
                plan = orjson.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args))
            scans = [n for n in _nodes(plan[0]["Plan"]) if n.get("Index Name") == "study_date_time"]
            # the index covers every column the page needs; whether the scan also skips the heap depends
            # on the visibility map, which VACUUM may not set while any snapshot of the server is open
            assert [n["Node Type"] for n in scans] == ["Index Only Scan"], scans
            page = await search_page(conn, 1, query, BASE)
            expected = await conn.fetch(
                """SELECT study_instance_uid FROM study
                   WHERE partition_key = 1 AND study_date BETWEEN $1 AND $2 ORDER BY study_key LIMIT 50""",
                dt.datetime.strptime(low, "%Y%m%d").date(),
                dt.datetime.strptime(high, "%Y%m%d").date(),
            )
            uids = [r["0020000D"]["Value"][0] for r in page.results]
            assert uids == [r["study_instance_uid"] for r in expected] and uids, (low, high)
    finally:
        await conn.close()
