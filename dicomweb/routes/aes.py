"""Registered DIMSE peers: POST/GET /aes, GET/PUT/DELETE /aes/{aetitle} (owners only; dimse/aes.py)."""

from __future__ import annotations

from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dicomweb.context import context
from dicomweb.errors import HTTPProblem
from dicomweb.jsonbody import json_body
from dimse.aes import AeError, check_ae_title, create_ae, delete_ae, get_ae, list_aes, parse_ae, put_ae

JSON = "application/json"


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _title(request: Request) -> str:
    try:
        return check_ae_title(request.path_params["aetitle"], "AE title")
    except AeError as exc:
        raise HTTPProblem(400, str(exc)) from exc


async def add(request: Request) -> Response:
    try:
        ae = parse_ae(await json_body(request))
    except AeError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    stored = await create_ae(context(request).pool, ae)
    if stored is None:
        raise HTTPProblem(409, f"AE {ae.ae_title!r} is registered already (a PUT replaces it)")
    return _json(stored.to_json(), 201, {"Location": f"/aes/{quote(stored.ae_title)}"})


async def list_all(request: Request) -> Response:
    return _json([ae.to_json() for ae in await list_aes(context(request).pool)])


async def get(request: Request) -> Response:
    title = _title(request)
    ae = await get_ae(context(request).pool, title)
    if ae is None:
        raise HTTPProblem(404, f"no AE {title!r} is registered")
    return _json(ae.to_json())


async def replace(request: Request) -> Response:
    title = _title(request)
    try:
        ae = parse_ae(await json_body(request), ae_title=title)
    except AeError as exc:
        raise HTTPProblem(400, str(exc)) from exc
    stored, created = await put_ae(context(request).pool, ae)
    return _json(stored.to_json(), 201 if created else 200)


async def remove(request: Request) -> Response:
    title = _title(request)
    if not await delete_ae(context(request).pool, title):
        raise HTTPProblem(404, f"no AE {title!r} is registered")
    return Response(status_code=204)


def ae_routes() -> list[BaseRoute]:
    return [
        Route("/aes", add, methods=["POST"]),
        Route("/aes", list_all, methods=["GET"]),
        Route("/aes/{aetitle}", get, methods=["GET"]),
        Route("/aes/{aetitle}", replace, methods=["PUT"]),
        Route("/aes/{aetitle}", remove, methods=["DELETE"]),
    ]
