"""WADO-RS frames (PS3.18 10.4.1.1.3): pixel data frames as stored or transcoded, one ranged read each.

Media types are those of PS3.18 8.7.3.5 (Tables 8.7.3-4/-5): application/octet-stream for native frames
(and, with transfer-syntax=*, for compressed ones as stored), image/jpeg, image/jls, image/jp2, image/jpx,
image/jphc, image/dicom-rle (also its older name image/x-dicom-rle) for compressed frames. multipart/related
is the default; a single part is offered when one frame is asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicomcore.frames import (
    FRAME_PATH_SEPARATOR,
    PIXEL_DATA_PATHS,
    Extent,
    FrameListError,
    FrameTable,
    PixelDescription,
    cut_frames,
    frames_from_index,
    parse_frame_list,
)
from dicomcore.transcode import (
    MAX_TRANSCODE_SIZE,
    NATIVE_SYNTAXES,
    PixelDataError,
    TranscodeError,
    check_transcode,
    transcode_frame,
)
from dicomcore.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
from dicomweb.context import context, partition_key, uid_param
from dicomweb.errors import HTTPProblem
from dicomweb.multipart import new_boundary, write_multipart
from dicomweb.negotiation import (
    ANY_TRANSFER_SYNTAX,
    COMPRESSED_MEDIA_TYPES,
    Offer,
    Selection,
    select,
)
from dicomweb.ranges import parse_range
from dicomweb.routes.damage import damaged, still_indexed
from indexer.lookup import StoredInstance, find_bulk_index, find_metadata
from storage.base import BlobNotFoundError, BlobStore

log = logging.getLogger(__name__)
OCTET_STREAM = "application/octet-stream"
_IMAGE_TYPES = tuple(t for t in COMPRESSED_MEDIA_TYPES if t.startswith("image/"))
_PART_TYPES = (OCTET_STREAM, *_IMAGE_TYPES)
MULTIPART_OFFERS = tuple(
    Offer("multipart/related", part_type=t, transfer_syntaxes=("*",)) for t in _PART_TYPES
)
SINGLE_OFFERS = tuple(Offer(t, transfer_syntaxes=("*",)) for t in _PART_TYPES)


@dataclass(frozen=True, slots=True)
class PixelSource:
    """Everything needed to serve frames of one instance. The Image Pixel attributes (`pixel`, from the
    stored DICOM JSON) are loaded only when needed: to transcode, or to cut frames without a table."""

    instance: StoredInstance
    path: str  # the pixel data attribute, e.g. "7FE00010"
    table: FrameTable | None  # None: cut frames by parsing the object
    pixel: PixelDescription | None = None

    @property
    def frame_syntax(self) -> str:
        """The syntax frames are in when cut as stored: native little endian frames are Explicit VR
        Little Endian bytes whatever the dataset's own encoding (deflated frames are inflated)."""
        stored = self.instance.transfer_syntax_uid
        if stored in NATIVE_SYNTAXES and stored != EXPLICIT_VR_BIG_ENDIAN:
            return EXPLICIT_VR_LITTLE_ENDIAN
        return stored

    @property
    def as_stored(self) -> str:
        """What "as stored" delivers: big endian frames are never sent as such (PS3.18 native frames are
        little endian), so for them it means Explicit VR Little Endian."""
        syntax = self.frame_syntax
        return EXPLICIT_VR_LITTLE_ENDIAN if syntax == EXPLICIT_VR_BIG_ENDIAN else syntax

    @property
    def frame_count(self) -> int:
        if self.table is not None:
            return len(self.table)
        assert self.pixel is not None
        return self.pixel.number_of_frames


async def retrieve_frames(request: Request) -> Response:
    """GET .../instances/{instance}/frames/{frames}."""
    study = uid_param(request, "study")
    series = uid_param(request, "series")
    sop = uid_param(request, "instance")
    try:
        numbers = parse_frame_list(request.path_params["frames"])
    except FrameListError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    ranked = rank_frames(request, single=len(numbers) == 1)
    ctx = context(request)
    partition = await partition_key(request)
    found = await find_bulk_index(ctx.pool, partition, study, series, sop)
    if found is None:
        raise HTTPProblem(404, f"instance {sop} not found")
    source = await load_source(ctx.pool, partition, *found)
    missing = [n for n in numbers if n > source.frame_count]
    if missing:
        raise HTTPProblem(
            404, f"frame {missing[0]} does not exist: instance {sop} has {source.frame_count} frame(s)"
        )
    return await frames_response(
        ctx.pool, partition, ctx.store, source, numbers, ranked, request.headers.get("range")
    )


def rank_frames(request: Request, *, single: bool) -> list[Selection]:
    offers = MULTIPART_OFFERS + (SINGLE_OFFERS if single else ())
    produced = ", ".join(f'multipart/related; type="{t}"' for t in _PART_TYPES)
    singles = "" if single else " (single part only when one frame is asked for)"
    return select(offers, request.headers.get("accept"), available=produced + singles)


