"""QIDO-RS: search studies, series and instances (PS3.18 10.6); matching lives in indexer.qido."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from dicomweb.context import context, partition_key, service_root, uid_param
from dicomweb.errors import HTTPProblem
from dicomweb.negotiation import Offer, select
from indexer.attributes import Level
from indexer.extended_tags import query_tags
from indexer.qido import QueryError, names_extended_tags, parse_query, search_page

_OFFERS = (Offer("application/dicom+json"), Offer("application/json"))


async def _search(request: Request, level: Level) -> Response:
    study = uid_param(request, "study") if "study" in request.path_params else None
    series = uid_param(request, "series") if "series" in request.path_params else None
    selection = select(_OFFERS, request.headers.get("accept"), available="application/dicom+json")[0]
    settings = context(request).settings
    params = list(request.query_params.multi_items())
    extended = {}
    if names_extended_tags(params):
        async with context(request).pool.acquire() as conn:
            extended = await query_tags(conn)  # a few rows, read each time: other processes change them
    try:
        query = parse_query(
            level,
            params,
            study_uid=study,
            series_uid=series,
            default_limit=settings.qido_default_limit,
            max_limit=settings.qido_max_limit,
            extended=extended,
        )
    except QueryError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    key = await partition_key(request)
    async with context(request).pool.acquire() as conn:
        page = await search_page(conn, key, query, service_root(request), encoded=True)
    headers = {}
    if query.erroneous:
        # Azure's header: extended query tags used here whose indexing had errors (results may be incomplete)
        headers["erroneous-dicom-attributes"] = ",".join(query.erroneous)
    if page.more:
        # PS3.18 8.3.4.4: tell the client the page is not all there is
        headers["Warning"] = '299 dicomweb "There are additional results that can be requested"'
    return Response(orjson.dumps(page.results), media_type=selection.offer.media_type, headers=headers)


async def search_studies(request: Request) -> Response:
    return await _search(request, Level.STUDY)


async def search_series(request: Request) -> Response:
    return await _search(request, Level.SERIES)


async def search_instances(request: Request) -> Response:
    return await _search(request, Level.INSTANCE)
