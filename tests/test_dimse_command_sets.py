"""dimse/command_sets.py: command sets laid out directly are the bytes pydicom's writer produces."""

from __future__ import annotations

import pynetdicom.dimse_messages
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_FIND_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import encode as pydicom_encode

from dimse import command_sets

# every command element the dictionary knows (group 0000), with its VR and VM
COMMAND_ELEMENTS = sorted(
    (tag, entry[0], entry[1]) for tag, entry in DicomDictionary.items() if tag >> 16 == 0
)
_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), max_size=16
)


def _value(vr: str, vm: str) -> st.SearchStrategy[object]:
    """Values an element of this VR may hold in a command set; some that only pydicom should write."""
    if vr in ("US", "UL"):
        top = 0xFFFF if vr == "US" else 0xFFFFFFFF
        one = st.integers(0, top)
        if vm != "1":
            return st.lists(one, min_size=1, max_size=4)
        return one | st.integers(top + 1, top + 10)  # out of range: left to pydicom, which refuses it
    if vr == "UI":
        return st.from_regex(r"[1-9][0-9]{0,5}(\.[0-9]{1,6}){0,6}", fullmatch=True)
    if vr in ("AE", "CS", "SH", "LO", "LT"):
        return _TEXT | st.just("") | st.text(min_size=1, max_size=4)  # non-ASCII: left to pydicom
    return st.none()  # AT, IS: left to pydicom


@st.composite
def command_set(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    for tag, vr, vm in draw(st.lists(st.sampled_from(COMMAND_ELEMENTS), max_size=10, unique=True)):
        value = draw(_value(vr, vm))
        if value is None:
            value = [0x00100010] if vr == "AT" else "1"
        ds.add_new(tag, vr, value)
    return ds


@settings(max_examples=300, deadline=None)
@given(command_set())
def test_direct_encoding_equals_pydicoms(ds: Dataset) -> None:
    direct = command_sets.encode(ds)
    expected = pydicom_encode(ds, True, True)
    if direct is not None:  # what it encodes, it encodes as pydicom does
        assert direct == expected
    else:  # what it declines, pynetdicom's encoder still gets
        assert command_sets._encode(ds, True, True) == expected
    assert command_sets._encode(ds, True, True) == expected


def test_the_messages_pynetdicom_builds_are_encoded_directly() -> None:
    find = C_FIND()
    find.MessageIDBeingRespondedTo, find.Status = 7, 0xFF00
    find.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    store = C_STORE()
    store.MessageID, store.Priority = 3, 0
    store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    store.MoveOriginatorApplicationEntityTitle, store.MoveOriginatorMessageID = "ORTHANC", 5
    for message, primitive in ((C_FIND_RSP(), find), (C_STORE_RQ(), store)):
        message.primitive_to_message(primitive)
        direct = command_sets.encode(message.command_set)
        assert direct is not None and direct == pydicom_encode(message.command_set, True, True)


def test_install_routes_only_the_dimse_messages_encoder() -> None:
    command_sets.install()
    command_sets.install()
    assert pynetdicom.dimse_messages.encode is command_sets._encode
    ds = Dataset()
    ds.PatientName = "Name^Only"  # not a command element, explicit VR: pydicom's encoder
    assert command_sets._encode(ds, False, True) == pydicom_encode(ds, False, True)