async def load_source(
    pool: asyncpg.Pool, partition: int, instance: StoredInstance, bulk_index: bytes
) -> PixelSource:
    """The pixel data of an indexed instance from its bulk data index; 400 when it has none (as the
    rendered resources answer). Without a frame table the pixel attributes are loaded at once."""
    entries = orjson.loads(bulk_index)
    names = {e[0] for e in entries if FRAME_PATH_SEPARATOR not in e[0]}
    path = next((p for p in PIXEL_DATA_PATHS if p in names), None)
    if path is None:
        raise HTTPProblem(400, f"instance {instance.sop_instance_uid} has no pixel data, so no frames")
    source = PixelSource(instance, path, frames_from_index(entries, path))
    vr = next(e[3] for e in entries if e[0] == path)
    if source.table is not None and instance.transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN and vr == "OW":
        # 8-bit samples in big endian OW are swapped in 16-bit words, so no byte range is a frame; tables
        # made before ingest knew that are ignored (cut_frames swaps the value back)
        source = await with_pixel(pool, partition, source)
        if source.pixel is not None and source.pixel.bits_allocated == 8:
            source = replace(source, table=None)
    return source if source.table is not None else await with_pixel(pool, partition, source)


async def with_pixel(pool: asyncpg.Pool, partition: int, source: PixelSource) -> PixelSource:
    """The source with its Image Pixel attributes, read from the stored DICOM JSON."""
    if source.pixel is not None:
        return source
    instance = source.instance
    rows = await find_metadata(
        pool, partition, instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
    )
    pixel = PixelDescription.from_json(orjson.loads(rows[0][3])) if rows else None
    if pixel is None:
        raise HTTPProblem(
            400,
            f"instance {instance.sop_instance_uid} lacks the Image Pixel attributes needed to find frames",
        )
    return replace(source, pixel=pixel)


def _targets(selection: Selection, as_stored: str) -> list[str]:
    """Transfer syntaxes that satisfy one ranked selection, preferred first."""
    payload = selection.offer.payload_type
    asked = selection.transfer_syntax
    explicit = selection.media_range.params.get("transfer-syntax")
    if payload == OCTET_STREAM:
        return [as_stored] if asked in (None, ANY_TRANSFER_SYNTAX) else [asked]  # type: ignore[list-item]
    allowed = COMPRESSED_MEDIA_TYPES[payload]
    if asked == ANY_TRANSFER_SYNTAX or explicit is None:
        # any syntax of this media type (explicit "*"), or its default: the stored one first when it is of
        # this type, so lossy frames are not re-encoded (PS3.18 8.7.3.4 lets the server keep them)
        preferred = [as_stored] if as_stored in allowed else []
        rest = list(allowed) if asked == ANY_TRANSFER_SYNTAX else [asked]
        return preferred + [ts for ts in rest if ts not in preferred and ts is not None]
    return [asked] if asked in allowed else []  # type: ignore[list-item]


def as_stored_first(ranked: Sequence[Selection], source: PixelSource) -> tuple[Selection, str] | None:
    """The best choice when it is the frames as stored (no pixel attributes needed to know), else None."""
    for selection in ranked:
        for target in _targets(selection, source.as_stored):
            return (selection, target) if target == source.frame_syntax else None
    return None


def choose(ranked: Sequence[Selection], source: PixelSource) -> tuple[Selection, str]:
    """The best acceptable (selection, transfer syntax) this instance's frames can be delivered in;
    `source` must have its pixel attributes."""
    reasons: list[str] = []
    for selection in ranked:
        for target in _targets(selection, source.as_stored):
            if target == source.frame_syntax:
                return selection, target
            try:
                check_transcode(source.frame_syntax, target, source.pixel)
            except TranscodeError as exc:
                reasons.append(f"{selection.offer.payload_type} {target}: {exc}")
                continue
            return selection, target
    detail = "; ".join(dict.fromkeys(reasons)) or "no transfer syntax of the accepted media types applies"
    raise HTTPProblem(
        406,
        f"cannot deliver frames of instance {source.instance.sop_instance_uid} (stored as "
        f"{source.instance.transfer_syntax_uid}) in any accepted transfer syntax: {detail}",
    )


