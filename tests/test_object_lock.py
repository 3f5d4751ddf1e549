"""S3 Object Lock against SeaweedFS, which implements it: objects written under a COMPLIANCE retention that
no credential can cut short, deletions that wait for the retention and then remove every version."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from botocore.exceptions import ClientError

from archive.maintenance import drain_deletions, sweep_orphans
from storage import BlobRetainedError, open_store
from storage.s3 import S3BlobStore
from tests.fixtures.s3 import S3Server, make_s3_store

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
    for key in ("p1/a.dcm", "p1/big.dcm"):
        head = await s3_client.head_object(Bucket=locked.bucket, Key=locked.prefix + key)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        until = head["ObjectLockRetainUntilDate"].astimezone(UTC)
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

    await asyncio.sleep(max(0.0, (caught.value.until - datetime.now(UTC)).total_seconds()) + 0.5)
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
