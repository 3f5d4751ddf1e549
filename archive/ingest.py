"""Storing instances: parse, validate, write the object, index it, in that order.

The object is written before its index row commits, so an instance is never visible without its bytes. A
crash in between leaves an object no row references; the orphan sweeper (archive.sweeper) removes those.
Objects are written under a key unique to this upload, so a re-store of an existing instance can never
overwrite the live object: its new copy is simply deleted again (45070).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

import asyncpg
import orjson

from changefeed.log import Action, Change, append
from dicomcore.parse import InvalidInstanceError, NonConformantInstanceError, ParsedInstance, parse_instance
from indexer.writes import IndexResult, InstanceRecord, Outcome, index_instances
from storage.base import BlobStore

log = logging.getLogger(__name__)

# A batch is indexed (one syncfs, one transaction) once this many instances are stored: amortises commit
# and per-statement cost (a 50-instance request is one batch) without holding study rows locked for long.
INDEX_BATCH = 64
# Parts are prepared (hash, parse, write) in groups, one worker-thread call per group: a thread hop and the
# GIL hand-offs around it cost about as much as the Python work of a small instance. A group is dispatched
# at this many parts or bytes; a large (spooled) part thus goes alone.
GROUP_PARTS = 16
GROUP_BYTES = 4 << 20
# Groups of one request in flight at once: one being prepared while another waits on its index batch. With
# the one filling up, at most GROUPS_IN_FLIGHT + 1 groups of parts are held (parts over 1 MiB are spooled).
GROUPS_IN_FLIGHT = 2
_HASH_CHUNK = 1 << 20
# Every Ingestor of the process prepares on these threads. Their work holds the GIL almost all the time,
# so more threads add GIL contention (futex wake-ups, context switches) rather than throughput: one
# measured better than two (docs/performance.md, "STOW-RS ingest").
_PREPARE_THREADS = 1
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def prepare_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix="ingest")
    return _executor


class FailureReason(enum.IntEnum):
    """Failure reasons of the Store Instances response (PS3.18 Table 10.5.3-2, Azure's usage)."""

    PROCESSING_FAILURE = 0x0110  # 272
    INVALID_INSTANCE = 0xA900  # 43264: data set does not match SOP class / cannot be parsed / bad UIDs
    STUDY_MISMATCH = 0xA901  # 43265: StudyInstanceUID differs from the one in the request URL
    ALREADY_STORED = 0xB00E  # 45070: the SOP instance is already in the archive


@dataclass(slots=True)
class StoreOutcome:
    """What happened to one uploaded part."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    failure: FailureReason | None = None
    message: str = ""
    # an INVALID_INSTANCE that parsed but does not match its SOP class (DIMSE's A900 rather than C000): a
    # required attribute missing, an invalid UID, or SOP Class/Instance UIDs other than its sender declared
    # (a C-STORE's Affected SOP Class/Instance UID), refused before storing
    does_not_match: bool = False


# Objects up to this size are stored from one in-memory copy; larger ones stream from their spool file.
_IN_MEMORY_LIMIT = 8 << 20


@dataclass(slots=True)
class Prepared:
    parsed: ParsedInstance
    sha256: bytes
    size: int
    metadata: bytes
    bulk_index: bytes
    data: bytes | None  # the whole object when small enough to keep in memory


def prepare(fp: BinaryIO) -> Prepared:
    """CPU-bound part of ingest (runs in a worker thread): hash, parse, serialise metadata. The bulk
    update prepares its rewritten objects with it too."""
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    fp.seek(0)
    data: bytes | None = None
    if size <= _IN_MEMORY_LIMIT:
        data = fp.read()
        digest = hashlib.sha256(data)
        parsed = parse_instance(data)
    else:
        digest = hashlib.sha256()
        while chunk := fp.read(_HASH_CHUNK):
            digest.update(chunk)
        fp.seek(0)
        parsed = parse_instance(fp)
    bulk = orjson.dumps([[b.path, b.offset, b.length, b.vr] for b in parsed.bulk])
    return Prepared(parsed, digest.digest(), size, orjson.dumps(parsed.attrs), bulk, data)


def record_of(prepared: Prepared, key: str) -> InstanceRecord:
    """What the index needs of a prepared object stored under `key`."""
    parsed = prepared.parsed
    return InstanceRecord(
        study_instance_uid=parsed.study_instance_uid,
        series_instance_uid=parsed.series_instance_uid,
        sop_instance_uid=parsed.sop_instance_uid,
        sop_class_uid=parsed.sop_class_uid,
        transfer_syntax_uid=parsed.transfer_syntax_uid,
        attrs=parsed.attrs,
        storage_key=key,
        size=prepared.size,
        sha256=prepared.sha256,
        metadata=prepared.metadata,
        bulk_index=prepared.bulk_index,
    )


def storage_key(partition_key: int, parsed: ParsedInstance) -> str:
    """A key unique to this upload of the instance (UIDs are validated, so they are safe path segments)."""
    # One directory per series, not per instance: on the local store every new directory costs a mkdir
    # and an fsync of its parent.
    return (
        f"p{partition_key}/{parsed.study_instance_uid}/{parsed.series_instance_uid}/"
        f"{parsed.sop_instance_uid}.{os.urandom(8).hex()}.dcm"
    )


def created_changes(records: list[InstanceRecord], results: list[IndexResult]) -> list[Change]:
    """The change feed entries of the instances an index batch created (also used by retention restores)."""
    return [
        Change(
            r.study_instance_uid,
            r.series_instance_uid,
            r.sop_instance_uid,
            result.instance_key,
            Action.CREATE,
        )
        for r, result in zip(records, results, strict=True)
        if result.outcome is Outcome.CREATED and result.instance_key is not None
    ]


async def _object_chunks(fp: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(fp.read, 8 << 20):
        yield chunk


@dataclass(slots=True)
class _Item:
    """One part on its way through a group: what the worker thread made of it."""

    fp: BinaryIO
    outcome: StoreOutcome
    expect: tuple[str, str] | None = None  # SOP Class and Instance UID the sender declared
    record: InstanceRecord | None = None  # prepared and not refused
    data: bytes | None = None  # the object in memory, None if spooled
    stored: bool = False  # written by the worker thread already
    queued: bool = False  # handed to the index batch, which decides its outcome from here on


def _prepare_group(
    items: list[_Item],
    partition_key: int,
    expected_study: str | None,
    write: Callable[[str, bytes], int] | None,
) -> None:
    """The worker-thread part of a group: prepare each part and, where the store allows, write its object.

    Failures are per part and end up in its outcome; nothing here raises.
    """
    for item in items:
        outcome = item.outcome
        try:
            prepared = prepare(item.fp)
        except InvalidInstanceError as exc:
            outcome.failure, outcome.message = FailureReason.INVALID_INSTANCE, str(exc)
            if isinstance(exc, NonConformantInstanceError):
                outcome.does_not_match = True
                outcome.sop_class_uid, outcome.sop_instance_uid = exc.sop_class_uid, exc.sop_instance_uid
            continue
        except Exception as exc:  # a bug or an unexpected fault fails this part, never the request
            outcome.failure = FailureReason.PROCESSING_FAILURE
            outcome.message = f"processing failed: {exc.__class__.__name__}: {exc}"
            continue
        parsed = prepared.parsed
        outcome.sop_class_uid = parsed.sop_class_uid
        outcome.sop_instance_uid = parsed.sop_instance_uid
        outcome.study_instance_uid = parsed.study_instance_uid
        outcome.series_instance_uid = parsed.series_instance_uid
        if expected_study is not None and parsed.study_instance_uid != expected_study:
            outcome.failure = FailureReason.STUDY_MISMATCH
            outcome.message = (
                f"StudyInstanceUID {parsed.study_instance_uid} does not match {expected_study} "
                "in the request URL"
            )
            continue
        if item.expect is not None and item.expect != (parsed.sop_class_uid, parsed.sop_instance_uid):
            outcome.failure, outcome.does_not_match = FailureReason.INVALID_INSTANCE, True
            outcome.message = (
                f"the data set is SOP instance {parsed.sop_instance_uid} of class {parsed.sop_class_uid}, "
                f"not {item.expect[1]} of class {item.expect[0]} as the request declared"
            )
            continue
        # Duplicates (45070) are found when indexing the batch; their new copy is deleted again then.
        key = storage_key(partition_key, parsed)
        if write is not None and prepared.data is not None:
            try:
                write(key, prepared.data)
            except Exception as exc:  # storage failures are per instance: the others may still succeed
                outcome.failure = FailureReason.PROCESSING_FAILURE
                outcome.message = _store_failure(exc)
                continue
            item.stored = True
        item.data = prepared.data
        item.record = record_of(prepared, key)


def _store_failure(exc: Exception) -> str:
    """The reason of a part whose object the store refused, in the store's own words (an S3 error code
    and message, an errno): the same for every part when the store is down or misconfigured."""
    return f"could not store the object: {exc.__class__.__name__}: {exc}"


_INDEX_FAILURE = "index write failed: "


def _index_failure(exc: Exception) -> IndexResult:
    """The result of an instance whose index write raised (a 272 failure, not a refusal)."""
    return IndexResult(Outcome.CONFLICT, reason=f"{_INDEX_FAILURE}{exc.__class__.__name__}")


class Ingestor:
    """Stores the instances of one STOW request, batching their preparation and their index writes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: BlobStore,
        partition_key: int,
        *,
        expected_study: str | None = None,
    ) -> None:
        self._pool = pool
        self._store = store
        self._write = store.blocking_writer()
        self._partition_key = partition_key
        self._expected_study = expected_study
        self._pending: list[tuple[StoreOutcome, InstanceRecord]] = []
        self._group: list[_Item] = []
        self._group_bytes = 0
        self._slots = asyncio.Semaphore(GROUPS_IN_FLIGHT)
        self._joined: asyncio.Future[None] | None = None  # set once the last dispatched group joined
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_lock = asyncio.Lock()
        self.outcomes: list[StoreOutcome] = []

    async def add(self, fp: BinaryIO, *, expect: tuple[str, str] | None = None) -> None:
        """Accept one uploaded object (a seekable file, closed by the ingestor when done with it).

        `expect`: the SOP Class and Instance UID its sender declared (DIMSE); a data set that differs is
        refused before anything is stored.

        Returns once it is queued; waits while GROUPS_IN_FLIGHT groups are being processed, which pushes
        back on the request body. Outcomes keep the order in which parts were added.
        """
        outcome = StoreOutcome()
        self.outcomes.append(outcome)
        self._group.append(_Item(fp, outcome, expect))
        self._group_bytes += fp.seek(0, io.SEEK_END)
        fp.seek(0)
        if len(self._group) >= GROUP_PARTS or self._group_bytes >= GROUP_BYTES:
            await self._dispatch()

    async def finish(self) -> list[StoreOutcome]:
        """Wait for every part, index what remains; the outcomes, one per part."""
        await self._dispatch()
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
        await self.flush()
        # a part's reason goes to its sender only; a store or database that fails them is the operator's
        failed = [o.message or "" for o in self.outcomes if o.failure == FailureReason.PROCESSING_FAILURE]
        if failed:
            reasons = "; ".join(list(dict.fromkeys(failed))[:3])
            log.error("ingest: %d of %d instances failed: %s", len(failed), len(self.outcomes), reasons)
        return self.outcomes

    async def _dispatch(self) -> None:
        if not self._group:
            return
        group, self._group, self._group_bytes = self._group, [], 0
        try:
            await self._slots.acquire()
        except BaseException:
            for item in group:
                item.fp.close()
            raise
        # Groups join the index batch in request order (whichever finishes first): of two copies of an
        # instance in one request, the first is the one stored.
        previous, self._joined = self._joined, asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._process(group, previous, self._joined))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(
        self, group: list[_Item], previous: asyncio.Future[None] | None, joined: asyncio.Future[None]
    ) -> None:
        try:
            await self._store_group(group, previous, joined)
        except Exception as exc:  # a bug or an unexpected fault fails these parts, never the request
            for item in group:
                if not item.queued and item.outcome.failure is None:
                    item.outcome.failure = FailureReason.PROCESSING_FAILURE
                    item.outcome.message = f"processing failed: {exc.__class__.__name__}: {exc}"
                    if item.record is not None:  # its object may be written: nothing will index it
                        with contextlib.suppress(Exception):
                            await self._store.delete(item.record.storage_key)
        finally:
            if not joined.done():
                joined.set_result(None)
            for item in group:
                item.fp.close()
            self._slots.release()

    async def _store_group(
        self, group: list[_Item], previous: asyncio.Future[None] | None, joined: asyncio.Future[None]
    ) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            prepare_executor(), _prepare_group, group, self._partition_key, self._expected_study, self._write
        )
        # Objects the worker thread could not write (no blocking writer, or spooled) go through put().
        unstored = [item for item in group if item.record is not None and not item.stored]
        if unstored:
            await asyncio.gather(*(self._put(item) for item in unstored))
        if previous is not None:
            await asyncio.shield(previous)
        for item in group:
            if item.record is not None and item.outcome.failure is None:
                self._pending.append((item.outcome, item.record))
                item.queued = True
        joined.set_result(None)
        if len(self._pending) >= INDEX_BATCH:
            await self.flush()

    async def _put(self, item: _Item) -> None:
        assert item.record is not None
        key = item.record.storage_key
        try:
            if item.data is None:
                item.fp.seek(0)
                await self._store.put(key, _object_chunks(item.fp), durable=False)
            else:
                await self._store.put(key, item.data, durable=False)
        except Exception as exc:  # storage failures are per instance: the others may still succeed
            item.record = None
            item.outcome.failure = FailureReason.PROCESSING_FAILURE
            item.outcome.message = _store_failure(exc)

    async def _index(self, records: list[InstanceRecord], durable: asyncio.Future[None]) -> list[IndexResult]:
        """Index rows and change feed entries of `records` in one transaction, committed once `durable`
        (their objects' flush) has succeeded."""
        async with self._pool.acquire() as conn, conn.transaction():
            results = await index_instances(conn, self._partition_key, records)
            # the feed entries commit with the rows they describe; append is the last statement
            await append(conn, self._partition_key, created_changes(records, results))
            await durable  # a failed flush raises here and rolls the batch back
        return results

    async def _index_alone(self, record: InstanceRecord, durable: asyncio.Future[None]) -> IndexResult:
        try:
            return (await self._index([record], durable))[0]
        except Exception as exc:
            return _index_failure(exc)

    async def flush(self) -> None:
        """Index what is stored but not yet indexed; remove the objects of instances that were refused."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        records = [record for _, record in batch]
        # Objects were written without a flush each; one flush for the batch, which runs while the index
        # statements do and is awaited before the commit: no row commits before its object is durable.
        durable = asyncio.ensure_future(self._store.make_durable([r.storage_key for r in records]))
        # if the statements fail first nobody awaits the flush: its outcome must not be reported as lost
        durable.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            results = await self._index(records, durable)
        except (asyncpg.DataError, asyncpg.ProgramLimitExceededError) as exc:
            # Values of one instance that PostgreSQL refuses must not fail the others (STOW reports each
            # instance on its own): index them one at a time, so only that instance fails.
            log.warning(  # the class only: asyncpg's message can quote a value (patient data)
                "index write of %d instances failed (%s); indexing them one by one",
                len(records),
                exc.__class__.__name__,
            )
            results = [await self._index_alone(record, durable) for record in records]
        except Exception as exc:
            results = [_index_failure(exc)] * len(records)
        unreferenced = []
        for (outcome, record), result in zip(batch, results, strict=True):
            if result.outcome is Outcome.CREATED:
                continue
            unreferenced.append(record.storage_key)
            if result.reason.startswith(_INDEX_FAILURE):
                outcome.failure = FailureReason.PROCESSING_FAILURE
            elif result.outcome is Outcome.ALREADY_STORED:
                outcome.failure = FailureReason.ALREADY_STORED
            else:
                outcome.failure = FailureReason.INVALID_INSTANCE
            outcome.message = result.reason
        for key in unreferenced:
            try:
                await self._store.delete(key)
            except Exception:
                pass
