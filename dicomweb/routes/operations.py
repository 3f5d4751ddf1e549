"""GET /operations/{id}: a background operation's state (Azure DICOM service's long-running operations).

200 once it has finished (succeeded, failed, canceled), 202 with a Location to poll while it has not, as
Azure answers.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from dicomweb.context import context, service_root
from dicomweb.errors import HTTPProblem
from dicomweb.routes.extended_query_tags import iso_time
from indexer.lookup import partition_key as lookup_partition_key
from indexer.operations import FINISHED, Operation, create_operation, get_operation, parse_operation_id


async def start_operation(
    request: Request,
    type_: str,
    params: dict[str, Any],
    resources: list[str] | None = None,
    *,
    root: str | None = None,
    runner: str = "operations",
) -> Response:
    """Queue an operation and answer 202 with its reference, as Azure's long-running requests do; the
    process's runner (app.state.<runner>) is woken so it starts at once. `root`: the service root of the
    reference, for routes outside one (the request's own by default)."""
    async with context(request).pool.acquire() as conn:
        op = await create_operation(conn, type_, params, resources or [])
    woken = getattr(request.app.state, runner, None)
    if woken is not None:
        woken.poke()
    href = f"{root or service_root(request)}/operations/{op.id_hex}"
    return Response(
        orjson.dumps({"id": op.id_hex, "href": href}),
        status_code=202,
        media_type="application/json",
        headers={"Location": href},
    )


async def get(request: Request) -> Response:
    raw = request.path_params["operation"]
    operation_id = parse_operation_id(raw)
    if operation_id is None:
        raise HTTPProblem(400, f"{raw!r} is not an operation id (a GUID)")
    async with context(request).pool.acquire() as conn:
        op = await get_operation(conn, operation_id)
    if op is None or not await _of_this_partition(request, op):
        raise HTTPProblem(404, f"operation {raw} not found")
    root = service_root(request)
    body = {
        "operationId": op.id_hex,  # Azure's name for it
        "id": op.id_hex,  # this archive's first name for it, kept for the clients that read it
        "type": op.type,
        "createdTime": iso_time(op.created_at),
        "lastUpdatedTime": iso_time(op.updated_at),
        "status": op.status,
        "percentComplete": op.percent_complete,
        "resources": [f"{root}/{path}" for path in op.resources],
        "results": op.results,
    }
    if op.status in FINISHED:
        return Response(orjson.dumps(body), media_type="application/json")
    # not finished: 202, and Location names where to poll (Azure's answer, which generic pollers follow)
    headers = {"Location": f"{root}/operations/{op.id_hex}"}
    return Response(orjson.dumps(body), status_code=202, media_type="application/json", headers=headers)


async def _of_this_partition(request: Request, op: Operation) -> bool:
    """Under a partition's root, only that partition's operations exist (an export, update, acquisition or
    $send started there): its owners and writers follow them there without seeing other partitions'."""
    name = request.path_params.get("partition")
    if name is None:
        return True  # the plain root shows every operation (its readers hold an all-partition grant)
    started_in = op.params.get("partition")  # a key (export, acquisition, $send) or a name (bulk update)
    if isinstance(started_in, str):
        return started_in == name
    key = await lookup_partition_key(context(request).pool, name, create=False)
    return key is not None and isinstance(started_in, int) and started_in == key
