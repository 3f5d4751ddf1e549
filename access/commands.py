"""Operator commands on the access tables: tokens (create, list, revoke), audit export, first-start token."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import asyncpg
import orjson

from access import audit, audit_chain, tokens
from access.clock import Clock

OWNER_TOKEN_FILE = "owner-token"
OWNER_TOKEN_NAME = "embedded-owner"
_DURATION_RE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expiry(text: str, now: datetime) -> datetime:
    """'30d', '12h', '90m' from now, or an ISO 8601 date-time (UTC when it names no zone); never `now` or
    before (a token born expired is a mistake)."""
    if m := _DURATION_RE.fullmatch(text.strip()):
        try:
            value = now + timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError:  # a datetime ends with the year 9999
            raise tokens.TokenError(f"--expires {text!r} is later than the year 9999") from None
    else:
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise tokens.TokenError(
                f"--expires takes 30d, 12h, 90m or an ISO date-time, not {text!r}"
            ) from None
        value = value if value.tzinfo else value.replace(tzinfo=now.tzinfo)
    if value <= now:
        raise tokens.TokenError(f"--expires {text!r} is not in the future")
    return value


@asynccontextmanager
async def _connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def create_token(
    dsn: str, role: str, *, partition: str | None, name: str | None, expires: str | None
) -> tuple[str, tokens.StoredToken]:
    now = Clock().now()
    expires_at = parse_expiry(expires, now) if expires else None
    async with _connect(dsn) as conn:
        return await tokens.create(conn, role, now=now, name=name, partition=partition, expires_at=expires_at)


async def list_tokens(dsn: str) -> list[tokens.StoredToken]:
    async with _connect(dsn) as conn:
        return await tokens.list_all(conn)


async def revoke_token(dsn: str, token: str) -> list[str]:
    async with _connect(dsn) as conn:
        return await tokens.revoke(conn, token, now=Clock().now())


async def export_audit(dsn: str, q: audit.AuditQuery, out: BinaryIO) -> int:
    count = 0
    async with _connect(dsn) as conn:
        async for record in audit.stream(conn, q):
            out.write(orjson.dumps(record) + b"\n")
            count += 1
    out.flush()
    return count


async def verify_audit(dsn: str) -> audit_chain.Verdict:
    async with _connect(dsn) as conn:
        return await audit_chain.verify(conn, audit.COLUMNS)


def bootstrap_owner_token(dsn: str, data_dir: Path) -> Path | None:
    """On the embedded default's first start: an owner token in DATA_DIR/owner-token (mode 0600).

    Returns the file's path when it exists afterwards; None when it was removed after an earlier start
    (then no second owner token appears behind the operator's back: `dicomweb token create` makes one).
    """
    path = data_dir.resolve() / OWNER_TOKEN_FILE
    if path.exists():
        return path
    text = asyncio.run(_create_owner_token(dsn))
    if text is None:
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


async def _create_owner_token(dsn: str) -> str | None:
    async with _connect(dsn) as conn:
        existing = await conn.fetchval("SELECT count(*) FROM access_token WHERE name = $1", OWNER_TOKEN_NAME)
        if existing:
            return None
        text, _ = await tokens.create(conn, "owner", now=Clock().now(), name=OWNER_TOKEN_NAME)
        return text
