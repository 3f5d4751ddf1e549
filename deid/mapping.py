"""The re-identification tables: project secrets and the pseudonym/original mapping (0006_deid.sql).

Kept in this one module on purpose: whoever holds a project's secret, or reads its mapping, can link
exported data back to patients. Access control guards these functions (and the tables' grants) so that only
an authorised role re-identifies, deliberately and audited; nothing else in the archive reads the tables.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from deid.keys import new_secret

KINDS = ("patient", "study", "series", "instance")


@dataclass(frozen=True, slots=True)
class Mapping:
    kind: str
    pseudonym: str
    original: str
    issuer: str = ""


def valid_project(name: str) -> bool:
    return 1 <= len(name) <= 64 and name.isascii() and all(c.isalnum() or c in "_.-" for c in name)


async def project_secret(conn: asyncpg.Connection, project: str) -> bytes:
    """The project's secret, created on first use (concurrent first uses agree on one)."""
    secret = await conn.fetchval("SELECT secret FROM deid_project WHERE project = $1", project)
    if secret is not None:
        return bytes(secret)
    await conn.execute(
        "INSERT INTO deid_project (project, secret) VALUES ($1, $2) ON CONFLICT (project) DO NOTHING",
        project,
        new_secret(),
    )
    return bytes(await conn.fetchval("SELECT secret FROM deid_project WHERE project = $1", project))


async def record(
    conn: asyncpg.Connection, project: str, rows: Iterable[Mapping], operation: uuid.UUID | None = None
) -> None:
    """Remember pseudonyms and their originals (idempotent: a re-export records nothing new)."""
    rows = list({(r.kind, r.pseudonym): r for r in rows}.values())
    if not rows:
        return
    await conn.execute(
        """INSERT INTO deid_mapping (project, kind, pseudonym, original, issuer, first_operation)
           SELECT $1, m.kind, m.pseudonym, m.original, m.issuer, $6
           FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS m(kind, pseudonym, original, issuer)
           ON CONFLICT (project, kind, pseudonym) DO NOTHING""",
        project,
        [r.kind for r in rows],
        [r.pseudonym for r in rows],
        [r.original for r in rows],
        [r.issuer for r in rows],
        operation,
    )


async def reidentify(conn: asyncpg.Connection, project: str, kind: str, pseudonym: str) -> Mapping | None:
    """The original behind a pseudonym (for the authorised re-identification path)."""
    if "\x00" in pseudonym:  # PostgreSQL text holds no NUL, so no pseudonym has one
        return None
    row = await conn.fetchrow(
        "SELECT original, issuer FROM deid_mapping WHERE project = $1 AND kind = $2 AND pseudonym = $3",
        project,
        kind,
        pseudonym,
    )
    return Mapping(kind, pseudonym, row["original"], row["issuer"]) if row is not None else None
