"""dicomweb.routing.SegmentRouter answers every request exactly as Starlette's Router over the same routes."""

from __future__ import annotations

import asyncio

import httpx
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route, Router

from dicomweb.app import dicomweb_routes
from dicomweb.routes.access import access_routes
from dicomweb.routing import SegmentRouter, first_segment


async def echo(request: Request) -> PlainTextResponse:
    route = request.scope["route"]
    return PlainTextResponse(
        f"{request.scope.get('root_path')} {route.path} {sorted(request.path_params.items())}"
    )


def echo_routes(routes: list[BaseRoute]) -> list[BaseRoute]:
    """The archive's paths and methods, each answered by `echo` (which route matched, with what)."""
    return [Route(r.path, echo, methods=sorted(r.methods or ())) for r in routes if isinstance(r, Route)]


def app(router: type[Router]) -> Starlette:
    routes: list[BaseRoute] = [Route("/health/live", echo, methods=["GET"]), *echo_routes(access_routes())]
    for root in ("/v1/partitions/{partition}", "/v2/partitions/{partition}", "/v1", "/v2"):
        routes.append(Mount(root, app=router(echo_routes(dicomweb_routes()))))
    built = Starlette()
    built.router = router(routes)
    return built


class Client:
    """Requests straight into an ASGI app (no server), from synchronous tests."""

    def __init__(self, asgi: Starlette) -> None:
        self.transport = httpx.ASGITransport(app=asgi)

    def request(self, method: str, path: str) -> httpx.Response:
        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=self.transport, base_url="http://testserver") as client:
                return await client.request(method, path)

        return asyncio.run(send())

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def put(self, path: str) -> httpx.Response:
        return self.request("PUT", path)


PLAIN, SEGMENTED = Client(app(Router)), Client(app(SegmentRouter))
SEGMENTS = [
    "v1", "v2", "partitions", "p1", "studies", "series", "instances", "1.2.3", "metadata", "frames", "1,2",
    "rendered", "thumbnail", "bulkdata", "workitems", "state", "cancelrequest", "subscribers", "AE",
    "suspend", "changefeed", "latest", "extendedquerytags", "errors", "operations", "export", "tokens",
    "audit", "datarequests", "health", "live", "", "x",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=9),
    st.booleans(),
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
)
def test_same_answer_as_starlettes_router(segments: list[str], slash: bool, method: str) -> None:
    path = "/" + "/".join(segments) + ("/" if slash and segments else "")
    assume(not path.startswith("//"))  # a URL's authority, not a path
    plain = PLAIN.request(method, path)
    segmented = SEGMENTED.request(method, path)
    assert (segmented.status_code, segmented.text, segmented.headers.get("location")) == (
        plain.status_code,
        plain.text,
        plain.headers.get("location"),
    )
    if plain.status_code == 405:  # every method of the path; the plain Router names the first route's
        assert set(plain.headers["allow"].split(", ")) <= set(segmented.headers["allow"].split(", "))


def test_examples() -> None:
    response = SEGMENTED.put("/v2/partitions/p1/workitems/1.2.3/state")
    assert response.status_code == 200
    assert (
        response.text
        == "/v2/partitions/p1 /workitems/{workitem}/state [('partition', 'p1'), ('workitem', '1.2.3')]"
    )
    assert (
        SEGMENTED.put("/v2/workitems/1.2.3").status_code == 405
    )  # a partial match: the path, not the method
    assert SEGMENTED.get("/v2/nothing").status_code == 404
    # RFC 9110 15.5.6: a 405's Allow names every method the path takes, over all the routes that serve it
    assert SEGMENTED.put("/v2/studies").headers["allow"] == "GET, HEAD, POST"
    assert SEGMENTED.request("PATCH", "/v2/studies/1.2.3").headers["allow"] == "DELETE, GET, HEAD, POST"
    assert SEGMENTED.put("/v2/changefeed").headers["allow"] == "GET, HEAD"
    assert SEGMENTED.get("/v2/studies/").headers["location"].endswith("/v2/studies")


def test_first_segment() -> None:
    assert first_segment("/workitems/{workitem}") == "workitems"
    assert first_segment("/studies") == "studies"
    assert first_segment("/{anything}/x") is None
    assert first_segment("") == ""
