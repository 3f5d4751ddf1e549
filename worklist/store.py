"""Work items in PostgreSQL: each UPS-RS transaction is one database transaction that locks the work item,
decides with worklist.states / worklist.validate, writes it and queues its events (worklist.events) before
commit. A request that fails raises `UpsError` before anything is written, so it changes nothing.

State changes and updates of an item nobody subscribes to take an optimistic path first: read the row
without a lock, decide, and write it in one autocommit UPDATE that applies only if the row is still the
version read (its xmin) and still has no subscriber (`ups_unsubscribed`, migration 0012). Two round trips
instead of four (BEGIN, SELECT FOR UPDATE, UPDATE, COMMIT), and no events are owed. Any miss (the row
changed, or gained a subscriber) wrote nothing and falls back to the locked transaction, so two claims still
serialise: the loser's UPDATE waits for the winner's commit, finds a new version, and the locked path then
answers 409. The version an optimistic write produced is remembered for a while, so that the next write to
the item in this process (the update and completion after a claim) needs no read: one round trip.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from worklist import events
from worklist.columns import COLUMNS, columns
from worklist.search import Args, parse_filter_list, where_sql
from worklist.states import Outcome, State, Status, change_state, may_update, request_cancel
from worklist.validate import (
    PROCEDURE_STEP_STATE,
    DatasetError,
    final_state_missing,
    name,
    now_dt,
    prepare_update,
    values,
)

INCONSISTENT = "The submitted request is inconsistent with the state of the UPS Instance."
NOT_CLAIMED = "The target URI did not reference a claimed Workitem."
TUID_INCORRECT = "The Transaction UID is incorrect."
ALREADY = {
    Status.ALREADY_CANCELED: "The UPS is already in the requested state of CANCELED.",
    Status.ALREADY_COMPLETED: "The UPS is already in the requested state of COMPLETED.",
}


class UpsError(Exception):
    """A refused request: HTTP status, a clear message, and the PS3.18 Warning text when it names one."""

    def __init__(self, status: int, message: str, warning: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.warning = warning


@dataclass(frozen=True, slots=True)
class _Row:
    key: int
    state: State
    tuid: str | None
    attrs: dict[str, Any]
    version: int | None = None  # the row version's xmin, when read without a lock (the optimistic path)
    subscribed: bool = True


async def lock_workitem(conn: asyncpg.Connection, partition_key: int, uid: str) -> _Row:
    row = await conn.fetchrow(
        """SELECT workitem_key, state, transaction_uid, body FROM ups_workitem
           WHERE partition_key = $1 AND sop_instance_uid = $2 FOR UPDATE""",
        partition_key,
        uid,
    )
    if row is None:
        raise UpsError(404, f"workitem {uid} does not exist")
    return _Row(row[0], State(row[1]), row[2], orjson.loads(row[3]))


async def _read_workitem(conn: asyncpg.Connection, partition_key: int, uid: str) -> _Row:
    """The item as last committed, without a lock, with its version and whether anyone subscribes to it."""
    row = await conn.fetchrow(
        """SELECT workitem_key, state, transaction_uid, body, xmin,
                  EXISTS (SELECT FROM ups_subscription s WHERE s.workitem_key = w.workitem_key)
           FROM ups_workitem w WHERE partition_key = $1 AND sop_instance_uid = $2""",
        partition_key,
        uid,
    )
    if row is None:
        raise UpsError(404, f"workitem {uid} does not exist")
    return _Row(row[0], State(row[1]), row[2], orjson.loads(row[3]), row[4], row[5])


# Where items have subscribers (a worklist subscription covers every live item), the optimistic read is a
# wasted round trip. After a read finds a subscribed item, this process goes straight to the locked path for
# that partition for a while. A hint for speed only: either path is correct for any item.
_LOCKED_FIRST_SECONDS = 1.0
_locked_first_until: dict[int, float] = {}


async def _optimistic_read(conn: asyncpg.Connection, partition_key: int, uid: str) -> _Row | None:
    """The item for the optimistic path, or None to take the locked path."""
    if _locked_first_until.get(partition_key, 0.0) > time.monotonic():
        return None
    row = await _read_workitem(conn, partition_key, uid)
    if row.subscribed:
        _locked_first_until[partition_key] = time.monotonic() + _LOCKED_FIRST_SECONDS
        return None
    return row


# The subscribers of the item, read by the statement that writes it: that statement starts after the row
# lock was granted, so its snapshot sees every subscription committed before (subscribing locks the row
# too), and no event of this change can miss a subscriber. Saves a round trip on every write.
_SUBSCRIBERS = "ARRAY(SELECT s.ae_title FROM ups_subscription s WHERE s.workitem_key = $1)"
# ups_unsubscribed raises this when an optimistic write finds a subscriber (see migration 0012)
_HAS_SUBSCRIBERS = "UPS01"


def _update_sql(typed: bool, optimistic: bool) -> str:
    """UPDATE text; fixed per variant, so that asyncpg's prepared statement cache serves it. The jsonb copy
    is parsed from the body bytes, so the data set crosses the wire once. `typed` also rewrites the typed
    columns (a state change leaves them as they are: none derives from the state)."""
    sets = "attrs = convert_from($2, 'UTF8')::jsonb, body = $2, state = $3, transaction_uid = $4"
    n = 5
    if typed:
        sets += "".join(f", {c} = ${i}" for i, c in enumerate(COLUMNS, start=n))
        n += len(COLUMNS)
    sets += ", updated_at = now()"
    if optimistic:
        return (
            f"UPDATE ups_workitem SET {sets} WHERE workitem_key = $1 AND xmin = ${n} "
            "RETURNING ups_unsubscribed(workitem_key), xmin"
        )
    return f"UPDATE ups_workitem SET {sets} WHERE workitem_key = $1 RETURNING {_SUBSCRIBERS}"


_UPDATES = {
    (typed, optimistic): _update_sql(typed, optimistic)
    for typed in (False, True)
    for optimistic in (False, True)
}


def _write_args(row: _Row, attrs: dict[str, Any], state: State, tuid: str | None, typed: bool) -> list[Any]:
    args: list[Any] = [row.key, orjson.dumps(attrs), int(state), tuid]
    if typed:
        cols = columns(attrs)
        args.extend(cols[c] for c in COLUMNS)
    return args


async def _write(
    conn: asyncpg.Connection,
    row: _Row,
    attrs: dict[str, Any],
    state: State,
    tuid: str | None,
    *,
    typed: bool = True,
) -> list[str]:
    """Store the item's new data set and state under the row lock; returns its subscribers (_SUBSCRIBERS)."""
    return await conn.fetchval(_UPDATES[typed, False], *_write_args(row, attrs, state, tuid, typed))


