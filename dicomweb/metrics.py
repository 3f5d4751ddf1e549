"""Prometheus metrics at GET /metrics: HTTP traffic per process, archive state from PostgreSQL.

Request and ingest counters live in each process. With several uvicorn workers the CLI sets
PROMETHEUS_MULTIPROC_DIR, so that a scrape answered by any worker reports the sum of all of them. Gauges
that describe the archive (instances, queue depths, the change feed's head) are read from PostgreSQL at
scrape time, so every process reports the same values and none keeps state that could go stale.
"""

from __future__ import annotations

import os
import time

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from archive.ingest import FailureReason, StoreOutcome
from archive.scrub import latest_scrub
from dicomweb.context import context

REQUESTS = Counter("dicomweb_http_requests_total", "HTTP requests answered", ["method", "handler", "status"])
DURATION = Histogram(
    "dicomweb_http_request_duration_seconds",
    "Time from request start to the end of the response body",
    ["method", "handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STOW_INSTANCES = Counter(
    "dicomweb_stow_instances_total", "Instances received by STOW-RS, by outcome", ["outcome"]
)

DIGEST_MISMATCHES = Counter(
    "dicomweb_digest_mismatches_total",
    "Stored objects found altered (SHA-256 differs from the one recorded at ingest) while being retrieved",
)


def count_stored(outcomes: list[StoreOutcome]) -> None:
    for outcome in outcomes:
        if outcome.failure is None:
            STOW_INSTANCES.labels("stored").inc()
        elif outcome.failure is FailureReason.ALREADY_STORED:
            STOW_INSTANCES.labels("already_stored").inc()
        else:
            STOW_INSTANCES.labels("failed").inc()


def _handler(scope: Scope) -> str:
    """The endpoint that served the request (bounded label values, unlike raw paths full of UIDs)."""
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return "unmatched"
    module = getattr(endpoint, "__module__", "").rsplit(".", 1)[-1]
    return f"{module}.{getattr(endpoint, '__name__', 'app')}"


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled by the handler that served it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            handler = _handler(scope)
            method = scope["method"]
            REQUESTS.labels(method, handler, str(status)).inc()
            DURATION.labels(method, handler).observe(time.perf_counter() - started)


class _Snapshot:
    """A collector over values already read from PostgreSQL (prometheus_client collectors are sync)."""

    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self.families = families

    def collect(self) -> list[GaugeMetricFamily]:
        return self.families


async def _archive_gauges(request: Request) -> list[GaugeMetricFamily]:
    pool = context(request).pool
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM partition) AS partitions,
                      (SELECT coalesce(sum(instance_count), 0) FROM study) AS instances,
                      (SELECT count(*) FROM study) AS studies,
                      (SELECT count(*) FROM blob_deletion) AS deletions,
                      (SELECT count(*) FROM deleted_object) AS kept,
                      (SELECT count(*) FROM legal_hold) AS holds,
                      (SELECT last_sequence FROM changefeed_counter) AS feed"""
        )
        scrubbed = await latest_scrub(conn, finished=True)
    families = []
    for name, doc, value in (
        ("dicomweb_partitions", "Data partitions", row["partitions"]),
        ("dicomweb_instances", "Instances indexed", row["instances"]),
        ("dicomweb_studies", "Studies indexed", row["studies"]),
        ("dicomweb_blob_deletions_pending", "Objects queued for deletion from storage", row["deletions"]),
        # retention/: deleted instances' objects kept for their restore window, studies under legal hold
        (
            "dicomweb_retention_restorable_objects",
            "Objects of deleted instances kept to be restorable",
            row["kept"],
        ),
        ("dicomweb_retention_legal_holds", "Studies under legal hold", row["holds"]),
        ("dicomweb_changefeed_last_sequence", "Sequence of the latest change feed entry", row["feed"]),
    ):
        families.append(GaugeMetricFamily(name, doc, value=float(value)))
    if scrubbed is not None:  # the latest scrub that finished (archive/scrub.py)
        results = scrubbed["results"]
        counts = orjson.loads(results) if isinstance(results, str | bytes) else results
        for name, doc, value in (
            ("dicomweb_scrub_last_finished_timestamp_seconds", "When the latest scrub finished",
             scrubbed["finished_at"].timestamp()),
            ("dicomweb_scrub_checked_objects", "Objects the latest scrub read", counts["checkedObjects"]),
            ("dicomweb_scrub_checked_bytes", "Bytes the latest scrub read", counts["checkedBytes"]),
            ("dicomweb_scrub_missing_objects", "Indexed objects the latest scrub found missing",
             counts["missing"]),
            ("dicomweb_scrub_altered_objects", "Objects the latest scrub found altered (SHA-256 differs)",
             counts["altered"]),
            ("dicomweb_scrub_unreferenced_objects", "Stored objects no index row references (latest scrub)",
             counts["unreferenced"]),
        ):  # fmt: skip
            families.append(GaugeMetricFamily(name, doc, value=float(value)))
    return families


async def metrics(request: Request) -> Response:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(await _archive_gauges(request)))
    return Response(body + generate_latest(snapshot), media_type=CONTENT_TYPE_LATEST)
