"""Retries with back-off for operations that talk to a DIMSE peer (acquisition, $send).

A peer that is down or drops an association is an ordinary event (a PACS restarts, a link fails), so
these operations retry on their own, kept in the operation's checkpoint so that a retry survives a restart
of the archive too: each failed attempt doubles the wait before the next (1 s, 2 s, 4 s, ... up to a cap),
and after `max_attempts` failed attempts in a row the step raises, which the operation runner turns into
a failed operation with the reason (after its own few quick retries, indexer/operations.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

MAX_ATTEMPTS = 8  # about two minutes of retries with the default cap
BACKOFF_CAP = 60.0
# a step waits at most this long for a retry (it holds the operation row; its commit renews the lease)
MAX_WAIT_PER_STEP = 10.0

RETRY_FIELDS = {"attempt": 0, "retryAt": None, "lastError": None}


class GaveUp(Exception):
    """The peer failed `max_attempts` attempts in a row."""


async def wait_for_retry(checkpoint: dict[str, Any]) -> bool:
    """Sleep towards the next attempt; True when it is due now, False when the step should end (and
    commit, renewing the lease) while the wait goes on."""
    retry_at = checkpoint.get("retryAt")
    if retry_at is None:
        return True
    wait = retry_at - time.time()
    if wait > 0:
        await asyncio.sleep(min(wait, MAX_WAIT_PER_STEP))
    return retry_at - time.time() <= 0


def failed_attempt(checkpoint: dict[str, Any], exc: Exception, max_attempts: int) -> None:
    """Record a failed attempt and when to try again; GaveUp after `max_attempts` in a row."""
    attempt = int(checkpoint.get("attempt") or 0) + 1
    checkpoint["attempt"] = attempt
    checkpoint["lastError"] = str(exc)
    if attempt >= max_attempts:
        raise GaveUp(f"{exc} (gave up after {attempt} attempts)") from exc
    checkpoint["retryAt"] = time.time() + min(2.0 ** (attempt - 1), BACKOFF_CAP)


def succeeded(checkpoint: dict[str, Any]) -> None:
    checkpoint["attempt"] = 0
    checkpoint["retryAt"] = None
