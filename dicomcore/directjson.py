"""DICOM JSON straight from a PS3.10 object's bytes, without building pydicom objects.

The ingest path used to frame an upload into a pydicom Dataset (dicomcore.framing: RawDataElements, item
Datasets) and then walk that Dataset to encode its DICOM JSON (dicomcore.dicomjson): two passes and an
object per element, about 200 µs for a CT header. `encode_file` does both in one pass over the bytes: each
element's header is unpacked and its value decoded by VR with dicomjson's own decoders, giving exactly what
`encode_dataset(framing.read_file(buf, defer_size), bulk)` gives (same dict, key order, value types, bulk
refs) - tests/test_directjson.py compares the two on every pydicom test file and hypothesis data sets.

It mirrors the rules of both: framing's for what is read, deferred, or left to pydicom's reader, and
dicomjson's for VRs (implicit VR dictionary lookups, private creators, "US or SS" by Pixel Representation,
explicit UN), padding, bulk data and the two sequence forms (undefined-length sequences, whose items framing
builds as Datasets, and defined-length ones, which dicomjson splits itself, with slightly different rules).
Wherever either of them would hand an element or the object to pydicom (ISO 2022 or undecodable text,
deferred text, LUT descriptors, unusual VRs or items, truncation, non-default pydicom settings, ...), this
returns None and the caller takes the Dataset path, so its answer is the reference one.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from struct import Struct
from typing import Any

from pydicom import config as _config
from pydicom.charset import convert_encodings, default_encoding, python_encoding
from pydicom.datadict import DicomDictionary, _dictionary_vr_fast
from pydicom.dataelem import empty_value_for_VR
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.values import convert_string

from dicomcore import dicomjson as _dj
from dicomcore.dicomjson import (
    ALWAYS_BULK_TAGS,
    BINARY_VRS,
    BULK_PATH_PREFIX,
    INLINE_BINARY_LIMIT,
    UNDEFINED_LENGTH,
    BulkRef,
)
from dicomcore.framing import _EXPLICIT, _fits_vr

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET = 0x00080005
_PIXEL_DATA = 0x7FE00010
_PIXEL_DATA_KEY = "7FE00010"
_PIXEL_REPRESENTATION = 0x00280103
_UNKNOWN = -1  # a Pixel Representation element dicomjson cannot read without pydicom
_IMPLICIT_HEADER = {True: Struct("<HHL"), False: Struct(">HHL")}
_EXPLICIT_HEADER = {True: Struct("<HH2sH"), False: Struct(">HH2sH")}
_LENGTH32 = {True: Struct("<L"), False: Struct(">L")}
_META_HEADER = Struct("<HH2sH")
_META_LENGTH32 = Struct("<L")
# VRs whose values decode with the character set: none may precede Specific Character Set (see _Walk)
_CHARSET_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN", "SQ"})
_MODE_TOP, _MODE_FRAMED, _MODE_SPLIT = 0, 1, 2


class _Bail(Exception):
    """The Dataset path does something here that this one does not reproduce: let it encode the object."""


@dataclass(slots=True)
class Encoded:
    """What parse_instance needs from an object: its transfer syntax, DICOM JSON and bulk data refs."""

    transfer_syntax: str
    attrs: dict
    bulk: list[BulkRef]
    # top-level pixel data elements: tag -> (length, value) as framing's RawDataElement holds them
    pixel: dict[int, tuple[int, bytes | None]]


def enabled() -> bool:
    """pydicom runs with the settings both framing and dicomjson reproduce (the defaults)."""
    return (
        _dj._fast_path_enabled()
        and _config.settings.infer_sq_for_un_vr
        and _config.replace_un_with_known_vr
        and not _config.use_none_as_empty_text_VR_value
    )


def encode_file(buf: bytes, defer_size: int | None) -> Encoded | None:
    """`encode_dataset(framing.read_file(buf, defer_size), bulk)` and the transfer syntax, or None when the
    object is anything but plain (the caller then takes that path; see the module docstring)."""
    if type(buf) is not bytes or not enabled():
        return None
    try:
        return _encode(buf, defer_size)
    except Exception:  # _Bail, dicomjson's _Fallback, struct.error on odd bytes: the Dataset path decides
        return None


def _encode(buf: bytes, defer_size: int | None) -> Encoded:
    size = len(buf)
    if size < 132 or buf[128:132] != b"DICM":
        raise _Bail
    syntax_value, pos = _file_meta(buf, 132)
    if not syntax_value:
        raise _Bail  # framing hands a missing or empty transfer syntax to pydicom
    syntax = syntax_value.decode(default_encoding).rstrip("\0 ")
    if "\\" in syntax or syntax in PrivateTransferSyntaxes or syntax == DeflatedExplicitVRLittleEndian:
        raise _Bail
    if syntax == ImplicitVRLittleEndian:
        implicit, little = True, True
    elif syntax == ExplicitVRBigEndian:
        implicit, little = False, False
    else:
        implicit, little = False, True
    if (
        pos + 6 > size
        or buf[pos : pos + 2] == b"\x00\x00"
        or _fits_vr(buf[pos + 4], buf[pos + 5]) == implicit
    ):
        raise _Bail  # as framing.read: pydicom's rules for these are its own
    walk = _Walk(buf, defer_size)
    attrs, _ = walk.elements(pos, size, False, implicit, little, _MODE_TOP, "", False)
    return Encoded(syntax, attrs, walk.bulk, walk.pixel)


def _file_meta(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    """The raw Transfer Syntax UID value and the position after group 0002, as framing reads the meta."""
    end = len(buf)
    syntax: bytes | None = None
    seen = False
    while True:
        if pos + 8 > end:
            raise _Bail
        group, element, vr_bytes, length = _META_HEADER.unpack_from(buf, pos)
        if group != 2:
            if not seen:
                raise _Bail
            return syntax, pos
        known = _EXPLICIT.get(vr_bytes)
        if known is None:
            raise _Bail
        if known[1]:
            if pos + 12 > end:
                raise _Bail
            length = _META_LENGTH32.unpack_from(buf, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if length == UNDEFINED_LENGTH or pos + length > end:
            raise _Bail
        if element == 0x0010:
            syntax = buf[pos : pos + length]
        seen = True
        pos += length


# explicit VR bytes -> (VR, whether a 4-byte length follows, dicomjson's value decoder or None)
_EXPLICIT_DECODERS = {code: (vr, long, _dj._DECODERS.get(vr)) for code, (vr, long) in _EXPLICIT.items()}
# implicit VR tag -> (VR, decoder) for public tags of a plain dictionary VR with a decoder, else (None, None)
_IMPLICIT_DECODERS: dict[int, tuple[str | None, Any]] = {}
# tags that need more than decoding: read by dicomjson (Pixel Representation) or converted by pydicom
_SPECIAL_TAGS = frozenset({_PIXEL_REPRESENTATION, *_dj._LUT_DESCRIPTOR_TAGS})


def _implicit_decoder(tag: int) -> tuple[str | None, Any]:
    entry = DicomDictionary.get(tag)
    vr = entry[0] if entry is not None else None
    decoder = _dj._DECODERS.get(vr) if vr is not None else None
    known = (vr, decoder) if decoder is not None else (None, None)
    if len(_IMPLICIT_DECODERS) < 1 << 16:
        _IMPLICIT_DECODERS[tag] = known
    return known


# Decoded values by (VR, value bytes), per (byte order, character set): the instances of a series repeat
# most of their values (patient, study, series, equipment, geometry), and a lookup costs a fraction of
# decoding them. Callers get copies; the cache is emptied whenever it fills.
_CACHE_ENTRIES = 4096
_CACHED_LENGTH = 256
_VALUE_CACHES: dict[tuple[bool, str], dict[tuple[str, bytes], list]] = {}


def clear_caches() -> None:
    """Forget cached decoded values (benchmarks measure the cold case with this)."""
    _VALUE_CACHES.clear()


def _value_cache(little: bool, encoding: str) -> dict[tuple[str, bytes], list]:
    cache = _VALUE_CACHES.get((little, encoding))
    if cache is None:
        if len(_VALUE_CACHES) >= 8:
            _VALUE_CACHES.clear()
        cache = _VALUE_CACHES.setdefault((little, encoding), {})
    return cache


_KEYS: dict[int, str] = {}


def _key(tag: int) -> str:
    key = _KEYS.get(tag)
    if key is None:
        key = f"{tag:08X}"
        if len(_KEYS) < 1 << 16:
            _KEYS[tag] = key
    return key


_ENCODINGS: dict[bytes, str] = {}


def _encoding(value: bytes) -> str:
    """The Python encoding of a Specific Character Set value holding one known term (cached); anything
    else (ISO 2022 code extensions, misspelt or unknown terms, which pydicom warns about) bails."""
    encoding = _ENCODINGS.get(value)
    if encoding is None:
        term = convert_string(value, True)
        if not isinstance(term, str) or (term and term not in python_encoding):
            raise _Bail
        encoding = convert_encodings(term)[0]
        if len(_ENCODINGS) < 256:
            _ENCODINGS[value] = encoding
    return encoding


class _Walk:
    """One object being encoded: its bytes, character set, bulk refs and top-level pixel data."""

    __slots__ = ("buf", "bulk", "defer", "defer_size", "encoding", "pixel")

    def __init__(self, buf: bytes, defer_size: int | None) -> None:
        self.buf = buf
        self.defer_size = defer_size
        self.defer = UNDEFINED_LENGTH - 1 if defer_size is None else min(defer_size, UNDEFINED_LENGTH - 1)
        self.encoding = "iso8859"  # pydicom's default_encoding, until Specific Character Set
        self.bulk: list[BulkRef] = []
        self.pixel: dict[int, tuple[int, bytes | None]] = {}

    def elements(
        self,
        pos: int,
        limit: int,
        delimited: bool,
        implicit: bool,
        little: bool,
        mode: int,
        path: str,
        nested: bool,
    ) -> tuple[dict, int]:
        """The DICOM JSON of one data set: the top level (to the end of the object), or an item (to
        `limit`, or when `delimited`, to its delimiter). Returns it and the position after it.

        mode: the top level (framing's defer rules), an item framing builds (of an undefined-length
        sequence), or one dicomjson splits itself (of a defined-length sequence).
        """
        buf = self.buf
        header = (_IMPLICIT_HEADER if implicit else _EXPLICIT_HEADER)[little].unpack_from
        length32 = _LENGTH32[little].unpack_from
        explicit_vrs = _EXPLICIT_DECODERS
        implicit_vrs = _IMPLICIT_DECODERS
        keys = _KEYS
        special = _SPECIAL_TAGS
        top = mode == _MODE_TOP
        defer = self.defer if top else UNDEFINED_LENGTH - 1
        encoding = self.encoding
        cache = _value_cache(little, encoding)
        out: dict[str, Any] = {}
        last = -1
        creators: dict[int, tuple[str | None, bytes | None]] = {}
        pixel_rep: int | None = None
        assumed_us = False  # a "US or SS" made US as there is no Pixel Representation (nor Pixel Data)
        while True:
            if pos + 8 > limit:
                if pos == limit and not delimited:
                    break
                raise _Bail  # truncated, or an element overran its item
            if implicit:
                group, element, length = header(buf, pos)
                pos += 8
                tag = group << 16 | element
                known = implicit_vrs.get(tag) or _implicit_decoder(tag)
                header_vr = None
                vr, decoder = known
            else:
                group, element, vr_bytes, length = header(buf, pos)
                known = explicit_vrs.get(vr_bytes)
                if known is None:
                    if delimited and group == 0xFFFE and element == 0xE00D:
                        pos += 8
                        break
                    raise _Bail
                header_vr, long_length, decoder = known
                vr = header_vr
                if long_length:
                    if pos + 12 > limit:
                        raise _Bail
                    length = length32(buf, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
                tag = group << 16 | element
            if group == 0xFFFE:
                if delimited and element == 0xE00D:
                    break
                raise _Bail
            if tag <= last:
                raise _Bail  # out of order or repeated: the Dataset path sorts (and keeps the last)
            last = tag
            key = keys.get(tag) or _key(tag)
            start = pos
            if length == UNDEFINED_LENGTH:
                if group & 1 and 0x10 <= element <= 0xFF:
                    creators[tag] = (header_vr, None)  # a private creator only pydicom reads
                entry, pos = self.undefined(
                    pos,
                    tag,
                    header_vr,
                    implicit,
                    little,
                    mode,
                    path + key,
                    nested,
                    None if delimited else limit,
                )
                out[key] = entry
                continue
            pos += length
            if pos > limit:
                raise _Bail
            # the common case inline: a public text or number value, read, that nothing else depends on
            if decoder is not None and 0 < length <= defer and not group & 1 and tag > _CHARSET:
                if tag not in special:
                    raw = buf[start:pos]
                    values = cache.get((vr, raw))
                    if values is None:
                        values = decoder(raw, little, encoding)
                        if length <= _CACHED_LENGTH:
                            if len(cache) >= _CACHE_ENTRIES:
                                cache.clear()
                            cache[(vr, raw)] = values
                    if not values:
                        out[key] = {"vr": vr}
                    elif vr == "PN":
                        out[key] = {"vr": vr, "Value": [v.copy() if v else v for v in values]}
                    else:
                        out[key] = {"vr": vr, "Value": values[:]}
                    continue
            if group == 2 or (tag < _CHARSET and (group & 1 or not top)):
                raise _Bail  # file meta in the data set, odd groups before the character set
            deferred = length > defer and tag != _CHARSET
            if group & 1 and 0x10 <= element <= 0xFF:
                creators[tag] = (header_vr, self.raw_value(start, length, header_vr, mode, deferred))
            if tag == _CHARSET:
                if not top:
                    raise _Bail  # an item with its own character set
                self.encoding = encoding = _encoding(buf[start:pos] if length else b"")
                cache = _value_cache(little, encoding)
            if header_vr is None:
                vr = self.implicit_vr(tag, length, creators, pixel_rep, encoding, mode)
                if pixel_rep is None and tag in _dj._US_SS_BY_PIXEL_REPRESENTATION:
                    assumed_us = True
            if tag < _CHARSET and vr in _CHARSET_VRS:
                raise _Bail  # dicomjson decodes these with the final character set
            if tag in _dj._LUT_DESCRIPTOR_TAGS:
                raise _Bail
            if tag == _PIXEL_REPRESENTATION:
                raw_value = self.raw_value(start, length, header_vr, mode, deferred)
                pixel_rep = _pixel_rep(header_vr, raw_value, little)
            decoder = _dj._DECODERS.get(vr)
            if decoder is not None:
                if not length:
                    out[key] = {"vr": vr}
                    continue
                if deferred:
                    raise _Bail  # deferred text goes through pydicom
                values = decoder(buf[start:pos], little, encoding)
                out[key] = {"vr": vr, "Value": values} if values else {"vr": vr}
                continue
            if vr in BINARY_VRS:
                if (
                    header_vr == "UN"
                    and length <= INLINE_BINARY_LIMIT
                    and tag not in ALWAYS_BULK_TAGS
                    and self.explicit_un_vr(tag, creators, encoding) != "UN"
                ):
                    raise _Bail  # pydicom replaces the UN by the dictionary's VR and converts
                if top and tag in ALWAYS_BULK_TAGS:
                    self.pixel[tag] = (length, None if deferred else (buf[start:pos] if length else None))
                if tag in ALWAYS_BULK_TAGS or length > INLINE_BINARY_LIMIT:
                    elem_path = path + key
                    self.bulk.append(BulkRef(elem_path, None if nested else start, length, vr))
                    out[key] = {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
                elif not length:
                    # framing's empty binary value is None, which dicomjson has pydicom convert: that keeps
                    # a plain VR (explicit other than UN, or the dictionary's), and the value is empty
                    if mode != _MODE_SPLIT and (vr != (header_vr or _plain_dictionary_vr(tag)) or vr == "UN"):
                        raise _Bail
                    out[key] = {"vr": vr}
                elif deferred:
                    raise _Bail
                else:
                    out[key] = {"vr": vr, "InlineBinary": base64.b64encode(buf[start:pos]).decode("ascii")}
                continue
            if vr == "SQ":
                if not length:
                    out[key] = {"vr": "SQ"}
                    continue
                if pixel_rep == _UNKNOWN:
                    raise _Bail
                items = self.split_items(start, pos, implicit, little, path + key)
                out[key] = {"vr": "SQ", "Value": items}
                continue
            raise _Bail
        if pixel_rep == _UNKNOWN or (assumed_us and _PIXEL_DATA_KEY in out):
            raise _Bail  # dicomjson cannot resolve what depends on these without pydicom
        return out, pos

    def raw_value(self, start: int, length: int, vr: str | None, mode: int, deferred: bool) -> bytes | None:
        """The value a RawDataElement holds here: framing's (None when deferred, pydicom's empty value) or
        dicomjson's split items' (the bytes, b"" when empty)."""
        if deferred:
            return None
        if length:
            return self.buf[start : start + length]
        return b"" if mode == _MODE_SPLIT else empty_value_for_VR(vr, raw=True)

    def implicit_vr(
        self,
        tag: int,
        length: int,
        creators: dict[int, tuple[str | None, bytes | None]],
        pixel_rep: int | None,
        encoding: str,
        mode: int,
    ) -> str:
        """dicomjson._implicit_vr: the VR pydicom gives an implicit VR element."""
        entry = DicomDictionary.get(tag)
        if entry is not None:
            vr: str = entry[0]
        else:
            found = _dj._dictionary_vr(tag)
            if found is not None:
                vr = found
            elif tag >> 16 & 1:
                vr = _private_vr(tag, creators, encoding)
            else:
                vr = "UL" if tag & 0xFFFF == 0 else "UN"
        if len(vr) == 2:
            return vr
        # dicomjson._resolve_ambiguous for implicit VR
        if vr == "OB or OW":
            return "OB" if tag == _PIXEL_DATA and length == UNDEFINED_LENGTH else "OW"
        if vr == "US or SS" and tag in _dj._US_SS_BY_PIXEL_REPRESENTATION:
            if pixel_rep is None:
                if tag < _PIXEL_REPRESENTATION or mode == _MODE_SPLIT:
                    raise _Bail  # one may follow; split items inherit their parent's
                return "US"  # the caller checks that no Pixel Data follows either
            if pixel_rep == _UNKNOWN:
                raise _Bail
            return "US" if pixel_rep == 0 else "SS"
        raise _Bail  # "US or OW", LUT data, ...: only pydicom resolves these

    def explicit_un_vr(self, tag: int, creators: dict, encoding: str) -> str:
        """dicomjson._explicit_un_vr (replace_un_with_known_vr is on, see enabled())."""
        if tag >> 16 & 1:
            return _private_vr(tag, creators, encoding)
        return _dj._dictionary_vr(tag) or "UN"

    def undefined(
        self,
        pos: int,
        tag: int,
        vr: str | None,
        implicit: bool,
        little: bool,
        mode: int,
        elem_path: str,
        nested: bool,
        limit: int | None,
    ) -> tuple[dict, int]:
        """An undefined-length element as framing reads it: a sequence, or top-level encapsulated pixel
        data; its JSON and the position after it."""
        if mode == _MODE_SPLIT:
            raise _Bail
        buf = self.buf
        if vr == "UN":
            vr = "SQ"  # infer_sq_for_un_vr (see enabled())
        elif vr is None:
            try:
                vr = _dictionary_vr_fast(tag)
            except KeyError:
                if pos + 4 > len(buf):
                    raise _Bail from None
                if _IMPLICIT_HEADER[little].unpack_from(buf, pos)[:2] == (0xFFFE, 0xE000):
                    vr = "SQ"
        if vr == "SQ":
            if tag < _CHARSET and mode == _MODE_TOP:
                raise _Bail
            items, pos = self.framed_items(pos, implicit, little, elem_path)
            entry: dict[str, Any] = {"vr": "SQ"}
            if items:
                entry["Value"] = items
        elif mode == _MODE_TOP and tag == _PIXEL_DATA and vr in ("OB", "OW", "OB or OW"):
            if vr == "OB or OW":
                vr = "OB"  # dicomjson._resolve_ambiguous: implicit VR encapsulated pixel data
            length, value, start, pos = self.encapsulated(pos, little)
            self.pixel[tag] = (UNDEFINED_LENGTH, value)
            self.bulk.append(BulkRef(elem_path, start, length, vr))
            entry = {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
        else:
            raise _Bail
        if limit is not None and pos > limit:
            raise _Bail
        return entry, pos

    def framed_items(self, pos: int, implicit: bool, little: bool, elem_path: str) -> tuple[list, int]:
        """The items of an undefined-length sequence, read as framing.sequence frames them."""
        buf = self.buf
        size = len(buf)
        item_header = _IMPLICIT_HEADER[little].unpack_from
        items = []
        while True:
            if pos + 8 > size:
                raise _Bail
            group, element, length = item_header(buf, pos)
            pos += 8
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                break
            if tag != _ITEM:
                raise _Bail
            item_implicit = implicit or (pos + 6 <= size and not _fits_vr(buf[pos + 4], buf[pos + 5]))
            item_path = f"{elem_path}/{len(items)}/"
            if length == UNDEFINED_LENGTH:
                item, pos = self.elements(
                    pos, size, True, item_implicit, little, _MODE_FRAMED, item_path, True
                )
            else:
                if pos + length > size:
                    raise _Bail
                item, pos = self.elements(
                    pos, pos + length, False, item_implicit, little, _MODE_FRAMED, item_path, True
                )
            items.append(item)
        return items, pos

    def split_items(self, pos: int, end: int, implicit: bool, little: bool, elem_path: str) -> list:
        """The items of a defined-length sequence value, as dicomjson._split_items splits them."""
        buf = self.buf
        item_header = _IMPLICIT_HEADER[little].unpack_from
        items = []
        while pos < end:
            if pos + 8 > end:
                raise _Bail
            group, element, length = item_header(buf, pos)
            pos += 8
            item_end = pos + length
            if (group << 16 | element) != _ITEM or length == UNDEFINED_LENGTH or item_end > end:
                raise _Bail
            item, pos = self.elements(
                pos, item_end, False, implicit, little, _MODE_SPLIT, f"{elem_path}/{len(items)}/", True
            )
            items.append(item)
        return items

    def encapsulated(self, pos: int, little: bool) -> tuple[int, bytes | None, int, int]:
        """Encapsulated pixel data as framing.encapsulated reads it: (length as dicomjson's _binary_extent
        gives it, the value when read, its offset, the position after the sequence delimiter)."""
        buf = self.buf
        size = len(buf)
        item_header = _IMPLICIT_HEADER[little].unpack_from
        start = pos
        while True:
            if pos + 8 > size:
                raise _Bail
            group, element, length = item_header(buf, pos)
            item = group << 16 | element
            if item == _SEQUENCE_END:
                break
            if item != _ITEM or length == UNDEFINED_LENGTH:
                raise _Bail
            pos += 8
            if pos + length > size:
                raise _Bail
            pos += length
        byte_count = pos + 4 - start  # pydicom counts the delimiter's tag
        value = None
        if self.defer_size is None or self.defer_size > byte_count:
            value = buf[start : start + byte_count - 4]
        return (UNDEFINED_LENGTH if value is None else len(value)), value, start, pos + 8


def _plain_dictionary_vr(tag: int) -> str | None:
    """The public dictionary's VR of tag when it is a single VR (pydicom's VR for an implicit VR element)."""
    entry = DicomDictionary.get(tag)
    return entry[0] if entry is not None and len(entry[0]) == 2 else None


def _pixel_rep(vr: str | None, value: bytes | None, little: bool) -> int:
    """dicomjson._us_value of a Pixel Representation element; _UNKNOWN unless plain."""
    if vr not in (None, "US") or value is None or len(value) != 2:
        return _UNKNOWN
    return int.from_bytes(value, "little" if little else "big")


def _private_vr(tag: int, creators: dict[int, tuple[str | None, bytes | None]], encoding: str) -> str:
    """dicomjson._private_vr over the creators read so far (a creator precedes its elements)."""
    element = tag & 0xFFFF
    if 0x0010 <= element <= 0x00FF:
        return "LO"
    if not element & 0xFF00:
        return "UN"
    creator = creators.get((tag & 0xFFFF0000) | (element >> 8))
    if creator is None:
        return "UN"
    vr, value = creator
    if vr not in (None, "LO", "UN") or value is None:
        raise _Bail
    text = _dj._text(value, encoding)
    if "\\" in text:
        raise _Bail
    return _dj._private_dictionary_vr(tag, text.rstrip(_dj._PAD))
