"""Applying a resolved de-identification plan to one PS3.10 object (the pydicom half of `deid`).

`deid` decides *what* happens to each attribute (PS3.15 Table E.1-1 and its options, resolved into a Plan of
plain data) and owns the keys (UID and pseudonym derivation); this module only walks the data set and
applies it. It lives here because only dicomcore imports pydicom (see docs/architecture.md).

Walk: every element of the data set and of every item of every retained sequence, recursively. An element's
action comes from the plan by exact tag, then by repeating-group mask; private elements are removed unless
safe-listed; public tags unknown to the data dictionary are removed; person names and free text the
table does not list are emptied; everything else is kept. UIDs outside the table that are not well-known
DICOM UIDs (class UIDs, transfer syntaxes, 1.2.840.10008.*) are remapped too, so no instance-specific UID
survives in a place the table forgot. Elements kept unchanged are never decoded (pydicom keeps them raw),
which is most of an image's bytes and what keeps this fast. Details: docs/deidentification.md.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from struct import Struct
from typing import BinaryIO, Protocol

import pydicom
from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from dicomcore.framing import convert_sequence, read_file, transfer_syntax_uid

DEFER_SIZE = 4096  # values larger than this are not read when parsing (copied from the source instead)
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"
# explicit VR elements whose header is 12 bytes (2-byte reserved field and 4-byte length)
_LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})

# Actions of a resolved plan (combined codes are resolved by deid.profile before they get here).
REMOVE, EMPTY, DUMMY, KEEP, CLEAN, UID = "X", "Z", "D", "K", "C", "U"
UNLISTED = "-"  # not in the table: kept, except UIDs that are not well-known ones

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ISSUER_OF_PATIENT_ID = 0x00100021
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016
MODALITY = 0x00080060
BURNED_IN = 0x00280301
PIXEL_DATA = 0x7FE00010
PIXEL_DATA_TAGS = (PIXEL_DATA, 0x7FE00008, 0x7FE00009)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Modalities where text is often burned into pixels; without BurnedInAnnotation they count as YES.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XA", "ES", "OT"})

DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, str] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "CS": "ANONYMIZED",
}
_NUMERIC_BINARY = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_BYTES = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_FREE_TEXT = frozenset({"PN", "LT", "ST", "UT", "UC"})
_TEXT = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
WELL_KNOWN_UID_ROOT = "1.2.840.10008."
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1235.1"  # this archive's; not an instance UID
IMPLEMENTATION_VERSION = "DICOMWEB_DEID_1"


class Keys(Protocol):
    """What the walk needs from the project's keys (deid.keys.ProjectKeys)."""

    def uid(self, original: str) -> str: ...

    def patient_pseudonym(self, patient_id: str, issuer: str) -> str: ...

    def date_shift_days(self, patient_id: str, issuer: str) -> int: ...


