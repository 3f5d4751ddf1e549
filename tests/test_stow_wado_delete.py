"""STOW-RS, WADO-RS and DELETE over real HTTP, against both storage backends."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path

import httpx
import orjson
import pydicom
import pytest

import indexer.attributes
from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from dicomweb.multipart import iter_parts
from dicomweb.negotiation import parse_boundary
from tests.fixtures.server import RunningArchive

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DICOM = 'multipart/related; type="application/dicom"'
ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def study_files(seed: int, count: int = 3) -> tuple[object, list[bytes]]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=2)
    return spec, [to_bytes(make_instance(spec, i % 2, i + 1, rng=rng)) for i in range(count)]


async def stow(client: httpx.AsyncClient, files: list[bytes], path: str = "/studies") -> httpx.Response:
    body, content_type = multipart_body(files)
    return await client.post(path, content=body, headers={"Content-Type": content_type})


async def parts_of(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    boundary = parse_boundary(response.headers["content-type"])

    async def chunks():
        yield response.content

    out = []
    async for part, body in iter_parts(chunks(), boundary):
        with body:
            out.append((part.headers, body.read()))
    return out


def seq_items(body: dict, key: str) -> list[dict]:
    return body.get(key, {}).get("Value", [])


@pytest.fixture
async def client(archive: RunningArchive):
    async with httpx.AsyncClient(base_url=archive.url, timeout=30) as c:
        yield c


async def test_stow_then_retrieve_byte_for_byte(client: httpx.AsyncClient) -> None:
    spec, files = study_files(1)
    response = await stow(client, files)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    referenced = seq_items(body, "00081199")
    assert len(referenced) == 3 and "00081198" not in body
    assert body["00081190"]["Value"] == [f"{str(client.base_url).rstrip('/')}/studies/{spec.study_uid}"]
    sops = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]
    assert [item["00081155"]["Value"][0] for item in referenced] == sops

    # the whole study, as stored
    response = await client.get(f"/studies/{spec.study_uid}", headers={"Accept": ANY_SYNTAX})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = await parts_of(response)
    assert sorted(body for _, body in parts) == sorted(files)
    # one instance, single part, byte for byte
    for data, sop in zip(files, sops, strict=True):
        ds = pydicom.dcmread(io.BytesIO(data))
        url = f"/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{sop}"
        response = await client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
        assert response.status_code == 200
        assert response.content == data
        # RetrieveURL of the STOW response resolves to the same object
        retrieve_url = next(i["00081190"]["Value"][0] for i in referenced if i["00081155"]["Value"][0] == sop)
        again = await client.get(retrieve_url, headers={"Accept": "application/dicom; transfer-syntax=*"})
        assert again.content == data


async def test_pydicom_files_round_trip(client: httpx.AsyncClient) -> None:
    """Real-world variety: compressed, big-endian, implicit VR, deflated, multi-frame."""
    names = [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "rtdose.dcm",
        "JPEG2000.dcm",
        "SC_rgb_rle_2frame.dcm",
        "image_dfl.dcm",
        "examples_ybr_color.dcm",
        "waveform_ecg.dcm",
    ]
    files = [(TEST_FILES / n).read_bytes() for n in names]
    for data in files:
        response = await client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
        assert response.status_code == 200, response.text
        url = seq_items(response.json(), "00081199")[0]["00081190"]["Value"][0]
        got = await client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
        assert got.status_code == 200 and got.content == data
        meta = await client.get(url + "/metadata")
        assert meta.status_code == 200
        ds = pydicom.dcmread(io.BytesIO(data))
        assert meta.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]


async def test_restore_is_45070_and_changes_nothing(
    client: httpx.AsyncClient, archive: RunningArchive
) -> None:
    _, files = study_files(2, count=1)
    assert (await stow(client, files)).status_code == 200
    keys_before = sorted([b.key async for b in archive.store.list("")])
    response = await stow(client, files)
    assert response.status_code == 409
    failed = seq_items(response.json(), "00081198")
    assert [f["00081197"]["Value"] for f in failed] == [[45070]]
    assert sorted([b.key async for b in archive.store.list("")]) == keys_before
    # a batch with one new and one duplicate is a partial success
    _, more = study_files(3, count=1)
    response = await stow(client, [files[0], more[0]])
    assert response.status_code == 202
    assert len(seq_items(response.json(), "00081199")) == 1


async def test_study_mismatch_is_43265(client: httpx.AsyncClient) -> None:
    spec, files = study_files(4, count=2)
    other, _ = study_files(5, count=1)
    response = await stow(client, files, f"/studies/{other.study_uid}")
    assert response.status_code == 409
    assert {f["00081197"]["Value"][0] for f in seq_items(response.json(), "00081198")} == {43265}
    response = await stow(client, files, f"/studies/{spec.study_uid}")
    assert response.status_code == 200


async def test_bad_input(client: httpx.AsyncClient, archive: RunningArchive) -> None:
    _, files = study_files(6, count=1)
    # wrong content type
    r = await client.post("/studies", content=b"x", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    # multipart without boundary
    r = await client.post("/studies", content=b"x", headers={"Content-Type": "multipart/related"})
    assert r.status_code == 400
    # garbage part
    body, ct = multipart_body([b"not dicom at all" * 10])
    r = await client.post("/studies", content=body, headers={"Content-Type": ct})
    assert r.status_code == 409
    assert seq_items(r.json(), "00081198")[0]["00081197"]["Value"] == [43264]
    # truncated file
    body, ct = multipart_body([files[0][: len(files[0]) // 2]])
    r = await client.post("/studies", content=body, headers={"Content-Type": ct})
    assert r.status_code == 409
    # truncated body (no closing boundary) with nothing complete
    body, ct = multipart_body(files)
    r = await client.post("/studies", content=body[: len(body) // 2], headers={"Content-Type": ct})
    assert r.status_code == 400
    # missing UID: refused, and the failure names the instance (its SOP UIDs are there and valid)
    ds = pydicom.dcmread(io.BytesIO(files[0]))
    del ds.SeriesInstanceUID
    r = await client.post("/studies", content=to_bytes(ds), headers={"Content-Type": "application/dicom"})
    assert r.status_code == 409
    (failed,) = seq_items(r.json(), "00081198")
    assert failed["00081197"]["Value"] == [43264]
    assert failed["00081150"]["Value"] == [ds.SOPClassUID]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
    # an invalid SOP Instance UID is not echoed as if it named an instance
    ds = pydicom.dcmread(io.BytesIO(files[0]))
    ds.SOPInstanceUID = "1.2.abc"
    r = await client.post("/studies", content=to_bytes(ds), headers={"Content-Type": "application/dicom"})
    assert r.status_code == 409
    (failed,) = seq_items(r.json(), "00081198")
    assert failed["00081150"]["Value"] == [ds.SOPClassUID] and "00081155" not in failed
    # bad UID in the path
    r = await client.get("/studies/1.2.abc")
    assert r.status_code == 400
    # unknown study
    r = await client.get("/studies/1.2.3.4/metadata")
    assert r.status_code == 404
    # nothing of the above was stored
    assert [b async for b in archive.store.list("")] == []
    # the server still serves
    assert (await stow(client, files)).status_code == 200


async def test_values_the_index_cannot_hold_do_not_fail_the_batch(client: httpx.AsyncClient) -> None:
    """Real files carry invalid values: an IS beyond the 32-bit range IS allows, a text far longer than its
    VR allows (PostgreSQL refuses btree entries over ~2.7 kB). Each made the index write fail, and with it
    every instance of the batch (272 "index write failed: DataError"). The instances are stored, found by
    QIDO and keep their values."""
    spec, files = study_files(8, count=3)
    ds = pydicom.dcmread(io.BytesIO(files[1]))
    long_word = "".join(random.Random(8).choices("abcdefghijklmnopqrstuvwxyz", k=8000))
    with pydicom.config.disable_value_validation():
        ds.InstanceNumber = "99999999999"
        ds.SeriesNumber = "-2147483649"
        ds.AccessionNumber = long_word
        ds.PatientName = long_word
        ds.PatientID = long_word
    odd = to_bytes(ds)
    response = await stow(client, [files[0], files[2], odd])  # the last one gives the study its attributes
    assert response.status_code == 200, response.headers.get("warning")
    assert len(seq_items(response.json(), "00081199")) == 3
    found = await client.get("/instances", params={"StudyInstanceUID": spec.study_uid, "includefield": "all"})
    assert sorted(i["00080018"]["Value"][0] for i in found.json()) == sorted(
        pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in (files[0], odd, files[2])
    )
    url = f"/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    stored = await client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert stored.content == odd
    (metadata,) = (await client.get(f"{url}/metadata")).json()
    assert metadata["00200013"]["Value"] == [99999999999]
    assert metadata["00100010"]["Value"] == [{"Alphabetic": long_word}]
    by_accession = await client.get("/studies", params={"AccessionNumber": long_word[:10] + "*"})
    assert [s["0020000D"]["Value"][0] for s in by_accession.json()] == [spec.study_uid]


async def test_an_instance_the_index_refuses_fails_alone(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance whose values PostgreSQL refuses failed the batch's transaction and so every instance of
    the request (272 for all three); the others are now indexed without it, and only it fails, with 272
    and the reason. The values that did this (a NUL, an overlong text) are now indexed, so the refusal is
    brought back by letting column values grow past what a btree entry holds."""
    monkeypatch.setattr(indexer.attributes, "MAX_INDEXED_CHARS", 1_000_000)
    spec, files = study_files(9, count=3)
    ds = pydicom.dcmread(io.BytesIO(files[2]))
    with pydicom.config.disable_value_validation():
        ds.AccessionNumber = "".join(random.Random(9).choices("abcdefghijklmnopqrstuvwxyz", k=8000))
    odd = to_bytes(ds)
    response = await stow(client, [files[0], files[1], odd])
    assert response.status_code == 202
    stored = seq_items(response.json(), "00081199")
    assert len(stored) == 2
    (failed,) = seq_items(response.json(), "00081198")
    assert failed["00081197"]["Value"] == [272]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert response.headers["warning"] == '299 dicomweb "index write failed: ProgramLimitExceededError"'
    found = await client.get("/instances", params={"StudyInstanceUID": spec.study_uid})
    assert sorted(i["00080018"]["Value"][0] for i in found.json()) == sorted(
        pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files[:2]
    )


