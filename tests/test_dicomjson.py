"""DICOM JSON encoding (dicomcore.dicomjson) against pydicom's own Dataset/DataElement.to_json_dict.

encode_dataset decodes raw element bytes itself for speed; these tests hold it to pydicom's conversion for
every attribute that is not bulk data, on pydicom's bundled test files and on random datasets written by
pydicom in all three uncompressed transfer syntaxes, and check that bulk data references point at the value
bytes in the file.

Known, deliberate differences from pydicom are normalised here (see the dicomjson module docstring):
empty values are null and padding is stripped per PS3.5 6.2 (pydicom keeps "" and some padding), empty PN
component groups are omitted, an empty sequence has no "Value" (pydicom: []), non-finite floats are strings
(pydicom: NaN, invalid JSON), and implicit VR "OB or OW" is OW (pydicom leaves some ambiguous).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import string
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.hooks import hooks, raw_element_value, raw_element_value_fix_separator
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomcore.dicomjson import (
    ALWAYS_BULK_TAGS,
    BULK_PATH_PREFIX,
    INLINE_BINARY_LIMIT,
    UNDEFINED_LENGTH,
    BulkRef,
    encode_dataset,
    first_value,
    select,
    values_of,
)
from dicomcore.parse import DEFER_SIZE, InvalidInstanceError, parse_instance

DATA_DIR = Path(pydicom.__file__).parent / "data"
# pydicom's bundled files (get_testdata_files would try to download the others); charset files add ISO 2022
TEST_FILES = sorted((DATA_DIR / "test_files").glob("*.dcm")) + sorted(
    (DATA_DIR / "charset_files").glob("*.dcm")
)

FAILED = "<pydicom cannot encode this element>"
PAD = " \x00"
LEADING_PAD_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"}
TRAILING_PAD_VRS = {"LT", "ST", "UT", "UC", "UR", "PN"}
FLOAT_VRS = {"DS", "FL", "FD"}


# ---------------------------------------------------------------------------------------------------------
# pydicom's DICOM JSON, normalised


def bulk_marker(value: bytes) -> str:
    return f"bulk:{len(value)}:{hashlib.sha1(value).hexdigest()}"


def reference_json(ds: Dataset) -> dict[str, Any]:
    """pydicom's to_json_dict of each element; FAILED where pydicom cannot encode it (invalid values).

    Every binary value over 3 bytes becomes a marker of its length and hash (via the bulk data handler and
    bulk_data_threshold=4), so that both inline and bulk values can be checked.
    """
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in ds.keys():
            try:
                out[f"{tag:08X}"] = ds[tag].to_json_dict(lambda e: bulk_marker(e.value), 4)
            except Exception:
                out[f"{tag:08X}"] = FAILED
    return out


def canon_value(vr: str, value: Any) -> Any:
    """One value in the form encode_dataset gives it (padding, empty values, PN groups, non-finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ("non-finite", str(value).lower())
    if isinstance(value, dict):  # PN
        groups = {k: g.rstrip(PAD) for k, g in value.items()}
        return {k: g for k, g in groups.items() if g} or None
    if isinstance(value, str):
        value = value.strip(PAD) if vr in LEADING_PAD_VRS else value.rstrip(PAD)
        if vr in FLOAT_VRS:
            try:
                f = float(value)
            except ValueError:
                pass
            else:
                if not math.isfinite(f):
                    return ("non-finite", str(f))
        return value or None
    return value


def canon_values(vr: str, values: list[Any] | None) -> list[Any] | None:
    result = [canon_value(vr, v) for v in values or []]
    return result if result and result != [None] else None


def assert_canonical(vr: str, values: list[Any] | None, where: str) -> None:
    """encode_dataset's own values need no normalising: no padding, no '' (null), no lone empty value."""
    if values is None:
        return
    assert values and values != [None], where
    for v in values:
        if isinstance(v, str):
            assert v, where
            if vr in LEADING_PAD_VRS:
                assert v == v.strip(PAD), where
            elif vr in TRAILING_PAD_VRS:
                assert v == v.rstrip(PAD), where
        elif isinstance(v, dict):
            assert v and all(v.values()) and set(v) <= {"Alphabetic", "Ideographic", "Phonetic"}, where
        elif isinstance(v, float):
            assert math.isfinite(v), where  # non-finite ones are strings


def assert_matches_pydicom(ours: dict, ref: dict, path: str = "") -> None:
    """Same attributes, VRs and values (normalised) as pydicom; bulk data only where it should be."""
    ref = {k: v for k, v in ref.items() if not k.startswith("0002")}
    assert set(ours) == set(ref), path
    for key, r in ref.items():
        o = ours[key]
        where = f"{path}{key}: ours {o!r:.300} pydicom {r!r:.300}"
        if r == FAILED:
            continue  # invalid value pydicom cannot put in JSON; ours is checked to be valid JSON
        vr = "OW" if r["vr"] == "OB or OW" else r["vr"]  # implicit VR: OW per PS3.5 A.1
        assert o["vr"] == vr, where
        if vr == "SQ":
            assert "Value" not in o or o["Value"], where
            o_items, r_items = o.get("Value") or [], r.get("Value") or []
            assert len(o_items) == len(r_items), where
            for i, (o_item, r_item) in enumerate(zip(o_items, r_items, strict=True)):
                assert_matches_pydicom(o_item, r_item, f"{path}{key}/{i}/")
        elif "BulkDataURI" in o:
            assert o["BulkDataURI"] == BULK_PATH_PREFIX + path + key, where
            if "InlineBinary" in r:  # up to 3 bytes: only pixel data is bulk data at that size
                assert int(key, 16) in ALWAYS_BULK_TAGS, where
            else:
                length = int(r["BulkDataURI"].split(":")[1])
                assert length > INLINE_BINARY_LIMIT or int(key, 16) in ALWAYS_BULK_TAGS, where
        elif "InlineBinary" in o:
            data = base64.b64decode(o["InlineBinary"])
            assert 0 < len(data) <= INLINE_BINARY_LIMIT, where
            if "InlineBinary" in r:
                assert r["InlineBinary"] == o["InlineBinary"], where
            else:
                assert r["BulkDataURI"] == bulk_marker(data), where
        else:
            assert "InlineBinary" not in r and "BulkDataURI" not in r, where
            assert_canonical(vr, o.get("Value"), where)
            assert canon_values(vr, o.get("Value")) == canon_values(vr, r.get("Value")), where


def bulk_paths(attrs: dict, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, vr) of every BulkDataURI in a DICOM JSON object."""
    for key, entry in attrs.items():
        if "BulkDataURI" in entry:
            yield path + key, entry["vr"]
        elif entry["vr"] == "SQ":
            for i, item in enumerate(entry.get("Value") or []):
                yield from bulk_paths(item, f"{path}{key}/{i}/")


def check_against_pydicom(data: bytes) -> tuple[dict, list[BulkRef]]:
    """Encode data as the archive does and compare with pydicom; check the bulk data references."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=DEFER_SIZE)
    bulk: list[BulkRef] = []
    ours = encode_dataset(ds, bulk)
    orjson.dumps(ours)  # valid JSON (no NaN, only JSON types)
    full = pydicom.dcmread(io.BytesIO(data))  # nothing deferred
    assert_matches_pydicom(ours, reference_json(full))
    assert sorted((b.path, b.vr) for b in bulk) == sorted(bulk_paths(ours))
    deflated = full.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    for ref in bulk:
        if "/" in ref.path:
            assert ref.offset is None, ref  # values inside sequences are not addressable
            continue
        value = full[int(ref.path, 16)].value
        if deflated or ref.length == UNDEFINED_LENGTH:
            continue  # offsets into the inflated stream / encapsulated value not read
        assert ref.offset is not None, ref
        if ref.offset + ref.length > len(data):  # truncated file (parse_instance rejects it)
            assert data[ref.offset :] == value, ref
            continue
        assert ref.length == len(value), ref
        assert data[ref.offset : ref.offset + ref.length] == value, ref
    return ours, bulk


# ---------------------------------------------------------------------------------------------------------
# pydicom's test files


def _readable(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("path", [p for p in TEST_FILES if _readable(p)], ids=lambda p: p.name)
def test_pydicom_test_files_match_pydicom(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately broken files
        check_against_pydicom(path.read_bytes())


def test_test_files_found() -> None:
    """The comparison above must not silently run on nothing."""
    assert len([p for p in TEST_FILES if _readable(p)]) > 50


def test_ct_small_bulk_and_identity() -> None:
    data = (DATA_DIR / "test_files" / "CT_small.dcm").read_bytes()
    ours, bulk = check_against_pydicom(data)
    assert sorted(b.path for b in bulk) == ["00431029", "7FE00010"]  # a GE private OB, pixel data
    assert ours["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}
    assert first_value(ours, "00100010") == {"Alphabetic": "CompressedSamples^CT1"}
    assert values_of(ours, "00080008") == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert select(ours, ["00080060", "99999999"]) == {"00080060": {"vr": "CS", "Value": ["CT"]}}


def test_parse_instance_implicit_vr_pixel_data_is_addressable() -> None:
    """Implicit VR pixel data ("OB or OW" in the dictionary) is referenced by offset without being read."""
    data = (DATA_DIR / "test_files" / "MR_small_implicit.dcm").read_bytes()
    parsed = parse_instance(data)
    ref, frame = parsed.bulk
    assert (ref.path, ref.vr) == ("7FE00010", "OW")
    assert data[ref.offset : ref.offset + ref.length] == pydicom.dcmread(io.BytesIO(data)).PixelData
    # the frame table row of its single frame (format in dicomcore/parse.py)
    assert (frame.path, frame.offset, frame.length) == ("7FE00010#1", ref.offset, ref.length)


# ---------------------------------------------------------------------------------------------------------
# Specific values


def dataset_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buffer = io.BytesIO()
    with pydicom_config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_bytes(data: bytes) -> dict:
    return encode_dataset(pydicom.dcmread(io.BytesIO(data), defer_size=DEFER_SIZE), [])


@pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_value_forms(transfer_syntax: str) -> None:
    ds = Dataset()
    ds.add_new(0x00080008, "CS", ["ORIGINAL ", "", " PRIMARY"])  # empty value -> null, padding stripped
    ds.add_new(0x00081080, "LO", ["  lead", "trail  "])
    ds.add_new(0x00080081, "ST", "  leading spaces kept\\no split  ")
    ds.add_new(0x0008009C, "PN", ["Yamada^Tarou=山田^太郎=やまだ^たろう", "=Ideo", "", "Doe^J  "])
    ds.add_new(0x00081160, "IS", ["1", "", "-7"])
    ds.add_new(0x00082130, "DS", ["1.5", " 2 ", "1e3"])
    ds.add_new(0x00080304, "US", [1, 65535])
    ds.add_new(0x00189442, "SS", [-1, 2])
    ds.add_new(0x0018605A, "FL", [0.5, float("nan"), float("-inf")])
    ds.add_new(0x00720083, "UV", [2**64 - 1])
    ds.add_new(0x00280009, "AT", [0x00100010, 0x7FE00010])
    ds.add_new(0x0008041B, "OB", b"\x01\x02\x03\x04")
    ds.add_new(0x00281201, "OW", bytes(range(256)) * 2)  # over the inline limit: bulk data
    ds.add_new(0x00080005, "CS", "ISO_IR 192")
    attrs = encode_bytes(dataset_bytes(ds, transfer_syntax))
    assert values_of(attrs, "00080008") == ["ORIGINAL", None, "PRIMARY"]
    assert values_of(attrs, "00081080") == ["lead", "trail"]
    assert values_of(attrs, "00080081") == ["  leading spaces kept\\no split"]
    assert values_of(attrs, "0008009C") == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
        {"Ideographic": "Ideo"},
        None,
        {"Alphabetic": "Doe^J"},
    ]
    assert values_of(attrs, "00081160") == [1, None, -7]
    assert values_of(attrs, "00082130") == [1.5, 2.0, 1000.0]
    assert values_of(attrs, "00080304") == [1, 65535]
    assert values_of(attrs, "00189442") == [-1, 2]
    assert values_of(attrs, "0018605A") == [0.5, "nan", "-inf"]
    assert values_of(attrs, "00720083") == [2**64 - 1]
    assert values_of(attrs, "00280009") == ["00100010", "7FE00010"]
    assert attrs["0008041B"]["InlineBinary"] == base64.b64encode(b"\x01\x02\x03\x04").decode()
    assert attrs["00281201"] == {"vr": "OW", "BulkDataURI": "bulkdata/00281201"}


def test_invalid_numbers_are_kept_as_text() -> None:
    """pydicom cannot put these in JSON at all; the archive keeps the original text."""
    ds = Dataset()
    with pydicom_config.disable_value_validation():
        ds.add_new(0x00082130, "DS", ["NaN", "1.5"])
        ds.add_new(0x00101020, "DS", "7777777")  # replaced by text pydicom refuses to write below
        ds.add_new(0x00081160, "IS", ["1.0", "2"])  # pydicom accepts an integral IS written as decimal
    data = dataset_bytes(ds).replace(b"7777777 ", b"abc     ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attrs = encode_bytes(data)
    assert values_of(attrs, "00082130") == ["NaN", 1.5]
    assert values_of(attrs, "00101020") == ["abc"]
    assert values_of(attrs, "00081160") == [1, 2]


def test_empty_attributes_have_no_value() -> None:
    ds = Dataset()
    for tag, vr in [(0x00100010, "PN"), (0x00100020, "LO"), (0x00280010, "US"), (0x00081140, "SQ")]:
        ds.add_new(tag, vr, [] if vr == "SQ" else None)
    ds.add_new(0x00081030, "LO", "    ")  # only padding
    attrs = encode_bytes(dataset_bytes(ds))
    assert attrs == {
        "00081030": {"vr": "LO"},
        "00081140": {"vr": "SQ"},
        "00100010": {"vr": "PN"},
        "00100020": {"vr": "LO"},
        "00280010": {"vr": "US"},
    }


def test_iso_2022_text_goes_through_pydicom() -> None:
    data = (DATA_DIR / "charset_files" / "chrH31.dcm").read_bytes()
    attrs = encode_bytes(data)
    assert first_value(attrs, "00100010") == {
        "Alphabetic": "Yamada^Tarou",
        "Ideographic": "山田^太郎",
        "Phonetic": "やまだ^たろう",
    }


def test_custom_pydicom_hooks_take_effect() -> None:
    """A registered pydicom conversion hook is honoured: such datasets bypass the raw decoders."""
    ds = Dataset()
    ds.add_new(0x00082130, "DS", ["1.5", "2.5"])
    data = dataset_bytes(ds).replace(b"1.5\\2.5 ", b"1.5:2.5 ")  # a broken separator the hook fixes
    hooks.register_callback("raw_element_value", raw_element_value_fix_separator)
    hooks.register_kwargs("raw_element_kwargs", {"target_VRs": ("DS",), "separator": ":"})
    try:
        attrs = encode_bytes(data)
    finally:
        hooks.register_callback("raw_element_value", raw_element_value)
        hooks.register_kwargs("raw_element_kwargs", {})
    assert values_of(attrs, "00082130") == [1.5, 2.5]


def test_nested_sequences_and_deferred_values() -> None:
    """Sequences (defined and undefined length, over the defer size) and nested bulk data paths."""
    inner = Dataset()
    inner.add_new(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2")
    inner.add_new(0x0008041B, "OB", bytes(300))  # nested bulk data: no offset
    outer = Dataset()
    outer.add_new(0x00081155, "UI", "1.2.3")
    outer.add_new(0x00081140, "SQ", Sequence([inner, Dataset()]))
    ds = Dataset()
    ds.add_new(0x00080005, "CS", "ISO_IR 100")
    ds.add_new(0x00081115, "SQ", Sequence([outer]))
    big = Dataset()
    big.add_new(0x00104000, "LT", "x" * 1500)  # deferred text
    ds.add_new(0x0040A730, "SQ", Sequence([big]))  # deferred sequence
    undefined = Dataset()
    undefined.add_new(0x00100020, "LO", "ü")
    ds.add_new(0x00400275, "SQ", Sequence([undefined]))
    ds[0x00400275].is_undefined_length = True
    for transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        ours, bulk = check_against_pydicom(dataset_bytes(ds, transfer_syntax))
        assert bulk == [BulkRef("00081115/0/00081140/0/0008041B", None, 300, "OB")]
        assert ours["0040A730"]["Value"][0]["00104000"]["Value"] == ["x" * 1500]
        assert ours["00400275"]["Value"][0]["00100020"]["Value"] == ["ü"]
        assert ours["00081115"]["Value"][0]["00081140"]["Value"][1] == {}


def test_unusual_sequences_go_through_pydicom() -> None:
    """Undefined-length items or sequences inside defined-length ones are left to pydicom's reader."""
    leaf = Dataset()
    leaf.add_new(0x00100020, "LO", "leaf")
    nested = Dataset()
    nested.add_new(0x0040A730, "SQ", Sequence([leaf]))
    nested[0x0040A730].is_undefined_length = True  # undefined length SQ in a defined length item
    item = Dataset()
    item.add_new(0x00081155, "UI", "1.2.3")
    item.is_undefined_length_sequence_item = True  # undefined length item in a defined length SQ
    ds = Dataset()
    ds.add_new(0x00081140, "SQ", Sequence([item]))
    ds.add_new(0x00081115, "SQ", Sequence([nested]))
    for transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        ours, _ = check_against_pydicom(dataset_bytes(ds, transfer_syntax))
        assert values_of(ours, "00081140") == [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]
        leaf_json = {"00100020": {"vr": "LO", "Value": ["leaf"]}}
        assert values_of(ours, "00081115") == [{"0040A730": {"vr": "SQ", "Value": [leaf_json]}}]


def test_undecodable_text_goes_through_pydicom() -> None:
    """Bytes invalid in the character set: pydicom decodes them with replacement characters."""
    ds = Dataset()
    ds.add_new(0x00080005, "CS", "ISO_IR 192")
    ds.add_new(0x00100020, "LO", "qz")
    data = dataset_bytes(ds).replace(b"qz", b"\xff\xfe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert values_of(encode_bytes(data), "00100020") == ["\ufffd\ufffd"]
        check_against_pydicom(data)


def test_wrong_length_numbers_are_rejected() -> None:
    """A US value of 3 bytes: pydicom refuses it, and so does ingest (not silently truncated)."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.SOPInstanceUID, ds.SOPClassUID = "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.7"
    ds.add_new(0x00280010, "US", 0x4242)
    data = bytearray(dataset_bytes(ds))
    at = data.index(b"\x28\x00\x10\x00US\x02\x00\x42\x42")
    data[at + 6] = 3  # length 3; the value now takes one byte of the next element (there is none)
    data += b"\x00"
    with pytest.raises(InvalidInstanceError):
        parse_instance(bytes(data))


# ---------------------------------------------------------------------------------------------------------
# Random datasets


def _components(alphabet: str, max_size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, max_size=max_size)


def _multi(component: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """A value, or a list of values possibly with empty ones (written backslash-separated)."""
    return st.one_of(component, st.lists(st.one_of(component, st.just("")), min_size=2, max_size=4))


UPPER = string.ascii_uppercase + string.digits + " _"
PRINTABLE = "".join(c for c in string.printable if c not in "\\\r\n\t\x0b\x0c")
CHARSET_TEXT = {
    None: PRINTABLE,
    "ISO_IR 100": PRINTABLE + "äöüßéèçñÀÉÎÕ¡¿",
    "ISO_IR 192": PRINTABLE + "äöüßéçñ山田太郎やまだたろうΩЖ한국어😀",
    "GB18030": PRINTABLE + "中文汉字测试王小明",
}


def _date() -> st.SearchStrategy[str]:
    return st.dates().map(lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}")


def _time() -> st.SearchStrategy[str]:
    return st.times().map(lambda t: t.strftime("%H%M%S.%f")[: 6 + (t.microsecond % 8)])


def _pn(text: str) -> st.SearchStrategy[str]:
    name = st.lists(_components(text.replace("^", "").replace("=", ""), 8), max_size=5).map("^".join)
    return st.lists(name, min_size=1, max_size=3).map("=".join)


def _ds_text() -> st.SearchStrategy[str]:
    number = st.one_of(
        st.integers(-(10**9), 10**9).map(str),
        st.floats(-1e10, 1e10, allow_nan=False).map(lambda f: f"{f:.6g}"),
    )
    return st.tuples(st.sampled_from(["", " "]), number, st.sampled_from(["", " "])).map("".join)


def _binary(unit: int, max_units: int = 80) -> st.SearchStrategy[bytes]:
    return st.integers(0, max_units).flatmap(lambda n: st.binary(min_size=n * unit, max_size=n * unit))


def element_strategies(charset: str | None) -> dict[tuple[int, str], st.SearchStrategy[Any]]:
    """(tag, VR) -> value strategy, for public attributes of each VR (dictionary VR checked below)."""
    text = CHARSET_TEXT[charset]
    multi_text = text
    return {
        (0x00080054, "AE"): _multi(_components(UPPER, 16)),
        (0x00101010, "AS"): st.from_regex(r"\A[0-9]{3}[DWMY]\Z"),
        (0x00080008, "CS"): _multi(_components(UPPER, 16)),
        (0x0014407E, "DA"): _multi(_date()),
        (0x0040A13A, "DT"): _multi(st.tuples(_date(), _time()).map("".join)),
        (0x0014407C, "TM"): _multi(_time()),
        (0x0008001A, "UI"): _multi(
            st.lists(st.integers(0, 99999).map(str), min_size=2, max_size=6).map(".".join)
        ),
        (0x00080120, "UR"): _components(string.ascii_letters + string.digits + "/:.-_?=&", 40),
        (0x00080094, "SH"): _multi(_components(multi_text, 16)),
        (0x00081080, "LO"): _multi(_components(multi_text, 64)),
        (0x00080081, "ST"): _components(text + "\\", 100),
        (0x00080108, "LT"): _components(text + "\\\r\n", 200),
        (0x0008030E, "UT"): st.one_of(_components(text + "\\", 100), st.just("long text " * 120)),  # deferred
        (0x00160008, "UC"): _multi(_components(multi_text, 80)),
        (0x0008009C, "PN"): _multi(_pn(multi_text)),
        (0x00081160, "IS"): _multi(st.integers(-(2**31), 2**31 - 1).map(str)),
        (0x00082130, "DS"): _multi(_ds_text()),
        (0x00080304, "US"): st.lists(st.integers(0, 2**16 - 1), max_size=4),
        (0x00189442, "SS"): st.lists(st.integers(-(2**15), 2**15 - 1), max_size=4),
        (0x00081161, "UL"): st.lists(st.integers(0, 2**32 - 1), max_size=4),
        (0x0040A162, "SL"): st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
        (0x00720082, "SV"): st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        (0x00720083, "UV"): st.lists(st.integers(0, 2**64 - 1), max_size=3),
        (0x0018605A, "FL"): st.lists(st.floats(width=32), max_size=4),
        (0x00186054, "FD"): st.lists(st.floats(), max_size=4),
        (0x00280009, "AT"): st.lists(st.integers(0, 2**32 - 1), max_size=3),
        (0x0008041B, "OB"): _binary(4),
        (0x00281201, "OW"): _binary(2, 200),
        (0x00181638, "OF"): _binary(4),
        (0x003A032E, "OD"): _binary(8),
        (0x00660040, "OL"): _binary(4),
        (0x00720081, "OV"): _binary(8),
        (0x0072006D, "UN"): _binary(2, 200),
        # "US or SS" in the dictionary: implicit VR resolves it from Pixel Representation
        (0x00280106, "US"): st.integers(0, 2**15 - 1),
        (0x00280120, "SS"): st.integers(-(2**15), 2**15 - 1),
    }


SEQUENCE_TAGS = [0x00081140, 0x0040A730]


@st.composite
def datasets(draw: st.DrawFn, charset: str | None, depth: int = 0) -> Dataset:
    ds = Dataset()
    strategies = element_strategies(charset)
    keys = draw(st.lists(st.sampled_from(sorted(strategies)), max_size=10, unique=True))
    for tag, vr in keys:
        ds.add_new(tag, vr, draw(strategies[(tag, vr)]))
    if draw(st.booleans()):
        ds.add_new(0x00280103, "US", draw(st.integers(0, 1)))  # Pixel Representation
    if draw(st.booleans()):  # a creator unknown to pydicom: its elements are UN in implicit VR
        block = ds.private_block(0x0011, "HYPOTHESIS PRIVATE", create=True)
        block.add_new(0x01, "LO", draw(_components(CHARSET_TEXT[None], 20)))
        block.add_new(0x02, "OB", draw(_binary(1, 400)))
    if draw(st.booleans()):  # creators in pydicom's private dictionary: VRs from there in implicit VR
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        image_type = draw(_components(UPPER, 16))
        if draw(st.booleans()):
            block.add_new(0x08, "CS", image_type)
        else:  # explicit UN: pydicom replaces it with the private dictionary's VR
            block.add_new(0x08, "UN", image_type.encode() + b" " * (len(image_type) % 2))
        block.add_new(0x10, "OB", draw(_binary(2, 200)))
        block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        block.add_new(0x02, "SL", draw(st.integers(-(2**31), 2**31 - 1)))
        block.add_new(0x03, "DS", draw(_multi(_ds_text())))
    if depth < 2:
        for tag in draw(st.lists(st.sampled_from(SEQUENCE_TAGS), max_size=2, unique=True)):
            items = draw(st.lists(datasets(charset, depth + 1), max_size=2))
            ds.add_new(tag, "SQ", Sequence(items))
            ds[tag].is_undefined_length = draw(st.booleans())
            for item in items:
                item.is_undefined_length_sequence_item = draw(st.booleans())
    return ds


def test_strategy_tags_have_their_dictionary_vr() -> None:
    for tag, vr in element_strategies(None):
        assert vr in dictionary_VR(tag), (hex(tag), vr)
    assert all(dictionary_VR(tag) == "SQ" for tag in SEQUENCE_TAGS)


@settings(
    max_examples=int(os.environ.get("DICOMJSON_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    charset=st.sampled_from(sorted(CHARSET_TEXT, key=str)),
    transfer_syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]),
)
def test_random_datasets_match_pydicom(
    data: st.DataObject, charset: str | None, transfer_syntax: str
) -> None:
    with pydicom_config.disable_value_validation():  # odd values are welcome: they are read back anyway
        ds = data.draw(datasets(charset))
    if charset is not None:
        ds.add_new(0x00080005, "CS", charset)
    check_against_pydicom(dataset_bytes(ds, transfer_syntax))


@pytest.mark.parametrize("name", ["rtplan.dcm", "CT_small.dcm", "MR_small_implicit.dcm", "chrX1.dcm"])
def test_converted_elements_are_encoded_the_same(name: str) -> None:
    """Elements pydicom has already converted (e.g. read by attribute before encoding) give the same JSON."""
    path = DATA_DIR / "test_files" / name
    data = (path if path.exists() else DATA_DIR / "charset_files" / name).read_bytes()
    fresh = encode_bytes(data)
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=DEFER_SIZE)
    for tag in list(ds.keys()):
        ds[tag]  # convert everything through pydicom
    assert all(isinstance(e, DataElement) for e in ds._dict.values())
    assert encode_dataset(ds, []) == fresh
