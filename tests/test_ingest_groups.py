"""The ingestor's grouped path: parts prepared and written in groups, per-part failures, every store kind."""

from __future__ import annotations

import hashlib
import io
import logging
import random
import uuid
from pathlib import Path

import asyncpg
import pytest

from archive import ingest
from archive.ingest import FailureReason, Ingestor, StoreOutcome
from bench.synthetic import instance_variants, make_study
from indexer.lookup import find_instances
from storage import LocalBlobStore
from storage.base import BlobStore
from storage.s3 import S3BlobStore
from tests.fixtures.s3 import S3Server


def files(seed: int, count: int) -> tuple[str, list[bytes]]:
    spec = make_study(random.Random(seed), series_count=1)
    return spec.study_uid, instance_variants(spec, 0, count, start=seed * 1000)


async def store_all(
    pool: asyncpg.Pool, store: BlobStore, parts: list[bytes], **kw: str
) -> list[StoreOutcome]:
    ingestor = Ingestor(pool, store, 1, **kw)
    for data in parts:
        await ingestor.add(io.BytesIO(data))
    return await ingestor.finish()


async def assert_stored_exactly(
    pool: asyncpg.Pool, store: BlobStore, study_uid: str, expected: dict[str, bytes]
) -> None:
    """The index holds exactly `expected` (SOP UID -> bytes), each object byte-equal, and no other object."""
    rows = await find_instances(pool, 1, study_uid)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(expected)
    for r in rows:
        assert await store.read(r.storage_key) == expected[r.sop_instance_uid]
        digest = await pool.fetchval("SELECT sha256 FROM instance WHERE storage_key = $1", r.storage_key)
        assert digest == hashlib.sha256(expected[r.sop_instance_uid]).digest()
    assert sorted([b.key async for b in store.list("")]) == sorted(r.storage_key for r in rows)


def sop_uid(outcome: StoreOutcome) -> str:
    assert outcome.sop_instance_uid is not None
    return outcome.sop_instance_uid


@pytest.mark.parametrize("group_parts", [1, 3, 8])
async def test_mixed_parts_keep_order_and_reasons(
    pool: asyncpg.Pool, local_store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch, group_parts: int
) -> None:
    monkeypatch.setattr(ingest, "GROUP_PARTS", group_parts)
    study, good = files(1, 11)
    other_study, foreign = files(2, 1)
    parts = [good[0], b"not DICOM at all", good[1], foreign[0], good[2], good[1], *good[3:]]
    outcomes = await store_all(pool, local_store, parts, expected_study=study)
    assert [o.failure for o in outcomes] == [
        None,
        FailureReason.INVALID_INSTANCE,
        None,
        FailureReason.STUDY_MISMATCH,
        None,
        FailureReason.ALREADY_STORED,  # the same instance twice in one request
        *[None] * 8,
    ]
    assert outcomes[1].sop_instance_uid is None and outcomes[1].message
    assert outcomes[3].study_instance_uid == other_study
    assert outcomes[3].message == (
        f"StudyInstanceUID {other_study} does not match {study} in the request URL"
    )
    assert outcomes[5].message == "the instance is already stored"
    expected = {sop_uid(o): d for o, d in zip(outcomes, parts, strict=True) if o.failure is None}
    assert len(expected) == 11
    await assert_stored_exactly(pool, local_store, study, expected)


async def test_store_without_blocking_writer_puts_from_the_event_loop(
    pool: asyncpg.Pool, s3_store: S3BlobStore
) -> None:
    assert s3_store.blocking_writer() is None
    study, data = files(3, 10)
    outcomes = await store_all(pool, s3_store, [*data, data[4]])
    assert [o.failure for o in outcomes] == [None] * 10 + [FailureReason.ALREADY_STORED]
    # the refused copy's object was deleted again: only the indexed ones are left
    await assert_stored_exactly(pool, s3_store, study, dict(zip(map(sop_uid, outcomes), data, strict=False)))


