"""Keep-alive connections spread evenly over the worker processes.

Workers share one listening socket and an event loop accepts every connection pending when it wakes, so
clients that connect at once often land on one worker: four clients on two workers were split 2+2 in 10
of 30 tries, 3+1 in 12 and 4+0 in 8, and a 4+0 split leaves one core idle for as long as the clients keep
their connections. Each worker therefore counts the clients it served in the last few seconds and writes
that count where the others read it (the supervisor's directory); a worker holding two or more clients more
than the least busy one answers its next response with `Connection: close` and then stops for a few
milliseconds: the client reconnects at once (any HTTP/1.1 client does), and while this worker's event loop
is held another worker accepts the connection (measured: the closing worker, back in its loop first, took
the new connection nearly every time). At most one connection a refresh interval is moved, until the counts
differ by at most one; nothing is moved once they do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

WINDOW = 1.0  # seconds after its last response for which a client counts as connected (and while a
# request of it runs): a client that sent one request and left counts that long
REFRESH = 0.1  # seconds between writes of this worker's count and reads of the others'; at most one
# connection is closed per such interval
HANDOFF = 0.005  # seconds a worker stops after closing a connection, for another worker to accept it
_PREFIX = "connections-"  # then the worker's pid; the file holds "<clients> <time.time() of writing>"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ConnectionBalancer:
    """This worker's view: its own clients and the other workers' latest counts."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._directory = directory
        self._own = directory / f"{_PREFIX}{os.getpid()}"
        self._clock = clock
        self._clients: dict[tuple[str, int], float] = {}  # client -> time of its latest request or response
        self._others: list[int] = []
        self._refreshed = self._closed = float("-inf")
        self._first: float | None = None  # this worker's first response
        self._running: dict[tuple[str, int], int] = {}  # client -> its requests in progress
        self._write()  # an idle worker is one the others must see, with no clients

    def started(self, client: tuple[str, int]) -> None:
        """A request of `client` began; it counts while it runs (long requests outlast the window)."""
        self._running[client] = self._running.get(client, 0) + 1
        self._clients[client] = self._clock()

    def finished(self, client: tuple[str, int]) -> None:
        left = self._running.pop(client, 1) - 1
        if left > 0:
            self._running[client] = left

    def should_close(self, client: tuple[str, int]) -> bool:
        """Record a response to `client`; whether it should close its connection after it."""
        now = self._clock()
        self._clients[client] = now
        if self._first is None:
            self._first = now
        if now - self._refreshed >= REFRESH:
            self._refresh(now)
        if now - self._first < 2 * REFRESH:
            return False  # the others' counts may not have caught up with clients that came at once
        if self._others and len(self._clients) - min(self._others) >= 2 and now - self._closed >= REFRESH:
            del self._clients[client]  # it reconnects, maybe here again; it counts anew then
            self._closed = now
            return True
        return False

    def _refresh(self, now: float) -> None:
        self._refreshed = now
        for client, seen in list(self._clients.items()):
            if now - seen > WINDOW and client not in self._running:
                del self._clients[client]
        try:
            self._write()
            self._others = self._read_others()
        except (OSError, ValueError):  # a worker starting or stopping meanwhile: keep the last view
            pass

    def _write(self) -> None:
        self._own.write_text(f"{len(self._clients)} {time.time()}")

    def _read_others(self) -> list[int]:
        """The other live workers' client counts; a count written longer than a window ago is 0 (its
        clients are gone and no request came to update it)."""
        counts, wall = [], time.time()
        for entry in os.scandir(self._directory):
            if not entry.name.startswith(_PREFIX) or entry.path == str(self._own):
                continue
            if not Path(f"/proc/{entry.name[len(_PREFIX) :]}").exists():
                continue  # a worker that is gone (the supervisor starts another, with a file of its own)
            count, written = Path(entry.path).read_text().split()
            counts.append(int(count) if wall - float(written) <= WINDOW + REFRESH else 0)
        return counts


class BalanceMiddleware:
    """ASGI middleware adding `Connection: close` where the balancer says so (HTTP only)."""

    def __init__(self, app: ASGIApp, balancer: ConnectionBalancer) -> None:
        self.app = app
        self.balancer = balancer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client:
            await self.app(scope, receive, send)
            return

        closing = False

        async def send_closing(message: Message) -> None:
            nonlocal closing
            if message["type"] == "http.response.start" and self.balancer.should_close(tuple(client)):
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                closing = True
            await send(message)

        self.balancer.started(tuple(client))
        try:
            await self.app(scope, receive, send_closing)
        finally:
            self.balancer.finished(tuple(client))
        if closing:
            time.sleep(HANDOFF)  # noqa: ASYNC251  (on purpose: this loop must not accept the new connection)
