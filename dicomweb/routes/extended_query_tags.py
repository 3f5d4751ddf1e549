"""Extended query tags (Azure DICOM service API): add, list, get, update QueryStatus, delete, list errors.

Tags are global: every service root (/v1, /v2, partition roots) shows and changes the same definitions, as
in Azure. JSON uses Azure's field names (camelCase out; request fields are matched case-insensitively).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from dicomweb.context import context, service_root
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body
from indexer.extended_tags import (
    LEVEL_NAMES,
    ExtendedTag,
    TagError,
    add_tags,
    delete_tag,
    get_tag,
    list_errors,
    list_tags,
    parse_tag_path,
    set_query_status,
    validate_new_tags,
)

DEFAULT_LIMIT, MAX_LIMIT = 100, 200


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def tag_json(tag: ExtendedTag, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"path": tag.path, "vr": tag.vr}
    if tag.private_creator is not None:
        out["privateCreator"] = tag.private_creator
    out.update(level=LEVEL_NAMES[tag.level], status=tag.status, queryStatus=tag.query_status)
    if tag.error_count:
        out["errors"] = {"count": tag.error_count, "href": f"{root}/extendedquerytags/{tag.path}/errors"}
    if tag.operation_id is not None and tag.status in ("Adding", "Deleting"):
        op = tag.operation_id.hex
        out["operation"] = {"id": op, "href": f"{root}/operations/{op}"}
    return out


def _problem(exc: TagError) -> HTTPProblem:
    return HTTPProblem(exc.status, exc.message)


def paging(request: Request) -> tuple[int, int]:
    """limit (1..MAX_LIMIT, default DEFAULT_LIMIT) and offset (>= 0) of a list request."""
    values = []
    for name, default, low, high in (("limit", DEFAULT_LIMIT, 1, MAX_LIMIT), ("offset", 0, 0, 2**31 - 1)):
        raw = request.query_params.get(name)
        if raw is None:
            values.append(default)
            continue
        if not raw.strip().isdigit() or not low <= int(raw) <= high:
            raise HTTPProblem(400, f"{name} must be an integer from {low} to {high}")
        values.append(int(raw))
    return values[0], values[1]


def _path_tag(request: Request) -> int:
    try:
        return parse_tag_path(request.path_params["tag"])
    except TagError as exc:
        raise _problem(exc) from None


async def add(request: Request) -> Response:
    """POST: define tags and start their re-index; 202 with a reference to the operation and its Location."""
    body = await json_body(request)
    try:
        new = validate_new_tags(body)
        async with context(request).pool.acquire() as conn, conn.transaction():
            op, _ = await add_tags(conn, new)
    except TagError as exc:
        raise _problem(exc) from None
    runner = getattr(request.app.state, "operations", None)
    if runner is not None:
        runner.poke()
    href = f"{service_root(request)}/operations/{op.id_hex}"
    response = _json({"id": op.id_hex, "href": href}, 202)
    response.headers["Location"] = href  # as Azure's service, and as export and $bulkUpdate answer here
    return response


async def list_all(request: Request) -> Response:
    limit, offset = paging(request)
    async with context(request).pool.acquire() as conn:
        tags = await list_tags(conn, limit, offset)
    root = service_root(request)
    return _json([tag_json(t, root) for t in tags])


async def get(request: Request) -> Response:
    tag = _path_tag(request)
    async with context(request).pool.acquire() as conn:
        found = await get_tag(conn, tag)
    if found is None:
        raise HTTPProblem(404, f"extended query tag {request.path_params['tag']} not found")
    return _json(tag_json(found, service_root(request)))


async def update(request: Request) -> Response:
    """PATCH {"QueryStatus": "Enabled" | "Disabled"}."""
    tag = _path_tag(request)
    body = await json_body(request)
    if not isinstance(body, dict) or [k.lower() for k in body] != ["querystatus"]:
        raise HTTPProblem(400, 'the body must be {"QueryStatus": "Enabled" | "Disabled"}')
    status = next(iter(body.values()))
    choices = {"enabled": "Enabled", "disabled": "Disabled"}
    wanted = choices.get(status.lower()) if isinstance(status, str) else None
    if wanted is None:
        raise HTTPProblem(400, f"QueryStatus must be Enabled or Disabled, not {status!r}")
    try:
        async with context(request).pool.acquire() as conn:
            found = await set_query_status(conn, tag, wanted)
    except TagError as exc:
        raise _problem(exc) from None
    if found is None:
        raise HTTPProblem(404, f"extended query tag {request.path_params['tag']} not found")
    return _json(tag_json(found, service_root(request)))


async def delete(request: Request) -> Response:
    """DELETE: mark the tag Deleting and queue the removal of its values (204 at once, as Azure answers).

    A re-index still running for it stops; queries using the tag get 400 from now on.
    """
    tag = _path_tag(request)
    try:
        async with context(request).pool.acquire() as conn, conn.transaction():
            op = await delete_tag(conn, tag)
    except TagError as exc:
        raise _problem(exc) from None
    if op is None:
        raise HTTPProblem(404, f"extended query tag {request.path_params['tag']} not found")
    runner = getattr(request.app.state, "operations", None)
    if runner is not None:
        runner.poke()
    return Response(status_code=204)


async def errors(request: Request) -> Response:
    tag = _path_tag(request)
    limit, offset = paging(request)
    async with context(request).pool.acquire() as conn:
        found = await get_tag(conn, tag)
        if found is None:
            raise HTTPProblem(404, f"extended query tag {request.path_params['tag']} not found")
        rows = await list_errors(conn, found.tag_key, limit, offset)
    return _json(
        [
            {
                "studyInstanceUid": r["study_instance_uid"],
                "seriesInstanceUid": r["series_instance_uid"],
                "sopInstanceUid": r["sop_instance_uid"],
                "createdTime": iso_time(r["created_at"]),
                "errorMessage": r["message"],
                "partitionName": r["partition_name"],
            }
            for r in rows
        ]
    )


def iso_time(value: datetime) -> str:
    """UTC timestamp as Azure writes them (ISO 8601, Z)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
