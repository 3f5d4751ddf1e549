"""Framing a PS3.10 object's elements straight from its bytes: pydicom's dcmread result, several times faster.

pydicom's reader frames elements with one or two fp.read calls, a generator step and several Python-level
checks per element; for a typical CT header that is most of the cost of parsing an upload or a source
instance for de-identification. `read_file` frames the elements with struct.unpack_from over an in-memory
buffer (chunks of the file for file objects, seeking over deferred values: a large object is never read
whole) and builds exactly what `pydicom.dcmread(fp, defer_size=...)` builds: a FileDataset whose `_dict`
holds the same RawDataElements (tag, VR, length, value or None when deferred, value_tell, encoding), the
same file meta and preamble, and for undefined-length sequences the same DataElement of item Datasets.

Anything unusual - deflated or private transfer syntaxes, a missing file meta or transfer syntax, command
set elements, VRs that are not standard explicit VRs (pydicom's implicit-VR-switch heuristics), delimiters
out of place, undefined-length values that are not encapsulated item lists - is handed to pydicom.dcmread
unchanged, so those answers are pydicom's own. One deliberate difference: an object that ends inside an
element (a truncated upload) raises TruncatedError, where pydicom returns the elements it could read, some
cut short, and leaves the caller to notice.
"""

from __future__ import annotations

import io
import os
from collections.abc import MutableSequence
from struct import Struct
from typing import BinaryIO

import pydicom
from pydicom import config as _config
from pydicom import hooks as _hooks
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import DicomDictionary as _DicomDictionary
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

UNDEFINED_LENGTH = 0xFFFFFFFF
CHUNK = 256 * 1024  # bytes read at a time from file objects (a CT header fits in one)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET = 0x00080005
# explicit VR bytes -> (VR, whether a 2-byte reserved field and a 4-byte length follow); PS3.5 7.1.2
_EXPLICIT: dict[bytes, tuple[str, bool]] = {
    **{vr.value.encode(): (vr.value, False) for vr in EXPLICIT_VR_LENGTH_16},
    **{vr.value.encode(): (vr.value, True) for vr in EXPLICIT_VR_LENGTH_32},
}
_IMPLICIT_HEADER = {True: Struct("<HHL"), False: Struct(">HHL")}
_EXPLICIT_HEADER = {True: Struct("<HH2sH"), False: Struct(">HH2sH")}
_LENGTH32 = {True: Struct("<L"), False: Struct(">L")}
_TAG = {True: Struct("<HH"), False: Struct(">HH")}


class TruncatedError(EOFError):
    """The object ends inside an element: it was cut short (the message says where)."""


class _Unsupported(Exception):
    """Something only pydicom's reader interprets the way pydicom does: let it read the object."""


def read_file(source: BinaryIO | bytes | bytearray | memoryview, defer_size: int | None) -> FileDataset:
    """`pydicom.dcmread(source, defer_size=defer_size)`, framed here when the object is plain (see above).

    A bytes-like source is read through an io.BytesIO, which the result keeps for reading deferred values.
    Raises what dcmread raises, and TruncatedError for an object that ends inside an element.
    """
    fp: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    start = fp.tell()
    try:
        return _Reader(fp, start).read(start, defer_size)
    except _Unsupported:
        fp.seek(start)
        return pydicom.dcmread(fp, defer_size=defer_size)


# Datasets are built from a template of a fresh instance's attributes: Dataset.__init__ sets a dozen
# attributes through Dataset.__setattr__ (Python code): ~15 µs a dataset, a tenth of framing a CT header.
# tests/test_framing.py compares every attribute with pydicom's, so a pydicom change that adds one shows.
_TEMPLATES = {cls: cls().__dict__ for cls in (Dataset, FileMetaDataset)}
_MUTABLE = {
    cls: [k for k, v in t.items() if isinstance(v, (dict, list, set))] for cls, t in _TEMPLATES.items()
}


def _from_template(ds: Dataset, cls: type[Dataset], elements: dict) -> dict:
    """The fresh instance attributes of `cls` (mutable ones copied) with `elements`, set on `ds`."""
    attributes = ds.__dict__
    template = _TEMPLATES[cls]
    attributes.update(template)
    for name in _MUTABLE[cls]:
        attributes[name] = template[name].copy()
    attributes["_dict"] = elements
    return attributes


