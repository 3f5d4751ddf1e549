"""Error responses: one JSON shape for every failure the HTTP surface reports."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


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


def unavailable_service(exc: BaseException) -> str | None:
    """Which backing service a request's exception says is down (None: not an outage). PostgreSQL's
    connection failures and shutdowns, the object store's endpoint not answering; a bare ConnectionError
    is what asyncpg raises when nothing listens, and is not told apart from the store's. The exceptions
    it was raised from count too: a connection lost mid-query surfaces as the transaction's exit failing
    on the closed connection (an InterfaceError) during its handling."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(seen) < 8:
        if (service := _unavailable(cause)) is not None:
            return service
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def _unavailable(exc: BaseException) -> str | None:
    import asyncpg
    from botocore.exceptions import ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError

    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.ConnectionDoesNotExistError
        # a pooled connection whose server died under an earlier query: asyncpg's protocol state machine
        # refuses the next one ("cannot switch to state 15; another operation (2) is in progress")
        | asyncpg.InternalClientError,
    ):
        return "the database"
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError):
        return "the object store"
    if isinstance(exc, ConnectionError):
        return "the database or the object store"
    return None


class UnavailableMiddleware:
    """A request that fails because PostgreSQL or the object store is down is answered 503 with the reason
    and Retry-After, and logged in one line: it was a text/plain 500 and a traceback per request, which
    tells neither a client that retrying will work nor an operator what is down. A response already under
    way can only be cut short (one line too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            service = unavailable_service(exc)
            if service is None:
                raise
            reason = f"{service} is unavailable ({exc.__class__.__name__}: {exc})"
            log.error(
                "%s %s: %s%s",
                scope["method"],
                scope["path"],
                reason,
                ": response cut short" if started else "",
            )
            if started:
                return
            await problem_response(503, f"{reason}; try again later", {"Retry-After": "10"})(
                scope, receive, send
            )
