"""Background operations (indexer.operations) against a real PostgreSQL: claiming, leases, checkpoints,
resumption by another worker after a crash, cancellation and failure.

The handler used here counts: each step records the next few numbers in a table with a primary key, in the
step's transaction, so a number processed twice (two workers at once, or a step replayed after its commit)
fails the test with a unique violation, and a number skipped shows as a gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from indexer.migrate import migrate
from indexer.operations import (
    MAX_FAILURES,
    LeaseLost,
    Operation,
    OperationRunner,
    Step,
    cancel_operation,
    create_operation,
    get_operation,
    parse_operation_id,
)


class Counter:
    """Counts from checkpoint["next"] to params["total"], `per_step` numbers per step."""

    def __init__(self, per_step: int = 3, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.per_step, self.delay, self.fail_at = per_step, delay, fail_at
        self.steps = 0
        self.started = asyncio.Queue[int]()  # the number of each step as it begins (tests wait on it)

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        self.steps += 1
        self.started.put_nowait(self.steps)
        start = (op.checkpoint or {}).get("next", 0)
        total = op.params["total"]
        numbers = list(range(start, min(total, start + self.per_step)))
        if self.fail_at is not None and self.fail_at in numbers:
            raise RuntimeError(f"cannot count {self.fail_at}")
        await conn.executemany("INSERT INTO counted (op, n) VALUES ($1, $2)", [(op.id, n) for n in numbers])
        if self.delay:
            await asyncio.sleep(self.delay)
        end = start + len(numbers)
        return Step({"next": end}, end * 100 // total, done=end >= total, results={"counted": end})


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute("CREATE TABLE counted (op uuid, n integer, PRIMARY KEY (op, n))")
    try:
        yield pool
    finally:
        await pool.close()


async def new_op(pool: asyncpg.Pool, total: int = 10) -> Operation:
    async with pool.acquire() as conn:
        return await create_operation(conn, "count", {"total": total}, [f"things/{total}"])


async def counted(pool: asyncpg.Pool, op: Operation) -> list[int]:
    return [r[0] for r in await pool.fetch("SELECT n FROM counted WHERE op = $1 ORDER BY n", op.id)]


async def test_create_and_read(pool: asyncpg.Pool) -> None:
    op = await new_op(pool)
    assert op.status == "notStarted" and op.percent_complete == 0 and op.checkpoint is None
    assert len(op.id_hex) == 32 and "-" not in op.id_hex
    assert parse_operation_id(op.id_hex) == op.id == parse_operation_id(str(op.id))
    assert parse_operation_id("not-a-guid") is None
    async with pool.acquire() as conn:
        again = await get_operation(conn, op.id)
        assert await get_operation(conn, uuid.uuid4()) is None
    assert again is not None and again.resources == ["things/10"] and again.params == {"total": 10}


async def test_runner_runs_to_completion(pool: asyncpg.Pool) -> None:
    op = await new_op(pool, total=10)
    runner = OperationRunner(pool, {"count": Counter()})
    assert await runner.run_once() is True
    assert await runner.run_once() is False  # nothing left
    async with pool.acquire() as conn:
        done = await get_operation(conn, op.id)
    assert done is not None
    assert (done.status, done.percent_complete, done.results) == ("succeeded", 100, {"counted": 10})
    assert await counted(pool, op) == list(range(10))
    row = await pool.fetchrow("SELECT lease_token, finished_at, attempts FROM operation")
    assert row["lease_token"] is None and row["finished_at"] is not None and row["attempts"] == 1


async def test_claims_skip_locked_and_leased_operations(pool: asyncpg.Pool) -> None:
    first, second = await new_op(pool), await new_op(pool)
    a = OperationRunner(pool, {"count": Counter()}, worker="a")
    b = OperationRunner(pool, {"count": Counter()}, worker="b")
    c = OperationRunner(pool, {"count": Counter()}, worker="c")
    claimed_a, claimed_b = await asyncio.gather(a.claim(), b.claim())
    assert claimed_a is not None and claimed_b is not None
    assert {claimed_a.id, claimed_b.id} == {first.id, second.id}
    assert await c.claim() is None  # both leased
    # a runner only claims types it has a handler for
    other = OperationRunner(pool, {"export": Counter()})
    await new_op(pool)
    assert await other.claim() is None


async def test_killed_worker_is_resumed_from_its_checkpoint(pool: asyncpg.Pool) -> None:
    """A worker dies after two committed steps (its lease stays); another resumes when the lease expires."""
    op = await new_op(pool, total=20)
    dying = OperationRunner(pool, {"count": Counter(per_step=3)}, worker="dying", lease_seconds=2)
    claimed = await dying.claim()
    assert claimed is not None
    token = dying._token
    assert token is not None
    assert await dying.run_step(op.id, token) is True
    assert await dying.run_step(op.id, token) is True
    # the process is killed here: no release, no further steps
    survivor_handler = Counter(per_step=3)
    survivor = OperationRunner(pool, {"count": survivor_handler}, worker="survivor", lease_seconds=5)
    assert await survivor.claim() is None  # still leased
    await asyncio.sleep(2.2)
    resumed = await survivor.claim()
    assert resumed is not None and resumed.checkpoint == {"next": 6} and resumed.attempts == 2
    assert resumed.percent_complete == 30
    while await survivor.run_step(op.id, survivor._token):  # type: ignore[arg-type]
        pass
    assert survivor_handler.steps == 5  # 6..20 in steps of 3
    assert await counted(pool, op) == list(range(20))
    # the dead worker, were it to wake up, can commit nothing more
    with pytest.raises(LeaseLost):
        await dying.run_step(op.id, token)
    assert await counted(pool, op) == list(range(20))


async def test_a_step_in_progress_is_never_taken_over(pool: asyncpg.Pool) -> None:
    """A step longer than the lease: claims skip the locked row, so nobody else runs the operation meanwhile;
    the step's commit renews the lease. (A takeover between steps is the killed-worker test above.)"""
    op = await new_op(pool, total=12)
    handler = Counter(per_step=6, delay=2.0)
    slow = OperationRunner(pool, {"count": handler}, worker="slow", lease_seconds=0.3)
    fast = OperationRunner(pool, {"count": Counter(per_step=4)}, worker="fast", lease_seconds=5)
    slow_task = asyncio.create_task(slow.run_once())
    assert await handler.started.get() == 1
    await asyncio.sleep(0.5)  # slow is inside its first step and its lease has expired
    assert await fast.claim() is None
    assert await slow_task is True
    assert await counted(pool, op) == list(range(12))
    assert await pool.fetchval("SELECT status FROM operation") == "succeeded"


