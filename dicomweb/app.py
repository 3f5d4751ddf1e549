"""The Starlette application: routes under every service root, and the resources they share."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from access.service import AccessControl
from archive.maintenance import Maintenance
from archive.scrub import SCRUB, ScrubHandler, ScrubSchedule, scrub_params
from archive.update import UpdateHandler
from archive.update_request import UPDATE
from changefeed.notify import FeedNotifier
from deid.export import ExportHandler, export_settings
from dicomcore.decoding import quiet_codec_tracebacks
from dicomweb.auth import AccessMiddleware, jwt_config
from dicomweb.balance import BalanceMiddleware, ConnectionBalancer
from dicomweb.config import Settings
from dicomweb.context import ArchiveContext
from dicomweb.cors import cors_middleware
from dicomweb.dimse_listener import dimse_server
from dicomweb.errors import HTTPProblem, UnavailableMiddleware, handle_http_exception, handle_problem
from dicomweb.gcpolicy import tune_for_serving
from dicomweb.hl7_listener import hl7_server
from dicomweb.metrics import MetricsMiddleware, metrics
from dicomweb.routes import (
    bulk_update,
    changefeed,
    delete,
    frames,
    health,
    qido,
    rendered,
    scrub,
    stow,
    wado,
    workitems,
    ws,
)
from dicomweb.routes import export as export_routes
from dicomweb.routes import extended_query_tags as eqt
from dicomweb.routes import operations as operations_routes
from dicomweb.routes import partitions as partition_routes
from dicomweb.routes import retention as retention_routes
from dicomweb.routes.access import access_routes
from dicomweb.routes.acquire import acquire_routes, scu_settings
from dicomweb.routes.aes import ae_routes
from dicomweb.routing import SegmentRouter
from dicomweb.supervisor import READY_DIR_ENV, follow_supervisor, mark_ready
from dimse.acquire import ACQUIRE, AcquireHandler
from dimse.send import SEND, SendHandler
from indexer.migrate import migrate
from indexer.operations import OperationRunner, OperationSchedule
from indexer.reindex import ReindexHandler
from indexer.sessions import server_settings
from indexer.tag_deletion import TagDeletionHandler
from retention.sweep import RETENTION_SWEEP, SCHEDULE_LOCK, RetentionSweepHandler
from storage import open_store
from storage.base import BlobStore
from storage.s3 import S3BlobStore
from worklist.events import CHANNEL as WORKLIST_CHANNEL
from worklist.retention import EventPruner
from worklist.scp_status import ScpStatus

log = logging.getLogger(__name__)

API_VERSIONS = ("v1", "v2")


def dicomweb_routes() -> list[BaseRoute]:
    """The DICOMweb resources of one service root (PS3.18 10.4-10.6, Azure's DELETE)."""
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        Route("/studies", stow.store_instances, methods=["POST"]),
        Route("/studies/$bulkUpdate", bulk_update.bulk_update, methods=["POST"]),  # before {study}
        Route("/studies", qido.search_studies, methods=["GET"]),
        Route("/series", qido.search_series, methods=["GET"]),
        Route("/instances", qido.search_instances, methods=["GET"]),
        Route(study, stow.store_instances, methods=["POST"]),
        Route(study, wado.retrieve, methods=["GET"]),
        Route(study, delete.delete, methods=["DELETE"]),
        Route(study + "/metadata", wado.metadata, methods=["GET"]),
        *retention_study_routes(study),
        Route(study + "/series", qido.search_series, methods=["GET"]),
        Route(study + "/instances", qido.search_instances, methods=["GET"]),
        Route(series, wado.retrieve, methods=["GET"]),
        Route(series, delete.delete, methods=["DELETE"]),
        Route(series + "/metadata", wado.metadata, methods=["GET"]),
        Route(series + "/instances", qido.search_instances, methods=["GET"]),
        Route(instance, wado.retrieve, methods=["GET"]),
        Route(instance, delete.delete, methods=["DELETE"]),
        Route(instance + "/metadata", wado.metadata, methods=["GET"]),
        Route(instance + "/bulkdata/{path:path}", wado.bulkdata, methods=["GET"]),
        Route(instance + "/frames/{frames}", frames.retrieve_frames, methods=["GET"]),
        Route(study + "/rendered", rendered.rendered, methods=["GET"]),
        Route(series + "/rendered", rendered.rendered, methods=["GET"]),
        Route(instance + "/rendered", rendered.rendered, methods=["GET"]),
        Route(instance + "/frames/{frames}/rendered", rendered.rendered, methods=["GET"]),
        Route(study + "/thumbnail", rendered.thumbnail, methods=["GET"]),
        Route(series + "/thumbnail", rendered.thumbnail, methods=["GET"]),
        Route(instance + "/thumbnail", rendered.thumbnail, methods=["GET"]),
        Route(instance + "/frames/{frames}/thumbnail", rendered.thumbnail, methods=["GET"]),
        Route("/changefeed", changefeed.read_feed, methods=["GET"]),
        Route("/changefeed/latest", changefeed.latest, methods=["GET"]),
        # extended query tags are global: every service root shows the same ones (as in Azure)
        Route("/extendedquerytags", eqt.add, methods=["POST"]),
        Route("/extendedquerytags", eqt.list_all, methods=["GET"]),
        Route("/extendedquerytags/{tag}", eqt.get, methods=["GET"]),
        Route("/extendedquerytags/{tag}", eqt.update, methods=["PATCH"]),
        Route("/extendedquerytags/{tag}", eqt.delete, methods=["DELETE"]),
        Route("/extendedquerytags/{tag}/errors", eqt.errors, methods=["GET"]),
        Route("/operations/{operation}", operations_routes.get, methods=["GET"]),
        Route("/export", export_routes.export, methods=["POST"]),
        *retention_policy_routes(),
        *acquire_routes(),  # POST /acquire, POST /studies/{study}/$send (dimse/acquire.py, send.py)
        *worklist_routes(),
    ]


