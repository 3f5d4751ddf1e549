"""dimse/pacing.py: association threads wake when there is something to read or send, and clean up after."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator

import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from bench.common import free_port
from dimse import pacing
from dimse.pacing import ResponsiveDUL, make_responsive
from dimse.scu import keep_reactor_off_queue

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


def _caller(port: int) -> Association:
    """An established requestor association to the echo server, its reactor kept off the message queue as
    dimse.scu's are (pynetdicom's reactor may otherwise take a fast response meant for the sender)."""
    requestor = AE(ae_title="CALLER")
    requestor.add_requested_context(VERIFICATION)
    assoc = requestor.associate("127.0.0.1", port, ae_title="PACED")
    assert assoc.is_established
    keep_reactor_off_queue(assoc)
    return assoc


def test_responsive_associations_work_and_close_their_pipes(
    echo_server: tuple[ThreadedAssociationServer, int],
) -> None:
    server, port = echo_server
    assoc = _caller(port)
    make_responsive(assoc)  # the requestor side too, after it started, as dimse.scu does
    assert isinstance(assoc.dul, ResponsiveDUL)
    (accepted,) = server.active_associations
    dul = accepted.dul
    assert isinstance(dul, ResponsiveDUL)
    pipe = dul._wake_pipe
    assert pipe.r >= 0 and pipe.w >= 0
    for _ in range(50):
        assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    dul.join(10)  # the accepted association's DUL thread ends, and closes its pipe as it does
    assert not dul.is_alive()
    assert (pipe.r, pipe.w) == (-1, -1)
    pipe.wake()  # a late wake-up writes nowhere: the numbers may belong to someone else by now


def test_the_pause_ends_on_a_wake_up_or_on_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the idle pause made long, the pause still ends as soon as a PDU is queued or data arrives."""
    monkeypatch.setattr(pacing, "IDLE_DELAY", 5.0)
    dul = ResponsiveDUL.__new__(ResponsiveDUL)  # the pause needs only its pipe, queue and socket
    dul._wake_pipe = pacing._WakePipe()
    dul._idle = threading.Event()
    dul.to_provider_queue = queue.Queue()
    ours, theirs = socket.socketpair()
    dul.socket = type("Sock", (), {"socket": ours})()  # as pynetdicom's AssociationSocket holds it
    try:
        for trigger in (dul._wake_pipe.wake, lambda: theirs.send(b"x")):
            timer = threading.Timer(0.05, trigger)
            began = time.monotonic()
            timer.start()
            dul._pause()
            assert time.monotonic() - began < 2.5
            timer.join()
            assert dul._idle.is_set()  # a pause says the DUL had nothing left to send
        ours.recv(1)
        dul._wake_pipe.close()  # without a pipe or a socket it is a plain short sleep
        dul.socket = None
        began = time.monotonic()
        monkeypatch.setattr(pacing, "IDLE_DELAY", 0.01)
        dul._pause()
        assert time.monotonic() - began < 2.5
    finally:
        ours.close()
        theirs.close()
        dul._wake_pipe.close()


def test_a_pause_with_a_pdu_queued_is_not_idle() -> None:
    """A PDU queued after the DUL's last pass looked at its queue is still to be sent: the pause that
    follows that pass ends at once and does not say idle. It did, so a C-FIND handler waiting for the
    wire (dimse/find.py) could make its next matches before the last ones went out."""
    dul = ResponsiveDUL.__new__(ResponsiveDUL)
    dul._wake_pipe = pacing._WakePipe()
    dul._idle = threading.Event()
    dul.to_provider_queue = queue.Queue()
    dul.socket = None
    try:
        dul.to_provider_queue.put("P-DATA")
        began = time.monotonic()
        dul._pause()
        assert time.monotonic() - began < 0.5 and not dul._idle.is_set()
        dul.to_provider_queue.get()
        dul._pause()  # nothing queued: idle
        assert dul._idle.is_set()
    finally:
        dul._wake_pipe.close()


def test_the_clocks_change_only_the_paces_sleeps() -> None:
    pacing._install_clocks()  # what make_responsive does first
    pacing._install_clocks()  # once is enough: a second call changes nothing
    paces = ((pynetdicom.association, pacing._reactor_sleep), (pynetdicom.dul, pacing._dul_sleep))
    for module, sleep in paces:
        clock = module.time
        assert clock.sleep is sleep
        assert clock.monotonic is time.monotonic
        assert clock.perf_counter is time.perf_counter
    began = time.monotonic()
    pacing._reactor_sleep(0.02)  # any other thread, any other duration: the real sleep
    pacing._dul_sleep(0.02)
    assert time.monotonic() - began >= 0.04


def test_a_pipe_closes_once() -> None:
    pipe = pacing._WakePipe()
    pipe.wake()
    pipe.drain()
    pipe.close()
    assert (pipe.r, pipe.w) == (-1, -1)
    pipe.close()  # a second close (the finalizer after the thread's end) closes nothing
    pipe.wake()
    pipe.drain()


def test_waiting_until_the_dul_has_sent_everything(
    echo_server: tuple[ThreadedAssociationServer, int],
) -> None:
    """wait_until_idle returns once the DUL paused after the last queued PDU; False for other DULs."""
    server, port = echo_server
    assoc = _caller(port)
    try:
        assert not pacing.wait_until_idle(assoc, 0.01)  # pynetdicom's own DUL: the caller paces itself
        (accepted,) = server.active_associations
        dul = accepted.dul
        assert pacing.wait_until_idle(accepted, 5)
        dul._idle.clear()  # as send_pdu does; nothing is queued, so the next pause sets it again
        dul._wake_pipe.wake()
        assert pacing.wait_until_idle(accepted, 5)
        for _ in range(5):
            assert assoc.send_c_echo().Status == 0x0000
            assert pacing.wait_until_idle(accepted, 5)
    finally:
        assoc.release()
    dul.join(10)
    assert pacing.wait_until_idle(accepted, 0.01)  # an ended DUL sends nothing more: nobody waits