@dataclass(frozen=True, slots=True)
class PixelRule:
    """Rectangles (x, y, width, height) to black out in images of one manufacturer / model / size."""

    rectangles: tuple[tuple[int, int, int, int], ...]
    manufacturer: str | None = None
    model: str | None = None
    rows: int | None = None
    columns: int | None = None

    def matches(self, manufacturer: str, model: str, rows: int, columns: int) -> bool:
        return (
            (self.manufacturer is None or self.manufacturer.strip().lower() == manufacturer.strip().lower())
            and (self.model is None or self.model.strip().lower() == model.strip().lower())
            and (self.rows is None or self.rows == rows)
            and (self.columns is None or self.columns == columns)
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """A resolved profile: plain data, built by deid.profile."""

    actions: Mapping[int, str]  # exact tag -> action
    masked: Sequence[tuple[int, int, str]] = ()  # (value, mask, action) for repeating groups (60xx,3000)
    safe_private: frozenset[tuple[int, str, int]] = frozenset()  # (group, creator lower, element low byte)
    retain_safe_private: bool = False
    shift_dates: bool = False  # C on dates/times shifts them by the patient's offset
    keep_uids: bool = False  # Retain UIDs: the table's U rows are K already; also keep unlisted UIDs
    codes: tuple[tuple[str, str], ...] = ()  # CID 7050 (code value, meaning) for the method sequence
    method: tuple[str, ...] = ()  # DeidentificationMethod values (LO, each at most 64 characters)
    temporal: str = "REMOVED"  # LongitudinalTemporalInformationModified
    pixel_rules: tuple[PixelRule, ...] = ()
    clean_pixel_code: tuple[str, str] = ("113101", "Clean Pixel Data Option")
    # tag -> (action, dictionary VR), filled as tags are met; shared by every instance the plan handles
    resolved: dict[int, tuple[str, str | None]] = field(default_factory=dict, compare=False, repr=False)


@dataclass(slots=True)
class Identity:
    patient_id: str
    study: str
    series: str
    sop: str
    issuer: str = ""


@dataclass(slots=True)
class Deidentified:
    data: bytes
    original: Identity
    new: Identity
    sop_class_uid: str
    transfer_syntax_uid: str
    uids: dict[str, str] = field(default_factory=dict)  # every original UID remapped -> its new UID


class Skipped(Exception):
    """The instance is not exported (fail closed); the message says why."""


class _Walk:
    """One instance's walk: applies the plan element by element, on raw bytes where it can."""

    def __init__(self, plan: Plan, keys: Keys, patient_id: str, issuer: str, encoding: tuple[bool, bool]):
        self.plan = plan
        self.keys = keys
        self.uids: dict[str, str] = {}
        self.pseudonym = keys.patient_pseudonym(patient_id, issuer)
        self._patient = (patient_id, issuer)
        self._shift: timedelta | None = None
        self.implicit, self.little = encoding

    # --- keys -------------------------------------------------------------------------------------------
    def uid(self, value: str) -> str:
        if not value:
            return value
        new = self.uids.get(value)
        if new is None:
            new = self.uids[value] = self.keys.uid(value)
        return new

    def keep_or_map_uid(self, tag: int, value: str) -> str:
        """UIDs the table does not list: well-known ones (classes, transfer syntaxes, coding schemes) stay,
        anything instance-like is remapped."""
        if not value or value.startswith(WELL_KNOWN_UID_ROOT) or _is_class_uid(tag):
            return value
        return self.uid(value)

    @property
    def shift(self) -> timedelta:
        if self._shift is None:
            self._shift = timedelta(days=self.keys.date_shift_days(*self._patient))
        return self._shift

    # --- actions ----------------------------------------------------------------------------------------
    def action(self, tag: int) -> tuple[str, str | None]:
        """The plan's action for a public tag and its dictionary VR (None when unknown)."""
        resolved = self.plan.resolved.get(tag)
        if resolved is not None:
            return resolved
        try:
            vr: str | None = get_entry(tag)[0]
        except KeyError:
            vr = None
        action = self.plan.actions.get(tag)
        if action is None:
            for value, mask, masked_action in self.plan.masked:
                if tag & mask == value:
                    action = masked_action
                    break
        if action is None:
            # group lengths are recomputed by the writer; public tags unknown to the dictionary are removed
            # (a documented safe default); person names and free text the table does not list (e.g. Text
            # Value in structured content) are emptied: that is where PHI hides
            if tag & 0xFFFF == 0 or vr is None:
                action = REMOVE
            elif vr in _FREE_TEXT:
                action = EMPTY
            else:
                action = UNLISTED
        self.plan.resolved[tag] = (action, vr)
        return action, vr

    def dataset(self, ds: Dataset) -> None:
        # Dictionary keys are pydicom BaseTags, whose == is Python code: elements are looked up with the
        # key objects themselves (identity hits) and compared as plain ints, which is measurably faster.
        private_blocks: dict[tuple[int, int], str] = {}  # (group, block) -> creator, for this level
        retained_blocks: set[tuple[int, int]] = set()
        elements = ds._dict
        for key in list(elements):
            tag = int(key)
            group = tag >> 16
            if group == 0x0002:  # file meta inside the data set: a fresh file meta is written instead
                del elements[key]
                continue
            if not group & 1:
                self.element(ds, key, tag)
                continue
            element = tag & 0xFFFF
            if 0x0010 <= element <= 0x00FF:
                private_blocks[(group, element)] = _creator(ds, tag)
                continue
            if element < 0x0010:  # private group length or illegal: drop
                del elements[key]
                continue
            block = (group, element >> 8)
            creator = private_blocks.get(block)
            if creator is None:
                creator = private_blocks[block] = _creator(ds, (group << 16) | (element >> 8))
            safe = (group, creator, element & 0xFF) in self.plan.safe_private
            if safe and self.plan.retain_safe_private:
                retained_blocks.add(block)
                if ds[key].VR == "SQ":
                    self.items(ds[key])
                continue
            del elements[key]
        for group, block in private_blocks:
            if (group, block) not in retained_blocks:
                elements.pop(Tag((group << 16) | block), None)

    def element(self, ds: Dataset, key: BaseTag, tag: int) -> None:
        action, dictionary_vr = self.action(tag)
        elements = ds._dict
        if action == REMOVE:
            del elements[key]
            return
        elem = elements[key]
        vr = elem.VR or dictionary_vr or "UN"
        if (tag == PATIENT_ID or tag == PATIENT_NAME) and action != KEEP and action != UNLISTED:
            self.put(ds, key, vr, self.pseudonym)
            return
        if vr == "SQ":
            if action == EMPTY:
                ds[key].value = DicomSequence()
            else:  # K, D, C, U on a sequence: keep its items, de-identified like the rest (PS3.15 E.1.1)
                self.items(convert_sequence(ds, key))
            return
        if action == KEEP:
            return
        if action == UNLISTED:
            if vr == "UI" and not self.plan.keep_uids:
                values = self.strings(ds, key)
                mapped = [self.keep_or_map_uid(tag, v) for v in values]
                if mapped != values:
                    self.put(ds, key, vr, "\\".join(mapped))
            return
        if action == UID or (vr == "UI" and action in (DUMMY, CLEAN)):
            self.put(ds, key, vr, "\\".join(self.uid(v) for v in self.strings(ds, key)))
        elif action == EMPTY:
            self.put(ds, key, vr, "")
        elif action == CLEAN:
            if vr in ("DA", "DT", "TM") and self.plan.shift_dates:
                self.put(ds, key, vr, "\\".join(_shift(v, vr, self.shift) for v in self.strings(ds, key)))
            else:  # free text we cannot prove clean: fail closed to an empty value
                self.put(ds, key, vr, "")
        elif self.strings(ds, key) == [] and vr not in _BYTES:  # DUMMY of an empty value stays empty
            self.put(ds, key, vr, "")
        else:  # DUMMY
            self.put(ds, key, vr, DUMMY_BY_VR.get(vr, DUMMY_TEXT if vr in _TEXT else ""))

    def items(self, elem: DataElement) -> None:
        for item in elem.value or ():
            self.dataset(item)

    def strings(self, ds: Dataset, key: BaseTag) -> list[str]:
        """The element's values as text, without decoding it through pydicom when still raw."""
        elem = ds._dict[key]
        if isinstance(elem, RawDataElement) and elem.value is not None:
            text = elem.value.decode("latin-1").strip("\x00 ")
            return [v.strip("\x00 ") for v in text.split("\\")] if text else []
        value = ds[key].value
        if value is None or value == "":
            return []
        if isinstance(value, (list, pydicom.multival.MultiValue)):
            return [str(v).strip("\x00 ") for v in value]
        return [str(value).strip("\x00 ")]

    def put(self, ds: Dataset, key: BaseTag, vr: str, text: str) -> None:
        """Replace the element by an already encoded one (all values this module writes are ASCII)."""
        if vr in _BYTES:
            value = b""
        elif vr in _NUMERIC_BINARY:
            value = _binary_zero(vr, self.little) if text else b""
        else:
            value = text.encode("ascii")
            if len(value) % 2:
                value += b"\x00" if vr == "UI" else b" "
        ds._dict[key] = RawDataElement(key, vr, len(value), value, 0, self.implicit, self.little)


def _binary_zero(vr: str, little: bool) -> bytes:
    size = 8 if vr in ("FD", "UV", "SV") else 2 if vr in ("US", "SS") else 4
    return b"\x00" * size


def _creator(ds: Dataset, tag: int) -> str:
    elem = ds._dict.get(Tag(tag))
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value or "").strip("\x00 ").lower()


