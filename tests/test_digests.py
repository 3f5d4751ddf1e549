"""Content digests on retrieval: an altered object is never served whole (the response is refused or cut,
with an error in the log), and a single instance sent as stored carries its digest (ETag, Repr-Digest)."""

from __future__ import annotations

import base64
import hashlib
import io
import logging

import asyncpg
import httpx
import pydicom
import pytest

from dicomweb.metrics import DIGEST_MISMATCHES
from dicomweb.routes import wado
from tests.fixtures.server import RunningArchive
from tests.test_frames import ELE
from tests.test_stow_wado_delete import ANY_SYNTAX, parts_of, stow
from tests.test_wado_series import mixed_series

SINGLE_ANY = "application/dicom; transfer-syntax=*"


@pytest.fixture
async def client(archive: RunningArchive):
    async with httpx.AsyncClient(base_url=archive.url, timeout=60) as c:
        yield c


async def storage_keys(archive: RunningArchive, files: list[bytes]) -> list[str]:
    uids = [str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID) for f in files]
    conn = await asyncpg.connect(archive.database_url)
    try:
        rows = await conn.fetch(
            "SELECT sop_instance_uid, storage_key FROM instance WHERE sop_instance_uid = ANY($1)", uids
        )
    finally:
        await conn.close()
    by_uid = {r[0]: r[1] for r in rows}
    return [by_uid[u] for u in uids]


async def flip_byte(archive: RunningArchive, key: str, offset: int = -100) -> None:
    """Alter an object in place, as bit rot or someone with write access to the store would."""
    data = bytearray(await archive.store.read(key))
    data[offset] ^= 0x01
    await archive.store.put(key, bytes(data))


def instance_path(files: list[bytes], n: int, study: str, series: str) -> str:
    sop = pydicom.dcmread(io.BytesIO(files[n])).SOPInstanceUID
    return f"/studies/{study}/series/{series}/instances/{sop}"


