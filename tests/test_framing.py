"""dicomcore.framing.read_file against pydicom.dcmread: the same Dataset, element for element.

Compared recursively: element order, tags, VRs, lengths, value bytes (None when deferred), value_tell,
encodings, sequence and item attributes, file meta and preamble. Inputs: every DICOM file pydicom bundles
(implicit VR, big endian, deflated, encapsulated, nested sequences, odd and broken files), the synthetic CT
the benchmarks use, and hypothesis-generated data sets in all three uncompressed transfer syntaxes with
random defer sizes. Truncated objects must raise, never come back as a data set that differs from the file.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bench.synthetic import make_instance, make_study, to_bytes
from dicomcore import framing
from dicomcore.framing import TruncatedError, convert_sequence, read_file
from tests.test_dicomjson import CHARSET_TEXT, DATA_DIR, dataset_bytes, datasets

FILES = sorted((DATA_DIR / "test_files").rglob("*.dcm")) + sorted((DATA_DIR / "charset_files").glob("*.dcm"))
DEFER_SIZES = [None, 0, 16, 1024, 4096]


def pydicom_read(data: bytes, defer_size: int | None) -> FileDataset | Exception:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), defer_size=defer_size)
    except Exception as exc:
        return exc


def assert_same_dataset(ours: Dataset, theirs: Dataset, where: str = "") -> None:
    assert type(ours) is type(theirs), where
    ignore = {"_dict", "buffer", "file_meta"}  # compared below / apart (the buffers are two BytesIO)
    assert {k: v for k, v in vars(ours).items() if k not in ignore} == {
        k: v for k, v in vars(theirs).items() if k not in ignore
    }, where
    assert ours.original_encoding == theirs.original_encoding, where
    assert ours.original_character_set == theirs.original_character_set, where
    assert ours._parent_encoding == theirs._parent_encoding, where
    assert ours.is_undefined_length_sequence_item == theirs.is_undefined_length_sequence_item, where
    for name in ("seq_item_tell", "file_tell"):
        assert getattr(ours, name, None) == getattr(theirs, name, None), (where, name)
    assert list(ours._dict) == list(theirs._dict), where
    for tag, theirs_elem in theirs._dict.items():
        ours_elem = ours._dict[tag]
        at = f"{where}({tag.group:04X},{tag.element:04X})"
        if tag == 0x00080005 and not where and isinstance(ours_elem, RawDataElement):
            # pydicom converted it in place reading the character set; read_file leaves it raw
            assert isinstance(theirs_elem, DataElement) and ours_elem.value_tell == theirs_elem.file_tell, at
            converted = convert_raw_data_element(ours_elem)
            assert (converted.VR, converted.value) == (theirs_elem.VR, theirs_elem.value), at
            continue
        assert type(ours_elem) is type(theirs_elem), at
        if isinstance(theirs_elem, RawDataElement):
            assert tuple(ours_elem) == tuple(theirs_elem), at
            assert type(ours_elem.tag) is type(theirs_elem.tag), at
            continue
        assert (ours_elem.tag, ours_elem.VR, ours_elem.file_tell) == (
            theirs_elem.tag,
            theirs_elem.VR,
            theirs_elem.file_tell,
        ), at
        assert ours_elem.is_undefined_length == theirs_elem.is_undefined_length, at
        if theirs_elem.VR != "SQ":
            assert ours_elem.value == theirs_elem.value, at
            continue
        assert ours_elem.value.is_undefined_length == theirs_elem.value.is_undefined_length, at
        assert len(ours_elem.value) == len(theirs_elem.value), at
        for i, (ours_item, theirs_item) in enumerate(zip(ours_elem.value, theirs_elem.value, strict=True)):
            assert_same_dataset(ours_item, theirs_item, f"{at}/{i}/")


def assert_same_file(ours: FileDataset, theirs: FileDataset) -> None:
    assert ours.preamble == theirs.preamble
    assert ours.file_meta == theirs.file_meta  # compared converted (pydicom converts two elements)
    assert ours.file_meta.original_encoding == theirs.file_meta.original_encoding
    assert {k: v for k, v in vars(ours.file_meta).items() if k != "_dict"} == {
        k: v for k, v in vars(theirs.file_meta).items() if k != "_dict"
    }
    assert type(ours.buffer) is type(theirs.buffer)
    assert ours.fileobj_type is theirs.fileobj_type
    assert (ours.filename, ours.timestamp) == (theirs.filename, theirs.timestamp)
    assert_same_dataset(ours, theirs)


def check(data: bytes, defer_size: int | None) -> FileDataset | None:
    """read_file gives pydicom's dataset, or raises what pydicom raises, or TruncatedError."""
    theirs = pydicom_read(data, defer_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = read_file(data, defer_size)
    except TruncatedError:
        return None
    except Exception as exc:
        assert isinstance(theirs, Exception), f"pydicom reads it, read_file raised {exc!r}"
        assert type(exc) is type(theirs) and str(exc) == str(theirs)
        return None
    assert not isinstance(theirs, Exception), f"pydicom raised {theirs!r}, read_file read it"
    assert_same_file(ours, theirs)
    # a deferred value reads from the kept buffer as pydicom's does
    for tag, elem in theirs._dict.items():
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length != 0xFFFFFFFF:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    expected: Any = theirs[tag].value
                except Exception as exc:
                    expected = type(exc)
                try:
                    got: Any = ours[tag].value
                except Exception as exc:
                    got = type(exc)
            assert got == expected or repr(got) == repr(expected)  # NaN != NaN
    return ours


def element_start(elem: RawDataElement | DataElement, implicit: bool) -> int:
    """File offset of a top-level element's header."""
    if isinstance(elem, DataElement):
        return elem.file_tell - (8 if implicit else 12)
    long_header = not implicit and elem.VR in (
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "SQ",
        "SV",
        "UC",
        "UN",
        "UR",
        "UT",
        "UV",
    )
    return elem.value_tell - (12 if long_header else 8)


def synthetic_ct() -> bytes:
    rng = random.Random(1)
    return to_bytes(make_instance(make_study(rng), 0, 1, rng=rng))


def test_files_found() -> None:
    assert len(FILES) > 80


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("defer_size", DEFER_SIZES)
def test_pydicom_test_files(path: Path, defer_size: int | None) -> None:
    check(path.read_bytes(), defer_size)


def test_plain_files_are_framed_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point is speed: plain objects must not fall back to pydicom's reader."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fell back to pydicom.dcmread")

    names = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "JPEG2000.dcm"]
    datas = [(DATA_DIR / "test_files" / name).read_bytes() for name in names] + [synthetic_ct()]
    expected = [pydicom_read(data, 1024) for data in datas]
    monkeypatch.setattr(framing.pydicom, "dcmread", refuse)
    for data, theirs in zip(datas, expected, strict=True):
        assert isinstance(theirs, FileDataset)
        assert_same_file(read_file(data, 1024), theirs)


