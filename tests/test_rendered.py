"""Rendered and thumbnail resources over real HTTP, compared with an independent numpy rendering.

The reference renderings below follow PS3.3 C.11.2.1.2 (windowing), C.7.6.3.1.2 (YBR_FULL to RGB) and
C.7.6.3.1.5 (palette color) directly from pydicom's decoded pixel array; they share no code with
dicomcore.render.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array

from bench.synthetic import make_instance, make_study, to_bytes
from dicomcore import render as render_module
from dicomcore.render import Viewport, Window, parse_viewport, parse_window
from dicomweb.routes import rendered as rendered_route
from tests.fixtures.server import RunningArchive
from tests.test_stow_wado_delete import parts_of, stow


def bundled(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def path_of(ds: pydicom.Dataset) -> str:
    return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


# ------------------------------------------------------------------------------ the independent reference


def reference_window(values: np.ndarray, center: float, width: float, function: str = "linear") -> np.ndarray:
    x = values.astype(np.float64)
    if function == "linear":
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
        y = np.where(x <= low, 0, np.where(x > high, 255, y))
    elif function == "linear-exact":
        y = np.where(
            x <= center - width / 2,
            0,
            np.where(x > center + width / 2, 255, ((x - center) / width + 0.5) * 255),
        )
    else:
        y = 255 / (1 + np.exp(-4 * (x - center) / width))
    return y


def reference_gray(ds: pydicom.Dataset, frame: int = 0, window: tuple | None = None) -> np.ndarray:
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[frame]
    values = arr * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if window is None:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc
        ww = ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww
        window = (float(wc), float(ww), "linear")
    y = reference_window(values, *window)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 255 - y
    return np.rint(y).astype(np.uint8)


def reference_ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack(
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
        -1,
    )
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def reference_palette(ds: pydicom.Dataset) -> np.ndarray:
    index = ds.pixel_array.astype(np.int64)
    channels = []
    for color in ("Red", "Green", "Blue"):
        _, first, bits = ds[f"{color}PaletteColorLookupTableDescriptor"].value
        lut = np.frombuffer(ds[f"{color}PaletteColorLookupTableData"].value, "<u2" if bits == 16 else "u1")
        values = lut[np.clip(index - first, 0, len(lut) - 1)].astype(np.float64)
        channels.append(values * 255 / (2**bits - 1))
    return np.rint(np.stack(channels, -1)).astype(np.uint8)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int = 1) -> None:
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int32) - expected.astype(np.int32))
    assert difference.max() <= tolerance, f"max difference {difference.max()}"


def ct_instance(seed: int = 1, **kwargs) -> pydicom.Dataset:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    return make_instance(spec, 0, 1, rng=rng, **kwargs)


@pytest.fixture
async def client(local_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=60) as c:
        yield c


# ------------------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("name", "bits_stored", "signed", "frames"),
    [("CT_small.dcm", 12, 0, 1), ("CT_small.dcm", 12, 1, 3), ("CT_small.dcm", 16, 1, 1),
     ("MR_small_padded.dcm", 16, 0, 2), ("examples_palette.dcm", 6, 0, 1),
     ("examples_overlay.dcm", 12, 1, 1)],
)  # fmt: skip
def test_native_frames_are_pydicoms(name: str, bits_stored: int, signed: int, frames: int) -> None:
    """The fast path for native grayscale pixel data gives pydicom's arrays exactly, with the unused high
    bits set to garbage (shifted out, sign-extended when signed); other pixel data is left to pydicom."""
    ds = bundled(name)
    dtype = "<u1" if ds.BitsAllocated == 8 else "<u2"
    size = ds.Rows * ds.Columns * np.dtype(dtype).itemsize
    raw = np.frombuffer(ds.PixelData[:size] * frames, dtype).copy()
    if bits_stored < ds.BitsAllocated:
        raw |= np.array((0xFFFF << bits_stored) & 0xFFFF, dtype=np.uint32).astype(dtype)
    ds.PixelData, ds.BitsStored, ds.HighBit = raw.tobytes(), bits_stored, bits_stored - 1
    ds.PixelRepresentation, ds.NumberOfFrames = signed, frames
    got = render_module._native_frames(ds, list(range(frames)))
    assert got is not None and len(got) == frames
    for index, arr in enumerate(got):
        expected = pixel_array(ds, index=index)
        assert arr.dtype == expected.dtype and np.array_equal(arr, expected) and arr.flags.writeable
    for other in ("SC_rgb_small_odd.dcm", "JPEG2000.dcm", "rtdose.dcm", "MR_truncated.dcm"):
        assert render_module._native_frames(bundled(other), [0]) is None  # pydicom decodes or refuses


def _pydicoms_value(ds: pydicom.Dataset, keyword: str) -> object:
    value = ds.get(keyword)
    return None if value == "" else value


def _rendered_both_ways(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """render() as it is, and with every attribute converted by pydicom (the reference)."""

    def outcome() -> object:
        try:
            return render_module.render(io.BytesIO(data), [1], render_module.RenderOptions("image/png"))
        except Exception as exc:
            return type(exc)

    fast = outcome()
    with monkeypatch.context() as m:
        m.setattr(
            render_module, "_get", lambda ds, keyword: ds.get(keyword) if ds.get(keyword) != "" else None
        )
        m.setattr(
            render_module,
            "_rescaled",
            lambda stored, header: pydicom.pixels.apply_modality_lut(stored, header),
        )
        reference = outcome()
    return fast, reference


def test_raw_values_render_what_pydicoms_conversions_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attributes read straight from their bytes (render._get) give the images pydicom's conversions give,
    for every bundled pydicom file, refusals included."""
    from pydicom.data import get_testdata_files

    for path in get_testdata_files("*.dcm"):
        with open(path, "rb") as f:
            data = f.read()
        fast, reference = _rendered_both_ways(data, monkeypatch)
        assert fast == reference, path