async def _write_unlocked(
    conn: asyncpg.Connection,
    where: tuple[int, str],
    row: _Row,
    attrs: dict[str, Any],
    state: State,
    tuid: str | None,
    *,
    typed: bool,
) -> bool:
    """The optimistic write of a row read by _read_workitem (or remembered by _remember): True when it
    committed, and the version written is remembered; False when it wrote nothing because the row changed
    since that version or has a subscriber (take the next path)."""
    try:
        done = await conn.fetchrow(
            _UPDATES[typed, True], *_write_args(row, attrs, state, tuid, typed), row.version
        )
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == _HAS_SUBSCRIBERS:
            return False
        raise
    if done is None:
        return False
    _remember(where, _Row(row.key, state, tuid, attrs, done[1], False))
    return True


# The version each optimistic write produced, per (partition, UID), so that the next request for the item in
# this process (a worker's update and completion after its claim) can skip the read: the write applies only
# if the row is still exactly that version (its xmin), so a version changed meanwhile, by any process, makes
# it write nothing and fall back to reading. Only a decision to write is taken on a remembered version;
# refusals and warnings are decided on a fresh read. An entry is used once, and not after a while.
_REMEMBER_SECONDS = 30.0
_REMEMBER_MAX = 4096
_written: OrderedDict[tuple[int, str], tuple[float, _Row]] = OrderedDict()


