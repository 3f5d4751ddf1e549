"""An instance whose object the store does not hold, met while reading it (WADO-RS instances and frames).

Either it was deleted while it was read (the index no longer references that object: the retrieval may
simply be asked again), or the archive is damaged (the index still references it): that is a 500 naming the
instance, and a log line with its storage key for the operator (the scrub reports it too).
"""

from __future__ import annotations

import logging

import asyncpg

from dicomweb.errors import HTTPProblem
from indexer.lookup import StoredInstance, find_instances

log = logging.getLogger(__name__)


async def still_indexed(
    pool: asyncpg.Pool, key: int, instance: StoredInstance, *, original: bool = False
) -> bool:
    """Whether the index still references `instance`'s object (then it is damaged, and logged)."""
    uids = instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
    again = await find_instances(pool, key, *uids, original=original)
    if not any(i.storage_key == instance.storage_key for i in again):
        return False
    log.error("instance %s/%s/%s: its object %s is missing from the store", *uids, instance.storage_key)
    return True


def damaged(instance: StoredInstance) -> HTTPProblem:
    return HTTPProblem(
        500,
        f"instance {instance.sop_instance_uid} is damaged: its stored object is missing from the store "
        "(reported to the archive's log)",
    )