DS_TEXT = st.one_of(
    st.floats(-5000, 5000, allow_nan=False).map(lambda f: f"{f:.6g}"),
    st.sampled_from(["", " 1", "1 ", "2\\3", "-1024.0", "1e2", "0", "+7"]),
)


@settings(max_examples=150, deadline=None)
@given(
    slope=st.one_of(st.none(), DS_TEXT), intercept=st.one_of(st.none(), DS_TEXT),
    center=st.one_of(st.none(), DS_TEXT), width=st.one_of(st.none(), DS_TEXT),
    function=st.sampled_from([None, "LINEAR", "SIGMOID", "LINEAR_EXACT", "linear", ""]),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "MONOCHROME2 ", ""]),
    frames=st.sampled_from([None, "1", "", " 1 "]),
)  # fmt: skip
def test_raw_values_render_like_pydicom_whatever_the_values(
    slope: str | None, intercept: str | None, center: str | None, width: str | None, function: str | None,
    photometric: str, frames: str | None,
) -> None:  # fmt: skip
    ds = make_instance(make_study(random.Random(3), series_count=1, modalities=["CT"]), 0, 1,
                       rng=random.Random(4), rows=16, columns=16)  # fmt: skip
    for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept), ("WindowCenter", center),
                           ("WindowWidth", width), ("VOILUTFunction", function), ("NumberOfFrames", frames),
                           ("PhotometricInterpretation", photometric)):  # fmt: skip
        if keyword in ds:
            del ds[keyword]
        if value is not None:
            ds.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), value)
    data = to_bytes(ds)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, reference = _rendered_both_ways(data, monkeypatch)
    assert fast == reference


def test_parse_window_and_viewport() -> None:
    assert parse_window("40,400") == Window(40, 400, "LINEAR")
    assert parse_window("-600.5,1500,linear-exact") == Window(-600.5, 1500, "LINEAR_EXACT")
    assert parse_window("0,0.5,SIGMOID") == Window(0, 0.5, "SIGMOID")
    assert parse_viewport("64,32") == Viewport(64, 32)
    assert parse_viewport("64,32,,,10,-10") == Viewport(64, 32, 0, 0, 10, -10)
    for bad in ("40", "a,b", "40,0", "40,400,cubic", "40,400,linear,1", "nan,5", "1,inf"):
        with pytest.raises(ValueError):
            parse_window(bad)
    for bad in ("64", "0,10", "10,x", "64,64,1,2,3", "64,64,-1,0,5,5", "64,64,0,0,0,5", "9000,10"):
        with pytest.raises(ValueError):
            parse_viewport(bad)
    # the message names the function, also when it was left out (it said "for 0", the width)
    with pytest.raises(ValueError, match=r"^window width must be >= 1 for linear; got 0.0$"):
        parse_window("40,0")
    with pytest.raises(ValueError, match=r"^window width must be > 0 for sigmoid; got 0.0$"):
        parse_window("40,0,Sigmoid")


