"""Colour JPEG Baseline decodes as another toolkit decodes it, on every path that decodes (issue #16 item 7).

The files (tests/data, made by make_ycc_fidelity.py) are YBR_FULL_422 JPEG Baseline images with sharp colour
edges: one encoded 4:2:2 by DCMTK, one 4:2:0 by Pillow. Their expected pixels are DCMTK's dcmdjpeg decode,
committed as PNG. pylibjpeg-libjpeg, which pydicom picks first when it is installed, upsamples chroma its
own way and lands up to 32 levels away from DCMTK on them; the IJG family (DCMTK, GDCM, fo-dicom, Pillow)
agrees within 1. Every path must therefore give pydicom's decode with its Pillow plugin exactly, and stay
within 3 levels per channel of DCMTK.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import pixel_array

from dicomcore.render import RenderOptions, render
from dicomcore.transcode import decode_frame, transcode_frame, transcode_instance
from dicomcore.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from tests.fixtures.server import RunningArchive
from tests.test_frames import store
from tests.test_stow_wado_delete import parts_of
from tests.test_transcode import frames_as_stored

DATA = Path(__file__).parent / "data"
FILES = ["ycc422_dcmtk.dcm", "ycc420_pillow.dcm"]
TOLERANCE = 3  # what independent IJG-family decoders are allowed to differ by (their colour rounding)


def dcmdjpeg_pixels(name: str) -> np.ndarray:
    """DCMTK's decode of the file, as committed."""
    return np.asarray(Image.open(DATA / name.replace(".dcm", ".dcmdjpeg.png")))


def pydicom_pillow_pixels(name: str) -> np.ndarray:
    return pixel_array(DATA / name, decoding_plugin="pillow")


def assert_faithful(got: np.ndarray, name: str) -> None:
    """Exactly pydicom's decode with Pillow, and within TOLERANCE of DCMTK in every channel."""
    expected = dcmdjpeg_pixels(name)
    assert got.shape == expected.shape == (32, 64, 3)
    difference = np.abs(got.astype(np.int16) - expected.astype(np.int16)).reshape(-1, 3).max(axis=0)
    assert difference.max() <= TOLERANCE, f"max difference per channel from dcmdjpeg: {difference.tolist()}"
    assert np.array_equal(got, pydicom_pillow_pixels(name))


@pytest.mark.parametrize("name", FILES)
def test_committed_expectation_is_what_dcmdjpeg_decodes_now(name: str, tmp_path: Path) -> None:
    assert shutil.which("dcmdjpeg"), "dcmdjpeg (DCMTK) is not installed: scripts/dimse-deps installs it"
    out = tmp_path / "decoded.dcm"
    subprocess.run(["dcmdjpeg", DATA / name, out], check=True)
    decoded = pydicom.dcmread(out)
    assert decoded.PhotometricInterpretation == "RGB"
    assert np.array_equal(decoded.pixel_array, dcmdjpeg_pixels(name))


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("target", [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
def test_instance_transcoded_to_native(name: str, target: str) -> None:
    out = pydicom.dcmread(io.BytesIO(transcode_instance((DATA / name).read_bytes(), target)))
    assert out.file_meta.TransferSyntaxUID == target
    # decoded to RGB, and says so: a reader must not convert these pixels again
    assert out.PhotometricInterpretation == "RGB" and out.PlanarConfiguration == 0
    assert_faithful(out.pixel_array, name)


@pytest.mark.parametrize("name", FILES)
def test_frame_transcoded_to_native(name: str) -> None:
    _, frames, stored, pixel = frames_as_stored(name, DATA)
    assert stored == "1.2.840.10008.1.2.4.50"
    arr, photometric = decode_frame(frames[0], stored, pixel)
    assert photometric == "RGB"
    assert_faithful(arr, name)
    body = transcode_frame(frames[0], stored, pixel, EXPLICIT_VR_LITTLE_ENDIAN)
    assert_faithful(np.frombuffer(body, np.uint8).reshape(32, 64, 3), name)


@pytest.mark.parametrize("name", FILES)
def test_rendered_png(name: str) -> None:
    data = (DATA / name).read_bytes()
    png = RenderOptions(media_type="image/png")
    in_memory = render(io.BytesIO(data), [1], png)  # parsed whole
    with open(DATA / name, "rb") as fp:  # header parsed, then the frame read (the blob store path)
        from_file = render(fp, [1], png)
    for body in (in_memory, from_file):
        assert_faithful(np.asarray(Image.open(io.BytesIO(body))), name)


async def test_wado_rs_returns_the_reference_pixels(local_archive: RunningArchive) -> None:
    """Over HTTP: the instance in Explicit VR Little Endian, its frame as octets, and its PNG rendering."""
    name = FILES[0]
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=30) as client:
        url = await store(client, (DATA / name).read_bytes())
        instance = await client.get(url, headers={"Accept": "application/dicom"})
        assert (
            instance.headers["content-type"]
            == f"application/dicom; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
        )
        ds = pydicom.dcmread(io.BytesIO(instance.content))
        assert ds.PhotometricInterpretation == "RGB"
        assert_faithful(ds.pixel_array, name)
        frame = await client.get(f"{url}/frames/1")
        ((headers, body),) = await parts_of(frame)
        assert (
            headers["content-type"]
            == f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
        )
        assert_faithful(np.frombuffer(body, np.uint8).reshape(32, 64, 3), name)
        rendered = await client.get(f"{url}/rendered", headers={"Accept": "image/png"})
        assert rendered.status_code == 200
        assert_faithful(np.asarray(Image.open(io.BytesIO(rendered.content))), name)