def _remember(where: tuple[int, str], row: _Row) -> None:
    _written[where] = (time.monotonic() + _REMEMBER_SECONDS, row)
    _written.move_to_end(where)
    if len(_written) > _REMEMBER_MAX:
        _written.popitem(last=False)


def _remembered(where: tuple[int, str]) -> _Row | None:
    entry = _written.pop(where, None)
    if entry is None or entry[0] < time.monotonic():
        return None
    return entry[1]


def partition_lock(partition_key: int) -> int:
    """Advisory lock key: creates hold it shared, global subscriptions exclusively (see subscribe)."""
    return 0x55505357_00000000 + partition_key


# --- the UPS-RS transactions ----------------------------------------------------------------------------


async def create(pool: asyncpg.Pool, partition_key: int, uid: str, attrs: dict[str, Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await create_in(conn, partition_key, uid, attrs)


async def create_in(conn: asyncpg.Connection, partition_key: int, uid: str, attrs: dict[str, Any]) -> None:
    """Create Workitem inside the caller's transaction (an HL7 order commits it with its message row)."""
    cols = columns(attrs)
    names = ", ".join(COLUMNS)
    params = ", ".join(f"${n}" for n in range(6, 6 + len(COLUMNS)))
    body = orjson.dumps(attrs)
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", partition_lock(partition_key))
    key = await conn.fetchval(
        f"""INSERT INTO ups_workitem (partition_key, sop_instance_uid, state, attrs, body, {names})
            VALUES ($1, $2, $3, $4::jsonb, $5, {params})
            ON CONFLICT (partition_key, sop_instance_uid) DO NOTHING RETURNING workitem_key""",
        partition_key,
        uid,
        int(State.SCHEDULED),
        body.decode(),
        body,
        *(cols[c] for c in COLUMNS),
    )
    if key is None:
        raise UpsError(409, f"workitem {uid} already exists")
    titles = await _subscribe_new(conn, partition_key, key)
    if titles:
        created = [events.state_report(uid, attrs)]
        if any(values(attrs, k) for k in events.ASSIGNMENT_KEYS):
            created.append(events.from_workitem(uid, events.EventType.ASSIGNED, attrs))
        await events.emit(conn, partition_key, events.fan_out(titles, created))


async def _subscribe_new(conn: asyncpg.Connection, partition_key: int, key: int) -> list[str]:
    """Work item subscriptions of a new item for the global subscriptions that take it."""
    globals_ = await conn.fetch(
        """SELECT ae_title, filter, deletion_lock FROM ups_global_subscription WHERE partition_key = $1
           ORDER BY ae_title, filtered""",
        partition_key,
    )
    titles: list[str] = []
    locks: list[bool] = []
    for g in globals_:
        if g["ae_title"] in titles:
            continue
        if g["filter"] is not None:
            args = Args([key])
            where = where_sql(parse_filter_list(g["filter"]), args)
            if not await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM ups_workitem w WHERE w.workitem_key = $1 AND {where})",
                *args.values,
            ):
                continue
        titles.append(g["ae_title"])
        locks.append(g["deletion_lock"])
    if not titles:
        return titles
    # The subscriber rows first, for update, in AE title order (as events.emit locks them): a subscription's
    # foreign key share-locks its subscriber row, and two creates that each held that share lock and then
    # asked emit to lock the row for update waited for each other (a deadlock, one create failed).
    await events.lock_subscribers(conn, partition_key, titles)
    await conn.executemany(
        """INSERT INTO ups_subscription (workitem_key, partition_key, ae_title, deletion_lock)
           VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING""",
        [(key, partition_key, title, lock) for title, lock in zip(titles, locks, strict=True)],
    )
    return titles


async def retrieve(pool: asyncpg.Pool, partition_key: int, uid: str) -> bytes | None:
    return await pool.fetchval(
        "SELECT body FROM ups_workitem WHERE partition_key = $1 AND sop_instance_uid = $2",
        partition_key,
        uid,
    )


