"""C-FIND pending responses (one per match) sent without pynetdicom's message objects.

pynetdicom turns each response primitive into a DIMSE message (a pydicom Dataset whose elements it sets one
by one, validating the UID each time), encodes its command set, and queues the command and the identifier
as two P-DATA PDUs, each then taken through the DUL's state machine and PDU encoder: ~0.14 ms of CPU before
the DUL has done anything, paid per match. A pending response's command set is always the same five
elements after its group length (PS3.7 Table 9.3-3: Affected SOP Class UID, Command Field, Message ID Being
Responded To, Command Data Set Type, Status), so `send_pending` lays them out directly and queues command
and identifier in one P-DATA-TF PDU of two PDVs, each a whole, last fragment (PS3.8 9.3.5 allows several
PDVs in a PDU; those of one message may share it). The bytes of each PDV are those pynetdicom sends.

Everything else goes through pynetdicom's `send_msg`: other messages, pending responses carrying anything
more (an Error Comment, an Offending Element), an identifier that would not fit the peer's maximum PDU
length together with its command, and associations where an EVT_DIMSE_SENT handler wants the message
object.
"""

from __future__ import annotations

import functools
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import P_DATA

from dimse.command_sets import encode_elements

PENDING = (0xFF00, 0xFF01)
C_FIND_RSP = 0x8020
DATA_SET_PRESENT = 0x0001  # Command Data Set Type: anything but 0x0101 (pynetdicom sends 0x0001)
_COMMAND = b"\x03"  # PDV message control header: command, last fragment
_DATA = b"\x02"  # data set, last fragment
_PDV_OVERHEAD = 6  # a PDV item's length (4 bytes), context ID and control header

_pynetdicom_send_msg = DIMSEServiceProvider.send_msg


def pending_pdvs(primitive: Any, context_id: int, max_pdu: int) -> list[tuple[int, bytes]] | None:
    """The two PDVs of a pending C-FIND response that fits one P-DATA-TF PDU of `max_pdu` bytes (0: no
    limit); None for anything `send_pending` leaves to pynetdicom."""
    if (
        type(primitive) is not C_FIND
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status not in PENDING
        or primitive.OffendingElement is not None
        or primitive.ErrorComment is not None
        or not isinstance(primitive.Identifier, BytesIO)
    ):
        return None
    identifier = primitive.Identifier.getvalue()
    if not identifier:
        return None
    sop_class = primitive.AffectedSOPClassUID
    command = _command_set(
        None if sop_class is None else str(sop_class), primitive.MessageIDBeingRespondedTo, primitive.Status
    )
    if command is None:
        return None
    if max_pdu and 2 * _PDV_OVERHEAD + len(command) + len(identifier) > max_pdu:
        return None
    return [(context_id, _COMMAND + command), (context_id, _DATA + identifier)]


@functools.lru_cache(maxsize=64)
def _command_set(sop_class: str | None, message_id: int, status: int) -> bytes | None:
    """A pending response's command set, with its group length; the same for every match of one C-FIND."""
    elements: list[tuple[int, str, object]] = []
    if sop_class is not None:
        elements.append((0x00000002, "UI", sop_class))
    elements += [
        (0x00000100, "US", C_FIND_RSP),
        (0x00000120, "US", message_id),
        (0x00000800, "US", DATA_SET_PRESENT),
        (0x00000900, "US", status),
    ]
    body = encode_elements(elements)
    if body is None:
        return None
    length = encode_elements([(0x00000000, "UL", len(body))])
    assert length is not None
    return length + body


def send_pending(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """`DIMSEServiceProvider.send_msg` with the fast path above."""
    pdvs = None
    if not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        pdvs = pending_pdvs(primitive, context_id, self.maximum_pdu_size)
    if pdvs is None:
        _pynetdicom_send_msg(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.extend(pdvs)  # as pynetdicom fills it (its setter wants lists)
    self.dul.send_pdu(pdata)


def install() -> None:
    """Send pending C-FIND responses with `send_pending` (idempotent)."""
    DIMSEServiceProvider.send_msg = send_pending  # type: ignore[method-assign]
