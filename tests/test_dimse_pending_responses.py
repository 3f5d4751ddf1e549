"""dimse/pending_responses.py: a pending C-FIND response goes out as the PDVs pynetdicom sends, in one PDU."""

from __future__ import annotations

import types
from io import BytesIO
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dimse import command_sets, pending_responses

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _provider(max_pdu: int, sent: list[P_DATA], handlers: list[Any] | None = None) -> DIMSEServiceProvider:
    """A DIMSE provider on an acceptor association whose peer takes PDUs of `max_pdu` bytes (0: any)."""
    assoc = types.SimpleNamespace(
        dul=types.SimpleNamespace(send_pdu=sent.append),
        is_requestor=False,
        requestor=types.SimpleNamespace(maximum_length=max_pdu),
        get_handlers=lambda event: handlers or [],
    )
    return DIMSEServiceProvider(assoc)  # type: ignore[arg-type]


def _pynetdicom_pdvs(primitive: Any, max_pdu: int) -> list[tuple[int, bytes]]:
    command_sets.install()  # the server's command set encoder, as in dimse/server.py
    sent: list[P_DATA] = []
    pending_responses._pynetdicom_send_msg(_provider(max_pdu, sent), primitive, 5)
    return [pdv for pdata in sent for pdv in pdata.presentation_data_value_list]


def _response(message_id: int, status: int, identifier: bytes, sop_class: str | None) -> C_FIND:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo, rsp.Status = message_id, status
    rsp.AffectedSOPClassUID = sop_class
    rsp.Identifier = BytesIO(identifier)
    return rsp


@settings(max_examples=400, deadline=None)
@given(
    message_id=st.integers(0, 0xFFFF),
    status=st.sampled_from([0xFF00, 0xFF01]),
    identifier=st.binary(min_size=1, max_size=600),
    sop_class=st.none() | st.from_regex(r"[1-9][0-9]{0,5}(\.[0-9]{1,6}){0,8}", fullmatch=True),
    max_pdu=st.sampled_from([0, 16384, 256, 160, 64]),
)
def test_one_pdu_holds_the_pdvs_pynetdicom_sends(
    message_id: int, status: int, identifier: bytes, sop_class: str | None, max_pdu: int
) -> None:
    sent: list[P_DATA] = []
    pending_responses.send_pending(_provider(max_pdu, sent), _response(message_id, status, identifier,
                                                                       sop_class), 5)  # fmt: skip
    expected = _pynetdicom_pdvs(_response(message_id, status, identifier, sop_class), max_pdu)
    assert [pdv for pdata in sent for pdv in pdata.presentation_data_value_list] == expected
    fits = max_pdu == 0 or sum(6 + len(data) - 1 for _, data in expected) <= max_pdu
    assert len(sent) == (1 if fits else len(expected))  # one PDU when both fit, else pynetdicom's own


def test_other_messages_go_through_pynetdicom() -> None:
    final = _response(3, 0x0000, b"", STUDY_ROOT_FIND)
    final.Identifier = None
    failure = _response(3, 0xA900, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", STUDY_ROOT_FIND)
    commented = _response(3, 0xFF00, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", STUDY_ROOT_FIND)
    commented.ErrorComment = "partial"
    store = C_STORE()
    store.MessageIDBeingRespondedTo, store.Status = 4, 0x0000
    store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
    for primitive in (final, failure, commented, store):
        assert pending_responses.pending_pdvs(primitive, 5, 0) is None


def test_a_bound_sent_handler_gets_pynetdicoms_message() -> None:
    seen: list[Any] = []
    sent: list[P_DATA] = []
    provider = _provider(0, sent, handlers=[(lambda event: seen.append(event.message), None)])
    provider.assoc._abort_nonblocking = provider.assoc._abort_blocking = None  # type: ignore[union-attr]
    identifier = b"\x10\x00\x10\x00\x02\x00\x00\x00A "
    pending_responses.send_pending(provider, _response(1, 0xFF00, identifier, None), 1)
    assert len(seen) == 1 and len(sent) == 2  # pynetdicom's path: the event, then command and identifier


def test_install_replaces_send_msg_once() -> None:
    pending_responses.install()
    pending_responses.install()
    assert DIMSEServiceProvider.send_msg is pending_responses.send_pending
