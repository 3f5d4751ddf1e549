"""A DELETE that races a STOW into the same study: neither may undo the other's committed rows.

The STOW's transaction is held open at its flush (after its index statements, before its commit) while the
DELETE of another instance of the study runs; then the STOW commits and the DELETE finishes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pydicom

from archive.ingest import prepare, record_of
from archive.removal import delete_instances
from bench.synthetic import instance_variants, make_study, to_bytes
from indexer.operations import create_operation
from indexer.writes import NewVersion, replace_instances
from retention.policy import RetentionPolicy, set_policy
from retention.sweep import RETENTION_SWEEP, RetentionSweepHandler
from storage import LocalBlobStore
from tests.test_ingest_durability import _HeldFlushStore, _ingest, _wait_for_open_transaction


async def _wait_for_lock_wait(pool: asyncpg.Pool) -> None:
    for _ in range(500):
        if await pool.fetchval(
            """SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
               AND pid <> pg_backend_pid() AND wait_event_type = 'Lock')"""
        ):
            return
        await asyncio.sleep(0.01)


async def _race(pool: asyncpg.Pool, tmp_path: Path, seed: int, scope: str) -> tuple[str, list[str], list]:
    """Store instance A; hold a STOW of B (same series) open; meanwhile DELETE A (`scope` "instance") or
    the series; let the STOW commit. Returns the study, A's and B's SOP Instance UIDs, what was removed."""
    spec = make_study(random.Random(seed), series_count=1)
    first, second = instance_variants(spec, 0, 2, start=seed * 100)
    plain = LocalBlobStore(tmp_path / "blobs")
    assert [o.failure for o in await _ingest(pool, plain, [first])] == [None]
    sop_a = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    sop_b = pydicom.dcmread(io.BytesIO(second)).SOPInstanceUID
    held = _HeldFlushStore(tmp_path / "blobs")
    stow = asyncio.create_task(_ingest(pool, held, [second]))
    try:
        await asyncio.wait_for(held.started.wait(), 30)
        await _wait_for_open_transaction(pool)
        delete = asyncio.create_task(
            delete_instances(
                pool, 1, spec.study_uid, spec.series[0][0], sop_a if scope == "instance" else None
            )
        )
        await _wait_for_lock_wait(pool)
    finally:
        held.release.set()
    assert [o.failure for o in await asyncio.wait_for(stow, 30)] == [None]
    removed = await asyncio.wait_for(delete, 30)
    await plain.close()
    await held.close()
    return spec.study_uid, [sop_a, sop_b], removed


async def _state(pool: asyncpg.Pool, study_uid: str) -> dict[str, object]:
    row = await pool.fetchrow(
        """SELECT (SELECT array_agg(sop_instance_uid ORDER BY sop_instance_uid) FROM instance i
                   JOIN study s USING (study_key) WHERE s.study_instance_uid = $1) AS sops,
                  (SELECT instance_count FROM study WHERE study_instance_uid = $1) AS study_count,
                  (SELECT sum(x.instance_count) FROM series x JOIN study s USING (study_key)
                   WHERE s.study_instance_uid = $1) AS series_count,
                  (SELECT array_agg(sop_instance_uid || ':' || action ORDER BY sequence) FROM changefeed
                   WHERE study_instance_uid = $1) AS feed""",
        study_uid,
    )
    return dict(row)


async def test_a_stow_committed_while_an_instance_delete_waits_keeps_its_instance(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    study, (a, b), removed = await _race(pool, tmp_path, 1, "instance")
    assert [r.sop_instance_uid for r in removed] == [a]
    state = await _state(pool, study)
    # B was answered 200 and has a Create entry: its row must still be there, and counted
    assert state == {"sops": [b], "study_count": 1, "series_count": 1, "feed": [f"{a}:0", f"{b}:0", f"{a}:2"]}


async def test_a_stow_committed_while_a_series_delete_waits_is_counted(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    study, (a, b), removed = await _race(pool, tmp_path, 2, "series")
    state = await _state(pool, study)
    gone = sorted(r.sop_instance_uid for r in removed)
    left = sorted({a, b} - set(gone))
    # whatever the delete took, the rest is indexed, counted, and the feed says the same
    assert state["sops"] == (left or None)
    assert state["study_count"] == (len(left) or None)
    assert state["series_count"] == (len(left) or None)
    creates = {e.split(":")[0] for e in state["feed"] if e.endswith(":0")}
    deletes = {e.split(":")[0] for e in state["feed"] if e.endswith(":2")}
    assert creates == {a, b} and deletes == set(gone)


async def _lock_waiters(pool: asyncpg.Pool, count: int) -> None:
    for _ in range(500):
        waiting = await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"""
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} backends waiting for a lock")


