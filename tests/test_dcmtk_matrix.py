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

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_fragments

from dicomcore.frames import PixelDescription
from dicomcore.render import RenderOptions, render
from dicomcore.transcode import JPEG_BASELINE, PixelDataError, decode_frame, transcode_instance
from dicomcore.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from tests.fixtures.server import RunningArchive
from tests.test_frames import store
from tests.test_stow_wado_delete import parts_of

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


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


def decoder_tool(transfer_syntax: str) -> str | None:
    """The DCMTK tool that decodes (or, for native syntaxes, converts) this syntax; None for JPEG 2000."""
    if transfer_syntax.startswith("1.2.840.10008.1.2.4.8"):
        return "dcmdjpls"
    if transfer_syntax.startswith("1.2.840.10008.1.2.4.9"):
        return None
    if transfer_syntax.startswith("1.2.840.10008.1.2.4."):
        return "dcmdjpeg"
    return "dcmdrle" if transfer_syntax == "1.2.840.10008.1.2.5" else "dcmconv"


def dcmtk_reads(tmp_path: Path, data: bytes) -> pydicom.Dataset | None:
    """DCMTK reads every element of `data` without an error and decodes its pixel data; DCMTK's decode
    (Explicit VR Little Endian), or None for JPEG 2000, which this DCMTK does not decode."""
    path = tmp_path / "archive-output.dcm"
    path.write_bytes(data)
    dump = dcmtk("dcmdump", "-q", "+E", "-M", path)
    assert not dump.stderr.strip(), dump.stderr
    tool = decoder_tool(str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))
    return dcmtk_decoded(tmp_path, path, tool) if tool else None


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


