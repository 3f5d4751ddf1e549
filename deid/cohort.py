"""A QIDO-RS query as an export source: resolved, when the export is created, to the studies it matches.

The cohort is what matched at that moment (studies stored later are not part of it), and the operation
keeps plain identifiers, so resuming it never re-runs the query.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import asyncpg

from deid.export_request import MAX_IDENTIFIERS, ExportRequestError
from indexer.attributes import Level
from indexer.extended_tags import query_tags
from indexer.qido import QueryError, names_extended_tags, parse_query, search_page

_PAGE = 1000
_STUDY_UID = "0020000D"


async def resolve_query(conn: asyncpg.Connection, partition: int, query: str, base_url: str) -> list[str]:
    """Study Instance UIDs of every study the study-level query matches (limit/offset are not allowed)."""
    params = parse_qsl(query, keep_blank_values=True)
    if any(name.lower() in ("limit", "offset", "includefield") for name, _ in params):
        raise ExportRequestError("source.settings.query: limit, offset and includefield do not apply")
    extended = await query_tags(conn) if names_extended_tags(params) else {}
    studies: list[str] = []
    offset = 0
    while True:
        paged = [*params, ("limit", str(_PAGE)), ("offset", str(offset))]
        try:
            parsed = parse_query(Level.STUDY, paged, default_limit=_PAGE, max_limit=_PAGE, extended=extended)
        except QueryError as exc:
            raise ExportRequestError(f"source.settings.query: {exc}") from exc
        page = await search_page(conn, partition, parsed, base_url)
        for result in page.results:
            values = (result.get(_STUDY_UID) or {}).get("Value") or []
            if values:
                studies.append(values[0])
        if len(studies) > MAX_IDENTIFIERS:
            raise ExportRequestError(f"the query matches more than {MAX_IDENTIFIERS} studies")
        if not page.more:
            return studies
        offset += _PAGE
