"""ETag / If-None-Match / Cache-Control on metadata and rendered images, and configurable CORS."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bench.synthetic import make_instance, make_study, to_bytes
from dicomweb.config import Settings
from dicomweb.cors import parse_origins
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive, start_archive
from tests.test_stow_wado_delete import stow

VIEWER = "http://viewer.example:3000"


@pytest.fixture
async def client(local_archive: RunningArchive) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=local_archive.url, timeout=30) as c:
        yield c


@pytest.fixture
async def cors_archive(database_url: str, tmp_path: Path) -> AsyncIterator[RunningArchive]:
    settings = Settings(data_dir=tmp_path, cors_origins=f"{VIEWER}/, https://other.example")
    store = LocalBlobStore(tmp_path / "blobs")
    thread, running = start_archive(settings, database_url, store, LocalBlobStore(tmp_path / "blobs"))
    try:
        yield running
    finally:
        thread.stop()


def study(seed: int, count: int = 2):
    rng = random.Random(seed)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    return spec, [make_instance(spec, 0, n + 1, rng=rng) for n in range(count)]


async def test_metadata_etag_and_304(client: httpx.AsyncClient) -> None:
    spec, instances = study(1)
    await stow(client, [to_bytes(ds) for ds in instances])
    url = f"/studies/{spec.study_uid}/metadata"
    first = await client.get(url)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and etag.endswith('"')
    assert first.headers["cache-control"] == "private, no-cache"
    again = await client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag and again.headers["cache-control"] == "private, no-cache"
    assert (await client.get(url, headers={"If-None-Match": f'"x", W/{etag}'})).status_code == 304
    assert (await client.get(url, headers={"If-None-Match": "*"})).status_code == 304
    assert (await client.get(url, headers={"If-None-Match": '"other"'})).status_code == 200
    # the media type is part of the representation
    as_json = await client.get(url, headers={"Accept": "application/json"})
    assert as_json.headers["etag"] != etag

    sop = instances[0]
    instance_url = f"/studies/{spec.study_uid}/series/{sop.SeriesInstanceUID}/instances/{sop.SOPInstanceUID}"
    instance_etag = (await client.get(instance_url + "/metadata")).headers["etag"]
    # adding an instance changes the study (and series) but not the other instance
    _, more = study(1, count=3)
    await stow(client, [to_bytes(more[2])])
    changed = await client.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert len(changed.json()) == 3
    response = await client.get(instance_url + "/metadata", headers={"If-None-Match": instance_etag})
    assert response.status_code == 304
    # deleting one changes it again
    assert (await client.delete(instance_url)).status_code == 204
    after = await client.get(url, headers={"If-None-Match": changed.headers["etag"]})
    assert after.status_code == 200 and len(after.json()) == 2
    assert (
        await client.get(instance_url + "/metadata", headers={"If-None-Match": instance_etag})
    ).status_code == 404


async def test_rendered_and_thumbnail_etags(client: httpx.AsyncClient) -> None:
    spec, instances = study(2)
    await stow(client, [to_bytes(ds) for ds in instances])
    ds = instances[0]
    url = f"/studies/{spec.study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for resource in ("/rendered", "/thumbnail", "/frames/1/rendered"):
        first = await client.get(url + resource)
        assert first.status_code == 200 and first.headers["cache-control"] == "private, no-cache"
        etag = first.headers["etag"]
        assert (await client.get(url + resource, headers={"If-None-Match": etag})).status_code == 304
        # other parameters, other representation
        other = await client.get(
            url + resource, params={"viewport": "32,32"}, headers={"If-None-Match": etag}
        )
        assert other.status_code == 200 and other.headers["etag"] != etag
        png = await client.get(url + resource, headers={"Accept": "image/png", "If-None-Match": etag})
        assert png.status_code == 200
    first = await client.get(f"/studies/{spec.study_uid}/rendered")
    etag = first.headers["etag"]
    response = await client.get(f"/studies/{spec.study_uid}/rendered", headers={"If-None-Match": etag})
    assert response.status_code == 304
    response = await client.get(f"/studies/{spec.study_uid}/thumbnail")
    assert (
        await client.get(
            f"/studies/{spec.study_uid}/thumbnail", headers={"If-None-Match": response.headers["etag"]}
        )
    ).status_code == 304


async def test_cors_preflight_and_exposed_headers(cors_archive: RunningArchive) -> None:
    spec, instances = study(3)
    async with httpx.AsyncClient(base_url=cors_archive.url, timeout=30) as client:
        await stow(client, [to_bytes(ds) for ds in instances])
        preflight = await client.options(
            f"/studies/{spec.study_uid}/metadata",
            headers={
                "Origin": VIEWER,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "accept, if-none-match, authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == VIEWER
        assert "GET" in preflight.headers["access-control-allow-methods"]
        assert "if-none-match" in preflight.headers["access-control-allow-headers"].lower()
        response = await client.get(f"/studies/{spec.study_uid}/metadata", headers={"Origin": VIEWER})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == VIEWER
        exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
        assert {"content-type", "etag", "warning", "content-location", "content-range"} <= exposed
        # QIDO's warning that results may miss instances with extended query tag errors (Azure's header)
        assert "erroneous-dicom-attributes" in exposed
        # an origin not configured gets no CORS headers (the browser then withholds the response)
        stranger = await client.get(
            f"/studies/{spec.study_uid}/metadata", headers={"Origin": "http://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers
        refused = await client.options(
            "/studies", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
        )
        assert refused.status_code == 400


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/studies", headers={"Origin": VIEWER})
    assert response.status_code in (200, 204)
    assert "access-control-allow-origin" not in response.headers


def test_parse_origins() -> None:
    assert parse_origins(None) == [] and parse_origins("") == []
    assert parse_origins("*") == ["*"]
    assert parse_origins("https://a.example/, http://b.example:8080") == [
        "https://a.example",
        "http://b.example:8080",
    ]
    with pytest.raises(ValueError):
        parse_origins("a.example")
