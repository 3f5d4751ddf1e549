"""Background operations: rows in PostgreSQL that any dicomweb process claims, runs in steps and resumes.

An operation is claimed with FOR UPDATE SKIP LOCKED and a lease (a token naming the claim and a deadline).
The work is done in steps; each step runs in one transaction that first re-locks the operation row and
checks that the lease token is still the worker's own, and commits the step's effects together with the new
checkpoint, progress and a renewed lease (the heartbeat). So:

* a worker that dies (process killed, task cancelled) loses at most its uncommitted step, and when its lease
  runs out any process claims the operation again and resumes from the last checkpoint;
* a worker that was too slow and lost its lease to another cannot commit anything more: the operation never
  runs twice at once, even for a moment;
* canceling is an UPDATE of the row, which waits for a running step to commit; the next step sees it.

The runner is generic: handlers registered by operation type do the work (re-index of extended query tags
now; exports later). Steps must be much shorter than the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import orjson

from indexer.background import Periodic

log = logging.getLogger(__name__)

STATUSES = ("notStarted", "running", "succeeded", "failed", "canceled")
FINISHED = frozenset({"succeeded", "failed", "canceled"})
MAX_FAILURES = 3


@dataclass(slots=True)
class Operation:
    id: uuid.UUID
    type: str
    status: str
    params: dict[str, Any]
    checkpoint: dict[str, Any] | None
    percent_complete: int
    resources: list[str]  # paths relative to a service root
    results: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    attempts: int = 0

    @property
    def id_hex(self) -> str:
        """Azure's form of operation ids: a GUID without dashes."""
        return self.id.hex


