"""The `export` operation: de-identify the instances of a list of identifiers into a destination.

Runs under indexer.operations: each step exports the next batch (in identifier order, then instance_key
order) and returns the checkpoint (identifier index, last instance_key) that commits together with the
batch's mapping rows and error rows. Objects are written before that commit, under keys derived from the
de-identified UIDs, so a step replayed after a crash rewrites the same objects: nothing is duplicated, and
nothing after the last commit is missed.

Within a step, instances stream through: read from the archive's store, de-identified in a process pool
(both cores; pydicom holds the GIL), written to the destination, a few in flight at a time, so memory is
bounded by the in-flight instances, never a study.

Steps overlap (blob destinations): a step starts the next batch's work as soon as its own is queued, so
the pool keeps working through the step's closing flush (make_durable), its commit and the next step's
queries, instead of idling at a barrier every batch. The next step takes that work over only when its
checkpoint is exactly where the work began; otherwise (a failed step, a lost lease) it is cancelled and
redone. Work done ahead is harmless: its objects are written under the same derived keys a replay writes,
nothing of it is recorded before its own step, and that step makes them durable before its checkpoint
commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import os
import pickle
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiobotocore.session import AioSession, get_session

from deid import mapping
from deid.engine import Deidentified, Deidentifier, Skipped, output_key
from deid.keys import ProjectKeys
from deid.profile import Options, build_plan, pixel_rules_from_json
from deid.sinks import (
    BlobSink,
    PartitionSink,
    Sink,
    check_destination,
    describe,
    destination_store,
    unusable_reason,
)
from indexer.lookup import scope_sql
from indexer.operations import Operation, Step
from storage import LocalBlobStore
from storage.base import BlobStore, validate_key

log = logging.getLogger(__name__)

BATCH = 128  # instances per step: well under a second of work at the measured rate, far below the lease
CHUNK = 8  # instances per task of the process pool
IN_FLIGHT = 4  # tasks (chunks) in flight at once, across a step and the batch started ahead of it
MAX_OBJECT_SIZE = 512 << 20  # larger objects fail with a clear error rather than exhausting memory
_START = {
    "index": 0, "after": 0, "exported": 0, "skipped": 0, "failed": 0, "total": None,
    "bytes": 0,  # stored bytes of the instances processed so far
    "started": None,  # when the first step ran (Unix time): the progress rates are averaged from then
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ExportSettings:
    export_dir: Path
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    workers: int = 2  # processes de-identifying; 0: worker threads of this process


_executor: ProcessPoolExecutor | None = None


def process_pool(workers: int) -> ProcessPoolExecutor:
    """One pool per process, started on first use ('spawn': safe with the event loop's threads)."""
    global _executor
    if _executor is None:
        _executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _executor


_worker_engines: dict[bytes, Deidentifier] = {}


def reset_process_pool(broken: Executor | None = None) -> None:
    """Drop a pool whose worker died (it refuses all work from then on); the next use starts a new one.
    With `broken`, only if that is still the current pool (not one started since)."""
    global _executor
    if broken is not None and broken is not _executor:
        return
    if _executor is not None:
        _executor.shutdown(wait=False, cancel_futures=True)
    _executor = None


@dataclass(slots=True)
class _Batch:
    """One step's instances, from checkpoint position `start`, and their export (a task, started early)."""

    start: tuple[int, int]
    rows: list[asyncpg.Record]
    missing: list[str]
    position: tuple[int, int]  # the checkpoint after this batch
    task: asyncio.Task[list[tuple[str, Deidentified | str | None]]] | None = None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.task is not None:
            # nobody awaits a dropped batch: retrieve its outcome so no "never retrieved" warning is logged
            self.task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _run(
    digest: bytes, pickled: bytes, sources: list[bytes | tuple[str, int]], out_dir: str | None
) -> list[tuple[str, Deidentified | str]]:
    """In a worker: ("exported", result) | ("skipped", reason) | ("failed", reason) per source.

    Sources come a few at a time (fewer round trips through the pool). The engine travels pickled (a few
    KB) and is unpickled once per worker, not per task. On local stores the worker reads the source file
    (the source is its path and stored size) and writes the output itself under `out_dir` (see
    _write_output; the caller makes the batch durable), so half a megabyte per instance does not go
    through the parent process twice: measured, that traffic made the parent the bottleneck. The result
    then carries no data."""
    engine = _worker_engines.get(digest)
    if engine is None:
        if len(_worker_engines) > 16:
            _worker_engines.clear()
        engine = _worker_engines[digest] = pickle.loads(pickled)
    outcomes: list[tuple[str, Deidentified | str]] = []
    for source in sources:
        try:
            result = engine(_read_source(*source) if isinstance(source, tuple) else source)
            if out_dir is not None:
                _write_output(f"{out_dir}/{output_key(result)}", result.data)
                result.data = b""
        except Skipped as exc:
            outcomes.append(("skipped", str(exc)))
        except Exception as exc:
            # the class only: messages may quote values of the instance; the details go to the server log
            log.warning("de-identification failed", exc_info=True)
            outcomes.append(("failed", f"de-identification failed ({exc.__class__.__name__})"))
        else:
            outcomes.append(("exported", result))
    return outcomes


def _read_source(path: str, size: int) -> bytes:
    """A stored object, in one read(2) when `size` (the index's) is right: open, read, close, where
    Path.read_bytes makes eight system calls. Read to the end whatever the size says."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size + 1)
        if len(data) == size:  # one byte more was asked for: this is the end of the file
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


_O_OUTPUT = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def _write_output(path: str, data: bytes) -> None:
    """Write an output object in place (no temp file and rename), creating its directory only when the
    open finds it missing (once per series), and start its write-back.

    In place is safe here because nothing reads an export's outputs as done before its operation
    succeeds, and every output of a step is rewritten if that step is redone: outputs count only from
    the step's checkpoint commit, after the step's make_durable (one syncfs), and a crash before it
    redoes the whole step, whose O_TRUNC rewrite replaces whatever a crash left (a prefix, or with a
    power loss, zeros) with the same complete bytes. Two writers of one key (a cancelled batch still
    running in a worker and its redo) write the same bytes at the same offsets, each after its own
    truncation, so the file still ends complete. The temp file, its rename and a mkdir per instance cost
    0.25-0.37 ms per instance here (docs/performance.md)."""
    try:
        fd = os.open(path, _O_OUTPUT, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, _O_OUTPUT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        # start writing back now (Linux: DONTNEED begins writeback of dirty pages), so the step's closing
        # sync finds the data mostly on disk instead of waiting for all of it
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class ExportHandler:
    """The `export` operation type (params written by dicomweb.routes.export)."""

    def __init__(
        self, pool: asyncpg.Pool, store: BlobStore, settings: ExportSettings, *, batch: int = BATCH
    ) -> None:
        self.pool = pool
        self.store = store
        self.settings = settings
        self.batch = batch
        self._engines: dict[uuid.UUID, Deidentifier] = {}
        self._stores: dict[uuid.UUID, BlobStore] = {}
        self._session: AioSession | None = None
        self._ahead: dict[uuid.UUID, _Batch] = {}  # the batch started ahead of an operation's next step
        self._slots: asyncio.Semaphore | None = None  # chunks in flight, shared by a step and the next
        # pool tasks of cancelled batches that a worker was already running: they go on writing outputs,
        # so a step waits for them before its make_durable (see _export)
        self._orphans: set[Future[Any]] = set()

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        checkpoint: dict[str, Any] = {**_START, **(op.checkpoint or {})}
        params = op.params
        identifiers: list[str] = params["identifiers"]
        if checkpoint["started"] is None:
            checkpoint["started"] = time.time()
        if checkpoint["total"] is None:
            if params["destination"]["type"] != "partition":
                try:
                    await check_destination(await self._destination_store(op))
                except Exception as exc:
                    reason = unusable_reason(params["destination"], exc)
                    if reason is None:
                        raise
                    return await self._fail(op, checkpoint, reason)
            checkpoint["total"] = await count_instances(conn, params["partition"], identifiers)
            return Step(checkpoint, 0, results=progress(checkpoint))
        if checkpoint["index"] >= len(identifiers):
            return await self._finish(conn, op, checkpoint)
        engine = await self._engine(conn, op)
        start = (int(checkpoint["index"]), int(checkpoint["after"]))
        current = self._take_ahead(op.id, start)
        try:
            if current is None:
                current = await self._begin(conn, op, engine, start)
            if current.position[0] < len(identifiers) and op.params["destination"]["type"] != "partition":
                # the next batch's work, queued behind this one's: see the module docstring
                self._ahead[op.id] = await self._begin(conn, op, engine, current.position)
            outcomes = await current.task if current.task is not None else []
        except BaseException:
            if current is not None:
                current.cancel()
            self._drop_ahead(op.id)
            raise
        batch, missing, position = current.rows, current.missing, current.position
        errors = [(identifier, "failed", "not found in the source partition") for identifier in missing]
        checkpoint["failed"] += len(missing)
        exported: list[Deidentified] = []
        if batch:
            for row, (kind, detail) in zip(batch, outcomes, strict=True):
                checkpoint[kind] += 1
                checkpoint["bytes"] += row["size"]
                if isinstance(detail, str):
                    errors.append((_identifier(row), kind, detail))
                elif detail is not None:
                    exported.append(detail)
        await mapping.record(conn, params["project"], _mappings(exported), op.id)
        if errors:
            await conn.executemany(
                """INSERT INTO deid_export_error (operation_id, identifier, kind, error)
                   VALUES ($1, $2, $3, $4)""",
                [(op.id, identifier, kind, error) for identifier, kind, error in errors],
            )
        checkpoint["index"], checkpoint["after"] = position
        total = checkpoint["total"] or 1
        done = checkpoint["exported"] + checkpoint["skipped"] + checkpoint["failed"]
        return Step(checkpoint, min(99, 100 * done // total), results=progress(checkpoint))

    def _take_ahead(self, operation_id: uuid.UUID, start: tuple[int, int]) -> _Batch | None:
        """The batch started ahead for this step, if it starts exactly at its checkpoint; any other
        (another operation's, or one from before a failed step) is cancelled."""
        for other in [k for k in self._ahead if k != operation_id]:
            self._drop_ahead(other)
        ahead = self._ahead.pop(operation_id, None)
        if ahead is not None and ahead.start != start:
            ahead.cancel()
            ahead = None
        return ahead

    def _drop_ahead(self, operation_id: uuid.UUID) -> None:
        ahead = self._ahead.pop(operation_id, None)
        if ahead is not None:
            ahead.cancel()

    async def _begin(
        self, conn: asyncpg.Connection, op: Operation, engine: Deidentifier, start: tuple[int, int]
    ) -> _Batch:
        """The batch from checkpoint position `start`, its export started (queued for the pool)."""
        index, after = start
        rows, missing, position = await self._next_batch(
            conn, op.params["partition"], op.params["identifiers"], {"index": index, "after": after}
        )
        batch = _Batch(start, rows, missing, position)
        if rows:
            batch.task = asyncio.create_task(self._export_to_sink(op, engine, rows))
            await asyncio.sleep(0)  # let it queue its chunks now, ahead of any batch started after it
        return batch

    async def _export_to_sink(
        self, op: Operation, engine: Deidentifier, batch: list[asyncpg.Record]
    ) -> list[tuple[str, Deidentified | str | None]]:
        async with self._sink(op) as sink:
            return await self._export(engine, batch, sink)

    async def _engine(self, conn: asyncpg.Connection, op: Operation) -> Deidentifier:
        engine = self._engines.get(op.id)
        if engine is None:
            params = op.params
            secret = await mapping.project_secret(conn, params["project"])
            plan = build_plan(
                Options.from_names(params["options"]), pixel_rules_from_json(params["pixelRules"])
            )
            engine = Deidentifier(plan, ProjectKeys(params["project"], secret))
            if len(self._engines) > 16:
                self._engines.clear()
            self._engines[op.id] = engine
        return engine

    async def _next_batch(
        self, conn: asyncpg.Connection, partition: int, identifiers: list[str], checkpoint: dict[str, Any]
    ) -> tuple[list[asyncpg.Record], list[str], tuple[int, int]]:
        """Up to `batch` instances after the checkpoint, the identifiers found empty, and the new position."""
        index, after = int(checkpoint["index"]), int(checkpoint["after"])
        batch: list[asyncpg.Record] = []
        missing: list[str] = []
        while index < len(identifiers) and len(batch) < self.batch:
            limit = self.batch - len(batch)
            rows = await _instances(conn, partition, identifiers[index], after, limit)
            if not rows and after == 0:
                missing.append(identifiers[index])
            batch.extend(rows)
            if len(rows) < limit:
                index, after = index + 1, 0
            else:
                after = rows[-1]["instance_key"]
        return batch, missing, (index, after)

    @contextlib.asynccontextmanager
    async def _sink(self, op: Operation) -> Any:
        destination = op.params["destination"]
        if destination["type"] == "partition":
            yield PartitionSink(self.pool, self.store, int(op.params["destinationPartition"]))
            return
        sink = BlobSink(await self._destination_store(op), op.id_hex)
        try:
            yield sink
        finally:
            await sink.abandon()

    async def _destination_store(self, op: Operation) -> BlobStore:
        """The operation's destination store, kept open across its steps (an S3 client per step cost
        more CPU than the uploads); closed when the operation finishes, or when too many are open."""
        store = self._stores.get(op.id)
        if store is None:
            while len(self._stores) >= 4:
                await self._close_store(next(iter(self._stores)))
            if self._session is None and op.params["destination"]["type"] == "s3":
                self._session = get_session()  # shared: it caches the parsed S3 service model
            store = self._stores[op.id] = destination_store(
                op.params["destination"],
                export_dir=self.settings.export_dir,
                s3_endpoint_url=self.settings.s3_endpoint_url,
                s3_region=self.settings.s3_region,
                session=self._session,
            )
        return store

    async def _close_store(self, operation_id: uuid.UUID) -> None:
        store = self._stores.pop(operation_id, None)
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    async def _export(
        self, engine: Deidentifier, batch: list[asyncpg.Record], sink: Sink
    ) -> list[tuple[str, Deidentified | str | None]]:
        """(exported|skipped|failed, the result or the reason) per instance, in batch order."""
        loop = asyncio.get_running_loop()
        executor: Executor | None = process_pool(self.settings.workers) if self.settings.workers else None
        if self._slots is None:
            self._slots = asyncio.Semaphore(IN_FLIGHT)
        slots = self._slots
        pickled = pickle.dumps(engine)
        digest = hashlib.sha256(pickled).digest()
        tickets: list[int | None] = [None] * len(batch)
        results: list[tuple[str, Deidentified | str | None]] = [("failed", None)] * len(batch)

        # local stores: workers read and write the files themselves (see _run)
        local_source = isinstance(self.store, LocalBlobStore) and executor is not None
        root = str(self.store.root) if isinstance(self.store, LocalBlobStore) else ""
        out_dir = sink.local_directory() if executor is not None else None

        async def chunk(positions: list[int]) -> None:
            async with slots:
                sources: list[bytes | tuple[str, int]] = []
                todo: list[int] = []
                wanted: list[int] = []
                for position in positions:
                    row = batch[position]
                    if row["size"] > MAX_OBJECT_SIZE:
                        results[position] = (
                            "failed",
                            f"object of {row['size']} bytes is over the export limit",
                        )
                    else:
                        wanted.append(position)
                # network stores: the chunk's objects are read at once, not one round trip after another
                read: list[bytes | BaseException | None] = (
                    [None] * len(wanted)
                    if local_source
                    else await asyncio.gather(
                        *(self.store.read(batch[p]["storage_key"]) for p in wanted), return_exceptions=True
                    )
                )
                for position, data in zip(wanted, read, strict=True):
                    key, size = batch[position]["storage_key"], batch[position]["size"]
                    try:
                        if isinstance(data, BaseException):
                            raise data
                        sources.append(data if data is not None else (f"{root}/{validate_key(key)}", size))
                    except Exception as exc:
                        results[position] = ("failed", f"could not read the object: {exc.__class__.__name__}")
                        continue
                    todo.append(position)
                if not todo:
                    return
                # a BrokenProcessPool (a worker died) propagates: no instance can be blamed; the step is
                # retried on a new pool
                if executor is None:
                    outcomes = await loop.run_in_executor(None, _run, digest, pickled, sources, out_dir)
                else:
                    submitted = executor.submit(_run, digest, pickled, sources, out_dir)
                    try:
                        outcomes = await asyncio.wrap_future(submitted)
                    except asyncio.CancelledError:
                        if not submitted.cancel():  # running: it cannot be stopped, and it writes outputs
                            self._orphans.add(submitted)
                            submitted.add_done_callback(self._orphans.discard)
                        raise
                for position, (kind, detail) in zip(todo, outcomes, strict=True):
                    results[position] = (kind, detail)
                    if kind == "exported" and not isinstance(detail, str):
                        tickets[position] = await (sink.written(detail) if out_dir else sink.add(detail))
                        detail.data = b""  # stored: the step keeps only the UIDs (memory: see above)

        positions = list(range(len(batch)))
        try:
            await asyncio.gather(*(chunk(positions[i : i + CHUNK]) for i in range(0, len(batch), CHUNK)))
        except BrokenProcessPool:
            reset_process_pool(executor)
            raise
        # A cancelled batch's pool task may still be writing some of this batch's keys (its redo): with
        # O_TRUNC, a late writer empties the file and rewrites it, so it must be done before the flush
        # that makes this step's outputs durable, or the checkpoint could commit over an incomplete file.
        for orphan in list(self._orphans):
            with contextlib.suppress(Exception):  # its outcome belongs to no step; only its end matters
                await asyncio.wrap_future(orphan)
        stored = await sink.finish()
        for position, ticket in enumerate(tickets):
            if ticket is not None and stored[ticket] is not None:
                results[position] = ("failed", stored[ticket])
        return results

    async def _finish(self, conn: asyncpg.Connection, op: Operation, checkpoint: dict[str, Any]) -> Step:
        results: dict[str, Any] = progress(checkpoint)
        destination = op.params["destination"]
        rows = await conn.fetch(
            """SELECT identifier, kind, error, at FROM deid_export_error
               WHERE operation_id = $1 ORDER BY error_key""",
            op.id,
        )
        if destination["type"] == "partition":
            results["errors"] = [_error_line(r) for r in rows[:100]]
        elif rows:
            # the log lands beside the de-identified data: it names instances by their de-identified UIDs
            # (as the outputs do), so it links nothing back to this archive
            engine = await self._engine(conn, op)
            keep = "retain_uids" in op.params["options"]
            lines = [_error_line(r, None if keep else engine.keys.uid) for r in rows]
            log = b"".join(orjson.dumps(line) + b"\n" for line in lines)
            try:
                await (await self._destination_store(op)).put(f"{op.id_hex}/errors.log", log)
            except Exception as exc:  # e.g. credentials withdrawn since the check of the first step
                reason = unusable_reason(destination, exc)
                if reason is None:
                    raise
                return await self._fail(op, checkpoint, reason)
            results["errorHref"] = describe(destination, op.id_hex, "errors.log")
        self._engines.pop(op.id, None)
        self._drop_ahead(op.id)
        await self._close_store(op.id)
        return Step(checkpoint, 100, done=True, results=results)

    async def _fail(self, op: Operation, checkpoint: dict[str, Any], reason: str) -> Step:
        """End the operation failed, with the reason no retry would change."""
        log.info("operation %s: export failed: %s", op.id_hex, reason)
        self._engines.pop(op.id, None)
        self._drop_ahead(op.id)
        await self._close_store(op.id)
        return Step(
            checkpoint, 100, done=True, failed=True, results={**progress(checkpoint), "error": reason}
        )


def progress(checkpoint: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The operation's results while it runs: Azure's counts (exported, skipped, failed) and the progress
    figures, committed with each step. Bytes are the stored objects' sizes as the index records them
    (what is read from the archive); the rates are averaged over the time since the first step, so a
    pause (a crash before a resume) lowers them, as it lowers what the export sustains."""
    processed = checkpoint["exported"] + checkpoint["skipped"] + checkpoint["failed"]
    elapsed = max(0.0, (time.time() if now is None else now) - (checkpoint["started"] or 0.0))
    return {
        "exported": checkpoint["exported"],
        "skipped": checkpoint["skipped"],
        "failed": checkpoint["failed"],
        "instancesTotal": checkpoint["total"],
        "instancesProcessed": processed,
        "bytesProcessed": checkpoint["bytes"],
        "instancesPerSecond": round(processed / elapsed, 1) if elapsed > 0 else 0.0,
        "bytesPerSecond": round(checkpoint["bytes"] / elapsed) if elapsed > 0 else 0,
    }


def _identifier(row: asyncpg.Record) -> str:
    return f"{row['study_instance_uid']}/{row['series_instance_uid']}/{row['sop_instance_uid']}"


def _error_line(row: asyncpg.Record, remap: Callable[[str], str] | None = None) -> dict[str, str]:
    """Azure's error log properties, plus whether the instance was skipped (by rule) or failed; `remap`
    turns the original UIDs of the identifier into de-identified ones."""
    at: datetime = row["at"]
    identifier = row["identifier"]
    if remap is not None:
        identifier = "/".join(remap(part) for part in identifier.split("/"))
    return {
        "Timestamp": at.astimezone(UTC).isoformat(),
        "Identifier": identifier,
        "Error": row["error"],
        "Kind": row["kind"],
    }


def _mappings(results: list[Deidentified]) -> list[mapping.Mapping]:
    rows = []
    for r in results:
        rows.append(mapping.Mapping("patient", r.new.patient_id, r.original.patient_id, r.original.issuer))
        rows.append(mapping.Mapping("study", r.new.study, r.original.study))
        rows.append(mapping.Mapping("series", r.new.series, r.original.series))
        rows.append(mapping.Mapping("instance", r.new.sop, r.original.sop))
    return rows


def _split(identifier: str) -> tuple[str, str | None, str | None]:
    parts = identifier.split("/")
    return parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None


async def _instances(
    conn: asyncpg.Connection, partition: int, identifier: str, after: int, limit: int
) -> list[asyncpg.Record]:
    where, args = scope_sql(*_split(identifier))
    n = len(args) + 2
    return await conn.fetch(
        f"""SELECT i.instance_key, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid,
                   i.storage_key, i.size
            FROM instance i JOIN series se ON se.series_key = i.series_key
            JOIN study st ON st.study_key = i.study_key
            WHERE i.partition_key = $1 AND {where} AND i.instance_key > ${n}
            ORDER BY i.instance_key LIMIT ${n + 1}""",
        partition,
        *args,
        after,
        limit,
    )


async def count_instances(conn: asyncpg.Connection, partition: int, identifiers: list[str]) -> int:
    split = [_split(i) for i in identifiers]
    return await conn.fetchval(
        """SELECT count(*) FROM unnest($2::text[], $3::text[], $4::text[]) AS x(st, se, sop)
           JOIN study s ON s.partition_key = $1 AND s.study_instance_uid = x.st
           JOIN instance i ON i.study_key = s.study_key
           JOIN series r ON r.series_key = i.series_key
           WHERE (x.se IS NULL OR r.series_instance_uid = x.se)
             AND (x.sop IS NULL OR i.sop_instance_uid = x.sop)""",
        partition,
        [s[0] for s in split],
        [s[1] for s in split],
        [s[2] for s in split],
    )


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def export_settings(settings: Any) -> ExportSettings:
    """From the server's Settings (dicomweb.config): directory destinations live under export_dir."""
    export_dir = settings.export_dir or Path(settings.data_dir) / "exports"
    return ExportSettings(
        Path(export_dir).resolve(), settings.s3_endpoint_url, settings.s3_region, default_workers()
    )
