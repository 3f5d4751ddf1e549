"""Blob store on a local directory: one file per key under a root directory.

Writes land in `<root>/.tmp/` first and are fsynced and renamed into place, so neither a reader nor a crash
ever sees a partial object. Every blocking syscall runs on the store's own thread pool, batched (whole small
puts in one hop, 1 MiB per hop when streaming) so thread hand-offs never dominate the I/O they wrap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import stat
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TypeVar

from .base import (
    READ_CHUNK_SIZE,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    check_range,
    validate_key,
    validate_prefix,
)
from .digests import check, check_all

T = TypeVar("T")

# Temp files live here (same filesystem as the objects, so rename is atomic); list() never descends into it.
TMP_DIR_NAME = ".tmp"


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs (Linux); None elsewhere, where make_durable falls back to fsync per file."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()
# Small objects are written beside their target as .<random>.part and renamed; list() never shows these.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".part"
# Chunks from an async source are gathered up to this size before one thread hop writes them.
WRITE_BATCH_SIZE = 1024 * 1024
# list() walks the tree in a thread and hands back this many entries per hop.
LIST_BATCH_SIZE = 1000
# A concurrent delete may prune a directory between our mkdir and rename; retrying that is always safe.
_RENAME_ATTEMPTS = 5


def _fsync_dir(directory: Path) -> None:
    """Persist a directory entry change (rename, mkdir): fsync on the file alone does not cover it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path, root: Path) -> None:
    """Create directory and any missing parents below root, fsyncing each new entry's parent.

    A concurrent delete prunes empty directories bottom-up, so a parent found here may be gone when its
    child is made (a STOW right after a DELETE of the same study): the walk then starts again."""
    for attempt in range(_RENAME_ATTEMPTS):
        if directory.is_dir():
            return
        missing: list[Path] = []
        current = directory
        while current != root and not current.is_dir():
            missing.append(current)
            current = current.parent
        try:
            for path in reversed(missing):
                with contextlib.suppress(FileExistsError):  # a concurrent put created it first
                    os.mkdir(path)
                _fsync_dir(path.parent)
        except FileNotFoundError:  # a parent was pruned under us
            if attempt == _RENAME_ATTEMPTS - 1:
                raise


def _take(iterator: Iterator[T], count: int) -> list[T]:
    return list(islice(iterator, count))


class _TempFile:
    """A uniquely named file under `<root>/.tmp/` that only becomes an object through commit().

    Methods run on worker threads and serialise on a lock, so discard() (called when the writer fails or is
    cancelled) can never close the descriptor under a write still running in another thread; once discarded,
    later operations refuse to run, so a late thread cannot recreate the file.
    """

    def __init__(self, tmp_dir: Path) -> None:
        self.path = tmp_dir / f"{uuid.uuid4().hex}.part"
        self.size = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._committed = False
        self._discarded = False

    def _ensure_open(self) -> int:
        if self._discarded:
            raise RuntimeError("temp file was discarded")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            fd = self._ensure_open()
            remaining = memoryview(data).cast("B")
            while remaining:
                written = os.write(fd, remaining)
                remaining = remaining[written:]
                self.size += written

    def commit(self, target: Path, root: Path) -> None:
        """fsync the data, rename it to target and fsync the parent so the rename survives a crash."""
        with self._lock:
            fd = self._ensure_open()
            os.fsync(fd)
            self._fd = None
            os.close(fd)
            for attempt in range(_RENAME_ATTEMPTS):
                try:
                    _make_dirs(target.parent, root)
                    os.rename(self.path, target)
                    break
                except FileNotFoundError:
                    if attempt == _RENAME_ATTEMPTS - 1 or not self.path.exists():
                        raise
            self._committed = True
            _fsync_dir(target.parent)

    def discard(self) -> None:
        with self._lock:
            self._discarded = True
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            if not self._committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)


