"""Starts the DIMSE front door beside the HTTP one, in the same process and on the same services.

dicomweb is where a server process is put together (the CLI and the app's lifespan), so it is the one place
that knows about both front doors; dimse itself never imports dicomweb.
"""

from __future__ import annotations

import asyncio

import asyncpg

from access.audit import AuditLog
from dicomweb.config import DEFAULT_PARTITION, Settings
from dimse.gateway import Gateway
from dimse.server import DimseServer
from storage.base import BlobStore


def dimse_server(
    settings: Settings, pool: asyncpg.Pool, store: BlobStore, audit: AuditLog
) -> DimseServer | None:
    """The process's DIMSE listener, or None when DICOMWEB_DIMSE_PORT is unset or 0."""
    if not settings.dimse_port:
        return None
    gateway = Gateway(
        pool=pool,
        store=store,
        loop=asyncio.get_running_loop(),
        ae_title=settings.dimse_ae_title,
        audit_log=audit,
        insecure_open=settings.insecure_open,
        default_partition=DEFAULT_PARTITION,
        pending_interval=settings.dimse_pending_interval_ms / 1000,
    )
    return DimseServer(gateway, settings.host, settings.dimse_port)
