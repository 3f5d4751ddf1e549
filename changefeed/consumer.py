"""A change feed consumer: read entries after a checkpoint, hand them to a callback, then advance.

Delivery is at least once. The checkpoint moves only after the callback has returned for a batch, so a
crash (or cancellation) between the callback's side effects and the durable checkpoint write redelivers
that one batch on restart: at most `batch_size` entries are processed twice, and only the entries of the
batch in flight. Nothing is ever skipped, because the server hands out Sequences densely in commit order
and the consumer always asks for "after my checkpoint". Callbacks should therefore be idempotent (the FHIR
projection is: it rebuilds a study's resource from the archive's current state).

The consumer long-polls (`wait=`) instead of polling in a loop, and backs off exponentially with jitter on
connection failures, 5xx/429 answers, callback errors and failed checkpoint writes, retrying the same
batch. A checkpoint ahead of the feed (for example after the archive's database was restored from a
backup), found at start against `changefeed/latest` or later from the archive's 400, raises
`CheckpointAheadError` instead of waiting for ever for entries that will never come, or silently skipping
the ones the restored archive will hand out again under the same numbers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx

from changefeed.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

Entry = dict[str, Any]
Handler = Callable[[list[Entry]], Awaitable[None]]

MAX_LIMIT = 10_000  # the server's ceiling for `limit`
MAX_WAIT = 60  # the server's ceiling for `wait` (whole seconds)
_BEYOND_END = re.compile(r"beyond the end of the change feed \(latest sequence (?P<latest>\d+)\)")


class ChangeFeedError(Exception):
    """The feed answered something the consumer cannot recover from by retrying."""


class CheckpointAheadError(ChangeFeedError):
    def __init__(self, checkpoint: int, latest: int) -> None:
        super().__init__(
            f"the checkpoint ({checkpoint}) is ahead of the change feed (latest sequence {latest}); the "
            "archive's database was probably restored from an earlier state. Decide how to reconcile "
            "(e.g. reset the checkpoint to the latest sequence, or re-read from 0 with an idempotent "
            "consumer) and restart."
        )
        self.checkpoint = checkpoint
        self.latest = latest


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: attempt n waits a random time in [(1-jitter)·d, d] where
    d = min(cap, initial·factor^n), so many consumers of one recovering server do not retry in lockstep."""

    initial: float = 0.2
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return ceiling * (1.0 - self.jitter * self.rng.random())


class _Retryable(Exception):
    """A failure worth retrying after a pause (connection error, 5xx, 429, callback error)."""


class DownstreamError(Exception):
    """A handler's downstream (a FHIR server, a standby archive) refused or failed a request: retried like
    any handler failure, and logged as one line, since its traceback says nothing an operator can use."""


_DOWNSTREAM = (DownstreamError, httpx.HTTPError, OSError)  # unreachable, refused, timed out, 4xx/5xx


def _request_of(exc: BaseException) -> str:
    """Which request an httpx error is about (its message alone does not say which server)."""
    try:
        request = exc.request if isinstance(exc, httpx.RequestError) else None
    except RuntimeError:  # an error raised without a request
        return ""
    return f" ({request.method} {request.url})" if request is not None else ""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, e.g. a TaskGroup's; the exception itself otherwise."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _describe(exc: BaseException) -> str:
    leaves = _leaves(exc)
    named = "; ".join(f"{type(e).__name__}: {e}{_request_of(e)}" for e in leaves[:3])
    return named + (f" (and {len(leaves) - 3} more)" if len(leaves) > 3 else "")