def test_no_nested_pixel_data_needs_no_decoder() -> None:
    """A data set without pixel data under a syntax that has no decoder (MPEG2 here) still changes only its
    encoding: looking for nested pixel data must not ask for a decoder before it finds some (it did, and
    the transcode failed with 'stored pixel data cannot be decoded')."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.5"
    ds.ContentSequence = [Dataset()]
    ds.ContentSequence[0].ValueType = "TEXT"
    data = io.BytesIO()
    ds.save_as(data, implicit_vr=False, little_endian=True, enforce_file_format=True)
    out = pydicom.dcmread(io.BytesIO(transcode_instance(data.getvalue(), EXPLICIT_VR_LITTLE_ENDIAN)))
    assert out.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    assert out.ContentSequence[0].ValueType == "TEXT"


def test_big_endian_8_bit_ow_to_jpeg_baseline(tmp_path: Path) -> None:
    """8-bit colour pixel data in OW under Explicit VR Big Endian (dcmconv +tb of dcmdrle's decode of
    SC_rgb_rle_2frame.dcm) is stored byte-swapped in 16-bit words. Its JPEG Baseline transcode was made
    from pixels swapped twice (up to 255 levels off in dcmdjpeg's decode); it must be the image, within
    what JPEG at quality 90 loses."""
    native = dcmtk_made(tmp_path, "SC_rgb_rle_2frame.dcm", "dcmdrle")
    big = tmp_path / "big.dcm"
    dcmtk("dcmconv", "+tb", native, big)
    assert pydicom.dcmread(big)["PixelData"].VR == "OW"
    out = transcode_instance(big.read_bytes(), JPEG_BASELINE)
    got = dcmtk_reads(tmp_path, out).pixel_array.astype(int)
    expected = pydicom.dcmread(native).pixel_array.astype(int)
    assert got.shape == expected.shape == (2, 100, 100, 3)
    assert np.abs(got - expected).max() <= 16


async def test_frames_of_big_endian_8_bit_ow(tmp_path: Path, local_archive: RunningArchive) -> None:
    """Frames of 8-bit pixel data in OW under Explicit VR Big Endian (dcmconv +tb), a two-frame colour image
    and a 3x3 one whose frame has an odd length, are DCMTK's pixels (dcmconv +te): they were the stored
    bytes still swapped in 16-bit words (the frame table cut the big endian bytes as if they were samples)."""
    cases = [("SC_rgb_rle_2frame.dcm", "dcmdrle"), ("SC_rgb_small_odd.dcm", "dcmconv")]
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=60) as client:
        for source, tool in cases:
            work = tmp_path / source
            work.mkdir()
            native = dcmtk_made(work, source, tool, "+te")
            big = work / "big.dcm"
            dcmtk("dcmconv", "+tb", native, big)
            stored = pydicom.dcmread(big)
            assert stored["PixelData"].VR == "OW"
            expected = dcmtk_decoded(work, big, "dcmconv")
            frames = int(expected.get("NumberOfFrames") or 1)
            size = expected.Rows * expected.Columns * 3
            url = await store(client, big.read_bytes())
            numbers = ",".join(str(n) for n in range(1, frames + 1))
            response = await client.get(f"{url}/frames/{numbers}")
            assert response.status_code == 200, response.text
            parts = await parts_of(response)
            assert [body for _, body in parts] == [
                expected.PixelData[i * size : (i + 1) * size] for i in range(frames)
            ]
            for headers, _ in parts:
                assert headers["content-type"] == (
                    f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
                )


def rle_split_over_fragments(tmp_path: Path) -> Path:
    """dcmcrle +fs 1 -ot (fragments of at most 1 KiB, no offset table; DCMTK calls it non-standard, PS3.5
    A.4.2 wants one fragment per frame) of a two-frame 16-bit colour image."""
    native = dcmtk_made(tmp_path, "SC_rgb_rle_16bit_2frame.dcm", "dcmdrle")
    split = tmp_path / "split.dcm"
    dcmtk("dcmcrle", "+fs", "1", "-ot", native, split)
    assert len(list(generate_fragments(pydicom.dcmread(split).PixelData))) > 2
    return split


def test_rle_frames_split_over_fragments_decode_as_dcmdrle(tmp_path: Path) -> None:
    """pydicom finds one frame in such fragments: its decompress() set NumberOfFrames to 1, and the
    transcode was a valid-looking one-frame instance holding half the image. Each frame starts with an RLE
    header (segment count, first offset 64), which is how DCMTK finds them; the archive now groups the
    fragments so too, and the instance, each frame and each rendered frame are dcmdrle's pixels."""
    split = rle_split_over_fragments(tmp_path)
    expected = dcmtk_decoded(tmp_path, split, "dcmdrle")
    out = pydicom.dcmread(io.BytesIO(transcode_instance(split.read_bytes(), EXPLICIT_VR_LITTLE_ENDIAN)))
    assert out.NumberOfFrames == 2
    assert out.PixelData == expected.PixelData
    for number in (1, 2):
        png = render(io.BytesIO(split.read_bytes()), [number], RenderOptions(media_type="image/png"))
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        assert np.abs(image - expected.pixel_array[number - 1] / 65535 * 255).max() <= 1


def test_a_transcode_never_delivers_fewer_frames_than_the_instance_has(tmp_path: Path) -> None:
    """When the fragments cannot be grouped into the instance's frames at all, the transcode is refused
    (WADO-RS: 406 with the reason; as stored still works) rather than a short instance."""
    split = rle_split_over_fragments(tmp_path)
    ds = pydicom.dcmread(split)
    ds.NumberOfFrames = 3  # no grouping of the fragments gives three frames
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    with pytest.raises(PixelDataError, match="of its 3 frames"):
        transcode_instance(data.getvalue(), EXPLICIT_VR_LITTLE_ENDIAN)


async def test_frames_of_rle_split_over_fragments(tmp_path: Path, local_archive: RunningArchive) -> None:
    split = rle_split_over_fragments(tmp_path)
    expected = dcmtk_decoded(tmp_path, split, "dcmdrle")
    size = len(expected.PixelData) // 2
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=60) as client:
        url = await store(client, split.read_bytes())
        response = await client.get(f"{url}/frames/2,1")
        assert response.status_code == 200, response.text
        bodies = [body for _, body in await parts_of(response)]
        assert bodies == [expected.PixelData[size:], expected.PixelData[:size]]
        instance = await client.get(url, headers={"Accept": "application/dicom"})
        assert instance.status_code == 200
        assert pydicom.dcmread(io.BytesIO(instance.content)).PixelData == expected.PixelData


