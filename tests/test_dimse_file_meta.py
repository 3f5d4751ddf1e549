"""dimse/file_meta.py: the file meta group of a received object, laid out directly, is pydicom's."""

from __future__ import annotations

import io

import pynetdicom.dimse_messages
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import create_file_meta

from dimse import file_meta

UIDS = st.from_regex(r"[1-9][0-9]{0,5}(\.[0-9]{1,8}){0,7}", fullmatch=True)
# what a peer may put in a command set: UIDs, odd lengths, padding pydicom strips, non-ASCII garbage
PADDING = st.sampled_from(["", " ", "  ", "\x00", "\\", "\t"])
VALUES = (
    UIDS
    | st.tuples(PADDING, UIDS | st.just(""), PADDING).map("".join)
    | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=70)
    | st.text(max_size=8)
)


def _pydicoms(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    fp = io.BytesIO()
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)  # type: ignore[arg-type]
    write_file_meta_info(fp, meta)
    return fp.getvalue()


def _ours(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    fp = io.BytesIO()
    file_meta.write(fp, file_meta.create(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                         transfer_syntax=syntax))  # fmt: skip
    return fp.getvalue()


@settings(max_examples=300, deadline=None)
@given(VALUES, VALUES, UIDS)
def test_the_group_is_the_bytes_pydicom_writes(sop_class: str, sop_instance: str, syntax: str) -> None:
    """The same bytes, or the same refusal (pynetdicom aborts the association then)."""
    try:
        expected: bytes | type[Exception] = _pydicoms(sop_class, sop_instance, syntax)
    except Exception as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = _ours(sop_class, sop_instance, syntax)
    except Exception as exc:
        got = type(exc)
    assert got == expected


def test_a_standard_group_is_laid_out_directly() -> None:
    meta = file_meta.create(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4.5",
                            transfer_syntax="1.2.840.10008.1.2.1")  # fmt: skip
    data = file_meta.encode(meta)
    assert data is not None and data == _pydicoms(*meta)  # type: ignore[arg-type]
    assert file_meta.encode(meta._replace(sop_instance_uid="1.2.ä")) is None  # left to pydicom
    assert file_meta.encode(meta._replace(sop_instance_uid=None)) is None


def test_install_replaces_only_the_dimse_messages_names() -> None:
    file_meta.install()
    file_meta.install()
    assert pynetdicom.dimse_messages.create_file_meta is file_meta.create
    assert pynetdicom.dimse_messages.write_file_meta_info is file_meta.write
    assert pynetdicom.dsutils.create_file_meta is create_file_meta
