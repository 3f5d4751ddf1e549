"""ups_queue (migration 0015): the narrow mirror of each work item's state, station and scheduled start that
the state searches read, so that a state change of the wide row is a HOT update. Against real PostgreSQL."""

from __future__ import annotations

import asyncpg
import orjson

from dicomcore.uids import new_uid
from indexer.lookup import partition_key as lookup_partition_key
from indexer.migrate import available_migrations, migrate
from tests.worklist_data import code, performed, workitem
from worklist import store
from worklist.states import State
from worklist.validate import parse_dataset, prepare_create

# every row whose mirror differs from the work item, or is missing on either side
MISMATCHES = """
    SELECT w.workitem_key, q.workitem_key FROM ups_workitem w FULL JOIN ups_queue q USING (workitem_key)
    WHERE w.workitem_key IS NULL OR q.workitem_key IS NULL
       OR (w.partition_key, w.state, w.station, w.scheduled_start,
           CASE WHEN w.station IS NULL THEN w.station_names END)
          IS DISTINCT FROM (q.partition_key, q.state, q.station, q.scheduled_start, q.station_names)"""


async def new_item(pool: asyncpg.Pool, **kwargs: object) -> tuple[int, str]:
    key = await lookup_partition_key(pool, "default", create=True)
    assert key is not None
    uid, attrs, _ = prepare_create(parse_dataset(orjson.dumps(workitem(**kwargs))), new_uid())
    await store.create(pool, key, uid, attrs)
    return key, uid


async def test_the_queue_mirrors_every_change(pool: asyncpg.Pool) -> None:
    key, done = await new_item(pool, station="CT1", start="20261123080000")
    _, several = await new_item(pool, station=None, start="20261124080000")
    _, canceled = await new_item(pool, station="MR1")
    several_stations = {"00404025": {"vr": "SQ", "Value": [code("CT1", "a"), code("CT2", "b")]}}
    await store.update(pool, key, several, None, several_stations)
    tuid = new_uid()
    await store.set_state(pool, key, done, State.IN_PROGRESS, tuid)
    moved = {"00404005": {"vr": "DT", "Value": ["20261130100000"]}, **several_stations}
    await store.update(pool, key, done, tuid, moved)
    await store.update(pool, key, done, tuid, performed())
    await store.set_state(pool, key, done, State.COMPLETED, tuid)
    await store.cancel(pool, key, canceled, {})
    assert await pool.fetch(MISMATCHES) == []
    rows = await pool.fetch(
        """SELECT w.sop_instance_uid, q.state, q.station, q.scheduled_start::text, q.station_names
           FROM ups_queue q JOIN ups_workitem w USING (workitem_key) ORDER BY q.workitem_key"""
    )
    assert [tuple(r) for r in rows] == [
        (done, 2, None, "2026-11-30 10:00:00", ["CT1", "CT2"]),
        (several, 0, None, "2026-11-24 08:00:00", ["CT1", "CT2"]),
        (canceled, 3, "MR1", "2026-11-23 09:00:00", None),
    ]


async def test_a_state_change_is_a_hot_update_of_the_work_item(pool: asyncpg.Pool) -> None:
    """No index of ups_workitem has the state: the store's state change UPDATE stays on the page (HOT),
    and only the narrow ups_queue row gets new index entries."""
    key, uid = await new_item(pool)
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_workitem(conn, key, uid)
        state, attrs, _ = store._state_change(row, State.IN_PROGRESS, new_uid(), uid)
        assert state is State.IN_PROGRESS
        await store._write(conn, row, attrs, state, new_uid(), typed=False)
        counts = await conn.fetchrow(
            """SELECT pg_stat_get_xact_tuples_updated('ups_workitem'::regclass),
                      pg_stat_get_xact_tuples_hot_updated('ups_workitem'::regclass),
                      pg_stat_get_xact_tuples_updated('ups_queue'::regclass),
                      pg_stat_get_xact_tuples_hot_updated('ups_queue'::regclass)"""
        )
        assert tuple(counts) == (1, 1, 1, 0)
        assert await conn.fetchval("SELECT state FROM ups_queue WHERE workitem_key = $1", row.key) == 1
    indexed = await pool.fetch(
        """SELECT indexrelid::regclass::text FROM pg_index i JOIN pg_attribute a
               ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) AND a.attname = 'state'
           WHERE i.indrelid = 'ups_workitem'::regclass"""
    )
    assert indexed == []


async def test_the_migration_fills_the_queue_of_an_existing_worklist(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():  # the schema as it was before 0015
            await conn.execute(
                """CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            for version, name, sql in available_migrations():
                if version < 15:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", version, name)
        async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
            key, first = await new_item(pool, station="CT1")
            _, second = await new_item(pool, station=None)
            await store.set_state(pool, key, first, State.IN_PROGRESS, new_uid())
            assert await conn.fetchval("SELECT to_regclass('ups_queue')") is None
            assert "0015_ups_queue.sql" in await migrate(conn)
            assert await conn.fetch(MISMATCHES) == []
            assert await conn.fetchval("SELECT count(*) FROM ups_queue") == 2
            # and kept from then on
            await store.set_state(pool, key, second, State.IN_PROGRESS, new_uid())
            assert await conn.fetch(MISMATCHES) == []
            assert await conn.fetchval("SELECT count(*) FROM ups_queue WHERE state = 1") == 2
    finally:
        await conn.close()