def test_12_bit_colour_jpeg_decodes_as_dcmdjpeg(tmp_path: Path) -> None:
    """dcmcjpeg +ee +bt: a two-frame 8-bit colour image as 12-bit YBR_FULL_422 JPEG Extended. pydicom
    converts YBR to RGB for 8-bit samples only, so the instance transcode and each frame were 406 ("Invalid
    ndarray.dtype 'uint16' for color space conversion") and rendering 422, though dcmdjpeg decodes it (to
    RGB). Each path must give dcmdjpeg's RGB within rounding (3 of 4095)."""
    native = dcmtk_made(tmp_path, "SC_rgb_rle_2frame.dcm", "dcmdrle")
    jpeg = tmp_path / "jpeg12.dcm"
    dcmtk("dcmcjpeg", "+ee", "+bt", "+un", native, jpeg)
    stored = pydicom.dcmread(jpeg)
    assert (stored.BitsAllocated, stored.BitsStored, stored.PhotometricInterpretation) == (
        16,
        12,
        "YBR_FULL_422",
    )
    expected = dcmtk_decoded(tmp_path, jpeg, "dcmdjpeg")
    assert expected.PhotometricInterpretation == "RGB"
    reference = expected.pixel_array.astype(int)

    out = pydicom.dcmread(io.BytesIO(transcode_instance(jpeg.read_bytes(), EXPLICIT_VR_LITTLE_ENDIAN)))
    assert out.PhotometricInterpretation == "RGB"
    assert np.abs(out.pixel_array.astype(int) - reference).max() <= 3

    pixel = PixelDescription(100, 100, 3, 16, 12, 0, "YBR_FULL_422", 0, 2)
    from pydicom.encaps import generate_frames

    for i, frame in enumerate(generate_frames(stored.PixelData, number_of_frames=2)):
        arr, photometric = decode_frame(frame, str(stored.file_meta.TransferSyntaxUID), pixel)
        assert photometric == "RGB"
        assert np.abs(arr.astype(int) - reference[i]).max() <= 3

    png = render(io.BytesIO(jpeg.read_bytes()), [2], RenderOptions(media_type="image/png"))
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert image.shape == (100, 100, 3)
    assert np.abs(image - reference[1] / 4095 * 255).max() <= 2


async def test_retired_jpeg_process_refusal_names_the_cause(
    tmp_path: Path, local_archive: RunningArchive
) -> None:
    """JPEG Progressive (retired 1.2.840.10008.1.2.4.55, dcmcjpeg +ep) has no installed decoder. Asked
    for Explicit VR Little Endian it is a 406 that says the stored syntax has no decoder, not "no decoder
    for it or no encoder for Explicit VR Little Endian"; as stored it is served, and naming no syntax
    delivers it as stored (docs/conformance.md)."""
    progressive = dcmtk_made(tmp_path, "CT_small.dcm", "dcmcjpeg", "+ep", "+un")
    data = progressive.read_bytes()
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=60) as client:
        url = await store(client, data)
        study = url.rsplit("/series/", 1)[0]
        for resource in (url, study):
            refused = await client.get(
                resource,
                headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"},
            )
            assert refused.status_code == 406
            message = refused.json()["error"]["message"]
            assert "no installed decoder for the stored transfer syntax JPEG Full Progression" in message
            assert "no encoder" not in message
        stored = await client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
        assert stored.status_code == 200 and stored.content == data
        default = await client.get(url, headers={"Accept": "application/dicom"})
        assert default.status_code == 200 and default.content == data
        assert default.headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.55"