@given(st.text(max_size=30))
def test_parsers_reject_garbage_only_with_value_error(text: str) -> None:
    for parse in (parse_window, parse_viewport):
        try:
            parse(text)
        except ValueError:
            pass


@given(
    st.floats(-5000, 5000, allow_nan=False),
    st.floats(1, 5000, allow_nan=False),
    st.sampled_from(["linear", "linear-exact", "sigmoid"]),
)
def test_parse_window_round_trips(center: float, width: float, function: str) -> None:
    window = parse_window(f"{center!r},{width!r},{function}")
    assert (window.center, window.width) == (center, width)
    assert window.function == function.upper().replace("-", "_")


# -------------------------------------------------------------------------------------- grayscale images


async def test_ct_default_window_png_matches_reference(client: httpx.AsyncClient) -> None:
    ds = ct_instance()
    assert (await stow(client, [to_bytes(ds)])).status_code == 200
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert_close(decode(response.content), reference_gray(ds))
    # pydicom's own windowing (another implementation of C.11.2.1.2) agrees, scaled to 8 bits
    values = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    theirs = pydicom.pixels.apply_windowing(values, ds)
    assert_close(decode(response.content), np.rint((theirs - theirs.min()) * 255 / 4095).astype(np.uint8))


@pytest.mark.parametrize("window", [(100, 300, "linear"), (-50, 700, "linear-exact"), (40, 400, "sigmoid")])
async def test_window_parameter(client: httpx.AsyncClient, window: tuple) -> None:
    ds = ct_instance(2)
    await stow(client, [to_bytes(ds)])
    response = await client.get(
        path_of(ds) + "/rendered",
        params={"window": ",".join(map(str, window))},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 200
    assert_close(decode(response.content), reference_gray(ds, window=window))


async def test_monochrome1_is_inverted(client: httpx.AsyncClient) -> None:
    ds = ct_instance(3)
    ds.PhotometricInterpretation = "MONOCHROME1"
    await stow(client, [to_bytes(ds)])
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})
    expected = reference_gray(ds)
    assert_close(decode(response.content), expected)
    ds.PhotometricInterpretation = "MONOCHROME2"
    assert_close(decode(response.content), 255 - reference_gray(ds))


async def test_voi_lut_sequence_is_applied(client: httpx.AsyncClient) -> None:
    ds = ct_instance(4)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    lut = (np.arange(4096) ** 2 // 4096).astype("<u2")  # a non-linear curve windowing could not give
    item["LUTData"] = pydicom.DataElement(0x00283006, "OW", lut.tobytes())
    ds.VOILUTSequence = [item]
    await stow(client, [to_bytes(ds)])
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})
    values = (ds.pixel_array.astype(np.int64) - 1024).clip(0, 4095)  # after rescale, clamped to the LUT
    expected = np.rint(lut.astype(np.float64)[values] * 255 / 4095).astype(np.uint8)
    assert_close(decode(response.content), expected)
    # a window in the request overrides the instance's VOI LUT
    response = await client.get(path_of(ds) + "/rendered", params={"window": "40,400,linear"})
    assert response.status_code == 200


async def test_multiframe_frames_and_gif(client: httpx.AsyncClient) -> None:
    ds = bundled("rtdose.dcm")  # 15 frames, 32-bit, no window: min-max of each frame
    await stow(client, [encoded(ds)])
    frames = ds.pixel_array
    for number in (1, 7, 15):
        response = await client.get(
            path_of(ds) + f"/frames/{number}/rendered", headers={"Accept": "image/png"}
        )
        assert response.status_code == 200
        frame = frames[number - 1].astype(np.float64)
        low, high = frame.min(), frame.max()
        expected = np.rint(reference_window(frame, (low + high + 1) / 2, high - low + 1))
        assert_close(decode(response.content), expected.astype(np.uint8))
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/gif"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(response.content)).n_frames == 15
    response = await client.get(path_of(ds) + "/frames/2,3/rendered", headers={"Accept": "image/gif"})
    assert Image.open(io.BytesIO(response.content)).n_frames == 2
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/jpeg"})
    assert decode(response.content).shape == (10, 10)  # JPEG: the first frame

    for url, status in [
        ("/frames/16/rendered", 404),
        ("/frames/0/rendered", 400),
        ("/frames/1,x/rendered", 400),
    ]:
        response = await client.get(path_of(ds) + url)
        assert response.status_code == status, url
        assert response.json()["error"]["message"]
    response = await client.get(path_of(ds) + "/frames/1,2/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 400
    assert "image/gif" in response.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ color images


async def test_rgb_is_rendered_as_stored(client: httpx.AsyncClient) -> None:
    ds = bundled("examples_rgb_color.dcm")
    await stow(client, [encoded(ds)])
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})
    assert np.array_equal(decode(response.content), ds.pixel_array)


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
async def test_ybr_is_converted_to_rgb(client: httpx.AsyncClient, name: str) -> None:
    ds = bundled(name)
    await stow(client, [encoded(ds)])
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 200
    expected = reference_ybr_to_rgb(pixel_array(get_testdata_file(name), raw=True))
    assert_close(decode(response.content), expected, tolerance=2)