async def update(
    pool: asyncpg.Pool, partition_key: int, uid: str, tuid: str | None, ds: dict[str, Any]
) -> None:
    where = (partition_key, uid)
    async with pool.acquire() as conn:
        known = _remembered(where)
        if known is not None:
            try:
                attrs = _updated(known, uid, tuid, ds)
            except UpsError:
                pass  # decided again on a fresh read below
            else:
                if await _write_unlocked(conn, where, known, attrs, known.state, known.tuid, typed=True):
                    return
        row = await _optimistic_read(conn, partition_key, uid)
        if row is not None:
            attrs = _updated(row, uid, tuid, ds)
            if await _write_unlocked(conn, where, row, attrs, row.state, row.tuid, typed=True):
                return
        async with conn.transaction():
            row = await lock_workitem(conn, partition_key, uid)
            attrs = _updated(row, uid, tuid, ds)
            titles = await _write(conn, row, attrs, row.state, row.tuid)
            changed = [
                (
                    events.EventType.PROGRESS_REPORT,
                    row.attrs.get(events.PROGRESS_KEY) != attrs.get(events.PROGRESS_KEY),
                ),
                (
                    events.EventType.ASSIGNED,
                    any(row.attrs.get(k) != attrs.get(k) for k in events.ASSIGNMENT_KEYS),
                ),
                (
                    events.EventType.STATE_REPORT,
                    row.attrs.get(events.READINESS_KEY) != attrs.get(events.READINESS_KEY),
                ),
            ]
            kinds = [kind for kind, yes in changed if yes]
            if kinds and titles:
                emitted = [events.from_workitem(uid, kind, attrs) for kind in kinds]
                await events.emit(conn, partition_key, events.fan_out(titles, emitted))


def _updated(row: _Row, uid: str, tuid: str | None, ds: dict[str, Any]) -> dict[str, Any]:
    """The item's data set after Update Workitem, or the UpsError that refuses it."""
    status = may_update(row.state, row.tuid, tuid)
    if status is Status.MAY_NO_LONGER_BE_UPDATED:
        raise UpsError(409, f"workitem {uid} is {row.state.code} and may no longer be updated", INCONSISTENT)
    if status is Status.WRONG_TRANSACTION_UID:
        what = "requires its Transaction UID" if tuid is None else "was given a wrong Transaction UID"
        raise UpsError(409, f"workitem {uid} is IN PROGRESS and {what}", NOT_CLAIMED)
    try:
        return prepare_update(ds, row.attrs)
    except DatasetError as exc:
        raise UpsError(400, str(exc)) from exc


async def set_state(
    pool: asyncpg.Pool, partition_key: int, uid: str, requested: State, tuid: str
) -> str | None:
    """Change Workitem State; returns the Warning text of a success with warning (already in that state)."""
    where = (partition_key, uid)
    async with pool.acquire() as conn:
        known = _remembered(where)
        if known is not None:
            try:
                new_state, attrs, _ = _state_change(known, requested, tuid, uid)
            except UpsError:
                new_state = None  # decided again on a fresh read below
            if new_state is not None and await _write_unlocked(
                conn, where, known, attrs, new_state, tuid, typed=False
            ):
                return None
        row = await _optimistic_read(conn, partition_key, uid)
        if row is not None:
            new_state, attrs, warning = _state_change(row, requested, tuid, uid)
            if new_state is None:
                return warning
            if await _write_unlocked(conn, where, row, attrs, new_state, tuid, typed=False):
                return None
        async with conn.transaction():
            row = await lock_workitem(conn, partition_key, uid)
            new_state, attrs, warning = _state_change(row, requested, tuid, uid)
            if new_state is None:
                return warning
            titles = await _write(conn, row, attrs, new_state, tuid, typed=False)
            if titles:
                report = [events.state_report(uid, attrs)]
                await events.emit(conn, partition_key, events.fan_out(titles, report))
    return None


def _state_change(
    row: _Row, requested: State, tuid: str, uid: str
) -> tuple[State | None, dict[str, Any], str | None]:
    """(new state, its data set, None) for a change to make; (None, {}, warning or None) when the item is
    already in the requested state; UpsError when refused."""
    missing = final_state_missing(row.attrs, requested) if requested.final else []
    outcome = change_state(row.state, row.tuid, requested, tuid, not missing)
    _raise_for(outcome, row, requested, missing, uid)
    if outcome.new_state is None:
        return None, {}, ALREADY.get(outcome.status)
    attrs = dict(row.attrs)
    attrs[PROCEDURE_STEP_STATE] = {"vr": "CS", "Value": [outcome.new_state.code]}
    attrs["00404010"] = {"vr": "DT", "Value": [now_dt()]}
    return outcome.new_state, attrs, None


