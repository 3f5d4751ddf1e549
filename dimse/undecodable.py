"""A received message that cannot be decoded aborts its association cleanly.

pynetdicom decodes received messages in the association's DUL thread. An error it does not expect there (a
C-STORE request whose Affected SOP Instance UID is empty fails while the received object's file meta is
laid out, before pynetdicom's own check of the command) ended that thread with a traceback: the connection
closed without an A-ABORT, the association left no audit record, and the temporary file begun for the
object stayed behind. `install` wraps the decoding: on any error the partial message is dropped (its file
removed) and the DUL is given PS3.8's event for an invalid PDU (Evt19), whose action (AA-8) sends the peer
an A-ABORT and tells the association it was aborted, as pynetdicom does for the errors it expects.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider

log = logging.getLogger(__name__)

_pynetdicom_receive = DIMSEServiceProvider.receive_primitive


def receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    """pynetdicom's `receive_primitive`, aborting the association when the message cannot be decoded."""
    try:
        _pynetdicom_receive(self, primitive)
    except Exception as exc:
        peer = self.assoc.remote
        log.warning(
            "association with %s (%s) aborted: a message that cannot be decoded (%s: %s)",
            peer.get("ae_title"), peer.get("address"), exc.__class__.__name__, exc,
        )  # fmt: skip
        message, self.message = self.message, None
        spool = getattr(message, "_data_set_file", None)
        if spool is not None:
            with contextlib.suppress(OSError):
                spool.close()
                os.unlink(spool.name)
        self.dul.event_queue.put("Evt19")


def install() -> None:
    """Decode received messages through `receive_primitive` (idempotent)."""
    DIMSEServiceProvider.receive_primitive = receive_primitive  # type: ignore[method-assign]
