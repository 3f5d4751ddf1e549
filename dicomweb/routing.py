"""Starlette's Router, dispatching on the first path segment before it tests routes.

Starlette tests every route in order with a regular expression. The archive has ~60 routes per service
root, under four mounts, so a UPS-RS request went through ~57 tests before it was handled (~10% of its CPU).
A route whose path starts with a literal segment can match only paths that start with the same segment, so
`SegmentRouter` tests only the routes of the request's first segment, in their original order. That gives
the same match and the same route as the plain Router. Whenever none of them matches, the plain Router's
handling runs unchanged (trailing slash redirects, 404), so nothing else differs.

A path that several routes serve with different methods (GET and POST /studies, GET and DELETE a study)
answers a method none of them takes with 405 and an Allow header naming every method of those routes
(RFC 9110 15.5.6); the plain Router names only the first route's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Router
from starlette.types import Receive, Scope, Send


def first_segment(path: str) -> str | None:
    """The literal first segment of a route path ("/workitems/{workitem}" -> "workitems"); None when the
    segment is (or holds) a parameter, so the route may match any first segment."""
    segment = path.lstrip("/").split("/", 1)[0]
    return None if "{" in segment else segment


class SegmentRouter(Router):
    def __init__(self, routes: Sequence[BaseRoute] | None = None, **kwargs: Any) -> None:
        super().__init__(routes, **kwargs)
        segments = {first_segment(getattr(route, "path", "{")) for route in self.routes}
        # routes without a literal first segment (none today) go into every group, in their place
        self._groups: dict[str, list[BaseRoute]] = {
            segment: [r for r in self.routes if first_segment(getattr(r, "path", "{")) in (segment, None)]
            for segment in segments
            if segment is not None
        }
        self._wildcards = [r for r in self.routes if first_segment(getattr(r, "path", "{")) is None]

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await super().app(scope, receive, send)
            return
        segment = get_route_path(scope).lstrip("/").split("/", 1)[0]
        partial: BaseRoute | None = None
        partial_scope: Scope = {}
        allowed: set[str] = set()
        for route in self._groups.get(segment, self._wildcards):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.setdefault("router", self)
                scope["route"] = route
                scope.update(child_scope)
                await route.handle(scope, receive, send)
                return
            if match is Match.PARTIAL:
                allowed.update(getattr(route, "methods", None) or ())
                if partial is None:
                    partial, partial_scope = route, child_scope
        if partial is not None and scope["type"] == "http" and allowed:
            raise HTTPException(status_code=405, headers={"Allow": ", ".join(sorted(allowed))})
        if partial is not None:
            scope.setdefault("router", self)
            scope["route"] = partial
            scope.update(partial_scope)
            await partial.handle(scope, receive, send)
            return
        await super().app(scope, receive, send)
