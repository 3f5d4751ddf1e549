"""DICOM JSON model (PS3.18 F.2) encoding of pydicom datasets, with bulk data left in place.

Written here rather than using pydicom's Dataset.to_json_dict because (a) bulk data must never be read into
memory: large binary values are referenced by their byte offset in the stored object, which needs the raw
(unconverted) elements pydicom keeps for deferred values, (b) a BulkDataURI needs the attribute's path
inside nested sequences, which pydicom's bulk-data callback does not receive, and (c) speed: converting an
element through pydicom (``ds[tag]``) costs ~20-25 µs, too slow for ingesting 1,000+ instances/s, so raw
elements are decoded here straight from their bytes by VR (~1 µs each). Anything unusual (ISO 2022 code
extensions, undecodable text, deferred non-binary values, VRs that depend on other attributes in ways not
handled here, malformed numbers) falls back to pydicom's own conversion, so the output never depends on
which path an element took.

Where this output deliberately differs from pydicom's ``to_json_dict`` (pydicom is wrong or lax per the
standard, or the old behaviour of this module is kept):

* Empty values inside a multi-valued attribute are ``null`` (PS3.18 F.2.5); pydicom emits ``""``.
* Padding is stripped per value, as PS3.5 6.2 makes it insignificant: leading and trailing spaces for
  AE AS CS DA DS DT IS LO SH TM UI (and trailing NULs, which some writers use as padding), trailing spaces
  only for LT ST UT UC UR and PN values. pydicom strips only the end of the whole value for most VRs.
* PN component groups that are empty are omitted, and a value with no non-empty group is ``null``
  (PS3.18 F.2.2); pydicom always emits ``"Alphabetic"``, even as ``""``.
* An empty sequence has no "Value" (like any other empty attribute); pydicom emits ``"Value": []``.
* Non-finite floats (FL, FD, DS "NaN"/"Inf") and IS/DS text that is not a number are kept as strings,
  because JSON has no NaN/Infinity; pydicom emits invalid JSON numbers or fails.
* In implicit VR datasets, "OB or OW" attributes that pydicom leaves ambiguous (e.g. Overlay Data
  60xx,3000) get VR OW, which PS3.5 A.1 prescribes for implicit VR little endian; pydicom emits the invalid
  VR "OB or OW". Implicit VR Pixel Data is referenced without being read (it used to be read and lose its
  offset).
"""

from __future__ import annotations

import base64
import functools
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import config as _pydicom_config
from pydicom import hooks as _pydicom_hooks
from pydicom.datadict import DicomDictionary, dictionary_VR, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_deferred_data_element
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomcore.framing import item_elements
from dicomcore.tags import dictionary_vr

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"DS", "FL", "FD", "IS", "SL", "SS", "UL", "US", "SV", "UV"})
# Pixel data attributes are always bulk data, whatever their size: viewers fetch them as frames.
ALWAYS_BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Binary values up to this size are inlined (base64); larger ones become BulkDataURIs.
INLINE_BINARY_LIMIT = 256
UNDEFINED_LENGTH = 0xFFFFFFFF

# The stored metadata holds BulkDataURIs relative to the instance's WADO-RS URL; responses prefix them.
BULK_PATH_PREFIX = "bulkdata/"


@dataclass(frozen=True, slots=True)
class BulkRef:
    """Where one bulk data value lies in the stored object (offset and length of the value bytes)."""

    path: str  # e.g. "7FE00010" or "00400275/0/00081110/..." for values inside sequences
    offset: int | None  # byte offset of the value in the file; None when not addressable (deflated, nested)
    length: int  # UNDEFINED_LENGTH for encapsulated values
    vr: str


