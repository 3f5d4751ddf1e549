"""WADO-RS frames, transcoded retrieve and bulk data over real HTTP (both storage backends where reads
matter: frames are ranged reads of the stored object, which S3 serves differently from a local file)."""

from __future__ import annotations

import io
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import orjson
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from dicomcore.transcode import JPEG_BASELINE, RLE_LOSSLESS
from tests.fixtures.server import RunningArchive
from tests.test_stow_wado_delete import parts_of, seq_items
from tests.test_transcode import reference_pixels

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ELE = "1.2.840.10008.1.2.1"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
OCTETS_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@pytest.fixture
async def client(archive: RunningArchive):
    async with httpx.AsyncClient(base_url=archive.url, timeout=30) as c:
        yield c


@pytest.fixture
async def local_client(local_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=30) as c:
        yield c


async def store(client: httpx.AsyncClient, data: bytes) -> str:
    """STOW one file; its WADO-RS instance URL."""
    response = await client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    return seq_items(response.json(), "00081199")[0]["00081190"]["Value"][0]


def expected_frames(data: bytes) -> list[bytes]:
    """What pydicom extracts: encapsulated frames, or the native pixel data cut into equal frames."""
    ds = pydicom.dcmread(io.BytesIO(data))
    count = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    size = len(ds.PixelData) // count
    return [ds.PixelData[i * size : (i + 1) * size] for i in range(count)]


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


AS_STORED = [
    ("rtdose.dcm", ELE),  # 15 native frames (stored Implicit VR LE: frames are the same bytes)
    ("examples_ybr_color.dcm", JPEG_BASELINE),  # 30 JPEG frames
    ("SC_rgb_rle_2frame.dcm", RLE_LOSSLESS),
]


async def test_frames_as_stored_byte_equal(client: httpx.AsyncClient) -> None:
    """Frames byte-equal to what pydicom extracts, native and encapsulated, on both storage backends."""
    for name, syntax in AS_STORED:
        data = (TEST_FILES / name).read_bytes()
        url = await store(client, data)
        expected = expected_frames(data)
        asked = [len(expected), 1, 2] if len(expected) > 2 else [2, 1]
        frame_list = ",".join(map(str, asked))
        response = await client.get(f"{url}/frames/{frame_list}", headers={"Accept": OCTETS_ANY})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(
            'multipart/related; type="application/octet-stream"'
        )
        parts = await parts_of(response)
        assert [body for _, body in parts] == [expected[n - 1] for n in asked], name
        assert {h["content-type"] for h, _ in parts} == {
            f"application/octet-stream; transfer-syntax={syntax}"
        }
        # one frame as a single part
        single = await client.get(
            f"{url}/frames/{len(expected)}", headers={"Accept": "application/octet-stream; transfer-syntax=*"}
        )
        assert single.status_code == 200
        assert single.headers["content-type"] == f"application/octet-stream; transfer-syntax={syntax}"
        assert single.content == expected[-1]


