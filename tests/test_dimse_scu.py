"""The archive's own associations (dimse/scu.py) when the peer goes away under them."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt

from bench.common import free_port
from dimse import scu

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def peer() -> Iterator[scu.Peer]:
    ae = AE(ae_title="PEER")
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, _vanish)])  # fmt: skip
    try:
        yield scu.Peer("PEER", "127.0.0.1", port)
    finally:
        server.shutdown()


def _vanish(event: evt.Event) -> int:
    """The peer's end closes instead of answering, as when its process is killed mid-request."""
    event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    return 0x0000


def test_release_returns_at_once_when_the_peer_is_gone(peer: scu.Peer) -> None:
    """A release that starts as the peer's connection closes ends with it, not after the ACSE timeout.

    pynetdicom's reactor takes the closed connection's A-P-ABORT off the queue; a release begun just before
    it did (the association still looked established) then waited the whole ACSE timeout for an answer
    nobody would send. An acquisition whose source died just after it listed a study stalled 30 s there
    (tests/test_dimse_acquire.py::test_source_lost_mid_acquisition_is_retried, 2 runs in 6)."""
    timeouts = scu.Timeouts(acse=20, dimse=20, network=20, connect=5)
    for _ in range(20):
        assoc = scu.associate("CALLER", peer, [(VERIFICATION, scu.UNCOMPRESSED)], timeouts=timeouts)
        started = time.monotonic()
        assert "Status" not in assoc.send_c_echo()  # woken by the closed connection: no response
        scu.release(assoc)  # at once, as dimse/acquire.py's listing does in its `finally`
        assert time.monotonic() - started < 5
        assert not assoc.is_established
