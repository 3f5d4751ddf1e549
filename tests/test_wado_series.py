"""WADO-RS series retrieval: instances read in batches and sent in large writes, in the index's order,
mixed with instances that are transcoded or streamed, on both storage backends."""

from __future__ import annotations

import io
import random

import asyncpg
import httpx
import numpy as np
import pydicom
import pytest

from bench.synthetic import make_instance, make_study, to_bytes
from dicomweb.routes import wado
from tests.fixtures.server import RunningArchive
from tests.test_frames import ELE, TEST_FILES
from tests.test_stow_wado_delete import ANY_SYNTAX, parts_of, stow

DICOM = 'multipart/related; type="application/dicom"'


@pytest.fixture
async def client(archive: RunningArchive):
    async with httpx.AsyncClient(base_url=archive.url, timeout=60) as c:
        yield c


def mixed_series() -> tuple[str, str, list[bytes]]:
    """Seven small native instances, an RLE one (4th) and one over the batched size (8th), in order."""
    spec = make_study(random.Random(41), series_count=1, modalities=["MR"])
    files = [to_bytes(make_instance(spec, 0, n, rows=16, columns=16)) for n in range(1, 10)]
    rle = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm")
    rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.InstanceNumber = spec.study_uid, spec.series[0][0], 4
    rle.PatientID = spec.patient_id
    files[3] = to_bytes(rle)
    large = make_instance(spec, 0, 8, rows=800, columns=800)  # 1.28 MB: streamed, not batched
    files[7] = to_bytes(large)
    assert len(files[7]) > wado._BATCHED_SIZE
    return spec.study_uid, spec.series[0][0], files


async def test_series_in_batches_as_stored_and_transcoded(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wado, "_BATCH_COUNT", 3)  # several batches, and runs cut by the RLE and large ones
    study, series, files = mixed_series()
    assert (await stow(client, files)).status_code == 200
    path = f"/studies/{study}/series/{series}"

    response = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert response.status_code == 200
    parts = await parts_of(response)
    assert [body for _, body in parts] == files  # byte for byte, in instance-number order
    assert [h["content-length"] for h, _ in parts] == [str(len(f)) for f in files]
    assert int(response.headers["content-length"]) == len(response.content)

    # Explicit VR Little Endian asked for: the RLE instance is decoded, the rest go as stored
    response = await client.get(path, headers={"Accept": f"{DICOM}; transfer-syntax={ELE}"})
    parts = await parts_of(response)
    assert [body for n, (_, body) in enumerate(parts) if n != 3] == [f for n, f in enumerate(files) if n != 3]
    decoded = pydicom.dcmread(io.BytesIO(parts[3][1]))
    assert parts[3][0]["content-type"] == f"application/dicom; transfer-syntax={ELE}"
    expected = pydicom.dcmread(io.BytesIO(files[3])).pixel_array
    assert np.array_equal(decoded.pixel_array, expected)


async def test_series_with_an_object_deleted_under_it(
    client: httpx.AsyncClient, archive: RunningArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object gone from storage after the index was read. A response that declared its length (every
    instance as stored) is cut short, so the client sees a failed transfer, not a silently shorter
    series; one whose length was not known (an instance transcoded) leaves that instance out."""
    monkeypatch.setattr(wado, "_BATCH_COUNT", 4)
    study, series, files = mixed_series()
    assert (await stow(client, files)).status_code == 200
    path = f"/studies/{study}/series/{series}"
    whole = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert int(whole.headers["content-length"]) == len(whole.content)
    gone = {pydicom.dcmread(io.BytesIO(files[n])).SOPInstanceUID for n in (1, 5)}
    conn = await asyncpg.connect(archive.database_url)
    try:
        sql = "SELECT storage_key FROM instance WHERE sop_instance_uid = ANY($1)"
        keys = await conn.fetch(sql, list(gone))
    finally:
        await conn.close()
    for row in keys:
        await archive.store.delete(row["storage_key"])

    response = await client.get(path, headers={"Accept": f"{DICOM}; transfer-syntax={ELE}"})
    assert response.status_code == 200 and "content-length" not in response.headers
    parts = await parts_of(response)
    assert len(parts) == 7
    left = [f for n, f in enumerate(files) if n not in (1, 3, 5)]
    assert [body for n, (_, body) in enumerate(parts) if n != 2] == left  # the RLE one (now 3rd) decoded

    # instance 1 is in the first batch, which is read before answering: refused with the reason
    refused = await client.get(path, headers={"Accept": ANY_SYNTAX})
    assert refused.status_code == 500
    assert refused.json()["error"]["message"].startswith(
        f"instance {pydicom.dcmread(io.BytesIO(files[1])).SOPInstanceUID} is damaged"
    )
    # with it back, instance 5 (a later batch) is found missing once the response is under way: cut short
    first = next(
        r["storage_key"]
        for r in keys
        if f"/{pydicom.dcmread(io.BytesIO(files[1])).SOPInstanceUID}." in r["storage_key"]
    )
    await archive.store.put(first, files[1])
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get(path, headers={"Accept": ANY_SYNTAX})
    # the archive goes on serving (instance 1 back, 5 still left out)
    response = await client.get(path, headers={"Accept": f"{DICOM}; transfer-syntax={ELE}"})
    assert len(await parts_of(response)) == 8
