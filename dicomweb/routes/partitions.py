"""GET /vN/partitions: the data partitions, as Azure DICOM service lists them.

A JSON array of `{"partitionKey", "partitionName", "createdDate"}` by key, 204 when there is none to show
(Azure's "no partitions exist"). Partitions are always enabled here (the plain roots are the partition
Microsoft.Default), so Azure's 400 for a service without partitions never applies. Unlike Azure, which
lists every partition to anyone authorized on the service, each caller sees only the partitions its grants
reach (access.policy.partition_visible): a research partition only its researcher and owners.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from access.policy import partition_visible
from dicomweb.auth import grants_of
from dicomweb.context import context
from dicomweb.routes.extended_query_tags import iso_time
from indexer.lookup import all_partitions


async def list_partitions(request: Request) -> Response:
    async with context(request).pool.acquire() as conn:
        rows = await all_partitions(conn)
    grants, now = grants_of(request.scope), request.app.state.access.clock.now()
    visible = [
        {
            "partitionKey": r["partition_key"],
            "partitionName": r["name"],
            "createdDate": iso_time(r["created_at"]),
        }
        for r in rows
        if partition_visible(grants, r["name"], now)
    ]
    if not visible:
        return Response(status_code=204)
    return Response(orjson.dumps(visible), media_type="application/json")
