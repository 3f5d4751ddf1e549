"""Waking long-polling readers when entries commit, in every process that shares the database.

Writers NOTIFY on commit (changefeed.log.append); each process keeps one connection that LISTENs and wakes
its waiting readers. A reader takes `next_change()` before it queries, so an entry that commits between its
query and its wait still wakes it. Notifications can be lost while the listening connection is down, so
readers also re-check on a slow timer (`RECHECK`): a lost notification costs latency, never an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from changefeed.log import CHANNEL

log = logging.getLogger(__name__)

# longest a waiting reader goes without re-querying, whatever the notifications say
RECHECK = 5.0
_RECONNECT_MAX = 10.0


class FeedNotifier:
    """One LISTEN connection per process; readers await the next commit through it.

    `channel` defaults to the change feed's; the worklist's event delivery listens on its own.
    """

    def __init__(self, database_url: str, channel: str = CHANNEL) -> None:
        self._database_url = database_url
        self._channel = channel
        self._future: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self._channel}-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def next_change(self) -> asyncio.Future[None]:
        """A future resolved by the next notification (or reconnect) after this call."""
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    async def wait_connected(self) -> None:
        """Until the listener is up (tests, and readers that must not miss the first commit)."""
        await self._connected.wait()

    def _wake(self, *_: object) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._database_url)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._wake)
                self._connected.set()
                self._wake()  # entries may have committed while nobody listened
                delay = 0.1
                await lost.wait()
                log.warning("%s listener lost its connection; reconnecting", self._channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s listener cannot connect (%s); retrying in %.1fs", self._channel, exc, delay)
            finally:
                self._connected.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)
