"""indexer.background: the start/stop and wake-up loop every long-running task of a process is built on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from indexer.background import BackgroundTask, Periodic

LONG = 60.0  # an interval no test waits out: a step that runs anyway was woken by something else


class Steps:
    """A step function recording its calls; `results` says what each call returns or raises."""

    def __init__(self, *results: object) -> None:
        self.results = list(results)
        self.calls = 0
        self.errors: list[Exception] = []
        self._counted = asyncio.Condition()

    async def __call__(self) -> object:
        async with self._counted:
            self.calls += 1
            self._counted.notify_all()
        result = self.results.pop(0) if self.results else None
        if isinstance(result, Exception):
            raise result
        return result

    async def until(self, calls: int) -> None:
        """Until the step has been called `calls` times (5 s at most)."""
        async with self._counted:
            await asyncio.wait_for(self._counted.wait_for(lambda: self.calls >= calls), 5)

    async def settles_at(self, calls: int) -> None:
        """The step is called `calls` times, and then not again for a while."""
        await self.until(calls)
        await asyncio.sleep(0.05)
        assert self.calls == calls

    @asynccontextmanager
    async def running(self, name: str, interval: float = LONG) -> AsyncIterator[Periodic]:
        periodic = Periodic(name, self, interval, self.errors.append)
        periodic.start()
        try:
            yield periodic
        finally:
            await periodic.stop()


def named(name: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name]


async def test_start_runs_a_named_task_and_stop_ends_it() -> None:
    ended = asyncio.Event()

    async def main() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    task = BackgroundTask("test-forever", main)
    await task.stop()  # not started: nothing to do
    task.start()
    await asyncio.sleep(0)
    assert len(named("test-forever")) == 1
    await task.stop()
    assert ended.is_set()  # its finally ran before stop() returned
    assert named("test-forever") == []
    await task.stop()  # twice is harmless
    task.start()  # and it can run again
    await asyncio.sleep(0)
    assert len(named("test-forever")) == 1
    await task.stop()


async def test_stop_reports_a_task_that_crashed() -> None:
    async def main() -> None:
        raise RuntimeError("boom")

    task = BackgroundTask("test-crash", main)
    task.start()
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await task.stop()


async def test_periodic_runs_at_once_then_waits_for_the_interval() -> None:
    step = Steps()
    async with step.running("test-periodic", 0.01):
        await step.until(2)  # the interval (10 ms) passed: it ran again unprompted
        assert named("test-periodic") != []
    calls = step.calls
    await asyncio.sleep(0.05)
    assert step.calls == calls  # stopped for good
    assert named("test-periodic") == []


async def test_poke_wakes_the_loop_before_the_interval() -> None:
    step = Steps()
    async with step.running("test-poke") as periodic:
        await step.settles_at(1)  # waiting out the 60 s interval
        periodic.poke()
        await step.settles_at(2)
        periodic.poke()
        await step.settles_at(3)


async def test_a_poke_during_a_step_is_not_lost() -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()
    calls = 0

    async def slow_step() -> None:
        nonlocal calls
        calls += 1
        entered.set()
        if calls == 1:
            await gate.wait()

    periodic = Periodic("test-poke-during", slow_step, LONG, pytest.fail)
    periodic.start()
    try:
        await asyncio.wait_for(entered.wait(), 5)
        periodic.poke()  # arrives while the first step is still running
        entered.clear()
        gate.set()
        await asyncio.wait_for(entered.wait(), 5)  # so the step ran again without waiting out 60 s
        assert calls == 2
    finally:
        await periodic.stop()


async def test_a_step_with_more_work_runs_again_at_once() -> None:
    step = Steps(True, True, True, False)
    async with step.running("test-more"):
        await step.settles_at(4)  # the fourth said there was no more: it waits for the interval now


async def test_a_failing_step_is_reported_and_retried_after_the_interval() -> None:
    first, second = RuntimeError("database down"), ValueError("still down")
    step = Steps(first, second, True, False)
    async with step.running("test-errors") as periodic:
        await step.settles_at(1)  # backs off: no retry before the interval
        assert step.errors == [first]
        periodic.poke()
        await step.settles_at(2)
        assert step.errors == [first, second]
        periodic.poke()
        await step.settles_at(4)  # the third call succeeds and asks for more: the fourth runs at once
        assert step.errors == [first, second]
        assert named("test-errors") != []  # the task survived both failures


async def test_retry_after_a_failure_comes_by_itself_when_the_interval_passes() -> None:
    step = Steps(RuntimeError("once"))
    async with step.running("test-retry", 0.01):
        await step.until(2)
    assert [str(e) for e in step.errors] == ["once"]
