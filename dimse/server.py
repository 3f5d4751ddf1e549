"""The DIMSE listener: a pynetdicom acceptor inside each `dicomweb serve` process.

Every server process listens on the same port (SO_REUSEPORT: the kernel spreads new associations over the
processes), so several workers or nodes need nothing else; an association lives in the process that
accepted it. pynetdicom runs associations in threads; handlers hand their work to the process's event loop
through `Gateway.run` (dimse/gateway.py).

Associations are accepted only from registered AEs (dimse/aes.py) connecting from their registered host,
and only when they call the archive by its AE title; the rejection is the standard A-ASSOCIATE-RJ
(permanent, "calling AE title not recognised" / "called AE title not recognised").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from dimse import command_sets, file_meta, pending_responses, raw_identifiers, services, undecodable
from dimse.aes import get_ae, host_matches
from dimse.commitment_delivery import CommitmentReports
from dimse.gateway import Gateway, Peer, open_peer
from dimse.pacing import make_responsive

log = logging.getLogger(__name__)
# pynetdicom logs every association and DIMSE message at INFO, which the CLI's root logger would print: about
# 10% of a C-STORE's time, and said again by the audit record of each association and operation
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# Received data sets go to a temporary file as their fragments arrive, so an association never holds more
# than one PDU of a large object in memory (pynetdicom's chunked receive); ingest reads that file.
_config.STORE_RECV_CHUNKED_DATASET = True
# Data sets sent (C-GET, C-MOVE, $send) are read from our own files without decoding them.
_config.STORE_SEND_CHUNKED_DATASET = True
# Received identifiers are checked by the archive's own rules (with a clear status), not by pynetdicom's
# logging of every non-conformant value.
_config.LOG_HANDLER_LEVEL = "none"
# pynetdicom formats every request and pending response identifier for a DEBUG log nobody reads (the
# formatting runs even when the level is off): a C-FIND paid it per match.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# C-FIND matches built already encoded go out as they are (dimse.raw_identifiers), and command sets are
# laid out without pydicom's writer (dimse.command_sets)
raw_identifiers.install()
command_sets.install()
pending_responses.install()  # each C-FIND match in one PDU, without pynetdicom's message objects
file_meta.install()  # received objects' file meta laid out directly (dimse.file_meta)
undecodable.install()  # a message that cannot be decoded aborts its association cleanly

# Rejection reasons of A-ASSOCIATE-RJ (PS3.8 Table 9-21): result 1 (permanent), source 1 (service user)
_CALLING_NOT_RECOGNISED = "calling"


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with SO_REUSEPORT so every worker process listens on one port."""

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection with Nagle off and immediate ACKs.

        Many SCUs (DCMTK's storescu as Debian builds it, pynetdicom) keep Nagle's algorithm on and write a
        C-STORE request as several segments: each later segment then waits for the ACK of the first, which
        a receiver with delayed ACKs holds back for up to 40 ms. Measured: storescu sent 17 instances/s with
        delayed ACKs (docs/performance.md, "DIMSE")."""
        client, address = super().get_request()
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_QUICKACK") and type(client) is socket.socket:
            timeout = client.gettimeout()
            client = _QuickAckSocket(client.family, client.type, client.proto, fileno=client.detach())
            client.settimeout(timeout)
        return client, address


class _QuickAckSocket(socket.socket):
    """A socket that asks for an immediate ACK after every read: Linux clears TCP_QUICKACK by itself, so
    it is set again each time (one cheap setsockopt next to a 4 KiB recv)."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


class _ArchiveAE(AE):
    """An AE whose list of accepted calling AE titles is decided per association, from the registry.

    pynetdicom checks `require_calling_aet` while negotiating, in the association's own thread; answering
    there, from the registry and the peer's address, gives the standard rejection with no change to its
    state machine. Outside a negotiation the list is empty (no restriction), which is also what
    --insecure-open gets.
    """

    gateway: Gateway

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not isinstance(assoc, Association) or not assoc.is_acceptor:
            return []
        title = assoc.requestor.ae_title.strip(" ") or "?"
        address, port = assoc.requestor.address, assoc.requestor.port
        gateway = self.gateway
        if gateway.insecure_open:
            assoc.archive_peer = open_peer(title, address, port, gateway.default_partition)  # type: ignore[attr-defined]
            return []
        try:
            registered = gateway.run(get_ae(gateway.pool, title), timeout=30)
        except Exception as exc:
            log.warning("association from %s (%s) refused: registry lookup failed: %s", title, address, exc)
            registered = None
        if registered is not None and host_matches(registered.host, address):
            assoc.archive_peer = Peer(registered, address, port)  # type: ignore[attr-defined]
            return [title]
        assoc.archive_refusal = (  # type: ignore[attr-defined]
            f"calling AE {title!r} is not registered"
            if registered is None
            else f"calling AE {title!r} may not connect from {address} (registered host {registered.host})"
        )
        return ["\\"]  # a title nobody can send: pynetdicom rejects, reason "calling AE not recognised"

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:  # AE.__init__ assigns it
        pass


def _called_title(request: Any) -> str | None:
    """The AE title the peer called, from its A-ASSOCIATE-RQ (the acceptor's own primitive is the
    rejection, whose called title is pynetdicom's placeholder 'DEFAULT')."""
    called = getattr(request, "called_ae_title", None)
    return None if called is None else str(called).strip(" ")


class DimseServer:
    """The listener of one process; started and stopped by the app's lifespan."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = _ArchiveAE(ae_title=gateway.ae_title)
        self.ae.gateway = gateway
        self.ae.require_called_aet = True
        # generous limits: a modality may hold an association open while it acquires
        self.ae.maximum_associations = 64
        self.ae.network_timeout = 120
        self.ae.acse_timeout = 60
        self.ae.dimse_timeout = 600
        self.ae.maximum_pdu_size = 0  # no limit on what peers send us in one PDU
        handlers = services.register(self.ae, gateway)
        gateway.commitments = CommitmentReports(gateway)  # owed reports, from PostgreSQL
        self._handlers: list[tuple[Any, ...]] = [*handlers, *self._association_handlers()]

    def _association_handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        gateway = self.gateway

        def record(event: evt.Event, what: str, status: int, failed: bool, detail: str | None = None) -> None:
            assoc = event.assoc
            peer: Peer | None = getattr(assoc, "archive_peer", None)
            title = assoc.requestor.ae_title.strip(" ") or "?"
            gateway.audit(
                subject=peer.subject if peer else f"ae:{title}",
                address=assoc.requestor.address,
                operation=what,
                action_code="E",
                status=status,
                failed=failed,
                started=getattr(assoc, "archive_started", time.perf_counter()),
                partition=peer.ae.partition if peer else None,
                detail=detail,
                called=_called_title(assoc.requestor.primitive) if what == "A-ASSOCIATE-RJ" else None,
            )

        def accepted(event: evt.Event) -> None:
            event.assoc.archive_started = time.perf_counter()
            record(event, "A-ASSOCIATE", 0, False)

        def rejected(event: evt.Event) -> None:
            assoc = event.assoc
            called = _called_title(assoc.requestor.primitive)
            detail = getattr(assoc, "archive_refusal", None) or (
                f"called AE title {called!r} is not {gateway.ae_title!r}"
                if called is not None and called != gateway.ae_title
                else "association rejected"
            )
            log.info("association from %s rejected: %s", assoc.requestor.address, detail)
            record(event, "A-ASSOCIATE-RJ", 1, True, detail)

        def released(event: evt.Event) -> None:
            record(event, "A-RELEASE", 0, False)

        def aborted(event: evt.Event) -> None:
            record(event, "A-ABORT", 0, True, "association aborted")

        return [
            (evt.EVT_CONN_OPEN, lambda event: make_responsive(event.assoc)),  # dimse/pacing.py
            (evt.EVT_ACCEPTED, accepted),
            (evt.EVT_REJECTED, rejected),
            (evt.EVT_RELEASED, released),
            (evt.EVT_ABORTED, aborted),
        ]

    async def start(self) -> None:
        server = self.ae.make_server(
            (self.host, self.port), evt_handlers=self._handlers, server_class=_ReusePortServer
        )
        self._server = server
        self.ae._servers.append(server)  # server.shutdown() removes it from there
        self._thread = threading.Thread(target=server.serve_forever, name="dimse-listener", daemon=True)
        self._thread.start()
        self.gateway.commitment_reports().start()
        self.port = server.server_address[1]
        log.info("DIMSE listener on %s:%s as AE %s", self.host, self.port, self.gateway.ae_title)

    async def stop(self) -> None:
        """Stop accepting, then end the associations in progress (their handlers' work stays atomic)."""
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        await self.gateway.commitment_reports().stop()  # reports being sent end first
        for assoc in list(self.ae.active_associations):
            assoc.abort()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