async def test_altered_objects_are_never_served_whole(
    client: httpx.AsyncClient,
    archive: RunningArchive,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(wado, "_BATCH_COUNT", 3)
    study, series, files = mixed_series()
    assert (await stow(client, files)).status_code == 200
    keys = await storage_keys(archive, files)
    path = f"/studies/{study}/series/{series}"
    intact = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert [body for _, body in await parts_of(intact)] == files
    before = DIGEST_MISMATCHES._value.get()

    await flip_byte(archive, keys[5])  # a small one, read in a batch
    with caplog.at_level(logging.ERROR, logger="dicomweb.routes.wado"):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(path, headers={"Accept": ANY_SYNTAX})
        # alone, as application/dicom: its one chunk is read and checked before answering, so refused
        alone = await client.get(instance_path(files, 5, study, series), headers={"Accept": SINGLE_ANY})
        assert alone.status_code == 500
    altered = [r for r in caplog.records if r.levelno == logging.ERROR and keys[5] in r.getMessage()]
    assert len(altered) == 2 and "altered" in altered[0].getMessage()
    assert DIGEST_MISMATCHES._value.get() == before + 2
    # instances around it are served as before
    ok = await client.get(instance_path(files, 4, study, series), headers={"Accept": SINGLE_ANY})
    assert ok.status_code == 200 and ok.content == files[4]

    await flip_byte(archive, keys[7], offset=len(files[7]) // 2)  # the large one, streamed in chunks
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get(instance_path(files, 7, study, series), headers={"Accept": ANY_SYNTAX})

    await flip_byte(archive, keys[3])  # the RLE one, decoded for an ELE request: refused before answering
    response = await client.get(
        instance_path(files, 3, study, series),
        headers={"Accept": f"application/dicom; transfer-syntax={ELE}"},
    )
    assert response.status_code == 500
    assert "no longer matches the SHA-256" in response.json()["error"]["message"]
    assert DIGEST_MISMATCHES._value.get() == before + 4


async def test_single_instance_carries_its_digest(client: httpx.AsyncClient) -> None:
    study, series, files = mixed_series()
    assert (await stow(client, files)).status_code == 200
    path = instance_path(files, 1, study, series)
    digest = hashlib.sha256(files[1]).digest()
    encoded = base64.b64encode(digest).decode()

    response = await client.get(path, headers={"Accept": SINGLE_ANY})
    assert response.status_code == 200 and response.content == files[1]
    assert response.headers["etag"] == f'"{digest.hex()}"'
    assert response.headers["repr-digest"] == f"sha-256=:{encoded}:"
    assert response.headers["digest"] == f"sha-256={encoded}"
    assert response.headers["cache-control"] == "private, no-cache"
    again = await client.get(path, headers={"Accept": SINGLE_ANY, "If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == response.headers["etag"]

    # multipart: the same bytes every time (boundary from the digest), so a strong ETag of its own
    first = await client.get(path, headers={"Accept": ANY_SYNTAX})
    second = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert first.content == second.content
    assert [body for _, body in await parts_of(first)] == [files[1]]
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag != response.headers["etag"]
    assert "repr-digest" not in first.headers  # the body is the multipart, not the object
    cached = await client.get(path, headers={"Accept": ANY_SYNTAX, "If-None-Match": f'W/"x", {etag}'})
    assert cached.status_code == 304

    # transcoded: another representation, with no validator from the stored object's digest
    rle = instance_path(files, 3, study, series)
    decoded = await client.get(rle, headers={"Accept": f"application/dicom; transfer-syntax={ELE}"})
    assert decoded.status_code == 200 and "etag" not in decoded.headers


async def test_an_instance_whose_object_is_missing_is_an_error_not_a_cut_200(
    client: httpx.AsyncClient, archive: RunningArchive, caplog: pytest.LogCaptureFixture
) -> None:
    """An indexed instance whose object is gone from the store (as `scrub` reports `missing`) was answered
    200 with its Content-Length and then an empty body (the server logged only "Response content shorter
    than Content-Length"); a small altered one was cut the same way. Both are now refused before answering,
    with a reason, and the missing key is logged; an instance deleted meanwhile is 404 as before."""
    study, series, files = mixed_series()
    assert (await stow(client, files)).status_code == 200
    keys = await storage_keys(archive, files)
    await archive.store.delete(keys[4])
    path = instance_path(files, 4, study, series)
    with caplog.at_level(logging.ERROR, logger="dicomweb.routes.wado"):
        for accept in (SINGLE_ANY, ANY_SYNTAX):
            response = await client.get(path, headers={"Accept": accept})
            assert response.status_code == 500
            assert response.json()["error"]["message"] == (
                f"instance {pydicom.dcmread(io.BytesIO(files[4])).SOPInstanceUID} is damaged: its stored "
                "object is missing from the store (reported to the archive's log)"
            )
    missing = [r.getMessage() for r in caplog.records if keys[4] in r.getMessage()]
    assert len(missing) == 2 and missing[0].endswith(f"its object {keys[4]} is missing from the store")

    await flip_byte(archive, keys[5])  # small: one chunk, so checked whole before answering
    response = await client.get(instance_path(files, 5, study, series), headers={"Accept": SINGLE_ANY})
    assert response.status_code == 500
    assert "no longer matches the SHA-256" in response.json()["error"]["message"]

    ok = await client.get(instance_path(files, 6, study, series), headers={"Accept": SINGLE_ANY})
    assert ok.status_code == 200 and ok.content == files[6]


async def test_a_series_whose_first_batch_misses_an_object_is_an_error_not_a_cut_200(
    client: httpx.AsyncClient, archive: RunningArchive, caplog: pytest.LogCaptureFixture
) -> None:
    """A series read as stored whose first batch holds an instance without its object was answered 200
    with the whole Content-Length and cut at once (logged as "deleted (or changed size) while it was
    sent"); the first batch is read before answering now, so it is a 500 naming the instance."""
    study, series, files = mixed_series()
    assert (await stow(client, files)).status_code == 200
    keys = await storage_keys(archive, files)
    await archive.store.delete(keys[0])
    with caplog.at_level(logging.ERROR, logger="dicomweb.routes.wado"):
        response = await client.get(f"/studies/{study}/series/{series}", headers={"Accept": ANY_SYNTAX})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == (
        f"instance {pydicom.dcmread(io.BytesIO(files[0])).SOPInstanceUID} is damaged: its stored object is "
        "missing from the store (reported to the archive's log)"
    )
    assert next(r.getMessage() for r in caplog.records if keys[0] in r.getMessage()).endswith(
        f"its object {keys[0]} is missing from the store"
    )