def _new(
    cls: type[Dataset],
    elements: dict,
    parent_encoding: str | MutableSequence[str],
    implicit: bool,
    little: bool,
    encoding: str | MutableSequence[str],
) -> Dataset:
    """`cls(elements, parent_encoding=...)` followed by set_original_encoding(implicit, little, encoding)."""
    ds = cls.__new__(cls)
    attributes = _from_template(ds, cls, elements)
    attributes["_parent_encoding"] = parent_encoding
    attributes["_read_implicit"] = implicit
    attributes["_read_little"] = little
    attributes["_read_charset"] = encoding
    return ds


def _file_dataset(
    fp: BinaryIO,
    elements: dict,
    preamble: bytes,
    file_meta: Dataset,
    implicit: bool,
    little: bool,
    encoding: str | MutableSequence[str],
) -> FileDataset:
    """FileDataset(fp, elements, preamble, file_meta, implicit, little) with its original encoding set,
    built directly for the common source, an unnamed io.BytesIO (see _TEMPLATES); other sources go through
    the constructor."""
    if type(fp) is not io.BytesIO or getattr(fp, "name", None) or getattr(fp, "filename", None):
        ds = FileDataset(fp, elements, preamble, file_meta, implicit, little)  # type: ignore[arg-type]
        ds.set_original_encoding(implicit, little, encoding)
        return ds
    ds = FileDataset.__new__(FileDataset)
    attributes = _from_template(ds, Dataset, elements)
    attributes["preamble"] = preamble
    attributes["file_meta"] = file_meta
    if not _config._use_future:
        attributes["_is_implicit_VR"] = implicit
        attributes["_is_little_endian"] = little
    attributes["_read_implicit"] = implicit
    attributes["_read_little"] = little
    attributes["_read_charset"] = encoding
    attributes["fileobj_type"] = io.BytesIO
    attributes["filename"] = None
    attributes["buffer"] = fp
    attributes["timestamp"] = None
    return ds


def transfer_syntax_uid(ds: Dataset) -> str:
    """The file meta's TransferSyntaxUID as text ('' when absent), without converting the element:
    pydicom's conversion (a UID object through its hooks) costs more than framing a dozen elements."""
    meta = getattr(ds, "file_meta", None)
    elem = meta._dict.get(0x00020010) if meta is not None else None
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement):
        return (elem.value or b"").decode(default_encoding).rstrip("\0 ")
    return str(elem.value or "")


def convert_sequence(ds: Dataset, key: BaseTag) -> DataElement:
    """`ds[key]` for a sequence element. pydicom converts a raw defined-length SQ by running its reader
    over the value (~50 µs an item); here its items are framed as above, giving the same DataElement.
    Anything else (undefined length, deferred, customised conversion, unusual items) is `ds[key]`."""
    raw = ds._dict[key]
    if (
        type(raw) is not RawDataElement
        or not raw.length
        or raw.length == UNDEFINED_LENGTH
        or not isinstance(raw.value, bytes)
        or (raw.VR != "SQ" and (raw.VR is not None or _DicomDictionary.get(key, ("",))[0] != "SQ"))
        or not _plain_conversion()
    ):
        return ds[key]
    # the character sets as Dataset.__getitem__ and values.convert_value pass them on
    encodings = ds.original_character_set or ds._character_set or [default_encoding]
    if isinstance(encodings, str):
        encodings = [encodings]
    value = raw.value
    try:
        sequence, pos = _Reader.of_bytes(value).sequence(
            0, raw.is_implicit_VR, raw.is_little_endian, encodings, len(value), raw.value_tell
        )
    except (_Unsupported, TruncatedError):
        return ds[key]
    if pos != len(value):
        return ds[key]
    # as Dataset.__getitem__ after dataelem.convert_raw_data_element
    ds[key] = DataElement(raw.tag, "SQ", sequence, raw.value_tell, False, already_converted=True)
    ds._set_pixel_representation(ds._dict[key])  # type: ignore[arg-type]
    return ds._dict[key]  # type: ignore[return-value]