class ChangeFeedConsumer:
    """Tails `{root}/changefeed` (root: `http://host:port/v1` or `.../v1/partitions/{name}`).

    `token` is sent as `Authorization: Bearer` (when the consumer makes its own client). `caught_up(t)` is
    called whenever everything the feed held at `t` (time.time() when the page arrived) has been handled:
    after a batch shorter than `batch_size`, or an empty page. `now - t` bounds how far behind it is.
    `handler` receives each non-empty batch in Sequence order; when it raises, the same batch is retried
    after a backoff, except for a `ChangeFeedError`, which stops the consumer (the checkpoint stays before
    the batch). `run()` returns when caught up if `follow` is false, and otherwise runs until cancelled.
    """

    def __init__(
        self,
        root: str,
        checkpoint: CheckpointStore,
        handler: Handler,
        *,
        batch_size: int = 100,
        include_metadata: bool = True,
        wait: int = 30,
        backoff: Backoff | None = None,
        client: httpx.AsyncClient | None = None,
        token: str | None = None,
        min_poll_interval: float = 0.5,
        caught_up: Callable[[float], None] | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_LIMIT:
            raise ValueError(f"batch_size must be within 1..{MAX_LIMIT}")
        if not 0 <= wait <= MAX_WAIT:
            raise ValueError(f"wait must be within 0..{MAX_WAIT} whole seconds")
        self.root = root.rstrip("/")
        self.checkpoint = checkpoint
        self.handler = handler
        self.batch_size = batch_size
        self.include_metadata = include_metadata
        self.wait = wait
        self.backoff = backoff or Backoff()
        self.min_poll_interval = min_poll_interval
        self._client = client
        self._caught_up = caught_up
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.position: int | None = None  # last Sequence processed, once loaded
        self._verified = False  # checked once per run that the checkpoint is not ahead of the feed
        self._last_failure: str | None = None  # the handler's failure being retried, logged once in full

    async def run(self, *, follow: bool = True) -> None:
        own = self._client is None
        client = self._client or httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=self.wait + 15.0), headers=self._headers
        )
        try:
            self.position = await self.checkpoint.load()
            self._verified = False
            attempt = 0
            while True:
                started = time.monotonic()
                try:
                    count = await self._step(client, wait=self.wait if follow else 0)
                except _Retryable as exc:
                    delay = self.backoff.delay(attempt)
                    attempt += 1
                    log.warning("change feed: %s; retrying in %.2f s (attempt %d)", exc, delay, attempt)
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                if count == 0:
                    if not follow:
                        return
                    # wait=0, or a server that ignores `wait`, answers at once: no busy loop
                    await asyncio.sleep(max(0.0, self.min_poll_interval - (time.monotonic() - started)))
        finally:
            if own:
                await client.aclose()

    async def _step(self, client: httpx.AsyncClient, *, wait: int) -> int:
        """Fetch one batch after the checkpoint, hand it over, advance. Returns the number of entries."""
        assert self.position is not None
        offset = self.position
        if not self._verified:
            # Also catches a restored archive whose server answers an empty page rather than a 400.
            if offset > 0 and (latest := await self.latest(client)) < offset:
                raise CheckpointAheadError(offset, latest)
            self._verified = True
        entries = await self._fetch(client, offset, wait)
        read_at = time.time()
        if not entries:
            if self._caught_up is not None:
                self._caught_up(read_at)
            return 0
        self._check_order(offset, entries)
        try:
            await self.handler(entries)
        except (asyncio.CancelledError, ChangeFeedError):
            raise  # a handler stops the consumer (without advancing) by raising a ChangeFeedError
        except Exception as exc:
            leaves = _leaves(exc)
            if stop := next((e for e in leaves if isinstance(e, ChangeFeedError)), None):
                raise stop from exc  # from inside a handler's TaskGroup too (it was retried for ever)
            reason = _describe(exc)
            downstream = all(isinstance(e, _DOWNSTREAM) for e in leaves)
            if not downstream and reason != self._last_failure:  # a bug's traceback, once per streak
                log.exception(
                    "change feed handler failed on entries %d..%d", offset + 1, entries[-1]["Sequence"]
                )
            self._last_failure = reason
            raise _Retryable(f"handler failed: {reason}") from exc
        self._last_failure = None
        last = int(entries[-1]["Sequence"])
        try:
            await self.checkpoint.save(last)
        except Exception as exc:  # disk full, checkpoint database down: the batch is redone, as after a crash
            raise _Retryable(f"checkpoint not saved: {exc!r}") from exc
        self.position = last
        if len(entries) < self.batch_size and self._caught_up is not None:
            self._caught_up(read_at)
        return len(entries)

    async def _fetch(self, client: httpx.AsyncClient, offset: int, wait: int) -> list[Entry]:
        params = {
            "offset": str(offset),
            "limit": str(self.batch_size),
            "includemetadata": "true" if self.include_metadata else "false",
        }
        if wait > 0:
            params["wait"] = str(wait)
        try:
            response = await client.get(f"{self.root}/changefeed", params=params)
        except httpx.TransportError as exc:  # refused, reset, timed out
            raise _Retryable(_describe(exc)) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code == 400:
            await self._explain_400(client, offset, response)
        if response.status_code != 200:
            _refuse(response)
        try:
            entries = response.json()
        except ValueError as exc:  # a proxy's error page, a truncated body
            raise _Retryable(f"GET {response.url}: not JSON: {response.text[:200]!r}") from exc
        if not isinstance(entries, list):
            raise ChangeFeedError(f"GET {response.url}: expected a JSON array, got {type(entries).__name__}")
        return entries

    async def _explain_400(self, client: httpx.AsyncClient, offset: int, response: httpx.Response) -> None:
        """Tell a checkpoint ahead of the feed apart from other bad requests: by the archive's message,
        or, from another server, by asking for the latest entry."""
        message = _message(response)
        m = _BEYOND_END.search(message)
        latest = int(m["latest"]) if m else await self.latest(client)
        if latest < offset:
            raise CheckpointAheadError(offset, latest)
        raise ChangeFeedError(f"GET {response.url}: HTTP 400: {message}")

    async def latest(self, client: httpx.AsyncClient) -> int:
        """The Sequence of the feed's latest entry (0 when empty)."""
        try:
            response = await client.get(f"{self.root}/changefeed/latest")
        except httpx.TransportError as exc:
            raise _Retryable(_describe(exc)) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"HTTP {response.status_code} from changefeed/latest")
        if response.status_code != 200:
            _refuse(response)
        return int(response.json().get("Sequence", 0))

    @staticmethod
    def _check_order(offset: int, entries: list[Entry]) -> None:
        """Ascending and after the offset. Gaps are normal: a partition's feed carries the global
        sequences of its own entries, and archived entries leave a gap at the start."""
        previous = offset
        for entry in entries:
            sequence = entry.get("Sequence")
            if not isinstance(sequence, int) or sequence <= previous:
                raise ChangeFeedError(f"entry out of order after sequence {previous}: {sequence!r}")
            previous = sequence


def _refuse(response: httpx.Response) -> NoReturn:
    """An answer retrying cannot change (4xx other than 429)."""
    status = response.status_code
    if status in (401, 403):
        raise ChangeFeedError(
            f"GET {response.url}: HTTP {status}: the archive refused the credential (a token with the "
            f"reader or owner role reads the change feed): {_message(response)}"
        )
    raise ChangeFeedError(f"GET {response.url}: HTTP {status}: {_message(response)}")


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
