"""Content digests of stored objects: SHA-256 recorded at ingest (instance.sha256), checked on whole reads.

A stored object never changes (docs/architecture.md), so a digest that no longer matches means the bytes
were altered after ingest: by the disk, the filesystem, or someone with access to the bucket. Readers that
hold a whole object (series retrieval, the scrub) compare it here; readers that stream one use `verified`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable, AsyncIterator

# Chunks from this size up are hashed on a worker thread: hashlib releases the GIL on buffers over 2 KiB,
# and a 1 MiB chunk costs ~0.6 ms of CPU that must not stall the event loop.
_THREAD_HASH_MIN = 256 << 10


class DigestMismatchError(Exception):
    """An object's bytes no longer have the digest recorded when it was stored."""

    def __init__(self, key: str, expected: bytes, actual: bytes) -> None:
        super().__init__(f"object {key} is altered: SHA-256 {actual.hex()}, recorded {expected.hex()}")
        self.key = key
        self.expected = expected
        self.actual = actual


def sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def check(key: str, data: bytes | memoryview, expected: bytes | None) -> None:
    """Raise DigestMismatchError unless `data` has the digest `expected` (None: nothing recorded)."""
    if expected is not None and (actual := hashlib.sha256(data).digest()) != expected:
        raise DigestMismatchError(key, expected, actual)


def digests(objects: list[bytes | None]) -> list[bytes | None]:
    """The SHA-256 of each object of a batch (None for None); run it on a worker thread."""
    return [None if data is None else hashlib.sha256(data).digest() for data in objects]


async def _update(digest: hashlib._Hash, chunk: bytes) -> None:
    if len(chunk) >= _THREAD_HASH_MIN:
        await asyncio.to_thread(digest.update, chunk)
    else:
        digest.update(chunk)


async def digest_of(chunks: AsyncIterable[bytes]) -> bytes:
    """The SHA-256 of a streamed object (large chunks hashed on a worker thread)."""
    digest = hashlib.sha256()
    async for chunk in chunks:
        await _update(digest, chunk)
    return digest.digest()


def check_all(objects: list[tuple[str, bytes | None, bytes | None]]) -> None:
    """check() each (key, data, expected) of a batch; absent objects (data None) are the caller's concern.
    One call per batch: run it on a worker thread, where hashlib runs without the GIL."""
    for key, data, expected in objects:
        if data is not None:
            check(key, data, expected)


async def verified(chunks: AsyncIterable[bytes], key: str, expected: bytes | None) -> AsyncIterator[bytes]:
    """Pass a whole object's chunks through, hashing them; after the last, raise DigestMismatchError if the
    digest differs. The last chunk is held back until the digest is known, so a consumer that sends what it
    gets (an HTTP response) never completes an altered object: the response is cut short instead.

    Chunk n is hashed on a worker thread while the consumer sends chunk n-1 (and the store reads n+1), so
    the check costs throughput only where hashing is slower than the rest."""
    if expected is None:
        async for chunk in chunks:
            yield chunk
        return
    digest = hashlib.sha256()
    hashing: asyncio.Future[None] | None = None
    held: bytes | None = None
    try:
        async for chunk in chunks:
            if hashing is not None:
                await hashing  # updates stay in order
                hashing = None
            if len(chunk) >= _THREAD_HASH_MIN:
                hashing = asyncio.ensure_future(asyncio.to_thread(digest.update, chunk))
            else:
                digest.update(chunk)
            if held is not None:
                yield held
            held = chunk
        if hashing is not None:
            await hashing
            hashing = None
    finally:
        if hashing is not None:  # the consumer went away: let the thread finish, nobody waits for it
            hashing.add_done_callback(lambda f: f.cancelled() or f.exception())
    if digest.digest() != expected:
        raise DigestMismatchError(key, expected, digest.digest())
    if held is not None:
        yield held
