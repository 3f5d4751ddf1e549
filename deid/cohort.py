"""A QIDO-RS query as an export source: resolved, when the export is created, to the studies it matches.

The cohort is what matched at that moment (studies stored later are not part of it), and the operation
keeps plain identifiers, so resuming it never re-runs the query. The query resolves in one statement
(indexer.qido.matching_study_uids), so a cohort of ten thousand patients takes a fraction of a second.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import asyncpg

from deid.export_request import MAX_IDENTIFIERS, ExportRequestError
from indexer.attributes import Level
from indexer.extended_tags import query_tags
from indexer.qido import QueryError, matching_study_uids, names_extended_tags, parse_query


async def check_query(conn: asyncpg.Connection, query: str, what: str = "source.settings.query") -> None:
    """Raise ExportRequestError (naming the query `what`) unless `query` is a study-level query that
    resolve_query can run: a request that keeps its query for later (a data request, resolved at approval)
    is refused now rather than when it is decided."""
    await _parsed(conn, query, what)


async def _parsed(conn: asyncpg.Connection, query: str, what: str) -> object:
    params = parse_qsl(query, keep_blank_values=True)
    if any(name.lower() in ("limit", "offset", "includefield") for name, _ in params):
        raise ExportRequestError(f"{what}: limit, offset and includefield do not apply")
    extended = await query_tags(conn) if names_extended_tags(params) else {}
    try:
        return parse_query(Level.STUDY, params, extended=extended)
    except QueryError as exc:
        raise ExportRequestError(f"{what}: {exc}") from exc


async def resolve_query(conn: asyncpg.Connection, partition: int, query: str) -> list[str]:
    """Study Instance UIDs of every study the study-level query matches (limit/offset are not allowed)."""
    parsed = await _parsed(conn, query, "source.settings.query")
    studies = await matching_study_uids(conn, partition, parsed, MAX_IDENTIFIERS + 1)  # type: ignore[arg-type]
    if len(studies) > MAX_IDENTIFIERS:
        raise ExportRequestError(f"the query matches more than {MAX_IDENTIFIERS} studies")
    return studies
