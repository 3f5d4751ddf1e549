"""Error responses: one JSON shape for every failure the HTTP surface reports."""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response


class HTTPProblem(Exception):
    """Raised by handlers (and the packages they call, through translation) to answer status + message."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def problem_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": status, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPProblem)
    return problem_response(exc.status, exc.message, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route for the path: 404; a method the route does not take: 405, with
    Allow) in the same JSON shape, instead of its text/plain body."""
    assert isinstance(exc, HTTPException)
    return problem_response(exc.status_code, exc.detail, exc.headers)