async def test_a_nul_inside_a_text_value_is_stored(client: httpx.AsyncClient) -> None:
    """A NUL inside a study- and a series-level text value (DICOM text has none; PostgreSQL text and its
    JSON parser refuse U+0000): the instance is stored and found; the study's and series' columns and
    QIDO attributes drop the NUL, the object and the instance's metadata keep it."""
    spec, files = study_files(10, count=2)
    ds = pydicom.dcmread(io.BytesIO(files[1]))
    ds.StudyDescription = "head\0neck"
    ds.SeriesDescription = "ax\0ial"
    odd = to_bytes(ds)
    response = await stow(client, [files[0], odd])
    assert response.status_code == 200, response.headers.get("warning")
    study = await client.get("/studies", params={"StudyDescription": "headneck"})
    assert [s["00081030"]["Value"] for s in study.json()] == [["headneck"]]
    series = await client.get(
        f"/studies/{spec.study_uid}/series", params={"SeriesInstanceUID": ds.SeriesInstanceUID}
    )
    assert series.json()[0]["0008103E"]["Value"] == ["axial"]
    url = f"/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert (await client.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})).content == odd
    (metadata,) = (await client.get(f"{url}/metadata")).json()
    assert metadata["00081030"]["Value"] == ["head\0neck"]


