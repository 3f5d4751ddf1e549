"""Retention routes: the partition's policy, a study's legal hold, its retention status and its restore.

The rules are in retention/; these handlers read the request, call them in one transaction, and answer.
Refusals name their reason, which also goes into the request's audit record (`audit_detail`).
"""

from __future__ import annotations

from datetime import datetime

import orjson
from starlette.requests import Request
from starlette.responses import Response

from dicomweb.auth import principal_of
from dicomweb.context import context, partition_key, uid_param
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body, parse_json, read_body, require_json
from retention.guard import DeletionRefused
from retention.hold import NoSuchStudy, place_hold, remove_hold
from retention.policy import PolicyError, clear_policy, get_policy, parse_policy, set_policy
from retention.status import study_retention
from retention.window import restore_in


def now(request: Request) -> datetime:
    """The archive's clock (access.clock: the one audit records and grant expiry use)."""
    return request.app.state.access.clock.now()


def refuse(request: Request, status: int, message: str) -> HTTPProblem:
    """The error to raise, its reason also recorded in the request's audit record."""
    request.state.audit_detail = message
    return HTTPProblem(status, message)


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _note(request: Request, detail: str) -> None:
    request.state.audit_detail = detail


# -- the partition's policy: GET|PUT|DELETE /retention -------------------------------------------------


async def read_policy(request: Request) -> Response:
    async with context(request).pool.acquire() as conn:
        policy = await get_policy(conn, await partition_key(request))
    return _json(policy.as_json())


async def put_policy(request: Request) -> Response:
    try:
        policy = parse_policy(await json_body(request))
    except PolicyError as exc:
        raise refuse(request, 400, str(exc)) from exc
    key = await partition_key(request, create=True)  # a policy may come before the partition's first store
    await set_policy(context(request).pool, key, policy)
    _note(request, "retention policy set: " + orjson.dumps(policy.as_json()).decode())
    return _json(policy.as_json())


async def delete_policy(request: Request) -> Response:
    if not await clear_policy(context(request).pool, await partition_key(request)):
        raise refuse(request, 404, "the partition has no retention policy")
    _note(request, "retention policy removed")
    return Response(status_code=204)


# -- a study: PUT|DELETE /studies/{study}/legalhold, GET .../retention, POST .../$restore ------------------


async def _status(request: Request, study: str) -> dict[str, object]:
    async with context(request).pool.acquire() as conn:
        status = await study_retention(conn, await partition_key(request), study)
    if status is None:
        raise HTTPProblem(404, f"study {study} not found")
    return status


async def read_status(request: Request) -> Response:
    return _json(await _status(request, uid_param(request, "study")))


async def put_hold(request: Request) -> Response:
    study = uid_param(request, "study")
    reason = None
    raw = await read_body(request)
    if raw:
        require_json(request)
        body = parse_json(raw)
        if (
            not isinstance(body, dict)
            or set(body) - {"reason"}
            or not isinstance(body.get("reason", ""), str)
        ):
            raise refuse(request, 400, 'the body must be empty or {"reason": "..."}')
        reason = body.get("reason")
    principal = principal_of(request.scope)
    key = await partition_key(request)
    try:
        async with context(request).pool.acquire() as conn, conn.transaction():
            since, placed = await place_hold(
                conn, key, study, now(request), principal.subject if principal else "anonymous", reason
            )
    except NoSuchStudy as exc:
        raise refuse(request, 404, f"study {study} not found") from exc
    _note(
        request,
        f"legal hold placed (reason: {reason})" if placed else f"already held since {since.isoformat()}",
    )
    return _json(await _status(request, study), 201 if placed else 200)


async def delete_hold(request: Request) -> Response:
    study = uid_param(request, "study")
    key = await partition_key(request)
    async with context(request).pool.acquire() as conn, conn.transaction():
        removed = await remove_hold(conn, key, study)
    if not removed:
        raise refuse(request, 404, f"study {study} is not under legal hold")
    _note(request, "legal hold removed")
    return Response(status_code=204)


async def restore(request: Request) -> Response:
    study = uid_param(request, "study")
    ctx = context(request)
    key = await partition_key(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        restored = await restore_in(conn, key, study, now(request))
    if not restored.restored and not restored.superseded:
        raise refuse(request, 404, f"study {study} has no deleted instances within their restore window")
    if restored.superseded:
        ctx.maintenance.poke()
    _note(request, f"restored {restored.restored} instances, {restored.superseded} superseded objects queued")
    return _json(restored.as_json())


def refused_deletion(request: Request, exc: DeletionRefused) -> HTTPProblem:
    """409 for a DELETE that retention refuses (held, or younger than the minimum)."""
    return refuse(request, 409, str(exc))