def test_palette_colour_as_jpeg_2000(tmp_path: Path) -> None:
    """The archive writes JPEG 2000 (.91) losslessly, so PALETTE COLOR indices survive it as they survive
    .90; pydicom's .91 encoder refuses PALETTE COLOR (a lossy syntax in general), which made examples_palette
    .dcm (dcmconv +te) a 406 for .91 while .90 worked. Now .91 holds the same lossless codestream."""
    from dicomcore.transcode import JPEG_2000, JPEG_2000_LOSSLESS, transcode_frame

    native = dcmtk_made(tmp_path, "examples_palette.dcm", "dcmconv", "+te")
    source = pydicom.dcmread(native)
    for target in (JPEG_2000, JPEG_2000_LOSSLESS):
        out = transcode_instance(native.read_bytes(), target)
        dcmtk_reads(tmp_path, out)
        got = pydicom.dcmread(io.BytesIO(out))
        assert got.file_meta.TransferSyntaxUID == target
        assert got.PhotometricInterpretation == "PALETTE COLOR"
        assert np.array_equal(got.pixel_array, source.pixel_array)
        pixel = PixelDescription(350, 800, 1, 8, 8, 0, "PALETTE COLOR", 0, 1)
        frame = transcode_frame(source.PixelData, EXPLICIT_VR_LITTLE_ENDIAN, pixel, target)
        arr, _ = decode_frame(frame, target, pixel)
        assert np.array_equal(arr, source.pixel_array)