def item_elements(
    value: bytes, start: int, end: int, implicit: bool, little: bool, value_tell: int
) -> dict | None:
    """The elements of one defined-length sequence item, value[start:end], as read_file frames them
    ({tag: RawDataElement or DataElement}, values read whole, value_tell shifted by `value_tell`: the file
    offset of `value`); None when only pydicom's reader would read them (unusual VRs, delimiters, elements
    overrunning the item or the value)."""
    reader = _Reader.of_bytes(value)
    reader.base = value_tell  # file offsets: value[pos] lies at value_tell + pos
    reader.size = value_tell + len(value)
    try:
        elements, _, _ = reader.elements(
            start, implicit, little, None, value_tell + end, True, default_encoding
        )
    except (_Unsupported, TruncatedError):
        return None
    return elements


def _plain_conversion() -> bool:
    """pydicom converts raw elements its default way (no callback or hooks that would change a sequence)."""
    return (
        _config.data_element_callback is None
        and _hooks.hooks.raw_element_vr is _hooks.raw_element_vr
        and _hooks.hooks.raw_element_value is _hooks.raw_element_value
        and not _hooks.hooks.raw_element_kwargs
    )


def _fits_vr(first: int, second: int) -> bool:
    """pydicom's test whether two bytes can be an explicit VR (filereader._is_implicit_vr)."""
    return 0x40 < first < 0x5B and 0x40 < second < 0x5B


