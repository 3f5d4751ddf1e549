"""The scrub: re-read every stored object, and report those missing, altered or unreferenced.

It is a background operation (indexer.operations), so it resumes after a crash from its last committed step
and runs in one process at a time. Two phases, each a resumable walk:

1. the index, in instance_key order: each object is read whole and hashed; one that is gone is *missing*,
   one whose SHA-256 differs from the digest recorded at ingest is *altered*. A row deleted meanwhile (its
   object with it) is not a finding: both are re-checked against the index before they are reported.
   Then the same for the original versions that bulk updates keep (`instance_original`, by its key).
2. the store's listing, in its own order (BlobStore.list(start_after=)): an object that no index row
   references, that is not queued for deletion, and that is older than the grace period is *unreferenced*.
   The grace period spares uploads whose index rows are still to commit, as the orphan sweeper does; the
   sweeper deletes such objects later, the scrub only reports them.

Findings are rows of `scrub_finding` (migration 0019), committed with the step that found them, and go to a
reporter (the audit log in the server and the CLI). `rate` bounds the bytes read per second, so a scheduled
scrub leaves the disks to the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from archive.maintenance import unreferenced
from indexer.lookup import IndexedObject, is_indexed, objects_after, originals_after, window_objects_after
from indexer.operations import Operation, OperationSchedule, Step, schedule_operation
from storage.base import BlobNotFoundError, BlobStore
from storage.digests import digest_of, digests

log = logging.getLogger(__name__)

SCRUB = "scrub"
# One step reads at most this much (and at most STEP_ROWS objects), so it commits well within the lease
# even at a low rate (STEP_SECONDS of reading at `rate`).
STEP_BYTES = 256 << 20
STEP_ROWS = 2000
STEP_SECONDS = 5.0
# Objects up to this size are read whole, in batches of READ_BATCH_BYTES (one thread hop a batch on the
# local store); larger ones stream in chunks.
WHOLE_READ_MAX = 8 << 20
READ_BATCH_BYTES = 8 << 20
READ_AHEAD = 3
LIST_PAGE = 1000
DEFAULT_GRACE = timedelta(hours=1)  # as the orphan sweeper's
# one scheduler at a time decides whether a scrub is due (pg_advisory_xact_lock)
_SCHEDULE_LOCK = 4407  # not 4405: that is maintenance.DELETIONS_PAUSED_LOCK
MISSING, ALTERED, UNREFERENCED = "missing", "altered", "unreferenced"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    storage_key: str
    partition_key: int | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    recorded_sha256: bytes | None = None
    found_sha256: bytes | None = None
    size: int | None = None

    def describe(self) -> str:
        if self.kind == MISSING:
            return "missing: the index references it, the store does not hold it"
        if self.kind == ALTERED:
            recorded = self.recorded_sha256.hex() if self.recorded_sha256 else "?"
            found = self.found_sha256.hex() if self.found_sha256 else "?"
            return f"altered: SHA-256 {found}, recorded {recorded} at ingest ({self.size} bytes)"
        return f"unreferenced: no index row references it ({self.size} bytes)"


# What the composition root does with each new finding, and with the summary of a finished scrub.
Reporter = Callable[[uuid.UUID, Finding], None]
Summary = Callable[[uuid.UUID, dict[str, Any]], None]


def scrub_params(rate_mb: float = 0.0, grace: timedelta = DEFAULT_GRACE) -> dict[str, Any]:
    """An operation's input: the read rate in MB/s (0: as fast as the store goes), the grace period."""
    return {"rateMBps": float(rate_mb), "graceSeconds": grace.total_seconds()}


