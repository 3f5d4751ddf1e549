"""Where a change feed consumer keeps its checkpoint: the Sequence of the last entry it has fully processed.

A checkpoint must survive a crash at any instant, so a stored value is either the old one or the new one,
never a torn mix:

* `FileCheckpoint` writes a temp file beside the target, fsyncs it, renames it over the target (atomic on
  POSIX) and fsyncs the directory so the rename itself is durable.
* `PostgresCheckpoint` keeps one row per consumer name in a table of its own (created on first use), for
  consumers that run on machines without a durable disk of their own.
* `MemoryCheckpoint` is for one-off reads (`dicomweb changefeed tail --from SEQ`).
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

import asyncpg


class CheckpointStore(Protocol):
    async def load(self) -> int:
        """The Sequence processed last (0: nothing yet, start at the beginning)."""
        ...

    async def save(self, sequence: int) -> None:
        """Record that every entry up to and including `sequence` is processed; durable on return."""
        ...


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be read as a sequence number."""


class MemoryCheckpoint:
    def __init__(self, sequence: int = 0) -> None:
        if sequence < 0:
            raise CheckpointError(f"a checkpoint is a sequence number >= 0, not {sequence}")
        self.sequence = sequence

    async def load(self) -> int:
        return self.sequence

    async def save(self, sequence: int) -> None:
        self.sequence = sequence


class FileCheckpoint:
    """A text file holding one decimal sequence number; missing means 0."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def load(self) -> int:
        return await asyncio.to_thread(self._read)

    async def save(self, sequence: int) -> None:
        await asyncio.to_thread(self._write, sequence)

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{self.path}: not a checkpoint file") from exc
        if not re.fullmatch(r"\d{1,19}", text):
            raise CheckpointError(f"{self.path}: expected a sequence number, found {text[:40]!r}")
        return int(text)

    def _write(self, sequence: int) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(f"{sequence}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class PostgresCheckpoint:
    """One row per consumer in `changefeed_checkpoint` (in any PostgreSQL, not necessarily the archive's)."""

    TABLE = """
        CREATE TABLE IF NOT EXISTS changefeed_checkpoint (
            consumer text PRIMARY KEY,
            sequence bigint NOT NULL CHECK (sequence >= 0),
            updated_at timestamptz NOT NULL DEFAULT now()
        )"""

    def __init__(self, pool: asyncpg.Pool, consumer: str) -> None:
        self.pool = pool
        self.consumer = consumer
        self._ready = False

    async def _ensure_table(self, conn: asyncpg.Connection) -> None:
        if not self._ready:
            await conn.execute(self.TABLE)
            self._ready = True

    async def load(self) -> int:
        async with self.pool.acquire() as conn:
            await self._ensure_table(conn)
            value = await conn.fetchval(
                "SELECT sequence FROM changefeed_checkpoint WHERE consumer = $1", self.consumer
            )
        return 0 if value is None else int(value)

    async def save(self, sequence: int) -> None:
        async with self.pool.acquire() as conn:
            await self._ensure_table(conn)
            await conn.execute(
                """INSERT INTO changefeed_checkpoint (consumer, sequence) VALUES ($1, $2)
                   ON CONFLICT (consumer) DO UPDATE SET sequence = excluded.sequence, updated_at = now()""",
                self.consumer,
                sequence,
            )