async def test_palette_color(client: httpx.AsyncClient) -> None:
    ds = bundled("examples_palette.dcm")
    await stow(client, [encoded(ds)])
    response = await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})
    assert_close(decode(response.content), reference_palette(ds))


# -------------------------------------------------------------------------------- viewport, quality, ...


async def test_viewport_crop_flip_and_fit(client: httpx.AsyncClient) -> None:
    ds = ct_instance(5)
    await stow(client, [to_bytes(ds)])
    expected = reference_gray(ds)  # 128 x 128

    async def get(viewport: str) -> np.ndarray:
        response = await client.get(
            path_of(ds) + "/rendered", params={"viewport": viewport}, headers={"Accept": "image/png"}
        )
        assert response.status_code == 200, response.text
        return decode(response.content)

    assert_close(await get("64,64,32,32,64,64"), expected[32:96, 32:96])
    assert_close(await get("64,64,96,32,-64,64"), expected[32:96, 32:96][:, ::-1])
    assert_close(await get("40,64,0,96,40,-64"), expected[32:96, 0:40][::-1, :])
    assert (await get("64,64")).shape == (64, 64)
    assert (await get("100,50")).shape == (50, 50)  # fitted, aspect ratio kept
    assert (await get("256,512")).shape == (256, 256)
    response = await client.get(path_of(ds) + "/rendered", params={"viewport": "10,10,200,200,5,5"})
    assert response.status_code == 400