async def test_unknown_paths_and_methods_get_the_json_error_shape(
    client: httpx.AsyncClient, archive: RunningArchive
) -> None:
    """conformance.md: errors are {"error": {"code", "message"}}. A path no route has and a method a route
    does not take were Starlette's text/plain "Not Found" and "Method Not Allowed"."""
    missing = await client.get("/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/")
    assert (missing.status_code, missing.headers["content-type"]) == (404, "application/json")
    assert missing.json() == {"error": {"code": 404, "message": "Not Found"}}
    wrong = await client.put("/studies", content=b"x")
    assert (wrong.status_code, wrong.headers["content-type"]) == (405, "application/json")
    assert wrong.json() == {"error": {"code": 405, "message": "Method Not Allowed"}}


async def test_malformed_part_headers_say_so_once(client: httpx.AsyncClient) -> None:
    """A part with more headers than allowed is 400, and its message says "malformed multipart body" once
    (the parser and the route each prefixed it)."""
    _, files = study_files(7, count=1)
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(100))
    body = b"--b\r\nContent-Type: application/dicom\r\n" + headers + b"\r\n" + files[0] + b"\r\n--b--"
    r = await client.post("/studies", content=body, headers={"Content-Type": f"{DICOM}; boundary=b"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "malformed multipart body: Maximum header count exceeded"


async def test_metadata_bulkdata_and_range(client: httpx.AsyncClient) -> None:
    spec, files = study_files(7, count=4)
    assert (await stow(client, files)).status_code == 200
    series_uid = spec.series[0][0]
    response = await client.get(f"/studies/{spec.study_uid}/series/{series_uid}/metadata")
    assert response.status_code == 200
    metadata = response.json()
    assert len(metadata) == 2
    numbers = [m["00200013"]["Value"][0] for m in metadata]
    assert numbers == sorted(numbers)
    pixel = metadata[0]["7FE00010"]
    assert set(pixel) == {"vr", "BulkDataURI"}
    ds = next(
        d
        for d in (pydicom.dcmread(io.BytesIO(f)) for f in files)
        if d.SOPInstanceUID == metadata[0]["00080018"]["Value"][0]
    )
    octets = {"Accept": "application/octet-stream"}
    bulk = await client.get(pixel["BulkDataURI"], headers=octets)
    assert bulk.status_code == 200 and bulk.content == ds.PixelData
    # the default is multipart (PS3.18 8.7.3.3.2)
    multipart = await client.get(pixel["BulkDataURI"])
    assert multipart.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    assert [body for _, body in await parts_of(multipart)] == [ds.PixelData]
    ranged = await client.get(pixel["BulkDataURI"], headers={"Range": "bytes=100-199", **octets})
    assert ranged.status_code == 206 and ranged.content == ds.PixelData[100:200]
    assert ranged.headers["content-range"] == f"bytes 100-199/{len(ds.PixelData)}"
    bad = await client.get(pixel["BulkDataURI"], headers={"Range": f"bytes={len(ds.PixelData)}-", **octets})
    assert bad.status_code == 416
    # a range unit other than bytes is ignored (RFC 9110 14.2: MUST), on bulk data and on a single frame
    frame_url = pixel["BulkDataURI"].rsplit("/bulkdata/", 1)[0] + "/frames/1"
    for url in (pixel["BulkDataURI"], frame_url):
        whole = await client.get(url, headers={"Range": "items=0-1", **octets})
        assert (whole.status_code, whole.content) == (200, ds.PixelData)
        assert "content-range" not in whole.headers
    # study metadata holds all four
    response = await client.get(f"/studies/{spec.study_uid}/metadata")
    assert len(response.json()) == 4
    assert (
        await client.get(f"/studies/{spec.study_uid}/metadata", headers={"Accept": "image/png"})
    ).status_code == 406


async def test_transfer_syntax_negotiation(client: httpx.AsyncClient) -> None:
    data = (TEST_FILES / "JPEG2000.dcm").read_bytes()
    r = await client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
    url = seq_items(r.json(), "00081199")[0]["00081190"]["Value"][0]
    ok = await client.get(
        url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.91"}
    )
    assert ok.status_code == 200 and ok.content == data
    refused = await client.get(
        url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"}
    )
    assert refused.status_code == 406
    assert (await client.get(url, headers={"Accept": "text/html"})).status_code == 406
    assert (await client.get(url, headers={"Accept": "application/dicom; q=abc"})).status_code == 400


async def test_delete_levels(client: httpx.AsyncClient, archive: RunningArchive) -> None:
    spec, files = study_files(8, count=4)
    assert (await stow(client, files)).status_code == 200
    sops = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    one = sops[0]
    inst_url = f"/studies/{spec.study_uid}/series/{one.SeriesInstanceUID}/instances/{one.SOPInstanceUID}"
    assert (await client.delete(inst_url)).status_code == 204
    assert (await client.get(inst_url + "/metadata")).status_code == 404
    assert (await client.delete(inst_url)).status_code == 404
    other_series = next(d.SeriesInstanceUID for d in sops if d.SeriesInstanceUID != one.SeriesInstanceUID)
    assert (await client.delete(f"/studies/{spec.study_uid}/series/{other_series}")).status_code == 204
    remaining = (await client.get(f"/studies/{spec.study_uid}/metadata")).json()
    assert {m["0020000E"]["Value"][0] for m in remaining} == {one.SeriesInstanceUID}
    assert (await client.delete(f"/studies/{spec.study_uid}")).status_code == 204
    assert (await client.get(f"/studies/{spec.study_uid}", headers={"Accept": ANY_SYNTAX})).status_code == 404
    # the objects leave storage (in the background, promptly)
    for _ in range(100):
        if not [b async for b in archive.store.list("")]:
            break
        await asyncio.sleep(0.05)
    assert [b async for b in archive.store.list("")] == []
    # and the study can be stored again
    assert (await stow(client, files)).status_code == 200


async def test_delete_gives_levels_the_attributes_of_what_is_left(
    client: httpx.AsyncClient, archive: RunningArchive
) -> None:
    """Study and series attributes come from the latest stored instance; deleting it must not leave its
    values in QIDO results."""
    rng = random.Random(12)
    spec = make_study(rng, series_count=1)
    first, second = (make_instance(spec, 0, n, rng=rng) for n in (1, 2))
    for ds, label in ((first, "FIRST"), (second, "SECOND")):
        ds.StudyDescription = f"STUDY {label}"
        ds.SeriesDescription = f"SERIES {label}"
    assert (await stow(client, [to_bytes(first)])).status_code == 200
    assert (await stow(client, [to_bytes(second)])).status_code == 200

    async def descriptions() -> tuple[list, list]:
        study = (
            await client.get(
                "/studies", params={"StudyInstanceUID": spec.study_uid, "includefield": "StudyDescription"}
            )
        ).json()
        series = (await client.get(f"/studies/{spec.study_uid}/series",
                                   params={"includefield": "SeriesDescription"})).json()  # fmt: skip
        return [s["00081030"]["Value"][0] for s in study], [s["0008103E"]["Value"][0] for s in series]

    assert await descriptions() == (["STUDY SECOND"], ["SERIES SECOND"])
    url = f"/studies/{spec.study_uid}/series/{second.SeriesInstanceUID}/instances/{second.SOPInstanceUID}"
    assert (await client.delete(url)).status_code == 204
    assert await descriptions() == (["STUDY FIRST"], ["SERIES FIRST"])
    # the typed match columns follow too
    found = (await client.get("/studies", params={"StudyDescription": "STUDY FIRST"})).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [spec.study_uid]
    assert (await client.get("/studies", params={"StudyDescription": "STUDY SECOND"})).json() == []


async def test_partitions(client: httpx.AsyncClient, archive: RunningArchive) -> None:
    spec, files = study_files(9, count=1)
    async with httpx.AsyncClient(base_url=f"{archive.base}/v2/partitions/research", timeout=30) as research:
        r = await stow(research, files)
        assert r.status_code == 200
        assert (
            "/v2/partitions/research/studies/" in seq_items(r.json(), "00081199")[0]["00081190"]["Value"][0]
        )
        assert (await research.get(f"/studies/{spec.study_uid}/metadata")).status_code == 200
    # not visible in the default partition, and storable there independently
    assert (await client.get(f"/studies/{spec.study_uid}/metadata")).status_code == 404
    assert (await stow(client, files)).status_code == 200
    async with httpx.AsyncClient(base_url=f"{archive.base}/v1/partitions/nope", timeout=30) as missing:
        assert (await missing.get(f"/studies/{spec.study_uid}/metadata")).status_code == 404
    assert orjson.loads((await client.get(f"{archive.base}/health/ready")).content)["status"] == "ready"


async def test_qido_paging_warns_of_more_results(client: httpx.AsyncClient) -> None:
    spec, files = study_files(10, count=3)
    assert (await stow(client, files)).status_code == 200
    first = await client.get(f"/studies/{spec.study_uid}/instances", params={"limit": 2})
    assert first.status_code == 200 and len(first.json()) == 2
    assert "additional results" in first.headers["warning"]
    rest = await client.get(f"/studies/{spec.study_uid}/instances", params={"limit": 2, "offset": 2})
    assert len(rest.json()) == 1 and "warning" not in rest.headers
    all_sops = {i["00080018"]["Value"][0] for i in first.json() + rest.json()}
    assert len(all_sops) == 3
    bad = await client.get("/studies", params={"limit": "-1"})
    assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]
    unknown = await client.get("/studies", params={"NotAnAttribute": "x"})
    assert unknown.status_code == 400 and "NotAnAttribute" in unknown.json()["error"]["message"]


async def test_qido_accept(client: httpx.AsyncClient) -> None:
    """QIDO answers in DICOM JSON (or plain JSON when asked), 406 naming what it has, 400 for a bad header."""
    spec, files = study_files(11, count=1)
    assert (await stow(client, files)).status_code == 200
    path = f"/studies/{spec.study_uid}/instances"
    plain = await client.get(path, headers={"Accept": "application/json"})
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    assert len(plain.json()) == 1
    refused = await client.get(path, headers={"Accept": "application/xml"})
    assert refused.status_code == 406
    assert refused.json()["error"]["message"] == (
        "cannot produce any media type the Accept header allows; available: application/dicom+json"
    )
    malformed = await client.get(path, headers={"Accept": "application/dicom+json; q=2"})
    assert malformed.status_code == 400 and "malformed Accept header" in malformed.json()["error"]["message"]
