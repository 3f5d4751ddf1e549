"""Validators for HTTP caching: a digest that changes whenever the set of stored objects under a study,
series or instance changes.

An instance row never changes once written and its storage_key is unique per stored version, so the keys
of the addressed instances identify everything WADO-RS serves from them (metadata, rendered images), and a
study "changes" exactly when instances are added or deleted. Computed in PostgreSQL: no row leaves it.
"""

from __future__ import annotations

import asyncpg

from indexer.lookup import scope_sql


async def scope_version(
    conn: asyncpg.Connection | asyncpg.Pool,
    partition_key: int,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> str | None:
    """md5 over the addressed instances' storage keys in a fixed order; None when nothing is addressed."""
    where, args = scope_sql(study_uid, series_uid, sop_uid)
    return await conn.fetchval(
        f"""SELECT md5(string_agg(i.storage_key, '|' ORDER BY i.storage_key))
            FROM instance i
            JOIN series se ON se.series_key = i.series_key
            JOIN study st ON st.study_key = i.study_key
            WHERE i.partition_key = $1 AND {where}""",
        partition_key,
        *args,
    )
