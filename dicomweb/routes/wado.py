"""WADO-RS: instances, metadata and bulk data of a study, series or instance (PS3.18 10.4)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicomweb.context import context, partition_key, service_root, uid_param
from dicomweb.errors import HTTPProblem
from dicomweb.multipart import new_boundary, write_multipart
from dicomweb.negotiation import ANY_TRANSFER_SYNTAX, NegotiationError, Offer, negotiate
from indexer.lookup import StoredInstance, find_bulk_index, find_instances, find_metadata
from storage.base import BlobNotFoundError, BlobStore

DICOM_JSON = "application/dicom+json"

# Until transcoding exists (WADO-RS issue), an instance is delivered in the syntax it is stored in; an
# Accept that names another syntax gets 406.
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


def _scope(request: Request) -> tuple[str, str | None, str | None]:
    study = uid_param(request, "study")
    series = uid_param(request, "series") if "series" in request.path_params else None
    sop = uid_param(request, "instance") if "instance" in request.path_params else None
    return study, series, sop


def _not_found(study: str, series: str | None, sop: str | None) -> HTTPProblem:
    what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
    return HTTPProblem(404, f"{what} not found")


def _select(request: Request, offers: tuple[Offer, ...]) -> tuple[Offer, str | None]:
    try:
        selection = negotiate(request.headers.get("accept"), offers)
    except NegotiationError as exc:
        raise HTTPProblem(400, f"malformed Accept header: {exc}") from exc
    if selection is None:
        produced = ", ".join(
            o.media_type + (f'; type="{o.part_type}"' if o.part_type else "") for o in offers
        )
        raise HTTPProblem(
            406,
            f"cannot produce any media type the Accept header allows; available: {produced} "
            "in the stored transfer syntax (transfer-syntax=*)",
        )
    return selection.offer, selection.transfer_syntax


def _check_syntax(requested: str | None, instance: StoredInstance) -> None:
    if requested in (None, ANY_TRANSFER_SYNTAX) or requested == instance.transfer_syntax_uid:
        return
    raise HTTPProblem(
        406,
        f"instance {instance.sop_instance_uid} is stored as {instance.transfer_syntax_uid}; "
        f"transcoding to {requested} is not available (ask for transfer-syntax=*)",
    )


async def retrieve(request: Request) -> Response:
    """Study, series or instance as multipart/related application/dicom (or one application/dicom)."""
    study, series, sop = _scope(request)
    offers = (_MULTIPART_DICOM, _SINGLE_DICOM) if sop else (_MULTIPART_DICOM,)
    offer, syntax = _select(request, offers)
    ctx = context(request)
    instances = await find_instances(ctx.pool, await partition_key(request), study, series, sop)
    if not instances:
        raise _not_found(study, series, sop)
    # A request without transfer-syntax means the PS3.18 default (Explicit VR Little Endian); objects
    # stored otherwise are delivered as stored until transcoding lands, rather than refused.
    if (
        syntax is not None
        and syntax != ANY_TRANSFER_SYNTAX
        and syntax != offer.effective_default_transfer_syntax
    ):
        for instance in instances:
            _check_syntax(syntax, instance)
    if offer is _SINGLE_DICOM:
        instance = instances[0]
        return StreamingResponse(
            _object(ctx.store, instance),
            media_type=f"application/dicom; transfer-syntax={instance.transfer_syntax_uid}",
            headers={"Content-Length": str(instance.size)},
        )
    boundary = new_boundary()
    root = service_root(request)

    async def parts() -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes]]]:
        for instance in instances:
            headers = {
                "Content-Type": f"application/dicom; transfer-syntax={instance.transfer_syntax_uid}",
                "Content-Length": str(instance.size),
                "Content-Location": f"{root}/studies/{instance.study_instance_uid}/series/"
                f"{instance.series_instance_uid}/instances/{instance.sop_instance_uid}",
            }
            yield headers, _object(ctx.store, instance)

    return StreamingResponse(
        write_multipart(parts(), boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


async def _object(store: BlobStore, instance: StoredInstance) -> AsyncIterator[bytes]:
    try:
        async for chunk in store.stream(instance.storage_key):
            yield chunk
    except BlobNotFoundError:
        # deleted between lookup and read: the headers are sent, so all that is left is to end the body
        return


async def metadata(request: Request) -> Response:
    """DICOM JSON of every addressed instance, from the index (no stored object is read)."""
    study, series, sop = _scope(request)
    offer, _ = _select(request, _METADATA_OFFERS)
    ctx = context(request)
    rows = await find_metadata(ctx.pool, await partition_key(request), study, series, sop)
    if not rows:
        raise _not_found(study, series, sop)
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
    return Response(body, media_type=offer.media_type)


async def bulkdata(request: Request) -> Response:
    """One bulk data value of an instance, by the path its BulkDataURI names; supports Range."""
    study, series, sop = _scope(request)
    path = request.path_params["path"].strip("/")
    ctx = context(request)
    found = await find_bulk_index(ctx.pool, await partition_key(request), study, series or "", sop or "")
    if found is None:
        raise _not_found(study, series, sop)
    instance, index = found
    entry = next((e for e in orjson.loads(index) if e[0] == path), None)
    if entry is None:
        raise HTTPProblem(404, f"instance {sop} has no bulk data at {path!r}")
    _, offset, length, _vr = entry
    if offset is None or length == 0xFFFFFFFF:
        raise HTTPProblem(
            406,
            f"bulk data {path!r} is encapsulated or nested and cannot be served as application/octet-stream "
            "yet; retrieve the instance",
        )
    offer, _ = _select(request, _BULK_OFFERS)
    if offer.media_type == "multipart/related":
        boundary = new_boundary()

        async def one_part() -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes]]]:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
            yield headers, ctx.store.stream(instance.storage_key, offset, offset + length)

        return StreamingResponse(
            write_multipart(one_part(), boundary),
            media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
        )
    start, end = 0, length
    status = 200
    headers = {"Accept-Ranges": "bytes"}
    range_header = request.headers.get("range")
    if range_header:
        start, end = _parse_range(range_header, length)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        ctx.store.stream(instance.storage_key, offset + start, offset + end),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


def _parse_range(header: str, length: int) -> tuple[int, int]:
    """A single byte range (RFC 9110 14.1.2) as [start, end); 416 when unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise HTTPProblem(
            416, "only a single bytes range is supported", headers={"Content-Range": f"bytes */{length}"}
        )
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            start, end = max(length - suffix, 0), length
        else:
            start = int(first)
            end = int(last) + 1 if last else length
    except ValueError as exc:
        raise HTTPProblem(400, f"malformed Range header {header!r}") from exc
    end = min(end, length)
    if start >= length or start >= end:
        raise HTTPProblem(
            416, f"range {header!r} is outside 0-{length}", headers={"Content-Range": f"bytes */{length}"}
        )
    return start, end