def encode_dataset(ds: Dataset, bulk: list[BulkRef], path: str = "", *, nested: bool = False) -> dict:
    """DICOM JSON object for ds; large binary values become BulkDataURIs recorded in `bulk`.

    File meta (group 0002) is not part of a dataset's DICOM JSON. Raw elements are decoded from their bytes
    (binary ones are referenced without reading their value, sequences are split into items here);
    converted elements and anything the raw decoder does not handle go through pydicom's conversion.
    """
    if not _fast_path_enabled():
        out: dict[str, Any] = {}
        raw_dict = ds._dict
        for tag in sorted(raw_dict):
            if tag >> 16 != 0x0002:
                key = f"{tag:08X}"
                out[key] = _encode_converted(ds, raw_dict[tag], tag, path + key, nested, bulk)
        return out
    return _encode_node(_Node.of(ds), bulk, path, nested)


# ---------------------------------------------------------------------------------------------------------
# Fast path: raw element bytes -> JSON values


def _fast_path_enabled() -> bool:
    """The raw decoder mirrors pydicom's default conversion only; customised conversion must take effect."""
    cfg = _pydicom_config
    hooks = _pydicom_hooks.hooks
    return (
        cfg.data_element_callback is None
        and hooks.raw_element_vr is _pydicom_hooks.raw_element_vr
        and hooks.raw_element_value is _pydicom_hooks.raw_element_value
        and not hooks.raw_element_kwargs
        and cfg.settings.reading_validation_mode != cfg.RAISE  # pydicom would raise on invalid values
        and not (cfg.use_DS_decimal or cfg.use_DS_numpy or cfg.use_IS_numpy or cfg.datetime_conversion)
    )


_PIXEL_REPRESENTATION = 0x00280103
_PIXEL_DATA = 0x7FE00010
_UNKNOWN = -1  # a Pixel Representation only pydicom can interpret


class _Node:
    """One dataset being encoded: a pydicom Dataset, or a sequence item split from raw bytes here.

    Items split here have no Dataset until an element needs pydicom (private VR lookup, fallback
    conversion); then one is built exactly as pydicom's read_sequence_item would have built it.
    """

    __slots__ = ("_ds", "encoding", "encodings", "implicit", "inherited_pixel_rep", "little", "raw_dict")

    def __init__(
        self,
        ds: Dataset | None,
        raw_dict: dict,
        encodings: list[str],
        implicit: bool,
        little: bool,
        inherited_pixel_rep: int | None,
    ) -> None:
        self._ds = ds
        self.raw_dict = raw_dict
        self.encodings = encodings
        # Text without ISO 2022 escape sequences is decoded with the first character set (PS3.5 6.1.2.5.3)
        self.encoding = encodings[0] if encodings else "iso8859"
        self.implicit = implicit
        self.little = little
        self.inherited_pixel_rep = inherited_pixel_rep

    @classmethod
    def of(cls, ds: Dataset) -> _Node:
        # the character set Dataset.__getitem__ decodes with: the one read with, else the dataset's own
        encodings: Any = ds.original_character_set or ds._character_set
        if isinstance(encodings, str):
            encodings = [encodings]
        implicit, little = ds.original_encoding
        return cls(
            ds,
            ds._dict,
            list(encodings),
            bool(implicit),
            little is not False,
            getattr(ds, "_pixel_rep", None),
        )

    def dataset(self) -> Dataset:
        """The pydicom Dataset of this node (built on first use for items split from raw bytes)."""
        ds = self._ds
        if ds is None:
            # as filereader.read_sequence_item/read_dataset, and Dataset._set_pixel_representation
            ds = Dataset(self.raw_dict, parent_encoding=self.encodings)
            ds.set_original_encoding(self.implicit, self.little, self.encodings)
            ds.is_undefined_length_sequence_item = False
            pixel_rep = self.pixel_rep()
            if pixel_rep is not None and pixel_rep != _UNKNOWN:
                ds._pixel_rep = pixel_rep
            self._ds = ds
        return ds

    def pixel_rep(self) -> int | None:
        """Pixel Representation in effect here (own, else inherited), as pydicom resolves "US or SS"."""
        elem = self.raw_dict.get(_PIXEL_REPRESENTATION)
        if elem is None:
            return self.inherited_pixel_rep
        value = _us_value(elem)
        return _UNKNOWN if value is None else value


