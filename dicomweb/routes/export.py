"""POST /export: start a de-identified export operation (Azure's request shape plus `deidentification`).

202 with {id, href} and a Location header naming the operation; progress at GET /operations/{id}.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from access.policy import RESEARCH_PREFIX, Family, Target, allows
from deid.cohort import resolve_query
from deid.export_request import ExportRequestError, parse_export_request
from dicomweb.auth import grants_of
from dicomweb.context import context, partition_key
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body
from dicomweb.routes.operations import start_operation
from indexer.lookup import partition_key as lookup_partition_key

EXPORT = "export"


async def export(request: Request) -> Response:
    ctx = context(request)
    source = await partition_key(request)
    body = await json_body(request)
    try:
        req = parse_export_request(body)
        identifiers = req.identifiers
        if identifiers is None:
            async with ctx.pool.acquire() as conn:
                identifiers = await resolve_query(conn, source, req.query or "")
            if not identifiers:
                raise ExportRequestError("source.settings.query matches no study")
    except ExportRequestError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    if req.project.startswith(RESEARCH_PREFIX):
        # a data request's own project: its secret would give this export the researcher's pseudonyms,
        # linking them to originals (re-identification is GET /reidentify's, for all-partition owners)
        raise HTTPProblem(400, "a research-* project belongs to a data request; name another project")
    params = {
        "partition": source,
        "identifiers": identifiers,
        "destination": req.destination,
        "project": req.project,
        "options": req.options,
        "pixelRules": req.pixel_rules,
    }
    if req.destination["type"] == "partition":
        name = req.destination["settings"]["name"]
        if name.startswith(RESEARCH_PREFIX):  # its researcher would read what their request did not ask for
            raise HTTPProblem(
                400, "a research partition is made by an approved data request, not named by an export"
            )
        # the copies are stored as a STOW there would store them: the caller's grants must admit that STOW
        if not allows(
            grants_of(request.scope), Target(Family.STOW, name), request.app.state.access.clock.now()
        ):
            raise HTTPProblem(403, "not permitted")
        target = await lookup_partition_key(ctx.pool, name, create=True)
        if target == source:
            raise HTTPProblem(400, "the destination partition must not be the source partition")
        params["destinationPartition"] = target
    return await start_operation(request, EXPORT, params)
