"""How quickly pynetdicom's association threads notice work while messages flow.

pynetdicom 3 runs two polling threads per association. The DUL thread sleeps 1 ms whenever a pass finds
nothing to do, so every message the archive queues (a C-STORE's status, each C-FIND match, each C-GET
sub-operation) waits for its next pass; the acceptor's reactor thread sleeps 1 ms before each look for a
received message. With one peer sending one C-STORE after the other that is up to 2 ms per message on top
of the work, and a C-FIND with 100 matches pays it 100 times.

`make_responsive(assoc)` changes both for one association, without touching the protocol code: its DUL
polls every 0.1 ms while traffic is recent and returns to 1 ms after `BUSY_WINDOW` of quiet (so an idle
association costs no more CPU than before), and its reactor waits on the received-message queue instead of
sleeping blind, waking as soon as a message is there (still at most 1 ms, for its release and abort checks).
"""

from __future__ import annotations

import threading
import time
import types
from typing import Any

import pynetdicom.association
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

BUSY_DELAY = 0.0001
IDLE_DELAY = 0.001  # pynetdicom's own
BUSY_WINDOW = 0.5  # seconds of quiet after which the DUL thread goes back to its idle pace
_REACTOR_SLEEP = 0.001  # the reactor's per-pass sleep in pynetdicom.association


class ResponsiveDUL(DULServiceProvider):
    """A DUL whose polling pause follows the traffic (see the module docstring)."""

    _last_activity = 0.0

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        return BUSY_DELAY if time.monotonic() - self._last_activity < BUSY_WINDOW else IDLE_DELAY

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        """pynetdicom's constructor assigns its fixed pause; the pace is this class's."""

    def _is_transport_event(self) -> bool:
        if super()._is_transport_event():
            self._last_activity = time.monotonic()
            return True
        return False

    def _process_recv_primitive(self) -> bool:
        if super()._process_recv_primitive():
            self._last_activity = time.monotonic()
            return True
        return False

    def send_pdu(self, primitive: Any) -> None:
        self._last_activity = time.monotonic()  # from the sending thread: the next passes come quickly
        super().send_pdu(primitive)


def _reactor_sleep(seconds: float) -> None:
    """`time.sleep` as pynetdicom.association sees it: the reactor pass of a responsive acceptor waits for
    a received message rather than a fixed millisecond; every other sleep is the real one."""
    thread = threading.current_thread()
    if (
        seconds == _REACTOR_SLEEP
        and isinstance(thread, Association)
        and isinstance(thread.dul, ResponsiveDUL)
        and thread.is_acceptor
    ):
        messages = thread.dimse.msg_queue
        with messages.not_empty:  # the queue's own condition: put() notifies it
            if not messages.queue:
                messages.not_empty.wait(seconds)
        return
    time.sleep(seconds)


def _install_reactor_clock() -> None:
    if getattr(pynetdicom.association.time, "sleep", None) is _reactor_sleep:
        return
    clock = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    clock.sleep = _reactor_sleep
    pynetdicom.association.time = clock  # type: ignore[attr-defined]


def make_responsive(assoc: Association) -> None:
    """Give `assoc` (acceptor or requestor, before or after it started) the traffic-following pace."""
    _install_reactor_clock()
    dul = assoc.dul
    if type(dul) is DULServiceProvider:
        dul._last_activity = time.monotonic()
        dul.__class__ = ResponsiveDUL
