"""How quickly pynetdicom's association threads notice work while messages flow.

pynetdicom 3 runs two polling threads per association. The DUL thread sleeps 1 ms whenever a pass finds
nothing to do, so every PDU the peer sends and every message the archive queues (a C-STORE's status, each
C-FIND match, each C-GET sub-operation) waits for its next pass; the acceptor's reactor thread sleeps 1 ms
before each look for a received message. With one peer sending one C-STORE after the other that is up to
2 ms per message on top of the work, and a C-FIND with 100 matches pays it 100 times.

`make_responsive(assoc)` changes both for one association, without touching the protocol code. Its DUL's
pause becomes a wait on the socket and on a wake-up pipe that queuing a PDU (or stopping the DUL) writes
to: a pass starts as soon as there is something to read or to send, and otherwise after pynetdicom's own
1 ms. Its reactor waits on the received-message queue instead of sleeping blind, waking as soon as a message
is there (still at most 1 ms, for its release and abort checks). Neither thread makes more passes than
pynetdicom's when idle, and a busy association no longer spins through passes that find nothing (an
earlier version polled every 0.1 ms while traffic flowed), which took the interpreter's lock from the
event loop and the other associations.
"""

from __future__ import annotations

import os
import select
import threading
import time
import types
import weakref
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

IDLE_DELAY = 0.001  # pynetdicom's own pause: the longest a DUL pass waits when nothing happens
_REACTOR_SLEEP = 0.001  # the reactor's per-pass sleep in pynetdicom.association


class _WakePipe:
    """A pipe whose read end a DUL waits on; closed once, after which waking it does nothing (its file
    descriptor numbers may be reused by then, so nothing may write to them)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self._lock = threading.Lock()

    def wake(self) -> None:
        with self._lock:
            if self.w >= 0:
                try:
                    os.write(self.w, b"\0")
                except OSError:  # full: the reader wakes anyway
                    pass

    def drain(self) -> None:
        with self._lock:
            if self.r >= 0:
                try:
                    os.read(self.r, 4096)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            fds, self.r, self.w = (self.r, self.w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class ResponsiveDUL(DULServiceProvider):
    """A DUL whose pause ends when the peer sends or the local side queues (see the module docstring)."""

    _wake_pipe: _WakePipe
    # set while the thread pauses: everything queued is sent, and what the peer had sent is read
    _idle: threading.Event

    def run(self) -> None:
        """The thread's body when the DUL became responsive before it started (an accepted association):
        its pipe closes as the thread ends. A requestor's closes when the DUL is collected."""
        try:
            super().run()
        finally:
            self._idle.set()  # nothing more will be sent: nobody waits for it
            self._wake_pipe.close()

    def _pause(self) -> None:
        """The DUL thread's idle pause: until the socket is readable, a PDU is queued, or IDLE_DELAY.

        pynetdicom pauses only after a pass that had nothing to send and read nothing, which is what
        `wait_until_idle` waits for; but a PDU queued after that pass looked is still unsent, so the
        pause says idle only if the queue is empty once the flag is up (send_pdu queues, then clears it)."""
        self._idle.set()
        if not self.to_provider_queue.empty():
            self._idle.clear()
            return
        pipe = self._wake_pipe
        waits: list[Any] = [pipe.r] if pipe.r >= 0 else []
        sock = getattr(self.socket, "socket", None)
        try:
            if sock is not None and sock.fileno() >= 0:
                waits.append(sock)
            if not waits:
                time.sleep(IDLE_DELAY)
                return
            ready, _, _ = select.select(waits, [], [], IDLE_DELAY)
        except (OSError, ValueError):  # the socket closed under us: the next pass sees it
            return
        if pipe.r in ready:
            pipe.drain()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        # after the PDU is queued: a pause that began before this looked at the queue either saw the PDU
        # or has set the flag before this clears it (see _pause)
        self._idle.clear()
        self._wake_pipe.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake_pipe.wake()


def wait_until_idle(assoc: Association, timeout: float) -> bool:
    """Wait until the association's DUL thread has sent everything queued and then looked for what the
    peer sent (a C-CANCEL, say): True then; False on timeout, or for a DUL that is not responsive (the
    caller paces itself)."""
    dul = assoc.dul
    return isinstance(dul, ResponsiveDUL) and dul._idle.wait(timeout)


def _dul_sleep(seconds: float) -> None:
    """`time.sleep` as pynetdicom.dul sees it: a responsive DUL's pass pause is its `_pause`; every other
    sleep is the real one."""
    thread = threading.current_thread()
    if isinstance(thread, ResponsiveDUL):
        thread._pause()
        return
    time.sleep(seconds)


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


def _clock(sleep: Any) -> types.SimpleNamespace:
    """The `time` module as one pynetdicom module sees it, with its own `sleep`."""
    clock = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    clock.sleep = sleep
    return clock


def _install_clocks() -> None:
    if getattr(pynetdicom.association.time, "sleep", None) is not _reactor_sleep:
        pynetdicom.association.time = _clock(_reactor_sleep)  # type: ignore[attr-defined]
    if getattr(pynetdicom.dul.time, "sleep", None) is not _dul_sleep:
        pynetdicom.dul.time = _clock(_dul_sleep)  # type: ignore[attr-defined]


def make_responsive(assoc: Association) -> None:
    """Give `assoc` (acceptor or requestor, before or after it started) the responsive pace."""
    _install_clocks()
    dul = assoc.dul
    if type(dul) is DULServiceProvider:
        pipe = _WakePipe()
        dul._wake_pipe = pipe  # type: ignore[attr-defined]
        dul._idle = threading.Event()  # type: ignore[attr-defined]
        weakref.finalize(dul, pipe.close)
        dul.__class__ = ResponsiveDUL