def test_deflated_falls_back_to_pydicom() -> None:
    data = (DATA_DIR / "test_files" / "image_dfl.dcm").read_bytes()
    ours = check(data, 1024)
    assert ours is not None and ours.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"


def test_synthetic_ct() -> None:
    data = synthetic_ct()
    assert check(data, 1024) is not None
    ours = read_file(data, 1024)
    pixel = ours._dict[pydicom.tag.Tag(0x7FE00010)]
    assert pixel.value is None and data[pixel.value_tell : pixel.value_tell + pixel.length] == ours.PixelData


def test_not_dicom_raises_as_pydicom() -> None:
    for data in (b"", b"not dicom at all" * 10, b"\0" * 128 + b"DICM"):
        check(data, 1024)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read_file(b"not dicom at all" * 10, 1024)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "JPEG2000.dcm"])
def test_truncated_prefixes_raise(name: str) -> None:
    """Every prefix either raises or (cut at an element boundary of the top level) reads as pydicom reads
    it, with every value complete."""
    data = (DATA_DIR / "test_files" / name).read_bytes()
    complete = read_file(data, 1024)
    boundaries = {element_start(e, complete.original_encoding[0]) for e in complete._dict.values()}
    step = max(1, len(data) // 1500)
    read = 0
    for cut in range(0, len(data), step):
        prefix = data[:cut]
        try:
            ours = read_file(prefix, 1024)
        except (TruncatedError, pydicom.errors.InvalidDicomError):
            continue
        read += 1
        assert cut in boundaries or cut < 400, cut  # short ones: pydicom's own answer (fallback)
        theirs = pydicom_read(prefix, 1024)
        assert isinstance(theirs, FileDataset)
        assert_same_file(ours, theirs)
        for elem in ours._dict.values():
            if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
                assert elem.value_tell + elem.length <= cut
    assert read > 0


def test_large_file_object_is_read_in_chunks(tmp_path: Path) -> None:
    """A file object is framed chunk by chunk, seeking over deferred values: never read whole."""
    ds = pydicom.dcmread(DATA_DIR / "test_files" / "CT_small.dcm")
    ds.add_new(0x00291010, "OB", b"\x01" * (3 * framing.CHUNK + 7))  # a big private value mid-file
    ds.PixelData = b"\x02" * (8 * framing.CHUNK)
    path = tmp_path / "big.dcm"
    ds.save_as(path)
    data = path.read_bytes()

    class CountingFile(io.FileIO):
        read_bytes = 0

        def read(self, size: int = -1) -> bytes:  # type: ignore[override]
            chunk = super().read(size)
            CountingFile.read_bytes += len(chunk)
            return chunk

    with CountingFile(path, "rb") as fp:
        ours = read_file(fp, 1024)  # type: ignore[arg-type]
        assert CountingFile.read_bytes < 3 * framing.CHUNK
        fp.seek(0)
        assert_same_dataset(ours, pydicom.dcmread(fp, defer_size=1024))
        assert ours.PixelData == ds.PixelData  # read on access, from the file object
    with tempfile.SpooledTemporaryFile(max_size=1024) as spooled:
        spooled.write(data)
        spooled.seek(0)
        ours = read_file(spooled, 1024)  # type: ignore[arg-type]
        spooled.seek(0)
        assert_same_dataset(ours, pydicom.dcmread(spooled, defer_size=1024))


def test_values_deferred_in_a_small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny window every element crosses a window edge somewhere."""
    monkeypatch.setattr(framing, "CHUNK", 7)
    for name in [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "JPEG2000.dcm",
        "nested_priv_SQ.dcm",
    ]:
        data = (DATA_DIR / "test_files" / name).read_bytes()
        for defer_size in DEFER_SIZES:
            with tempfile.TemporaryFile() as fp:
                fp.write(data)
                fp.seek(0)
                theirs = pydicom.dcmread(fp, defer_size=defer_size)
                fp.seek(0)
                assert_same_dataset(read_file(fp, defer_size), theirs)  # type: ignore[arg-type]


@settings(
    max_examples=int(os.environ.get("FRAMING_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    charset=st.sampled_from(sorted(CHARSET_TEXT, key=str)),
    transfer_syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]),
    defer_size=st.one_of(st.none(), st.integers(0, 600)),
)
def test_random_datasets(
    data: st.DataObject, charset: str | None, transfer_syntax: str, defer_size: int | None
) -> None:
    with pydicom_config.disable_value_validation():
        ds = data.draw(datasets(charset))
    if charset is not None:
        ds.add_new(0x00080005, "CS", charset)
    encoded = dataset_bytes(ds, transfer_syntax)
    assert check(encoded, defer_size) is not None
    cut = data.draw(st.integers(0, len(encoded) - 1))
    check(encoded[:cut], defer_size)  # raises, or the same as pydicom


def test_undefined_length_sequences_are_item_datasets() -> None:
    """Undefined-length sequences are DataElements holding item Datasets, as pydicom builds them."""
    data = (DATA_DIR / "test_files" / "JPEG2000.dcm").read_bytes()
    ours = check(data, 1024)
    assert ours is not None
    sequences = [e for e in ours._dict.values() if isinstance(e, DataElement) and e.VR == "SQ"]
    assert sequences and all(isinstance(item, Dataset) for e in sequences for item in e.value)


def assert_sequences_convert_alike(ours: Dataset, theirs: Dataset, where: str = "") -> int:
    """convert_sequence on every raw sequence (recursively) gives what Dataset.__getitem__ gives."""
    converted = 0
    for tag in list(theirs._dict):
        elem = theirs._dict[tag]
        if not isinstance(elem, RawDataElement) or not (
            elem.VR == "SQ" or (elem.VR is None and dictionary_vr(tag) == "SQ")
        ):
            continue
        at = f"{where}({tag.group:04X},{tag.element:04X})"
        try:
            expected = theirs[tag]
        except Exception as exc:
            with pytest.raises(type(exc)):
                convert_sequence(ours, tag)
            continue
        got = convert_sequence(ours, tag)
        assert type(got) is type(expected) and got.VR == expected.VR, at
        assert (got.file_tell, got.is_undefined_length) == (
            expected.file_tell,
            expected.is_undefined_length,
        ), at
        undefined = getattr(expected.value, "is_undefined_length", None)  # not set on empty ones
        assert getattr(got.value, "is_undefined_length", None) == undefined, at
        assert len(got.value) == len(expected.value), at
        converted += 1
        for i, (ours_item, theirs_item) in enumerate(zip(got.value, expected.value, strict=True)):
            assert_same_dataset(ours_item, theirs_item, f"{at}/{i}/")
            converted += assert_sequences_convert_alike(ours_item, theirs_item, f"{at}/{i}/")
    assert vars(ours).get("_pixel_rep") == vars(theirs).get("_pixel_rep"), where
    return converted


def dictionary_vr(tag: int) -> str | None:
    try:
        return pydicom.datadict.dictionary_VR(tag)
    except KeyError:
        return None


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_convert_sequence_on_test_files(path: Path) -> None:
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ours, theirs = read_file(data, None), pydicom.dcmread(io.BytesIO(data))
        except Exception:
            return
        assert_sequences_convert_alike(ours, theirs)


def test_convert_sequence_converts_some() -> None:
    """The comparison above runs on defined-length sequences, nested ones included."""
    total = 0
    for name in ["rtplan.dcm", "nested_priv_SQ.dcm", "rtdose.dcm"]:
        data = (DATA_DIR / "test_files" / name).read_bytes()
        total += assert_sequences_convert_alike(read_file(data, None), pydicom.dcmread(io.BytesIO(data)))
    assert total > 10


@settings(
    max_examples=int(os.environ.get("FRAMING_EXAMPLES", "150")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    charset=st.sampled_from(sorted(CHARSET_TEXT, key=str)),
    transfer_syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]),
)
def test_convert_sequence_random(data: st.DataObject, charset: str | None, transfer_syntax: str) -> None:
    with pydicom_config.disable_value_validation():
        ds = data.draw(datasets(charset))
    if charset is not None:
        ds.add_new(0x00080005, "CS", charset)
    encoded = dataset_bytes(ds, transfer_syntax)
    assert_sequences_convert_alike(
        read_file(encoded, 1024), pydicom.dcmread(io.BytesIO(encoded), defer_size=1024)
    )


def test_reads_from_the_current_position(monkeypatch: pytest.MonkeyPatch) -> None:
    """As dcmread: the object starts where the file object is; offsets are the file object's."""
    data = (DATA_DIR / "test_files" / "CT_small.dcm").read_bytes()
    dcmread = pydicom.dcmread
    monkeypatch.setattr(framing.pydicom, "dcmread", None)  # framed here, no fallback
    for make in (io.BytesIO, tempfile.TemporaryFile):
        fp = make()
        fp.write(b"\xff" * 100 + data)
        fp.seek(100)
        ours = read_file(fp, 1024)
        fp.seek(100)
        theirs = dcmread(fp, defer_size=1024)
        assert_same_dataset(ours, theirs)
        assert ours.preamble == theirs.preamble
        assert ours.PixelData == theirs.PixelData
