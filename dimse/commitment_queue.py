"""Storage Commitment reports owed to peers, kept in PostgreSQL (migration 0030) until they are delivered.

A report used to wait in the memory of the process that took the request, so a restart (or a node of
several dying) lost it. Here the request is a row, written before the N-ACTION is answered. A process
sends a report only under a claim: `claim_*` moves `next_attempt_at` past the attempt's longest duration
(`CLAIM`) and sets a fresh token, in one statement on a row no one else has locked (`FOR UPDATE SKIP
LOCKED`), which is the operations' claim (indexer/operations.py) without a connection held during the
network I/O. The claim's token guards the writes that end the attempt. A process that dies mid-attempt
leaves a row that is due again when its claim runs out, and any process then sends it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import orjson

# An attempt's longest duration: the same association waits 15 s for the peer's answer, a new one at most
# 10 s to connect, 30 s for the association and 30 s for the answer (dimse/commitment_delivery.py). A
# claim outlives that, so a report is never sent by two processes at once.
CLAIM = timedelta(seconds=120)
EXPIRY = timedelta(hours=24)  # a report not delivered by then is dropped (the peer has long asked again)
BACKOFF_CAP = 300.0  # seconds between attempts, at most


@dataclass(frozen=True, slots=True)
class Pending:
    commitment_id: int
    claim: uuid.UUID
    transaction_uid: str
    ae_title: str
    partition: str
    peer_address: str
    references: list[tuple[str, str]]
    attempts: int  # failed attempts before this one
    received_at: datetime


_COLUMNS = (
    "commitment_id, claim, transaction_uid, ae_title, partition_name, peer_address, refs, attempts, "
    "received_at"
)


def _pending(row: asyncpg.Record) -> Pending:
    return Pending(
        row["commitment_id"], row["claim"], row["transaction_uid"], row["ae_title"], row["partition_name"],
        row["peer_address"], [(c, i) for c, i in orjson.loads(row["refs"])], row["attempts"],
        row["received_at"],
    )  # fmt: skip


async def enqueue(
    pool: asyncpg.Pool, transaction_uid: str, ae_title: str, partition: str, peer_address: str,
    references: Sequence[tuple[str, str]],
) -> Pending:  # fmt: skip
    """Record an accepted request, claimed by the caller for its first attempt (on the request's
    association); committed when this returns."""
    row = await pool.fetchrow(
        f"""INSERT INTO dimse_commitment (transaction_uid, ae_title, partition_name, peer_address, refs,
                                          expires_at, next_attempt_at, claim)
            VALUES ($1, $2, $3, $4, $5::text::jsonb, now() + $6::interval, now() + $7::interval, $8)
            RETURNING {_COLUMNS}""",
        transaction_uid, ae_title, partition, peer_address, orjson.dumps(references).decode(), EXPIRY, CLAIM,
        uuid.uuid4(),
    )  # fmt: skip
    return _pending(row)


async def claim_due(pool: asyncpg.Pool) -> Pending | None:
    """Claim the report due soonest, if any is due and unexpired."""
    row = await pool.fetchrow(
        f"""UPDATE dimse_commitment SET next_attempt_at = now() + $1::interval, claim = $2
            WHERE commitment_id = (
                SELECT commitment_id FROM dimse_commitment
                WHERE next_attempt_at <= now() AND expires_at > now()
                ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING {_COLUMNS}""",
        CLAIM, uuid.uuid4(),
    )  # fmt: skip
    return None if row is None else _pending(row)


async def delivered(pool: asyncpg.Pool, pending: Pending) -> None:
    """The report was answered (or can never be sent): the request is done."""
    await pool.execute(
        "DELETE FROM dimse_commitment WHERE commitment_id = $1 AND claim = $2", pending.commitment_id,
        pending.claim,
    )  # fmt: skip


def backoff(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones: 1, 2, 4, ... up to BACKOFF_CAP."""
    return min(2.0 ** max(attempts - 1, 0), BACKOFF_CAP)


async def retry_later(pool: asyncpg.Pool, pending: Pending, error: str, *, failed: bool = True) -> None:
    """End the claim: due again after the back-off of one more failed attempt, or at once when the attempt
    did not fail but could not be made here (`failed=False`: the request's association had ended)."""
    attempts = pending.attempts + (1 if failed else 0)
    wait = timedelta(seconds=backoff(attempts)) if failed else timedelta(0)
    await pool.execute(
        """UPDATE dimse_commitment SET attempts = $3, last_error = $4, next_attempt_at = now() + $5::interval,
                                      claim = NULL
           WHERE commitment_id = $1 AND claim = $2""",
        pending.commitment_id, pending.claim, attempts, error, wait,
    )  # fmt: skip


async def remove_expired(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Delete expired requests nobody is sending now; their rows, for the audit log."""
    return await pool.fetch(
        """DELETE FROM dimse_commitment WHERE commitment_id IN (
               SELECT commitment_id FROM dimse_commitment
               WHERE expires_at <= now() AND next_attempt_at <= now() FOR UPDATE SKIP LOCKED)
           RETURNING transaction_uid, ae_title, partition_name, peer_address, attempts, last_error"""
    )