async def test_a_delete_and_a_stow_of_the_same_patient_do_not_deadlock(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The delete holds the study row; a STOW into the study has locked the patient row and waits for the
    study; the delete then updates the study row a second time (its level attributes), which checks the
    patient foreign key. Both must finish: no deadlock, neither request fails."""
    spec = make_study(random.Random(3), series_count=1)
    first, second, third = instance_variants(spec, 0, 3, start=300)
    store = LocalBlobStore(tmp_path / "blobs")
    assert [o.failure for o in await _ingest(pool, store, [first, second])] == [None, None]
    sop_a = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    # pause the delete after its first locks: another transaction holds the instance row it wants
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT FROM instance WHERE sop_instance_uid = $1 FOR UPDATE", sop_a)
        delete = asyncio.create_task(delete_instances(pool, 1, spec.study_uid, spec.series[0][0], sop_a))
        await _lock_waiters(pool, 1)
        stow = asyncio.create_task(_ingest(pool, store, [third]))
        await _lock_waiters(pool, 2)
        await tx.rollback()
    removed = await asyncio.wait_for(delete, 30)
    outcomes = await asyncio.wait_for(stow, 30)
    assert [r.sop_instance_uid for r in removed] == [sop_a]
    assert [(o.failure, o.message or None) for o in outcomes] == [(None, None)]
    state = await _state(pool, spec.study_uid)
    assert (state["study_count"], state["series_count"], len(state["sops"])) == (2, 2, 2)
    await store.close()


async def test_an_update_to_a_new_patient_id_and_a_stow_carrying_it_do_not_deadlock(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A bulk update's step holds the study and then upserts the new PatientID's patient row; a STOW into the
    study carrying that PatientID locks that patient row first and then waits for the study. Both finish."""
    spec = make_study(random.Random(4), series_count=1)
    first, second = instance_variants(spec, 0, 2, start=400)
    store = LocalBlobStore(tmp_path / "blobs")
    assert [o.failure for o in await _ingest(pool, store, [first])] == [None]
    row = await pool.fetchrow("SELECT instance_key, storage_key FROM instance")
    ds = pydicom.dcmread(io.BytesIO(first))
    ds.PatientID = "MERGED-1"
    prepared = prepare(io.BytesIO(to_bytes(ds)))
    version = NewVersion(row["instance_key"], row["storage_key"], record_of(prepared, "p1/updated.dcm"))
    incoming = pydicom.dcmread(io.BytesIO(second))
    incoming.PatientID = "MERGED-1"

    async def update() -> list[int | None]:
        async with pool.acquire() as conn, conn.transaction():
            return await replace_instances(conn, 1, [version])

    # pause the update after its first locks: another transaction holds the instance row it wants
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT FROM instance FOR UPDATE")
        updating = asyncio.create_task(update())
        await _lock_waiters(pool, 1)
        stow = asyncio.create_task(_ingest(pool, store, [to_bytes(incoming)]))
        await _lock_waiters(pool, 2)
        await tx.rollback()
    new_keys = await asyncio.wait_for(updating, 30)
    outcomes = await asyncio.wait_for(stow, 30)
    assert new_keys[0] is not None
    assert [(o.failure, o.message or None) for o in outcomes] == [(None, None)]
    state = await _state(pool, spec.study_uid)
    assert (state["study_count"], state["series_count"], len(state["sops"])) == (2, 2, 2)
    await store.close()


async def test_an_expiry_sweep_and_a_stow_into_an_expiring_study_do_not_deadlock(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A sweep step deletes several studies in one transaction, and each deletion appends to the change
    feed (whose counter row it then holds to its commit). A STOW into the step's second study, holding that
    study's patient and study rows and waiting for the counter, must not be what the step waits for."""
    store = LocalBlobStore(tmp_path / "blobs")
    specs = [make_study(random.Random(seed), series_count=1) for seed in (5, 6)]
    for n, spec in enumerate(specs):
        assert [
            o.failure for o in await _ingest(pool, store, instance_variants(spec, 0, 2, start=500 + n * 10))
        ] == [
            None,
            None,
        ]
    await pool.execute("UPDATE study SET created_at = now() - interval '3 days'")
    await set_policy(pool, 1, RetentionPolicy(expire_after_days=1))
    handler = RetentionSweepHandler(lambda: datetime.now(UTC), lambda event: None)
    async with pool.acquire() as conn:
        op = await create_operation(conn, RETENTION_SWEEP, {}, [])

    async def sweep() -> None:
        nonlocal op
        while True:
            async with pool.acquire() as conn, conn.transaction():
                step = await handler.step(conn, op)
            if step.done:
                return
            op = dataclasses.replace(op, checkpoint=step.checkpoint)

    later = instance_variants(specs[1], 0, 1, start=600)
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT FROM study WHERE study_instance_uid = $1 FOR UPDATE", specs[1].study_uid
        )
        stow = asyncio.create_task(_ingest(pool, store, later))  # holds the patient, waits for the study
        await _lock_waiters(pool, 1)
        sweeping = asyncio.create_task(sweep())
        await _lock_waiters(pool, 2)
        await tx.rollback()
    outcomes = await asyncio.wait_for(stow, 30)
    await asyncio.wait_for(sweeping, 30)
    assert [(o.failure, o.message or None) for o in outcomes] == [(None, None)]
    # the first study is gone; the second is gone too, or holds the STOW's instance if it came after
    left = await pool.fetchval("SELECT count(*) FROM instance")
    assert left in (0, 1)
    await store.close()