class _Reader:
    """One object being framed: a window `buf` of the file starting at file offset `base`.

    For io.BytesIO sources the window is the whole object (BytesIO.getvalue shares its buffer, no copy);
    other file objects are read CHUNK by CHUNK with fp.tell() == base + len(buf) always.
    """

    __slots__ = ("base", "buf", "fp", "size", "streamed")

    def __init__(self, fp: BinaryIO, start: int) -> None:
        self.fp = fp
        if isinstance(fp, io.BytesIO):
            self.buf = fp.getvalue()
            self.base = 0
            self.size = len(self.buf)
            self.streamed = False
        else:
            self.size = fp.seek(0, os.SEEK_END)
            fp.seek(start)
            self.base = start
            self.buf = fp.read(CHUNK)
            self.streamed = True

    @classmethod
    def of_bytes(cls, value: bytes) -> _Reader:
        """A reader of one value already in memory (offsets relative to its first byte)."""
        reader = cls.__new__(cls)
        reader.fp = None  # type: ignore[assignment]
        reader.buf = value
        reader.base = 0
        reader.size = len(value)
        reader.streamed = False
        return reader

    # --- the window ------------------------------------------------------------------------------------
    def more(self, pos: int, need: int) -> int:
        """Make buf[pos:pos + need] available if the file has it; returns pos in the new window."""
        if not self.streamed or pos + need <= len(self.buf):
            return pos
        buf = self.buf
        if pos > len(buf):  # skipped past the window: move it
            self.base += pos
            self.fp.seek(self.base)
            buf, pos = b"", 0
        self.base += pos
        self.buf = buf[pos:] + self.fp.read(max(CHUNK, need - (len(buf) - pos)))
        return 0

    def truncated(self, pos: int, need: int, what: str) -> TruncatedError:
        offset = self.base + pos
        return TruncatedError(
            f"file is truncated: {what} needs {need} bytes at offset {offset}, file ends at {self.size}"
        )

    def bytes_at(self, offset: int, length: int) -> bytes:
        """length bytes at file offset `offset` (already known to lie inside the file)."""
        start = offset - self.base
        if 0 <= start and start + length <= len(self.buf):
            return self.buf[start : start + length]
        fp = self.fp
        fp.seek(offset)
        value = fp.read(length)
        fp.seek(self.base + len(self.buf))
        return value

    # --- the object ------------------------------------------------------------------------------------
    def read(self, start: int, defer_size: int | None) -> FileDataset:
        """The object that starts at file offset `start`."""
        pos = self.more(start - self.base, 132)
        buf = self.buf
        if len(buf) < pos + 132 or buf[pos + 128 : pos + 132] != b"DICM":
            raise _Unsupported  # pydicom raises InvalidDicomError (or reads without preamble when forced)
        preamble = buf[pos : pos + 128]
        meta, pos = self.file_meta(pos + 132)
        raw_syntax = meta.get(0x00020010)
        if raw_syntax is None or not raw_syntax.value:
            raise _Unsupported  # pydicom guesses the encoding from the first element
        syntax = raw_syntax.value.decode(default_encoding).rstrip("\0 ")
        if "\\" in syntax or syntax in PrivateTransferSyntaxes:
            raise _Unsupported
        if syntax == ImplicitVRLittleEndian:
            implicit, little = True, True
        elif syntax == ExplicitVRBigEndian:
            implicit, little = False, False
        elif syntax == DeflatedExplicitVRLittleEndian:
            raise _Unsupported  # pydicom inflates the whole data set into memory
        else:  # explicit VR little endian and every encapsulated syntax (PS3.5 A.4)
            implicit, little = False, True
        pos = self.more(pos, 6)
        buf = self.buf
        if pos + 6 > len(buf):
            raise _Unsupported  # no or a tiny data set: pydicom's rules for it are its own
        if buf[pos : pos + 2] == b"\x00\x00":
            raise _Unsupported  # command set elements (group 0000): pydicom reads them implicit VR
        if _fits_vr(buf[pos + 4], buf[pos + 5]) == implicit:
            raise _Unsupported  # the encoding differs from the transfer syntax: pydicom guesses
        elements, pos, encoding = self.elements(
            pos, implicit, little, defer_size, None, False, default_encoding
        )
        self.fp.seek(self.base + pos)
        # as filereader._read_file_meta_info and read_partial; one difference: pydicom converts (0002,0010),
        # the first file meta element and (0008,0005) in place (DataElements in _dict), here they stay raw
        # (converted on access as usual) - the character set was converted once already, above
        file_meta = _new(FileMetaDataset, meta, default_encoding, False, True, default_encoding)
        return _file_dataset(self.fp, elements, preamble, file_meta, implicit, little, encoding)

    def file_meta(self, pos: int) -> tuple[dict, int]:
        """The group 0002 elements (always explicit VR little endian) and the position after them."""
        header = _EXPLICIT_HEADER[True].unpack_from
        length32 = _LENGTH32[True].unpack_from
        meta: dict = {}
        buf = self.buf
        end = len(buf)
        while True:
            if pos + 12 > end:
                pos = self.more(pos, 12)
                buf = self.buf
                end = len(buf)
                if pos + 8 > end:
                    raise _Unsupported  # no data set after the file meta
            group, element, vr_bytes, length = header(buf, pos)
            if group != 2:
                if not meta:
                    raise _Unsupported  # no file meta: pydicom guesses the transfer syntax
                return meta, pos
            known = _EXPLICIT.get(vr_bytes)
            if known is None:
                raise _Unsupported  # implicit VR file meta (pydicom retries) or an unknown VR
            vr, long_length = known
            if long_length:
                if pos + 12 > end:
                    raise self.truncated(pos, 12, "an element header")
                length = length32(buf, pos + 8)[0]
                pos += 12
            else:
                pos += 8
            if length == UNDEFINED_LENGTH:
                raise _Unsupported
            if pos + length > end:
                pos = self.more(pos, length)
                buf = self.buf
                end = len(buf)
                if pos + length > end:
                    raise self.truncated(pos, length, f"({group:04X},{element:04X})")
            tag = BaseTag(group << 16 | element)
            value = buf[pos : pos + length] if length else empty_value_for_VR(vr, raw=True)
            meta[tag] = RawDataElement(tag, vr, length, value, self.base + pos, False, True)
            pos += length

    def elements(
        self,
        pos: int,
        implicit: bool,
        little: bool,
        defer_size: int | None,
        item_end: int | None,
        in_item: bool,
        encoding: str | MutableSequence[str],
    ) -> tuple[dict, int, str | MutableSequence[str]]:
        """One data set's elements, as filereader.data_element_generator yields them.

        The top level runs to the end of the file; an item to its end offset (`item_end`, file offset) or,
        with undefined length, to its delimiter. Returns the elements, the position after them and the
        character set in effect at the end (what pydicom hands to nested sequences).
        """
        if implicit:
            header = _IMPLICIT_HEADER[little].unpack_from
        else:
            header = _EXPLICIT_HEADER[little].unpack_from
        length32 = _LENGTH32[little].unpack_from
        explicit_vrs = _EXPLICIT
        new_tuple = tuple.__new__
        raw_element = RawDataElement
        base_tag = BaseTag
        charset = _CHARSET
        # values longer than this are deferred; undefined lengths are always longer
        defer = UNDEFINED_LENGTH - 1 if defer_size is None else min(defer_size, UNDEFINED_LENGTH - 1)
        elements: dict = {}
        buf = self.buf
        end = len(buf)
        base = self.base
        streamed = self.streamed
        while True:
            if pos + 12 > end or item_end is not None:
                if item_end is not None and base + pos >= item_end:
                    if base + pos > item_end:
                        raise _Unsupported  # an element overran its item: pydicom reads on regardless
                    return elements, pos, encoding
                if pos + 12 > end and streamed:
                    pos = self.more(pos, 12)
                    buf, base = self.buf, self.base
                    end = len(buf)
                if pos + 8 > end:
                    if pos == end and not in_item and base + pos >= self.size:
                        return elements, pos, encoding  # the end of the object
                    raise self.truncated(pos, 8, "an element header")
            if implicit:
                group, element, length = header(buf, pos)
                vr = None
                pos += 8
            else:
                group, element, vr_bytes, length = header(buf, pos)
                known = explicit_vrs.get(vr_bytes)
                if known is None:
                    if group == 0xFFFE and element == 0xE00D and in_item and item_end is None:
                        return elements, pos + 8, encoding  # the item delimiter (its length is 0)
                    raise _Unsupported  # a VR pydicom reads by heuristics (implicit switch, unknown VR)
                vr, long_length = known
                if long_length:
                    if pos + 12 > end:
                        raise self.truncated(pos, 12, "an element header")
                    length = length32(buf, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
            if group == 0xFFFE:
                if element == 0xE00D and in_item and item_end is None:
                    return elements, pos, encoding
                raise _Unsupported  # a delimiter out of place: pydicom ends or misreads the data set
            tag = group << 16 | element
            if length <= defer or (length != UNDEFINED_LENGTH and tag == charset):  # read the value
                if pos + length > end:
                    pos = self.more(pos, length)
                    buf, base = self.buf, self.base
                    end = len(buf)
                    if pos + length > end:
                        raise self.truncated(pos, length, f"({group:04X},{element:04X})")
                if length:
                    value = buf[pos : pos + length]
                else:
                    value = empty_value_for_VR(vr, raw=True)
                key = base_tag(tag)
                elements[key] = new_tuple(
                    raw_element, (key, vr, length, value, base + pos, implicit, little, True, False)
                )
                pos += length
                if tag == charset:
                    encoding = convert_encodings(convert_string(value or b"", little))
                continue
            value_tell = base + pos
            if length != UNDEFINED_LENGTH:  # deferred: skipped
                if value_tell + length > self.size:
                    raise self.truncated(pos, length, f"({group:04X},{element:04X})")
                pos += length
                if pos > end:  # only when streamed: the window moves on at the next header
                    pos = self.more(pos, 12)
                    buf, base = self.buf, self.base
                    end = len(buf)
                key = base_tag(tag)
                elements[key] = new_tuple(
                    raw_element, (key, vr, length, None, value_tell, implicit, little, True, False)
                )
                continue
            # undefined length: a sequence, or encapsulated pixel data (as data_element_generator)
            if vr == "UN" and _config.settings.infer_sq_for_un_vr:
                vr = "SQ"
            if vr is None or (vr == "UN" and _config.replace_un_with_known_vr):
                try:
                    vr = _dictionary_vr_fast(tag)
                except KeyError:
                    pos = self.more(pos, 4)
                    buf, base = self.buf, self.base
                    end = len(buf)
                    if pos + 4 > end:
                        raise self.truncated(pos, 4, "an item tag") from None
                    if _TAG[little].unpack_from(buf, pos) == (0xFFFE, 0xE000):
                        vr = "SQ"
            key = base_tag(tag)
            if vr == "SQ":
                sequence, pos = self.sequence(pos, implicit, little, encoding)
                elements[key] = DataElement(key, vr, sequence, value_tell, is_undefined_length=True)
            else:
                value, pos = self.encapsulated(pos, little, defer_size, tag)
                elements[key] = raw_element(key, vr, length, value, value_tell, implicit, little)
            buf, base = self.buf, self.base
            end = len(buf)

    def sequence(
        self,
        pos: int,
        implicit: bool,
        little: bool,
        encoding: str | MutableSequence[str],
        end: int | None = None,
        offset: int = 0,
    ) -> tuple[Sequence, int]:
        """A sequence's items as Datasets, as filereader.read_sequence builds them: to its delimiter, or
        with a defined length to `end`; item positions are shifted by `offset` (pydicom's, for values
        converted from their bytes)."""
        item_header = _IMPLICIT_HEADER[little].unpack_from
        items = []
        while end is None or self.base + pos < end:
            pos = self.more(pos, 14)
            buf = self.buf
            if pos + 8 > len(buf):
                raise self.truncated(pos, 8, "an item header")
            group, element, length = item_header(buf, pos)
            item_tell = self.base + pos + offset
            pos += 8
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                break
            if tag != _ITEM:
                raise _Unsupported  # pydicom reads whatever it finds as an item
            # filereader._is_implicit_vr for a sequence item: an explicit VR data set may hold implicit VR
            # items (PS3.5 6.2.2); the first element's VR bytes decide, even of an empty item
            item_implicit = implicit or (pos + 6 <= len(buf) and not _fits_vr(buf[pos + 4], buf[pos + 5]))
            if length == UNDEFINED_LENGTH:
                raw, pos, _ = self.elements(pos, item_implicit, little, None, None, True, encoding)
            else:
                if self.base + pos + length > self.size:
                    raise self.truncated(pos, length, "a sequence item")
                raw, pos, _ = self.elements(
                    pos, item_implicit, little, None, self.base + pos + length, True, encoding
                )
            # as filereader.read_dataset / read_sequence_item / read_sequence
            own = raw.get(_CHARSET)
            item_encoding = (
                convert_encodings(convert_raw_data_element(own).value) if own is not None else encoding
            )
            ds = _new(Dataset, raw, encoding, item_implicit, little, item_encoding)
            attributes = ds.__dict__
            attributes["is_undefined_length_sequence_item"] = length == UNDEFINED_LENGTH
            attributes["seq_item_tell"] = attributes["file_tell"] = item_tell
            items.append(ds)
        sequence = Sequence(items)
        sequence.is_undefined_length = end is None
        return sequence, pos

    def encapsulated(
        self, pos: int, little: bool, defer_size: int | None, tag: int
    ) -> tuple[bytes | None, int]:
        """An undefined-length value that is a list of items (encapsulated pixel data, PS3.5 A.4), as
        fileutil._try_read_encapsulated_pixel_data reads it; anything else is left to pydicom."""
        item_header = _IMPLICIT_HEADER[little].unpack_from
        data_start = self.base + pos
        while True:
            pos = self.more(pos, 8)
            buf = self.buf
            if pos + 8 > len(buf):
                raise self.truncated(pos, 8, f"an item of ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            group, element, length = item_header(buf, pos)
            item = group << 16 | element
            if item == _SEQUENCE_END:
                break
            if item != _ITEM or length == UNDEFINED_LENGTH:
                raise _Unsupported  # pydicom scans for the delimiter byte by byte
            pos += 8
            if self.base + pos + length > self.size:
                raise self.truncated(pos, length, f"an item of ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            pos += length
        byte_count = self.base + pos + 4 - data_start  # pydicom counts the delimiter's tag
        pos += 8
        value = None
        if defer_size is None or defer_size > byte_count:
            value = self.bytes_at(data_start, byte_count - 4)
        return value, pos