def test_jpeg_2000_refused_for_a_tiny_image_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JPEG 2000 of an image under 32 pixels a side is refused (406; a known limit of the encoder), and the
    refusal is the answer: OpenJPEG's own messages reached the log at ERROR ("Number of resolutions is too
    high ..."), two ERROR lines per request that the client was told about; they are warnings now."""
    from dicomcore.transcode import JPEG_2000_LOSSLESS, TranscodeError

    native = dcmtk_made(tmp_path, "SC_rgb_small_odd.dcm", "dcmconv", "+te")
    with caplog.at_level("DEBUG"), pytest.raises(TranscodeError):
        transcode_instance(native.read_bytes(), JPEG_2000_LOSSLESS)
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno > 30] == []
    assert any(r.name.startswith("openjpeg") for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# The matrix: pydicom's files (made native by DCMTK) x DCMTK's encoders, decoded by the archive as DCMTK does

# name: (pydicom test file, DCMTK tool making it native, PhotometricInterpretation to set or None)
MATRIX_SOURCES = {
    "ct-16-signed": ("CT_small.dcm", "dcmconv", None),
    "ct-16-signed-mono1": ("CT_small.dcm", "dcmconv", "MONOCHROME1"),
    "mono-8": ("image_dfl.dcm", "dcmconv", None),
    "mono-8-mono1": ("image_dfl.dcm", "dcmconv", "MONOCHROME1"),
    "palette-8": ("examples_palette.dcm", "dcmconv", None),
    "rgb-8-2-frames": ("SC_rgb_rle_2frame.dcm", "dcmdrle", None),
    "rgb-16-2-frames": ("SC_rgb_rle_16bit_2frame.dcm", "dcmdrle", None),
    "mono-12-in-16": ("JPGExtended.dcm", "dcmdjpeg", None),
    "rgb-3x3": ("SC_rgb_small_odd.dcm", "dcmconv", None),
}
# name: (encoding tool and options, lossy); each is skipped for sources the tool refuses (e.g. lossy JPEG
# of palette colour, JPEG-LS near-lossless of 16-bit colour)
MATRIX_ENCODINGS = {
    "jpeg-baseline": (("dcmcjpeg", "+eb"), True),
    "jpeg-extended": (("dcmcjpeg", "+ee"), True),
    "jpeg-lossless-14": (("dcmcjpeg", "+el"), False),
    "jpeg-lossless-sv1": (("dcmcjpeg", "+e1"), False),
    "jpeg-sv1-fragments": (("dcmcjpeg", "+e1", "+fs", "1", "-ot"), False),
    "rle": (("dcmcrle",), False),
    "jpeg-ls": (("dcmcjpls",), False),
    "jpeg-ls-near": (("dcmcjpls", "+en"), True),
    "jpeg-ls-fragments": (("dcmcjpls", "+fs", "1", "-ot"), False),
    "big-endian": (("dcmconv", "+tb"), False),
    "implicit": (("dcmconv", "+ti"), False),
    "deflated": (("dcmconv", "+td"), False),
}
LOSSY_TOLERANCE = 3  # levels between two decoders of one lossy codestream
# DCMTK 3.6.7 writes streams here that its own decoder refuses, and so do CharLS and libjpeg
DCMTK_UNREADABLE = {
    ("rgb-3x3", "jpeg-ls-near"): "dcmcjpls +en of a 3x3 colour image: dcmdjpls refuses it (no SOF55 marker)",
}
# inputs DCMTK refuses to make, with what it says (checked: a pair it starts writing must join the matrix)
DCMTK_UNWRITABLE = {
    ("ct-16-signed", "jpeg-ls-near"): "Unsupported pixel representation for near-lossless JPEG-LS",
    ("ct-16-signed-mono1", "jpeg-ls-near"): "Unsupported pixel representation for near-lossless JPEG-LS",
    ("palette-8", "jpeg-ls-near"): "Unsupported photometric interpretation for near-lossless JPEG-LS",
}


def matrix_source(tmp_path: Path, name: str) -> Path:
    source, tool, photometric = MATRIX_SOURCES[name]
    native = dcmtk_made(tmp_path, source, tool, "+te")
    if photometric:
        dcmtk("dcmodify", "-nb", "-m", f"PhotometricInterpretation={photometric}", native)
    return native


def frames_of(ds: pydicom.Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames

    count = int(ds.get("NumberOfFrames") or 1)
    return list(generate_frames(ds.PixelData, number_of_frames=count))


@pytest.mark.parametrize("encoding", MATRIX_ENCODINGS)
@pytest.mark.parametrize("source", MATRIX_SOURCES)
def test_dcmtk_encoded_decodes_as_dcmtk_decodes(tmp_path: Path, source: str, encoding: str) -> None:
    """Every file DCMTK writes, transcoded to Explicit VR Little Endian (and, when compressed, each frame
    decoded), holds DCMTK's own decode: exactly for lossless syntaxes, within LOSSY_TOLERANCE for lossy."""
    native = matrix_source(tmp_path, source)
    (tool, *options), lossy = MATRIX_ENCODINGS[encoding]
    encoded = tmp_path / "encoded.dcm"
    made = subprocess.run(
        [tool, *options, "+un", native, encoded] if tool != "dcmconv" else [tool, *options, native, encoded],
        capture_output=True,
    )
    said = made.stderr.decode(errors="replace").strip()
    if (source, encoding) in DCMTK_UNWRITABLE:
        assert made.returncode and DCMTK_UNWRITABLE[source, encoding] in said, said
        pytest.skip(f"{tool} does not write this source: {said}")
    assert made.returncode == 0, f"{tool} failed: {said}"
    stored = pydicom.dcmread(encoded)
    if (source, encoding) in DCMTK_UNREADABLE:  # checked: a file its decoder starts reading joins the matrix
        decoder = decoder_tool(str(stored.file_meta.TransferSyntaxUID)) or ""
        refused = subprocess.run([decoder, "+te", encoded, tmp_path / "refused.dcm"], capture_output=True)
        assert refused.returncode, f"{decoder} now reads it: drop it from DCMTK_UNREADABLE"
        pytest.skip(DCMTK_UNREADABLE[source, encoding])
    expected = dcmtk_decoded(tmp_path, encoded, decoder_tool(str(stored.file_meta.TransferSyntaxUID)) or "")
    out = transcode_instance(encoded.read_bytes(), EXPLICIT_VR_LITTLE_ENDIAN)
    dcmtk_reads(tmp_path, out)
    got = pydicom.dcmread(io.BytesIO(out))
    assert got.PhotometricInterpretation == expected.PhotometricInterpretation
    assert int(got.get("NumberOfFrames") or 1) == int(expected.get("NumberOfFrames") or 1)
    if lossy:
        difference = np.abs(got.pixel_array.astype(int) - expected.pixel_array.astype(int)).max()
        assert difference <= LOSSY_TOLERANCE
    else:
        assert np.array_equal(got.pixel_array, expected.pixel_array)
    if not stored.file_meta.TransferSyntaxUID.is_compressed:
        return
    pixel = PixelDescription.from_json(
        {
            key: {"Value": [stored[key].value]}
            for key in ("00280010", "00280011", "00280002", "00280100", "00280101", "00280103", "00280004")
        }
        | {"00280008": {"Value": [int(stored.get("NumberOfFrames") or 1)]}}
    )
    reference = expected.pixel_array.reshape(
        pixel.number_of_frames, *got.pixel_array.shape[-3 if pixel.samples_per_pixel == 3 else -2 :]
    )
    for i, frame in enumerate(frames_of(stored)):
        arr, _ = decode_frame(frame, str(stored.file_meta.TransferSyntaxUID), pixel)
        tolerance = LOSSY_TOLERANCE if lossy else 0
        assert np.abs(arr.astype(int) - reference[i].astype(int)).max() <= tolerance


ARCHIVE_TARGETS = {
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-baseline": JPEG_BASELINE,
    "implicit": IMPLICIT_VR_LITTLE_ENDIAN,
}
# what the archive refuses (406), with a word of the reason it gives
ARCHIVE_REFUSES = {
    ("ct-16-signed", "jpeg-baseline"): "8-bit unsigned",
    ("ct-16-signed-mono1", "jpeg-baseline"): "8-bit unsigned",
    ("palette-8", "jpeg-baseline"): "PALETTE COLOR",
    ("rgb-16-2-frames", "jpeg-baseline"): "8-bit unsigned",
    ("mono-12-in-16", "jpeg-baseline"): "8-bit unsigned",
    ("rgb-3x3", "jpeg-ls"): "buffer is too small",  # pyjpegls sizes its output for larger images
}


@pytest.mark.parametrize("target", ARCHIVE_TARGETS)
@pytest.mark.parametrize("source", MATRIX_SOURCES)
def test_archive_encoded_decodes_in_dcmtk(tmp_path: Path, source: str, target: str) -> None:
    """What the archive writes from a native file, DCMTK reads (dcmdump) and decodes (dcmdjpls, dcmdrle,
    dcmdjpeg) to the source's pixels: exactly for lossless syntaxes, and for JPEG Baseline to what the
    archive itself decodes from its output, within LOSSY_TOLERANCE."""
    from dicomcore.transcode import TranscodeError

    native = matrix_source(tmp_path, source)
    syntax = ARCHIVE_TARGETS[target]
    if (source, target) in ARCHIVE_REFUSES:
        with pytest.raises(TranscodeError, match=ARCHIVE_REFUSES[source, target]):
            transcode_instance(native.read_bytes(), syntax)
        return
    out = transcode_instance(native.read_bytes(), syntax)
    decoded = dcmtk_reads(tmp_path, out)
    assert decoded is not None
    if syntax == JPEG_BASELINE:
        own = pydicom.dcmread(io.BytesIO(transcode_instance(out, EXPLICIT_VR_LITTLE_ENDIAN))).pixel_array
        assert np.abs(decoded.pixel_array.astype(int) - own.astype(int)).max() <= LOSSY_TOLERANCE
    else:
        assert np.array_equal(decoded.pixel_array, pydicom.dcmread(native).pixel_array)


def test_12_bit_jpeg_is_not_first_offered_to_pillow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Pillow, the reference plugin for 8-bit JPEG, cannot decode 12-bit JPEG Extended, and trying it first
    put a warning ("Pillow does not support 'JPEG Extended' for samples with 12-bit precision") in the log
    for every transcode, frame and rendering of such an image (166 in one sweep), all of which succeed.
    Samples of more than 8 bits now go to pydicom's own plugin order at once."""
    jpeg = dcmtk_made(tmp_path, "CT_small.dcm", "dcmcjpeg", "+ee", "+un")
    stored = pydicom.dcmread(jpeg)
    assert stored.BitsStored > 8
    pixel = PixelDescription(
        128, 128, 1, 16, stored.BitsStored, stored.PixelRepresentation, "MONOCHROME2", 0, 1
    )
    with caplog.at_level("DEBUG"):
        transcode_instance(jpeg.read_bytes(), EXPLICIT_VR_LITTLE_ENDIAN)
        decode_frame(frames_of(stored)[0], str(stored.file_meta.TransferSyntaxUID), pixel)
        render(io.BytesIO(jpeg.read_bytes()), [1], RenderOptions(media_type="image/png"))
    assert [r.getMessage() for r in caplog.records if "Pillow" in r.getMessage()] == []
