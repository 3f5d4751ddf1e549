"""Compressed pixel data across toolkits: files DCMTK wrote, transcoded by the archive, and the archive's
output read back by DCMTK.

Inputs are pydicom's bundled test files, compressed or re-encoded by DCMTK at test time (dcmcjpeg, dcmcrle,
dcmcjpls, dcmconv). Expected pixels are DCMTK's own decode of the same file (dcmdjpeg, dcmdrle, dcmdjpls,
dcmconv +te). DCMTK must be installed (scripts/dimse-deps installs it); the tests fail rather than skip
without it, as tests/test_transcode_fidelity.py does.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicomcore.transcode import transcode_instance
from dicomcore.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def dcmtk(tool: str, *args: object) -> subprocess.CompletedProcess:
    """Run a DCMTK tool; it must be installed, and must succeed."""
    assert shutil.which(tool), f"{tool} (DCMTK) is not installed: scripts/dimse-deps installs it"
    done = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, errors="replace")
    assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"
    return done


def dcmtk_made(tmp_path: Path, source: str, tool: str, *options: str) -> Path:
    """pydicom's test file `source` as DCMTK's `tool` writes it with `options`."""
    out = tmp_path / f"{tool}.dcm"
    dcmtk(tool, *options, TEST_FILES / source, out)
    return out


def dcmtk_decoded(tmp_path: Path, path: Path, tool: str) -> pydicom.Dataset:
    """DCMTK's decode of `path` to Explicit VR Little Endian."""
    out = tmp_path / f"{path.stem}.{tool}.dcm"
    dcmtk(tool, "+te", path, out)
    return pydicom.dcmread(out)


def dcmtk_reads(tmp_path: Path, data: bytes) -> None:
    """DCMTK reads every element of `data` without an error, and converts it (pixel data included)."""
    path = tmp_path / "archive-output.dcm"
    path.write_bytes(data)
    dump = dcmtk("dcmdump", "-q", "+E", "-M", path)
    assert not dump.stderr.strip(), dump.stderr
    dcmtk("dcmconv", "+te", path, tmp_path / "archive-output.converted.dcm")


def nested_pixel_data(ds: pydicom.Dataset) -> list[pydicom.DataElement]:
    return [elem for elem in ds.iterall() if elem.tag == 0x7FE00010]


@pytest.mark.parametrize("target", [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
def test_icon_image_is_decoded_with_the_image(tmp_path: Path, target: str) -> None:
    """examples_overlay.dcm has an Icon Image Sequence; dcmcjpeg compresses the icon too. A native output
    must hold native pixel data everywhere, the icon's as dcmdjpeg decodes it (it was left encapsulated
    under a native transfer syntax, which DCMTK refuses to read: "Pixel representation cannot be
    changed")."""
    compressed = dcmtk_made(tmp_path, "examples_overlay.dcm", "dcmcjpeg", "+e1", "+un")
    stored = pydicom.dcmread(compressed)
    assert stored.IconImageSequence[0]["PixelData"].is_undefined_length  # DCMTK encapsulated the icon
    out = transcode_instance(compressed.read_bytes(), target)
    dcmtk_reads(tmp_path, out)
    got = pydicom.dcmread(io.BytesIO(out))
    expected = dcmtk_decoded(tmp_path, compressed, "dcmdjpeg")
    assert not any(elem.is_undefined_length for elem in nested_pixel_data(got))
    icon, expected_icon = got.IconImageSequence[0], expected.IconImageSequence[0]
    assert icon.PixelData == expected_icon.PixelData
    assert icon.PhotometricInterpretation == expected_icon.PhotometricInterpretation
    assert got.PixelData == expected.PixelData


def test_an_icon_that_cannot_be_decoded_is_left_out(tmp_path: Path) -> None:
    """The icon is optional: an undecodable one is dropped from a native output, the image is delivered."""
    from pydicom.encaps import encapsulate

    compressed = dcmtk_made(tmp_path, "examples_overlay.dcm", "dcmcjpeg", "+e1", "+un")
    ds = pydicom.dcmread(compressed)
    ds.IconImageSequence[0].PixelData = encapsulate([b"\xff\xd8\xff\xc3 not a codestream \xff\xd9"])
    broken = io.BytesIO()
    ds.save_as(broken, enforce_file_format=True)
    out = transcode_instance(broken.getvalue(), EXPLICIT_VR_LITTLE_ENDIAN)
    dcmtk_reads(tmp_path, out)
    got = pydicom.dcmread(io.BytesIO(out))
    assert "IconImageSequence" not in got
    assert got.PixelData == dcmtk_decoded(tmp_path, compressed, "dcmdjpeg").PixelData
