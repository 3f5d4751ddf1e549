"""The append-only table of received HL7 messages (hl7_message, migration 0018): each message as it came,
with its outcome, so a failed one can be found and replayed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from hl7.message import Header


@dataclass(frozen=True, slots=True)
class Entry:
    message_id: int
    received_at: dt.datetime
    peer: str | None
    message_type: str | None
    control_id: str | None
    partition_name: str | None
    raw: bytes
    ack_code: str
    error_code: int | None
    detail: str | None
    result: dict[str, Any]
    replay_of: int | None


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    raw: bytes,
    peer: str | None,
    header: Header | None,
    partition: str | None,
    ack_code: str,
    error_code: int | None = None,
    detail: str | None = None,
    result: dict[str, Any] | None = None,
    replay_of: int | None = None,
) -> int:
    """Keep a message and its outcome (in the caller's transaction when it changed something)."""
    return await conn.fetchval(
        """INSERT INTO hl7_message (peer, sending_application, sending_facility, control_id, message_type,
               partition_name, raw, ack_code, error_code, detail, result, replay_of)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12) RETURNING message_id""",
        peer,
        header.sending_application[:200] if header else None,
        header.sending_facility[:200] if header else None,
        header.control_id[:200] if header else None,
        header.message_type[:200] if header and header.message_code else None,
        partition,
        raw,
        ack_code,
        error_code,
        detail[:4000] if detail else None,
        orjson.dumps(result or {}).decode(),
        replay_of,
    )


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(
        row["message_id"], row["received_at"], row["peer"], row["message_type"], row["control_id"],
        row["partition_name"], bytes(row["raw"]), row["ack_code"], row["error_code"], row["detail"],
        orjson.loads(row["result"]), row["replay_of"],
    )  # fmt: skip


async def get(conn: asyncpg.Connection | asyncpg.Pool, message_id: int) -> Entry | None:
    row = await conn.fetchrow("SELECT * FROM hl7_message WHERE message_id = $1", message_id)
    return _entry(row) if row is not None else None


async def entries(
    conn: asyncpg.Connection | asyncpg.Pool, *, failed: bool = False, limit: int = 100
) -> list[Entry]:
    """The latest messages, newest first; with `failed`, those answered AE or AR that no later replay
    answered AA."""
    where = (
        """WHERE m.ack_code <> 'AA' AND NOT EXISTS (SELECT 1 FROM hl7_message r
               WHERE r.replay_of = m.message_id AND r.ack_code = 'AA')"""
        if failed
        else ""
    )
    rows = await conn.fetch(f"SELECT * FROM hl7_message m {where} ORDER BY message_id DESC LIMIT $1", limit)
    return [_entry(r) for r in rows]
