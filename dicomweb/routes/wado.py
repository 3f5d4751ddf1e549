"""WADO-RS: instances, metadata and bulk data of a study, series or instance (PS3.18 10.4)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicomcore.bulk import bulk_value
from dicomcore.dicomjson import UNDEFINED_LENGTH
from dicomcore.frames import FRAME_PATH_SEPARATOR, PIXEL_DATA_PATHS
from dicomcore.transcode import (
    MAX_TRANSCODE_SIZE,
    TARGETS,
    PixelDataError,
    TranscodeError,
    can_decode,
    is_encapsulated,
    syntax_refusal,
    transcode_instance,
)
from dicomcore.uids import EXPLICIT_VR_BIG_ENDIAN
from dicomweb.caching import (
    cache_headers,
    digest_headers,
    make_etag,
    matches_if_none_match,
    not_modified,
    scope_etag,
)
from dicomweb.context import context, not_found, partition_key, resource_uids, service_root
from dicomweb.errors import HTTPProblem
from dicomweb.metrics import DIGEST_MISMATCHES
from dicomweb.multipart import closing, multipart_length, new_boundary, part_head, write_multipart
from dicomweb.negotiation import ANY_TRANSFER_SYNTAX, Offer, Selection, describe, select
from dicomweb.ranges import parse_range
from dicomweb.routes import frames
from dicomweb.routes.damage import damaged, still_indexed
from indexer.lookup import StoredInstance, find_bulk_index, find_instances, find_metadata
from storage.base import BlobNotFoundError, BlobStore
from storage.digests import DigestMismatchError, check, verified

DICOM_JSON = "application/dicom+json"
log = logging.getLogger(__name__)

# Instances are delivered in any transfer syntax the client accepts that can be produced: as stored
# (transfer-syntax=*), or transcoded (dicomcore/transcode.py), one instance at a time in a worker thread.
_MULTIPART_DICOM = Offer(
    "multipart/related", part_type="application/dicom", transfer_syntaxes=(ANY_TRANSFER_SYNTAX,)
)
_SINGLE_DICOM = Offer("application/dicom", transfer_syntaxes=(ANY_TRANSFER_SYNTAX,))
_METADATA_OFFERS = (Offer(DICOM_JSON), Offer("application/json"))
# PS3.18 8.7.3.3.2: bulk data defaults to multipart; single part is what browsers and Range requests want
_BULK_OFFERS = (
    Offer("multipart/related", part_type="application/octet-stream"),
    Offer("application/octet-stream"),
)


def wants_original(request: Request) -> bool:
    """Azure's `msdicom-request-original: true`: the version an instance had before its first bulk update
    (the current one for instances never updated)."""
    return request.headers.get("msdicom-request-original", "").strip().lower() == "true"


def _select(request: Request, offers: tuple[Offer, ...]) -> tuple[Offer, str | None]:
    selection = select(
        offers,
        request.headers.get("accept"),
        available=f"{describe(offers)} in the stored transfer syntax (transfer-syntax=*)",
    )[0]
    return selection.offer, selection.transfer_syntax


def _rank(request: Request, offers: tuple[Offer, ...]) -> list[Selection]:
    return select(
        offers,
        request.headers.get("accept"),
        available=f"{describe(offers)} with transfer-syntax=* (as stored) or one of "
        f"{', '.join(sorted(TARGETS))}",
    )


def _syntax_possible(stored: str, target: str | None) -> bool:
    """Whether `target` can be produced from `stored` as far as syntaxes alone tell (pixel data may still
    rule it out: then the next acceptable syntax is tried)."""
    if target in (None, ANY_TRANSFER_SYNTAX, stored):
        return True
    return target in TARGETS and can_decode(stored)


def _refusals(stored: str, targets: list[str]) -> list[str]:
    """Why none of `targets` can be made from `stored`, each reason once."""
    reasons = (syntax_refusal(stored, t) for t in targets if t is not None)
    return list(dict.fromkeys(r for r in reasons if r)) or ["nothing acceptable"]


class _Undeliverable(Exception):
    def __init__(self, instance: StoredInstance, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.instance = instance
        self.reasons = reasons

    def problem(self) -> HTTPProblem:
        return HTTPProblem(
            406,
            f"instance {self.instance.sop_instance_uid} (stored as {self.instance.transfer_syntax_uid}) "
            f"cannot be delivered in any accepted transfer syntax: {'; '.join(self.reasons)}",
        )


def _transcode_first(
    instance: StoredInstance, data: bytes, targets: list[str]
) -> tuple[bytes, str, list[str]]:
    """The object in the first of `targets` that can be produced; reasons for those that could not. The
    object is checked against its digest first (DigestMismatchError): nothing is made of altered bytes."""
    check(instance.storage_key, data, instance.sha256)
    stored = instance.transfer_syntax_uid
    reasons = []
    for target in targets:
        if target in (ANY_TRANSFER_SYNTAX, stored):
            return data, stored, reasons
        try:
            return transcode_instance(data, target), target, reasons
        except TranscodeError as exc:
            reasons.append(f"{target}: {exc}")
        except PixelDataError as exc:
            reasons.append(f"{target}: {exc} (transfer-syntax=* delivers it as stored)")
    raise ValueError("; ".join(reasons))


async def _deliver(
    store: BlobStore, instance: StoredInstance, targets: list[str]
) -> tuple[str, int, AsyncIterator[bytes] | bytes]:
    """(transfer syntax, length, body) of one instance in the first producible of `targets`."""
    stored = instance.transfer_syntax_uid
    usable = [t for t in targets if _syntax_possible(stored, t)]
    if not usable:
        raise _Undeliverable(instance, _refusals(stored, targets))
    if usable[0] in (ANY_TRANSFER_SYNTAX, stored):
        return stored, instance.size, _object(store, instance)
    if instance.size > MAX_TRANSCODE_SIZE:
        reason = f"it is {instance.size} bytes, over the {MAX_TRANSCODE_SIZE}-byte transcoding limit"
        raise _Undeliverable(instance, [reason + "; ask for its frames, or transfer-syntax=*"])
    try:
        data = await store.read(instance.storage_key)
    except BlobNotFoundError as exc:
        raise HTTPProblem(404, f"instance {instance.sop_instance_uid} was deleted while it was read") from exc
    try:
        body, syntax, _ = await asyncio.to_thread(_transcode_first, instance, data, usable)
    except ValueError as exc:
        raise _Undeliverable(instance, [str(exc)]) from exc
    except DigestMismatchError as exc:
        _report_altered(instance, exc)
        raise
    return syntax, len(body), body


async def retrieve(request: Request) -> Response:
    """Study, series or instance as multipart/related application/dicom (or one application/dicom), each
    instance in the best accepted transfer syntax it can be delivered in."""
    study, series, sop = resource_uids(request)
    offers = (_MULTIPART_DICOM, _SINGLE_DICOM) if sop else (_MULTIPART_DICOM,)
    ranked = _rank(request, offers)
    ctx = context(request)
    key = await partition_key(request)
    instances = await find_instances(ctx.pool, key, study, series, sop, original=wants_original(request))
    if not instances:
        raise not_found(study, series, sop)
    if sop:
        # one instance: walk every accepted (media type, syntax) pair, single or multipart, in order
        instance = instances[0]
        last = _Undeliverable(instance, ["nothing acceptable"])
        for media_type in dict.fromkeys(s.offer.media_type for s in ranked):
            targets = _targets([s for s in ranked if s.offer.media_type == media_type])
            try:
                syntax, length, body = await _deliver(ctx.store, instance, targets)
            except _Undeliverable as exc:
                last = exc
                continue
            except DigestMismatchError as exc:
                raise _altered_problem(instance) from exc
            # sent as stored (a stream, not transcoded bytes): the representation is fixed by the digest
            etag = None
            if instance.sha256 is not None and not isinstance(body, bytes):
                etag = _instance_etag(request, instance.sha256, media_type)
                if matches_if_none_match(request, etag):
                    return not_modified(etag)
            if not isinstance(body, bytes):
                body = await _started(ctx.pool, key, instance, body, original=wants_original(request))
            if media_type == "application/dicom":
                response = _single(syntax, length, body)
                if etag is not None:
                    assert instance.sha256 is not None
                    response.headers.update(cache_headers(etag) | digest_headers(instance.sha256))
                return response
            boundary = instance.sha256.hex()[:32] if etag is not None and instance.sha256 else None
            response = _multipart(
                request, ctx.store, [(instance, (syntax, length, body))], [], [], boundary=boundary
            )
            if etag is not None:
                response.headers.update(cache_headers(etag))
            return response
        raise last.problem()
    targets = _targets(ranked)
    for instance in instances:
        if not any(_syntax_possible(instance.transfer_syntax_uid, t) for t in targets):
            raise _Undeliverable(instance, _refusals(instance.transfer_syntax_uid, targets)).problem()
    if all(_as_stored(instance, targets) for instance in instances):
        return await _stored_multipart(request, ctx.store, key, instances, targets)
    # the first instance is produced before answering, so that a refusal is a clear 406, not a cut body
    try:
        first = await _deliver(ctx.store, instances[0], targets)
    except _Undeliverable as exc:
        raise exc.problem() from exc
    except DigestMismatchError as exc:
        raise _altered_problem(instances[0]) from exc
    return _multipart(request, ctx.store, [(instances[0], first)], instances[1:], targets)


def _targets(selections: list[Selection]) -> list[str]:
    """Transfer syntaxes to try, best first. A range that names no syntax asks for the PS3.18 default
    (Explicit VR Little Endian) but states no preference, so an instance that cannot be decoded is then
    sent as stored rather than refused (as this archive did before it could transcode)."""
    targets = [selection.transfer_syntax or ANY_TRANSFER_SYNTAX for selection in selections]
    if any("transfer-syntax" not in selection.media_range.params for selection in selections):
        targets.append(ANY_TRANSFER_SYNTAX)  # last: after every syntax the client did name
    return list(dict.fromkeys(targets))


def _instance_etag(request: Request, sha256: bytes, media_type: str) -> str:
    """Strong ETag of one instance sent as stored: its digest as such for application/dicom (the body is
    the object), else over what else a multipart body holds (its Content-Location names the root)."""
    if media_type == "application/dicom":
        return f'"{sha256.hex()}"'
    return make_etag(sha256.hex(), media_type, service_root(request))


def _single(syntax: str, length: int, body: AsyncIterator[bytes] | bytes) -> Response:
    media_type = f"application/dicom; transfer-syntax={syntax}"
    if isinstance(body, bytes):
        return Response(body, media_type=media_type)
    return StreamingResponse(body, media_type=media_type, headers={"Content-Length": str(length)})


def _multipart(
    request: Request,
    store: BlobStore,
    ready: list[tuple[StoredInstance, tuple[str, int, AsyncIterator[bytes] | bytes]]],
    rest: list[StoredInstance],
    targets: list[str],
    *,
    boundary: str | None = None,
) -> Response:
    """`boundary`: a fixed one (derived from the one instance's digest) makes the body the same bytes every
    time, as its strong ETag promises; otherwise a random one."""
    boundary = boundary or new_boundary()
    root = service_root(request)

    def headers(instance: StoredInstance, syntax: str, length: int) -> dict[str, str]:
        return _part_headers(root, instance, syntax, length)

    # Every instance sent as stored: the length of the whole body is known from the index
    exact = all(_as_stored(instance, targets) for instance in rest)
    declared: dict[str, str] = {}
    if exact:
        known = [(headers(i, syntax, length), length) for i, (syntax, length, _) in ready]
        known += [(headers(i, i.transfer_syntax_uid, i.size), i.size) for i in rest]
        declared["Content-Length"] = str(multipart_length(known, boundary))

    async def parts() -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes] | bytes]]:
        for instance, (syntax, length, body) in ready:
            yield headers(instance, syntax, length), body
        async for instance, (syntax, length, body) in _delivered(store, rest, targets, exact=exact):
            yield headers(instance, syntax, length), body

    return StreamingResponse(
        write_multipart(parts(), boundary, flush_at=_FLUSH_AT),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        headers=declared,
    )


def _part_headers(root: str, instance: StoredInstance, syntax: str, length: int) -> dict[str, str]:
    return {
        "Content-Type": f"application/dicom; transfer-syntax={syntax}",
        "Content-Length": str(length),
        "Content-Location": f"{root}/studies/{instance.study_instance_uid}/series/"
        f"{instance.series_instance_uid}/instances/{instance.sop_instance_uid}",
    }


async def _stored_multipart(
    request: Request, store: BlobStore, key: int, instances: list[StoredInstance], targets: list[str]
) -> Response:
    """Every instance sent as stored (transfer-syntax=*, the common case): the body is framed here, not by
    write_multipart. Each part's head is made once (it gives the Content-Length too), and each batch of
    small instances is read by the store into one buffer behind its parts' heads and sent in one write:
    no bytes object per instance, no join, no per-part send (docs/performance.md, "WADO-RS")."""
    root = service_root(request)
    boundary = new_boundary()
    raw = boundary.encode()
    heads = [
        part_head(_part_headers(root, i, i.transfer_syntax_uid, i.size), raw, first=n == 0)
        for n, i in enumerate(instances)
    ]
    length = sum(map(len, heads)) + sum(i.size for i in instances) + len(closing(raw))
    groups = _groups(instances, targets)
    # the first batch is read before answering: an object missing from it is then a clear 500, not a 200
    # cut short (later batches can only cut the response)
    first: asyncio.Future[bytes | bytearray | None] | None = None
    if groups and (len(groups[0]) > 1 or _batched(groups[0][0], targets)):
        first = asyncio.ensure_future(_read_framed(store, groups[0], heads[: len(groups[0])]))
        try:
            await asyncio.shield(first)
        except _ObjectGone as exc:
            await _missing_problem(request, store, key, groups[0], exc)
        except DigestMismatchError as exc:
            altered = next(i for i in groups[0] if i.storage_key == exc.key)
            raise _altered_problem(altered) from exc
    return StreamingResponse(
        _stored_body(store, instances, heads, targets, raw, groups, first),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        headers={"Content-Length": str(length)},
    )


async def _stored_body(
    store: BlobStore,
    instances: list[StoredInstance],
    heads: list[bytes],
    targets: list[str],
    boundary: bytes,
    groups: list[list[StoredInstance]],
    first: asyncio.Future[bytes | bytearray | None] | None,
) -> AsyncIterator[bytes | memoryview]:
    """The framed body, in order; the next batch is read (and hashed, in the reading thread) while the
    current one is sent (`first`: the first batch, already read). The length is declared, so an object
    gone meanwhile cuts the response short."""
    starts: list[int] = []
    start = 0
    for group in groups:
        starts.append(start)
        start += len(group)

    def read(n: int) -> asyncio.Future[bytes | bytearray | None]:
        group = groups[n]
        if len(group) == 1 and not _batched(group[0], targets):
            return asyncio.ensure_future(_no_batch())
        return asyncio.ensure_future(_read_framed(store, group, heads[starts[n] : starts[n] + len(group)]))

    ahead = (first if first is not None else read(0)) if groups else None
    try:
        for n, group in enumerate(groups):
            assert ahead is not None
            body = await ahead
            ahead = read(n + 1) if n + 1 < len(groups) else None
            if body is not None:
                yield memoryview(body) if isinstance(body, bytearray) else body
                continue
            yield heads[starts[n]]  # one large instance, streamed in chunks and checked as it goes
            async for chunk in _object(store, group[0]):
                yield chunk
        yield closing(boundary, empty=not instances)
    finally:
        if ahead is not None:
            ahead.cancel()


async def _no_batch() -> None:
    return None


async def _read_framed(
    store: BlobStore, group: list[StoredInstance], heads: list[bytes]
) -> bytes | bytearray:
    try:
        body = await store.read_joined(
            [i.storage_key for i in group], [i.size for i in group], heads, sha256=[i.sha256 for i in group]
        )
    except DigestMismatchError as exc:
        _report_altered(next(i for i in group if i.storage_key == exc.key), exc)
        raise
    if body is None:
        first, last = group[0].sop_instance_uid, group[-1].sop_instance_uid
        raise _ObjectGone(f"an instance of {first}..{last} was deleted (or changed size) while it was sent")
    return body


class _ObjectGone(Exception):
    """An object deleted after the response declared its length: the response can only be cut short."""


# Series retrieval reads instances sent as stored in batches (one thread hop or a set of concurrent GETs per
# batch, the next batch read while this one is sent) and sends about _FLUSH_AT bytes per write: per-instance
# reads and sends held it to a third of Orthanc's rate (docs/performance.md, "Side by side with Orthanc").
_BATCH_BYTES = 4 << 20
_BATCH_COUNT = 64
_BATCHED_SIZE = 1 << 20  # larger instances stream in chunks instead
_FLUSH_AT = 1 << 20

_Delivered = tuple[StoredInstance, tuple[str, int, AsyncIterator[bytes] | bytes]]


def _groups(instances: list[StoredInstance], targets: list[str]) -> list[list[StoredInstance]]:
    """Runs of small instances that go out as stored (a batch each), and every other instance alone."""
    groups: list[list[StoredInstance]] = []
    batch: list[StoredInstance] = []
    batch_bytes = 0
    for instance in instances:
        if _batched(instance, targets):
            if batch and (len(batch) >= _BATCH_COUNT or batch_bytes + instance.size > _BATCH_BYTES):
                groups.append(batch)
                batch, batch_bytes = [], 0
            batch.append(instance)
            batch_bytes += instance.size
            continue
        if batch:
            groups.append(batch)
            batch, batch_bytes = [], 0
        groups.append([instance])
    if batch:
        groups.append(batch)
    return groups


async def _deliver_group(
    store: BlobStore, group: list[StoredInstance], targets: list[str], exact: bool
) -> list[_Delivered]:
    if len(group) == 1 and not _batched(group[0], targets):
        try:
            return [(group[0], await _deliver(store, group[0], targets))]
        except (_Undeliverable, HTTPProblem) as exc:
            # the response is under way: leave this instance out rather than break the others
            log.warning("retrieve: instance %s left out: %s", group[0].sop_instance_uid, exc)
            return []
    # checked where the store reads them (GIL released while hashing); an altered object cuts the response
    try:
        bodies = await store.read_many([i.storage_key for i in group], sha256=[i.sha256 for i in group])
    except DigestMismatchError as exc:
        _report_altered(next(i for i in group if i.storage_key == exc.key), exc)
        raise
    delivered: list[_Delivered] = []
    for instance, body in zip(group, bodies, strict=True):
        if body is None:
            if exact:
                raise _ObjectGone(f"instance {instance.sop_instance_uid} was deleted while it was sent")
            log.warning("retrieve: instance %s left out: deleted while read", instance.sop_instance_uid)
            continue
        delivered.append((instance, (instance.transfer_syntax_uid, len(body), body)))
    return delivered


def _batched(instance: StoredInstance, targets: list[str]) -> bool:
    """Small and sent as stored: read whole, in a batch."""
    return instance.size <= _BATCHED_SIZE and _as_stored(instance, targets)


def _as_stored(instance: StoredInstance, targets: list[str]) -> bool:
    usable = [t for t in targets if _syntax_possible(instance.transfer_syntax_uid, t)]
    return bool(usable) and usable[0] in (ANY_TRANSFER_SYNTAX, instance.transfer_syntax_uid)


async def _delivered(
    store: BlobStore, instances: list[StoredInstance], targets: list[str], *, exact: bool
) -> AsyncIterator[_Delivered]:
    """Each instance in its syntax, in order; the next group is read while the current one is sent.
    Where the response declared its length (exact), an object that has gone cuts it short; otherwise
    the instance is left out."""
    groups = _groups(instances, targets)
    if not groups:
        return
    ahead = asyncio.ensure_future(_deliver_group(store, groups[0], targets, exact))
    try:
        for following in [*groups[1:], None]:
            current = await ahead
            if following is not None:
                ahead = asyncio.ensure_future(_deliver_group(store, following, targets, exact))
            for item in current:
                yield item
    finally:
        ahead.cancel()


async def _object(store: BlobStore, instance: StoredInstance) -> AsyncIterator[bytes]:
    """The stored object, checked against its digest as it streams (its last chunk waits for the check)."""
    key = instance.storage_key
    try:
        async for chunk in verified(store.stream(key), key, instance.sha256):
            yield chunk
    except BlobNotFoundError as exc:
        # deleted between lookup and read, or missing from the store (_started tells which before answering)
        raise _ObjectGone(f"the object of instance {instance.sop_instance_uid} is not in the store") from exc
    except DigestMismatchError as exc:
        _report_altered(instance, exc)
        raise  # the response is under way: raising makes the server close the connection mid-body


async def _missing_problem(
    request: Request, store: BlobStore, key: int, group: list[StoredInstance], exc: Exception
) -> NoReturn:
    """Raise the answer for a batch of which an object could not be read before anything was sent: 500
    naming an instance the index still references whose object the store does not hold (logged with its
    key); else (deleted while it was read) 409, as the retrieval can be asked again."""
    for instance in group:
        if await store.exists(instance.storage_key):
            continue
        if await still_indexed(context(request).pool, key, instance, original=wants_original(request)):
            raise damaged(instance) from exc
    raise HTTPProblem(409, "instances changed while they were read; retrieve them again") from exc


async def _started(
    pool: asyncpg.Pool, key: int, instance: StoredInstance, body: AsyncIterator[bytes], *, original: bool
) -> AsyncIterator[bytes]:
    """`body` with its first chunk read before the response starts, so that an object the store does not
    hold is an error answer rather than a 200 cut short (and an altered object of one chunk, the common
    case, is refused whole). Missing while the index still references it: 500, logged with its key (the
    scrub reports it too); deleted meanwhile: 404."""
    try:
        first = await anext(body)
    except StopAsyncIteration:
        return _chunks([])
    except DigestMismatchError as exc:  # _object reported it
        raise _altered_problem(instance) from exc
    except _ObjectGone as exc:
        if await still_indexed(pool, key, instance, original=original):
            raise damaged(instance) from exc
        uids = instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
        raise not_found(*uids) from exc  # deleted while it was read
    return _chained(first, body)


async def _chained(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


async def _chunks(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def _report_altered(instance: StoredInstance, exc: DigestMismatchError) -> None:
    """An object whose bytes no longer match the digest recorded at ingest: never served silently."""
    DIGEST_MISMATCHES.inc()
    log.error(
        "retrieve: instance %s/%s/%s: %s; the response is refused or cut short",
        instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid, exc,
    )  # fmt: skip


def _altered_problem(instance: StoredInstance) -> HTTPProblem:
    return HTTPProblem(
        500,
        f"instance {instance.sop_instance_uid} is damaged: its stored object no longer matches the SHA-256 "
        "recorded when it was stored (reported to the archive's log)",
    )


async def metadata(request: Request) -> Response:
    """DICOM JSON of every addressed instance, from the index (no stored object is read)."""
    study, series, sop = resource_uids(request)
    offer, _ = _select(request, _METADATA_OFFERS)
    ctx = context(request)
    partition = await partition_key(request)
    original = wants_original(request)
    # validators name the current versions; originals are answered without one
    etag = None
    if not original:
        etag = await scope_etag(
            ctx.pool, partition, (study, series, sop), service_root(request), offer.media_type
        )
    if etag is not None and matches_if_none_match(request, etag):
        return not_modified(etag)
    rows = await find_metadata(ctx.pool, partition, study, series, sop, original=original)
    if not rows:
        raise not_found(study, series, sop)
    root = service_root(request).encode()
    marker = b'"BulkDataURI":"bulkdata/'
    parts = []
    for study_uid, series_uid, sop_uid, blob in rows:
        if marker in blob:
            prefix = b'"BulkDataURI":"%s/studies/%s/series/%s/instances/%s/bulkdata/' % (
                root,
                study_uid.encode(),
                series_uid.encode(),
                sop_uid.encode(),
            )
            blob = blob.replace(marker, prefix)
        parts.append(blob)
    body = b"[" + b",".join(parts) + b"]"
    return Response(body, media_type=offer.media_type, headers=cache_headers(etag) if etag else None)


async def bulkdata(request: Request) -> Response:
    """One bulk data value of an instance, by the path its BulkDataURI names; supports Range.

    Encapsulated pixel data is served as its frames (the media types of the frames resource); values that
    are not a byte range of the stored object (nested in sequences, deflated objects) by parsing it.
    """
    study, series, sop = resource_uids(request)
    path = request.path_params["path"].strip("/")
    ctx = context(request)
    partition = await partition_key(request)
    found = await find_bulk_index(
        ctx.pool, partition, study, series or "", sop or "", original=wants_original(request)
    )
    if found is None:
        raise not_found(study, series, sop)
    instance, index = found
    entry = next((e for e in orjson.loads(index) if e[0] == path), None)
    if entry is None or FRAME_PATH_SEPARATOR in path:
        raise HTTPProblem(404, f"instance {sop} has no bulk data at {path!r}")
    offset, length = entry[1], entry[2]
    if path in PIXEL_DATA_PATHS and is_encapsulated(instance.transfer_syntax_uid):
        source = await frames.load_source(ctx.pool, partition, instance, index)
        ranked = frames.rank_frames(request, single=source.frame_count == 1)
        numbers = range(1, source.frame_count + 1)
        return await frames.frames_response(
            ctx.pool, partition, ctx.store, source, numbers, ranked, request.headers.get("range")
        )
    offer, _ = _select(request, _BULK_OFFERS)
    value: bytes | None = None
    if offset is None or length == UNDEFINED_LENGTH or instance.transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN:
        value = await _parsed_value(ctx.store, instance, path)
        offset, length = 0, len(value)

    def body(start: int, end: int) -> AsyncIterator[bytes] | bytes:
        if value is not None:
            return value[start:end]
        return ctx.store.stream(instance.storage_key, offset + start, offset + end)

    if offer.media_type == "multipart/related":
        boundary = new_boundary()

        async def one_part() -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes] | bytes]]:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
            yield headers, body(0, length)

        return StreamingResponse(
            write_multipart(one_part(), boundary),
            media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
        )
    start, end = 0, length
    status = 200
    headers = {"Accept-Ranges": "bytes"}
    range_header = request.headers.get("range")
    byte_range = parse_range(range_header, length) if range_header else None
    if byte_range is not None:
        start, end = byte_range
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
    content = body(start, end)
    if isinstance(content, bytes):
        return Response(content, status_code=status, media_type="application/octet-stream", headers=headers)
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        content, status_code=status, media_type="application/octet-stream", headers=headers
    )


async def _parsed_value(store: BlobStore, instance: StoredInstance, path: str) -> bytes:
    try:
        data = await store.read(instance.storage_key)
    except BlobNotFoundError as exc:
        raise HTTPProblem(404, f"instance {instance.sop_instance_uid} was deleted while it was read") from exc
    try:
        return await asyncio.to_thread(bulk_value, data, path)
    except (KeyError, ValueError) as exc:
        raise HTTPProblem(404, f"bulk data {path!r} cannot be found in the stored object: {exc}") from exc