def _is_class_uid(tag: int) -> bool:
    try:
        keyword = get_entry(tag)[4]
    except KeyError:
        return False
    return keyword.endswith("ClassUID") or keyword in ("TransferSyntaxUID", "CodingSchemeUID")


def _shift(value: str, vr: str, shift: timedelta) -> str:
    """Move a DA/DT value by the patient's offset, keeping the time of day (whole days are shifted).
    TM values stay; DA/DT values without a full date cannot be shifted and are emptied (fail closed)."""
    value = value.strip()
    if not value or vr == "TM":
        return value
    try:
        day = date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return ""
    if vr == "DA" and len(value) != 8:
        return ""
    return (day + shift).strftime("%Y%m%d") + value[8:]


def _text(ds: Dataset, tag: int) -> str:
    """The first value of a top-level element as text ('' when absent)."""
    elem = ds._dict.get(Tag(tag))
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement) and elem.value is not None and elem.value.isascii():
        return elem.value.decode("ascii").split("\\")[0].strip("\x00 ")
    value = ds[tag].value  # decoded with the data set's character set
    if value is None:
        return ""
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        value = value[0] if value else ""
    return str(value).strip("\x00 ")


def _burned_in(ds: Dataset) -> str | None:
    """Why this instance may carry text in its pixels, or None."""
    if not any(tag in ds._dict for tag in PIXEL_DATA_TAGS):  # Pixel, Float and Double Float Pixel Data
        return None
    flag = _text(ds, BURNED_IN).upper()
    modality = _text(ds, MODALITY).upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag and flag != "NO":  # YES or NO only (PS3.3 C.7.6.1.1.4): anything else may mean text, fail closed
        return f"BurnedInAnnotation is {flag!r}, not NO"
    if not flag and modality in BURNED_IN_MODALITIES:
        return f"modality {modality} without BurnedInAnnotation (text is often burned in)"
    return None


