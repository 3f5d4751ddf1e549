"""Where de-identified instances go: a blob store (S3 bucket/prefix or a local directory) or another data
partition of this archive (through archive.ingest, so the index and the change feed are right).

Output keys are derived from the de-identified UIDs, which are derived from the originals: re-exporting an
instance (a step replayed after a crash) writes the same bytes to the same key, or finds the instance
already stored in the partition. That is what makes a resumed export free of duplicates.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import asyncpg
from botocore.exceptions import ClientError, NoCredentialsError

from archive.ingest import FailureReason, Ingestor
from deid.engine import Deidentified, output_key
from storage import LocalBlobStore, S3BlobStore
from storage.base import BlobStore, validate_key
from storage.local import TMP_DIR_NAME
from storage.s3 import StoreUnusableError


class Sink(Protocol):
    async def add(self, result: Deidentified) -> int:
        """Store (or start storing) one instance; returns its ticket, an index into finish()'s list."""
        ...

    async def written(self, result: Deidentified) -> int:
        """Record an instance a worker wrote itself under local_directory(); returns its ticket."""
        ...

    def local_directory(self) -> str | None:
        """The directory outputs go to when workers may write them directly (local stores), else None."""
        ...

    async def finish(self) -> list[str | None]:
        """One entry per added instance, by ticket: None when stored, else why it failed."""
        ...


# Uploads a sink keeps in flight: a network store's PutObject is mostly waiting for the server, so the
# export overlaps them rather than holding a pool slot through each in turn; bounds the memory held to
# this many outputs. Below the S3 client's connection pool (storage/s3.py), so none waits for a socket.
UPLOADS_IN_FLIGHT = 16


class BlobSink:
    """Writes `{operation}/results/{study}/{series}/{sop}.dcm` below the store's prefix."""

    def __init__(self, store: BlobStore, operation: str) -> None:
        self.store = store
        self.operation = operation
        self._outcomes: list[str | None] = []
        self._written: list[str] = []
        self._uploads: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(UPLOADS_IN_FLIGHT)

    async def add(self, result: Deidentified) -> int:
        """Starts the upload and returns once it is under way (waiting only while UPLOADS_IN_FLIGHT are);
        finish() waits for it."""
        key = f"{self.operation}/{output_key(result)}"
        ticket = len(self._outcomes)
        self._outcomes.append(None)
        await self._slots.acquire()
        # the coroutine holds the bytes: the caller may drop its reference as soon as this returns
        task = asyncio.create_task(self._put(ticket, key, result.data))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)
        return ticket

    async def _put(self, ticket: int, key: str, data: bytes) -> None:
        try:
            # made durable for the whole batch in finish(), before the step's checkpoint commits
            await self.store.put(key, data, durable=False)
        except Exception as exc:
            self._outcomes[ticket] = f"could not write the object: {exc.__class__.__name__}: {exc}"
        else:
            self._written.append(key)
        finally:
            self._slots.release()

    def local_directory(self) -> str | None:
        if isinstance(self.store, LocalBlobStore):
            return str(Path(self.store.root) / validate_key(self.operation))
        return None

    async def written(self, result: Deidentified) -> int:
        self._outcomes.append(None)
        self._written.append(f"{self.operation}/{output_key(result)}")
        return len(self._outcomes) - 1

    async def finish(self) -> list[str | None]:
        if self._uploads:
            await asyncio.gather(*self._uploads)
        await self.store.make_durable(self._written)
        outcomes, self._outcomes, self._written = self._outcomes, [], []
        return outcomes

    async def abandon(self) -> None:
        """Stop the uploads of a batch that will not finish (cancelled, or failed): none outlives it."""
        for task in self._uploads:
            task.cancel()
        await asyncio.gather(*self._uploads, return_exceptions=True)