async def test_jpeg_quality(client: httpx.AsyncClient) -> None:
    ds = ct_instance(6, rows=256, columns=256)
    await stow(client, [to_bytes(ds)])
    low = await client.get(path_of(ds) + "/rendered", params={"quality": "10"})
    high = await client.get(path_of(ds) + "/rendered", params={"quality": "95"})
    assert low.headers["content-type"] == high.headers["content-type"] == "image/jpeg"
    assert len(low.content) < len(high.content)
    expected = reference_gray(ds).astype(np.float64)
    mse = np.mean((decode(high.content).astype(np.float64) - expected) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 30  # PSNR in dB


async def test_annotation_draws_text(client: httpx.AsyncClient) -> None:
    ds = ct_instance(7, rows=256, columns=256)
    await stow(client, [to_bytes(ds)])
    plain = decode((await client.get(path_of(ds) + "/rendered", headers={"Accept": "image/png"})).content)
    response = await client.get(
        path_of(ds) + "/rendered", params={"annotation": "patient,technique"}, headers={"Accept": "image/png"}
    )
    annotated = decode(response.content)
    assert not np.array_equal(annotated[:40, :128], plain[:40, :128])  # text top left
    assert np.array_equal(annotated[128:], plain[128:])  # nothing else touched


# ------------------------------------------------------------------------------------ study and series


async def test_study_and_series_rendered_are_multipart(client: httpx.AsyncClient) -> None:
    rng = random.Random(8)
    spec = make_study(rng, series_count=2, modalities=["CT"])
    instances = [make_instance(spec, i % 2, i + 1, rng=rng) for i in range(3)]
    no_pixels = make_instance(spec, 0, 9, rng=rng)
    del no_pixels.PixelData
    await stow(client, [to_bytes(ds) for ds in [*instances, no_pixels]])
    response = await client.get(
        f"/studies/{spec.study_uid}/rendered", headers={"Accept": 'multipart/related; type="image/png"'}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="image/png"')
    parts = await parts_of(response)
    assert len(parts) == 3  # the instance without pixel data has no rendered representation
    by_sop = {ds.SOPInstanceUID: ds for ds in instances}
    for headers, body in parts:
        sop = headers["content-location"].split("/instances/")[1].removesuffix("/rendered")
        assert_close(decode(body), reference_gray(by_sop[sop]))
    series_uid = spec.series[1][0]
    response = await client.get(f"/studies/{spec.study_uid}/series/{series_uid}/rendered")
    assert response.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    assert len(await parts_of(response)) == 1
    response = await client.get(f"/studies/{spec.study_uid}/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 406


# ------------------------------------------------------------------------------------------- bad input


async def test_bad_requests_get_clear_errors_and_server_keeps_serving(client: httpx.AsyncClient) -> None:
    good = ct_instance(9)
    no_pixels = ct_instance(10)
    del no_pixels.PixelData
    corrupt = []
    for name, junk in [
        ("MR_small_jp2klossless.dcm", b"\xff\x4f\xff\x51" + b"\x13" * 200),
        ("MR_small_RLE.dcm", b"\x01" * 64),
    ]:
        ds = bundled(name)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds["PixelData"].value = encapsulate([junk])
        corrupt.append(ds)
    response = await stow(client, [to_bytes(good), to_bytes(no_pixels), *(encoded(ds) for ds in corrupt)])
    assert response.status_code == 200

    cases = [
        (path_of(good) + "/rendered", {}, {"Accept": "application/dicom"}, 406),
        (path_of(good) + "/rendered", {}, {"Accept": "image/jp2"}, 406),
        (path_of(good) + "/rendered", {}, {"Accept": "image/png;q=x"}, 400),
        (path_of(good) + "/rendered", {"window": "40"}, {}, 400),
        (path_of(good) + "/rendered", {"window": "40,abc,linear"}, {}, 400),
        (path_of(good) + "/rendered", {"window": "40,400,cubic"}, {}, 400),
        (path_of(good) + "/rendered", {"viewport": "0,10"}, {}, 400),
        (path_of(good) + "/rendered", {"viewport": "ten,10"}, {}, 400),
        (path_of(good) + "/rendered", {"quality": "0"}, {}, 400),
        (path_of(good) + "/rendered", {"annotation": "everything"}, {}, 400),
        (path_of(good) + "/rendered", {"windw": "40,400"}, {}, 400),
        (path_of(good).replace(good.SOPInstanceUID, "1.2.3.4") + "/rendered", {}, {}, 404),
        (path_of(no_pixels) + "/rendered", {}, {}, 400),
        (path_of(no_pixels) + "/thumbnail", {}, {}, 400),
        (path_of(corrupt[0]) + "/rendered", {}, {}, 422),
        (path_of(corrupt[1]) + "/rendered", {}, {"Accept": "image/png"}, 422),
        (path_of(corrupt[1]) + "/thumbnail", {}, {}, 422),
    ]
    for url, params, headers, status in cases:
        response = await client.get(url, params=params, headers=headers)
        assert response.status_code == status, (url, params, headers, response.text)
        assert response.json()["error"]["code"] == status
        assert len(response.json()["error"]["message"]) > 10
    response = await client.get(path_of(good) + "/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert_close(decode(response.content), reference_gray(good))


async def test_undecodable_pixel_data_logs_no_traceback(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A 12-bit JPEG Extended file no installed decoder takes (pydicom's JPEG-lossy.dcm): rendering it is
    422 with the decoders' reasons, and the log says so without tracebacks. pydicom logged each plugin's
    failure with its traceback (LOGGER.exception), a screenful per request, before raising the error the
    archive answers with."""
    data = (Path(pydicom.__file__).parent / "data" / "test_files" / "JPEG-lossy.dcm").read_bytes()
    response = await client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200
    url = response.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rendered = await client.get(f"{url}/rendered")
        transcoded = await client.get(
            url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}
        )
    assert rendered.status_code == 422
    assert "JPEG Extended" in rendered.json()["error"]["message"]
    assert transcoded.status_code == 406
    codec = [r for r in caplog.records if r.name.startswith("pydicom.pixels")]
    assert codec  # the reasons are still logged, one line each
    assert [r for r in codec if r.exc_info or r.levelno > logging.WARNING] == []


# -------------------------------------------------------------------------------- ranged reads, both stores


async def test_large_objects_are_read_by_range(
    archive: RunningArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the whole-read limit only the header and the frame asked for are fetched (both backends)."""
    monkeypatch.setattr(rendered_route, "WHOLE_READ_LIMIT", 0)
    frames = [ct_instance(20 + i, rows=256, columns=256) for i in range(3)]
    ds = frames[0]
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(f.PixelData for f in frames)
    async with httpx.AsyncClient(base_url=archive.url, timeout=60) as client:
        assert (await stow(client, [to_bytes(ds)])).status_code == 200
        response = await client.get(path_of(ds) + "/frames/3/rendered", headers={"Accept": "image/png"})
        assert response.status_code == 200
        assert_close(decode(response.content), reference_gray(ds, frame=2))


# ------------------------------------------------------------------------------------------- thumbnails


async def test_thumbnails_are_cached_and_cascade(
    local_archive: RunningArchive, client: httpx.AsyncClient
) -> None:
    rng = random.Random(11)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    instances = [make_instance(spec, 0, n, rng=rng) for n in (1, 2, 3)]
    await stow(client, [to_bytes(ds) for ds in instances])
    first = await client.get(f"/studies/{spec.study_uid}/thumbnail")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert decode(first.content).shape == (128, 128)
    conn = await asyncpg.connect(local_archive.database_url)
    try:
        keys = await conn.fetch("SELECT sop_instance_uid, storage_key FROM instance")
        rows = await conn.fetch(
            "SELECT i.sop_instance_uid FROM thumbnail t JOIN instance i USING (instance_key)"
        )
        assert [r[0] for r in rows] == [instances[1].SOPInstanceUID]  # the middle slice stands for the series
        # the cache answers without the stored object: remove the object behind the index's back
        for _, key in keys:
            await local_archive.store.delete(key)
        second = await client.get(f"/studies/{spec.study_uid}/thumbnail")
        assert second.status_code == 200 and second.content == first.content
        response = await client.get(f"/studies/{spec.study_uid}/series/{spec.series[0][0]}/thumbnail")
        assert response.content == first.content
        small = await client.get(path_of(instances[1]) + "/thumbnail", params={"viewport": "32,32"})
        assert small.status_code == 404  # a new variant must render, and the object is gone
        assert (await client.delete(f"/studies/{spec.study_uid}")).status_code == 204
        assert await conn.fetchval("SELECT count(*) FROM thumbnail") == 0
    finally:
        await conn.close()
    response = await client.get(f"/studies/{spec.study_uid}/thumbnail")
    assert response.status_code == 404


async def test_frame_thumbnail_and_png(client: httpx.AsyncClient) -> None:
    ds = bundled("rtdose.dcm")
    await stow(client, [encoded(ds)])
    response = await client.get(path_of(ds) + "/frames/5/thumbnail", headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert decode(response.content).shape == (128, 128)  # 10x10 scaled up to fit the thumbnail box
    response = await client.get(path_of(ds) + "/frames/16/thumbnail")
    assert response.status_code == 404


# ------------------------------------------------------------------------ Azure's application/jpeg alias


async def test_application_jpeg_is_answered_as_image_jpeg(client: httpx.AsyncClient) -> None:
    """Azure's client scripts ask for `application/jpeg` (not a registered type); Azure answers image/jpeg,
    the same image `image/jpeg` gets. Wildcards never select the alias, so `application/*` stays 406."""
    ds = ct_instance(31)
    spec_path = path_of(ds)  # instance level
    assert (await stow(client, [to_bytes(ds)])).status_code == 200
    for resource in ("/rendered", "/frames/1/rendered", "/thumbnail"):
        expected = await client.get(spec_path + resource, headers={"Accept": "image/jpeg"})
        for headers, params in (({"Accept": "application/jpeg"}, {}), ({}, {"accept": "application/jpeg"})):
            response = await client.get(spec_path + resource, headers=headers, params=params)
            assert (response.status_code, response.headers["content-type"]) == (200, "image/jpeg"), resource
            assert response.content == expected.content
    study = f"/studies/{ds.StudyInstanceUID}/rendered"
    response = await client.get(study, headers={"Accept": 'multipart/related; type="application/jpeg"'})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    [(part_headers, body)] = await parts_of(response)
    assert part_headers["content-type"] == "image/jpeg"
    assert body == (await client.get(spec_path + "/rendered", headers={"Accept": "image/jpeg"})).content
    for accept in ("application/*", "application/jpg", "application/dicom"):
        response = await client.get(spec_path + "/rendered", headers={"Accept": accept})
        assert response.status_code == 406, accept
        message = response.json()["error"]["message"]
        assert message.endswith("available: image/jpeg, image/png, image/gif"), message
