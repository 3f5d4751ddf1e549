"""Starts the HL7 v2 front door (MLLP) beside the HTTP one, in the same process and on the same services.

As for DIMSE (dicomweb/dimse_listener.py), dicomweb is where a server process is put together; hl7 never
imports dicomweb.
"""

from __future__ import annotations

import asyncpg

from access.audit import AuditLog
from access.service import parse_networks
from dicomweb.config import Settings
from hl7.server import MllpServer
from hl7.service import Hl7Service
from indexer.operations import OperationRunner


def hl7_server(
    settings: Settings, pool: asyncpg.Pool, operations: OperationRunner, audit: AuditLog
) -> MllpServer | None:
    """The process's MLLP listener, or None when DICOMWEB_HL7_PORT is unset or 0. ADT messages queue bulk
    update operations; `operations.poke` starts them at once in this process."""
    if not settings.hl7_port:
        return None
    service = Hl7Service(pool, settings.hl7_partition, operations.poke, audit, settings.dimse_ae_title)
    allowed = (
        None if settings.hl7_allowed_hosts.strip() == "*" else parse_networks(settings.hl7_allowed_hosts)
    )
    return MllpServer(service, settings.host, settings.hl7_port, allowed)
