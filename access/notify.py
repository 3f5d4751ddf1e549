"""Cache invalidation across processes: revocations and grant changes NOTIFY, every process LISTENs.

Caches of token lookups and research grants are trusted only while the listening connection is up: while it
is down (and right after it reconnects) they are emptied and bypassed, because a notification sent in that
window is lost. So a revocation committed anywhere reaches every process's next request.
"""

from __future__ import annotations

from collections.abc import Callable

from indexer.listen import Listener

CHANNEL = "dicomweb_access"


class AccessNotifier:
    """One LISTEN connection per process; calls `on_change(payload)` per notification, `on_change(None)`
    when notifications may have been missed (on every connect and disconnect)."""

    def __init__(self, database_url: str, on_change: Callable[[str | None], None]) -> None:
        self._listener = Listener(database_url, CHANNEL, on_change, lambda _connected: on_change(None))
        self.connected = self._listener.connected

    def start(self) -> None:
        self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()
