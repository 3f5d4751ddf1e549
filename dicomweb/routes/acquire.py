"""POST /acquire and POST /studies/{study}/$send: operations that pull studies from, or push a study to, a
registered DIMSE peer (dimse/acquire.py, dimse/send.py).

202 with {id, href} and a Location header naming the operation, as POST /export answers; progress at
GET /operations/{id}.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dicomweb.config import DEFAULT_PARTITION, Settings
from dicomweb.context import context, partition_key, uid_param
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body
from dicomweb.routes.operations import start_operation
from dimse import retrying
from dimse.acquire import ACQUIRE, AcquireError, ScuSettings, check_source, parse_request
from dimse.aes import get_ae
from dimse.send import SEND, check_destination


def scu_settings(settings: Settings) -> ScuSettings:
    """What the SCU operations need from the server's settings."""
    return ScuSettings(settings.dimse_ae_title, settings.insecure_open, DEFAULT_PARTITION)


async def acquire(request: Request) -> Response:
    ctx = context(request)
    body = await json_body(request)
    partition_name = request.path_params.get("partition", DEFAULT_PARTITION)
    try:
        params = parse_request(body)
        if params["method"] == "C-MOVE" and not ctx.settings.dimse_port:
            raise AcquireError("C-MOVE needs the archive's DIMSE listener (DICOMWEB_DIMSE_PORT): use C-GET")
        source = await get_ae(ctx.pool, params["source"])
        check_source(source, params["source"], params["method"], partition_name, scu_settings(ctx.settings))
    except AcquireError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    params["partition"] = await partition_key(request, create=True)
    params["partitionName"] = partition_name
    return await start_operation(request, ACQUIRE, params)


async def send(request: Request) -> Response:
    ctx = context(request)
    study = uid_param(request, "study")
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("destination"), str):
        raise HTTPProblem(400, 'the body must be {"destination": "<registered AE title>"}')
    unknown = sorted(set(body) - {"destination", "maxAttempts"})
    attempts = body.get("maxAttempts", retrying.MAX_ATTEMPTS)
    if unknown or isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 50:
        raise HTTPProblem(400, f"unknown fields {unknown}" if unknown else "maxAttempts must be 1 to 50")
    title = body["destination"].strip(" ")
    try:
        check_destination(await get_ae(ctx.pool, title), title)
    except AcquireError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    partition = await partition_key(request)
    known = await ctx.pool.fetchval(
        "SELECT true FROM study WHERE partition_key = $1 AND study_instance_uid = $2", partition, study
    )
    if not known:
        raise HTTPProblem(404, f"study {study} not found")
    params = {"destination": title, "study": study, "partition": partition, "maxAttempts": attempts,
              "partitionName": request.path_params.get("partition", DEFAULT_PARTITION)}  # fmt: skip
    return await start_operation(request, SEND, params, [f"studies/{study}"])


def acquire_routes() -> list[BaseRoute]:
    """Routes of one service root."""
    return [
        Route("/acquire", acquire, methods=["POST"]),
        Route("/studies/{study}/$send", send, methods=["POST"]),
    ]
