"""worklist.store's optimistic path (one UPDATE without a lock, migration 0012) against real PostgreSQL: it
must give the same results as the locked path, and never lose an event to a subscriber that arrives while it
runs."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import orjson
import pytest

from dicomcore.uids import new_uid
from dicomweb.app import keep_session
from indexer.lookup import partition_key as lookup_partition_key
from tests.worklist_data import performed, workitem
from worklist import store
from worklist.states import State, Status
from worklist.validate import parse_dataset, prepare_create


async def new_item(pool: asyncpg.Pool) -> tuple[int, str]:
    key = await lookup_partition_key(pool, "default", create=True)
    assert key is not None
    uid, attrs, _ = prepare_create(parse_dataset(orjson.dumps(workitem())), new_uid())
    await store.create(pool, key, uid, attrs)
    return key, uid


async def stored(pool: asyncpg.Pool, uid: str) -> tuple[int, str | None, dict]:
    row = await pool.fetchrow(
        "SELECT state, transaction_uid, body, attrs FROM ups_workitem WHERE sop_instance_uid = $1", uid
    )
    body = orjson.loads(row["body"])
    assert orjson.loads(row["attrs"]) == body  # the jsonb copy is parsed from the stored bytes
    return row["state"], row["transaction_uid"], body


async def test_claim_update_complete_without_subscribers(pool: asyncpg.Pool) -> None:
    key, uid = await new_item(pool)
    tuid = new_uid()
    assert await store.set_state(pool, key, uid, State.IN_PROGRESS, tuid) is None
    state, owner, body = await stored(pool, uid)
    assert (state, owner, body["00741000"]["Value"]) == (1, tuid, ["IN PROGRESS"])
    with pytest.raises(store.UpsError) as refused:
        await store.set_state(pool, key, uid, State.COMPLETED, tuid)  # final state requirements not met
    assert refused.value.status == 409 and "final state requirements not met" in refused.value.message
    with pytest.raises(store.UpsError) as wrong:
        await store.update(pool, key, uid, new_uid(), performed())
    assert wrong.value.status == 409 and wrong.value.warning == store.NOT_CLAIMED
    await store.update(pool, key, uid, tuid, performed())
    assert await store.set_state(pool, key, uid, State.COMPLETED, tuid) is None
    state, owner, body = await stored(pool, uid)
    assert (state, owner, body["00741000"]["Value"]) == (2, tuid, ["COMPLETED"])
    assert body["00741216"] == performed()["00741216"]
    assert (
        await store.set_state(pool, key, uid, State.COMPLETED, tuid)
        == store.ALREADY[store.Status.ALREADY_COMPLETED]
    )
    assert await pool.fetchval("SELECT count(*) FROM ups_event") == 0


async def test_concurrent_claims_have_one_winner(pool: asyncpg.Pool) -> None:
    key, uid = await new_item(pool)
    tuids = [new_uid() for _ in range(4)]
    results = await asyncio.gather(
        *(store.set_state(pool, key, uid, State.IN_PROGRESS, t) for t in tuids), return_exceptions=True
    )
    winners = [t for t, r in zip(tuids, results, strict=True) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, store.UpsError) and r.status == 409 for r in results if r is not None)
    assert (await stored(pool, uid))[:2] == (1, winners[0])


async def test_subscriber_that_commits_while_the_write_waits_gets_the_event(pool: asyncpg.Pool) -> None:
    """The optimistic read sees no subscriber; a subscription commits while the UPDATE waits for the row lock.
    The write must notice it (ups_unsubscribed) and take the locked path, which queues the event."""
    key, uid = await new_item(pool)
    store._locked_first_until.clear()  # the optimistic path, whatever other tests did
    await pool.execute("INSERT INTO ups_subscriber (partition_key, ae_title) VALUES ($1, 'LATE')", key)
    async with pool.acquire() as sub:
        transaction = sub.transaction()
        await transaction.start()
        item = await sub.fetchval(
            "SELECT workitem_key FROM ups_workitem WHERE sop_instance_uid = $1 FOR UPDATE", uid
        )
        claim = asyncio.create_task(store.set_state(pool, key, uid, State.IN_PROGRESS, new_uid()))
        for _ in range(500):  # until the claim's UPDATE waits for our row lock
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE%'"
            )
            if waiting or claim.done():
                break
            await asyncio.sleep(0.01)
        assert waiting == 1, "the claim did not wait for the subscriber's lock"
        await sub.execute(
            "INSERT INTO ups_subscription (workitem_key, partition_key, ae_title) VALUES ($1, $2, 'LATE')",
            item,
            key,
        )
        await transaction.commit()
    assert await claim is None
    payloads = await pool.fetch("SELECT payload FROM ups_event WHERE ae_title = 'LATE' ORDER BY sequence")
    assert [orjson.loads(p["payload"])["00741000"]["Value"] for p in payloads] == [["IN PROGRESS"]]


async def test_write_of_a_changed_row_falls_back_to_the_lock(pool: asyncpg.Pool) -> None:
    """An update committed between the optimistic read and write: the write applies to nothing, and the
    locked path decides again on the new version (here: the item was claimed meanwhile, so 409)."""
    key, uid = await new_item(pool)
    async with pool.acquire() as conn:
        row = await store._read_workitem(conn, key, uid)
        assert not row.subscribed
        await store.set_state(pool, key, uid, State.IN_PROGRESS, new_uid())  # someone else claims it
        state, attrs, _ = store._state_change(row, State.IN_PROGRESS, new_uid(), uid)
        assert state is State.IN_PROGRESS  # decided on the stale version
        assert not await store._write_unlocked(conn, (key, uid), row, attrs, state, "1.2.3", typed=False)
    with pytest.raises(store.UpsError) as refused:
        await store.set_state(pool, key, uid, State.IN_PROGRESS, new_uid())
    assert refused.value.status == 409


async def test_the_next_write_in_this_process_needs_no_read(database_url: str, pool: asyncpg.Pool) -> None:
    """After an optimistic write, the version written is remembered: the worker's update and completion are
    one statement each, with the same results."""
    key, uid = await new_item(pool)
    store._locked_first_until.clear()
    seen: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: seen.append(q.query.split()[0]))

    async with asyncpg.create_pool(
        database_url, min_size=1, max_size=1, init=log_queries, reset=keep_session
    ) as logged:
        tuid = new_uid()
        assert await store.set_state(logged, key, uid, State.IN_PROGRESS, tuid) is None
        assert seen == ["SELECT", "UPDATE"]
        seen.clear()
        await store.update(logged, key, uid, tuid, performed())
        assert seen == ["UPDATE"]
        seen.clear()
        assert await store.set_state(logged, key, uid, State.COMPLETED, tuid) is None
        assert seen == ["UPDATE"]
    state, owner, body = await stored(pool, uid)
    assert (state, owner, body["00741000"]["Value"]) == (2, tuid, ["COMPLETED"])
    assert body["00741216"] == performed()["00741216"]


async def test_a_version_changed_elsewhere_is_read_again(pool: asyncpg.Pool) -> None:
    """A remembered version that another process has since replaced: the write applies to nothing, and the
    request is decided again on the stored version."""
    key, uid = await new_item(pool)
    store._locked_first_until.clear()
    tuid = new_uid()
    await store.set_state(pool, key, uid, State.IN_PROGRESS, tuid)
    await store.update(pool, key, uid, tuid, performed())
    stale = store._written[key, uid]  # IN PROGRESS with the performed procedure: ready to complete
    assert await store.set_state(pool, key, uid, State.COMPLETED, tuid) is None
    before = await stored(pool, uid)
    store._written[key, uid] = stale  # as if another process had completed it
    assert (
        await store.set_state(pool, key, uid, State.COMPLETED, tuid)
        == store.ALREADY[Status.ALREADY_COMPLETED]
    )
    assert await stored(pool, uid) == before
    store._written[key, uid] = stale
    with pytest.raises(store.UpsError) as refused:
        await store.update(pool, key, uid, tuid, performed())
    assert refused.value.status == 409 and "may no longer be updated" in refused.value.message
    assert await stored(pool, uid) == before


async def test_subscribed_item_takes_the_locked_path_and_hints_the_partition(pool: asyncpg.Pool) -> None:
    key, uid = await new_item(pool)
    store._locked_first_until.clear()
    await pool.execute("INSERT INTO ups_subscriber (partition_key, ae_title) VALUES ($1, 'EARLY')", key)
    await pool.execute(
        """INSERT INTO ups_subscription (workitem_key, partition_key, ae_title)
           SELECT workitem_key, partition_key, 'EARLY' FROM ups_workitem WHERE sop_instance_uid = $1""",
        uid,
    )
    tuid = new_uid()
    assert await store.set_state(pool, key, uid, State.IN_PROGRESS, tuid) is None
    assert store._locked_first_until[key] > time.monotonic()  # the next writes here skip the optimistic read
    await store.update(pool, key, uid, tuid, performed())
    assert await store.set_state(pool, key, uid, State.COMPLETED, tuid) is None
    types = await pool.fetch(
        "SELECT event_type, payload FROM ups_event WHERE ae_title = 'EARLY' ORDER BY sequence"
    )
    assert [(r["event_type"], orjson.loads(r["payload"]).get("00741000")) for r in types] == [
        (1, {"vr": "CS", "Value": ["IN PROGRESS"]}),
        (1, {"vr": "CS", "Value": ["COMPLETED"]}),
    ]


async def test_pool_without_reset_query_still_ends_open_transactions(database_url: str) -> None:
    """dicomweb.app.keep_session skips asyncpg's reset query; a transaction left open must still end."""
    async with asyncpg.create_pool(database_url, min_size=1, max_size=1, reset=keep_session) as p:
        async with p.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TABLE left_open (x int)")
        async with p.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None  # rolled back