def _encode_node(node: _Node, bulk: list[BulkRef], path: str, nested: bool) -> dict:
    out: dict[str, Any] = {}
    raw_dict = node.raw_dict
    decoders = _DECODERS
    dictionary = DicomDictionary
    lut_tags = _LUT_DESCRIPTOR_TAGS
    encoding = node.encoding
    # int keys: sorting pydicom's BaseTag keys would call its Python-level __lt__
    for tag, elem in sorted(zip(map(int, raw_dict), raw_dict.values(), strict=True)):
        if tag >> 16 == 0x0002:
            continue
        key = f"{tag:08X}"
        if type(elem) is RawDataElement:
            # the common case inline: an explicit VR text or number value (fields: tag, VR, length, value,
            # value_tell, is_implicit_VR, is_little_endian, ...)
            vr = elem[1]
            if vr is None:  # implicit VR: the dictionary's, as pydicom's raw_element_vr
                entry = dictionary.get(tag)
                vr = entry[0] if entry is not None else None
            value = elem[3]
            decoder = decoders.get(vr) if vr is not None else None
            if decoder is not None and value and tag not in lut_tags:
                try:
                    values = decoder(value, elem[6], encoding)
                except _Fallback:
                    pass
                else:
                    out[key] = {"vr": vr, "Value": values} if values else {"vr": vr}
                    continue
            entry = _encode_raw(node, elem, tag, path + key, nested, bulk)
            if entry is not None:
                out[key] = entry
                continue
        out[key] = _encode_converted(node.dataset(), elem, tag, path + key, nested, bulk)
    return out


# pydicom corrects the VR of these after conversion (LUT descriptors: first value read as unsigned)
_LUT_DESCRIPTOR_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
# "US or SS" attributes whose VR follows Pixel Representation (pydicom.filewriter._AMBIGUOUS_US_SS_TAGS)
_US_SS_BY_PIXEL_REPRESENTATION = frozenset(
    {
        0x00189810, 0x00221452, 0x00280104, 0x00280105, 0x00280106, 0x00280107, 0x00280108, 0x00280109,
        0x00280110, 0x00280111, 0x00280120, 0x00280121, 0x00409211, 0x00409216, 0x00603004, 0x00603006,
    }
)  # fmt: skip


def _pydicom_vr(node: _Node, raw: RawDataElement) -> str:
    """VR pydicom gives a raw element on conversion (private dictionary, UN replacement, ...)."""
    data: dict[str, Any] = {}
    _pydicom_hooks.raw_element_vr(raw, data, ds=node.dataset())
    return data["VR"]


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """pydicom's dictionary_VR (repeater masks included: ~10 µs uncached), None for unknown tags."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def _private_dictionary_vr(tag: int, creator: str) -> str:
    try:
        return private_dictionary_VR(tag, creator)
    except KeyError:
        return "UN"


def _private_vr(node: _Node, tag: int) -> str | None:
    """VR of a private tag as pydicom's hooks._private_vr_for_tag gives it; None if only it can tell.

    Private creators are LO; other elements get the private dictionary's VR for their creator, else UN.
    """
    element = tag & 0xFFFF
    if 0x0010 <= element <= 0x00FF:
        return "LO"
    if not element & 0xFF00:
        return "UN"
    creator_elem = node.raw_dict.get((tag & 0xFFFF0000) | (element >> 8))
    if creator_elem is None:
        return "UN"
    if isinstance(creator_elem, RawDataElement):
        if creator_elem.VR not in (None, "LO", "UN") or creator_elem.value is None:
            return None
        try:
            creator = _text(creator_elem.value, node.encoding)
        except _Fallback:
            return None
        if "\\" in creator:
            return None  # a multi-valued creator: pydicom warns and gives UN
        creator = creator.rstrip(_PAD)  # as pydicom's LO conversion (leading spaces kept)
    else:
        creator = creator_elem.value
        if not isinstance(creator, str):
            return None
    return _private_dictionary_vr(tag, creator)


def _implicit_vr(node: _Node, raw: RawDataElement, tag: int) -> str | None:
    """VR of an implicit VR element as pydicom's raw_element_vr resolves it; None if only it can."""
    entry = DicomDictionary.get(tag)
    if entry is not None:
        vr: str | None = entry[0]
    else:
        vr = _dictionary_vr(tag)  # repeaters (60xx, 50xx, ...), generic group length
        if vr is None:
            if tag >> 16 & 1:
                vr = _private_vr(node, tag)
                if vr is None:
                    vr = _pydicom_vr(node, raw)
            else:
                vr = "UL" if tag & 0xFFFF == 0 else "UN"  # group length; unknown public tag
    return vr if len(vr) == 2 else _resolve_ambiguous(node, raw, tag, vr)