class PartitionSink:
    """Stores into a data partition of this archive, as a STOW of the de-identified copies would."""

    def __init__(self, pool: asyncpg.Pool, store: BlobStore, partition_key: int) -> None:
        self._ingestor = Ingestor(pool, store, partition_key)

    async def add(self, result: Deidentified) -> int:
        ticket = len(self._ingestor.outcomes)  # add() appends its outcome before it first awaits
        await self._ingestor.add(io.BytesIO(result.data))
        return ticket

    def local_directory(self) -> str | None:
        return None  # stored through the ingest path, which indexes them

    async def written(self, result: Deidentified) -> int:
        raise NotImplementedError("partition outputs are never written by workers")

    async def finish(self) -> list[str | None]:
        outcomes = await self._ingestor.finish()
        # already stored: an earlier (replayed) step stored exactly this de-identified instance
        return [
            None if o.failure in (None, FailureReason.ALREADY_STORED) else f"{o.failure.name}: {o.message}"
            for o in outcomes
        ]


# what a directory refuses for good: a file where a directory should be, no permission, a read-only file
# system; anything else (a full disk, say) may pass, and the step is retried
_UNUSABLE_DIRECTORY = {
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
}


_DENIED = frozenset({"AccessDenied", "Forbidden", "403"})


def unusable_reason(destination: dict[str, Any], exc: BaseException) -> str | None:
    """The reason when `exc` (raised by the destination store) says the destination is unusable, which
    no retry changes, else None (a transient fault: the step is retried). Directory reasons name the
    request's relative path, never the server's."""
    if destination["type"] == "directory":
        if isinstance(exc, OSError) and exc.errno in _UNUSABLE_DIRECTORY:
            path = destination["settings"]["path"]
            return f"the destination directory {path!r} cannot be written: {os.strerror(exc.errno)}"
        return None
    if destination["type"] != "s3":
        return None
    bucket = destination["settings"]["bucket"]
    if isinstance(exc, NoCredentialsError):
        return "the S3 destination has no credentials: the server has no AWS credentials configured"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "NotFound", "404"):
            return f"the S3 destination's bucket {bucket!r} does not exist"
        if code in _DENIED or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"the S3 destination's bucket {bucket!r} refuses the server's credentials ({code})"
    return None


async def check_destination(store: BlobStore) -> None:
    """Raise what the destination raises when it cannot take any output (checked before the first
    instance; unusable_reason says whether that is for good): S3's HeadBucket, or a file created and
    removed in a directory."""
    if isinstance(store, S3BlobStore):
        try:
            await store.check_bucket()
        except StoreUnusableError as exc:
            cause = exc.__cause__  # what S3 answered, which unusable_reason reads
            # HeadBucket needs s3:ListBucket, which a write-only drop bucket's credentials lack: the
            # uploads themselves tell (an errors.log refused with 403 fails the export then)
            code = cause.response.get("Error", {}).get("Code", "") if isinstance(cause, ClientError) else ""
            if str(code) in _DENIED:
                return
            raise (cause if isinstance(cause, Exception) else exc) from None
    elif isinstance(store, LocalBlobStore):
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=store.root / TMP_DIR_NAME)
        os.close(fd)
        os.unlink(name)


def destination_store(
    destination: dict[str, Any],
    *,
    export_dir: Path,
    s3_endpoint_url: str | None,
    s3_region: str | None,
    session: Any = None,
) -> BlobStore:
    """The blob store of an s3 or directory destination (validated by deid.export_request)."""
    settings = destination["settings"]
    if destination["type"] == "s3":
        return S3BlobStore(
            settings["bucket"], settings["prefix"], endpoint_url=s3_endpoint_url, region=s3_region,
            session=session,
        )  # fmt: skip
    return LocalBlobStore(export_dir / settings["path"])


def describe(destination: dict[str, Any], operation: str, name: str) -> str:
    """Where an output object of the operation is, for humans and errorHref."""
    settings = destination["settings"]
    if destination["type"] == "s3":
        prefix = f"{settings['prefix']}/" if settings["prefix"] else ""
        return f"s3://{settings['bucket']}/{prefix}{operation}/{name}"
    return f"{settings['path']}/{operation}/{name}"