def _operation(row: asyncpg.Record) -> Operation:
    return Operation(
        id=row["operation_id"],
        type=row["type"],
        status=row["status"],
        params=orjson.loads(row["params"]),
        checkpoint=orjson.loads(row["checkpoint"]) if row["checkpoint"] is not None else None,
        percent_complete=row["percent_complete"],
        resources=orjson.loads(row["resources"]),
        results=orjson.loads(row["results"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        attempts=row["attempts"],
    )


def parse_operation_id(text: str) -> uuid.UUID | None:
    """An operation id as clients send it (with or without dashes); None when malformed."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


async def create_operation(
    conn: asyncpg.Connection, type_: str, params: dict[str, Any], resources: list[str]
) -> Operation:
    """A new notStarted operation, committed with the caller's transaction."""
    row = await conn.fetchrow(
        """INSERT INTO operation (operation_id, type, params, resources)
           VALUES ($1, $2, $3::jsonb, $4::jsonb) RETURNING *""",
        uuid.uuid4(),
        type_,
        orjson.dumps(params).decode(),
        orjson.dumps(resources).decode(),
    )
    return _operation(row)


async def get_operation(conn: asyncpg.Connection, operation_id: uuid.UUID) -> Operation | None:
    row = await conn.fetchrow("SELECT * FROM operation WHERE operation_id = $1", operation_id)
    return _operation(row) if row is not None else None


async def cancel_operation(conn: asyncpg.Connection, operation_id: uuid.UUID, reason: str) -> bool:
    """Mark an unfinished operation canceled (waits for a running step to commit); False if finished."""
    status = await conn.fetchval(
        """UPDATE operation SET status = 'canceled', finished_at = clock_timestamp(),
               updated_at = clock_timestamp(), lease_token = NULL, leased_by = NULL, leased_until = NULL,
               results = results || jsonb_build_object('reason', $2::text)
           WHERE operation_id = $1 AND status IN ('notStarted', 'running') RETURNING status""",
        operation_id,
        reason,
    )
    return status is not None


@dataclass(slots=True)
class Step:
    """What a handler's step achieved: committed with the step's own effects."""

    checkpoint: dict[str, Any]
    percent: int
    done: bool = False
    results: dict[str, Any] = field(default_factory=dict)  # merged into the operation's results
    failed: bool = False  # with done: the operation ends `failed` (errors are in its results)
    # not done, and cannot go on yet (waits for another operation): the lease is released and the
    # operation may be claimed again after this many seconds, so the worker can run the one it waits for
    defer: float | None = None
    # called once the step has committed, never for a step that rolled back (and is done again): what must
    # be told only of what happened, such as audit records written by a writer of their own
    after_commit: list[Callable[[], None]] = field(default_factory=list)


class OperationHandler(Protocol):
    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        """Do one short piece of work in the caller's transaction (the operation row is locked)."""
        ...


class LeaseLost(Exception):
    """The operation was canceled, finished or taken over by another worker since the last step."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class OperationRunner(Periodic):
    """Claims operations from PostgreSQL and runs them, one at a time, until stopped; `poke()` looks for work
    now (called after creating an operation in this process)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        handlers: Mapping[str, OperationHandler],
        *,
        worker: str | None = None,
        lease_seconds: float = 30.0,
        poll_interval: float = 2.0,
    ) -> None:
        super().__init__(
            "operation-runner", self.run_once, poll_interval, lambda _exc: log.exception("operation runner")
        )
        self._pool = pool
        self._handlers = dict(handlers)
        self.worker = worker or worker_name()
        self._lease = lease_seconds
        self._token: uuid.UUID | None = None  # the lease currently held

    async def stop(self) -> None:
        """Stop; the current step is rolled back and the lease released, so another process resumes now."""
        await super().stop()
        if self._token is not None:
            with contextlib.suppress(Exception):
                await self._pool.execute(
                    "UPDATE operation SET lease_token = NULL, leased_by = NULL, leased_until = NULL"
                    " WHERE lease_token = $1",
                    self._token,
                )
            self._token = None

    async def claim(self, operation_id: uuid.UUID | None = None) -> Operation | None:
        """Take the oldest runnable operation (unleased or with an expired lease), or that one, and lease
        it."""
        token = uuid.uuid4()
        row = await self._pool.fetchrow(
            """UPDATE operation o SET status = 'running', lease_token = $1, leased_by = $2,
                   leased_until = clock_timestamp() + make_interval(secs => $3), attempts = o.attempts + 1,
                   updated_at = clock_timestamp()
               WHERE o.operation_id = (
                   SELECT operation_id FROM operation
                   WHERE status IN ('notStarted', 'running') AND type = ANY($4::text[])
                     AND (leased_until IS NULL OR leased_until < clock_timestamp())
                     AND ($5::uuid IS NULL OR operation_id = $5)
                   ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
               RETURNING o.*""",
            token,
            self.worker,
            self._lease,
            list(self._handlers),
            operation_id,
        )
        if row is None:
            return None
        self._token = token
        return _operation(row)

    async def run_once(self, operation_id: uuid.UUID | None = None) -> bool:
        """Claim one operation (or that one) and run it until it finishes or the lease is lost; False if
        none could be claimed. A command runs its own operation this way, in the foreground."""
        op = await self.claim(operation_id)
        if op is None:
            return False
        token = self._token
        assert token is not None
        log.info("operation %s (%s) claimed by %s, attempt %d", op.id_hex, op.type, self.worker, op.attempts)
        try:
            while await self.run_step(op.id, token):
                pass
        except LeaseLost:
            log.info("operation %s: lease lost, canceled or finished elsewhere", op.id_hex)
        # not when cancelled: stop() releases the lease still held
        self._token = None
        return True

    async def run_step(self, operation_id: uuid.UUID, token: uuid.UUID) -> bool:
        """One step under the lease; True while more steps are needed (False too when the step deferred the
        operation, which released the lease)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """SELECT * FROM operation WHERE operation_id = $1 AND lease_token = $2
                       AND status = 'running' FOR UPDATE""",
                    operation_id,
                    token,
                )
                if row is None:
                    raise LeaseLost
                op = _operation(row)
                step = await self._handlers[op.type].step(conn, op)
                percent = 100 if step.done else max(0, min(99, step.percent))
                deferred = step.defer is not None and not step.done
                await conn.execute(
                    """UPDATE operation SET checkpoint = $2::jsonb, percent_complete = $3,
                           results = results || $4::jsonb, updated_at = clock_timestamp(),
                           status = CASE WHEN $5 AND $7 THEN 'failed' WHEN $5 THEN 'succeeded'
                                    ELSE status END,
                           finished_at = CASE WHEN $5 THEN clock_timestamp() END,
                           lease_token = CASE WHEN $5 OR $8 THEN NULL ELSE lease_token END,
                           leased_by = CASE WHEN $8 THEN NULL ELSE leased_by END,
                           leased_until = CASE WHEN $5 THEN NULL
                                          WHEN $8 THEN clock_timestamp() + make_interval(secs => $9)
                                          ELSE clock_timestamp() + make_interval(secs => $6) END
                       WHERE operation_id = $1""",
                    operation_id,
                    orjson.dumps(step.checkpoint).decode(),
                    percent,
                    orjson.dumps(step.results).decode(),
                    step.done,
                    self._lease,
                    step.failed,
                    deferred,
                    step.defer or 0.0,
                )
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("operation %s: step failed", operation_id.hex)
            await self._record_failure(operation_id, token, exc)
            raise LeaseLost from exc
        for call in step.after_commit:
            try:
                call()
            except Exception:  # the step is committed whatever a callback does
                log.exception("operation %s: a callback after its step failed", operation_id.hex)
        return not step.done and not deferred

    async def _record_failure(self, operation_id: uuid.UUID, token: uuid.UUID, exc: Exception) -> None:
        """Retry later (lease released after a pause) or, after MAX_FAILURES, fail the operation."""
        message = f"{type(exc).__name__}: {exc}"
        await self._pool.execute(
            """UPDATE operation SET failures = failures + 1, updated_at = clock_timestamp(),
                   status = CASE WHEN failures + 1 >= $3 THEN 'failed' ELSE status END,
                   finished_at = CASE WHEN failures + 1 >= $3 THEN clock_timestamp() END,
                   results = results || jsonb_build_object('error', $4::text),
                   lease_token = NULL, leased_by = NULL,
                   leased_until = clock_timestamp() + make_interval(secs => 2 ^ failures)
               WHERE operation_id = $1 AND lease_token = $2""",
            operation_id,
            token,
            MAX_FAILURES,
            message,
        )


async def schedule_operation(
    pool: asyncpg.Pool, type_: str, interval: dt.timedelta, params: dict[str, Any], *, lock: int
) -> uuid.UUID | None:
    """Queue an operation of this type when none is unfinished and the last one was queued `interval` ago
    or more; the new operation's id, else None. Every process may call it: the advisory lock `lock` makes
    the check and the insert one step across processes, so it is queued once."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
        last = await conn.fetchrow(
            "SELECT status, created_at FROM operation WHERE type = $1 ORDER BY created_at DESC LIMIT 1", type_
        )
        if last is not None:
            if last["status"] not in FINISHED:
                return None
            if last["created_at"] > await conn.fetchval("SELECT clock_timestamp()") - interval:
                return None
        return (await create_operation(conn, type_, params, [])).id


class OperationSchedule(Periodic):
    """Queues an operation every `interval` (checked every `check_every` seconds, first a while after
    start, so that a process restarting often does not queue one on each start) and pokes the runner that
    claims it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        type_: str,
        interval: dt.timedelta,
        params: dict[str, Any],
        poke: Callable[[], None],
        *,
        lock: int,
        check_every: float = 600.0,
    ) -> None:
        super().__init__(
            f"{type_}-schedule",
            self._check,
            check_every,
            lambda _exc: log.exception("%s schedule failed", type_),
        )
        self._pool, self._type, self._interval, self._params = pool, type_, interval, params
        self._poke, self._lock = poke, lock
        self._first = True

    async def _check(self) -> None:
        if self._first:
            self._first = False
            return
        if await schedule_operation(self._pool, self._type, self._interval, self._params, lock=self._lock):
            log.info("scheduled %s queued", self._type)
            self._poke()
