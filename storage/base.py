"""The one async blob-store interface every backend implements.

Keys are '/'-separated relative paths chosen by the caller (never user input directly). Objects are
immutable once written: a key is written once, read many times, then deleted. That is what lets both
backends be atomic without locks (local: temp file + fsync + rename; S3: single PUT or multipart upload).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from .digests import check_all

# Chunk size used when a backend streams an object back; large enough to amortise per-chunk overhead,
# small enough that many concurrent downloads stay cheap in memory.
READ_CHUNK_SIZE = 1024 * 1024


class BlobNotFoundError(KeyError):
    """The key names no stored object."""


class BlobRetainedError(Exception):
    """The store keeps the object under a retention lock (S3 Object Lock) until `until`: it cannot be
    deleted before, by any credential; ask again then."""

    def __init__(self, key: str, until: datetime) -> None:
        super().__init__(f"object {key} is retained until {until.isoformat()}")
        self.key = key
        self.until = until


def validate_key(key: str) -> str:
    """Return key unchanged if it is a safe relative '/'-path, else raise ValueError.

    Both backends apply the same rules so that code tested against one behaves the same on the other, and
    so that a local key can never escape the store's root (no absolute paths, '.'/'..', empty segments,
    backslashes or NULs).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("blob key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"blob key must not contain NUL or backslash: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"blob key must be relative: {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"blob key has an empty, '.' or '..' segment: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Check a list() prefix: like a key, except it may be empty, end in '/' or stop mid-segment."""
    if not isinstance(prefix, str):
        raise ValueError("blob prefix must be a string")
    directory = prefix.rpartition("/")[0]
    if directory:
        validate_key(directory)
    elif prefix.startswith("/"):
        raise ValueError(f"blob prefix must be relative: {prefix!r}")
    if "\x00" in prefix or "\\" in prefix:
        raise ValueError(f"blob prefix must not contain NUL or backslash: {prefix!r}")
    return prefix


def check_range(start: int, end: int | None) -> None:
    """Reject nonsensical ranges up front, so every backend fails the same way before any I/O.

    Ranges past the end of an object are not errors (they are clamped); only a negative start or an end
    before the start is, because those always indicate a caller bug.
    """
    if start < 0:
        raise ValueError(f"range start must be >= 0, got {start}")
    if end is not None and end < start:
        raise ValueError(f"range end {end} is before start {start}")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime


class BlobStore(abc.ABC):
    """Async object store. Implementations must be safe to share between concurrent tasks."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes | AsyncIterable[bytes], *, durable: bool = True) -> int:
        """Store an object atomically under key and return its size in bytes.

        Readers never see a partial object: either the old state (absent) or the whole new object.
        A failure while consuming `data` leaves nothing behind under `key`. With durable=False the
        object may not survive a crash until make_durable() covers it: batch writers call that once for
        many objects instead of paying one flush per object.
        """

    def blocking_writer(self) -> Callable[[str, bytes], int] | None:
        """A function that does `put(key, data, durable=False)` for a small in-memory object, blocking, for
        callers already on a worker thread (ingest): it saves a thread hop per object. None (the default)
        for stores whose writes are network I/O that belongs on the event loop (S3): use put()."""
        return None

    def blocking_reader(self) -> Callable[[str], bytes] | None:
        """A function that reads a whole (small) object, blocking, for callers already on a worker thread
        (the bulk update's rewrite), raising BlobNotFoundError; None (the default) where reads are network
        I/O that belongs on the event loop (S3): use read()."""
        return None

    async def make_durable(self, keys: list[str]) -> None:  # noqa: B027 - stores durable on put need nothing
        """Make objects written with durable=False survive a crash; the default is for stores whose puts are
        always durable (S3)."""

    @abc.abstractmethod
    def stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield the bytes [start, end) of the object (end=None: to its end) in chunks.

        Raises BlobNotFoundError (on first iteration) when the key does not exist.
        """

    async def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Read a (small) range fully into memory; for headers, frames and tests."""
        return b"".join([chunk async for chunk in self.stream(key, start, end)])

    async def read_many(
        self, keys: Sequence[str], *, sha256: Sequence[bytes | None] | None = None
    ) -> list[bytes | None]:
        """Several whole small objects, None for each one that does not exist (deleted since it was looked
        up). Series retrieval reads its instances this way, so the cost of reaching an object (a thread
        hop, a request's round trip) is paid once a batch or overlapped, not once an instance. This
        default reads them concurrently.

        `sha256`: the digest each object must have (None: unknown); a mismatch raises
        storage.digests.DigestMismatchError. Hashed off the event loop, where the store reads if it can."""

        async def one(key: str) -> bytes | None:
            try:
                return await self.read(key)
            except BlobNotFoundError:
                return None

        bodies = list(await asyncio.gather(*(one(key) for key in keys)))
        if sha256 is not None:
            await asyncio.to_thread(check_all, list(zip(keys, bodies, sha256, strict=True)))
        return bodies

    async def read_joined(
        self,
        keys: Sequence[str],
        sizes: Sequence[int],
        prefixes: Sequence[bytes],
        *,
        sha256: Sequence[bytes | None] | None = None,
    ) -> bytes | bytearray | None:
        """`prefixes[0] + object[0] + prefixes[1] + object[1] + ...` in one buffer, for objects whose sizes
        are known (series retrieval: each object framed as a multipart part, the batch sent in one write).
        None when an object is missing or not of its size (the caller falls back to read_many, which says
        which one). `sha256` as for read_many. This default joins what read_many reads."""
        bodies = await self.read_many(keys, sha256=sha256)
        pieces: list[bytes] = []
        for prefix, body, size in zip(prefixes, bodies, sizes, strict=True):
            if body is None or len(body) != size:
                return None
            pieces += (prefix, body)
        return b"".join(pieces)

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """Size in bytes; raises BlobNotFoundError."""

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except BlobNotFoundError:
            return False
        return True

    async def check_ready(self) -> None:
        """Raise unless the store can be used now (the readiness probe): here, a read answers."""
        await self.exists("health/probe")

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (deletes are retried). Raises
        BlobRetainedError while a retention lock keeps it."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, start_after: str = "") -> AsyncIterator[BlobInfo]:
        """Every object whose key starts with prefix, in the store's listing order, from the first one
        after `start_after` (a key listed before): a walk that can resume from its last key (the scrub).
        The order is the backend's own: by path segment on the local store (as SeaweedFS lists), by UTF-8
        bytes on AWS S3; resuming relies only on its being the same from one listing to the next."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; the store is unusable afterwards."""
