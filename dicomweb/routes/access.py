"""Routes of the access package: the audit log, API tokens, research data requests (datarequests.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from access import audit, tokens
from access.commands import parse_expiry
from access.policy import Family
from dicomweb.context import context
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body
from dicomweb.routes import datarequests, datarequests_page, reidentify

NDJSON = "application/x-ndjson"
_AUDIT_PARAMS = {"subject", "from", "to", "action", "limit", "offset"}
MAX_LIMIT = 1000
_TOKEN_FIELDS = frozenset({"role", "partition", "name", "expires"})


def parse_time(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPProblem(400, f"{name} must be an ISO 8601 date-time, not {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _int(name: str, text: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise HTTPProblem(400, f"{name} must be an integer within {low}..{high}, not {text!r}")
    return int(text)


def audit_query(params: dict[str, str], *, export: bool) -> audit.AuditQuery:
    unknown = sorted(set(params) - _AUDIT_PARAMS)
    if unknown:
        raise HTTPProblem(400, f"unknown parameter {unknown[0]!r}: use {', '.join(sorted(_AUDIT_PARAMS))}")
    action = params.get("action")
    if action is not None and action not in Family.__members__.values():
        raise HTTPProblem(400, f"unknown action {action!r}: one of {', '.join(f.value for f in Family)}")
    default_limit = None if export else 100
    return audit.AuditQuery(
        subject=params.get("subject"),
        start=parse_time("from", params["from"]) if "from" in params else None,
        end=parse_time("to", params["to"]) if "to" in params else None,
        action=action,
        limit=_int("limit", params["limit"], 1, MAX_LIMIT) if "limit" in params else default_limit,
        offset=_int("offset", params["offset"], 0, 1 << 40) if "offset" in params else 0,
    )


async def read_audit(request: Request) -> Response:
    """GET /audit: records in arrival order as a JSON array, or all matching as JSON lines (export)."""
    export = NDJSON in request.headers.get("accept", "")
    q = audit_query(dict(request.query_params), export=export)
    pool = context(request).pool
    if not export:
        return Response(orjson.dumps(await audit.query(pool, q)), media_type="application/json")

    async def lines() -> AsyncIterator[bytes]:
        async with pool.acquire() as conn:
            async for record in audit.stream(conn, q):
                yield orjson.dumps(record) + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


def _token_json(stored: tokens.StoredToken) -> dict[str, object]:
    return {
        "id": stored.token_id, "name": stored.name, "role": stored.role.value, "partition": stored.partition,
        "createdAt": stored.created_at.isoformat(),
        "expiresAt": stored.expires_at.isoformat() if stored.expires_at else None,
        "revokedAt": stored.revoked_at.isoformat() if stored.revoked_at else None,
    }  # fmt: skip


async def create_token(request: Request) -> Response:
    """POST /tokens (owners) {"role", "partition"?, "name"?, "expires"?: "30d" | ISO}: 201 with the token,
    shown this once (what `dicomweb token create` does, for a server whose database only it can reach)."""
    body = await json_body(request)
    if not isinstance(body, dict) or not all(
        isinstance(body.get(k), str) or body.get(k) is None for k in ("role", "partition", "name", "expires")
    ):
        raise HTTPProblem(400, 'the body must be {"role": ..., "partition"?, "name"?, "expires"?} (strings)')
    # a misspelt field must not be ignored: "partiton" would make an all-partition token
    unknown = sorted(set(body) - _TOKEN_FIELDS)
    if unknown:
        raise HTTPProblem(400, f"unknown field {unknown[0]!r}: use {', '.join(sorted(_TOKEN_FIELDS))}")
    now = request.app.state.access.clock.now()
    try:
        expires_at = parse_expiry(body["expires"], now) if body.get("expires") else None
        async with context(request).pool.acquire() as conn:
            text, stored = await tokens.create(
                conn, body.get("role") or "", now=now, name=body.get("name"), partition=body.get("partition"),
                expires_at=expires_at,
            )  # fmt: skip
    except tokens.TokenError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    return Response(orjson.dumps({"token": text, **_token_json(stored)}), 201, media_type="application/json")


async def list_tokens(request: Request) -> Response:
    async with context(request).pool.acquire() as conn:
        return Response(orjson.dumps([_token_json(t) for t in await tokens.list_all(conn)]),
                        media_type="application/json")  # fmt: skip


async def revoke_token(request: Request) -> Response:
    """DELETE /tokens/{id or name}: 204; this process refuses it from its next request, the others (any
    node) once the NOTIFY arrives, milliseconds later."""
    async with context(request).pool.acquire() as conn:
        revoked = await tokens.revoke(
            conn, request.path_params["token"], now=request.app.state.access.clock.now()
        )
    for token_id in revoked:  # this process at once; the others when the NOTIFY arrives
        request.app.state.access.authenticator.invalidate("token:" + token_id)
    if not revoked:
        raise HTTPProblem(404, "no active token with that id or name")
    return Response(status_code=204)


def access_routes() -> list[BaseRoute]:
    item = "/datarequests/{request}"
    return [
        Route("/audit", read_audit, methods=["GET"]),
        Route("/tokens", create_token, methods=["POST"]),
        Route("/tokens", list_tokens, methods=["GET"]),
        Route("/tokens/{token}", revoke_token, methods=["DELETE"]),
        Route("/reidentify/{project}/{kind}/{pseudonym}", reidentify.lookup, methods=["GET"]),
        Route("/datarequests/page", datarequests_page.page, methods=["GET"]),
        Route("/datarequests", datarequests.submit, methods=["POST"]),
        Route("/datarequests", datarequests.list_all, methods=["GET"]),
        Route(item, datarequests.get, methods=["GET"]),
        Route(item + "/approve", datarequests.approve, methods=["POST"]),
        Route(item + "/reject", datarequests.reject, methods=["POST"]),
        Route(item + "/revoke", datarequests.revoke, methods=["POST"]),
    ]
