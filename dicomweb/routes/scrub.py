"""POST /scrub (queue a scrub now) and GET /scrub/report (what the latest, or a given, scrub found); owners
only (access/policy.py). Also where a scrub's findings become audit records, for the server and the CLI."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from access.audit import AuditLog, system_event
from access.clock import Clock
from access.policy import Family
from archive.scrub import MISSING, SCRUB, UNREFERENCED, Finding, findings, latest_scrub, scrub_params
from dicomweb.context import context
from dicomweb.errors import HTTPProblem
from dicomweb.routes.extended_query_tags import iso_time
from dicomweb.routes.operations import start_operation
from indexer.operations import get_operation, parse_operation_id

REPORT_LIMIT = 1000
_MAX_LIMIT = 100_000


def audit_reporters(
    audit: AuditLog, clock: Clock | None = None
) -> tuple[Callable[[uuid.UUID, Finding], None], Callable[[uuid.UUID, dict[str, Any]], None]]:
    """The scrub's reporter and summary as audit records (action `scrub`, subject `system`): a finding
    is a serious failure (missing, altered: status 404, 409) or a minor one (unreferenced: 200, outcome 4);
    the summary of a finished scrub says what it checked."""
    clock = clock or Clock()

    def report(operation_id: uuid.UUID, f: Finding) -> None:
        status = {MISSING: 404, UNREFERENCED: 200}.get(f.kind, 409)
        outcome = 4 if f.kind == UNREFERENCED else 8
        audit.record(
            system_event(
                Family.SCRUB.value, "SCRUB", f.storage_key, status, outcome,
                f"scrub {operation_id.hex}: {f.describe()}", clock.now(),
                study=f.study_instance_uid, series=f.series_instance_uid, instance=f.sop_instance_uid,
            )
        )  # fmt: skip

    def summary(operation_id: uuid.UUID, results: dict[str, Any]) -> None:
        clean = results.get("clean", False)
        detail = (
            f"scrub {operation_id.hex} finished: {results['checkedObjects']} objects "
            f"({results['checkedBytes']} bytes) checked, {results['listedObjects']} listed; "
            f"{results['missing']} missing, {results['altered']} altered, "
            f"{results['unreferenced']} unreferenced"
        )
        audit.record(
            system_event(Family.SCRUB.value, "SCRUB", "/scrub", 200, 0 if clean else 8, detail, clock.now())
        )

    return report, summary


async def start(request: Request) -> Response:
    """Queue a scrub now (202 with the operation's reference, as Azure's long-running requests answer);
    `?rate=MB/s` overrides DICOMWEB_SCRUB_RATE_MB for this one (0: no limit)."""
    ctx = context(request)
    raw = request.query_params.get("rate", str(ctx.settings.scrub_rate_mb))
    try:
        rate = float(raw)
    except ValueError:
        rate = -1.0
    if not 0 <= rate < 1e6:
        raise HTTPProblem(400, f"rate must be a number of MB/s, 0 for no limit, not {raw!r}")
    root = f"{str(request.base_url).rstrip('/')}/v2"  # operations are read under a service root
    return await start_operation(request, SCRUB, scrub_params(rate), root=root, runner="scrubber")


async def report(request: Request) -> Response:
    """The latest scrub (or `?operation=ID`): its state and counts, and its findings (`?limit=`, 1000)."""
    pool = context(request).pool
    raw_limit = request.query_params.get("limit", str(REPORT_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _MAX_LIMIT:
        raise HTTPProblem(400, f"limit must be within 1..{_MAX_LIMIT}, not {raw_limit!r}")
    limit = int(raw_limit)
    async with pool.acquire() as conn:
        if (raw := request.query_params.get("operation")) is not None:
            operation_id = parse_operation_id(raw)
            op = await get_operation(conn, operation_id) if operation_id is not None else None
            if op is None or op.type != SCRUB:
                raise HTTPProblem(404, f"no scrub operation {raw!r}")
        else:
            row = await latest_scrub(conn)
            if row is None:
                raise HTTPProblem(404, "no scrub has run yet (POST /scrub queues one)")
            op = await get_operation(conn, row["operation_id"])
            assert op is not None
        rows = await findings(conn, op.id, limit + 1)
    body = {
        "operation": {
            "id": op.id_hex,
            "status": op.status,
            "percentComplete": op.percent_complete,
            "createdTime": iso_time(op.created_at),
            "lastUpdatedTime": iso_time(op.updated_at),
            "results": op.results,
        },
        "findings": [_finding_json(r) for r in rows[:limit]],
        "truncated": len(rows) > limit,
    }
    return Response(orjson.dumps(body), media_type="application/json")


def _finding_json(row: Any) -> dict[str, Any]:
    def hexed(value: bytes | None) -> str | None:
        return None if value is None else bytes(value).hex()

    return {
        "kind": row["kind"],
        "storageKey": row["storage_key"],
        "partition": row["partition_name"],
        "studyInstanceUID": row["study_instance_uid"],
        "seriesInstanceUID": row["series_instance_uid"],
        "sopInstanceUID": row["sop_instance_uid"],
        "recordedSha256": hexed(row["recorded_sha256"]),
        "foundSha256": hexed(row["found_sha256"]),
        "size": row["size"],
        "foundTime": iso_time(row["found_at"]),
    }
