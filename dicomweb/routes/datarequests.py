"""Research data requests over HTTP: submit, list, read, approve (starts the de-identified export), reject,
revoke. The workflow and its tables are access.requests; the export is deid's `export` operation, created
here with the same parameters POST /export writes (dicomweb.routes.export), into the request's own research
partition and pseudonym project (so pseudonyms cannot be linked across requests).

JSON follows the archive's one convention (Azure's): camelCase fields, `id` for the request, times as
`...Time` in UTC (ISO 8601, Z), the export as `operation: {id, href}`. The snake_case names of the first
release are still accepted on input until the next one (DEPRECATED_INPUT, docs/conformance.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from access import requests as workflow
from access.authn import Principal
from access.policy import Role
from deid.cohort import check_query, resolve_query
from deid.export_request import ExportRequestError, normalize_identifiers
from deid.profile import Options, ProfileError, option_api_name
from dicomweb.auth import principal_of
from dicomweb.config import DEFAULT_PARTITION
from dicomweb.context import context, service_root
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_object
from dicomweb.routes.export import EXPORT
from dicomweb.routes.extended_query_tags import iso_time
from indexer.lookup import partition_key as lookup_partition_key
from indexer.lookup import valid_partition_name
from indexer.operations import cancel_operation, create_operation

MAX_TEXT = 10_000
DENIED = HTTPProblem(403, "not permitted")
# snake_case input names of the first release -> today's names; accepted until the next release
DEPRECATED_INPUT = {
    "source_partition": "partition",
    "duration_days": "durationDays",
    "deid_options": "deidentification",  # a list of option names, as deidentification.options
    "decision_comment": "comment",
}


def _time(value: datetime | None) -> str | None:
    return None if value is None else iso_time(value)


def request_json(found: Mapping[str, Any], root: str) -> dict[str, Any]:
    """A data request (access.requests.as_dict) as clients see it; `root` is the archive's base URL."""
    operation = found["operation_id"]
    out = {
        "id": str(found["request_id"]),
        "state": found["state"],
        "researcher": found["researcher"],
        "title": found["title"],
        "purpose": found["purpose"],
        "partition": found["source_partition"],
        "cohort": found["cohort"],
        "deidentification": {"options": [option_api_name(n) for n in found["deid_options"]]},
        "durationDays": found["duration_seconds"] // 86400,
        "researchPartition": found["research_partition"],
        "operation": None
        if operation is None
        else {"id": operation.hex, "href": f"{root}/v2/operations/{operation.hex}"},
        "createdTime": _time(found["created_at"]),
        "decidedBy": found["decided_by"],
        "decidedTime": _time(found["decided_at"]),
        "decisionComment": found["decision_comment"],
        "activatedTime": _time(found["activated_at"]),
        "expirationTime": _time(found["expires_at"]),
    }
    if "events" in found:
        out["events"] = [
            {
                "eventTime": _time(e["event_time"]),
                "actor": e["actor"],
                "fromState": e["from_state"],
                "toState": e["to_state"],
                "comment": e["comment"],
            }
            for e in found["events"]
        ]
    return out


def current_names(body: dict[str, Any]) -> dict[str, Any]:
    """The body with deprecated snake_case names (DEPRECATED_INPUT) renamed; 400 if both are given."""
    out = dict(body)
    for old, new in DEPRECATED_INPUT.items():
        if old not in out:
            continue
        if new in out:
            raise HTTPProblem(400, f"give {new} only ({old} is its deprecated name)")
        value = out.pop(old)
        out[new] = {"options": value} if old == "deid_options" else value
    return out