def _clean_pixels(ds: Dataset, rule: PixelRule) -> None:
    """Black out the rule's rectangles in every frame (compressed pixel data is decoded first)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    arr = ds.pixel_array.copy()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    view = arr if frames > 1 else arr[None, ...]
    for x, y, w, h in rule.rectangles:
        view[:, y : y + h, x : x + w, ...] = 0
    keyword = next(k for t, k in zip(PIXEL_DATA_TAGS, _PIXEL_KEYWORDS, strict=True) if t in ds._dict)
    setattr(ds, keyword, arr.tobytes())  # where the pixels were (float pixel data stays float)
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:
        ds.PlanarConfiguration = 0
    ds.BurnedInAnnotation = "NO"


def deidentify(source: bytes | BinaryIO, plan: Plan, keys: Keys) -> Deidentified:
    """De-identify one PS3.10 object; raises Skipped when it must not leave (burned-in text, unreadable)."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        # large values stay unread: kept ones are copied from the source by _encode, never decoded
        ds = read_file(fp, DEFER_SIZE)
    except Exception as exc:
        # the reason names the error only: parser messages may quote the data, and reasons reach error logs
        raise Skipped(f"cannot parse DICOM ({exc.__class__.__name__})") from exc
    transfer_syntax = transfer_syntax_uid(ds)
    if not transfer_syntax:
        raise Skipped("file meta lacks TransferSyntaxUID")
    patient_id, issuer = _text(ds, PATIENT_ID), _text(ds, ISSUER_OF_PATIENT_ID)
    original = Identity(patient_id, _text(ds, STUDY_UID), _text(ds, SERIES_UID), _text(ds, SOP_UID), issuer)
    if not (original.study and original.series and original.sop):
        raise Skipped("StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID is missing")
    sop_class = _text(ds, SOP_CLASS_UID)
    codes = plan.codes
    reason = _burned_in(ds)
    if reason is not None:
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        device = (_text(ds, 0x00080070), _text(ds, 0x00081090))
        rule = next((r for r in plan.pixel_rules if r.matches(*device, *size)), None)
        if rule is None:
            raise Skipped(f"{reason}; no pixel-cleaning rule applies")
        try:
            _clean_pixels(ds, rule)
        except Exception as exc:
            raise Skipped(f"{reason}; pixel cleaning failed ({exc.__class__.__name__})") from exc
        codes = (*codes, plan.clean_pixel_code)
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    if ds.is_implicit_VR is not None:  # changed by decompress()
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    encoding = (bool(implicit), bool(little))
    walk = _Walk(plan, keys, patient_id, issuer, encoding)
    walk.dataset(ds)
    new_sop = _text(ds, SOP_UID)
    new = Identity(walk.pseudonym, _text(ds, STUDY_UID), _text(ds, SERIES_UID), new_sop)
    meta = _file_meta(sop_class, new_sop, transfer_syntax)
    if transfer_syntax == DEFLATED:
        data = _encode_with_pydicom(ds, _mark_dataset(codes, plan.method, plan.temporal), meta)
    else:
        data = _encode(ds, fp, _marks(codes, plan.method, plan.temporal, encoding), meta, encoding)
    return Deidentified(data, original, new, sop_class, transfer_syntax, walk.uids)


