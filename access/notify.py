"""Cache invalidation across processes: revocations and grant changes NOTIFY, every process LISTENs.

Caches of token lookups and research grants are trusted only while the listening connection is up: while it
is down (and right after it reconnects) they are emptied and bypassed, because a notification sent in that
window is lost. So a revocation committed anywhere reaches every process's next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "dicomweb_access"
_RECONNECT_MAX = 10.0


class AccessNotifier:
    """One LISTEN connection per process; calls `on_change(payload)` per notification, `on_change(None)`
    when notifications may have been missed."""

    def __init__(self, database_url: str, on_change: Callable[[str | None], None]) -> None:
        self._database_url = database_url
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="access-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._on_change(payload)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._database_url)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._notified)
                self._on_change(None)  # anything cached before this point may have missed a revocation
                self.connected.set()
                delay = 0.1
                await lost.wait()
                log.warning("access listener lost its connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("access listener cannot connect (%s); retrying in %.1fs", exc, delay)
            finally:
                self.connected.clear()
                self._on_change(None)
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)
