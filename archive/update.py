"""The `update` operation (bulk update): rewrite every instance of the listed studies with the changed
attributes, as new versions.

Runs under indexer.operations. Each step takes the next batch of instances (studies in request order, each
study's instances in SOP Instance UID order, which a new version keeps, unlike its instance_key) and:

1. reads their objects, several at once, and rewrites them on the ingest thread (dicomcore.rewrite splices
   the changed elements in: pixel data and transfer syntax stay byte for byte; then the same preparation as
   a STOW: hash, parse, metadata, bulk data index);
2. writes each new object under a new key (the stored ones are never overwritten) and makes them durable;
3. in the step's transaction: replaces the index rows (indexer.writes.replace_instances keeps each
   instance's first version as its original), appends one change feed `update` entry per instance, and
   commits them with the checkpoint.

So a reader sees an instance either before or after its update, never between; a crash loses at most the
uncommitted step (its new objects are unreferenced, and the orphan sweeper removes them) and the next claim
resumes from the checkpoint. An instance that cannot be rewritten (unreadable object, a value its character
set cannot hold) is reported in the results and its study counted as failed, as Azure does; the operation
then ends `failed`.

Operations that update the same study run in the order they were queued: a step waits (releasing its
lease) while an older unfinished update names one of its studies, so the last one queued wins.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from archive.ingest import Prepared, prepare, prepare_executor, record_of, storage_key
from archive.update_request import UPDATE, parse_change_dataset
from changefeed.log import Action, Change, append
from dicomcore.rewrite import Changes, RewriteError
from indexer.lookup import StoredInstance, instances_by_uid, partition_key, study_instances_after_uid
from indexer.operations import Operation, Step
from indexer.writes import NewVersion, replace_instances
from storage.base import BlobNotFoundError, BlobStore

log = logging.getLogger(__name__)

BATCH = 256  # instances per step (one transaction): well under a second of work, far below the lease
BATCH_BYTES = 64 << 20  # and at most this much stored data, so large objects make small steps
CHUNK = 16  # instances per call on the ingest thread (a thread hop costs about one small rewrite)
IN_FLIGHT = 4  # chunks being read, rewritten or written at once
PART = 64  # instances rewritten while the part before them is indexed
MAX_OBJECT_SIZE = 512 << 20  # objects are rewritten in memory; larger ones fail with a clear error
MAX_ERRORS = 100  # error messages kept in the results
RETRIES = 3  # an instance changed by someone else between read and commit is read again this often
WAIT_SECONDS = 1.0  # how soon a step that waits for an older update of the same study tries again

_START: dict[str, Any] = {
    "index": 0,  # position in studyInstanceUids
    "after": "",  # last SOP Instance UID done in that study
    "studyHasFailure": False,
    "studyUpdated": 0,
    "studyFailed": 0,
    "instanceUpdated": 0,
    "errors": [],
}


@dataclass(slots=True)
class _Instance:
    instance_key: int
    stored: StoredInstance
    new: Prepared | None = None
    new_key: str | None = None
    error: str | None = None

    @property
    def sop_instance_uid(self) -> str:
        return self.stored.sop_instance_uid

    @property
    def study_instance_uid(self) -> str:
        return self.stored.study_instance_uid


def _rewrite_chunk(
    chunk: list[tuple[_Instance, bytes | None]],
    changes: Changes,
    partition: int,
    read: Callable[[str], bytes] | None,
    write: Callable[[str, bytes], int] | None,
) -> None:
    """On the ingest thread: (local store) read, rewrite, prepare and (local store) write each object;
    errors per instance. One thread call for all of it saves the thread hops of each read and write."""
    for instance, data in chunk:
        if data is None:
            assert read is not None
            try:
                data = read(instance.stored.storage_key)
            except BlobNotFoundError:
                instance.error = "the stored object is missing"
                continue
        try:
            rewritten = changes.apply(data)
            prepared = prepare(io.BytesIO(rewritten))
        except (RewriteError, ValueError) as exc:
            instance.error = str(exc)
            continue
        parsed = prepared.parsed
        stored = instance.stored
        if (parsed.study_instance_uid, parsed.series_instance_uid, parsed.sop_instance_uid) != (
            stored.study_instance_uid,
            stored.series_instance_uid,
            stored.sop_instance_uid,
        ):
            instance.error = "the stored object's UIDs differ from its index row"
            continue
        key = storage_key(partition, parsed)
        prepared.data = rewritten
        if write is not None:
            try:
                write(key, rewritten)
            except Exception as exc:  # storage failures are per instance, as at ingest
                instance.error = f"could not store the new version: {exc.__class__.__name__}"
                continue
            prepared.data = None  # written: no copy kept
        instance.new, instance.new_key = prepared, key


class UpdateHandler:
    """Registered as the `update` operation (dicomweb/app.py); the HL7 listener queues the same operations."""

    def __init__(self, store: BlobStore, *, batch: int = BATCH) -> None:
        self.store = store
        self.batch = batch

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        cp = {**_START, **(op.checkpoint or {})}
        uids: list[str] = op.params["studyInstanceUids"]
        try:
            changes = Changes(parse_change_dataset(op.params["changeDataset"]))
        except ValueError as exc:  # queued by a front door that did not check it
            cp["errors"] = [*cp["errors"], f"changeDataset: {exc}"]
            return Step(cp, 100, done=True, failed=True, results=_results(cp))
        partition = await partition_key(conn, op.params["partition"], create=False)
        if partition is None:  # no partition, no studies: nothing to update, as for unknown studies
            cp["studyUpdated"], cp["index"] = cp["studyUpdated"] + len(uids) - cp["index"], len(uids)
        elif await _older_update_pending(conn, op, uids):
            return Step(cp, _percent(cp, uids), results=_results(cp), defer=WAIT_SECONDS)
        else:
            failed: set[str] = {uids[cp["index"]]} if cp["studyHasFailure"] else set()
            instances, ended = await self._next_batch(conn, partition, uids, cp)
            await self._update(conn, partition, changes, instances, cp, failed)
            for study in ended:  # a study without instances counts as updated, as in Azure
                cp["studyFailed" if study in failed else "studyUpdated"] += 1
            cp["studyHasFailure"] = cp["index"] < len(uids) and uids[cp["index"]] in failed
        done = cp["index"] >= len(uids)
        failed_op = done and bool(cp["errors"])
        return Step(cp, _percent(cp, uids), done=done, failed=failed_op, results=_results(cp))

    async def _next_batch(
        self, conn: asyncpg.Connection, partition: int, uids: list[str], cp: dict[str, Any]
    ) -> tuple[list[_Instance], list[str]]:
        """The next instances in walk order and the studies whose walk they end; advances cp past them."""
        batch: list[_Instance] = []
        ended: list[str] = []
        size = 0
        while cp["index"] < len(uids) and len(batch) < self.batch and size < BATCH_BYTES:
            study = uids[cp["index"]]
            limit = self.batch - len(batch)
            rows = await study_instances_after_uid(conn, partition, study, cp["after"], limit)
            for key, stored in rows:
                if batch and size + stored.size > BATCH_BYTES:
                    return batch, ended
                batch.append(_Instance(key, stored))
                size += stored.size
                cp["after"] = stored.sop_instance_uid
            if len(rows) < limit:  # the study has no more instances
                ended.append(study)
                cp["index"], cp["after"] = cp["index"] + 1, ""
        return batch, ended

    async def _update(
        self,
        conn: asyncpg.Connection,
        partition: int,
        changes: Changes,
        instances: list[_Instance],
        cp: dict[str, Any],
        failed: set[str],
    ) -> None:
        """Rewrite and re-index the batch in the step's transaction. Parts of it are pipelined: the next
        part is rewritten (ingest thread, store) while this one is indexed (PostgreSQL)."""
        changed: list[Change] = []
        written: list[str] = []
        pending = instances
        for attempt in range(RETRIES):
            if not pending:
                break
            stale: list[_Instance] = []
            parts = [pending[i : i + PART] for i in range(0, len(pending), PART)]
            ahead = asyncio.ensure_future(self._rewrite(partition, changes, parts[0]))
            try:
                for n, part in enumerate(parts):
                    await ahead
                    if n + 1 < len(parts):
                        ahead = asyncio.ensure_future(self._rewrite(partition, changes, parts[n + 1]))
                    ready = [i for i in part if i.new is not None and i.error is None]
                    for instance in part:
                        if instance.new is None or instance.error is not None:
                            _fail(cp, failed, instance, instance.error or "not rewritten")
                            await _delete_quietly(self.store, instance.new_key)
                    versions = [_version(i) for i in ready]
                    new_keys = await replace_instances(conn, partition, versions)
                    for instance, version, key in zip(ready, versions, new_keys, strict=True):
                        if key is None:  # deleted or replaced since it was read
                            stale.append(instance)
                            await _delete_quietly(self.store, instance.new_key)  # nothing references it
                            continue
                        stored = instance.stored
                        written.append(version.record.storage_key)
                        changed.append(
                            Change(
                                stored.study_instance_uid,
                                stored.series_instance_uid,
                                stored.sop_instance_uid,
                                key,
                                Action.UPDATE,
                            )
                        )
            finally:
                ahead.cancel()
            pending = []
            if stale and attempt + 1 < RETRIES:  # as indexed now (those still there), to be done again
                sop_uids = [i.sop_instance_uid for i in stale]
                pending = [_Instance(*row) for row in await instances_by_uid(conn, partition, sop_uids)]
            for instance in stale if attempt + 1 == RETRIES else []:
                _fail(cp, failed, instance, "changed by another writer while it was being updated")
        await self.store.make_durable(written)  # before the commit: no row commits before its object
        cp["instanceUpdated"] += len(changed)
        # the feed entries commit with the rows they describe, with the step; last: the counter lock it
        # takes serialises every writer's commit until ours
        await append(conn, partition, changed)

    async def _rewrite(self, partition: int, changes: Changes, instances: list[_Instance]) -> None:
        loop = asyncio.get_running_loop()
        read, write = self.store.blocking_reader(), self.store.blocking_writer()
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def chunk(part: list[_Instance]) -> None:
            async with slots:
                readable = [i for i in part if _readable(i)]
                if read is None:  # read on the event loop, several at once
                    data = await asyncio.gather(*(self._read(i) for i in readable))
                    loaded = [(i, d) for i, d in zip(readable, data, strict=True) if d is not None]
                else:
                    loaded = [(i, None) for i in readable]
                if loaded:
                    await loop.run_in_executor(
                        prepare_executor(), _rewrite_chunk, loaded, changes, partition, read, write
                    )
                unstored = [i for i in part if i.new is not None and i.new.data is not None]
                await asyncio.gather(*(self._put(instance) for instance in unstored))

        await asyncio.gather(*(chunk(instances[i : i + CHUNK]) for i in range(0, len(instances), CHUNK)))

    async def _read(self, instance: _Instance) -> bytes | None:
        try:
            return await self.store.read(instance.stored.storage_key)
        except BlobNotFoundError:
            instance.error = "the stored object is missing"
            return None

    async def _put(self, instance: _Instance) -> None:
        assert instance.new is not None and instance.new.data is not None and instance.new_key is not None
        try:
            await self.store.put(instance.new_key, instance.new.data, durable=False)
        except Exception as exc:
            instance.error, instance.new = f"could not store the new version: {exc.__class__.__name__}", None
            return
        instance.new.data = None


def _version(instance: _Instance) -> NewVersion:
    assert instance.new is not None and instance.new_key is not None
    return NewVersion(
        instance.instance_key, instance.stored.storage_key, record_of(instance.new, instance.new_key)
    )


def _readable(instance: _Instance) -> bool:
    """Reset for a (re)try; False (with the error) for objects too large to rewrite in memory."""
    instance.new, instance.new_key, instance.error = None, None, None
    size = instance.stored.size
    if size > MAX_OBJECT_SIZE:
        instance.error = f"the object is {size} bytes, over the {MAX_OBJECT_SIZE}-byte limit"
        return False
    return True


async def _older_update_pending(conn: asyncpg.Connection, op: Operation, uids: list[str]) -> bool:
    """Whether an update queued before this one, still unfinished, names one of the same studies."""
    return await conn.fetchval(
        """SELECT EXISTS (SELECT FROM operation
               WHERE type = $1 AND status IN ('notStarted', 'running')
                 AND (created_at, operation_id) < ($2, $3)
                 AND params->>'partition' = $4 AND params->'studyInstanceUids' ?| $5::text[])""",
        UPDATE,
        op.created_at,
        op.id,
        op.params["partition"],
        uids,
    )


async def _delete_quietly(store: BlobStore, key: str | None) -> None:
    if key is None:
        return
    try:
        await store.delete(key)
    except Exception:  # unreferenced: the orphan sweeper removes it later
        log.warning("bulk update: could not delete unreferenced object %s", key)


def _fail(cp: dict[str, Any], failed: set[str], instance: _Instance, reason: str) -> None:
    failed.add(instance.study_instance_uid)
    if len(cp["errors"]) < MAX_ERRORS:
        message = (
            f"Failed to update instance {instance.sop_instance_uid} of study {instance.study_instance_uid}: "
            f"{reason}"
        )
        cp["errors"] = [*cp["errors"], message]


def _percent(cp: dict[str, Any], uids: list[str]) -> int:
    return cp["index"] * 100 // max(1, len(uids))


def _results(cp: dict[str, Any]) -> dict[str, Any]:
    """Azure's results of an update operation."""
    results = {k: cp[k] for k in ("studyUpdated", "studyFailed", "instanceUpdated")}
    if cp["errors"]:
        results["errors"] = cp["errors"]
    return results
