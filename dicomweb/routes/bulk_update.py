"""POST /v2/studies/$bulkUpdate (and under a partition): queue a bulk update, as Azure's v2 API does.

202 with {id, href} and a Location header naming the `update` operation; the work is archive/update.py.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from archive.update_request import UPDATE, parse_update_request, update_params
from dicomweb.config import DEFAULT_PARTITION
from dicomweb.context import api_version, partition_key
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body, parse_json, read_body
from dicomweb.routes.operations import start_operation


async def bulk_update(request: Request) -> Response:
    if api_version(request) != "v2":
        raise HTTPProblem(404, "bulk update is part of the v2 API: POST /v2/studies/$bulkUpdate")
    await partition_key(request)  # 404 for a partition that does not exist
    if "content-type" in request.headers:
        body = await json_body(request)
    else:  # Azure does not require the header
        body = parse_json(await read_body(request))
    try:
        update = parse_update_request(body)
    except ValueError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    partition = request.path_params.get("partition", DEFAULT_PARTITION)
    resources = [f"studies/{uid}" for uid in update.study_instance_uids]
    return await start_operation(request, UPDATE, update_params(partition, update), resources)
