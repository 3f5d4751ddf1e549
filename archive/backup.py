"""Consistent backups of a running archive, and restoring one onto a new database and blob store.

A backup is a directory:

    manifest.json    written last: a backup without it is incomplete and restore refuses it
    database.dump    pg_dump (custom format) of the index, change feed, tokens, operations, ...
    objects.jsonl    every object the dumped index references (current versions and the originals that bulk
                     updates keep): {"key", "sha256", "size"}, sorted by key
    objects/<key>    a copy of each of them, verified against its digest as it was copied

Consistency: one REPEATABLE READ transaction exports its snapshot; `pg_dump --snapshot` dumps exactly that
state, and the same transaction reads the change feed's last sequence and the object list. So the dump,
the object list and `changefeed_sequence` describe one instant, while the archive keeps serving.

Objects are immutable, so copying them after the snapshot copies what the snapshot saw. The one hazard is
a DELETE committed after the snapshot: its objects are queued in `blob_deletion` and removed shortly after.
Before taking the snapshot the backup takes `DELETIONS_PAUSED_LOCK` (archive/maintenance.py) and holds it
until every object is copied; the drains of every server process skip their rounds meanwhile, so queued
deletions wait and nothing the snapshot references disappears (the orphan sweep spares queued objects).
A backup that dies releases the lock with its connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import asyncpg
import orjson

from archive.maintenance import DELETIONS_PAUSED_LOCK
from indexer.embedded import EmbeddedPostgresError, PgBinaries, find_pg_binaries
from indexer.lookup import all_objects
from indexer.migrate import migrate
from storage.base import READ_CHUNK_SIZE, BlobNotFoundError, BlobStore, validate_key

log = logging.getLogger(__name__)

FORMAT = "dicomweb-backup/1"
MANIFEST = "manifest.json"
DUMP = "database.dump"
OBJECT_LIST = "objects.jsonl"
OBJECTS = "objects"


class BackupError(Exception):
    """The backup or restore cannot go on (message says why and what to do)."""


@dataclass(frozen=True)
class ObjectEntry:
    key: str
    sha256: str  # hex
    size: int


@dataclass(frozen=True)
class BackupSummary:
    changefeed_sequence: int
    objects: int
    bytes: int


async def pg_tools(conn: asyncpg.Connection) -> PgBinaries:
    """PostgreSQL client binaries for this server: its own major version where installed, else the newest
    (pg_dump reads older servers; the same lookup as the embedded server's, indexer/embedded.py)."""
    major = str(conn.get_server_version().major)
    try:
        return find_pg_binaries(major)
    except EmbeddedPostgresError:
        return find_pg_binaries()


async def _run_tool(binaries: PgBinaries, name: str, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        binaries.tool(name),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise BackupError(f"{name} failed (exit {process.returncode}): {output.decode(errors='replace')}")


def _object_path(root: Path, key: str) -> Path:
    return root / OBJECTS / validate_key(key)


async def backup(
    dsn: str,
    store: BlobStore,
    dest: Path,
    *,
    concurrency: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> BackupSummary:
    """Back the archive at `dsn` + `store` up into the new (or empty) directory `dest`."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty; back up into a new directory")
    # the whole archive is in here (patient data, token hashes, the audit log): its owner's only
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.chmod(0o700)
    guard = await asyncpg.connect(dsn)
    try:
        # Waits for drains in flight (they hold the lock shared) to commit; then no deletion can start.
        await guard.execute("SELECT pg_advisory_lock($1)", DELETIONS_PAUSED_LOCK)
        sequence, entries, server_version = await _dump_at_snapshot(dsn, dest)
        copied = await _copy_objects(store, dest, entries, concurrency, progress)
    finally:
        await guard.close()  # releases the lock: queued deletions resume
    manifest = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "changefeed_sequence": sequence,
        "objects": len(entries),
        "bytes": copied,
        "postgres": server_version,
    }
    _write_durably(dest / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return BackupSummary(sequence, len(entries), copied)


async def _dump_at_snapshot(dsn: str, dest: Path) -> tuple[int, list[ObjectEntry], str]:
    """pg_dump, the change feed's last sequence and the object list, all at one exported snapshot."""
    conn = await asyncpg.connect(dsn)
    try:
        binaries = await pg_tools(conn)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            sequence = int(await conn.fetchval("SELECT last_sequence FROM changefeed_counter"))
            rows = await all_objects(conn)
            entries = [ObjectEntry(r[0], r[1], int(r[2])) for r in rows]
            # The snapshot stays importable only while this transaction is open.
            await _run_tool(
                binaries, "pg_dump", "--format=custom", f"--snapshot={snapshot}", f"--file={dest / DUMP}",
                f"--dbname={dsn}",
            )  # fmt: skip
            (dest / DUMP).chmod(0o600)
        # asyncpg reads "15.14" as major 15, minor 0, micro 14: the server's own text says which release
        server_version = str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()
    lines = (orjson.dumps({"key": e.key, "sha256": e.sha256, "size": e.size}) for e in entries)
    _write_durably(dest / OBJECT_LIST, b"".join(line + b"\n" for line in lines))
    log.info("dumped the index at change feed sequence %d: %d objects to copy", sequence, len(entries))
    return sequence, entries, server_version


async def _bounded(
    items: list[ObjectEntry],
    concurrency: int,
    work: Callable[[ObjectEntry], Awaitable[int]],
    progress: Callable[[int, int], None] | None,
) -> int:
    """Run `work` over the items, `concurrency` at a time; the sum of what it returns."""
    total, done = 0, 0
    queue = iter(items)

    async def worker() -> None:
        nonlocal total, done
        for entry in queue:
            size = await work(entry)  # not `total += await ...`: that reads total before the await
            total += size
            done += 1
            if progress is not None and (done % 1000 == 0 or done == len(items)):
                progress(done, len(items))

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(concurrency, len(items)))):
                group.create_task(worker())
    except ExceptionGroup as group:  # the first failure says what is wrong; the others are alike
        raise group.exceptions[0] from None
    return total


async def _copy_objects(
    store: BlobStore,
    dest: Path,
    entries: list[ObjectEntry],
    concurrency: int,
    progress: Callable[[int, int], None] | None,
) -> int:
    async def copy(entry: ObjectEntry) -> int:
        path = _object_path(dest, entry.key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True, mode=0o700)
        digest, size = hashlib.sha256(), 0
        try:
            with _create_private(path) as out:
                async for chunk in store.stream(entry.key):
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(os.fsync, out.fileno())
        except BlobNotFoundError:
            raise BackupError(
                f"object {entry.key} is indexed in the backup's snapshot but missing from the blob store; "
                "run `dicomweb scrub` on the archive"
            ) from None
        _check(entry, digest.hexdigest(), size, "in the blob store")
        return size

    return await _bounded(entries, concurrency, copy, progress)


def _check(entry: ObjectEntry, sha256: str, size: int, where: str) -> None:
    if sha256 != entry.sha256 or size != entry.size:
        raise BackupError(
            f"object {entry.key} {where} does not match its digest recorded at ingest "
            f"(sha256 {sha256}, {size} bytes; expected {entry.sha256}, {entry.size} bytes)"
        )


def _create_private(path: Path) -> BinaryIO:
    """A new file (or one left by an interrupted copy, emptied) that only its owner can read."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with _create_private(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(source: Path) -> dict:
    try:
        manifest = orjson.loads((Path(source) / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise BackupError(f"{source} has no {MANIFEST}: not a backup, or one that did not finish") from None
    except orjson.JSONDecodeError as exc:
        raise BackupError(
            f"{Path(source) / MANIFEST} is not valid JSON ({exc}): the backup is damaged"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BackupError(f"{source}: unknown backup format {found!r} (expected {FORMAT})")
    return manifest


def read_object_list(source: Path) -> list[ObjectEntry]:
    path = Path(source) / OBJECT_LIST
    entries = []
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise BackupError(f"{path} is missing: the backup is damaged") from None
    for number, line in enumerate(lines, 1):
        try:
            item = orjson.loads(line)
            entries.append(ObjectEntry(item["key"], item["sha256"], int(item["size"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BackupError(
                f"{path} line {number} is not an object entry ({exc!r}): the backup is damaged"
            ) from None
    return entries


def check_backup(source: Path, manifest: dict, entries: list[ObjectEntry]) -> None:
    """Before anything is written: the object list is the one the manifest counted, and each listed copy
    is there with its size (digests are checked as the copies are read). An object list that lost lines
    restored an index whose instances had no objects, and said every digest was checked."""
    count, total = len(entries), sum(e.size for e in entries)
    if (count, total) != (manifest.get("objects"), manifest.get("bytes")):
        raise BackupError(
            f"{Path(source) / OBJECT_LIST} lists {count} objects of {total} bytes, {MANIFEST} "
            f"{manifest.get('objects')} of {manifest.get('bytes')}: the backup is damaged"
        )
    for entry in entries:
        path = _object_path(source, entry.key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BackupError(f"{path} is missing: the backup is damaged") from None
        if size != entry.size:
            raise BackupError(
                f"{path} is {size} bytes, {OBJECT_LIST} says {entry.size}: the backup is damaged"
            )


async def restore(
    source: Path,
    dsn: str,
    store: BlobStore,
    *,
    concurrency: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> BackupSummary:
    """Bring a backup up on an empty database and blob store: load the dump, apply newer migrations, copy
    every object in and read each back to check its digest. Returns what was restored."""
    source = Path(source)
    manifest = read_manifest(source)
    entries = read_object_list(source)
    await asyncio.to_thread(check_backup, source, manifest, entries)
    # Objects already there would be unreferenced in the restored index, and its sweeper would delete them
    # after the grace period: another archive's objects, if this is its bucket and prefix.
    async for found in store.list(""):
        raise BackupError(
            f"the target blob store is not empty (it holds {found.key}, and the restored archive would "
            "delete what its index does not reference): restore into an empty one"
        )
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('instance') IS NOT NULL"):
            raise BackupError("the target database already holds an archive; restore into an empty one")
        binaries = await pg_tools(conn)
        await _run_tool(
            binaries, "pg_restore", "--no-owner", "--no-privileges", "--exit-on-error",
            "--single-transaction", f"--dbname={dsn}", str(source / DUMP),
        )  # fmt: skip
        applied = await migrate(conn)  # a backup of an older release gets the newer migrations
        if applied:
            log.info("applied migrations newer than the backup: %s", ", ".join(applied))
    finally:
        await conn.close()

    async def put(entry: ObjectEntry) -> int:
        path = _object_path(source, entry.key)
        digest = hashlib.sha256()

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, READ_CHUNK_SIZE):
                    digest.update(chunk)
                    yield chunk

        try:
            size = await store.put(entry.key, chunks())
        except FileNotFoundError:
            raise BackupError(f"{path} is missing: the backup is damaged") from None
        _check(entry, digest.hexdigest(), size, "in the backup")
        return size

    # A restore that fails from here on leaves a half-restored target: discard it and start on an empty one.
    copied = await _bounded(entries, concurrency, put, progress)
    await verify_objects(store, entries, concurrency=concurrency)
    return BackupSummary(int(manifest["changefeed_sequence"]), len(entries), copied)


async def verify_objects(store: BlobStore, entries: list[ObjectEntry], *, concurrency: int = 8) -> None:
    """Read every object back from the store and check it against its recorded digest and size."""

    async def check(entry: ObjectEntry) -> int:
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in store.stream(entry.key):
                digest.update(chunk)
                size += len(chunk)
        except BlobNotFoundError:
            raise BackupError(f"object {entry.key} is missing from the restored blob store") from None
        _check(entry, digest.hexdigest(), size, "in the restored blob store")
        return size

    await _bounded(entries, concurrency, check, None)
