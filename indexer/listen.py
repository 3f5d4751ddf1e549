"""A PostgreSQL LISTEN connection kept open for the life of a process.

Several parts of the archive wake on commits made by any process sharing the database (change feed readers,
UPS-RS event senders, access-control caches). They share this: one connection per channel, reconnected with
backoff, and a reset callback whenever notifications may have been missed (right after connecting, and when
the connection is lost), so that the user can re-read instead of trusting what it was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from indexer.background import BackgroundTask
from indexer.sessions import server_settings

log = logging.getLogger(__name__)

_RECONNECT_MAX = 10.0


class Listener(BackgroundTask):
    """LISTEN on `channel` from `start()` to `stop()`: `on_notify(payload)` per notification,
    `on_reset(connected)` when the connection comes up (True) or goes down (False)."""

    def __init__(
        self,
        database_url: str,
        channel: str,
        on_notify: Callable[[str], None],
        on_reset: Callable[[bool], None],
    ) -> None:
        super().__init__(f"{channel}-listener", self._listen)
        self._database_url = database_url
        self.channel = channel
        self._on_notify = on_notify
        self._on_reset = on_reset
        self.connected = asyncio.Event()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._on_notify(payload)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._database_url, server_settings=server_settings())
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                self.connected.set()
                self._on_reset(True)  # anything committed while nobody listened was not notified
                delay = 0.1
                await lost.wait()
                log.warning("%s listener lost its connection; reconnecting", self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s listener cannot connect (%s); retrying in %.1fs", self.channel, exc, delay)
            finally:
                self.connected.clear()
                self._on_reset(False)
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)
