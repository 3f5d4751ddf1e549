"""GET /datarequests/page: the data request workflow as one static page (HTML and JS, no build step).

The page holds no data and needs no credential; the API calls it makes carry the token the user pastes in
(kept in sessionStorage only, so it is gone when the tab closes).
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

_CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
_PAGE = resources.files("dicomweb").joinpath("static/datarequests.html")


async def page(request: Request) -> Response:
    return Response(
        _PAGE.read_bytes(),
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
    )
