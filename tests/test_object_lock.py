"""S3 Object Lock against SeaweedFS, which implements it: objects written under a COMPLIANCE retention that
no credential can cut short, deletions that wait for the retention and then remove every version."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from botocore.exceptions import ClientError

from archive.maintenance import drain_deletions, sweep_orphans
from bench.common import embedded_archive
from storage import BlobRetainedError, open_store
from storage.s3 import S3BlobStore
from tests.fixtures.s3 import S3Server, make_s3_store
from tests.recovery_support import delete, instances, stow

RETENTION = timedelta(seconds=4)


@pytest.fixture(scope="module")
def locked_bucket(s3_server: S3Server) -> str:
    return f"locked-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def locked(s3_server: S3Server, locked_bucket: str) -> Any:
    store = make_s3_store(s3_server, locked_bucket, object_lock=RETENTION)
    await store.ensure_bucket()  # created with Object Lock enabled
    await store.check_object_lock()
    yield store
    await store.close()


async def versions(s3_client: Any, store: S3BlobStore, key: str) -> list[dict[str, Any]]:
    response = await s3_client.list_object_versions(Bucket=store.bucket, Prefix=store.prefix + key)
    return [*response.get("Versions", []), *response.get("DeleteMarkers", [])]


async def test_objects_are_retained_then_deleted_whole(locked: S3BlobStore, s3_client: Any) -> None:
    before = datetime.now(UTC)
    await locked.put("p1/a.dcm", b"locked bytes")
    await locked.put("p1/big.dcm", b"x" * (11 << 20))  # multipart, retained too
    untils = []
    for key in ("p1/a.dcm", "p1/big.dcm"):
        head = await s3_client.head_object(Bucket=locked.bucket, Key=locked.prefix + key)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        until = head["ObjectLockRetainUntilDate"].astimezone(UTC)
        untils.append(until)
        assert (
            before + RETENTION - timedelta(seconds=2)
            < until
            < datetime.now(UTC) + RETENTION + timedelta(seconds=2)
        )

    with pytest.raises(BlobRetainedError) as caught:
        await locked.delete("p1/a.dcm")
    assert caught.value.until > datetime.now(UTC)
    assert await locked.read("p1/a.dcm") == b"locked bytes"  # no delete marker hides it
    # nor can any other holder of the credentials destroy the version
    [version] = await versions(s3_client, locked, "p1/a.dcm")
    with pytest.raises(ClientError, match="AccessDenied"):
        await s3_client.delete_object(
            Bucket=locked.bucket, Key=locked.prefix + "p1/a.dcm", VersionId=version["VersionId"]
        )
    # a plain delete only hides it: the archive's delete removes the marker and, once it may, the data
    await s3_client.delete_object(Bucket=locked.bucket, Key=locked.prefix + "p1/a.dcm")
    assert len(await versions(s3_client, locked, "p1/a.dcm")) == 2

    # both retentions over (the big upload may have finished, and been stamped, seconds after the small one)
    await asyncio.sleep(
        max(0.0, (max(caught.value.until, *untils) - datetime.now(UTC)).total_seconds()) + 0.5
    )
    await locked.delete("p1/a.dcm")
    await locked.delete("p1/big.dcm")
    assert await versions(s3_client, locked, "p1/a.dcm") == []
    assert await versions(s3_client, locked, "p1/big.dcm") == []
    await locked.delete("p1/a.dcm")  # deleting what is gone is no error


async def test_deletion_queue_waits_for_the_retention(locked: S3BlobStore, pool: asyncpg.Pool) -> None:
    await locked.put("p1/queued.dcm", b"q")
    await pool.execute("INSERT INTO blob_deletion (storage_key) VALUES ('p1/queued.dcm')")
    assert await drain_deletions(pool, locked) == 0
    row = await pool.fetchrow("SELECT attempts, not_before FROM blob_deletion")
    assert row["attempts"] == 0 and row["not_before"] > datetime.now(UTC)  # a date, not a failure
    # the sweeper queues a retained stray instead of failing on it
    await locked.put("p1/stray.dcm", b"s")
    assert await sweep_orphans(pool, locked, grace=timedelta(0)) == 1
    assert await pool.fetchval("SELECT count(*) FROM blob_deletion") == 2
    await pool.execute("UPDATE blob_deletion SET not_before = now()")
    assert await drain_deletions(pool, locked) == 0  # still retained: put back to its date
    await asyncio.sleep(RETENTION.total_seconds() + 0.5)
    await pool.execute("UPDATE blob_deletion SET not_before = now()")
    assert await drain_deletions(pool, locked) == 2
    assert [info.key async for info in locked.list()] == []


async def test_a_bucket_without_object_lock_is_refused(s3_server: S3Server, s3_bucket: str) -> None:
    store = make_s3_store(s3_server, s3_bucket, object_lock=RETENTION)
    try:
        with pytest.raises(RuntimeError, match="does not have S3 Object Lock enabled"):
            await store.check_object_lock()
    finally:
        await store.close()
    opened = open_store(f"s3://{s3_bucket}/x", s3_endpoint_url=s3_server.endpoint_url, s3_object_lock_days=30)
    assert isinstance(opened, S3BlobStore) and opened.object_lock == timedelta(days=30)
    await opened.close()


async def test_end_to_end_through_migrate_and_serve(
    database_url: str, s3_server: S3Server, s3_bucket: str, s3_client: Any
) -> None:
    """As a deployment does it: `dicomweb migrate` creates the bucket with Object Lock, `dicomweb serve`
    writes every STOW object under a retention of DICOMWEB_S3_OBJECT_LOCK_DAYS, a DELETE answers at once
    and leaves the object in the bucket, queued until its retention ends; a server configured with a
    retention refuses to start on a bucket without Object Lock."""
    bucket = f"locked-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DICOMWEB_STORAGE_URL": f"s3://{bucket}/objects",
        "DICOMWEB_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "DICOMWEB_S3_REGION": s3_server.region,
        "DICOMWEB_S3_OBJECT_LOCK_DAYS": "1",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    migrate = [sys.executable, "-m", "dicomweb.cli", "migrate", "--database-url", database_url]
    done = await asyncio.to_thread(subprocess.run, migrate, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lock = await s3_client.get_object_lock_configuration(Bucket=bucket)
    assert lock["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"

    files = instances(7, 2)
    with embedded_archive(1, database_url=database_url, extra_args=["--dimse-port", "0"], env=env) as root:
        async with httpx.AsyncClient(timeout=60) as client:
            before = datetime.now(UTC)
            refs = await stow(client, root, files)
            keys = {
                r[0]: r[1]
                for r in await _fetch(database_url, "SELECT sop_instance_uid, storage_key FROM instance")
            }
            for key in keys.values():
                head = await s3_client.head_object(Bucket=bucket, Key=f"objects/{key}")
                assert head["ObjectLockMode"] == "COMPLIANCE"
                until = head["ObjectLockRetainUntilDate"].astimezone(UTC)
                assert before + timedelta(days=1) - timedelta(seconds=5) < until
                assert until < datetime.now(UTC) + timedelta(days=1) + timedelta(seconds=5)
            await delete(client, root, refs[0])
            r = await client.get(f"{root}{refs[0].path()}")
            assert r.status_code == 404
            # the server's drain tries the deletion, finds it retained and sets the queue row to that date
            query = "SELECT storage_key, attempts, not_before FROM blob_deletion"
            for _ in range(150):
                rows = await _fetch(database_url, query)
                if rows and rows[0][2] > before + timedelta(hours=23):
                    break
                await asyncio.sleep(0.2)
            assert [(row[0], row[1]) for row in rows] == [(keys[refs[0].sop], 0)]
            kept = await s3_client.list_object_versions(Bucket=bucket, Prefix=f"objects/{rows[0][0]}")
            assert len(kept.get("Versions", [])) == 1 and not kept.get("DeleteMarkers")

    unlocked = {**env, "DICOMWEB_STORAGE_URL": f"s3://{s3_bucket}/unlocked"}
    serve = [sys.executable, "-m", "dicomweb.cli", "serve", "--database-url", database_url, "--port", "0",
             "--dimse-port", "0"]  # fmt: skip
    refused = await asyncio.to_thread(
        subprocess.run, serve, env=unlocked, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert f"bucket {s3_bucket!r} does not have S3 Object Lock enabled" in refused.stderr


async def _fetch(database_url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()