def _explicit_un_vr(node: _Node, raw: RawDataElement, tag: int) -> str | None:
    """VR pydicom replaces an explicit UN with (config.replace_un_with_known_vr); None if only it can tell."""
    if not _pydicom_config.replace_un_with_known_vr:
        return "UN"
    if tag >> 16 & 1:
        return _private_vr(node, tag)
    if raw.value is None or len(raw.value) < 0xFFFF:
        return _dictionary_vr(tag) or "UN"
    return "UN"


_BITS_ALLOCATED = 0x00280100
# "OB or OW" attributes pydicom resolves by Waveform Bits Allocated (filewriter._AMBIGUOUS_OB_OW_TAGS)
_OB_OW_BY_WAVEFORM_BITS = frozenset({0x54000110, 0x54000112, 0x5400100A, 0x54001010})


def _resolve_ambiguous(node: _Node, raw: RawDataElement, tag: int, vr: str) -> str | None:
    """A dictionary VR like "US or SS" resolved as filewriter.correct_ambiguous_vr_element does.

    None when only pydicom can resolve it ("US or OW" depends on LUT Descriptor values, ...).
    """
    if vr == "OB or OW":
        if tag == _PIXEL_DATA and raw.length == UNDEFINED_LENGTH:
            return "OB"  # encapsulated
        if node.implicit:
            return "OW"  # PS3.5 A.1: implicit VR little endian
        if tag == _PIXEL_DATA:
            bits = _us_value(node.raw_dict.get(_BITS_ALLOCATED))
            return None if bits is None else ("OW" if bits > 8 else "OB")
        # pydicom leaves the others (e.g. Overlay Data) "OB or OW", which is no VR: OW is never wrong
        return None if tag in _OB_OW_BY_WAVEFORM_BITS else "OW"
    if vr == "US or SS" and tag in _US_SS_BY_PIXEL_REPRESENTATION:
        # own or inherited Pixel Representation, else US when the dataset has neither Pixel Representation
        # nor Pixel Data
        pixel_rep = node.pixel_rep()
        if pixel_rep is None:
            raw_dict = node.raw_dict
            return None if _PIXEL_DATA in raw_dict or _PIXEL_REPRESENTATION in raw_dict else "US"
        if pixel_rep != _UNKNOWN:
            return "US" if pixel_rep == 0 else "SS"
    return None


def _us_value(elem: RawDataElement | DataElement | None) -> int | None:
    """The single US value of an element without converting it; None when absent or not plain."""
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        value = elem.value
        if elem.VR not in (None, "US") or value is None or len(value) != 2:
            return None
        return int.from_bytes(value, "little" if elem.is_little_endian else "big")
    value = elem.value
    return value if isinstance(value, int) else None


