"""dimse/pacing.py: associations poll quickly while messages flow and at pynetdicom's pace when idle."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pynetdicom.association
import pytest
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from bench.common import free_port
from dimse import pacing
from dimse.pacing import BUSY_DELAY, IDLE_DELAY, ResponsiveDUL, make_responsive

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def echo_server() -> Iterator[tuple[ThreadedAssociationServer, int]]:
    ae = AE(ae_title="PACED")
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: make_responsive(event.assoc))],
    )
    try:
        yield server, port
    finally:
        server.shutdown()


def test_an_accepted_association_keeps_pace_with_its_traffic(
    echo_server: tuple[ThreadedAssociationServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, port = echo_server
    monkeypatch.setattr(pacing, "BUSY_WINDOW", 0.2)
    requestor = AE(ae_title="CALLER")
    requestor.add_requested_context(VERIFICATION)
    assoc = requestor.associate("127.0.0.1", port, ae_title="PACED")
    assert assoc.is_established
    try:
        make_responsive(assoc)  # the requestor side too, as dimse.scu does
        assert isinstance(assoc.dul, ResponsiveDUL)
        (accepted,) = server.active_associations
        dul = accepted.dul
        assert isinstance(dul, ResponsiveDUL)
        assert assoc.send_c_echo().Status == 0x0000
        assert dul._run_loop_delay == BUSY_DELAY
        time.sleep(0.3)  # quiet for longer than the window: back to pynetdicom's own pause
        assert dul._run_loop_delay == IDLE_DELAY
        assert assoc.dul._run_loop_delay == IDLE_DELAY
        dul._run_loop_delay = 0.5  # pynetdicom's assignment is ignored: the pace is the traffic's
        assert dul._run_loop_delay == IDLE_DELAY
        for _ in range(20):  # and the association still works after idling
            assert assoc.send_c_echo().Status == 0x0000
        assert dul._run_loop_delay == BUSY_DELAY
    finally:
        assoc.release()
    assert assoc.is_released


def test_the_reactor_clock_changes_only_the_reactors_sleep() -> None:
    pacing._install_reactor_clock()  # what make_responsive does first
    pacing._install_reactor_clock()  # once is enough: a second call changes nothing
    clock = pynetdicom.association.time
    assert clock.sleep is pacing._reactor_sleep
    assert clock.monotonic is time.monotonic
    assert clock.perf_counter is time.perf_counter
    began = time.monotonic()
    pacing._reactor_sleep(0.02)  # any other thread, any other duration: the real sleep
    assert time.monotonic() - began >= 0.02