async def test_concurrent_creates_with_a_global_subscriber_do_not_deadlock(pool: asyncpg.Pool) -> None:
    """Each create subscribes the global subscriber to its item (a row whose foreign key share-locks the
    subscriber row) and then queues its events (which locks that row for update). Two creates holding the
    share lock each and waiting to upgrade it deadlocked: one failed."""
    from worklist.subscriptions import subscribe_worklist

    key = await lookup_partition_key(pool, "default", create=True)
    assert key is not None
    for title in ("RACE-A", "RACE-B"):
        await subscribe_worklist(pool, key, title, None, None, False)

    async def create() -> None:
        uid, attrs, _ = prepare_create(parse_dataset(orjson.dumps(workitem())), new_uid())
        await store.create(pool, key, uid, attrs)

    results = await asyncio.gather(*(create() for _ in range(24)), return_exceptions=True)
    assert [r for r in results if r is not None] == []
    rows = await pool.fetch("SELECT ae_title, last_sequence FROM ups_subscriber ORDER BY ae_title")
    # two reports per item (its state, and Assigned: the item names a station), each AE's sequence dense
    assert [(r["ae_title"], r["last_sequence"]) for r in rows] == [("RACE-A", 48), ("RACE-B", 48)]


async def test_concurrent_subscriptions_of_one_ae_do_not_deadlock(pool: asyncpg.Pool) -> None:
    """An AE subscribing to several items at once: each subscription's foreign key share-locks the
    subscriber row before its initial report locks the row for update."""
    from worklist.subscriptions import subscribe_workitem

    items = [await new_item(pool) for _ in range(12)]
    results = await asyncio.gather(
        *(subscribe_workitem(pool, key, "RACE-S", uid, False) for key, uid in items), return_exceptions=True
    )
    assert [r for r in results if r is not None] == []
    assert await pool.fetchval("SELECT last_sequence FROM ups_subscriber WHERE ae_title = 'RACE-S'") == 12