def retention_policy_routes() -> list[BaseRoute]:
    """The partition's retention policy (retention/, docs/retention.md)."""
    return [
        Route("/retention", retention_routes.read_policy, methods=["GET"]),
        Route("/retention", retention_routes.put_policy, methods=["PUT"]),
        Route("/retention", retention_routes.delete_policy, methods=["DELETE"]),
    ]


def retention_study_routes(study: str) -> list[BaseRoute]:
    """A study's legal hold, retention status and restore (retention/, docs/retention.md)."""
    return [
        Route(study + "/legalhold", retention_routes.put_hold, methods=["PUT"]),
        Route(study + "/legalhold", retention_routes.delete_hold, methods=["DELETE"]),
        Route(study + "/retention", retention_routes.read_status, methods=["GET"]),
        Route(study + "/$restore", retention_routes.restore, methods=["POST"]),
    ]


def worklist_routes() -> list[BaseRoute]:
    """UPS-RS (PS3.18 11) and its Notification Connection, which PS3.18 8.10.4 puts at the service root."""
    item = "/workitems/{workitem}"
    subscriber = item + "/subscribers/{aetitle}"
    return [
        Route("/workitems", workitems.create, methods=["POST"]),
        Route("/workitems", workitems.search_workitems, methods=["GET"]),
        Route(item, workitems.retrieve, methods=["GET"]),
        Route(item, workitems.update, methods=["POST"]),
        Route(item + "/state", workitems.change_state, methods=["PUT"]),
        Route(item + "/cancelrequest", workitems.cancel_request, methods=["POST"]),
        Route(subscriber, workitems.subscribe, methods=["POST"]),
        Route(subscriber, workitems.unsubscribe, methods=["DELETE"]),
        Route(subscriber + "/suspend", workitems.suspend, methods=["POST"]),
        WebSocketRoute("/ws/subscribers/{aetitle}", ws.subscriber_channel),
    ]


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to do. asyncpg's default runs `SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`, one more round trip for every request (docs/performance.md, UPS-RS).
    No code leaves session state on a pool connection: advisory locks are transaction-scoped (the orphan
    sweeper's session lock is released in a finally), LISTEN uses connections of its own, cursors are not
    WITH HOLD, settings are SET LOCAL. The pool still rolls back a transaction left open before it calls
    this (asyncpg's Connection._reset)."""


def create_app(
    settings: Settings,
    *,
    database_url: str,
    store: BlobStore | None = None,
    run_maintenance: bool = True,
) -> Starlette:
    """An app bound to one database and blob store; opened and closed by its lifespan (which also closes
    a `store` handed in)."""
    quiet_codec_tracebacks()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            database_url, min_size=1, max_size=settings.db_pool_size, reset=keep_session,
            server_settings=server_settings(),  # a dead node's locks go within a minute (indexer/sessions.py)
        )  # fmt: skip
        blob_store = store or open_store(
            settings.resolved_storage_url(),
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            s3_object_lock_days=settings.s3_object_lock_days,
        )
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            if isinstance(blob_store, S3BlobStore):
                await blob_store.check_object_lock()  # a retention asked for must be in force
            maintenance = Maintenance(pool, blob_store)
            if run_maintenance:
                maintenance.start()
            notifier = FeedNotifier(database_url)
            notifier.start()
            # wakes the UPS-RS WebSocket senders of this process when work item events commit
            app.state.worklist_notifier = FeedNotifier(database_url, WORKLIST_CHANNEL)
            app.state.worklist_notifier.start()
            app.state.archive = ArchiveContext(pool, blob_store, settings, maintenance, notifier)
            # authentication caches (invalidated by LISTEN) and the audit writer (docs/security.md)
            app.state.access = AccessControl.create(
                pool, database_url, insecure_open=settings.insecure_open, jwt_config=jwt_config(settings),
                trusted_proxies=settings.trusted_proxies,
            )  # fmt: skip
            app.state.access.start()
            # background operations (re-index) that any process may claim, resumed after crashes
            app.state.operations = OperationRunner(
                pool,
                {
                    "reindex": ReindexHandler(),
                    "deleteExtendedQueryTag": TagDeletionHandler(),  # DELETE /extendedquerytags/{tag}
                    "export": ExportHandler(pool, blob_store, export_settings(settings)),  # deid/export.py
                    UPDATE: UpdateHandler(blob_store),  # bulk update: $bulkUpdate, HL7 (archive/update.py)
                    # DIMSE SCU operations: acquisition from a PACS, $send (dimse/acquire.py, send.py)
                    ACQUIRE: AcquireHandler(pool, blob_store, scu_settings(settings)),
                    SEND: SendHandler(pool, blob_store, scu_settings(settings)),
                    # expiry and the end of restore windows (retention/sweep.py)
                    RETENTION_SWEEP: RetentionSweepHandler(
                        app.state.access.clock.now, app.state.access.audit.record
                    ),
                },
                lease_seconds=settings.operation_lease_seconds,
            )
            if run_maintenance:
                app.state.operations.start()
            # the scrub has a runner of its own: a scrub of a large archive runs for hours, and must not
            # hold up exports and re-indexes meanwhile (archive/scrub.py, docs/integrity.md)
            report, summary = scrub.audit_reporters(app.state.access.audit, app.state.access.clock)
            app.state.scrubber = OperationRunner(
                pool,
                {SCRUB: ScrubHandler(blob_store, report=report, summary=summary)},
                lease_seconds=settings.operation_lease_seconds,
            )
            schedule = ScrubSchedule(
                pool,
                dt.timedelta(hours=settings.scrub_interval_hours),
                scrub_params(settings.scrub_rate_mb),
                app.state.scrubber.poke,
            )
            retention_schedule = OperationSchedule(
                pool,
                RETENTION_SWEEP,
                dt.timedelta(hours=settings.retention_sweep_hours),
                {},
                app.state.operations.poke,
                lock=SCHEDULE_LOCK,
                check_every=60.0,
            )
            if run_maintenance:
                app.state.scrubber.start()
                if settings.scrub_interval_hours > 0:
                    schedule.start()
                if settings.retention_sweep_hours > 0:
                    retention_schedule.start()
            # UPS-RS: the bound on unacknowledged event queues, and SCP Status Change reports
            pruner = EventPruner(
                pool, settings.ups_event_queue_max, dt.timedelta(hours=settings.ups_event_retention_hours)
            )
            if run_maintenance:
                pruner.start()
            scp_status = ScpStatus(database_url)
            await scp_status.start()  # RESTARTED when the archive was down
            # the DIMSE front door (dimse/): a listener in every process, on one shared port
            app.state.dimse = dimse_server(settings, pool, blob_store, app.state.access.audit)
            if app.state.dimse is not None:
                await app.state.dimse.start()
            # the HL7 v2 front door (hl7/): an MLLP listener in every process when DICOMWEB_HL7_PORT is set
            app.state.hl7 = hl7_server(settings, pool, app.state.operations, app.state.access.audit)
            if app.state.hl7 is not None:
                await app.state.hl7.start()
            mark_ready()  # a supervised worker has started (dicomweb/supervisor.py)
            try:
                yield
            finally:
                if app.state.hl7 is not None:
                    await app.state.hl7.stop()
                if app.state.dimse is not None:
                    await app.state.dimse.stop()
                await scp_status.stop()  # GOING DOWN when this is the last process
                await pruner.stop()
                await schedule.stop()
                await retention_schedule.stop()
                await app.state.scrubber.stop()
                await app.state.operations.stop()
                await app.state.access.stop()  # after the last request: writes the audit buffer
                await notifier.stop()
                await app.state.worklist_notifier.stop()
                await maintenance.stop()
        finally:
            await blob_store.close()  # a store handed in is the app's from then on
            await pool.close()

    routes: list[BaseRoute] = [
        Route("/health/live", health.live, methods=["GET"]),
        Route("/health/ready", health.ready, methods=["GET"]),
        Route("/health/check", health.check, methods=["GET"]),  # Azure's Health Check API
        Route("/metrics", metrics, methods=["GET"]),
        *access_routes(),
        *ae_routes(),
        Route("/scrub", scrub.start, methods=["POST"]),
        Route("/scrub/report", scrub.report, methods=["GET"]),
    ]
    # partition roots first: the plain /vN mount would otherwise claim /vN/partitions/... and 404
    for version in API_VERSIONS:
        routes.append(Mount(f"/{version}/partitions/{{partition}}", app=SegmentRouter(dicomweb_routes())))
    # the list of partitions is at the plain roots only (Azure's GET /partitions); the partition mounts
    # above need a name after /partitions/, so /vN/partitions itself comes here
    listing = Route("/partitions", partition_routes.list_partitions, methods=["GET"])
    for version in API_VERSIONS:
        routes.append(Mount(f"/{version}", app=SegmentRouter([*dicomweb_routes(), listing])))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPProblem: handle_problem, HTTPException: handle_http_exception},
        # metrics outermost: it times what the client sees, CORS preflights included
        # access control innermost: refusals get CORS headers too, and are counted and timed
        middleware=[
            *balance_middleware(),
            Middleware(MetricsMiddleware),
            Middleware(UnavailableMiddleware),  # inside metrics: a 503 for an outage is counted as such
            *cors_middleware(settings),
            Middleware(AccessMiddleware),
        ],
    )
    app.router = SegmentRouter(routes, lifespan=lifespan)  # same routes, tested by first path segment
    return app


def balance_middleware() -> list[Middleware]:
    """Connection balancing between the workers of a supervised `dicomweb serve` (dicomweb/balance.py);
    none for a lone process."""
    directory = os.environ.get(READY_DIR_ENV)
    if not directory:
        return []
    return [Middleware(BalanceMiddleware, balancer=ConnectionBalancer(Path(directory)))]


def app_from_env() -> Starlette:
    """Factory for uvicorn worker processes: everything comes from DICOMWEB_* variables (set by the CLI)."""
    follow_supervisor()  # a supervised worker ends with its parent (dicomweb/supervisor.py)
    settings = Settings.from_env()
    if not settings.database_url:
        raise RuntimeError("DICOMWEB_DATABASE_URL is not set")
    app = create_app(settings, database_url=settings.database_url)
    tune_for_serving()  # a serving process's heap is built: keep it out of the cyclic collector's walks
    return app
