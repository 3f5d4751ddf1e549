"""STOW-RS: POST /studies[/{study}] (PS3.18 10.5)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response

from archive.ingest import FailureReason, Ingestor, StoreOutcome
from dicomweb.context import context, partition_key, service_root, uid_param
from dicomweb.errors import HTTPProblem
from dicomweb.metrics import count_stored
from dicomweb.multipart import MultipartError, PartTooLargeError, SpooledBody, iter_parts
from dicomweb.negotiation import NegotiationError, UnsupportedMediaTypeError, parse_stow_content_type

DICOM_JSON = "application/dicom+json"


async def store_instances(request: Request) -> Response:
    study = uid_param(request, "study") if "study" in request.path_params else None
    try:
        kind = parse_stow_content_type(request.headers.get("content-type"))
    except UnsupportedMediaTypeError as exc:
        raise HTTPProblem(415, f'{exc}; send multipart/related; type="application/dicom"') from exc
    except (NegotiationError, MultipartError) as exc:
        raise HTTPProblem(400, f"malformed Content-Type: {exc}") from exc
    ctx = context(request)
    ingestor = Ingestor(ctx.pool, ctx.store, await partition_key(request, create=True), expected_study=study)
    body_error: str | None = None
    too_large = False
    try:
        if kind.boundary is None:
            await _store_single(request, ingestor, ctx.settings.max_instance_size)
        else:
            async for part, body in iter_parts(
                request.stream(), kind.boundary, max_part_size=ctx.settings.max_instance_size
            ):
                part_type = (part.content_type or kind.part_type).split(";", 1)[0].strip().lower()
                if part_type != "application/dicom":
                    body.close()
                    ingestor.outcomes.append(
                        StoreOutcome(
                            failure=FailureReason.INVALID_INSTANCE,
                            message=f"part {part.index} has unsupported Content-Type {part_type!r}",
                        )
                    )
                    continue
                await ingestor.add(body)  # the ingestor closes the body
    except PartTooLargeError as exc:
        body_error, too_large = str(exc), True
    except MultipartError as exc:
        body_error = f"malformed multipart body: {exc}"
    finally:
        # whatever happened to the body, what was stored gets indexed (or its objects removed)
        outcomes = await ingestor.finish()
        count_stored(outcomes)
    if too_large:
        raise HTTPProblem(413, body_error or "an instance is too large")
    if body_error is not None:
        if not any(o.failure is None for o in outcomes):
            raise HTTPProblem(400, body_error)
        outcomes.append(StoreOutcome(failure=FailureReason.PROCESSING_FAILURE, message=body_error))
    if not outcomes:
        # a well-formed multipart body without parts: Azure's "no content was provided" (204, no body)
        return Response(status_code=204)
    return _store_response(service_root(request), study, outcomes)


async def _store_single(request: Request, ingestor: Ingestor, limit: int) -> None:
    """A single-part application/dicom body: spool it (bounded memory), then store it."""
    spool = SpooledBody()
    try:
        async for chunk in _chunks(request):
            if spool.size + len(chunk) > limit:
                raise HTTPProblem(413, f"the instance exceeds the maximum size of {limit} bytes")
            spool.write(chunk)
        if spool.size == 0:
            raise HTTPProblem(400, "the request body is empty")
    except BaseException:
        spool.close()
        raise
    spool.rewind()
    await ingestor.add(spool)  # the ingestor closes it


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def _store_response(root: str, study: str | None, outcomes: list[StoreOutcome]) -> Response:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) and its status code."""
    referenced, failed = [], []
    for o in outcomes:
        item: dict[str, dict] = {}
        if o.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
        if o.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
        if o.failure is None:
            item["00081190"] = {
                "vr": "UR",
                "Value": [
                    f"{root}/studies/{o.study_instance_uid}/series/{o.series_instance_uid}"
                    f"/instances/{o.sop_instance_uid}"
                ],
            }
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [int(o.failure)]}
            failed.append(item)
    body: dict[str, dict] = {}
    studies = {o.study_instance_uid for o in outcomes if o.failure is None}
    # the study's URL once something is stored in it (Azure's rule): a refused store names no study
    if studies and (study is not None or len(studies) == 1):
        body["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study or studies.pop()}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else (202 if referenced else 409)
    headers = {}
    messages = sorted({o.message for o in outcomes if o.failure is not None and o.message})
    if messages:
        # Failure reasons are codes; say in words why, as a Warning header (RFC 7234 form, code 299)
        headers["Warning"] = ", ".join(f'299 dicomweb "{_header_text(m)}"' for m in messages[:5])
    return Response(orjson.dumps(body), status_code=status, media_type=DICOM_JSON, headers=headers)


def _header_text(message: str) -> str:
    """A message made safe for a quoted header value (ASCII, no quotes or line breaks)."""
    text = message.encode("ascii", "replace").decode("ascii")
    return text.replace('"', "'").replace("\r", " ").replace("\n", " ")[:300]