def _encode_raw(
    node: _Node, raw: RawDataElement, tag: int, elem_path: str, nested: bool, bulk: list[BulkRef]
) -> dict | None:
    """JSON of a raw element decoded from its bytes, or None when pydicom has to convert it."""
    if tag in _LUT_DESCRIPTOR_TAGS:
        return None
    vr = raw.VR
    if vr is None or len(vr) != 2:
        # implicit VR; or undefined length implicit VR, where pydicom's reader puts the dictionary VR
        vr = _implicit_vr(node, raw, tag) if vr is None else _resolve_ambiguous(node, raw, tag, vr)
        if vr is None:
            return None
    elif vr == "UN" and raw.length <= INLINE_BINARY_LIMIT and tag not in ALWAYS_BULK_TAGS:
        # pydicom replaces an explicit UN by the dictionary VR (config.replace_un_with_known_vr) and then
        # decodes the value by that VR; larger UN values stay bulk data, unread, as the file says.
        if _explicit_un_vr(node, raw, tag) != "UN":
            return None
    value = raw.value
    decoder = _DECODERS.get(vr)
    if decoder is not None:
        if not value:
            # deferred (a non-binary value over the defer size) goes to pydicom
            return None if value is None and raw.length else {"vr": vr}
        try:
            values = decoder(value, raw.is_little_endian, node.encoding)
        except _Fallback:
            return None
        return {"vr": vr, "Value": values} if values else {"vr": vr}
    if vr in BINARY_VRS:
        length, tell = _binary_extent(raw)
        if length is not None and (tag in ALWAYS_BULK_TAGS or length > INLINE_BINARY_LIMIT):
            bulk.append(BulkRef(elem_path, None if nested else tell, length, vr))
            return {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
        if value is None:
            return None
        if not value:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr == "SQ":
        return _encode_sequence(node, raw, elem_path, bulk)
    return None  # unknown VR


# ---------------------------------------------------------------------------------------------------------
# Sequences: items split from the raw value here (pydicom's conversion builds a Dataset per item: ~30 µs)


def _encode_sequence(node: _Node, raw: RawDataElement, elem_path: str, bulk: list[BulkRef]) -> dict | None:
    """JSON of a defined-length raw SQ, or None when pydicom has to parse it (anything unusual)."""
    value = raw.value
    if value is None and raw.length and raw.length != UNDEFINED_LENGTH:
        ds = node._ds
        if not isinstance(ds, FileDataset):
            return None
        # deferred: read it as Dataset.__getitem__ would
        src = ds.filename or ds.buffer
        if ds.filename and ds.buffer and not getattr(ds.buffer, "closed", False):
            src = ds.buffer
        raw = read_deferred_data_element(ds.fileobj_type, src, ds.timestamp, raw)
        value = raw.value
    if not value:
        return None if raw.length else {"vr": "SQ"}
    if not isinstance(value, bytes) or raw.length == UNDEFINED_LENGTH:
        return None
    items = _split_items(value, raw.is_implicit_VR, raw.is_little_endian, raw.value_tell)
    if items is None:
        return None
    pixel_rep = node.pixel_rep()
    if pixel_rep == _UNKNOWN:
        return None
    implicit, little, encodings = raw.is_implicit_VR, raw.is_little_endian, node.encodings
    values = [
        _encode_node(
            _Node(None, item, encodings, implicit, little, pixel_rep), bulk, f"{elem_path}/{i}/", True
        )
        for i, item in enumerate(items)
    ]
    return {"vr": "SQ", "Value": values}


_ITEM = 0xFFFEE000
_CHARSET = 0x00080005
_ITEM_HEADER = {True: struct.Struct("<HHL"), False: struct.Struct(">HHL")}


def _split_items(value: bytes, implicit: bool, little: bool, value_tell: int) -> list[dict] | None:
    """The items of a defined-length sequence value as {tag: RawDataElement}; None unless plain.

    Plain means: defined-length items of defined-length elements with standard explicit VRs (or implicit
    VR), framed by dicomcore.framing. Undefined lengths, delimiters, VR switches or truncation are left to
    pydicom's reader, whose recovery heuristics this does not reproduce, and so are items with their own
    character set (pydicom switches encodings). Empty values are b"" (framing has None for some VRs).
    """
    item_header = _ITEM_HEADER[little].unpack_from
    items: list[dict] = []
    end = len(value)
    pos = 0
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = item_header(value, pos)
        pos += 8
        item_end = pos + length
        if (group << 16 | element) != _ITEM or length == UNDEFINED_LENGTH or item_end > end:
            return None
        elements = item_elements(value, pos, item_end, implicit, little, value_tell)
        if elements is None or _CHARSET in elements:
            return None
        for tag, elem in elements.items():
            if type(elem) is not RawDataElement or elem.length == UNDEFINED_LENGTH:
                return None  # a sequence or encapsulated value of undefined length
            if elem.value is None:
                elements[tag] = elem._replace(value=b"")
        items.append(elements)
        pos = item_end
    return items


# ---------------------------------------------------------------------------------------------------------
# Value decoders by VR


class _Fallback(Exception):
    """The raw decoder cannot reproduce pydicom's conversion of this value; use pydicom's."""


# Padding insignificant per PS3.5 6.2 (NUL is tolerated as padding, as pydicom does)
_PAD = " \x00"


def _text(value: bytes, encoding: str) -> str:
    """Text in the dataset's character set; ISO 2022 escape sequences and bad bytes go to pydicom."""
    if b"\x1b" in value:
        raise _Fallback
    try:
        return value.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        raise _Fallback from None


def _split_strip(text: str) -> list[str | None]:
    """Multi-valued string whose leading and trailing spaces are padding; empty values are null."""
    if "\\" not in text:
        text = text.strip(_PAD)
        return [text] if text else []
    return [v.strip(_PAD) or None for v in text.split("\\")]


def _decode_default_text(value: bytes, little: bool, encoding: str) -> list[Any]:
    """AE AS CS DA DT TM UI: pydicom decodes these as ISO 8859-1 whatever the character set."""
    text = value.decode("latin-1")
    if "\\" not in text:  # inlined _split_strip: the most frequent VRs
        text = text.strip(_PAD)
        return [text] if text else []
    return [v.strip(_PAD) or None for v in text.split("\\")]


def _decode_uri(value: bytes, little: bool, encoding: str) -> list[Any]:
    text = value.decode("latin-1").rstrip(_PAD)
    return [text] if text else []


def _decode_lo(value: bytes, little: bool, encoding: str) -> list[Any]:
    """SH LO: multi-valued, leading and trailing spaces are padding."""
    return _split_strip(_text(value, encoding))


def _decode_uc(value: bytes, little: bool, encoding: str) -> list[Any]:
    """UC: multi-valued, trailing spaces are padding."""
    text = _text(value, encoding)
    if "\\" not in text:
        text = text.rstrip(_PAD)
        return [text] if text else []
    return [v.rstrip(_PAD) or None for v in text.split("\\")]


def _decode_long_text(value: bytes, little: bool, encoding: str) -> list[Any]:
    """ST LT UT: single-valued (backslash is an ordinary character), trailing spaces are padding."""
    text = _text(value, encoding).rstrip(_PAD)
    return [text] if text else []


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _decode_pn(value: bytes, little: bool, encoding: str) -> list[Any]:
    values: list[Any] = []
    for text in _text(value, encoding).split("\\"):
        groups = text.rstrip(_PAD).split("=")
        name = {key: group for key, group in zip(_PN_GROUPS, groups, strict=False) if group}
        values.append(name or None)
    return [] if len(values) == 1 and values[0] is None else values


def _decode_is(value: bytes, little: bool, encoding: str) -> list[Any]:
    texts = value.decode("latin-1").rstrip(_PAD).split("\\")
    try:
        values = [int(t) if t.strip() else None for t in texts]
    except ValueError:
        raise _Fallback from None  # pydicom accepts "1.0" and retries other VRs; keep its result
    return [] if len(values) == 1 and values[0] is None else values


def _decode_ds(value: bytes, little: bool, encoding: str) -> list[Any]:
    texts = value.decode("latin-1").strip(_PAD).split("\\")
    values: list[Any] = []
    for t in texts:
        if not t.strip():
            values.append(None)
            continue
        try:
            f = float(t)
        except ValueError:
            raise _Fallback from None
        if not math.isfinite(f):
            raise _Fallback  # kept as pydicom's original string by the converted path
        values.append(f)
    return [] if len(values) == 1 and values[0] is None else values


def _number_decoder(code: str, size: int, floats: bool) -> Callable[[bytes, bool, str], list[Any]]:
    """Decoder of a binary number VR with the element's byte order (struct standard sizes)."""
    formats: dict[tuple[bool, int], struct.Struct] = {}

    def decode(value: bytes, little: bool, encoding: str) -> list[Any]:
        count, rest = divmod(len(value), size)
        if rest:
            raise _Fallback  # pydicom raises BytesLengthException (or makes it UN, if so configured)
        unpack = formats.get((little, count))
        if unpack is None:
            unpack = formats.setdefault(
                (little, count), struct.Struct(f"{'<' if little else '>'}{count}{code}")
            )
        numbers = unpack.unpack(value)
        if floats:
            # JSON has no NaN/Infinity: keep their text rather than emit an invalid number
            return [f if math.isfinite(f) else str(f) for f in numbers]
        return list(numbers)

    return decode


def _decode_at(value: bytes, little: bool, encoding: str) -> list[Any]:
    count, rest = divmod(len(value), 4)
    if rest:
        raise _Fallback
    halves = struct.unpack(f"{'<' if little else '>'}{2 * count}H", value)
    return [f"{halves[i]:04X}{halves[i + 1]:04X}" for i in range(0, 2 * count, 2)]


_Decoder = Callable[[bytes, bool, str], list[Any]]
_DECODERS: dict[str, _Decoder] = {
    **dict.fromkeys(("AE", "AS", "CS", "DA", "DT", "TM", "UI"), _decode_default_text),
    "UR": _decode_uri,
    "SH": _decode_lo,
    "LO": _decode_lo,
    "UC": _decode_uc,
    **dict.fromkeys(("ST", "LT", "UT"), _decode_long_text),
    "PN": _decode_pn,
    "IS": _decode_is,
    "DS": _decode_ds,
    "AT": _decode_at,
    "US": _number_decoder("H", 2, False),
    "SS": _number_decoder("h", 2, False),
    "UL": _number_decoder("L", 4, False),
    "SL": _number_decoder("l", 4, False),
    "UV": _number_decoder("Q", 8, False),
    "SV": _number_decoder("q", 8, False),
    "FL": _number_decoder("f", 4, True),
    "FD": _number_decoder("d", 8, True),
}


def raw_values(raw: RawDataElement) -> list[Any] | None:
    """The values of a raw element of a number or code VR (US, SS, UL, SL, IS, DS, CS) as this module's
    DICOM JSON gives them, decoded from its bytes (~1 µs against ~15 for pydicom's conversion); None where
    pydicom should convert it (another or an unknown VR, a value read lazily, bytes that do not fit)."""
    if raw.VR not in _PLAIN_VRS or raw.value is None:
        return None
    try:
        return _DECODERS[raw.VR](raw.value, raw.is_little_endian, "latin-1")
    except _Fallback:
        return None


_PLAIN_VRS = frozenset({"US", "SS", "UL", "SL", "IS", "DS", "CS"})


# ---------------------------------------------------------------------------------------------------------
# Converted path: pydicom DataElements (sequences, already converted elements, fallbacks)


def _vr_of(raw: RawDataElement | DataElement) -> str:
    vr = raw.VR
    if vr is None:
        vr = dictionary_vr(raw.tag) or "UN"
    return vr


def _encode_converted(
    ds: Dataset,
    raw: RawDataElement | DataElement,
    tag: int,
    elem_path: str,
    nested: bool,
    bulk: list[BulkRef],
) -> dict:
    """JSON of one element via pydicom's conversion (ds[tag]), which also resolves VRs from context."""
    vr = _vr_of(raw)
    if vr in BINARY_VRS:
        length, tell = _binary_extent(raw)
        if length is not None and (tag in ALWAYS_BULK_TAGS or length > INLINE_BINARY_LIMIT):
            bulk.append(BulkRef(elem_path, None if nested else tell, length, vr))
            return {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
    elem = ds[tag]
    # pydicom resolves implicit-VR and UN elements against the dictionary on conversion
    vr = elem.VR if elem.VR else vr
    if vr in BINARY_VRS and elem.value is not None and len(elem.value) > INLINE_BINARY_LIMIT:
        bulk.append(BulkRef(elem_path, None, len(elem.value), vr))
        return {"vr": vr, "BulkDataURI": BULK_PATH_PREFIX + elem_path}
    return _element_json(elem, vr, elem_path, bulk)


# VRs whose leading spaces are padding too (PS3.5 6.2); in the others only trailing spaces are
_LEADING_PAD_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})


