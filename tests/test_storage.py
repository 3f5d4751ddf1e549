"""The blob-store contract, run identically against the local and the S3 backend (`blob_store` fixture).

Backend-specific guarantees (temp files, directory pruning, multipart bookkeeping, URL parsing) follow at
the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import storage.local
from storage import BlobNotFoundError, BlobStore, LocalBlobStore, S3BlobStore, open_store
from storage.base import READ_CHUNK_SIZE
from storage.digests import DigestMismatchError
from storage.local import TMP_DIR_NAME
from storage.s3 import DEFAULT_PART_SIZE
from tests.fixtures.s3 import S3Server, make_s3_store

MiB = 1024 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def chunked(data: bytes, sizes: Iterable[int] = (1, 7, 4093, 65537, 1_000_003)) -> AsyncIterator[bytes]:
    """Yield data in odd, cycling chunk sizes, the way a network body arrives."""
    sizes = list(sizes)
    offset = 0
    index = 0
    while offset < len(data):
        step = sizes[index % len(sizes)]
        yield data[offset : offset + step]
        offset += step
        index += 1
        await asyncio.sleep(0)


class SourceFailedError(Exception):
    pass


async def failing_source(good_bytes: int) -> AsyncIterator[bytes]:
    """Deliver good_bytes, then fail the way a dropped client connection would."""
    async for chunk in chunked(payload(good_bytes), sizes=[MiB + 17]):
        yield chunk
    raise SourceFailedError("client went away")


def names_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def keys_of(store: BlobStore, prefix: str = "") -> list[str]:
    return sorted([info.key async for info in store.list(prefix)])


async def pending_uploads(s3_client: Any, store: S3BlobStore) -> list[dict[str, Any]]:
    response = await s3_client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return response.get("Uploads", [])


@pytest.fixture
def inspect_s3(blob_store: BlobStore, request: pytest.FixtureRequest) -> Any:
    """The raw S3 client when blob_store is the S3 backend (resolved here: async tests can't do it lazily)."""
    return request.getfixturevalue("s3_client") if isinstance(blob_store, S3BlobStore) else None


async def assert_nothing_left(store: BlobStore, key: str, s3_client: Any) -> None:
    """After a failed put: no object, no temp file (local), no half-finished multipart upload (S3)."""
    assert not await store.exists(key)
    assert await keys_of(store) == []
    if isinstance(store, LocalBlobStore):
        assert names_in(store.root / TMP_DIR_NAME) == []
    if isinstance(store, S3BlobStore):
        assert await pending_uploads(s3_client, store) == []


# -- round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65_537, READ_CHUNK_SIZE + 1, DEFAULT_PART_SIZE + 1])
async def test_put_bytes_round_trip(blob_store: BlobStore, size: int) -> None:
    data = payload(size, seed=size)
    assert await blob_store.put("study/series/instance", data) == size
    assert await blob_store.read("study/series/instance") == data
    assert await blob_store.size("study/series/instance") == size
    assert await blob_store.exists("study/series/instance")
    chunks = [chunk async for chunk in blob_store.stream("study/series/instance")]
    assert all(chunks) and all(len(chunk) <= READ_CHUNK_SIZE for chunk in chunks)
    assert b"".join(chunks) == data


@pytest.mark.parametrize(
    "size",
    [0, 10, 3 * MiB + 5, DEFAULT_PART_SIZE, 2 * DEFAULT_PART_SIZE, 20 * MiB + 3],
    ids=["empty", "tiny", "3MiB", "one-part", "two-parts-exact", "20MiB-multipart"],
)
async def test_put_stream_round_trip(blob_store: BlobStore, size: int, inspect_s3: Any) -> None:
    data = payload(size, seed=size)
    assert await blob_store.put("big/object", chunked(data)) == size
    assert await blob_store.size("big/object") == size
    assert await blob_store.read("big/object") == data
    if isinstance(blob_store, S3BlobStore):
        # Multipart ETags end in -<part count>: proves which upload path was taken.
        head = await inspect_s3.head_object(Bucket=blob_store.bucket, Key=blob_store.prefix + "big/object")
        parts = -(-size // DEFAULT_PART_SIZE)
        assert head["ETag"].strip('"').endswith(f"-{parts}") == (parts > 1)


async def test_put_accepts_bytearray_and_memoryview(blob_store: BlobStore) -> None:
    data = payload(1000)
    await blob_store.put("a", bytearray(data))
    await blob_store.put("b", memoryview(data))
    assert await blob_store.read("a") == data
    assert await blob_store.read("b") == data


async def test_concurrent_puts_and_reads(blob_store: BlobStore) -> None:
    blobs = {f"s/{i}/obj": payload(1000 + i * 4099, seed=i) for i in range(16)}
    await asyncio.gather(*(blob_store.put(key, chunked(data)) for key, data in blobs.items()))
    results = await asyncio.gather(*(blob_store.read(key) for key in blobs))
    assert results == list(blobs.values())


# -- ranges -------------------------------------------------------------------------------------------

RANGED_SIZE = 2 * READ_CHUNK_SIZE + 123  # spans several read chunks
_BOUNDARIES = [
    *(0, 1, READ_CHUNK_SIZE - 1, READ_CHUNK_SIZE, READ_CHUNK_SIZE + 1),
    *(RANGED_SIZE - 1, RANGED_SIZE, RANGED_SIZE + 1, RANGED_SIZE + 50),
]
_offsets = st.one_of(st.sampled_from(_BOUNDARIES), st.integers(0, RANGED_SIZE + 100))


@pytest.fixture
async def ranged_object(blob_store: BlobStore) -> tuple[BlobStore, bytes]:
    data = payload(RANGED_SIZE, seed=42)
    await blob_store.put("ranged", data)
    return blob_store, data


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(start=_offsets, end=st.one_of(st.none(), _offsets))
# The edges every backend has to get right, tried on every run on top of the random ones.
@example(start=0, end=None)
@example(start=0, end=RANGED_SIZE)
@example(start=0, end=RANGED_SIZE + 10)
@example(start=READ_CHUNK_SIZE, end=READ_CHUNK_SIZE)
@example(start=READ_CHUNK_SIZE - 1, end=READ_CHUNK_SIZE + 1)
@example(start=RANGED_SIZE - 1, end=None)
@example(start=RANGED_SIZE, end=None)
@example(start=RANGED_SIZE + 5, end=RANGED_SIZE + 9)
@example(start=5, end=4)
async def test_ranged_reads_match_slicing(
    ranged_object: tuple[BlobStore, bytes], start: int, end: int | None
) -> None:
    store, data = ranged_object
    if end is not None and end < start:
        with pytest.raises(ValueError):
            await store.read("ranged", start, end)
    else:
        assert await store.read("ranged", start, end) == data[start:end]


@pytest.mark.parametrize(("start", "end"), [(0, None), (0, 0), (0, 5), (3, None), (3, 3), (3, 10)])
async def test_empty_object_ranges(blob_store: BlobStore, start: int, end: int | None) -> None:
    await blob_store.put("empty", b"")
    assert await blob_store.read("empty", start, end) == b""
    assert [chunk async for chunk in blob_store.stream("empty", start, end)] == []


@pytest.mark.parametrize(("start", "end"), [(5, 4), (1, 0), (-1, None), (-5, 3)])
async def test_invalid_ranges_raise(blob_store: BlobStore, start: int, end: int | None) -> None:
    await blob_store.put("obj", b"0123456789")
    with pytest.raises(ValueError):
        await blob_store.read("obj", start, end)


async def test_reader_may_stop_early(blob_store: BlobStore) -> None:
    data = payload(3 * READ_CHUNK_SIZE)
    await blob_store.put("obj", data)
    for _ in range(3):
        stream = blob_store.stream("obj")
        first = await anext(stream)
        assert data.startswith(first)
        await stream.aclose()  # type: ignore[attr-defined]
    assert await blob_store.read("obj", 10, 20) == data[10:20]


# -- missing keys, delete, list -----------------------------------------------------------------------


async def test_missing_key(blob_store: BlobStore) -> None:
    stream = blob_store.stream("no/such/key")  # creating the iterator does no I/O ...
    with pytest.raises(BlobNotFoundError):
        await anext(stream)  # ... the first iteration raises
    for start, end in [(0, None), (0, 0), (5, 5), (3, 10)]:
        with pytest.raises(BlobNotFoundError):
            await blob_store.read("no/such/key", start, end)
    with pytest.raises(BlobNotFoundError):
        await blob_store.size("no/such/key")
    assert not await blob_store.exists("no/such/key")
    await blob_store.delete("no/such/key")  # deleting a missing key is fine


async def test_prefix_of_a_key_is_not_an_object(blob_store: BlobStore) -> None:
    await blob_store.put("study/series/instance", b"x")
    assert not await blob_store.exists("study/series")
    with pytest.raises(BlobNotFoundError):
        await blob_store.read("study")
    await blob_store.delete("study")
    assert await blob_store.read("study/series/instance") == b"x"


async def test_delete(blob_store: BlobStore) -> None:
    await blob_store.put("a/b/c", b"abc")
    await blob_store.put("a/b/d", b"abd")
    await blob_store.delete("a/b/c")
    assert not await blob_store.exists("a/b/c")
    with pytest.raises(BlobNotFoundError):
        await blob_store.read("a/b/c")
    await blob_store.delete("a/b/c")  # idempotent: deletes are retried
    assert await blob_store.read("a/b/d") == b"abd"
    assert await keys_of(blob_store) == ["a/b/d"]


async def test_list(blob_store: BlobStore) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    objects = {
        "study1/series1/a": b"1",
        "study1/series1/b": b"22",
        "study1/series2/c": b"333",
        "study10/x": b"4444",
        "other": b"",
    }
    for key, data in objects.items():
        await blob_store.put(key, data)
    infos = {info.key: info async for info in blob_store.list()}
    assert sorted(infos) == sorted(objects)
    for key, info in infos.items():
        assert info.size == len(objects[key])
        assert info.modified.tzinfo is not None
        assert before < info.modified < datetime.now(UTC) + timedelta(minutes=5)
    study1 = ["study1/series1/a", "study1/series1/b", "study1/series2/c"]
    assert await keys_of(blob_store, "study1/") == study1
    assert await keys_of(blob_store, "study1") == [*study1, "study10/x"]
    assert await keys_of(blob_store, "study1/series1/") == ["study1/series1/a", "study1/series1/b"]
    assert await keys_of(blob_store, "study1/series1/b") == ["study1/series1/b"]
    assert await keys_of(blob_store, "study1/ser") == study1
    assert await keys_of(blob_store, "nothing") == []
    assert await keys_of(blob_store, "nothing/here/") == []


async def test_list_resumes_after_any_key(blob_store: BlobStore) -> None:
    """Listing has an order of its own (the local store: by path segment, as SeaweedFS lists; AWS S3 by
    bytes), and a walk resumed after any listed key sees exactly the keys after it: how the scrub pages
    through the store."""
    keys = ["a.x", "a/b/c", "a/b.d", "a/c", "a0", "b/z/y", "ab", "p1/1.2/1.2.3/9.dcm", "p1/1.2.4"]
    for key in keys:
        await blob_store.put(key, key.encode())
    listed = [info.key async for info in blob_store.list()]
    assert sorted(listed) == sorted(keys)
    if isinstance(blob_store, LocalBlobStore):
        assert listed == sorted(keys, key=lambda k: k.split("/"))
    for n, after in enumerate(listed):
        assert [info.key async for info in blob_store.list(start_after=after)] == listed[n + 1 :], after
    assert [info.key async for info in blob_store.list("a/", start_after="a/b/c")] == ["a/b.d", "a/c"]


@pytest.fixture
def paged_store(
    blob_store: BlobStore, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> BlobStore:
    """blob_store with list batches (local) / pages (S3) shrunk to 7 entries, so paging is exercised."""
    monkeypatch.setattr(storage.local, "LIST_BATCH_SIZE", 7)
    if not isinstance(blob_store, S3BlobStore):
        return blob_store
    return make_s3_store(
        request.getfixturevalue("s3_server"),
        blob_store.bucket,
        client=request.getfixturevalue("s3_client"),
        list_page_size=7,
    )


async def test_list_pages(paged_store: BlobStore) -> None:
    keys = sorted(f"p/{i % 3}/{i:03d}" for i in range(30))
    await asyncio.gather(*(paged_store.put(key, b"") for key in keys))
    assert await keys_of(paged_store, "p/") == keys
    assert await keys_of(paged_store, "p/1") == [key for key in keys if key.startswith("p/1/")]


# -- failures leave nothing behind --------------------------------------------------------------------


@pytest.mark.parametrize(
    "good_bytes", [0, 3 * MiB, 20 * MiB], ids=["immediately", "before-first-part", "mid-multipart"]
)
async def test_failing_source_leaves_nothing(blob_store: BlobStore, good_bytes: int, inspect_s3: Any) -> None:
    with pytest.raises(SourceFailedError):  # the source's own exception, not a wrapper
        await blob_store.put("victim", failing_source(good_bytes))
    await assert_nothing_left(blob_store, "victim", inspect_s3)


async def test_cancelled_put_leaves_nothing(blob_store: BlobStore, inspect_s3: Any) -> None:
    reached = asyncio.Event()

    async def stalling_source() -> AsyncIterator[bytes]:
        async for chunk in chunked(payload(18 * MiB), sizes=[MiB]):
            yield chunk
        reached.set()
        await asyncio.Event().wait()  # a client that stops sending
        yield b"never"

    task = asyncio.create_task(blob_store.put("victim", stalling_source()))
    await asyncio.wait_for(reached.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_nothing_left(blob_store, "victim", inspect_s3)


# -- key validation -----------------------------------------------------------------------------------

BAD_KEYS = ["", "/abs", "/", "a/../b", "..", "../escape", "a/..", ".", "./a", "a/./b", "a//b", "a/", "a\\b",
            "a\x00b"]  # fmt: skip


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_rejected(blob_store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await blob_store.put(key, b"x")
    with pytest.raises(ValueError):
        await blob_store.put(key, chunked(b"x"))
    with pytest.raises(ValueError):
        await blob_store.read(key)
    with pytest.raises(ValueError):
        await blob_store.size(key)
    with pytest.raises(ValueError):
        await blob_store.exists(key)
    with pytest.raises(ValueError):
        await blob_store.delete(key)
    assert await keys_of(blob_store) == []


@pytest.mark.parametrize("prefix", ["/abs", "../x", "a/../", "a//", "a\\b/", "a\x00"])
async def test_bad_list_prefixes_rejected(blob_store: BlobStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        await keys_of(blob_store, prefix)


async def test_unusual_but_valid_keys(blob_store: BlobStore) -> None:
    keys = ["with space/and+plus", "ünïcødé/1.2.840.10008", "a..b/.hidden", "x=y&z"]
    for key in keys:
        await blob_store.put(key, key.encode())
    for key in keys:
        assert await blob_store.read(key) == key.encode()
    assert await keys_of(blob_store) == sorted(keys)


# -- local backend specifics --------------------------------------------------------------------------


async def test_local_layout_and_temp_dir(local_store: LocalBlobStore) -> None:
    await local_store.put("study/series/instance", b"dicom")
    assert (local_store.root / "study" / "series" / "instance").read_bytes() == b"dicom"
    assert names_in(local_store.root / TMP_DIR_NAME) == []
    # A temp file left by a crash mid-put is invisible to readers and to the sweeper's list().
    (local_store.root / TMP_DIR_NAME / "deadbeef.part").write_bytes(b"partial")
    assert await keys_of(local_store) == ["study/series/instance"]
    assert await keys_of(local_store, ".t") == []


async def test_local_rejects_reserved_temp_dir_keys(local_store: LocalBlobStore) -> None:
    with pytest.raises(ValueError):
        await local_store.put(f"{TMP_DIR_NAME}/x", b"x")
    with pytest.raises(ValueError):
        await local_store.read(f"{TMP_DIR_NAME}/x")


async def test_local_keys_never_escape_root(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "root")
    try:
        for key in ["../outside", "a/../../outside", "/tmp/outside", str(tmp_path / "outside")]:
            with pytest.raises(ValueError):
                await store.put(key, b"x")
        assert names_in(tmp_path) == ["root"]
    finally:
        await store.close()


async def test_local_delete_prunes_empty_directories(local_store: LocalBlobStore) -> None:
    await local_store.put("s1/se1/i1", b"1")
    await local_store.put("s1/se2/i2", b"2")
    await local_store.delete("s1/se1/i1")
    assert not (local_store.root / "s1" / "se1").exists()
    assert (local_store.root / "s1" / "se2").is_dir()
    await local_store.delete("s1/se2/i2")
    assert names_in(local_store.root) == [TMP_DIR_NAME]
    await local_store.put("s1/se1/i1", b"again")  # directories come back on demand
    assert await local_store.read("s1/se1/i1") == b"again"


async def test_local_put_survives_concurrent_pruning(local_store: LocalBlobStore) -> None:
    """A put into a study whose last object is being deleted (a STOW right after a DELETE of the same
    study): the delete prunes the series, study and partition directories while the put creates them
    again. A put whose mkdir found the directory above just pruned raised FileNotFoundError (STOW failure
    272, "could not store the object"); every put must succeed and keep its object."""
    previous = "p1/study/series/0"
    await local_store.put(previous, b"0")
    for i in range(1, 1500):
        key = f"p1/study/series/{i}"
        await asyncio.gather(local_store.delete(previous), local_store.put(key, b"%d" % i, durable=False))
        assert await local_store.read(key) == b"%d" % i
        previous = key
    await local_store.delete(previous)
    assert names_in(local_store.root) == [TMP_DIR_NAME]


async def test_local_directory_is_not_readable_as_object(local_store: LocalBlobStore) -> None:
    await local_store.put("a/b", b"x")
    with pytest.raises(BlobNotFoundError):
        await anext(local_store.stream("a"))
    with pytest.raises(BlobNotFoundError):
        await local_store.size("a")


# -- S3 backend specifics -----------------------------------------------------------------------------


async def test_s3_prefixes_isolate_stores(s3_server: S3Server, s3_bucket: str, s3_client: Any) -> None:
    one = make_s3_store(s3_server, s3_bucket, prefix="iso-test/one")
    two = make_s3_store(s3_server, s3_bucket, prefix="/iso-test/one-two/")
    try:
        await one.put("k", b"1")
        await two.put("k", b"2")
        assert await one.read("k") == b"1"
        assert await keys_of(one) == ["k"]
        assert await keys_of(two) == ["k"]
        stored = await s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="iso-test/")
        assert sorted(item["Key"] for item in stored["Contents"]) == ["iso-test/one-two/k", "iso-test/one/k"]
    finally:
        await one.close()
        await two.close()


async def test_s3_ensure_bucket_creates_once(s3_server: S3Server) -> None:
    store = make_s3_store(s3_server, f"fresh-{os.urandom(4).hex()}", prefix="")
    try:
        await store.ensure_bucket()
        await store.ensure_bucket()  # idempotent
        await store.put("k", b"v")
        assert await store.read("k") == b"v"
    finally:
        await store.close()


async def test_s3_closed_store_refuses_work(s3_store: S3BlobStore) -> None:
    await s3_store.put("k", b"v")
    await s3_store.close()
    with pytest.raises(RuntimeError):
        await s3_store.read("k")


# -- open_store ---------------------------------------------------------------------------------------


async def test_open_store_local(tmp_path: Path) -> None:
    for url in [f"file://{tmp_path}/a", str(tmp_path / "b"), f"file://localhost{tmp_path}/c"]:
        store = open_store(url)
        try:
            assert isinstance(store, LocalBlobStore)
            assert store.root == Path(url.removeprefix("file://").removeprefix("localhost"))
            await store.put("k", b"v")
            assert await store.read("k") == b"v"
        finally:
            await store.close()


@pytest.mark.parametrize(
    "url", ["", "s3://", "file://remote-host/x", "file:relative", "ftp://x/y", "gs://b/p"]
)
def test_open_store_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


async def test_open_store_s3_uses_environment_credentials(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    store = open_store(f"s3://{s3_bucket}/via-url/p", s3_endpoint_url=s3_server.endpoint_url)
    try:
        assert isinstance(store, S3BlobStore)
        assert (store.bucket, store.prefix, store.region) == (s3_bucket, "via-url/p/", "us-east-1")
        await store.put("k", b"v")
        assert await store.read("k") == b"v"
        assert [info.key async for info in store.list()] == ["k"]
    finally:
        await store.close()


async def test_deferred_durability_round_trip(blob_store: BlobStore) -> None:
    """Objects written with durable=False read back whole at once and stay after make_durable()."""
    payloads = {f"batch/obj-{i}.dcm": os.urandom(1000 + i) for i in range(5)}
    for key, data in payloads.items():
        assert await blob_store.put(key, data, durable=False) == len(data)
    await blob_store.make_durable(list(payloads))
    for key, data in payloads.items():
        assert await blob_store.read(key) == data
    assert sorted([b.key async for b in blob_store.list("batch/")]) == sorted(payloads)


async def test_read_many(blob_store: BlobStore) -> None:
    """Whole objects in the order asked, None where a key names nothing; empty objects are b""."""
    objects = {f"many/{n}.dcm": bytes([n]) * (n * 1000) for n in range(6)}
    for key, data in objects.items():
        await blob_store.put(key, data)
    keys = ["many/3.dcm", "many/none.dcm", "many/0.dcm", *objects, "many/3.dcm"]
    got = await blob_store.read_many(keys)
    assert got == [objects["many/3.dcm"], None, b"", *objects.values(), objects["many/3.dcm"]]
    assert await blob_store.read_many([]) == []
    with pytest.raises(ValueError):
        await blob_store.read_many(["../escape"])


async def test_read_joined(blob_store: BlobStore) -> None:
    """Each object behind its prefix in one buffer, checked against its digest; None when one is missing or
    not of the size given; a mismatch names the altered object."""
    objects = {f"joined/{n}.dcm": os.urandom(n * 1000) for n in range(4)}
    for key, data in objects.items():
        await blob_store.put(key, data)
    keys = list(objects)
    sizes = [len(d) for d in objects.values()]
    prefixes = [b"<%d>" % n for n in range(4)]
    digests = [hashlib.sha256(d).digest() for d in objects.values()]
    got = await blob_store.read_joined(keys, sizes, prefixes, sha256=digests)
    expected = b"".join(p + d for p, d in zip(prefixes, objects.values(), strict=True))
    assert got is not None and bytes(got) == expected
    assert await blob_store.read_joined([], [], []) in (b"", bytearray())
    assert await blob_store.read_joined([*keys[:2], "joined/none.dcm"], [*sizes[:2], 5], prefixes[:3]) is None
    longer = [sizes[0], sizes[1] + 1]
    assert await blob_store.read_joined(keys[:2], longer, prefixes[:2]) is None
    assert await blob_store.read_joined(keys[:2], longer, prefixes[:2], sha256=digests[:2]) is None
    wrong = [digests[0], digests[2], *digests[2:]]
    with pytest.raises(DigestMismatchError) as caught:
        await blob_store.read_joined(keys, sizes, prefixes, sha256=wrong)
    assert caught.value.key == keys[1]
