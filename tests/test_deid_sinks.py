"""BlobSink against both real stores: uploads overlap (more than UPLOADS_IN_FLIGHT at a time are queued,
none lost), each outcome belongs to its own instance, and every output is readable once finish() returns."""

from __future__ import annotations

import asyncio

import pytest
from botocore.exceptions import ClientError

from deid.engine import Deidentified, output_key
from deid.sinks import UPLOADS_IN_FLIGHT, BlobSink, check_destination, unusable_reason
from dicomcore.deidentify import Identity
from storage import BlobStore, S3BlobStore
from storage.s3 import StoreUnusableError

TS = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def result(n: int, *, series: str = "2.25.2") -> Deidentified:
    new = Identity("anon", "2.25.1", series, f"2.25.3{n}")
    return Deidentified(f"object {n} ".encode() * 100, Identity("p", "1.1", "1.2", f"1.3.{n}"), new, CT, TS)


async def test_every_added_result_is_stored_once_finish_returns(blob_store: BlobStore) -> None:
    sink = BlobSink(blob_store, "op")
    results = [result(n) for n in range(3 * UPLOADS_IN_FLIGHT + 1)]
    tickets = [await sink.add(r) for r in results]
    assert tickets == list(range(len(results)))
    assert await sink.finish() == [None] * len(results)
    stored = await blob_store.read_many([f"op/{output_key(r)}" for r in results])
    assert stored == [r.data for r in results]


async def test_a_failed_upload_fails_only_its_own_instance(blob_store: BlobStore) -> None:
    sink = BlobSink(blob_store, "op")
    good, bad = result(1), result(2, series="..")  # '..' is no valid key segment: the store refuses it
    assert [await sink.add(good), await sink.add(bad), await sink.add(result(3))] == [0, 1, 2]
    outcomes = await sink.finish()
    assert outcomes[0] is None and outcomes[2] is None
    assert outcomes[1] is not None and outcomes[1].startswith("could not write the object: ValueError")
    assert await blob_store.read(f"op/{output_key(good)}") == good.data


async def test_abandon_leaves_no_upload_running(blob_store: BlobStore) -> None:
    sink = BlobSink(blob_store, "op")
    for n in range(UPLOADS_IN_FLIGHT):
        await sink.add(result(n))
    await sink.abandon()
    tasks = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "BlobSink._put"]  # type: ignore[union-attr]
    assert tasks == []


async def test_a_bucket_that_denies_head_bucket_is_not_refused_before_writing() -> None:
    """Credentials of a write-only drop bucket may PutObject but not HeadBucket (s3:ListBucket): the
    check before the first instance must not fail such an export; a missing bucket still fails it.
    (A stub: SeaweedFS cannot grant PutObject without ListBucket.)"""

    class Denied(S3BlobStore):
        def __init__(self, code: str) -> None:
            super().__init__("drop-bucket")
            self.code = code

        async def check_bucket(self) -> None:  # S3BlobStore.check_bucket's refusal, with S3's answer as cause
            raise StoreUnusableError("refused") from ClientError({"Error": {"Code": self.code}}, "HeadBucket")

    await check_destination(Denied("403"))
    await check_destination(Denied("AccessDenied"))
    with pytest.raises(ClientError):
        await check_destination(Denied("404"))
    destination = {"type": "s3", "settings": {"bucket": "drop-bucket", "prefix": ""}}
    denied_put = ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject")
    assert unusable_reason(destination, denied_put) == (
        "the S3 destination's bucket 'drop-bucket' refuses the server's credentials (AccessDenied)"
    )