def _open_for_read(path: Path | str, key: str) -> tuple[int, int]:
    """Open a regular file and return (fd, size); directories are prefixes, not objects."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise BlobNotFoundError(key) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFoundError(key)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_whole(path: Path | str, key: str) -> bytes | None:
    try:
        fd, size = _open_for_read(path, key)
    except BlobNotFoundError:
        return None
    try:
        chunks = []
        while size > 0 and (chunk := os.read(fd, size)):  # one read for a regular file, unless it shrank
            chunks.append(chunk)
            size -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _read_all(paths: list[tuple[str, str]], sha256: Sequence[bytes | None] | None) -> list[bytes | None]:
    bodies = [_read_whole(path, key) for path, key in paths]
    if sha256 is not None:  # in the thread that read them: hashlib releases the GIL
        check_all([(key, body, digest) for (_, key), body, digest in zip(paths, bodies, sha256, strict=True)])
    return bodies


def _read_joined(
    paths: list[tuple[str, str]],
    sizes: Sequence[int],
    prefixes: Sequence[bytes],
    sha256: Sequence[bytes | None] | None,
) -> bytearray | None:
    """LocalBlobStore.read_joined on a worker thread: each file read straight into its place in the buffer
    (no bytes object per file, no join) and hashed right after, while its bytes are still in the CPU cache."""
    buffer = bytearray(sum(sizes) + sum(map(len, prefixes)))
    view = memoryview(buffer)
    digests = sha256 if sha256 is not None else [None] * len(paths)
    position = 0
    for (path, key), size, prefix, digest in zip(paths, sizes, prefixes, digests, strict=True):
        view[position : position + len(prefix)] = prefix
        position += len(prefix)
        body = view[position : position + size]
        try:
            fd, actual = _open_for_read(path, key)
        except BlobNotFoundError:
            return None
        try:
            if actual != size:
                return None
            done = 0
            while done < size and (count := os.readv(fd, [body[done:]])):
                done += count
        finally:
            os.close(fd)
        if done != size:  # shrank while read; objects are immutable, so only a damaged store does this
            return None
        if digest is not None:
            check(key, body, digest)
        position += size
    return buffer


def _close_result_fd(future: concurrent.futures.Future[tuple[int, int]]) -> None:
    """Close the fd of an open whose caller went away (cancelled) before it could take ownership."""
    if not future.cancelled() and future.exception() is None:
        os.close(future.result()[0])


class LocalBlobStore(BlobStore):
    """Objects as files under root; see the module docstring for the atomicity and threading model."""

    def __init__(self, root: str | os.PathLike[str], *, max_workers: int = 16) -> None:
        self.root = Path(root).resolve()
        self._root_name = str(self.root)
        self._tmp_dir = self.root / TMP_DIR_NAME
        # Created once at startup; everything after this runs on the thread pool.
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        # A private pool: blob I/O can't starve the loop's default executor (DNS etc.) and vice versa.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="blobstore-local"
        )

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _submit(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        return self._executor.submit(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _check_key(self, key: str) -> None:
        validate_key(key)
        if key.split("/", 1)[0] == TMP_DIR_NAME:
            raise ValueError(f"blob keys must not start with the reserved {TMP_DIR_NAME}/ directory: {key!r}")
        name = key.rsplit("/", 1)[-1]
        if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
            raise ValueError(f"blob keys must not look like temp files (.*.part): {key!r}")

    def _path(self, key: str) -> Path:
        self._check_key(key)
        return self.root.joinpath(*key.split("/"))

    def _file_name(self, key: str) -> str:
        """_path as a plain string, for the write path and batch reads (a validated key is a safe relative
        path as is; pathlib's joins were 6% of a series retrieval's CPU)."""
        self._check_key(key)
        return f"{self._root_name}/{key}"

    # -- writing ---------------------------------------------------------------------------------------

    def _put_bytes(self, data: bytes | bytearray | memoryview, target: str, durable: bool = True) -> int:
        """The whole small-object write in one thread hop.

        The hot path of ingest, so it is ordered for the fewest journal commits and syscalls: the temp file
        lives beside the target (a same-directory rename), is renamed before the fsync, so one fsync of the
        file commits data and rename together and the directory fsync after it is nearly free. Parent
        directories are only looked at when the open finds them missing. Readers still never see a partial
        object (the rename follows the complete write); a crash before the fsync can leave an incomplete
        object under the key, which nothing references yet: the caller indexes a key only after put()
        returns, and the orphan sweeper removes such leftovers.
        """
        parent = os.path.dirname(target)
        for attempt in range(_RENAME_ATTEMPTS):
            temp = f"{parent}/{TEMP_PREFIX}{os.urandom(16).hex()}{TEMP_SUFFIX}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileNotFoundError:  # a new series (or a concurrent delete pruned it): make it
                if attempt == _RENAME_ATTEMPTS - 1:
                    raise
                _make_dirs(Path(parent), self.root)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            os.rename(temp, target)
            if durable:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        finally:
            os.close(fd)
        if durable:
            _fsync_dir(Path(parent))
        return len(data)

    def blocking_writer(self) -> Callable[[str, bytes], int]:
        return self._put_not_durable

    def blocking_reader(self) -> Callable[[str], bytes]:
        return self._read_whole

    def _read_whole(self, key: str) -> bytes:
        fd, size = _open_for_read(self._path(key), key)
        try:
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def _put_not_durable(self, key: str, data: bytes) -> int:
        return self._put_bytes(data, self._file_name(key), durable=False)

    def _sync(self, keys: list[str]) -> None:
        """One syncfs(2) flushes every pending write and rename on the filesystem in a single journal
        commit, where an fsync per object costs one commit each; fsync per file where syncfs is missing."""
        if _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if _syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        paths = [self._path(k) for k in keys]
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for directory in {p.parent for p in paths}:
            _fsync_dir(directory)

    async def make_durable(self, keys: list[str]) -> None:
        if keys:
            for key in keys:
                self._check_key(key)  # a bad key fails here, on the caller's side, as it always did
            await self._run(self._sync, keys)

    async def put(self, key: str, data: bytes | AsyncIterable[bytes], *, durable: bool = True) -> int:
        if isinstance(data, bytes | bytearray | memoryview):
            return await self._run(self._put_bytes, data, self._file_name(key), durable)
        target = self._path(key)
        tmp = _TempFile(self._tmp_dir)
        try:
            buffer = bytearray()
            async for chunk in data:
                buffer += chunk
                if len(buffer) >= WRITE_BATCH_SIZE:
                    await self._run(tmp.write, buffer)
                    buffer = bytearray()
            if buffer:
                await self._run(tmp.write, buffer)
            await self._run(tmp.commit, target, self.root)
        except BaseException:
            # Shielded: a second cancellation must not stop the temp file from being removed.
            await asyncio.shield(self._run(tmp.discard))
            raise
        return tmp.size

    # -- reading ---------------------------------------------------------------------------------------

    async def stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        check_range(start, end)
        path = self._path(key)
        opening = self._submit(_open_for_read, path, key)
        try:
            fd, size = await asyncio.wrap_future(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_result_fd)
            raise
        # One read is always in flight ahead of the consumer: while it handles chunk n (e.g. sends it to a
        # socket), a worker thread is already reading chunk n+1.
        last: concurrent.futures.Future[bytes] | None = None
        try:
            stop = size if end is None else min(end, size)
            if start < stop and hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):  # only a readahead hint
                    os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_SEQUENTIAL)
            offsets = range(start, stop, READ_CHUNK_SIZE)
            if offsets:
                last = self._submit(os.pread, fd, min(READ_CHUNK_SIZE, stop - start), start)
            for offset in offsets:
                assert last is not None
                wanted = min(READ_CHUNK_SIZE, stop - offset)
                chunk = await asyncio.wrap_future(last)
                following = offset + READ_CHUNK_SIZE
                if len(chunk) == wanted and following < stop:
                    last = self._submit(os.pread, fd, min(READ_CHUNK_SIZE, stop - following), following)
                if chunk:
                    yield chunk
                if len(chunk) < wanted:  # the file shrank under us; objects are immutable, so just stop
                    break
        finally:
            # A read still running on a worker thread owns the fd until it returns; close after it.
            if last is not None:
                last.add_done_callback(lambda _: os.close(fd))
            else:
                os.close(fd)

    async def read_many(
        self, keys: Sequence[str], *, sha256: Sequence[bytes | None] | None = None
    ) -> list[bytes | None]:
        """One thread hop for the whole batch: open, read (and check) and close each file in turn."""
        return await self._run(_read_all, [(self._file_name(key), key) for key in keys], sha256)

    async def read_joined(
        self,
        keys: Sequence[str],
        sizes: Sequence[int],
        prefixes: Sequence[bytes],
        *,
        sha256: Sequence[bytes | None] | None = None,
    ) -> bytearray | None:
        """One thread hop for the batch, each file read into its place in one buffer (see _read_joined)."""
        paths = [(self._file_name(key), key) for key in keys]
        return await self._run(_read_joined, paths, sizes, prefixes, sha256)

    def _size(self, path: Path, key: str) -> int:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFoundError(key)
        return st.st_size

    async def size(self, key: str) -> int:
        return await self._run(self._size, self._path(key), key)

    # -- deleting --------------------------------------------------------------------------------------

    def _delete(self, path: Path) -> None:
        """Unlink, then prune now-empty parent directories so deleted studies leave no husks behind.

        Not fsynced: deletes are retried by their callers, so a delete lost in a crash is redone.
        """
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        parent = path.parent
        while parent != self.root:
            try:
                os.rmdir(parent)
            except OSError:  # not empty (or already gone): stop pruning
                return
            parent = parent.parent

    async def delete(self, key: str) -> None:
        await self._run(self._delete, self._path(key))

    # -- listing ---------------------------------------------------------------------------------------

    def _walk(self, prefix: str, start_after: str) -> Iterator[BlobInfo]:
        """Depth first, each directory's entries sorted by name: keys in the order of their segments (as
        SeaweedFS lists). Subtrees wholly at or before `start_after` are not entered."""
        directory, _, name_prefix = prefix.rpartition("/")
        start_dir = self.root.joinpath(*directory.split("/")) if directory else self.root
        parts = directory.split("/") if directory else []
        after = start_after.split("/") if start_after else None
        yield from self._walk_dir(str(start_dir), parts, name_prefix, after)

    def _walk_dir(
        self, path: str, parts: list[str], name_filter: str, after: list[str] | None
    ) -> Iterator[BlobInfo]:
        try:
            with os.scandir(path) as entries_iter:
                entries = sorted(entries_iter, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            name = entry.name
            if not name.startswith(name_filter) or (not parts and name == TMP_DIR_NAME):
                continue
            if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
                continue
            key_parts = [*parts, name]
            try:
                if entry.is_dir(follow_symlinks=False):
                    # every key below sorts before `after` when this directory sorts before its segments
                    if after is None or key_parts >= after[: len(key_parts)]:
                        yield from self._walk_dir(entry.path, key_parts, "", after)
                elif entry.is_file(follow_symlinks=False) and (after is None or key_parts > after):
                    st = entry.stat(follow_symlinks=False)
                    key = "/".join(key_parts)
                    yield BlobInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))
            except FileNotFoundError:  # deleted while we were walking
                continue

    async def list(self, prefix: str = "", *, start_after: str = "") -> AsyncIterator[BlobInfo]:
        validate_prefix(prefix)
        walker = self._walk(prefix, start_after)
        while True:
            batch = await self._run(_take, walker, LIST_BATCH_SIZE)
            for info in batch:
                yield info
            if len(batch) < LIST_BATCH_SIZE:
                return

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)
