"""What every handler needs from the running app: the pool, the store, settings, the partition in the URL."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from starlette.requests import Request

from archive.maintenance import Maintenance
from changefeed.notify import FeedNotifier
from dicomcore.uids import is_valid_uid
from dicomweb.config import DEFAULT_PARTITION, Settings
from dicomweb.errors import HTTPProblem
from indexer.lookup import partition_key as lookup_partition_key
from indexer.lookup import valid_partition_name
from storage.base import BlobStore


@dataclass
class ArchiveContext:
    pool: asyncpg.Pool
    store: BlobStore
    settings: Settings
    maintenance: Maintenance
    notifier: FeedNotifier
    # name -> key; partitions are never renamed or re-keyed, so caching the mapping is always safe
    partitions: dict[str, int] = field(default_factory=dict)


def context(request: Request) -> ArchiveContext:
    return request.app.state.archive


async def partition_key(request: Request, *, create: bool = False) -> int:
    """The data partition the URL addresses; 404 for an unknown one (created on STOW, as Azure does)."""
    ctx = context(request)
    name = request.path_params.get("partition", DEFAULT_PARTITION)
    key = ctx.partitions.get(name)
    if key is not None:
        return key
    if not valid_partition_name(name):
        raise HTTPProblem(
            400, f"invalid partition name {name!r}: use 1-64 letters, digits, '_', '.', '-' (not '.' or '..')"
        )
    key = await lookup_partition_key(ctx.pool, name, create=create)
    if key is None:
        raise HTTPProblem(404, f"partition {name!r} does not exist")
    ctx.partitions[name] = key
    return key


def api_version(request: Request) -> str:
    """'v1' or 'v2': the version segment of the service root the request came in under."""
    return request.scope.get("root_path", "").split("/")[1]


def service_root(request: Request) -> str:
    """The DICOMweb root this request came in under (e.g. http://host:8080/v2/partitions/x).

    URLs in responses (RetrieveURL, BulkDataURI) start with it. DICOMWEB_PUBLIC_URL fixes the scheme and
    host part when a proxy in front rewrites them. Otherwise it comes from the request; a Host header
    without a port (dicomweb-client sends one) gets the port the server listens on when no proxy is
    involved, so the URLs handed out resolve.
    """
    # the mounted service root is in root_path (base_url holds only the app's own root path)
    root_path = request.scope.get("root_path", "")
    public = context(request).settings.public_url
    if public:
        return public.rstrip("/") + root_path
    url = request.url
    server = request.scope.get("server")
    host_header = request.headers.get("host", "")
    if (
        server
        and ":" not in host_header.rsplit("]", 1)[-1]
        and "x-forwarded-host" not in request.headers
        and "forwarded" not in request.headers
        and server[1] not in (80, 443)
    ):
        url = url.replace(port=server[1])
    return str(url.replace(path=root_path, query="", fragment="")).rstrip("/")


def uid_param(request: Request, name: str) -> str:
    """A UID from the path, validated so that it is safe to use and gives a clear 400 when malformed."""
    value = request.path_params[name]
    if not is_valid_uid(value):
        raise HTTPProblem(400, f"{name} {value!r} is not a valid UID")
    return value


def resource_uids(request: Request) -> tuple[str, str | None, str | None]:
    """Study, series and SOP instance UIDs of a WADO/DELETE path (those it has), validated."""
    study = uid_param(request, "study")
    series = uid_param(request, "series") if "series" in request.path_params else None
    sop = uid_param(request, "instance") if "instance" in request.path_params else None
    return study, series, sop


def not_found(study: str, series: str | None, sop: str | None) -> HTTPProblem:
    """404 naming the most specific resource addressed."""
    what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
    return HTTPProblem(404, f"{what} not found")
