"""Static API tokens for machines: random, shown once, stored as a SHA-256 hash.

A token reads `dwa_<id>_<secret>`. The id is public and finds the row; the secret (256 random bits) is
checked against the stored SHA-256 with a constant-time comparison. A fast unsalted hash is enough here: the
secret has full entropy, so there is nothing to brute-force that a slow password hash would protect.
Creating and revoking NOTIFY every process (see access.notify), so a revocation takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from access.notify import CHANNEL
from access.policy import Role
from indexer.lookup import valid_partition_name  # one rule for every door, beside the partition table

PREFIX = "dwa_"
_TOKEN_RE = re.compile(r"dwa_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class TokenError(ValueError):
    """A token request an operator must correct (unknown role, bad partition name, bad name)."""


@dataclass(frozen=True, slots=True)
class StoredToken:
    token_id: str
    name: str
    role: Role
    partition: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    secret_sha256: bytes = b""


def split(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN_RE.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def matches(secret: str, stored: bytes) -> bool:
    return hmac.compare_digest(digest(secret), stored)


MAX_NAME = 128


def check_name(name: str) -> str:
    """A name given for a token, refused when it is empty (a name that names nothing), holds a control
    character (it would break `token list`'s columns and the audit log's lines) or is too long."""
    if not name.strip():
        raise TokenError("a token name must not be empty: leave it out to have it named token-<id>")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise TokenError("a token name must not contain a control character (tab, newline, NUL ...)")
    if len(name) > MAX_NAME:
        raise TokenError(f"a token name has at most {MAX_NAME} characters")
    return name


def _stored(row: asyncpg.Record) -> StoredToken:
    return StoredToken(
        row["token_id"], row["name"], Role(row["role"]), row["partition_name"], row["created_at"],
        row["expires_at"], row["revoked_at"], bytes(row["secret_sha256"]),
    )  # fmt: skip


async def create(
    conn: asyncpg.Connection,
    role: str,
    *,
    now: datetime,
    name: str | None = None,
    partition: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, StoredToken]:
    """A new token (the only time its text exists) and its stored row."""
    try:
        role_value = Role(role)
    except ValueError:
        raise TokenError(f"unknown role {role!r}: one of {', '.join(r.value for r in Role)}") from None
    if partition is not None and not valid_partition_name(partition):
        raise TokenError(
            f"invalid partition name {partition!r}: use 1-64 letters, digits, '_', '.', '-' (not '.' or '..')"
        )
    if name is not None:
        check_name(name)
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        """INSERT INTO access_token
               (token_id, secret_sha256, name, role, partition_name, created_at, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        token_id, digest(secret), f"token-{token_id[:6]}" if name is None else name, role_value.value,
        partition, now, expires_at,
    )  # fmt: skip
    return f"{PREFIX}{token_id}_{secret}", _stored(row)


async def find(conn: asyncpg.Connection | asyncpg.Pool, token_id: str) -> StoredToken | None:
    row = await conn.fetchrow("SELECT * FROM access_token WHERE token_id = $1", token_id)
    return _stored(row) if row else None


async def list_all(conn: asyncpg.Connection) -> list[StoredToken]:
    rows = await conn.fetch("SELECT * FROM access_token ORDER BY created_at, token_id")
    return [_stored(r) for r in rows]


async def revoke(conn: asyncpg.Connection, token_id: str, *, now: datetime) -> list[str]:
    """Revoke the active token with this id, or else the active tokens with this name; the ids revoked
    (none: nothing matched; a NUL names no token). An id never also revokes a token that is merely named
    like it. Every process drops them from its cache when the NOTIFY arrives; the caller's own process
    should drop them at once (`invalidate`)."""
    if "\x00" in token_id:  # PostgreSQL text holds no NUL, so no id or name has one
        return []
    async with conn.transaction():
        ids = await conn.fetch(
            """UPDATE access_token SET revoked_at = $2
               WHERE token_id = $1 AND revoked_at IS NULL RETURNING token_id""",
            token_id, now,
        )  # fmt: skip
        if not ids:
            ids = await conn.fetch(
                """UPDATE access_token SET revoked_at = $2
                   WHERE name = $1 AND revoked_at IS NULL RETURNING token_id""",
                token_id, now,
            )  # fmt: skip
        for row in ids:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, "token:" + row["token_id"])
    return [row["token_id"] for row in ids]
