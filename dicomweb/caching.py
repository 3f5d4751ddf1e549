"""HTTP caching (RFC 9111, RFC 9110 13.1.2): strong ETags, If-None-Match -> 304, Cache-Control.

Everything WADO-RS serves from an instance is immutable for the instance row's storage_key, so validators
come from the index (indexer.versions) and never need the body. Cache-Control says `private` because the
content is patient data that shared caches must not keep, and `no-cache` because a study changes when
instances are added or deleted: clients revalidate each time and get a cheap 304 while nothing changed.
"""

from __future__ import annotations

import base64
import hashlib

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from indexer.versions import scope_version

CACHE_CONTROL = "private, no-cache"


def make_etag(*parts: object) -> str:
    """A strong entity tag over whatever the representation depends on (version, URL root, media type...)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=16).hexdigest()
    return f'"{digest}"'


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def matches_if_none_match(request: Request, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison; `*` matches any current representation."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(_opaque(candidate) == etag for candidate in header.split(","))


def cache_headers(etag: str, cache_control: str = CACHE_CONTROL) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": cache_control}


def digest_headers(sha256: bytes) -> dict[str, str]:
    """The SHA-256 of a body that is exactly a stored object: RFC 9530's Repr-Digest, and RFC 3230's
    Digest, which it obsoletes but older clients and proxies still check."""
    encoded = base64.b64encode(sha256).decode("ascii")
    return {"Repr-Digest": f"sha-256=:{encoded}:", "Digest": f"sha-256={encoded}"}


def not_modified(etag: str, cache_control: str = CACHE_CONTROL) -> Response:
    """304 carries the validator and caching headers a 200 would have carried (RFC 9110 15.4.5)."""
    return Response(status_code=304, headers=cache_headers(etag, cache_control))


async def scope_etag(
    pool: asyncpg.Pool,
    partition_key: int,
    scope: tuple[str, str | None, str | None],
    *variant: object,
) -> str | None:
    """The ETag of what a study/series/instance resource serves (None: nothing there): the stored objects'
    version plus what else the body depends on (service root in URLs, media type, render options)."""
    version = await scope_version(pool, partition_key, *scope)
    return None if version is None else make_etag(version, *variant)
