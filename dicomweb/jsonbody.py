"""Reading the JSON body of an Azure-style resource request (tokens, export, data requests, tags)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from dicomweb.errors import HTTPProblem


async def json_body(request: Request) -> Any:
    """The parsed body; 415 unless it is application/json, 400 with the parser's reason if malformed."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPProblem(415, "the body must be application/json")
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise HTTPProblem(400, f"the body is not valid JSON: {exc}") from exc


async def json_object(request: Request) -> dict[str, Any]:
    """json_body, which must be a JSON object."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the body must be a JSON object")
    return body