_MARK_TAGS = (0x00120062, 0x00120063, 0x00120064, 0x00280303)
_marks_cache: dict[tuple, dict[int, bytes]] = {}


def _marks(
    codes: tuple[tuple[str, str], ...], method: tuple[str, ...], temporal: str, encoding: tuple[bool, bool]
) -> dict[int, bytes]:
    """PatientIdentityRemoved, the method and its CID 7050 codes, LongitudinalTemporalInformationModified,
    encoded once per profile and encoding (they are the same for every instance)."""
    key = (codes, method, temporal, encoding)
    cached = _marks_cache.get(key)
    if cached is not None:
        return cached
    ds = _mark_dataset(codes, method, temporal)
    encoded = {}
    for tag in _MARK_TAGS:
        out = DicomBytesIO()
        out.is_implicit_VR, out.is_little_endian = encoding
        write_data_element(out, ds[tag])
        encoded[tag] = out.getvalue()
    if len(_marks_cache) > 64:
        _marks_cache.clear()
    _marks_cache[key] = encoded
    return encoded


def _mark_dataset(codes: tuple[tuple[str, str], ...], method: tuple[str, ...], temporal: str) -> Dataset:
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [m[:64] for m in method]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    ds.LongitudinalTemporalInformationModified = temporal
    return ds


def _encode(
    ds: Dataset, source: BinaryIO, marks: dict[int, bytes], meta: bytes, encoding: tuple[bool, bool]
) -> bytes:
    """A PS3.10 file of the de-identified data set: zero preamble, fresh file meta, then the elements.

    Elements still raw (never decoded) are written from their raw bytes, values that were deferred at read
    time (pixel data) are copied from the source, replaced values from their new bytes, sequences item by
    item; only elements pydicom decoded go through its writer. Several times faster than re-encoding every
    element with pydicom, which matters at hundreds of instances per second. The pieces are joined once at
    the end; deferred values of an in-memory source are views of it, so the pixel data is copied once."""
    implicit, little = encoding
    parts: list[bytes | memoryview] = [b"\x00" * 128 + b"DICM" + meta]
    # BytesIO.getvalue shares the buffer (no copy); getbuffer would unshare (copy) it
    whole = memoryview(source.getvalue()) if isinstance(source, io.BytesIO) else None
    _write_dataset(parts, ds, source, whole, marks, implicit, "<" if little else ">")
    return b"".join(parts)


_STRUCTS = {
    endian: (Struct(endian + "HHL"), Struct(endian + "HH2sHL"), Struct(endian + "HH2sH")) for endian in "<>"
}


def _write_dataset(
    parts: list[bytes | memoryview],
    ds: Dataset,
    source: BinaryIO | None,
    whole: memoryview | None,
    marks: dict[int, bytes],
    implicit: bool,
    endian: str,
) -> None:
    elements = ds._dict
    ordered = sorted(
        [(int(key), key) for key in elements] + [(tag, None) for tag in marks if tag not in elements]
    )
    append = parts.append
    short, long, explicit = (s.pack for s in _STRUCTS[endian])
    long_vrs = _LONG_HEADER_VRS
    for tag, key in ordered:
        mark = marks.get(tag)
        if mark is not None:
            append(mark)
            continue
        elem = elements[key]
        if type(elem) is RawDataElement:
            if elem.length == UNDEFINED_LENGTH:
                if elem.value is None:  # deferred encapsulated pixel data: its items, copied as they are
                    append(_header(tag, elem.VR, UNDEFINED_LENGTH, implicit, endian))
                    append(_encapsulated_items(source, whole, elem.value_tell, endian))
                else:
                    append(_pydicom_encoded(elem, None, implicit, endian))  # with its delimiter
                continue
            value = elem.value
            if value is None and elem.length == 0:  # an empty implicit VR value (at any level)
                value = b""
            elif value is None:  # deferred: in the source at value_tell (top level only)
                if whole is not None:
                    value = whole[elem.value_tell : elem.value_tell + elem.length]
                else:
                    assert source is not None
                    source.seek(elem.value_tell)
                    value = source.read(elem.length)
            vr = elem.VR
            if vr is None and not implicit:
                # read implicit, written explicit (its pixel data decoded to explicit little endian): the
                # header needs the VR the reader never saw
                explicit_elem = _with_dictionary_vr(ds, elem._replace(value=bytes(value), length=len(value)))
                append(_pydicom_encoded(explicit_elem, ds._character_set, implicit, endian))
                continue
            if implicit:
                append(short(tag >> 16, tag & 0xFFFF, len(value)))
            elif vr in long_vrs:
                append(long(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)))
            else:
                append(explicit(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)))
            append(value)
        elif elem.VR == "SQ":
            append(_header(tag, "SQ", UNDEFINED_LENGTH, implicit, endian))
            for item in elem.value or ():
                append(short(0xFFFE, 0xE000, UNDEFINED_LENGTH))
                _write_dataset(parts, item, None, None, {}, implicit, endian)
                append(short(0xFFFE, 0xE00D, 0))
            append(short(0xFFFE, 0xE0DD, 0))
        else:
            append(_pydicom_encoded(elem, ds._character_set, implicit, endian))


