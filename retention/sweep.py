"""The retention sweep: a scheduled operation that ends restore windows and expires studies.

Each run first purges kept objects whose restore window has passed (archive.maintenance then deletes
them), then walks the partitions whose policy has `expireAfterDays` and deletes, through retention.deletion
(change feed entries; a restore window when the policy has a delay), every study first ingested that many
days ago or earlier, skipping studies under legal hold. A step commits a batch of studies with the
checkpoint, so a sweep interrupted by a crash resumes where it was, on any process.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from access.audit import AuditEvent, outcome_of, system_event
from indexer.operations import Operation, Step
from indexer.writes import lock_study_rows
from retention.deletion import Deletion, delete_in
from retention.guard import DeletionRefused, lock_study
from retention.policy import partitions_with_policy
from retention.window import purge_due

RETENTION_SWEEP = "retentionSweep"
SCHEDULE_LOCK = 4421  # queueing a sweep, once across processes (indexer.operations.schedule_operation)
STUDIES_PER_STEP = 20
# a step also ends once it has deleted this many instances, so that it commits well within its lease
INSTANCES_PER_STEP = 5000


class RetentionSweepHandler:
    """The operation handler; `clock` is the archive's (access.clock), `report` takes audit records."""

    def __init__(self, clock: Callable[[], datetime], report: Callable[[AuditEvent], None]) -> None:
        self._clock, self._report = clock, report

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        now = self._clock()
        cp: dict[str, Any] = op.checkpoint or {"phase": "purge", "partition": 0, "study": 0, "purged": 0,
                                                "expired": 0, "skipped": 0}  # fmt: skip
        names = {r[0]: r[1] for r in await conn.fetch("SELECT partition_key, name FROM partition")}
        events: list[AuditEvent] = []
        if cp["phase"] == "purge":
            step = await self._purge(conn, cp, now, names, events)
        else:
            step = await self._expire(conn, cp, now, names, events)
        # audited once the deletions have committed: a step that fails is rolled back and done again
        step.after_commit.append(lambda: self._report_all(events))
        return step

    def _report_all(self, events: list[AuditEvent]) -> None:
        for event in events:
            self._report(event)

    @staticmethod
    def _audit(events: list[AuditEvent], names: dict[int, str], partition_key: int, study: str, status: int,
               detail: str, now: datetime) -> None:  # fmt: skip
        events.append(
            system_event(
                "retention",
                "DELETE",
                f"/studies/{study}",
                status,
                outcome_of(status),
                detail,
                now,
                partition=names.get(partition_key),
                study=study,
            )
        )

    async def _purge(self, conn: asyncpg.Connection, cp: dict[str, Any], now: datetime,
                     names: dict[int, str], events: list[AuditEvent]) -> Step:  # fmt: skip
        purged = await purge_due(conn, now, studies=STUDIES_PER_STEP)
        for p in purged:
            detail = f"restore window ended: {p.objects} objects queued for deletion"
            self._audit(events, names, p.partition_key, p.study_instance_uid, 200, detail, now)
        cp = {**cp, "purged": cp["purged"] + sum(p.objects for p in purged)}
        if len(purged) < STUDIES_PER_STEP:
            cp["phase"] = "expire"
        return Step(cp, 10, results=_results(cp))

    async def _expire(self, conn: asyncpg.Connection, cp: dict[str, Any], now: datetime,
                      names: dict[int, str], events: list[AuditEvent]) -> Step:  # fmt: skip
        """Partitions in key order, studies of each in key order: the checkpoint is (partition, study)."""
        cp = dict(cp)
        for partition_key, policy in await partitions_with_policy(conn):
            if policy.expire_after_days is None or partition_key < cp["partition"]:
                continue
            if partition_key > cp["partition"]:
                cp.update(partition=partition_key, study=0)
            rows = await conn.fetch(
                """SELECT study_key, study_instance_uid, created_at FROM study s
                   WHERE partition_key = $1 AND study_key > $2 AND created_at <= $3
                     AND NOT EXISTS (SELECT 1 FROM legal_hold h WHERE h.partition_key = $1
                                     AND h.study_instance_uid = s.study_instance_uid)
                   ORDER BY study_key LIMIT $4""",
                partition_key,
                cp["study"],
                now - timedelta(days=policy.expire_after_days),
                STUDIES_PER_STEP,
            )
            # Every study of the step is locked before the first deletion holds the change feed's counter: the
            # retention lock of each (as delete_in takes it, first), then their patient and study rows.
            uids = [row["study_instance_uid"] for row in rows]
            for uid in uids:
                await lock_study(conn, partition_key, uid)
            await lock_study_rows(conn, partition_key, uids)
            deleted = 0
            for row in rows:
                if deleted >= INSTANCES_PER_STEP:
                    return Step(cp, 50, results=_results(cp))
                study_uid = row["study_instance_uid"]
                try:
                    deletion = await delete_in(conn, partition_key, study_uid, None, None, now, policy)
                except DeletionRefused as exc:  # held since the query: the hold wins
                    cp["skipped"] += 1
                    self._audit(events, names, partition_key, study_uid, 409, f"expiry skipped: {exc}", now)
                else:
                    cp["expired"] += 1
                    deleted += len(deletion.removed)
                    detail = (
                        f"expired: first ingest {row['created_at'].isoformat()}, expireAfterDays "
                        f"{policy.expire_after_days}; {_deleted(deletion)}"
                    )
                    self._audit(events, names, partition_key, study_uid, 204, detail, now)
                cp["study"] = row["study_key"]
            if len(rows) == STUDIES_PER_STEP:
                return Step(cp, 50, results=_results(cp))
            cp.update(partition=partition_key + 1, study=0)
        return Step(cp, 100, done=True, results=_results(cp))


def _deleted(deletion: Deletion) -> str:
    """What a deletion did, for its audit record."""
    until = deletion.restorable_until
    restorable = f", restorable until {until.isoformat()}" if until is not None else ""
    return f"{len(deletion.removed)} instances deleted{restorable}"


def _results(cp: dict[str, Any]) -> dict[str, Any]:
    return {"purgedObjects": cp["purged"], "expiredStudies": cp["expired"], "skippedStudies": cp["skipped"]}
