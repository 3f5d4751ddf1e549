"""Blob storage: one async interface (BlobStore) over a local directory or an S3 bucket.

Configuration names a store by URL so deployments switch backends without code changes:
`file:///abs/path` or a plain path for a local directory, `s3://bucket/prefix` for S3.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import unquote, urlsplit

from .base import READ_CHUNK_SIZE, BlobInfo, BlobNotFoundError, BlobRetainedError, BlobStore, validate_key
from .local import LocalBlobStore
from .s3 import S3BlobStore

__all__ = [
    "READ_CHUNK_SIZE",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobRetainedError",
    "BlobStore",
    "LocalBlobStore",
    "S3BlobStore",
    "open_store",
    "validate_key",
]


def open_store(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_object_lock_days: int = 0,
) -> BlobStore:
    """Build the store a URL names (`s3_object_lock_days`: S3 objects written under a COMPLIANCE retention
    of that many days, S3BlobStore).

    S3 credentials are not part of the URL (it ends up in logs and config files); they come from the
    standard AWS environment variables / botocore credential chain. The S3 client is only created on first
    use, so this never does network I/O.
    """
    if not url:
        raise ValueError("blob store URL is empty")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"s3 URL has no bucket: {url!r}")
        lock = timedelta(days=s3_object_lock_days) if s3_object_lock_days > 0 else None
        return S3BlobStore(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            object_lock=lock,
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL must be local (file:///abs/path): {url!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file URL must hold an absolute path: {url!r}")
        return LocalBlobStore(path)
    if scheme == "":
        return LocalBlobStore(url)
    raise ValueError(
        f"unsupported blob store URL {url!r}: use file:///path, a plain path or s3://bucket/prefix"
    )
