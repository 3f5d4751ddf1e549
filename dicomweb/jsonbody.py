"""Reading the JSON body of a request (tokens, export, data requests, tags, work items), bounded in size.

Every route whose body is JSON reads it through `read_body`, so no client can make a process hold more than
`Settings.max_json_body_size` bytes of one request: a declared Content-Length above it is refused before a
byte is read, and a chunked body is refused as soon as it grows past it. A string holding U+0000 is refused
there too.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request

from dicomweb.context import context
from dicomweb.errors import HTTPProblem

# \u0000 as an escape (an odd number of backslashes before "u0000"; outside strings JSON has none)
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _too_large(limit: int) -> HTTPProblem:
    return HTTPProblem(413, f"the request body exceeds the maximum size of {limit} bytes for a JSON body")


async def read_body(request: Request) -> bytes:
    """The whole body, at most `max_json_body_size` bytes; 413 as soon as it is known to be larger."""
    limit = context(request).settings.max_json_body_size
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPProblem(400, f"malformed Content-Length {declared!r}") from None
        if size > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    # PostgreSQL's text and jsonb cannot hold U+0000 and no DICOM text has one: refused here, once, rather
    # than failing wherever the value is first written (a 500)
    if b"\\u0000" in body and _NUL_ESCAPE.search(body):
        raise HTTPProblem(
            400, "the body holds a NUL character (\\u0000) in a string, which nothing here can store"
        )
    return body


def parse_json(body: bytes) -> Any:
    """400 with the parser's reason if malformed."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPProblem(400, f"the body is not valid JSON: {exc}") from exc


def require_json(request: Request) -> None:
    """415 unless the body is declared application/json."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPProblem(415, "the body must be application/json")


async def json_body(request: Request) -> Any:
    """The parsed body; 415 unless it is application/json, 413 above the size limit, 400 if malformed."""
    require_json(request)
    return parse_json(await read_body(request))


async def json_object(request: Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """json_body, which must be a JSON object; with `empty_ok`, an empty body (of any type) is {}."""
    raw = await read_body(request)
    if empty_ok and not raw:
        return {}
    require_json(request)
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the body must be a JSON object")
    return body
