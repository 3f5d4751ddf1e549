"""The change feed consumer against a real archive: exact entries, crash and resume from a durable
checkpoint, backoff while the server is down or failing, and the checkpoint-ahead error."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from pathlib import Path

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from changefeed.checkpoint import CheckpointError, FileCheckpoint, MemoryCheckpoint, PostgresCheckpoint
from changefeed.consumer import Backoff, ChangeFeedConsumer, ChangeFeedError, CheckpointAheadError, Entry
from tests.fixtures.server import RunningArchive, ServerThread


def instances(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    spec = make_study(rng, series_count=2)
    return [to_bytes(make_instance(spec, i % 2, i + 1, rng=rng)) for i in range(count)]


async def stow_one_by_one(archive: RunningArchive, files: list[bytes]) -> list[tuple[str, str, str]]:
    """Store each file in its own request, so the feed's order is the order of `files`."""
    uids = []
    async with httpx.AsyncClient(timeout=30) as client:
        for data in files:
            body, content_type = multipart_body([data])
            r = await client.post(
                f"{archive.url}/studies", content=body, headers={"Content-Type": content_type}
            )
            assert r.status_code == 200, r.text
            parts = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0].split("/")
            uids.append((parts[-5], parts[-3], parts[-1]))
    return uids


async def delete_instance(archive: RunningArchive, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.delete(f"{archive.url}/studies/{study}/series/{series}/instances/{sop}")
        assert r.status_code == 204, r.text


class Recorder:
    """A handler that records each batch; optionally blocks inside one batch (after recording it)."""

    def __init__(self, block_on_batch: int | None = None) -> None:
        self.batches: list[list[Entry]] = []
        self.block_on_batch = block_on_batch
        self.blocked = asyncio.Event()
        self.changed = asyncio.Event()

    async def __call__(self, entries: list[Entry]) -> None:
        self.batches.append(entries)
        self.changed.set()
        if len(self.batches) == self.block_on_batch:
            self.blocked.set()
            await asyncio.Event().wait()  # "crashes" here: cancelled with side effects done

    async def wait_for(self, count: int) -> None:
        """Until `count` entries have arrived."""
        while len(self.sequences) < count:
            self.changed.clear()
            await self.changed.wait()

    @property
    def sequences(self) -> list[int]:
        return [e["Sequence"] for batch in self.batches for e in batch]


class WatchedCheckpoint(FileCheckpoint):
    """A file checkpoint whose saves a test can wait for."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saved = asyncio.Event()
        self.last = 0

    async def save(self, sequence: int) -> None:
        await super().save(sequence)
        self.last = sequence
        self.saved.set()

    async def wait_for(self, sequence: int) -> None:
        while self.last < sequence:
            self.saved.clear()
            await self.saved.wait()


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, factor=2.0, cap=0.4, jitter=0.5, rng=random.Random(7))


async def test_reads_exact_entries_in_batches_and_saves_checkpoint(
    local_archive: RunningArchive, tmp_path: Path
) -> None:
    uids = await stow_one_by_one(local_archive, instances(1, 3))
    await delete_instance(local_archive, uids[1])
    checkpoint = FileCheckpoint(tmp_path / "consumer" / "feed.checkpoint")
    recorder = Recorder()
    consumer = ChangeFeedConsumer(f"{local_archive.base}/v1", checkpoint, recorder, batch_size=2)
    await consumer.run(follow=False)

    assert [[e["Sequence"] for e in b] for b in recorder.batches] == [[1, 2], [3, 4]]
    entries = [e for b in recorder.batches for e in b]
    expected = [(*uids[0], "create", "current"), (*uids[1], "create", "deleted")]
    expected += [(*uids[2], "create", "current"), (*uids[1], "delete", "deleted")]
    got = [
        (e["StudyInstanceUid"], e["SeriesInstanceUid"], e["SopInstanceUid"], e["Action"], e["State"])
        for e in entries
    ]
    assert got == expected
    assert [("Metadata" in e) for e in entries] == [True, False, True, False]
    assert entries[0]["Metadata"]["00080018"]["Value"] == [uids[0][2]]
    assert {e["PartitionName"] for e in entries} == {"Microsoft.Default"}
    assert (tmp_path / "consumer" / "feed.checkpoint").read_text() == "4\n"
    assert os.listdir(tmp_path / "consumer") == ["feed.checkpoint"]  # no temp file left behind

    # caught up: a second run hands nothing over, and a run without metadata leaves it out
    await consumer.run(follow=False)
    assert len(recorder.batches) == 2
    bare = Recorder()
    await ChangeFeedConsumer(
        f"{local_archive.base}/v1", MemoryCheckpoint(2), bare, include_metadata=False
    ).run(follow=False)
    assert bare.sequences == [3, 4] and not any("Metadata" in e for e in bare.batches[0])


async def test_killed_consumer_resumes_from_its_checkpoint(
    local_archive: RunningArchive, tmp_path: Path
) -> None:
    """Cancelled inside its second batch (side effects done, checkpoint not yet written), a restarted
    consumer processes that batch again (the documented at-least-once window) and nothing else twice."""
    await stow_one_by_one(local_archive, instances(2, 10))
    path = tmp_path / "cp"
    root = f"{local_archive.base}/v1"
    first = Recorder(block_on_batch=2)
    task = asyncio.create_task(ChangeFeedConsumer(root, FileCheckpoint(path), first, batch_size=4).run())
    await asyncio.wait_for(first.blocked.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert first.sequences == [1, 2, 3, 4, 5, 6, 7, 8]
    assert path.read_text() == "4\n"

    second = Recorder()
    await ChangeFeedConsumer(root, FileCheckpoint(path), second, batch_size=4).run(follow=False)
    assert second.sequences == [5, 6, 7, 8, 9, 10]
    assert path.read_text() == "10\n"
    processed = first.sequences + second.sequences
    assert sorted(set(processed)) == list(range(1, 11))  # nothing missed
    assert sorted(s for s in set(processed) if processed.count(s) > 1) == [5, 6, 7, 8]  # only the window


async def test_waiting_consumer_gets_new_entries_and_restarts_cleanly(
    local_archive: RunningArchive, tmp_path: Path
) -> None:
    """A consumer caught up waits in a long-poll; entries committed meanwhile reach it, and a consumer
    killed while waiting restarts after its last batch."""
    root = f"{local_archive.base}/v1"
    path = tmp_path / "cp"
    recorder = Recorder()
    checkpoint = WatchedCheckpoint(path)
    task = asyncio.create_task(ChangeFeedConsumer(root, checkpoint, recorder, wait=30).run())
    await asyncio.sleep(0.3)  # let it reach the long-poll on an empty feed
    uids = await stow_one_by_one(local_archive, instances(3, 2))
    async with asyncio.timeout(10):  # far less than `wait`: the commit wakes the poll
        await recorder.wait_for(2)
        await checkpoint.wait_for(2)
    await asyncio.sleep(0.2)  # back in its long-poll
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e["SopInstanceUid"] for b in recorder.batches for e in b] == [u[2] for u in uids]

    more = await stow_one_by_one(local_archive, instances(4, 1))
    again = Recorder()
    await ChangeFeedConsumer(root, FileCheckpoint(path), again).run(follow=False)
    assert again.sequences == [3] and again.batches[0][0]["SopInstanceUid"] == more[0][2]


def reserve_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakyProxy:
    """Forwards to the archive, after answering 503 to the first `failures` requests."""

    def __init__(self, target: str, failures: int) -> None:
        self.target = target
        self.failures = failures
        self.requests = 0

    async def handle(self, request: Request) -> Response:
        self.requests += 1
        if self.requests <= self.failures:
            return Response("overloaded", status_code=503)
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.get(
                f"{self.target}{request.url.path}", params=request.query_params.multi_items()
            )
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))


class RecordingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(initial=0.05, factor=2.0, cap=0.4, jitter=0.5, rng=random.Random(7))
        self.delays: list[float] = []
        self.failed_five_times = asyncio.Event()

    def delay(self, attempt: int) -> float:
        value = super().delay(attempt)
        self.delays.append(value)
        if len(self.delays) >= 5:
            self.failed_five_times.set()
        return value


async def test_backs_off_while_server_is_down_then_recovers(local_archive: RunningArchive) -> None:
    uids = await stow_one_by_one(local_archive, instances(5, 2))
    port = reserve_port()  # nothing listens here yet: connections are refused
    backoff = RecordingBackoff()
    recorder = Recorder()
    consumer = ChangeFeedConsumer(
        f"http://127.0.0.1:{port}/v1", MemoryCheckpoint(), recorder, backoff=backoff
    )
    task = asyncio.create_task(consumer.run())
    async with asyncio.timeout(20):
        await backoff.failed_five_times.wait()
    assert recorder.batches == []
    # the server comes up, but overloaded: two 503s, then it answers
    proxy = FlakyProxy(local_archive.base, failures=2)
    server = ServerThread(Starlette(routes=[Route("/{path:path}", proxy.handle)]))
    server.config.port = port
    await asyncio.to_thread(server.start)
    try:
        async with asyncio.timeout(20):
            await recorder.wait_for(2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(server.stop)
    assert [e["SopInstanceUid"] for e in recorder.batches[0]] == [u[2] for u in uids]
    failures = len(backoff.delays)
    assert failures >= 7  # >= 5 refused connections, then the two 503s
    # capped exponential with jitter: attempt n waits within [(1 - jitter) * d, d], d = min(cap, 0.05 * 2^n)
    for attempt, value in enumerate(backoff.delays):
        ceiling = min(0.4, 0.05 * 2**attempt)
        assert ceiling * 0.5 <= value <= ceiling
    assert proxy.requests >= 3


async def test_idle_consumer_long_polls_instead_of_busy_polling(local_archive: RunningArchive) -> None:
    """Through a counting proxy: an idle consumer holds one request per `wait`; against a server that ignores
    `wait` (answers at once) it still polls at most every `min_poll_interval`."""
    proxy = FlakyProxy(local_archive.base, failures=0)
    server = ServerThread(Starlette(routes=[Route("/{path:path}", proxy.handle)]))
    port = await asyncio.to_thread(server.start)
    try:
        # wait=0 asks the server to answer at once, as a server that ignores `wait` does
        for wait, most in ((1, 4), (0, 8)):  # busy polling would be hundreds
            proxy.requests = 0
            consumer = ChangeFeedConsumer(
                f"http://127.0.0.1:{port}/v1", MemoryCheckpoint(), Recorder(), wait=wait
            )
            task = asyncio.create_task(consumer.run())
            await asyncio.sleep(2.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert 1 <= proxy.requests <= most, (wait, proxy.requests)
    finally:
        await asyncio.to_thread(server.stop)


async def test_handler_error_retries_the_same_batch(local_archive: RunningArchive) -> None:
    await stow_one_by_one(local_archive, instances(6, 3))
    calls: list[list[int]] = []

    async def flaky(entries: list[Entry]) -> None:
        calls.append([e["Sequence"] for e in entries])
        if len(calls) <= 2:
            raise RuntimeError("downstream unavailable")

    checkpoint = MemoryCheckpoint()
    await ChangeFeedConsumer(
        f"{local_archive.base}/v1", checkpoint, flaky, batch_size=2, backoff=fast_backoff()
    ).run(follow=False)
    assert calls == [[1, 2], [1, 2], [1, 2], [3]]
    assert checkpoint.sequence == 3


class FailingOnceCheckpoint(MemoryCheckpoint):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def save(self, sequence: int) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        await super().save(sequence)


async def test_failed_checkpoint_write_redoes_the_batch(local_archive: RunningArchive) -> None:
    await stow_one_by_one(local_archive, instances(9, 2))
    recorder, checkpoint = Recorder(), FailingOnceCheckpoint()
    await ChangeFeedConsumer(f"{local_archive.base}/v1", checkpoint, recorder, backoff=fast_backoff()).run(
        follow=False
    )
    assert recorder.sequences == [1, 2, 1, 2]  # as after a crash before the write: the window, no more
    assert checkpoint.sequence == 2


async def test_handler_stops_consumer_with_changefeed_error(local_archive: RunningArchive) -> None:
    await stow_one_by_one(local_archive, instances(7, 2))

    async def stop(entries: list[Entry]) -> None:
        raise ChangeFeedError("enough")

    checkpoint = MemoryCheckpoint()
    with pytest.raises(ChangeFeedError, match="enough"):
        await ChangeFeedConsumer(f"{local_archive.base}/v1", checkpoint, stop).run()
    assert checkpoint.sequence == 0


async def test_checkpoint_ahead_of_the_feed_is_a_clear_error(
    local_archive: RunningArchive, tmp_path: Path
) -> None:
    await stow_one_by_one(local_archive, instances(8, 1))
    path = tmp_path / "cp"
    path.write_text("7\n")
    recorder = Recorder()
    consumer = ChangeFeedConsumer(f"{local_archive.base}/v1", FileCheckpoint(path), recorder)
    with pytest.raises(CheckpointAheadError) as caught:
        await consumer.run()
    assert (caught.value.checkpoint, caught.value.latest) == (7, 1)
    assert str(caught.value).startswith("the checkpoint (7) is ahead of the change feed (latest sequence 1)")
    assert recorder.batches == [] and path.read_text() == "7\n"


async def test_checkpoint_ahead_of_a_server_that_answers_empty_pages() -> None:
    """Not every change feed server answers 400 past its end; the consumer's own check at start catches it."""

    async def feed(request: Request) -> Response:
        return Response(b"[]", media_type="application/json")

    async def latest(request: Request) -> Response:
        return Response(b'{"Sequence": 3}', media_type="application/json")

    server = ServerThread(
        Starlette(routes=[Route("/v1/changefeed", feed), Route("/v1/changefeed/latest", latest)])
    )
    port = await asyncio.to_thread(server.start)
    try:
        consumer = ChangeFeedConsumer(f"http://127.0.0.1:{port}/v1", MemoryCheckpoint(5), Recorder())
        with pytest.raises(CheckpointAheadError) as caught:
            await consumer.run()
        assert (caught.value.checkpoint, caught.value.latest) == (5, 3)
        await ChangeFeedConsumer(f"http://127.0.0.1:{port}/v1", MemoryCheckpoint(3), Recorder()).run(
            follow=False
        )
    finally:
        await asyncio.to_thread(server.stop)


async def test_other_bad_request_is_not_retried(local_archive: RunningArchive) -> None:
    consumer = ChangeFeedConsumer(
        f"{local_archive.base}/v1/partitions/no-such", MemoryCheckpoint(), Recorder()
    )
    with pytest.raises(ChangeFeedError) as caught:
        await consumer.run(follow=False)
    assert not isinstance(caught.value, CheckpointAheadError)


def test_consumer_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ChangeFeedConsumer("http://x/v1", MemoryCheckpoint(), Recorder(), batch_size=0)
    with pytest.raises(ValueError, match="wait"):
        ChangeFeedConsumer("http://x/v1", MemoryCheckpoint(), Recorder(), wait=61)


async def test_file_checkpoint_round_trip_and_bad_content(tmp_path: Path) -> None:
    store = FileCheckpoint(tmp_path / "sub" / "cp")
    assert await store.load() == 0  # missing: from the beginning
    await store.save(12)
    await store.save(9_000_000_000)
    assert await FileCheckpoint(tmp_path / "sub" / "cp").load() == 9_000_000_000
    assert os.listdir(tmp_path / "sub") == ["cp"]
    for bad in ["", "12a", "-3", "1.5", "\xff"]:
        (tmp_path / "bad").write_bytes(bad.encode("latin-1"))
        with pytest.raises(CheckpointError):
            await FileCheckpoint(tmp_path / "bad").load()
    with pytest.raises(CheckpointError):
        MemoryCheckpoint(-1)


async def test_postgres_checkpoint(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        a, b = PostgresCheckpoint(pool, "fhir-sync"), PostgresCheckpoint(pool, "mirror")
        assert await a.load() == 0
        await a.save(41)
        await a.save(42)
        await b.save(7)
        assert (await PostgresCheckpoint(pool, "fhir-sync").load(), await b.load()) == (42, 7)
    finally:
        await pool.close()


async def test_handler_failures_are_logged_without_repeating_tracebacks(
    local_archive: RunningArchive, caplog: pytest.LogCaptureFixture
) -> None:
    """A downstream that is down (the FHIR server of fhir-sync) is one warning line per retry, its errors
    unwrapped from the handler's TaskGroup; a bug in a handler has its traceback logged once per streak."""
    await stow_one_by_one(local_archive, instances(10, 1))
    calls = 0

    async def failing(entries: list[Entry]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:  # the FHIR server refuses the connection, from inside a TaskGroup
            async with asyncio.TaskGroup() as group:
                request = httpx.Request("PUT", "http://fhir.invalid/fhir/Patient/1")
                group.create_task(
                    _raise(httpx.ConnectError("All connection attempts failed", request=request))
                )
        elif calls <= 6:
            raise KeyError("Sequence")

    caplog.set_level("WARNING", logger="changefeed.consumer")
    await ChangeFeedConsumer(
        f"{local_archive.base}/v1", MemoryCheckpoint(), failing, backoff=fast_backoff()
    ).run(follow=False)
    assert calls == 7
    records = [r for r in caplog.records if r.name == "changefeed.consumer"]
    tracebacks = [r for r in records if r.exc_info]
    assert len(tracebacks) == 1 and "handler failed on entries 1..1" in tracebacks[0].getMessage()
    assert isinstance(tracebacks[0].exc_info[1], KeyError)
    retries = [r.getMessage() for r in records if "retrying in" in r.getMessage()]
    assert len(retries) == 6
    assert retries[0].startswith(
        "change feed: handler failed: ConnectError: All connection attempts failed "
        "(PUT http://fhir.invalid/fhir/Patient/1);"
    )
    assert retries[3].startswith("change feed: handler failed: KeyError: 'Sequence';")


async def _raise(exc: Exception) -> None:
    raise exc


async def test_a_downstream_that_does_not_answer_is_one_warning_per_retry(
    local_archive: RunningArchive, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler whose downstream is down (a standby archive, a FHIR server: httpx's ConnectError) logged
    an ERROR with a full traceback at every retry beside the warning; a network failure is now the warning
    line alone, naming the error and its request. An unexpected error keeps its traceback."""
    await stow_one_by_one(local_archive, instances(10, 1))
    calls = 0

    async def unreachable(entries: list[Entry]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            request = httpx.Request("POST", "http://127.0.0.1:9/v2/studies")
            raise httpx.ConnectError("All connection attempts failed", request=request)

    with caplog.at_level(logging.WARNING, logger="changefeed.consumer"):
        await ChangeFeedConsumer(
            f"{local_archive.base}/v1", MemoryCheckpoint(), unreachable, backoff=fast_backoff()
        ).run(follow=False)
    assert [(r.levelname, r.getMessage().split(";")[0], r.exc_info) for r in caplog.records] == [
        ("WARNING", "change feed: handler failed: ConnectError: All connection attempts failed "
         "(POST http://127.0.0.1:9/v2/studies)", None),
    ] * 2  # fmt: skip