def _with_dictionary_vr(ds: Dataset, raw: RawDataElement) -> DataElement:
    """An element read without its VR (implicit VR), its value in hand, converted with the data
    dictionary's VR ('UN' for tags it does not know) and an ambiguous one ('US or SS') resolved, as
    pydicom's writer would."""
    elem = convert_raw_data_element(raw, encoding=ds._character_set, ds=ds)
    return correct_ambiguous_vr_element(elem, ds, True)


def _encapsulated_items(
    source: BinaryIO | None, whole: memoryview | None, value_tell: int, endian: str
) -> bytes | memoryview:
    """The items of a deferred undefined-length value (PS3.5 A.4) from the source, through its Sequence
    Delimitation Item: the reader found them well formed (dicomcore.framing, or pydicom) before deferring."""
    item = Struct(endian + "HHL")
    pos = value_tell
    while True:
        if whole is not None:
            group, element, length = item.unpack_from(whole, pos)
        else:
            assert source is not None
            source.seek(pos)
            group, element, length = item.unpack(source.read(8))
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        pos += length
    if whole is not None:
        return whole[value_tell:pos]
    assert source is not None
    source.seek(value_tell)
    return source.read(pos - value_tell)


def _pydicom_encoded(
    elem: DataElement | RawDataElement, charset: str | list[str] | None, implicit: bool, endian: str
) -> bytes:
    """One element as pydicom's writer encodes it (values it decoded, undefined-length raw values)."""
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = implicit, endian == "<"
    if charset is None:
        write_data_element(out, elem)
    else:
        write_data_element(out, elem, charset)
    return out.getvalue()


def _header(tag: int, vr: str | None, length: int, implicit: bool, endian: str) -> bytes:
    short, long, explicit = _STRUCTS[endian]
    if implicit or vr is None:
        return short.pack(tag >> 16, tag & 0xFFFF, length)
    if vr in _LONG_HEADER_VRS:
        return long.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return explicit.pack(tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _encode_with_pydicom(ds: Dataset, marks: Dataset, meta: bytes) -> bytes:
    """Deflated data sets: pydicom writes (and deflates) them."""
    for elem in marks:
        ds[elem.tag] = elem
    ds.file_meta = pydicom.dcmread(io.BytesIO(b"\x00" * 128 + b"DICM" + meta), force=True).file_meta
    ds.preamble = b"\x00" * 128
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _meta_element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    if vr == "OB":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"OB", 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """File meta information (PS3.10 7.1), always explicit VR little endian, written directly: pydicom's
    writer deep-copies and validates it, which cost more than the rest of a small instance."""
    body = b"".join(
        (
            _meta_element(0x00020001, "OB", b"\x00\x01"),
            _meta_element(0x00020002, "UI", sop_class.encode()),
            _meta_element(0x00020003, "UI", sop_instance.encode()),
            _meta_element(0x00020010, "UI", transfer_syntax.encode()),
            _meta_element(0x00020012, "UI", IMPLEMENTATION_CLASS_UID.encode()),
            _meta_element(0x00020013, "SH", IMPLEMENTATION_VERSION.encode()),
        )
    )
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body