def _raise_for(outcome: Outcome, row: _Row, requested: State, missing: list[str], uid: str) -> None:
    if not outcome.failed:
        return
    code = outcome.status.value
    if outcome.status is Status.WRONG_TRANSACTION_UID:
        raise UpsError(
            409, f"workitem {uid}: the Transaction UID is not the owner's ({code})", TUID_INCORRECT
        )
    if outcome.status is Status.FINAL_STATE_NOT_MET:
        raise UpsError(
            409,
            f"workitem {uid} cannot become {requested.code}: final state requirements not met ({code}); "
            f"missing: {'; '.join(missing)}",
            INCONSISTENT,
        )
    reasons = {
        Status.ALREADY_IN_PROGRESS: "is already IN PROGRESS",
        Status.ONLY_VIA_CREATE: "can become SCHEDULED only when created",
        Status.NOT_IN_PROGRESS: "is not IN PROGRESS yet (claim it first)",
        Status.MAY_NO_LONGER_BE_UPDATED: f"is {row.state.code}, a final state",
    }
    raise UpsError(409, f"workitem {uid} {reasons.get(outcome.status, 'refused')} ({code})", INCONSISTENT)


CANCEL_INFO_KEYS = frozenset({"00741238", "0074100E", "0074100A", "0074100C", "00741236"})


async def cancel(pool: asyncpg.Pool, partition_key: int, uid: str, info: dict[str, Any]) -> str | None:
    """Request Cancellation; returns the Warning text when the item was already CANCELED."""
    async with pool.acquire() as conn, conn.transaction():
        return await cancel_in(conn, partition_key, uid, info)


async def cancel_in(
    conn: asyncpg.Connection, partition_key: int, uid: str, info: dict[str, Any]
) -> str | None:
    """Request Cancellation inside the caller's transaction (an HL7 order cancel commits it with its
    message row)."""
    extra = set(info) - CANCEL_INFO_KEYS
    if extra:
        raise UpsError(400, f"a cancellation request takes no {', '.join(name(k) for k in sorted(extra))}")
    row = await lock_workitem(conn, partition_key, uid)
    outcome = request_cancel(row.state)
    if outcome.status is Status.ALREADY_COMPLETED_CANCEL:
        raise UpsError(409, f"workitem {uid} is COMPLETED and cannot be canceled (C311)", INCONSISTENT)
    if outcome.status is Status.ALREADY_CANCELED:
        return ALREADY[Status.ALREADY_CANCELED]
    if outcome.cancel_requested:
        titles = await conn.fetchval(
            "UPDATE ups_workitem SET cancel_requested = true WHERE workitem_key = $1 "
            f"RETURNING {_SUBSCRIBERS}",
            row.key,
        )
        queued = [events.cancel_requested(uid, info)]
    else:  # SCHEDULED: the archive cancels it, reporting IN PROGRESS then CANCELED (Table CC.1.1-2)
        attrs = dict(row.attrs)
        items = values(attrs, "00741002")
        progress = dict(items[0]) if items and isinstance(items[0], dict) else {}
        progress["00404052"] = {"vr": "DT", "Value": [now_dt()]}  # ProcedureStepCancellationDateTime
        progress.update({k: v for k, v in info.items() if k != "00741236"})
        attrs["00741002"] = {"vr": "SQ", "Value": [progress]}
        attrs[PROCEDURE_STEP_STATE] = {"vr": "CS", "Value": [State.CANCELED.code]}
        attrs["00404010"] = {"vr": "DT", "Value": [now_dt()]}
        titles = await _write(conn, row, attrs, State.CANCELED, None)
        queued = [
            events.state_report(uid, attrs, State.IN_PROGRESS.code),
            events.state_report(uid, attrs),
        ]
    if titles:
        await events.emit(conn, partition_key, events.fan_out(titles, queued))
    return None
