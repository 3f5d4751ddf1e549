"""What every DIMSE service handler needs: the archive's services, the event loop they run on, the audit log.

pynetdicom runs each association in a thread of its own and calls the handlers there. The archive's
services (ingest, the QIDO compiler, the blob store, the worklist) are asyncio code on the process's event
loop, so a handler hands each piece of work to the loop (`Gateway.run`) and waits for its answer; the
association thread blocks, the loop does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from access.audit import AuditEvent, AuditLog
from dimse.aes import SERVICES, RegisteredAe
from indexer.lookup import partition_key as lookup_partition_key
from storage.base import BlobStore

if TYPE_CHECKING:
    from dimse.commitment_delivery import CommitmentReports

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a handler waits for the event loop's answer. Beyond it the loop is stuck or overloaded; the
# operation fails (0xA700 / 0xC000) rather than holding the association for ever.
CALL_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Peer:
    """The calling AE of an accepted association: its registration, and where it connected from."""

    ae: RegisteredAe
    address: str
    port: int

    @property
    def subject(self) -> str:
        return f"ae:{self.ae.ae_title}"

    def may(self, service: str) -> bool:
        return self.ae.may(service)


def open_peer(ae_title: str, address: str, port: int, partition: str) -> Peer:
    """The peer of an association accepted without registration (--insecure-open): every service."""
    return Peer(RegisteredAe(ae_title, address, None, partition, SERVICES), address, port)


@dataclass
class Gateway:
    pool: asyncpg.Pool
    store: BlobStore
    loop: asyncio.AbstractEventLoop
    ae_title: str
    audit_log: AuditLog | None = None
    insecure_open: bool = False
    default_partition: str = "Microsoft.Default"
    # C-FIND pages through the QIDO compiler this many results at a time
    find_page_size: int = 1000
    # C-GET/C-MOVE pending responses: at most one per this many seconds after the first (0: every one)
    pending_interval: float = 0.2
    partitions: dict[str, int] = field(default_factory=dict)
    # the process's sender of Storage Commitment reports (set by the listener, dimse/server.py)
    commitments: CommitmentReports | None = None

    def commitment_reports(self) -> CommitmentReports:
        if self.commitments is None:
            raise RuntimeError("no storage commitment report sender in this process")
        return self.commitments

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run a coroutine on the archive's event loop from an association thread and return its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def partition_key(self, name: str, *, create: bool = False) -> int | None:
        """The key of a peer's partition; None when it does not exist yet, unless `create` (a store into a
        new partition creates it, as a STOW does; a query or a retrieve creates nothing)."""
        key = self.partitions.get(name)
        if key is None:
            key = await lookup_partition_key(self.pool, name, create=create)
            if key is not None:
                self.partitions[name] = key
        return key

    def audit(
        self,
        *,
        subject: str,
        address: str | None,
        operation: str,
        action_code: str,
        status: int,
        failed: bool,
        started: float,
        partition: str | None = None,
        detail: str | None = None,
        study: str | None = None,
        series: str | None = None,
        instance: str | None = None,
        called: str | None = None,
    ) -> None:
        """One audit record, as an HTTP request gets one (docs/security.md): method DIMSE, the operation as
        the path, the DIMSE status as the status. Safe to call from any thread."""
        if self.audit_log is None:
            return
        event = AuditEvent(
            event_time=datetime.now(UTC),
            subject=subject,
            auth="ae",
            token_id=None,
            token_name=None,
            roles=[],
            client_address=address,
            user_agent=f"called AE {called}" if called else None,
            method="DIMSE",
            path=operation,
            query=None,
            action="dimse",  # access.policy.Family.DIMSE; the operation is the path
            action_code=action_code,
            partition_name=partition,
            study_uid=study,
            series_uid=series,
            instance_uid=instance,
            status=status,
            outcome=8 if failed and status >= 0xC000 else 4 if failed else 0,
            detail=detail[:2048] if detail else None,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        self.loop.call_soon_threadsafe(self.audit_log.record, event)