async def frames_response(
    pool: asyncpg.Pool,
    partition: int,
    store: BlobStore,
    source: PixelSource,
    numbers: Sequence[int],
    ranked: Sequence[Selection],
    range_header: str | None = None,
) -> Response:
    """The frames as the best acceptable representation; the first frame is produced before answering so
    that corrupt data gives a clear error instead of a truncated body. A single part honours `Range`."""
    fast = as_stored_first(ranked, source)
    if fast is None:
        source = await with_pixel(pool, partition, source)
        selection, target = choose(ranked, source)
    else:
        selection, target = fast
    iterator = _produce(store, source, numbers, target)
    try:
        first = await anext(iterator)
    except _ObjectGone as exc:
        if await still_indexed(pool, partition, source.instance):
            raise damaged(source.instance) from exc
        raise HTTPProblem(404, "the instance was deleted while it was read") from exc
    except (PixelDataError, TranscodeError) as exc:
        hint = "; transfer-syntax=* delivers them as stored" if target != source.frame_syntax else ""
        what = f"frames of instance {source.instance.sop_instance_uid}"
        raise HTTPProblem(406, f"{what} cannot be delivered as {target}: {exc}{hint}") from exc
    part_type = selection.offer.payload_type
    content_type = f"{part_type}; transfer-syntax={target}"
    if selection.offer.media_type != "multipart/related":
        headers = {"Accept-Ranges": "bytes"}
        byte_range = parse_range(range_header, len(first)) if range_header else None
        if byte_range is None:
            return Response(first, media_type=content_type, headers=headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(first)}"
        return Response(first[start:end], status_code=206, media_type=content_type, headers=headers)
    boundary = new_boundary()

    async def parts() -> AsyncIterator[tuple[dict[str, str], bytes]]:
        frame: bytes | None = first
        while frame is not None:
            yield {"Content-Type": content_type, "Content-Length": str(len(frame))}, frame
            try:
                frame = await anext(iterator)
            except StopAsyncIteration:
                frame = None
            except (PixelDataError, TranscodeError, HTTPProblem, _ObjectGone) as exc:
                # the status line is sent: end the body early rather than send a wrong frame
                log.warning("frames of %s cut short: %s", source.instance.sop_instance_uid, exc)
                return

    return StreamingResponse(
        write_multipart(parts(), boundary),
        media_type=f'multipart/related; type="{part_type}"; boundary={boundary}',
    )


async def _produce(
    store: BlobStore, source: PixelSource, numbers: Sequence[int], target: str
) -> AsyncIterator[bytes]:
    """Each asked frame in `target`, one at a time (transcoding in a worker thread)."""
    key = source.instance.storage_key
    if source.table is None:
        if source.instance.size > MAX_TRANSCODE_SIZE:
            raise PixelDataError(
                f"its frames were not located at ingest and the object ({source.instance.size} bytes) is too "
                "large to parse per request"
            )
        data = await _read_all(store, key)
        raw_frames = await asyncio.to_thread(_cut, data, source, numbers)
        del data
        frames: AsyncIterator[bytes] = _iterate(raw_frames)
    else:
        frames = _ranged_frames(store, key, source.table, numbers)
    try:
        async for frame in frames:
            if target == source.frame_syntax:
                yield frame
            else:
                yield await asyncio.to_thread(
                    transcode_frame, frame, source.frame_syntax, source.pixel, target
                )
    except ShortObjectError as exc:
        log.error("frames of instance %s: %s", source.instance.sop_instance_uid, exc)
        raise HTTPProblem(
            500,
            f"instance {source.instance.sop_instance_uid} is damaged: its stored object is shorter than "
            "recorded at ingest",
        ) from exc


async def _iterate(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def _cut(data: bytes, source: PixelSource, numbers: Sequence[int]) -> list[bytes]:
    assert source.pixel is not None  # load_source reads it when there is no table
    try:
        return cut_frames(data, source.path, source.pixel, numbers)
    except ValueError as exc:
        raise PixelDataError(str(exc)) from exc


async def _ranged_frames(
    store: BlobStore, key: str, table: FrameTable, numbers: Sequence[int]
) -> AsyncIterator[bytes]:
    for n in numbers:
        yield await read_frame(store, key, table[n - 1])


class ShortObjectError(Exception):
    """A stored object shorter than the frame table recorded at ingest says: it was cut after ingest."""


async def read_frame(store: BlobStore, key: str, pieces: list[Extent]) -> bytes:
    """One frame with one ranged read: the span from its first to its last piece (fragments are apart only
    by their 8-byte item headers), then the pieces cut out of it."""
    start = pieces[0][0]
    end = pieces[-1][0] + pieces[-1][1]
    try:
        span = await store.read(key, start, end)
    except BlobNotFoundError as exc:
        raise _ObjectGone(key) from exc
    if len(span) != end - start:  # frames are not hashed (docs/integrity.md), but a cut object shows here
        raise ShortObjectError(
            f"object {key} ends before byte {end} of its frame table ({len(span)} of bytes {start}..{end})"
        )
    if len(pieces) == 1:
        return span
    return b"".join(span[offset - start : offset - start + length] for offset, length in pieces)


async def _read_all(store: BlobStore, key: str) -> bytes:
    try:
        return await store.read(key)
    except BlobNotFoundError as exc:
        raise _ObjectGone(key) from exc


class _ObjectGone(Exception):
    """The object of a frame's instance is not in the store: deleted while it was read, or missing (the
    first frame tells which, before answering; later ones can only end the response)."""
