"""Blob store on S3 (or an S3-compatible server) through aiobotocore.

Atomicity comes from S3 itself: an object appears only when its single PutObject or its
CompleteMultipartUpload succeeds. Streams larger than one part go up as a multipart upload, a few parts in
flight at once, and any failure aborts the upload so no invisible parts keep costing storage.

Object Lock (`object_lock`, DICOMWEB_S3_OBJECT_LOCK_DAYS): every object is written with a COMPLIANCE
retention, so that no credential, the archive's included, can destroy it before the period ends (ransomware
protection). The bucket must have Object Lock enabled (which makes it versioned). A delete then removes every
version of the key by id, never leaving a delete marker; while a version is retained it raises
BlobRetainedError with the date, and the deletion queue waits until then (archive/maintenance.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from .base import (
    READ_CHUNK_SIZE,
    BlobInfo,
    BlobNotFoundError,
    BlobRetainedError,
    BlobStore,
    check_range,
    validate_key,
    validate_prefix,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Objects up to one part go up as a single PutObject; larger ones as parts of this size. 8 MiB keeps the
# memory per upload small while staying well above S3's 5 MiB minimum part size.
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB
# Parts uploaded concurrently per put(); bounds memory per upload at about (this + 1) * part size.
DEFAULT_PART_CONCURRENCY = 4
DEFAULT_REGION = "us-east-1"

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket", "NotFound", "404"})


class StoreUnusableError(Exception):
    """The bucket cannot be used as configured; the message says why in one line."""


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND_CODES


def _checksum_options(endpoint_url: str | None) -> dict[str, str]:
    """One digest of an uploaded body, not two. Over plain http botocore signs the payload's SHA-256 into
    SigV4 whatever else is configured (the body is authenticated and integrity-checked), so the CRC32 it
    adds by default ("flexible checksums") to every PutObject is a second pass over the same bytes, on
    both ends. Over https (AWS) the default stays: there the CRC32 is what lets botocore send the body
    unsigned (TLS protects it) instead of hashing it with SHA-256. Reads keep the default: a checksum the
    server returns (objects stored with one) is still verified."""
    if endpoint_url is not None and endpoint_url.lower().startswith("http://"):
        return {"request_checksum_calculation": "when_required"}
    return {}


async def _parts_of_bytes(data: bytes, part_size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), part_size):
        yield data[offset : offset + part_size]


async def _parts_of_stream(
    head: bytearray, rest: AsyncIterator[bytes], part_size: int
) -> AsyncIterator[bytes]:
    """Re-chunk a source into parts of exactly part_size; the last one holds the (non-empty) remainder."""
    buffer = head
    while True:
        while len(buffer) > part_size:
            yield bytes(buffer[:part_size])
            del buffer[:part_size]
        try:
            chunk = await anext(rest)
        except StopAsyncIteration:
            break
        buffer += chunk
    if buffer:
        yield bytes(buffer)


class S3BlobStore(BlobStore):
    """Objects under `prefix` in one bucket; one aiobotocore client, created on first use, is shared."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        part_concurrency: int = DEFAULT_PART_CONCURRENCY,
        max_pool_connections: int = 32,
        list_page_size: int = 1000,
        session: AioSession | None = None,
        client: Any = None,
        object_lock: timedelta | None = None,
    ) -> None:
        """client: an already-open aiobotocore S3 client to share (the caller keeps ownership and closes it;
        endpoint/credential/pool arguments are then ignored). Otherwise one is created on first use."""
        if not bucket:
            raise ValueError("S3 bucket name is required")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (the S3 minimum)")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region or DEFAULT_REGION
        self._access_key = access_key
        self._secret_key = secret_key
        self._part_size = part_size
        self._part_concurrency = max(1, part_concurrency)
        self._list_page_size = list_page_size
        self.object_lock = object_lock
        self._config = AioConfig(
            # S3-compatible servers (SeaweedFS, MinIO, ...) rarely have wildcard DNS for bucket subdomains.
            s3={"addressing_style": "path"} if endpoint_url else None,
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=max_pool_connections,
            **_checksum_options(endpoint_url),
        )
        self._session = session or get_session()
        self._client: Any = client
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()
        self._closed = False
        # Abort tasks that outlived a cancelled put(); kept referenced so they are not garbage-collected.
        self._cleanups: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"
        )

    async def _get_client(self) -> Any:
        """The shared client, created once; credentials come from the arguments or botocore's chain."""
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._closed:
                raise RuntimeError("S3BlobStore is closed")
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    self._session.create_client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        aws_access_key_id=self._access_key,
                        aws_secret_access_key=self._secret_key,
                        config=self._config,
                    )
                )
                self._exit_stack = stack
        return self._client

    def _full_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    async def check_bucket(self) -> None:
        """Raise StoreUnusableError, with a one-line reason, unless the bucket exists and these credentials
        may use it (HeadBucket): what commands check before they start, as they check the database."""
        where = self.endpoint_url or "AWS S3"
        try:
            client = await self._get_client()
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in _NO_BUCKET_CODES:
                raise StoreUnusableError(
                    f"bucket {self.bucket!r} does not exist at {where}; create it "
                    "(`dicomweb migrate` with this --storage-url does)"
                ) from exc
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            hint = " (wrong credentials, or no access to this bucket)" if status in (401, 403) else ""
            raise StoreUnusableError(
                f"S3 at {where} refused bucket {self.bucket!r} with HTTP {status}{hint}"
            ) from exc
        except EndpointConnectionError as exc:
            raise StoreUnusableError(f"cannot reach S3 at {where}: {exc}") from exc
        except BotoCoreError as exc:  # no credentials at all, a malformed endpoint URL...
            raise StoreUnusableError(f"S3 at {where}: {exc}") from exc

    async def check_ready(self) -> None:
        """The bucket itself: a probe of a key answered 404 for a bucket that does not exist, so the
        readiness probe said the storage was fine while every STOW failed."""
        await self.check_bucket()

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and the embedded setup; production pre-creates)."""
        client = await self._get_client()
        try:
            await client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NO_BUCKET_CODES:
                raise
        kwargs: dict[str, Any] = {}
        if self.region != DEFAULT_REGION:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        if self.object_lock is not None:
            kwargs["ObjectLockEnabledForBucket"] = True
        try:
            await client.create_bucket(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def check_object_lock(self) -> None:
        """With object_lock set, fail unless the bucket has Object Lock enabled: retention was asked for,
        and writing unprotected objects instead would be silent."""
        if self.object_lock is None:
            return
        client = await self._get_client()
        try:
            response = await client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = response.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except ClientError as exc:
            log.debug("no Object Lock configuration: %s", exc)
            enabled = False
        if not enabled:
            raise RuntimeError(
                f"bucket {self.bucket!r} does not have S3 Object Lock enabled, but a retention was "
                "configured (DICOMWEB_S3_OBJECT_LOCK_DAYS): create the bucket with Object Lock, or unset it"
            )

    def _retention(self) -> dict[str, Any]:
        if self.object_lock is None:
            return {}
        until = datetime.now(UTC) + self.object_lock
        return {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}

    # -- writing ---------------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | AsyncIterable[bytes], *, durable: bool = True) -> int:
        full_key = self._full_key(key)
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data)
            if len(body) <= self._part_size:
                await self._put_single(full_key, body)
                return len(body)
            return await self._put_multipart(full_key, _parts_of_bytes(body, self._part_size))
        # Buffer up to one part first: most objects are small and need only a single request.
        source = aiter(data)
        head = bytearray()
        async for chunk in source:
            head += chunk
            if len(head) > self._part_size:
                break
        else:
            await self._put_single(full_key, bytes(head))
            return len(head)
        return await self._put_multipart(full_key, _parts_of_stream(head, source, self._part_size))

    async def _put_single(self, full_key: str, body: bytes) -> None:
        client = await self._get_client()
        await client.put_object(Bucket=self.bucket, Key=full_key, Body=body, **self._retention())

    async def _upload_part(
        self, client: Any, full_key: str, upload_id: str, number: int, body: bytes
    ) -> dict[str, Any]:
        response = await client.upload_part(
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm="CRC32",
        )
        part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    async def _put_multipart(self, full_key: str, parts: AsyncIterator[bytes]) -> int:
        client = await self._get_client()
        # CRC32 declared up front: current botocore checksums every part by default, and S3 then insists the
        # upload was created with the same algorithm and that Complete lists each part's checksum.
        created = await client.create_multipart_upload(
            Bucket=self.bucket, Key=full_key, ChecksumAlgorithm="CRC32", **self._retention()
        )
        upload_id: str = created["UploadId"]
        in_flight: deque[asyncio.Task[dict[str, Any]]] = deque()
        finished: list[dict[str, Any]] = []
        total = 0
        try:
            number = 0
            async for body in parts:
                number += 1
                total += len(body)
                if len(in_flight) >= self._part_concurrency:
                    finished.append(await in_flight.popleft())
                in_flight.append(
                    asyncio.create_task(self._upload_part(client, full_key, upload_id, number, body))
                )
            while in_flight:
                finished.append(await in_flight.popleft())
            await client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": finished},
            )
        except BaseException:
            cleanup = asyncio.create_task(self._abort(client, full_key, upload_id, list(in_flight)))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            # Shielded: if we are cancelled again while aborting, the abort still runs to completion.
            await asyncio.shield(cleanup)
            raise
        return total

    async def _abort(
        self, client: Any, full_key: str, upload_id: str, tasks: list[asyncio.Task[dict[str, Any]]]
    ) -> None:
        """Stop part uploads still running, then abort so the server drops every stored part."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except Exception:  # the original failure matters more; a lifecycle rule reaps what is left
            log.warning("could not abort multipart upload %s of %s", upload_id, full_key, exc_info=True)

    # -- reading ---------------------------------------------------------------------------------------

    async def _get(self, key: str, start: int, end: int | None) -> Any:
        """The GetObject response for bytes [start, end), None when that range is empty. A missing key
        costs no HEAD first: the GET's 404 says so (only an empty range needs one)."""
        check_range(start, end)
        full_key = self._full_key(key)
        if end is not None and end == start:
            await self.size(key)  # nothing to read, but a missing key must still raise
            return None
        client = await self._get_client()
        kwargs: dict[str, Any] = {}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            return await client.get_object(Bucket=self.bucket, Key=full_key, **kwargs)
        except ClientError as exc:
            if _is_not_found(exc):
                raise BlobNotFoundError(key) from None
            if _error_code(exc) == "InvalidRange":  # start at or past the end: the clamped range is empty
                return None
            raise

    async def stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        response = await self._get(key, start, end)
        if response is None:
            return
        body = response["Body"]
        try:
            while chunk := await body.read(READ_CHUNK_SIZE):
                yield chunk
        finally:
            # Releases the connection (or drops it, if the reader stopped early and bytes are still unread).
            body.close()

    async def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """One whole-body read: small objects (series retrieval through read_many, frames, export sources)
        skip stream()'s chunk loop and the join of its chunks."""
        response = await self._get(key, start, end)
        if response is None:
            return b""
        async with response["Body"] as body:
            return await body.read()

    async def size(self, key: str) -> int:
        full_key = self._full_key(key)
        client = await self._get_client()
        try:
            response = await client.head_object(Bucket=self.bucket, Key=full_key)
        except ClientError as exc:
            if _is_not_found(exc):
                raise BlobNotFoundError(key) from None
            raise
        return int(response["ContentLength"])

    async def delete(self, key: str) -> None:
        full_key = self._full_key(key)
        client = await self._get_client()
        if self.object_lock is not None:
            await self._delete_versions(client, key, full_key)
            return
        try:
            await client.delete_object(Bucket=self.bucket, Key=full_key)
        except ClientError as exc:
            if not _is_not_found(exc):
                raise

    async def _delete_versions(self, client: Any, key: str, full_key: str) -> None:
        """Every version of the key (a locked bucket is versioned), each by its id: a plain DeleteObject
        would only hide a retained object behind a delete marker."""
        response = await client.list_object_versions(Bucket=self.bucket, Prefix=full_key)
        versions = [
            v["VersionId"]
            for v in [*response.get("Versions", []), *response.get("DeleteMarkers", [])]
            if v["Key"] == full_key
        ]
        for version in versions:
            try:
                await client.delete_object(Bucket=self.bucket, Key=full_key, VersionId=version)
            except ClientError as exc:
                if _is_not_found(exc):
                    continue
                if _error_code(exc) != "AccessDenied":
                    raise
                head = await client.head_object(Bucket=self.bucket, Key=full_key, VersionId=version)
                until = head.get("ObjectLockRetainUntilDate")
                if until is None or until.astimezone(UTC) <= datetime.now(UTC):
                    raise
                raise BlobRetainedError(key, until.astimezone(UTC)) from exc

    async def list(self, prefix: str = "", *, start_after: str = "") -> AsyncIterator[BlobInfo]:
        validate_prefix(prefix)
        client = await self._get_client()
        paginator = client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        after: dict[str, str] = {"StartAfter": self.prefix + start_after} if start_after else {}
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            PaginationConfig={"PageSize": self._list_page_size},
            **after,
        )
        async for page in pages:
            for item in page.get("Contents", ()):
                yield BlobInfo(
                    key=item["Key"][strip:],
                    size=int(item["Size"]),
                    modified=item["LastModified"].astimezone(UTC),
                )

    async def close(self) -> None:
        async with self._client_lock:
            self._closed = True
            if self._cleanups:
                await asyncio.gather(*self._cleanups, return_exceptions=True)
            self._client = None
            if self._exit_stack is not None:
                stack, self._exit_stack = self._exit_stack, None
                await stack.aclose()