async def test_spooled_parts_are_streamed_by_put(
    pool: asyncpg.Pool, local_store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "_IN_MEMORY_LIMIT", 1000)  # every part counts as too large to hold
    study, data = files(4, 5)
    outcomes = await store_all(pool, local_store, data)
    assert [o.failure for o in outcomes] == [None] * 5
    stored = dict(zip(map(sop_uid, outcomes), data, strict=True))
    await assert_stored_exactly(pool, local_store, study, stored)


class _FailingStore(LocalBlobStore):
    """The local store with a full disk for objects of one SOP instance."""

    def __init__(self, root: Path, failing_uid: str) -> None:
        super().__init__(root)
        self.failing_uid = failing_uid

    def _put_not_durable(self, key: str, data: bytes) -> int:
        if f"/{self.failing_uid}." in key:
            raise OSError(28, "No space left on device")
        return super()._put_not_durable(key, data)


async def test_a_failed_write_fails_only_its_part(pool: asyncpg.Pool, tmp_path: Path) -> None:
    study, data = files(5, 6)
    probe = await store_all(pool, LocalBlobStore(tmp_path / "probe"), data[2:3])
    store = _FailingStore(tmp_path / "blobs", sop_uid(probe[0]))
    await pool.execute("DELETE FROM instance")
    outcomes = await store_all(pool, store, data)
    assert [o.failure for o in outcomes] == [None, None, FailureReason.PROCESSING_FAILURE, None, None, None]
    assert outcomes[2].message == "could not store the object: OSError: [Errno 28] No space left on device"
    expected = {sop_uid(o): d for o, d in zip(outcomes, data, strict=True) if o.failure is None}
    await assert_stored_exactly(pool, store, study, expected)
    await store.close()


async def test_a_large_part_is_dispatched_alone(
    pool: asyncpg.Pool, local_store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, data = files(6, 4)
    monkeypatch.setattr(ingest, "GROUP_BYTES", len(data[0]) + 1)
    ingestor = Ingestor(pool, local_store, 1)
    await ingestor.add(io.BytesIO(data[0]))
    assert ingestor._tasks == set()  # below both limits: still gathering
    await ingestor.add(io.BytesIO(data[1]))
    assert len(ingestor._tasks) == 1  # two parts reach the byte limit before GROUP_PARTS
    await ingestor.add(io.BytesIO(data[2]))
    await ingestor.add(io.BytesIO(data[3]))
    outcomes = await ingestor.finish()
    assert [o.failure for o in outcomes] == [None] * 4
    stored = dict(zip(map(sop_uid, outcomes), data, strict=True))
    await assert_stored_exactly(pool, local_store, study, stored)


async def test_a_store_refusing_every_write_says_why(
    pool: asyncpg.Pool, s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 with a wrong secret key: each part failed with "could not store the object: ClientError" and
    nothing in the server's log. The reason now carries the store's own words (the S3 error code), and
    the ingest logs one error for the request: an operator sees why every STOW answers 409."""
    _, data = files(6, 3)
    store = S3BlobStore(
        s3_bucket,
        f"t-{uuid.uuid4().hex}",
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key="not-the-secret",
    )
    with caplog.at_level(logging.ERROR, logger="archive.ingest"):
        outcomes = await store_all(pool, store, data)
    await store.close()
    reason = (
        "could not store the object: ClientError: An error occurred (SignatureDoesNotMatch) when calling the "
        "PutObject operation: The request signature we calculated does not match the signature you "
        "provided. Check your key and signing method."
    )
    assert [(o.failure, o.message) for o in outcomes] == [(FailureReason.PROCESSING_FAILURE, reason)] * 3
    assert [r.getMessage() for r in caplog.records] == [f"ingest: 3 of 3 instances failed: {reason}"]
    assert await pool.fetchval("SELECT count(*) FROM instance") == 0
