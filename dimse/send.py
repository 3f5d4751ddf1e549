"""The `send` operation ($send): C-STORE every instance of a study to a registered AE.

Steps (indexer/operations.py): the first counts the study's instances in the partition; each next one
sends a batch (by instance_key, after the checkpoint) over one association with dimse/sending.py, the
C-STORE loop that C-MOVE and C-GET use too: objects go out as stored, streamed from their files (an S3
object through a temporary file), transcoded to an uncompressed syntax only when the destination accepted
none with the stored one.

A destination that is unreachable or drops the association is retried with back-off (dimse/retrying.py)
from the first instance it did not confirm; an instance it refuses is a failure (with its status) and the
send goes on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from dimse import retrying, scu, sending
from dimse.acquire import MAX_ERRORS, AcquireError, ScuSettings, connectable, in_thread
from dimse.aes import RegisteredAe, get_ae
from dimse.gateway import Gateway
from indexer.lookup import StoredInstance, study_instance_count, study_instances_after
from indexer.operations import Operation, Step
from storage.base import BlobStore

log = logging.getLogger(__name__)

SEND = "send"
BATCH = 500  # instances per step (one association each)
_START: dict[str, Any] = {"total": None, "after": 0, "sent": 0, "failures": 0, "bytes": 0, "errors": [],
                          **retrying.RETRY_FIELDS}  # fmt: skip


def check_destination(destination: RegisteredAe | None, title: str) -> scu.Peer:
    if destination is None:
        raise AcquireError(f"destination {title!r} is not a registered AE")
    return connectable(destination)


@dataclass(slots=True)
class Sent:
    """A batch's outcome in order: per instance confirmed, whether the destination stored it (and if not,
    why); the ones after an interruption are not in it (they are sent again)."""

    rows: list[tuple[StoredInstance, bool, str | None]]
    interrupted: Exception | None = None


class SendHandler:
    """The `send` operation type (params written by dicomweb.routes.acquire)."""

    def __init__(self, pool: asyncpg.Pool, store: BlobStore, settings: ScuSettings, *, batch: int = BATCH):
        self.pool = pool
        self.store = store
        self.settings = settings
        self.batch = batch

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        cp: dict[str, Any] = {**_START, **(op.checkpoint or {})}
        params = op.params
        partition = int(params["partition"])
        if cp["total"] is None:
            cp["total"] = await study_instance_count(conn, partition, params["study"])
            return self._step(cp)
        if not await retrying.wait_for_retry(cp):
            return self._step(cp)
        peer = check_destination(await get_ae(conn, params["destination"]), params["destination"])
        batch = await study_instances_after(conn, partition, params["study"], cp["after"], self.batch)
        if not batch:
            return self._step(cp, done=True)
        keys = {id(instance): key for key, instance in batch}
        loop = asyncio.get_running_loop()
        try:
            sent = await in_thread(lambda assocs: self._send(assocs, peer, [i for _, i in batch], loop))
        except (scu.PeerUnavailable, TimeoutError, OSError) as exc:
            sent = Sent([], exc)
        for instance, stored, error in sent.rows:
            if stored:
                cp["sent"] += 1
                cp["bytes"] += instance.size
            else:
                cp["failures"] += 1
                if len(cp["errors"]) < MAX_ERRORS:
                    cp["errors"].append(
                        f"{instance.study_instance_uid}/{instance.series_instance_uid}/"
                        f"{instance.sop_instance_uid}: {error}"
                    )
            cp["after"] = keys[id(instance)]
        if sent.interrupted is not None:
            log.warning("send %s to %s: %s", op.id_hex, peer, sent.interrupted)
            retrying.failed_attempt(cp, sent.interrupted, int(params["maxAttempts"]))
            return self._step(cp)
        retrying.succeeded(cp)
        return self._step(cp)

    def _step(self, cp: dict[str, Any], *, done: bool = False) -> Step:
        results = {"instancesTotal": cp["total"], "instancesSent": cp["sent"], "failures": cp["failures"],
                   "bytes": cp["bytes"], "errors": cp["errors"],
                   "lastError": cp["lastError"], "attempt": cp["attempt"]}  # fmt: skip
        handled = cp["sent"] + cp["failures"]
        percent = 100 * handled // cp["total"] if cp["total"] else 0
        return Step(cp, percent, done=done, results=results)

    def _send(
        self, assocs: Any, peer: scu.Peer, instances: list[StoredInstance], loop: asyncio.AbstractEventLoop
    ) -> Sent:
        """C-STORE the instances in order on one association (dimse/sending.py); stops when it ends."""
        gateway = Gateway(self.pool, self.store, loop, self.settings.ae_title)
        try:
            assoc = sending.associate(gateway, peer.host, peer.port, peer.ae_title, instances)
        except Exception as exc:
            raise scu.PeerUnavailable(f"cannot associate with {peer}: {exc}") from exc
        assocs.add(assoc)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "cannot be reached"
            raise scu.PeerUnavailable(f"{peer} {why}")
        sent = Sent([])
        done = 0  # instances stored so far (completed + warning)

        def progress(counts: sending.SendCounts) -> None:
            nonlocal done
            instance = instances[len(sent.rows)]
            if counts.completed + counts.warning > done:
                done = counts.completed + counts.warning
                sent.rows.append((instance, True, None))
            elif not assoc.is_established:  # no response: the association is gone, not the instance
                sent.interrupted = scu.PeerUnavailable(f"C-STORE to {peer}: no response, association ended")
                raise _Interrupted
            else:  # sending.py keeps the reason of the first refusal only
                reason = counts.first_error if counts.failed == 1 else "refused by the destination"
                sent.rows.append((instance, False, reason))

        try:
            counts = sending.send_instances(assoc, gateway, instances, progress=progress)
            if len(sent.rows) < len(instances) and sent.interrupted is None:
                sent.interrupted = scu.PeerUnavailable(
                    f"the association with {peer} ended ({counts.first_error})"
                )
        except _Interrupted:
            pass
        finally:
            scu.release(assoc)
        return sent


class _Interrupted(Exception):
    """Raised from the progress callback to stop sending on an association that is gone."""
