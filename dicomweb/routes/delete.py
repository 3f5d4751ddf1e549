"""DELETE of a study, series or instance (Azure DICOM service semantics: 204, or 404 when nothing matched)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from archive.removal import delete_instances
from dicomweb.context import context, not_found, partition_key, resource_uids


async def delete(request: Request) -> Response:
    study, series, sop = resource_uids(request)
    ctx = context(request)
    removed = await delete_instances(ctx.pool, await partition_key(request), study, series, sop)
    if not removed:
        raise not_found(study, series, sop)
    ctx.maintenance.poke()  # the objects are queued for deletion; remove them promptly
    return Response(status_code=204)