async def test_task_cancelled_mid_step_rolls_back_and_releases(pool: asyncpg.Pool) -> None:
    """stop() during a step: the step's work is rolled back and the lease released for others at once."""
    op = await new_op(pool, total=9)
    handler = Counter(per_step=3, delay=0.5)
    first = OperationRunner(pool, {"count": handler}, worker="first")
    first.start()
    while await handler.started.get() < 2:  # one step committed, the second one in progress
        pass
    await first.stop()
    done_before = await counted(pool, op)
    assert done_before == [0, 1, 2]
    row = await pool.fetchrow("SELECT status, lease_token, checkpoint FROM operation")
    assert row["status"] == "running" and row["lease_token"] is None and row["checkpoint"] == '{"next": 3}'
    second = OperationRunner(pool, {"count": Counter(per_step=3)}, worker="second")
    assert await second.run_once() is True
    assert await counted(pool, op) == list(range(9))


async def test_cancel(pool: asyncpg.Pool) -> None:
    op = await new_op(pool, total=30)
    runner = OperationRunner(pool, {"count": Counter(per_step=3)})
    claimed = await runner.claim()
    assert claimed is not None
    token = runner._token
    assert await runner.run_step(op.id, token) is True  # type: ignore[arg-type]
    async with pool.acquire() as conn:
        assert await cancel_operation(conn, op.id, "no longer wanted") is True
        assert await cancel_operation(conn, op.id, "again") is False  # finished already
        canceled = await get_operation(conn, op.id)
    assert canceled is not None and canceled.status == "canceled"
    assert canceled.results == {"counted": 3, "reason": "no longer wanted"}
    with pytest.raises(LeaseLost):
        await runner.run_step(op.id, token)  # type: ignore[arg-type]
    assert await counted(pool, op) == [0, 1, 2]
    assert await runner.claim() is None


async def test_failing_step_is_retried_then_fails(pool: asyncpg.Pool) -> None:
    op = await new_op(pool, total=9)
    handler = Counter(per_step=3, fail_at=4)
    runner = OperationRunner(pool, {"count": handler})
    for attempt in range(MAX_FAILURES):
        # the lease is released with a backoff of 2^failures seconds; make it claimable now
        await pool.execute("UPDATE operation SET leased_until = NULL")
        assert await runner.run_once() is True
        status = await pool.fetchval("SELECT status FROM operation")
        assert status == ("failed" if attempt == MAX_FAILURES - 1 else "running")
    async with pool.acquire() as conn:
        failed = await get_operation(conn, op.id)
    assert failed is not None and failed.results["error"] == "RuntimeError: cannot count 4"
    assert await counted(pool, op) == [0, 1, 2]  # the failing step committed nothing
    await pool.execute("UPDATE operation SET leased_until = NULL")
    assert await runner.run_once() is False  # failed operations are not claimed again
