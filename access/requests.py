"""Research data requests: a researcher asks for a cohort, a reviewer decides, the researcher alone reads a
de-identified copy in a research partition until the grant expires or is revoked.

    submitted -> approved (export started) -> active (export finished; grant runs for the duration)
              -> rejected                      -> expired (clock passed expires_at)
    approved | active -> revoked

Every transition is one UPDATE guarded by the expected state plus a row in data_request_event (append-only),
committed together; transitions that change what a researcher may read NOTIFY every process so cached
grants are dropped before the next request. Times come from the archive's clock (tests move it).
Activation and expiry are noticed lazily (when requests are read and when grants are loaded): the
per-request authorization checks `expires_at` itself, so expiry takes effect on the next request even if
no state change has been written yet.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from access.notify import CHANNEL
from access.policy import RESEARCH_PREFIX

STATES = ("submitted", "approved", "rejected", "active", "expired", "revoked")
MAX_DURATION_DAYS = 366


class RequestError(ValueError):
    """A request body or transition the caller must correct (400), or a wrong state (409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Submission:
    title: str
    purpose: str
    source_partition: str
    cohort: dict[str, Any]  # {"studies": [...]} or {"query": "..."}
    deid_options: list[str]
    duration_seconds: int


def research_partition(request_id: uuid.UUID) -> str:
    return f"{RESEARCH_PREFIX}{request_id.hex[:16]}"


def as_dict(row: asyncpg.Record) -> dict[str, Any]:
    """A data_request (or data_request_event) row by column, its JSON columns decoded; the HTTP layer
    names the fields for clients (dicomweb.routes.datarequests)."""
    out = dict(row)
    for key in ("cohort", "deid_options"):
        if key in out:
            out[key] = orjson.loads(out[key])
    return out


async def submit(conn: asyncpg.Connection, researcher: str, sub: Submission, now: datetime) -> dict[str, Any]:
    request_id = uuid.uuid4()
    async with conn.transaction():
        row = await conn.fetchrow(
            """INSERT INTO data_request (request_id, researcher, title, purpose, source_partition, cohort,
                   deid_options, duration_seconds, state, created_at)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, 'submitted', $9) RETURNING *""",
            request_id, researcher, sub.title, sub.purpose, sub.source_partition,
            orjson.dumps(sub.cohort).decode(), orjson.dumps(sub.deid_options).decode(), sub.duration_seconds,
            now,
        )  # fmt: skip
        await _event(conn, request_id, now, researcher, None, "submitted", None)
    return as_dict(row)


async def _event(
    conn: asyncpg.Connection, request_id: uuid.UUID, now: datetime, actor: str, old: str | None, new: str,
    comment: str | None,
) -> None:  # fmt: skip
    await conn.execute(
        """INSERT INTO data_request_event (request_id, event_time, actor, from_state, to_state, comment)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        request_id, now, actor, old, new, comment,
    )  # fmt: skip


async def transition(
    conn: asyncpg.Connection,
    request_id: uuid.UUID,
    allowed_from: tuple[str, ...],
    to: str,
    *,
    actor: str,
    now: datetime,
    comment: str | None = None,
    **columns: object,
) -> asyncpg.Record:
    """Move a request to `to` if it is in one of `allowed_from` (in the caller's transaction); 409 if not."""
    row = await conn.fetchrow("SELECT * FROM data_request WHERE request_id = $1 FOR UPDATE", request_id)
    if row is None:
        raise RequestError("no such data request", 404)
    if row["state"] not in allowed_from:
        raise RequestError(f"the request is {row['state']}; this needs {' or '.join(allowed_from)}", 409)
    sets = ["state = $2"] + [f"{name} = ${i}" for i, name in enumerate(columns, start=3)]
    updated = await conn.fetchrow(
        f"UPDATE data_request SET {', '.join(sets)} WHERE request_id = $1 RETURNING *",
        request_id, to, *columns.values(),
    )  # fmt: skip
    await _event(conn, request_id, now, actor, row["state"], to, comment)
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, "grants:" + row["researcher"])
    return updated


async def refresh(conn: asyncpg.Connection, now: datetime, researcher: str | None = None) -> None:
    """Write the transitions that time and finished exports imply: approved -> active when the export
    succeeded, active -> expired when the grant ran out."""
    scope = "" if researcher is None else " AND r.researcher = $2"
    args: list[object] = [now] if researcher is None else [now, researcher]
    async with conn.transaction():
        due = await conn.fetch(
            f"""SELECT r.request_id, r.state, r.duration_seconds FROM data_request r
                LEFT JOIN operation o ON o.operation_id = r.operation_id
                WHERE ((r.state = 'approved' AND o.status = 'succeeded')
                       OR (r.state = 'active' AND r.expires_at <= $1)){scope}
                ORDER BY r.request_id FOR UPDATE OF r SKIP LOCKED""",
            *args,
        )
        for row in due:
            if row["state"] == "approved":
                expires = now + timedelta(seconds=row["duration_seconds"])
                await transition(conn, row["request_id"], ("approved",), "active", actor="system", now=now,
                                 comment="export finished", activated_at=now, expires_at=expires)  # fmt: skip
            else:
                await transition(conn, row["request_id"], ("active",), "expired", actor="system", now=now,
                                 comment="grant expired")  # fmt: skip


async def get(conn: asyncpg.Connection, request_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM data_request WHERE request_id = $1", request_id)
    if row is None:
        return None
    out = as_dict(row)
    events = await conn.fetch(
        """SELECT event_time, actor, from_state, to_state, comment FROM data_request_event
           WHERE request_id = $1 ORDER BY event_id""",
        request_id,
    )
    out["events"] = [as_dict(e) for e in events]
    return out


async def list_requests(
    conn: asyncpg.Connection, *, researcher: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    conditions, args = [], []
    for column, value in (("researcher", researcher), ("state", state)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = ${len(args)}")
    where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
    rows = await conn.fetch(f"SELECT * FROM data_request{where} ORDER BY created_at, request_id", *args)
    return [as_dict(r) for r in rows]


async def pending_activation(conn: asyncpg.Connection | asyncpg.Pool, researcher: str) -> bool:
    """Whether an approved request of `researcher` waits for its export (grants must not be cached then)."""
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM data_request WHERE researcher = $1 AND state = 'approved' LIMIT 1", researcher
        )
    )
