"""GET /vN/partitions: Azure's list of data partitions, filtered to the partitions each caller may use."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from access.policy import Family, classify
from bench.synthetic import instance_variants, make_study, multipart_body
from dicomweb.routes.extended_query_tags import iso_time
from tests.access_support import SecureArchive, bearer, hs256, make_token, start_secure
from tests.fixtures.server import RunningArchive

RESEARCH = "research-0123456789abcdef"
DENIED = {"error": {"code": 403, "message": "not permitted"}}


@pytest.fixture
async def secure(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[SecureArchive, httpx.AsyncClient]]:
    archive = start_secure(database_url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=archive.running.base, timeout=60) as client:
            yield archive, client
    finally:
        archive.thread.stop()


async def stored_partitions(database_url: str) -> list[dict]:
    """The expected entries, straight from the table."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT partition_key, name, created_at FROM partition ORDER BY partition_key"
        )
    finally:
        await conn.close()
    return [
        {
            "partitionKey": r["partition_key"],
            "partitionName": r["name"],
            "createdDate": iso_time(r["created_at"]),
        }
        for r in rows
    ]


async def stow(client: httpx.AsyncClient, headers: dict, root: str, seed: int) -> None:
    spec = make_study(random.Random(seed), series_count=1)
    body, content_type = multipart_body(instance_variants(spec, 0, 1, start=seed * 10))
    r = await client.post(f"{root}/studies", content=body, headers={"Content-Type": content_type, **headers})
    assert r.status_code == 200, r.text


def test_only_the_plain_roots_list_partitions() -> None:
    for path in ("/v1/partitions", "/v2/partitions"):
        assert classify("GET", path).family is Family.PARTITIONS
        assert classify("HEAD", path).family is Family.PARTITIONS
        assert classify("POST", path).family is Family.UNKNOWN
    assert classify("GET", "/v2/partitions/alpha/partitions").family is Family.UNKNOWN


async def test_each_caller_sees_the_partitions_it_may_use(
    secure: tuple[SecureArchive, httpx.AsyncClient],
) -> None:
    archive, client = secure
    database_url = archive.running.database_url
    owner = bearer((await make_token(database_url, "owner"))[0])
    for seed, root in enumerate(
        ("/v2", "/v2/partitions/alpha", "/v1/partitions/beta", f"/v2/partitions/{RESEARCH}")
    ):
        await stow(client, owner, root, seed + 1)
    every = await stored_partitions(database_url)
    assert [p["partitionName"] for p in every] == ["Microsoft.Default", "alpha", "beta", RESEARCH]
    assert [p["partitionKey"] for p in every] == [1, 2, 3, 4]
    assert all(p["createdDate"].endswith("Z") and "T" in p["createdDate"] for p in every)
    by_name = {p["partitionName"]: p for p in every}

    def only(*names: str) -> list[dict]:
        return [by_name[n] for n in names]

    alpha_reader = bearer((await make_token(database_url, "reader", "alpha"))[0])
    beta_writer = bearer((await make_token(database_url, "writer", "beta"))[0])
    researcher = bearer((await make_token(database_url, "researcher", RESEARCH))[0])
    cases = [
        (owner, every),
        (bearer(hs256(roles=["reader"])), only("Microsoft.Default", "alpha", "beta")),  # not research ones
        (bearer(hs256(roles=["worklist"])), only("Microsoft.Default", "alpha", "beta")),
        (alpha_reader, only("alpha")),
        (beta_writer, only("beta")),
        (researcher, only(RESEARCH)),
    ]
    for headers, expected in cases:
        for version in ("v1", "v2"):
            r = await client.get(f"/{version}/partitions", headers=headers)
            assert (r.status_code, r.headers["content-type"], r.json()) == (200, "application/json", expected)
    # a researcher without an active request may use no partition: Azure's "no partitions" answer
    r = await client.get("/v2/partitions", headers=bearer(hs256(roles=["researcher"])))
    assert (r.status_code, r.content) == (204, b"")
    # roles that use no partition, and no credential
    for role in ("auditor", "reviewer"):
        r = await client.get("/v2/partitions", headers=bearer(hs256(roles=[role])))
        assert (r.status_code, r.json()) == (403, DENIED), role
    assert (await client.get("/v2/partitions")).status_code == 401
    # only GET, only at the plain roots
    r = await client.post("/v2/partitions", headers=owner, json={})
    assert r.status_code == 405
    assert (await client.post("/v2/partitions", headers=alpha_reader, json={})).status_code == 403
    assert (await client.get("/v2/partitions/alpha/partitions", headers=owner)).status_code == 404
    # the partition roots still route as before
    r = await client.get("/v2/partitions/alpha/studies", headers=alpha_reader)
    assert r.status_code == 200 and len(r.json()) == 1


async def test_open_archive_lists_every_partition(local_archive: RunningArchive) -> None:
    async with httpx.AsyncClient(base_url=local_archive.base, timeout=60) as client:
        r = await client.get("/v2/partitions")
        assert r.json() == await stored_partitions(local_archive.database_url)
        assert [p["partitionName"] for p in r.json()] == ["Microsoft.Default"]
        await stow(client, {}, "/v2/partitions/gamma", 9)
        r = await client.get("/v1/partitions")
        assert r.status_code == 200
        assert r.json() == await stored_partitions(local_archive.database_url)
        assert [p["partitionName"] for p in r.json()] == ["Microsoft.Default", "gamma"]
