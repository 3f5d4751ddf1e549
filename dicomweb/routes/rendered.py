"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3-4, 8.3.5.1): consumer images of instances.

Instance and frame level answer one image; study and series level answer multipart/related with one
rendered image per instance (its first frame), in series/instance order, rendered one at a time. Thumbnails
are one image standing for the resource (indexer.thumbnails.representative), cached in PostgreSQL.
Rendering runs in a worker thread; the stored object is read whole when small, else lazily by range.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicomcore.frames import FrameListError, parse_frame_list
from dicomcore.rangefile import RangeFile
from dicomcore.render import (
    DEFAULT_QUALITY,
    MEDIA_TYPES,
    FrameOutOfRangeError,
    NoPixelDataError,
    RenderError,
    RenderOptions,
    UndecodableError,
    Viewport,
    parse_annotation,
    parse_quality,
    parse_viewport,
    parse_window,
    render,
)
from dicomweb.caching import cache_headers, make_etag, matches_if_none_match, not_modified
from dicomweb.context import context, not_found, partition_key, resource_uids, service_root
from dicomweb.errors import HTTPProblem
from dicomweb.multipart import new_boundary, write_multipart
from dicomweb.negotiation import Offer, select
from indexer.lookup import StoredInstance, find_instances
from indexer.thumbnails import cached_thumbnail, find_image, representative, store_thumbnail
from indexer.versions import scope_version
from storage.base import BlobNotFoundError, BlobStore

# Objects up to this size are fetched in one read; larger ones through RangeFile, which reads the header
# and only the frames rendered.
WHOLE_READ_LIMIT = 4 << 20
THUMBNAIL_VIEWPORT = Viewport(128, 128)
# Unregistered names clients send for a registered type: Azure's DICOM service, and the Postman collection
# Microsoft publishes for it, ask for `application/jpeg`; Azure answers image/jpeg, and so do we. Only an
# Accept naming the alias exactly selects it (Offer.named_only), so wildcards keep their meaning.
ALIASES = {"application/jpeg": "image/jpeg"}
_SINGLE_OFFERS = (*(Offer(t) for t in MEDIA_TYPES), *(Offer(a, named_only=True) for a in ALIASES))
_MULTIPART_OFFERS = (
    *(Offer("multipart/related", part_type=t) for t in MEDIA_TYPES),
    *(Offer("multipart/related", part_type=a, named_only=True) for a in ALIASES),
)
_RENDERED_PARAMS = {"window", "viewport", "quality", "annotation", "accept", "charset"}
_THUMBNAIL_PARAMS = {"viewport", "quality", "accept", "charset"}


def _select(request: Request, offers: tuple[Offer, ...]) -> str:
    """The image type to answer (an alias resolved to its registered name). PS3.18 8.7.8.1: the `accept`
    query parameter first, then the Accept header."""
    offer = select(offers, request.headers.get("accept"), request.query_params.getlist("accept"))[0].offer
    wanted = offer.part_type or offer.media_type
    return ALIASES.get(wanted, wanted)


def _frames(request: Request) -> list[int] | None:
    """The frame list of a .../frames/{list}/... path, None for other paths."""
    if "frames" not in request.path_params:
        return None
    try:
        return parse_frame_list(request.path_params["frames"])
    except FrameListError as exc:
        raise HTTPProblem(400, str(exc)) from exc


