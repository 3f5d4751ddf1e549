"""Helpers shared by the backup/restore and replication tests: storing and deleting instances over HTTP,
and reading back exactly what an archive holds (every instance of every partition, byte for byte)."""

from __future__ import annotations

import random

import asyncpg
import httpx

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from changefeed.replicate import DEFAULT_PARTITION, InstanceRef

Holdings = dict[tuple[str, str], bytes]  # (partition, SOP Instance UID) -> the object as stored


def instances(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=2)
    return [to_bytes(make_instance(spec, i % 2, i + 1, rng=rng, rows=32, columns=32)) for i in range(count)]


def partition_root(root: str, partition: str) -> str:
    return root if partition == DEFAULT_PARTITION else f"{root}/partitions/{partition}"


async def stow(
    client: httpx.AsyncClient, root: str, files: list[bytes], partition: str = DEFAULT_PARTITION
) -> list[InstanceRef]:
    """Store `files` in one request; the stored instances in order."""
    body, content_type = multipart_body(files)
    r = await client.post(
        f"{partition_root(root, partition)}/studies", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == 200, r.text
    refs = []
    for item in r.json()["00081199"]["Value"]:
        parts = item["00081190"]["Value"][0].split("/")
        refs.append(InstanceRef(partition, parts[-5], parts[-3], parts[-1]))
    return refs


async def delete(client: httpx.AsyncClient, root: str, ref: InstanceRef) -> None:
    r = await client.delete(f"{root}{ref.path()}")
    assert r.status_code == 204, r.text


async def holdings(client: httpx.AsyncClient, root: str, database_url: str) -> Holdings:
    """Every instance the archive indexes (from its database) with its bytes as WADO-RS returns them."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT p.name, s.study_instance_uid, se.series_instance_uid, i.sop_instance_uid
               FROM instance i JOIN partition p USING (partition_key)
               JOIN study s USING (study_key) JOIN series se USING (series_key)"""
        )
    finally:
        await conn.close()
    held: Holdings = {}
    for row in rows:
        ref = InstanceRef(*row)
        r = await client.get(
            f"{root}{ref.path()}", headers={"Accept": "application/dicom; transfer-syntax=*"}
        )
        assert r.status_code == 200, r.text
        held[(ref.partition, ref.sop)] = r.content
    return held