async def test_frames_default_media_types(local_client: httpx.AsyncClient) -> None:
    client = local_client
    data = (TEST_FILES / "examples_ybr_color.dcm").read_bytes()
    url = await store(client, data)
    expected = expected_frames(data)
    # image/jpeg without a syntax: the stored baseline frames, not re-encoded (PS3.18 8.7.3.4)
    response = await client.get(f"{url}/frames/3", headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert response.status_code == 200
    ((headers, body),) = await parts_of(response)
    assert headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    assert body == expected[2]
    single = await client.get(f"{url}/frames/3", headers={"Accept": "image/jpeg"})
    assert single.headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    assert single.content == expected[2]
    assert single.headers["accept-ranges"] == "bytes"
    ranged = await client.get(f"{url}/frames/3", headers={"Accept": "image/jpeg", "Range": "bytes=-100"})
    assert ranged.status_code == 206 and ranged.content == expected[2][-100:]
    assert (
        ranged.headers["content-range"]
        == f"bytes {len(expected[2]) - 100}-{len(expected[2]) - 1}/{len(expected[2])}"
    )
    # as OHIF asks (omitQuotationForMultipartRequest): the type parameter unquoted
    ohif = await client.get(
        f"{url}/frames/3",
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
    )
    assert [b for _, b in await parts_of(ohif)] == [expected[2]]
    # no Accept: multipart octet-stream in the default Explicit VR Little Endian, i.e. decoded
    plain = await client.get(f"{url}/frames/3")
    ((headers, body),) = await parts_of(plain)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert body == reference_pixels(data)[2].tobytes()


async def test_frames_transcoded(local_client: httpx.AsyncClient) -> None:
    client = local_client
    data = (TEST_FILES / "SC_rgb_rle_2frame.dcm").read_bytes()
    url = await store(client, data)
    reference = reference_pixels(data)
    # RLE -> JPEG 2000 lossless, then decoded back: equal pixels
    response = await client.get(f"{url}/frames/2", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert response.status_code == 200
    ((headers, body),) = await parts_of(response)
    assert headers["content-type"] == f"image/jp2; transfer-syntax={J2K_LOSSLESS}"
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([body])
    ds.file_meta.TransferSyntaxUID = J2K_LOSSLESS
    assert np.array_equal(ds.pixel_array, reference[1])
    # RLE -> native little endian
    native = await client.get(
        f"{url}/frames/1", headers={"Accept": f"application/octet-stream; transfer-syntax={ELE}"}
    )
    assert native.status_code == 200 and native.content == reference[0].tobytes()
    # q-values: JPEG-LS preferred, then anything
    ranked = await client.get(
        f"{url}/frames/1",
        headers={"Accept": 'multipart/related; type="image/jls", multipart/related; type="*"; q=0.1'},
    )
    ((headers, _),) = await parts_of(ranked)
    assert headers["content-type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    # the older RLE media type name is understood
    rle = await client.get(
        f"{url}/frames/1", headers={"Accept": 'multipart/related; type="image/x-dicom-rle"'}
    )
    ((headers, body),) = await parts_of(rle)
    assert headers["content-type"] == f"image/x-dicom-rle; transfer-syntax={RLE_LOSSLESS}"
    assert body == expected_frames(data)[0]


async def test_native_frames_in_either_byte_order(local_client: httpx.AsyncClient) -> None:
    client = local_client
    big = (TEST_FILES / "MR_small_bigendian.dcm").read_bytes()
    url = await store(client, big)
    # PS3.18 native frames are little endian: big endian storage is swapped, whatever was asked
    response = await client.get(f"{url}/frames/1", headers={"Accept": OCTETS_ANY})
    ((headers, body),) = await parts_of(response)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert body == reference_pixels(big).astype("<i2").tobytes()
    # Implicit VR Little Endian frames are the same bytes as Explicit VR Little Endian ones
    rtdose = (TEST_FILES / "rtdose.dcm").read_bytes()
    url = await store(client, rtdose)
    implicit = "1.2.840.10008.1.2"
    response = await client.get(
        f"{url}/frames/4", headers={"Accept": f"application/octet-stream; transfer-syntax={implicit}"}
    )
    assert response.headers["content-type"] == f"application/octet-stream; transfer-syntax={implicit}"
    assert response.content == expected_frames(rtdose)[3]


async def test_frames_bad_input(local_client: httpx.AsyncClient) -> None:
    client = local_client
    ct = (TEST_FILES / "CT_small.dcm").read_bytes()  # one 16-bit frame
    url = await store(client, ct)
    for frames in ("0", "abc", "1,,2", "1-2", "-1"):
        response = await client.get(f"{url}/frames/{frames}", headers={"Accept": OCTETS_ANY})
        assert response.status_code == 400, frames
        assert "frame" in response.json()["error"]["message"]
    missing = await client.get(f"{url}/frames/1,2", headers={"Accept": OCTETS_ANY})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == (
        f"frame 2 does not exist: instance {pydicom.dcmread(io.BytesIO(ct)).SOPInstanceUID} has 1 frame(s)"
    )
    unknown = url.rsplit("/", 1)[0] + "/1.2.3.4.5"
    assert (await client.get(f"{unknown}/frames/1", headers={"Accept": OCTETS_ANY})).status_code == 404
    assert (await client.get(f"{url}/frames/1", headers={"Accept": "text/html"})).status_code == 406
    assert (await client.get(f"{url}/frames/1", headers={"Accept": "image/jpeg; q=x"})).status_code == 400
    # 16-bit pixels cannot become JPEG Baseline; the reason is given
    lossy = await client.get(
        f"{url}/frames/1", headers={"Accept": f"image/jpeg; transfer-syntax={JPEG_BASELINE}"}
    )
    assert lossy.status_code == 406 and "8-bit unsigned" in lossy.json()["error"]["message"]
    # a transfer syntax that does not belong to the media type
    mismatch = await client.get(
        f"{url}/frames/1", headers={"Accept": f"image/jp2; transfer-syntax={RLE_LOSSLESS}"}
    )
    assert mismatch.status_code == 406
    # several frames as one single part: not offered
    rtdose = await store(client, (TEST_FILES / "rtdose.dcm").read_bytes())
    several = await client.get(f"{rtdose}/frames/1,2", headers={"Accept": "application/octet-stream"})
    assert several.status_code == 406 and "single part only" in several.json()["error"]["message"]
    # an instance without pixel data
    ds = pydicom.dcmread(io.BytesIO(ct))
    del ds.PixelData
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    no_pixels = await store(client, to_bytes(ds))
    response = await client.get(f"{no_pixels}/frames/1", headers={"Accept": OCTETS_ANY})
    assert response.status_code == 400 and "has no pixel data" in response.json()["error"]["message"]
    # an encoder that gives up on an image (OpenJPEG on 3x3 pixels): 406 with its reason, frame and instance
    odd = await store(client, (TEST_FILES / "SC_rgb_small_odd.dcm").read_bytes())
    refused = await client.get(f"{odd}/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert refused.status_code == 406 and "cannot encode" in refused.json()["error"]["message"]
    refused = await client.get(odd, headers={"Accept": f"application/dicom; transfer-syntax={J2K_LOSSLESS}"})
    assert refused.status_code == 406 and "cannot encode" in refused.json()["error"]["message"]
    # the server keeps serving
    assert (await client.get(f"{url}/frames/1", headers={"Accept": OCTETS_ANY})).status_code == 200


async def test_corrupt_compressed_frame(local_client: httpx.AsyncClient) -> None:
    client = local_client
    ds = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    broken = frame[:20] + b"\x00" * 64 + frame[-2:]
    ds.PixelData = encapsulate([broken])
    url = await store(client, to_bytes(ds))
    # as stored it is just bytes
    stored = await client.get(f"{url}/frames/1", headers={"Accept": OCTETS_ANY})
    assert stored.status_code == 200 and [b for _, b in await parts_of(stored)] == [broken]
    # decoding it fails: a clear 4xx, before any body
    decoded = await client.get(f"{url}/frames/1", headers={"Accept": "application/octet-stream"})
    assert decoded.status_code == 406
    assert "cannot be delivered" in decoded.json()["error"]["message"]
    instance = await client.get(url, headers={"Accept": f"application/dicom; transfer-syntax={ELE}"})
    assert instance.status_code == 406 and "transfer-syntax=*" in instance.json()["error"]["message"]
    # naming no syntax asks for the default but states no preference: undecodable data comes as stored
    lenient = await client.get(url, headers={"Accept": "application/dicom"})
    assert lenient.status_code == 200
    assert lenient.headers["content-type"] == f"application/dicom; transfer-syntax={JPEG_BASELINE}"
    assert pydicom.dcmread(io.BytesIO(lenient.content)).PixelData == ds.PixelData
    assert (await client.get(f"{url}/frames/1", headers={"Accept": OCTETS_ANY})).status_code == 200


async def test_frames_without_a_stored_frame_table(
    archive: RunningArchive, client: httpx.AsyncClient
) -> None:
    """Instances indexed before the frame table existed (no "#" rows) are served by parsing the object."""
    data = (TEST_FILES / "examples_ybr_color.dcm").read_bytes()
    url = await store(client, data)
    sop = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    conn = await asyncpg.connect(archive.database_url)
    try:
        index = orjson.loads(
            await conn.fetchval("SELECT bulk_index FROM instance WHERE sop_instance_uid=$1", sop)
        )
        assert any("#" in row[0] for row in index)
        old = orjson.dumps([row for row in index if "#" not in row[0]])
        await conn.execute("UPDATE instance SET bulk_index = $1 WHERE sop_instance_uid = $2", old, sop)
    finally:
        await conn.close()
    response = await client.get(f"{url}/frames/30,1", headers={"Accept": OCTETS_ANY})
    assert response.status_code == 200
    expected = expected_frames(data)
    assert [b for _, b in await parts_of(response)] == [expected[29], expected[0]]


async def test_retrieve_transcoded(client: httpx.AsyncClient) -> None:
    rle = (TEST_FILES / "MR_small_RLE.dcm").read_bytes()
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ct.StudyInstanceUID = pydicom.dcmread(io.BytesIO(rle)).StudyInstanceUID  # a study of two instances
    native = to_bytes(ct)
    url = await store(client, rle)
    await store(client, native)
    # instance in the default syntax (Explicit VR Little Endian): decoded
    response = await client.get(url, headers={"Accept": "application/dicom"})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/dicom; transfer-syntax={ELE}"
    out = pydicom.dcmread(io.BytesIO(response.content))
    assert out.file_meta.TransferSyntaxUID == ELE
    assert np.array_equal(out.pixel_array, reference_pixels(rle))
    # q-values: JPEG Baseline is impossible for 16-bit data, so the next acceptable syntax is used
    ranked = await client.get(
        url,
        headers={
            "Accept": f"application/dicom; transfer-syntax={JPEG_BASELINE}, "
            f"application/dicom; transfer-syntax={J2K_LOSSLESS}; q=0.5"
        },
    )
    assert ranked.headers["content-type"] == f"application/dicom; transfer-syntax={J2K_LOSSLESS}"
    assert np.array_equal(reference_pixels(ranked.content), reference_pixels(rle))
    only_lossy = await client.get(
        url, headers={"Accept": f"application/dicom; transfer-syntax={JPEG_BASELINE}"}
    )
    assert only_lossy.status_code == 406 and "8-bit" in only_lossy.json()["error"]["message"]
    # a study: every instance transcoded, one part each
    study = url.split("/series/")[0]
    both = await client.get(
        study,
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={RLE_LOSSLESS}'},
    )
    assert both.status_code == 200
    parts = await parts_of(both)
    assert len(parts) == 2
    assert {h["content-type"] for h, _ in parts} == {f"application/dicom; transfer-syntax={RLE_LOSSLESS}"}
    decoded = sorted((reference_pixels(b).tobytes() for _, b in parts), key=len)
    assert decoded == sorted([reference_pixels(rle).tobytes(), reference_pixels(native).tobytes()], key=len)
    for headers, body in parts:
        assert int(headers["content-length"]) == len(body)
    # transfer-syntax=* is still as stored, byte for byte
    stored = await client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert stored.content == rle


async def test_bulkdata_encapsulated_and_nested(client: httpx.AsyncClient) -> None:
    data = (TEST_FILES / "SC_rgb_rle_2frame.dcm").read_bytes()
    url = await store(client, data)
    metadata = (await client.get(f"{url}/metadata")).json()[0]
    pixel_uri = metadata["7FE00010"]["BulkDataURI"]
    response = await client.get(pixel_uri, headers={"Accept": OCTETS_ANY})
    assert response.status_code == 200
    assert [b for _, b in await parts_of(response)] == expected_frames(data)
    # a bulk value nested in a sequence, and Range on it
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    item = Dataset()
    item.add_new(0x00091010, "OB", bytes(range(256)) * 4)  # private, over the inline limit
    item.add_new(0x00090010, "LO", "TEST CREATOR")
    ds.add_new(0x00540016, "SQ", [Dataset(), item])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".7"
    nested_url = await store(client, to_bytes(ds))
    metadata = (await client.get(f"{nested_url}/metadata")).json()[0]
    uri = metadata["00540016"]["Value"][1]["00091010"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/00540016/1/00091010")
    whole = await client.get(uri, headers={"Accept": "application/octet-stream"})
    assert whole.status_code == 200 and whole.content == bytes(range(256)) * 4
    ranged = await client.get(uri, headers={"Accept": "application/octet-stream", "Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == bytes(range(10, 20))
    multipart = await client.get(uri)
    assert [b for _, b in await parts_of(multipart)] == [bytes(range(256)) * 4]
    # encapsulated pixel data of a one-frame instance: single part, with Range
    j2k = (TEST_FILES / "JPEG2000.dcm").read_bytes()
    j2k_url = await store(client, j2k)
    (frame,) = expected_frames(j2k)
    single = await client.get(
        f"{j2k_url}/bulkdata/7FE00010",
        headers={"Accept": "application/octet-stream; transfer-syntax=*", "Range": "bytes=0-9"},
    )
    assert single.status_code == 206 and single.content == frame[:10]
    assert (
        single.headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.91"
    )
    # every BulkDataURI handed out resolves
    for value in (metadata["7FE00010"], metadata["00540016"]["Value"][1]["00091010"]):
        assert (await client.get(value["BulkDataURI"], headers={"Accept": OCTETS_ANY})).status_code == 200
    missing = await client.get(f"{nested_url}/bulkdata/00540016/5/00091010")
    assert missing.status_code == 404


def _bulk_uris(node: object) -> list[tuple[str, str]]:
    """(BulkDataURI, VR) of every bulk value in a DICOM JSON object, nested ones included."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if "BulkDataURI" in node:
            found.append((node["BulkDataURI"], node["vr"]))
        for value in node.values():
            found.extend(_bulk_uris(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_bulk_uris(item))
    return found


def _value_at(ds: Dataset, path: str) -> bytes:
    parts = path.split("/")
    for i in range(0, len(parts) - 1, 2):
        ds = ds[int(parts[i], 16)].value[int(parts[i + 1])]
    return ds[int(parts[-1], 16)].value


async def test_every_bulkdata_uri_resolves(local_client: httpx.AsyncClient) -> None:
    client = local_client
    names = [
        "MR_small_bigendian.dcm",  # big endian: words come back little endian (PS3.18 Table 8.7.3-4)
        "examples_palette.dcm",  # palette LUT data (OW) beside pixel data
        "image_dfl.dcm",  # deflated: no value is a byte range of the stored object
        "rtdose.dcm",  # native multi-frame
        "JPEG2000.dcm",  # encapsulated
        "SC_rgb_rle_2frame.dcm",  # encapsulated, two frames
    ]
    for name in names:
        data = (TEST_FILES / name).read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data))
        url = await store(client, data)
        metadata = (await client.get(f"{url}/metadata")).json()[0]
        uris = _bulk_uris(metadata)
        assert uris
        for uri, _vr in uris:
            path = uri.split("/bulkdata/", 1)[1]
            got = await client.get(uri, headers={"Accept": OCTETS_ANY})
            assert got.status_code == 200, (uri, got.text)
            bodies = [b for _, b in await parts_of(got)]
            if path == "7FE00010" and ds.file_meta.TransferSyntaxUID.is_compressed:
                assert bodies == expected_frames(data)  # encapsulated: one part per frame
            elif ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2" and path == "7FE00010":
                assert bodies == [reference_pixels(data).astype("<i2").tobytes()]
            else:
                assert bodies == [_value_at(ds, path)], (name, path)


async def test_frames_of_a_truncated_object_are_refused(
    archive: RunningArchive, client: httpx.AsyncClient
) -> None:
    """An object cut short after ingest (a zero-length file, a half-written copy) was read by the frame
    table's offsets as it was: frames past its end came back 200 with 0 bytes (or a part of a frame). A
    short read is now a 500 naming the instance; frames within what remains are served as before."""
    data = (TEST_FILES / "rtdose.dcm").read_bytes()
    url = await store(client, data)
    sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    conn = await asyncpg.connect(archive.database_url)
    try:
        key = await conn.fetchval("SELECT storage_key FROM instance WHERE sop_instance_uid = $1", sop)
    finally:
        await conn.close()
    expected = expected_frames(data)
    single = {"Accept": "application/octet-stream; transfer-syntax=*"}
    damaged = f"instance {sop} is damaged: its stored object is shorter than recorded at ingest"
    await archive.store.put(key, data[: len(data) - len(expected[-1]) // 2])  # the last frame cut in half
    first = await client.get(f"{url}/frames/1", headers=single)
    assert first.status_code == 200 and first.content == expected[0]
    response = await client.get(f"{url}/frames/{len(expected)}", headers=single)
    assert (response.status_code, response.json()["error"]["message"]) == (500, damaged)
    await archive.store.put(key, b"")
    response = await client.get(f"{url}/frames/1", headers={"Accept": OCTETS_ANY})
    assert (response.status_code, response.json()["error"]["message"]) == (500, damaged)
    # gone from the store while the index still has it: 'deleted while it was read' (404) before
    await archive.store.delete(key)
    response = await client.get(f"{url}/frames/1", headers={"Accept": OCTETS_ANY})
    assert (response.status_code, response.json()["error"]["message"]) == (
        500,
        f"instance {sop} is damaged: its stored object is missing from the store (reported to the "
        "archive's log)",
    )