def _string_values(value: Any, vr: str) -> list[Any]:
    """Values of a converted string element, padding stripped as the raw decoders do."""
    items = list(value) if isinstance(value, (list, MultiValue)) else [value]
    both = vr in _LEADING_PAD_VRS
    values = []
    for v in items:
        text = "" if v is None else str(v)
        values.append((text.strip(_PAD) if both else text.rstrip(_PAD)) or None)
    return values


def _pn_value(value: Any) -> dict[str, str] | None:
    text = str(value).rstrip(_PAD) if value is not None else ""
    name = {key: group for key, group in zip(_PN_GROUPS, text.split("="), strict=False) if group}
    return name or None


def _number(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        f = float(value)
        # JSON has no NaN/Infinity: keep the original text rather than emit an invalid number
        return f if math.isfinite(f) else str(value).strip(_PAD)
    text = str(value).strip(_PAD)
    if not text:
        return None
    try:
        f = float(text)
    except ValueError:
        return text
    if f.is_integer() and "." not in text and "e" not in text.lower():
        return int(f)
    return f if math.isfinite(f) else text


def _element_json(elem: DataElement, vr: str, path: str, bulk: list[BulkRef]) -> dict:
    out: dict[str, Any] = {"vr": vr}
    value = elem.value
    if vr == "SQ":
        items = [
            encode_dataset(item, bulk, f"{path}/{i}/", nested=True) for i, item in enumerate(value or [])
        ]
        if items:
            out["Value"] = items
        return out
    if value is None or (isinstance(value, (str, bytes, list, MultiValue, PersonName)) and not value):
        return out
    values = value if isinstance(value, (list, MultiValue)) else [value]
    if vr == "PN" or isinstance(value, PersonName):
        json_values = [_pn_value(v) for v in values]
    elif vr in NUMBER_VRS:
        json_values = [_number(v) for v in values]
    elif vr == "AT":
        json_values = [f"{int(v):08X}" for v in values]
    elif vr in BINARY_VRS:
        out["InlineBinary"] = base64.b64encode(bytes(value)).decode("ascii")
        return out
    else:
        json_values = _string_values(value, vr)
    # an attribute whose only value is empty has no Value (PS3.18 F.2.5), as in the raw decoders
    if json_values != [None]:
        out["Value"] = json_values
    return out


def _binary_extent(raw: RawDataElement | DataElement) -> tuple[int | None, int | None]:
    """(value length, value offset) of a binary element without reading its value."""
    if isinstance(raw, RawDataElement):
        length = raw.length
        if raw.value is not None and length == UNDEFINED_LENGTH:
            # an encapsulated value that was read whole: its fragments start at value_tell
            return len(raw.value), raw.value_tell
        return length, raw.value_tell
    value = raw.value
    return (len(value) if value is not None else 0), None


# ---------------------------------------------------------------------------------------------------------
# Reading DICOM JSON objects


def values_of(attrs: dict, key: str) -> list[Any]:
    """The Value list of one attribute of a DICOM JSON object ([] when absent or empty)."""
    entry = attrs.get(key)
    if not entry:
        return []
    return entry.get("Value") or []


def first_value(attrs: dict, key: str) -> Any:
    values = values_of(attrs, key)
    return values[0] if values else None


def select(attrs: dict, keys: Iterable[str]) -> dict:
    """The sub-object holding just the given attribute keys (those present)."""
    return {k: attrs[k] for k in keys if k in attrs}
