"""DELETE of a study, series or instance (Azure DICOM service semantics: 204, or 404 when nothing matched).

Retention rules come first (retention/): 409 with the reason while the study is under legal hold or
younger than its partition's minimum retention; with a delete delay the objects stay restorable.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dicomweb.context import context, not_found, partition_key, resource_uids
from dicomweb.routes.retention import now, refused_deletion
from retention.deletion import delete_instances
from retention.guard import DeletionRefused


async def delete(request: Request) -> Response:
    study, series, sop = resource_uids(request)
    ctx = context(request)
    try:
        deletion = await delete_instances(
            ctx.pool, await partition_key(request), study, series, sop, now(request)
        )
    except DeletionRefused as exc:
        raise refused_deletion(request, exc) from exc
    if not deletion.removed:
        raise not_found(study, series, sop)
    if deletion.restorable_until is not None:
        request.state.audit_detail = f"restorable until {deletion.restorable_until.isoformat()}"
    ctx.maintenance.poke()  # the objects are queued for deletion; remove them promptly
    return Response(status_code=204)