def _json(value: object, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def _caller(request: Request) -> Principal:
    principal = principal_of(request.scope)
    assert principal is not None  # the access middleware ran
    return principal


def _sees_all(principal: Principal) -> bool:
    """Reviewers, auditors and owners see every request; a researcher only their own."""
    overseers = (Role.OWNER, Role.REVIEWER, Role.AUDITOR)
    return any(g.partition is None and g.role in overseers for g in principal.grants)


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        raise HTTPProblem(400, f"{name} must be a non-empty string of at most {MAX_TEXT} characters")
    return value.strip()


def parse_submission(body: dict[str, Any]) -> workflow.Submission:
    title, purpose = _text(body, "title"), _text(body, "purpose")
    partition = body.get("partition", DEFAULT_PARTITION)
    if (
        not isinstance(partition, str)
        or not valid_partition_name(partition)
        or partition.startswith(workflow.RESEARCH_PREFIX)
    ):
        raise HTTPProblem(
            400,
            "partition must name a data partition (1-64 letters, digits, '_', '.', '-'; "
            "not a research partition)",
        )
    cohort = body.get("cohort")
    if not isinstance(cohort, dict) or len(cohort) != 1 or not ({"studies", "query"} & set(cohort)):
        raise HTTPProblem(400, 'cohort must be {"studies": [identifiers]} or {"query": "QIDO parameters"}')
    try:
        if "studies" in cohort:
            studies = cohort["studies"]
            if not isinstance(studies, list) or not studies or not all(isinstance(s, str) for s in studies):
                raise HTTPProblem(400, "cohort.studies must be a non-empty list of study[/series[/instance]]")
            cohort = {"studies": normalize_identifiers(studies)}
        elif not isinstance(cohort["query"], str) or not cohort["query"].strip("?"):
            raise HTTPProblem(400, "cohort.query must be a QIDO-RS query string")
        else:
            cohort = {"query": cohort["query"].lstrip("?")}
        deid = body.get("deidentification") or {}
        names = deid.get("options", []) if isinstance(deid, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise HTTPProblem(400, "deidentification.options must be a list of option names")
        options = Options.from_names(names).enabled
    except (ExportRequestError, ProfileError) as exc:
        raise HTTPProblem(400, str(exc)) from exc
    days = body.get("durationDays")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= workflow.MAX_DURATION_DAYS:
        raise HTTPProblem(400, f"durationDays must be an integer within 1..{workflow.MAX_DURATION_DAYS}")
    return workflow.Submission(title, purpose, partition, cohort, options, days * 86400)  # type: ignore[arg-type]


async def submit(request: Request) -> Response:
    """POST /datarequests (researchers): 201 with the request, state submitted."""
    sub = parse_submission(current_names(await json_object(request)))
    now = request.app.state.access.clock.now()
    async with context(request).pool.acquire() as conn:
        if "query" in sub.cohort:  # resolved at approval; refused now if it could never run
            try:
                await check_query(conn, sub.cohort["query"], "cohort.query")
            except ExportRequestError as exc:
                raise HTTPProblem(400, str(exc)) from exc
        created = await workflow.submit(conn, _caller(request).subject, sub, now)
    return _json(request_json(created, service_root(request)), 201)


async def list_all(request: Request) -> Response:
    """GET /datarequests[?state=]: every request for reviewers/auditors/owners, one's own for researchers."""
    state = request.query_params.get("state")
    if state is not None and state not in workflow.STATES:
        raise HTTPProblem(400, f"state must be one of {', '.join(workflow.STATES)}")
    caller = _caller(request)
    mine = None if _sees_all(caller) else caller.subject
    async with context(request).pool.acquire() as conn:
        await workflow.refresh(conn, request.app.state.access.clock.now(), mine)
        found = await workflow.list_requests(conn, researcher=mine, state=state)
    root = service_root(request)
    return _json([request_json(r, root) for r in found])


def _request_id(request: Request, caller: Principal) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["request"])
    except ValueError:
        if not _sees_all(caller):
            raise DENIED from None
        raise HTTPProblem(404, "no such data request") from None


async def get(request: Request) -> Response:
    """GET /datarequests/{id}: the request and its transitions. A researcher asking for someone else's gets
    the same 403 as for one that does not exist."""
    caller = _caller(request)
    request_id = _request_id(request, caller)
    async with context(request).pool.acquire() as conn:
        await workflow.refresh(conn, request.app.state.access.clock.now())
        found = await workflow.get(conn, request_id)
    if found is None or (not _sees_all(caller) and found["researcher"] != caller.subject):
        if not _sees_all(caller):
            raise DENIED
        raise HTTPProblem(404, "no such data request")
    return _json(request_json(found, service_root(request)))


async def _decide(request: Request, action: str) -> Response:
    caller = _caller(request)
    request_id = _request_id(request, caller)
    body = current_names(await json_object(request, empty_ok=True))  # empty: no comment
    comment = _text(body, "comment", required=action == "reject")
    ctx = context(request)
    now = request.app.state.access.clock.now()
    async with ctx.pool.acquire() as conn:
        # what time and finished exports imply first (a grant that ran out is expired, not revocable)
        await workflow.refresh(conn, now)
        current = await workflow.get(conn, request_id)
        if current is None:
            raise HTTPProblem(404, "no such data request")
        if current["researcher"] == caller.subject and caller.auth != "open":
            raise DENIED  # nobody reviews their own request
        try:
            if action == "approve":
                row = await _approve(request, conn, current, caller, comment, now)
            elif action == "reject":
                async with conn.transaction():
                    row = await workflow.transition(
                        conn, request_id, ("submitted",), "rejected", actor=caller.subject, now=now,
                        comment=comment, decided_by=caller.subject, decided_at=now, decision_comment=comment,
                    )  # fmt: skip
            else:
                async with conn.transaction():
                    row = await workflow.transition(
                        conn, request_id, ("approved", "active"), "revoked", actor=caller.subject, now=now,
                        comment=comment,
                    )  # fmt: skip
                    if row["operation_id"] is not None:
                        await cancel_operation(conn, row["operation_id"], "the data request was revoked")
        except workflow.RequestError as exc:
            raise HTTPProblem(exc.status, str(exc)) from exc
    # this process at once (the researcher's next request may come here before the NOTIFY does)
    request.app.state.access.authenticator.invalidate("grants:" + row["researcher"])
    return _json(request_json(workflow.as_dict(row), service_root(request)))


async def _approve(
    request: Request, conn: Any, current: dict[str, Any], caller: Principal, comment: str | None, now: Any
) -> Any:
    """Approve and start the de-identified export into the request's research partition, in one
    transaction (an approval never exists without its export, nor an export without its approval)."""
    if current["state"] != "submitted":
        raise workflow.RequestError(f"the request is {current['state']}; this needs submitted", 409)
    source = await lookup_partition_key(conn, current["source_partition"], create=False)
    if source is None:
        name = current["source_partition"]
        raise workflow.RequestError(f"the source partition {name!r} does not exist", 409)
    cohort = current["cohort"]
    if "studies" in cohort:
        identifiers = cohort["studies"]
    else:
        try:
            identifiers = await resolve_query(conn, source, cohort["query"])
        except ExportRequestError as exc:
            raise workflow.RequestError(str(exc), 409) from exc
        if not identifiers:
            raise workflow.RequestError("the cohort query matches no study", 409)
    request_id = current["request_id"]
    partition = workflow.research_partition(request_id)
    async with conn.transaction():
        target = await lookup_partition_key(conn, partition, create=True)
        params = {
            "partition": source,
            "identifiers": identifiers,
            "destination": {"type": "partition", "settings": {"name": partition}},
            "project": partition,
            "options": current["deid_options"],
            "pixelRules": [],
            "destinationPartition": target,
        }
        op = await create_operation(conn, EXPORT, params, [])
        row = await workflow.transition(
            conn, request_id, ("submitted",), "approved", actor=caller.subject, now=now, comment=comment,
            decided_by=caller.subject, decided_at=now, decision_comment=comment, research_partition=partition,
            operation_id=op.id,
        )  # fmt: skip
    runner = getattr(request.app.state, "operations", None)
    if runner is not None:
        runner.poke()
    return row


async def approve(request: Request) -> Response:
    return await _decide(request, "approve")


async def reject(request: Request) -> Response:
    return await _decide(request, "reject")


async def revoke(request: Request) -> Response:
    return await _decide(request, "revoke")
