"""Waking long-polling readers when entries commit, in every process that shares the database.

Writers NOTIFY on commit (changefeed.log.append); each process keeps one connection that LISTENs and wakes
its waiting readers. A reader takes `next_change()` before it queries, so an entry that commits between its
query and its wait still wakes it. Notifications can be lost while the listening connection is down, so
readers also re-check on a slow timer (`RECHECK`): a lost notification costs latency, never an entry.
"""

from __future__ import annotations

import asyncio

from changefeed.log import CHANNEL
from indexer.listen import Listener

# longest a waiting reader goes without re-querying, whatever the notifications say
RECHECK = 5.0


class FeedNotifier:
    """One LISTEN connection per process; readers await the next commit through it.

    `channel` defaults to the change feed's; the worklist's event delivery listens on its own.
    """

    def __init__(self, database_url: str, channel: str = CHANNEL) -> None:
        self._future: asyncio.Future[None] | None = None
        self._listener = Listener(database_url, channel, self._wake, self._wake)

    def start(self) -> None:
        self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()

    def next_change(self) -> asyncio.Future[None]:
        """A future resolved by the next notification (or reconnect) after this call."""
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    async def wait_connected(self) -> None:
        """Until the listener is up (tests, and readers that must not miss the first commit)."""
        await self._listener.connected.wait()

    def _wake(self, *_: object) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
