"""The change feed API (Azure DICOM service compatible), with long-polling as our extension.

v1: `offset` is a sequence number and entries after it come back. v2: `startTime`/`endTime` choose a time
window and `offset` skips that many entries of it. Both accept `wait` (seconds): when nothing matches yet,
the request is held until an entry commits or the wait ends. The plain roots serve every partition's
entries (each carries its PartitionName); partition roots serve that partition's only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from changefeed import log
from changefeed.notify import RECHECK
from dicomweb.bulkuris import absolute_bulk_uris, instance_url
from dicomweb.config import DEFAULT_PARTITION
from dicomweb.context import api_version, context, partition_key, service_root
from dicomweb.errors import HTTPProblem

MAX_LIMIT = 10_000
MAX_WAIT = 60
MAX_OFFSET = log.MAX_SEQUENCE  # Azure's offset is a long; a larger one is no offset at all
_DEFAULT_LIMIT = {"v1": 10, "v2": 100}
_ACTIONS = {log.Action.CREATE: "create", log.Action.UPDATE: "update", log.Action.DELETE: "delete"}
_STATES = {log.State.CURRENT: "current", log.State.REPLACED: "replaced", log.State.DELETED: "deleted"}


@dataclass(slots=True)
class _Params:
    offset: int = 0
    limit: int = 10
    include_metadata: bool = True
    wait: float = 0.0
    start: dt.datetime | None = None
    end: dt.datetime | None = None


def _int(name: str, raw: str, low: int, high: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise HTTPProblem(400, f"{name} must be an integer, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise HTTPProblem(400, f"{name} must be {bounds}, not {value}")
    return value


def _time(name: str, raw: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(raw.strip().replace(" ", "+"))  # a '+' sent unescaped reads ' '
    except ValueError:
        raise HTTPProblem(400, f"{name} must be an ISO 8601 date and time, not {raw!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _params(request: Request, version: str, *, window: bool) -> _Params:
    """Query parameters, names matched case-insensitively (Azure's own docs spell them both ways)."""
    params = _Params(limit=_DEFAULT_LIMIT[version])
    allowed = {"offset", "limit", "includemetadata", "wait"}
    if window:
        allowed |= {"starttime", "endtime"}
    seen: set[str] = set()
    for name, raw in request.query_params.multi_items():
        key = name.lower()
        if key not in allowed:
            raise HTTPProblem(400, f"unknown query parameter {name!r}; allowed: {', '.join(sorted(allowed))}")
        if key in seen:
            raise HTTPProblem(400, f"query parameter {name!r} is given more than once")
        seen.add(key)
        if key == "offset":
            params.offset = _int(name, raw, 0, MAX_OFFSET)
        elif key == "limit":
            params.limit = _int(name, raw, 1, MAX_LIMIT)
        elif key == "wait":
            params.wait = float(_int(name, raw, 0, MAX_WAIT))
        elif key == "includemetadata":
            if raw.lower() not in ("true", "false"):
                raise HTTPProblem(400, f"{name} must be true or false, not {raw!r}")
            params.include_metadata = raw.lower() == "true"
        elif key == "starttime":
            params.start = _time(name, raw)
        else:
            params.end = _time(name, raw)
    if params.start and params.end and params.end < params.start:
        raise HTTPProblem(400, "endTime is before startTime")
    return params


def _scope_partition(request: Request) -> bool:
    return "partition" in request.path_params


def _entry_json(entry: log.FeedEntry, root: str, partitioned: bool) -> dict[str, object]:
    body: dict[str, object] = {
        "Sequence": entry.sequence,
        "StudyInstanceUid": entry.study_instance_uid,
        "SeriesInstanceUid": entry.series_instance_uid,
        "SopInstanceUid": entry.sop_instance_uid,
        "Action": _ACTIONS[entry.action],
        "Timestamp": entry.timestamp,
        "State": _STATES[entry.state],
    }
    if entry.metadata is not None and entry.state is log.State.CURRENT:
        partition_root = root
        if not partitioned and entry.partition_name != DEFAULT_PARTITION:
            partition_root = f"{root}/partitions/{entry.partition_name}"
        url = instance_url(
            partition_root, entry.study_instance_uid, entry.series_instance_uid, entry.sop_instance_uid
        )
        body["Metadata"] = orjson.Fragment(absolute_bulk_uris(entry.metadata, url))
    body["PartitionName"] = entry.partition_name
    return body


def _json(value: object) -> Response:
    return Response(orjson.dumps(value, option=orjson.OPT_UTC_Z), media_type="application/json")


async def _read_waiting(
    request: Request, wait: float, read: Callable[[], Awaitable[list[log.FeedEntry]]]
) -> list[log.FeedEntry]:
    """`read()`, and when it finds nothing, again after each commit until `wait` seconds have passed."""
    notifier = context(request).notifier
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        change = notifier.next_change() if wait else None  # taken before reading: no commit slips by
        entries = await read()
        remaining = deadline - loop.time()
        if entries or change is None or remaining <= 0:
            return entries
        try:
            await asyncio.wait_for(asyncio.shield(change), min(remaining, RECHECK))
        except TimeoutError:
            pass


async def read_feed(request: Request) -> Response:
    version = api_version(request)
    partitioned = _scope_partition(request)
    params = _params(request, version, window=version != "v1")
    ctx = context(request)
    key = await partition_key(request) if partitioned else None
    if version == "v1":
        last = await log.last_sequence(ctx.pool)
        if params.offset > last:
            raise HTTPProblem(
                400, f"offset {params.offset} is beyond the end of the change feed (latest sequence {last})"
            )

        async def read() -> list[log.FeedEntry]:
            return await log.read_after(
                ctx.pool,
                params.offset,
                params.limit,
                partition_key=key,
                include_metadata=params.include_metadata,
            )
    else:

        async def read() -> list[log.FeedEntry]:
            return await log.read_window(
                ctx.pool,
                params.start,
                params.end,
                params.offset,
                params.limit,
                partition_key=key,
                include_metadata=params.include_metadata,
            )

    entries = await _read_waiting(request, params.wait, read)
    root = service_root(request)
    return _json([_entry_json(e, root, partitioned) for e in entries])


async def latest(request: Request) -> Response:
    params = _params(request, api_version(request), window=False)
    if params.wait or params.offset or "limit" in {k.lower() for k in request.query_params}:
        raise HTTPProblem(400, "changefeed/latest takes only includemetadata")
    partitioned = _scope_partition(request)
    ctx = context(request)
    key = await partition_key(request) if partitioned else None
    entry = await log.latest(ctx.pool, partition_key=key, include_metadata=params.include_metadata)
    if entry is None:
        return _json({"Sequence": 0})
    return _json(_entry_json(entry, service_root(request), partitioned))
