"""Sending Storage Commitment reports (N-EVENT-REPORT): on the request's association while it is open, else
on one the archive opens, from the queue in PostgreSQL (dimse/commitment_queue.py) by any process.

PS3.4 J.3.3 lets the SCP report on the association of the request or on another one; peers that release
right after the N-ACTION response expect the second. pynetdicom sends requests from an acceptor through
`Association.send_n_event_report`, which pauses the association's reactor (after the request being served
has had its response) and waits for the peer's answer; reports for one association are sent one at a time.

The first attempt is on the request's association, by the process that took the request. When that has
ended, the report is due at once, and `CommitmentReports` (one per process, beside the DIMSE listener)
claims due reports and opens an association to the peer's registered host and port (the address the
request came from when the registration names a network or `*`), proposing the SOP class with SCP/SCU Role
Selection (the archive as SCP). A failed attempt makes the report due again after 1, 2, 4, ... s (at most
5 min), until it expires (24 h). The instances are checked against the index at each attempt, so a report
says what the archive holds when it is sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import threading
import time
from contextlib import suppress
from dataclasses import dataclass

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_RELEASE

from dimse import commitment_queue as queue
from dimse import scu
from dimse.aes import RegisteredAe, get_ae
from dimse.commitment import (
    PROCESSING_FAILURE,
    STORAGE_COMMITMENT,
    SUCCESS,
    WELL_KNOWN_INSTANCE,
    Request,
    event_information,
    stored_classes,
)
from dimse.gateway import Gateway, Peer

log = logging.getLogger(__name__)

# how long to wait for the peer's answer on its own association: a peer that released meanwhile never
# answers, and its release waits for this report to end
SAME_ASSOCIATION_TIMEOUT = 15.0
TIMEOUTS = scu.Timeouts(acse=30, dimse=30, network=60, connect=10)
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
POLL_SECONDS = 2.0  # how often a process looks for due reports (another process's, or retries)
CONCURRENCY = 4  # reports one process sends at once on new associations
EXPIRY_CHECK_SECONDS = 60.0

_locks = threading.Lock()


@dataclass(frozen=True, slots=True)
class Report:
    event_type: int
    info: Dataset
    committed: int
    failed: int


class CommitmentReports:
    """A process's sender of owed reports: the first attempt of its own requests, and due ones of any."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def pool(self) -> asyncpg.Pool:
        return self.gateway.pool

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="commitment-reports")

    async def stop(self) -> None:
        """Stop claiming; let attempts in progress end (bounded by their timeouts), so that their reports
        are not left claimed."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=30)

    def poke(self) -> None:
        """A report is due now (called on the event loop)."""
        self._wake.set()

    async def accept(self, peer: Peer, request: Request) -> queue.Pending:
        """Record an accepted request before it is answered; the caller makes the first attempt."""
        return await queue.enqueue(
            self.pool, request.transaction_uid, peer.ae.ae_title, peer.ae.partition, peer.address,
            request.references,
        )  # fmt: skip

    async def first_attempt(self, assoc: Association, pending: queue.Pending) -> None:
        """Send the report on the request's association if it is still open; else leave it due at once."""
        started = time.perf_counter()
        report = await self._report(pending)
        status = await asyncio.to_thread(
            _on_same, assoc, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE, report.event_type, report.info
        )
        if status is None:
            await queue.retry_later(self.pool, pending, "the request's association had ended", failed=False)
            self.poke()
            return
        await queue.delivered(self.pool, pending)
        self._audit(pending, report, status, "sent on the request's association", started)

    async def _run(self) -> None:
        next_expiry_check = time.monotonic()  # at start, then every EXPIRY_CHECK_SECONDS
        while True:
            try:
                if time.monotonic() >= next_expiry_check:
                    next_expiry_check = time.monotonic() + EXPIRY_CHECK_SECONDS
                    for row in await queue.remove_expired(self.pool):
                        self._audit_expired(row)
                while len(self._in_flight) < CONCURRENCY:
                    pending = await queue.claim_due(self.pool)
                    if pending is None:
                        break
                    task = asyncio.create_task(self._attempt_new(pending))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("storage commitment reports: cannot read the queue: %s", exc)
            except Exception:  # the sender must outlive any one failure; the next round tries again
                log.exception("storage commitment reports: queue round failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            self._wake.clear()

    async def _report(self, pending: queue.Pending) -> Report:
        request = Request(pending.transaction_uid, pending.references)
        try:
            stored: dict[str, str] | None = await stored_classes(
                self.gateway, pending.partition, [uid for _, uid in pending.references]
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("storage commitment %s: index not readable: %s", pending.transaction_uid, exc)
            stored = None
        return Report(*event_information(request, stored, self.gateway.ae_title))

    async def _attempt_new(self, pending: queue.Pending) -> None:
        started = time.perf_counter()
        try:
            registered = await get_ae(self.pool, pending.ae_title)
            try:
                target = _target(registered, pending.ae_title, pending.peer_address)
            except ValueError as exc:  # no way to reach the peer: the report can never be sent
                await queue.delivered(self.pool, pending)
                report = await self._report(pending)
                self._audit(pending, report, None, f"not delivered: the request's association has ended and "
                            f"{exc}", started)  # fmt: skip
                return
            report = await self._report(pending)
            attempt = pending.attempts + 1
            try:
                status = await asyncio.to_thread(
                    _on_new, self.gateway.ae_title, target, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE,
                    report.event_type, report.info,
                )  # fmt: skip
            except scu.PeerUnavailable as exc:
                log.info("N-EVENT-REPORT to %s, attempt %d: %s", target, attempt, exc)
                await queue.retry_later(self.pool, pending, str(exc))
                return
            await queue.delivered(self.pool, pending)
            self._audit(pending, report, status, f"sent on a new association to {target} (attempt {attempt})",
                        started)  # fmt: skip
        except Exception:  # the claim runs out and the report is tried again
            log.exception("storage commitment %s: report attempt failed", pending.transaction_uid)

    def _audit(
        self, pending: queue.Pending, report: Report, status: int | None, how: str, started: float
    ) -> None:
        self.gateway.audit(
            subject=f"ae:{pending.ae_title}", address=pending.peer_address, operation="N-EVENT-REPORT",
            action_code="E", status=status if status is not None else PROCESSING_FAILURE,
            failed=status != SUCCESS, started=started, partition=pending.partition,
            detail=f"storage commitment {pending.transaction_uid}: {report.committed} committed, "
            f"{report.failed} failed; {how}",
        )  # fmt: skip

    def _audit_expired(self, row: asyncpg.Record) -> None:
        self.gateway.audit(
            subject=f"ae:{row['ae_title']}", address=row["peer_address"], operation="N-EVENT-REPORT",
            action_code="E", status=PROCESSING_FAILURE, failed=True, started=time.perf_counter(),
            partition=row["partition_name"],
            detail=f"storage commitment {row['transaction_uid']}: not delivered in "
            f"{queue.EXPIRY.total_seconds() / 3600:g} h ({row['attempts']} attempts; "
            f"last: {row['last_error']}); dropped",
        )  # fmt: skip


def _report_state(assoc: Association) -> tuple[threading.Lock, itertools.count]:
    """The per-association lock (one report at a time) and Message ID counter."""
    with _locks:
        state = getattr(assoc, "archive_reports", None)
        if state is None:
            state = assoc.archive_reports = (threading.Lock(), itertools.count(1))  # type: ignore[attr-defined]
        return state


def _release_requested(assoc: Association) -> bool:
    pending = assoc.dul.peek_next_pdu()
    return isinstance(pending, A_RELEASE) and pending.result is None


def _on_same(assoc: Association, sop_class: str, instance: str, event_type: int, info: Dataset) -> int | None:
    lock, ids = _report_state(assoc)
    with lock:
        if not assoc.is_established or assoc.is_released or _release_requested(assoc):
            return None
        saved = assoc.dimse_timeout
        assoc.dimse_timeout = SAME_ASSOCIATION_TIMEOUT
        try:
            status, _ = assoc.send_n_event_report(
                info, event_type, sop_class, instance, msg_id=(next(ids) - 1) % 65535 + 1
            )
        except Exception as exc:  # the association ended between the check and the send
            log.info("N-EVENT-REPORT on the request's association failed: %s", exc)
            return None
        finally:
            assoc.dimse_timeout = saved
    return int(status.Status) if "Status" in status else None


def _target(registered: RegisteredAe | None, ae_title: str, address: str) -> scu.Peer:
    """Where to open the new association: the registered host and port (`address`, where the request came
    from, when the registration is a network or `*`)."""
    if registered is None:
        raise ValueError(f"AE {ae_title} is not registered")
    if registered.port is None:
        raise ValueError(f"AE {ae_title} has no registered port")
    host = registered.host
    if host == "*" or "/" in host:
        host = address  # a network registration: where the request came from
    try:
        parsed = ipaddress.ip_address(host)
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            host = str(parsed.ipv4_mapped)
    except ValueError:
        pass  # a host name
    return scu.Peer(registered.ae_title, host, registered.port)


def _on_new(
    calling: str, target: scu.Peer, sop_class: str, instance: str, event_type: int, info: Dataset
) -> int:
    assoc = scu.associate(calling, target, [(sop_class, UNCOMPRESSED)], roles=[sop_class], timeouts=TIMEOUTS)
    try:
        status, _ = assoc.send_n_event_report(info, event_type, sop_class, instance, msg_id=1)
    except Exception as exc:
        raise scu.PeerUnavailable(f"{target}: {exc}") from exc
    finally:
        scu.release(assoc)
    if "Status" not in status:
        raise scu.PeerUnavailable(f"{target} did not answer the N-EVENT-REPORT")
    return int(status.Status)
