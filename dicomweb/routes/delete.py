"""DELETE of a study, series or instance (Azure DICOM service semantics: 204, or 404 when nothing matched)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from archive.removal import delete_instances
from dicomweb.context import context, partition_key, uid_param
from dicomweb.errors import HTTPProblem


async def delete(request: Request) -> Response:
    study = uid_param(request, "study")
    series = uid_param(request, "series") if "series" in request.path_params else None
    sop = uid_param(request, "instance") if "instance" in request.path_params else None
    ctx = context(request)
    key = await partition_key(request)
    removed = await delete_instances(ctx.pool, key, study, series, sop)
    if not removed:
        what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
        raise HTTPProblem(404, f"{what} not found")
    ctx.maintenance.poke()  # the objects are queued for deletion; remove them promptly
    return Response(status_code=204)
