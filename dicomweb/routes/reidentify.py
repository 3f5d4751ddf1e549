"""Re-identification: the original behind a pseudonym of a de-identification project.

The one HTTP path to deid's mapping table. Access control admits owners only (access.policy), and the audit
log records who asked for which pseudonym of which project, and when; the original itself is never logged.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from deid.mapping import KINDS, reidentify, valid_project
from dicomweb.context import context
from dicomweb.errors import HTTPProblem


async def lookup(request: Request) -> Response:
    project = request.path_params["project"]
    kind = request.path_params["kind"]
    pseudonym = request.path_params["pseudonym"]
    if not valid_project(project):
        raise HTTPProblem(400, f"invalid project name {project!r}")
    if kind not in KINDS:
        raise HTTPProblem(400, f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    async with context(request).pool.acquire() as conn:
        found = await reidentify(conn, project, kind, pseudonym)
    if found is None:
        raise HTTPProblem(404, f"project {project!r} has no {kind} pseudonym {pseudonym!r}")
    body = {
        "project": project,
        "kind": kind,
        "pseudonym": found.pseudonym,
        "original": found.original,
        "issuer": found.issuer,
    }
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})