def _options(request: Request, media_type: str, allowed: set[str]) -> RenderOptions:
    params = request.query_params
    unknown = sorted(set(params.keys()) - allowed)
    if unknown:
        raise HTTPProblem(
            400, f"unknown query parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    try:
        window = parse_window(params["window"]) if "window" in params else None
        viewport = parse_viewport(params["viewport"]) if "viewport" in params else None
        quality = parse_quality(params["quality"]) if "quality" in params else None
        annotations = parse_annotation(params["annotation"]) if "annotation" in params else ()
    except ValueError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    return RenderOptions(media_type, window, viewport, quality or DEFAULT_QUALITY, annotations)


async def _open(store: BlobStore, instance: StoredInstance) -> BinaryIO:
    if instance.size <= WHOLE_READ_LIMIT:
        return io.BytesIO(await store.read(instance.storage_key))
    loop = asyncio.get_running_loop()
    key = instance.storage_key

    def fetch(start: int, end: int) -> bytes:  # called from the render thread
        return asyncio.run_coroutine_threadsafe(store.read(key, start, end), loop).result()

    return io.BufferedReader(RangeFile(fetch, instance.size, name=key), 64 * 1024)


async def render_instance(
    store: BlobStore, instance: StoredInstance, frames: list[int] | None, options: RenderOptions
) -> bytes:
    """Render off the event loop; rendering failures become the 4xx the standard's error table suggests."""
    sop = instance.sop_instance_uid
    reader = store.blocking_reader() if instance.size <= WHOLE_READ_LIMIT else None
    try:
        if reader is not None:  # the local store: read and render in one thread hop, not two
            return await asyncio.to_thread(_read_and_render, reader, instance.storage_key, frames, options)
        fp = await _open(store, instance)
        return await asyncio.to_thread(render, fp, frames, options)
    except BlobNotFoundError as exc:
        raise HTTPProblem(404, f"instance {sop} not found") from exc
    except NoPixelDataError as exc:
        raise HTTPProblem(
            400, f"instance {sop} has no pixel data, so it has no rendered representation"
        ) from exc
    except FrameOutOfRangeError as exc:
        raise HTTPProblem(404, f"instance {sop}: {exc}") from exc
    except UndecodableError as exc:
        raise HTTPProblem(422, f"instance {sop} cannot be rendered: {exc}") from exc
    except RenderError as exc:
        raise HTTPProblem(400, f"instance {sop}: {exc}") from exc


def _read_and_render(
    reader: Callable[[str], bytes], key: str, frames: list[int] | None, options: RenderOptions
) -> bytes:
    return render(io.BytesIO(reader(key)), frames, options)


def _variant(frames: list[int] | None, options: RenderOptions) -> str:
    """What a cached thumbnail or an ETag depends on besides the stored object."""
    return "|".join(
        str(part)
        for part in (
            options.media_type,
            ",".join(map(str, frames)) if frames else "",
            options.window,
            options.viewport,
            options.quality,
            ",".join(options.annotations),
        )
    )


async def rendered(request: Request) -> Response:
    """.../rendered at study, series, instance level and .../frames/{list}/rendered."""
    study, series, sop = resource_uids(request)
    frames = _frames(request)
    ctx = context(request)
    partition = await partition_key(request)
    if sop is None:
        return await _rendered_many(request, partition, study, series)
    media_type = _select(request, _SINGLE_OFFERS)
    options = _options(request, media_type, _RENDERED_PARAMS)
    found = await find_image(ctx.pool, partition, study, series or "", sop)
    if found is None:
        raise not_found(study, series, sop)
    instance, _, _ = found
    etag = make_etag(instance.storage_key, _variant(frames, options))
    if matches_if_none_match(request, etag):
        return not_modified(etag)
    body = await render_instance(ctx.store, instance, frames, options)
    return Response(body, media_type=media_type, headers=cache_headers(etag))


async def _rendered_many(request: Request, partition: int, study: str, series: str | None) -> Response:
    """A study or series: multipart/related, one rendered image (first frame) per instance with pixel data;
    instances without pixel data are left out, as they have no rendered representation."""
    part_type = _select(request, _MULTIPART_OFFERS)
    options = _options(request, part_type, _RENDERED_PARAMS)
    ctx = context(request)
    version = await scope_version(ctx.pool, partition, study, series)
    if version is None:
        raise not_found(study, series, None)
    etag = make_etag(version, _variant(None, options), service_root(request))
    if matches_if_none_match(request, etag):
        return not_modified(etag)
    instances = await find_instances(ctx.pool, partition, study, series)
    if not instances:
        raise not_found(study, series, None)
    root = service_root(request)
    boundary = new_boundary()
    single = RenderOptions(part_type, options.window, options.viewport, options.quality, options.annotations)

    async def parts() -> AsyncIterator[tuple[dict[str, str], AsyncIterator[bytes]]]:
        for instance in instances:
            try:
                body = await render_instance(ctx.store, instance, [1], single)
            except HTTPProblem:
                continue  # no pixel data, undecodable or deleted meanwhile: no rendered representation
            headers = {
                "Content-Type": part_type,
                "Content-Length": str(len(body)),
                "Content-Location": f"{root}/studies/{instance.study_instance_uid}/series/"
                f"{instance.series_instance_uid}/instances/{instance.sop_instance_uid}/rendered",
            }
            yield headers, _once(body)

    return StreamingResponse(
        write_multipart(parts(), boundary),
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
        headers=cache_headers(etag),
    )


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def thumbnail(request: Request) -> Response:
    """.../thumbnail at study, series, instance and frame level: a 128x128 (or `viewport`) image of the
    representative frame, rendered once and then served from the thumbnail table."""
    study, series, sop = resource_uids(request)
    frames = _frames(request)
    if frames is not None and len(frames) != 1:
        raise HTTPProblem(400, "a thumbnail stands for one frame; name exactly one")
    media_type = _select(request, _SINGLE_OFFERS)
    options = _options(request, media_type, _THUMBNAIL_PARAMS)
    if options.viewport is None:
        options = RenderOptions(media_type, None, THUMBNAIL_VIEWPORT, options.quality)
    ctx = context(request)
    partition = await partition_key(request)
    if sop is None:
        found = await representative(ctx.pool, partition, study, series)
    else:
        found = await find_image(ctx.pool, partition, study, series or "", sop)
    if found is None:
        raise not_found(study, series, sop)
    instance, instance_key, number_of_frames = found
    frame = frames[0] if frames else (number_of_frames + 1) // 2  # the middle frame of a multi-frame image
    variant = _variant([frame], options)
    etag = make_etag(instance.storage_key, variant)
    if matches_if_none_match(request, etag):
        return not_modified(etag)
    body = await cached_thumbnail(ctx.pool, instance_key, variant)
    if body is None:
        body = await render_instance(ctx.store, instance, [frame], options)
        await store_thumbnail(ctx.pool, instance_key, variant, body)
    return Response(body, media_type=media_type, headers=cache_headers(etag))
