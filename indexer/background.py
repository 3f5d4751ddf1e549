"""Tasks that run for the life of a process (blob upkeep, operation runner, LISTEN connections, pruners).

Each is one named asyncio task, started in the app's lifespan and ended by cancelling it, so that its
`finally` blocks run and `stop()` returns only once it is gone. `Periodic` adds the loop most of them need:
run a step, then wait `interval` seconds or until poked; a failing step is reported and retried after the
interval, so an outage (the database down) costs a log line per interval, never a dead task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class BackgroundTask:
    """One named task running `main()` from `start()` until `stop()`."""

    def __init__(self, name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._main = main
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._main(), name=self.name)

    async def stop(self) -> None:
        """Cancel the task and wait for it to end; a no-op when it is not running."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Periodic(BackgroundTask):
    """Runs `step()` now, then whenever `interval` seconds have passed or `poke()` was called since the step
    began (a poke during a step is not lost); at once again while the step returns true (more work waits).
    An exception from the step goes to `on_error` and the step is retried after the interval."""

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[object]],
        interval: float,
        on_error: Callable[[Exception], object],
    ) -> None:
        super().__init__(name, self._periodic)
        self.interval = interval
        self._step = step
        self._on_error = on_error
        self._wakeup = asyncio.Event()

    def poke(self) -> None:
        """Run the step now (or right after the one in progress)."""
        self._wakeup.set()

    async def _periodic(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                more = await self._step()
            except Exception as exc:  # CancelledError is no Exception: stop() still ends the task
                self._on_error(exc)
                more = False
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.interval)