def _counts(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {
        "checkedObjects": checkpoint["checked"],
        "checkedBytes": checkpoint["bytes"],
        "listedObjects": checkpoint["listed"],
        MISSING: checkpoint[MISSING],
        ALTERED: checkpoint[ALTERED],
        UNREFERENCED: checkpoint[UNREFERENCED],
    }


class ScrubHandler:
    """The `scrub` operation: one step checks a slice of the index, or of the store's listing."""

    def __init__(
        self, store: BlobStore, *, report: Reporter | None = None, summary: Summary | None = None
    ) -> None:
        self.store = store
        self._report = report
        self._summary = summary

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        cp = op.checkpoint or {
            "phase": "index", "after": 0, "originalAfter": [0, ""], "windowAfter": "", "listedAfter": "",
            "checked": 0, "bytes": 0, "listed": 0, MISSING: 0, ALTERED: 0, UNREFERENCED: 0,
            "last": await conn.fetchval("SELECT coalesce(max(instance_key), 0) FROM instance"),
        }  # fmt: skip
        rate = float(op.params.get("rateMBps") or 0) * 1e6
        pace = _Pace(rate)
        if cp["phase"] == "index":
            found = await self._index_step(conn, cp, pace)
            percent = int(85 * min(1.0, cp["after"] / cp["last"])) if cp["last"] else 85
        elif cp["phase"] == "originals":
            found = await self._originals_step(conn, cp, pace)
            percent = 90
        elif cp["phase"] == "window":
            found = await self._window_step(conn, cp, pace)
            percent = 92
        else:
            grace = timedelta(seconds=float(op.params.get("graceSeconds", DEFAULT_GRACE.total_seconds())))
            found = await self._store_step(conn, cp, grace)
            percent = 95
        recorded = [finding for finding in found if await _record(conn, op.id, finding)]
        for finding in recorded:
            cp[finding.kind] += 1
        done = cp["phase"] == "done"
        results = _counts(cp)
        if done:
            results["clean"] = not (cp[MISSING] or cp[ALTERED] or cp[UNREFERENCED])
        step = Step(checkpoint=cp, percent=percent, done=done, results=results)
        # reported (audit log, metrics) once the findings are committed: a failed step is done again
        step.after_commit.append(lambda: self._announce(op.id, recorded, results if done else None))
        return step

    def _announce(self, op_id: uuid.UUID, findings: list[Finding], summary: dict[str, Any] | None) -> None:
        if self._report is not None:
            for finding in findings:
                self._report(op_id, finding)
        if summary is not None and self._summary is not None:
            self._summary(op_id, summary)

    async def _index_step(self, conn: asyncpg.Connection, cp: dict[str, Any], pace: _Pace) -> list[Finding]:
        rows = await objects_after(conn, cp["after"], STEP_ROWS)
        taken, suspects = await self._check_rows(rows, pace)
        if not taken:
            cp["phase"] = "originals"
            return []
        cp["after"] = taken[-1].instance_key
        return await self._settle(conn, cp, taken, suspects)

    async def _originals_step(
        self, conn: asyncpg.Connection, cp: dict[str, Any], pace: _Pace
    ) -> list[Finding]:
        after = cp.setdefault("originalAfter", [0, ""])  # a scrub begun before originals were checked
        rows = await originals_after(conn, (after[0], after[1]), STEP_ROWS)
        taken, suspects = await self._check_rows(rows, pace)
        if not taken:
            cp["phase"] = "window"
            return []
        cp["originalAfter"] = [taken[-1].partition_key, taken[-1].instance.sop_instance_uid]
        return await self._settle(conn, cp, taken, suspects)

    async def _window_step(self, conn: asyncpg.Connection, cp: dict[str, Any], pace: _Pace) -> list[Finding]:
        """Deleted instances' objects kept for a restore: a restore must bring back what was stored."""
        rows = await window_objects_after(conn, cp.setdefault("windowAfter", ""), STEP_ROWS)
        taken, suspects = await self._check_rows(rows, pace)
        if not taken:
            cp["phase"] = "store"
            return []
        cp["windowAfter"] = taken[-1].instance.storage_key
        return await self._settle(conn, cp, taken, suspects)

    async def _settle(
        self,
        conn: asyncpg.Connection,
        cp: dict[str, Any],
        taken: list[IndexedObject],
        suspects: list[Finding],
    ) -> list[Finding]:
        """Count a checked slice; its suspects that the index still references are the findings."""
        cp["checked"] += len(taken)
        cp["bytes"] += sum(row.instance.size for row in taken)
        if not suspects:
            return []
        # deleted (or replaced by a new version) since the page was read: the row went with the object
        still = await is_indexed(conn, [f.storage_key for f in suspects])
        return [f for f in suspects if f.storage_key in still]

    async def _check_rows(
        self, rows: list[IndexedObject], pace: _Pace
    ) -> tuple[list[IndexedObject], list[Finding]]:
        """Read and hash as many of `rows` as this step's byte budget allows: (those checked, suspects)."""
        budget = pace.step_bytes()
        taken, total = [], 0
        for row in rows:
            if taken and total + row.instance.size > budget:
                break
            taken.append(row)
            total += row.instance.size
        # batches of small objects, large ones alone; READ_AHEAD at once, so that one is read while
        # another is hashed (hashlib and the reads release the GIL)
        units: list[list[IndexedObject]] = []
        unit_bytes = READ_BATCH_BYTES
        for row in taken:
            if row.instance.size > WHOLE_READ_MAX:
                units.append([row])
                unit_bytes = READ_BATCH_BYTES  # the next small one starts a batch of its own
                continue
            if unit_bytes + row.instance.size > READ_BATCH_BYTES:
                units.append([])
                unit_bytes = 0
            units[-1].append(row)
            unit_bytes += row.instance.size
        slots = asyncio.Semaphore(READ_AHEAD)

        async def check(unit: list[IndexedObject]) -> list[Finding]:
            async with slots:
                if unit[0].instance.size > WHOLE_READ_MAX:
                    found = await self._check_streamed(unit[0])
                else:
                    found = await self._check_batch(unit)
                await pace.read(sum(row.instance.size for row in unit))
                return found

        suspects = [f for found in await asyncio.gather(*(check(u) for u in units)) for f in found]
        return taken, suspects

    async def _check_batch(self, batch: list[IndexedObject]) -> list[Finding]:
        bodies = await self.store.read_many([row.instance.storage_key for row in batch])
        hashes = await asyncio.to_thread(digests, bodies)
        return [
            finding
            for row, body, found in zip(batch, bodies, hashes, strict=True)
            if (finding := _compare(row, None if body is None else len(body), found)) is not None
        ]

    async def _check_streamed(self, row: IndexedObject) -> list[Finding]:
        size = 0

        async def counted() -> Any:
            nonlocal size
            async for chunk in self.store.stream(row.instance.storage_key):
                size += len(chunk)
                yield chunk

        try:
            found = await digest_of(counted())
        except BlobNotFoundError:
            return [_finding(MISSING, row)]
        finding = _compare(row, size, found)
        return [] if finding is None else [finding]

    async def _store_step(
        self, conn: asyncpg.Connection, cp: dict[str, Any], grace: timedelta
    ) -> list[Finding]:
        infos = []
        async with contextlib.aclosing(self.store.list(start_after=cp["listedAfter"])) as listing:
            async for info in listing:
                infos.append(info)
                if len(infos) >= LIST_PAGE:
                    break
        if not infos:
            cp["phase"] = "done"
            return []
        cp["listedAfter"] = infos[-1].key
        cp["listed"] += len(infos)
        cutoff = datetime.now(UTC) - grace
        old = {info.key: info for info in infos if info.modified.astimezone(UTC) < cutoff}
        if not old:
            return []
        return [Finding(UNREFERENCED, key, size=old[key].size) for key in await unreferenced(conn, list(old))]


def _finding(kind: str, row: IndexedObject, found: bytes | None = None, size: int | None = None) -> Finding:
    i = row.instance
    return Finding(
        kind, i.storage_key, row.partition_key, i.study_instance_uid, i.series_instance_uid,
        i.sop_instance_uid, i.sha256, found, size,
    )  # fmt: skip


def _compare(row: IndexedObject, size: int | None, found: bytes | None) -> Finding | None:
    if size is None or found is None:
        return _finding(MISSING, row)
    if found != row.instance.sha256 or size != row.instance.size:
        return _finding(ALTERED, row, found, size)
    return None


async def _record(conn: asyncpg.Connection, operation_id: uuid.UUID, f: Finding) -> bool:
    """Store a finding with the step; False when a replayed step had already recorded it."""
    inserted = await conn.fetchval(
        """INSERT INTO scrub_finding (operation_id, kind, storage_key, partition_key, study_instance_uid,
               series_instance_uid, sop_instance_uid, recorded_sha256, found_sha256, size)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (operation_id, storage_key) DO NOTHING RETURNING true""",
        operation_id, f.kind, f.storage_key, f.partition_key, f.study_instance_uid, f.series_instance_uid,
        f.sop_instance_uid, f.recorded_sha256, f.found_sha256, f.size,
    )  # fmt: skip
    return bool(inserted)


class _Pace:
    """Holds reading to `rate` bytes a second (0: no limit) by sleeping after each read."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.bytes = 0

    def step_bytes(self) -> int:
        return STEP_BYTES if not self.rate else max(1, min(STEP_BYTES, int(self.rate * STEP_SECONDS)))

    async def read(self, count: int) -> None:
        self.bytes += count
        if self.rate:
            ahead = self.bytes / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                await asyncio.sleep(ahead)


# -- reading the results ------------------------------------------------------------------------------


async def latest_scrub(
    conn: asyncpg.Connection | asyncpg.Pool, *, finished: bool = False
) -> asyncpg.Record | None:
    """The operation row of the most recent scrub (`finished`: the most recent that succeeded)."""
    condition = " AND status = 'succeeded'" if finished else ""
    return await conn.fetchrow(
        f"SELECT * FROM operation WHERE type = $1{condition} ORDER BY created_at DESC LIMIT 1", SCRUB
    )


async def findings(
    conn: asyncpg.Connection | asyncpg.Pool, operation_id: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    """A scrub's findings in the order they were found, with the partition's name."""
    return await conn.fetch(
        """SELECT f.*, p.name AS partition_name FROM scrub_finding f
           LEFT JOIN partition p ON p.partition_key = f.partition_key
           WHERE f.operation_id = $1 ORDER BY f.finding_id LIMIT $2""",
        operation_id,
        limit,
    )


# -- the schedule ---------------------------------------------------------------------------------------


async def schedule_scrub(pool: asyncpg.Pool, interval: timedelta, params: dict[str, Any]) -> uuid.UUID | None:
    """Queue a scrub when none is unfinished and the last one was queued `interval` ago or more; the id of
    the new operation, else None (indexer.operations.schedule_operation)."""
    return await schedule_operation(pool, SCRUB, interval, params, lock=_SCHEDULE_LOCK)


class ScrubSchedule(OperationSchedule):
    """Queues a scrub every `interval` and pokes the runner that claims it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        interval: timedelta,
        params: dict[str, Any],
        poke: Callable[[], None],
        *,
        check_every: float = 600.0,
    ) -> None:
        super().__init__(pool, SCRUB, interval, params, poke, lock=_SCHEDULE_LOCK, check_every=check_every)
