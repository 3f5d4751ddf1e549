"""Sending stored instances over an established association: the C-STORE sub-operations of C-GET and C-MOVE,
and the archive's own sends ($send).

Objects go out as stored, without decoding: `send_c_store(path)` with pynetdicom's chunked send
(dimse/server.py sets `STORE_SEND_CHUNKED_DATASET`) reads the PS3.10 file a PDU at a time, so no instance,
let alone a study, is held in memory. A local-store object is sent from its own file; an S3 object is first
streamed into a temporary file. When the peer accepted no context with the stored transfer syntax but one with
an uncompressed syntax, the object is transcoded (dicomcore/transcode.py, in memory: that needs the decoded
pixels anyway); otherwise the sub-operation fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from dicomcore.transcode import MAX_TRANSCODE_SIZE, TranscodeError, transcode_instance
from dicomcore.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from dimse import scu
from dimse.gateway import Gateway
from dimse.pacing import make_responsive
from indexer.lookup import StoredInstance
from storage import LocalBlobStore
from storage.base import validate_key

log = logging.getLogger(__name__)

# An association carries at most 128 presentation contexts (PS3.8: odd context IDs 1-255)
MAX_CONTEXTS = 128
# Uncompressed syntaxes an object can be transcoded to when the peer accepted none with the stored syntax
_FALLBACK = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)


@dataclass
class SendCounts:
    """The sub-operation counts of a send (PS3.4 C.4.2.1.6): what the pending and final responses report."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    cancelled: bool = False
    # why the first failure failed, for the final response's Error Comment and the audit record
    first_error: str | None = None

    def fail(self, instance: StoredInstance, why: str) -> None:
        self.remaining -= 1
        self.failed += 1
        self.failed_uids.append(instance.sop_instance_uid)
        if self.first_error is None:
            self.first_error = why  # the UIDs are in the Failed SOP Instance UID List


def contexts_for(instances: Iterable[StoredInstance]) -> list[PresentationContext]:
    """The presentation contexts to propose for sending these instances on a new association: one per
    (SOP class, stored transfer syntax), and per SOP class one with the uncompressed syntaxes to fall back on.

    Past 128 contexts the fallbacks are left out first, then stored syntaxes (whose instances then fail for
    want of a context).
    """
    stored: dict[str, list[str]] = {}
    for instance in instances:
        syntaxes = stored.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax_uid not in syntaxes:
            syntaxes.append(instance.transfer_syntax_uid)
    exact = [(sop, [ts]) for sop, syntaxes in stored.items() for ts in syntaxes]
    fallback = [
        (sop, list(_FALLBACK)) for sop, syntaxes in stored.items() if not set(_FALLBACK) <= set(syntaxes)
    ]
    chosen = exact + fallback  # past 128, the fallbacks are what is left out first
    return [build_context(sop, ts) for sop, ts in chosen[:MAX_CONTEXTS]]


def associate(
    gateway: Gateway, host: str, port: int, ae_title: str, instances: list[StoredInstance]
) -> Association:
    """A new association from the archive (as its own AE title) to a peer's storage SCP, proposing what
    `instances` need. The caller checks `is_established` and releases it."""
    ae = AE(ae_title=gateway.ae_title)
    ae.acse_timeout = 30
    ae.network_timeout = 120
    ae.dimse_timeout = 120  # a receiver answers a C-STORE well within this
    assoc = ae.associate(host, port, contexts=contexts_for(instances), ae_title=ae_title)
    if assoc.is_established:
        scu.no_delay(assoc)
        scu.keep_reactor_off_queue(assoc)  # or a C-STORE response may be lost (see there)
    return assoc


def send_instances(
    assoc: Association,
    gateway: Gateway,
    instances: list[StoredInstance],
    *,
    cancelled: Callable[[], bool] = lambda: False,
    progress: Callable[[SendCounts], None] = lambda counts: None,
    originator: tuple[str, int] | None = None,
) -> SendCounts:
    """C-STORE each instance over `assoc` (established, we the storage SCU), in order.

    `cancelled` is asked before each sub-operation (a C-CANCEL, a stopped job): the send then stops with
    `counts.cancelled` set and the rest left `remaining`. `progress` is told after each sub-operation.
    `originator` is the (AE title, message ID) of the C-MOVE being served. Runs in the caller's thread
    (an association thread): the store is reached through `gateway.run`.
    """
    counts = SendCounts(remaining=len(instances))
    syntaxes: dict[str, set[str]] = {}  # SOP class -> syntaxes of the contexts we may send it on
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            syntaxes.setdefault(str(cx.abstract_syntax), set()).update(str(ts) for ts in cx.transfer_syntax)
    # a sub-operation crosses pynetdicom's polling threads several times (request out, response in, pending
    # response out): they keep up with the traffic (dimse/pacing.py)
    make_responsive(assoc)
    return _send_all(assoc, gateway, instances, counts, syntaxes, cancelled, progress, originator)


def _send_all(
    assoc: Association,
    gateway: Gateway,
    instances: list[StoredInstance],
    counts: SendCounts,
    syntaxes: dict[str, set[str]],
    cancelled: Callable[[], bool],
    progress: Callable[[SendCounts], None],
    originator: tuple[str, int] | None,
) -> SendCounts:
    message_id = 0
    with tempfile.TemporaryDirectory(prefix="dimse-send-") as workdir:
        for index, instance in enumerate(instances):
            if cancelled():
                counts.cancelled = True
                break
            if not assoc.is_established:
                for rest in instances[index:]:
                    counts.fail(rest, "the association ended")
                break
            message_id = message_id % 0xFFFF + 1
            try:
                path = _prepare(gateway, instance, syntaxes.get(instance.sop_class_uid, set()), Path(workdir))
                try:
                    status = assoc.send_c_store(
                        path,
                        msg_id=message_id,
                        originator_aet=originator[0] if originator else None,
                        originator_id=originator[1] if originator else None,
                    )
                finally:
                    if path.parent == Path(workdir):
                        path.unlink(missing_ok=True)
            except Exception as exc:  # a storage read, a transcode, the association: this sub-operation fails
                counts.fail(
                    instance, f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
                )
            else:
                code = getattr(status, "Status", None)
                category = code_to_category(code) if code is not None else None
                if category == "Success":
                    counts.remaining -= 1
                    counts.completed += 1
                elif category == "Warning":
                    counts.remaining -= 1
                    counts.warning += 1
                elif code is None:
                    # no response: timed out, aborted or garbled (pynetdicom returns an empty data set). The
                    # association is unusable; ending it here fails the rest at once, where sending on a
                    # dying one could wait for ever.
                    counts.fail(instance, "no C-STORE response from the destination")
                    assoc.abort()
                else:
                    comment = getattr(status, "ErrorComment", None)
                    counts.fail(
                        instance, f"status 0x{code:04X} {comment}" if comment else f"status 0x{code:04X}"
                    )
            progress(counts)
    return counts


def _prepare(gateway: Gateway, instance: StoredInstance, accepted: set[str], workdir: Path) -> Path:
    """A PS3.10 file of the instance in a syntax the peer accepted for its SOP class: the stored object
    itself when possible, else a temporary file in `workdir`."""
    stored = instance.transfer_syntax_uid
    if stored in accepted:
        if stored == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN and instance.size % 2:
            return _padded(gateway, instance, workdir)
        return _object_file(gateway, instance, workdir)
    target = next((ts for ts in _FALLBACK if ts in accepted), None)
    if target is None:
        offered = ", ".join(sorted(accepted)) or "none"
        raise TranscodeError(
            f"no accepted presentation context for {UID(instance.sop_class_uid).name} in "
            f"{UID(stored).name} or an uncompressed syntax (accepted: {offered})"
        )
    if instance.size > MAX_TRANSCODE_SIZE:
        raise TranscodeError(f"the object ({instance.size} bytes) is too large to transcode")
    source = _object_file(gateway, instance, workdir)
    try:
        data = transcode_instance(source.read_bytes(), target)
    finally:
        if source.parent == workdir:
            source.unlink(missing_ok=True)
    path = workdir / f"{instance.sop_instance_uid}.{target}.dcm"
    path.write_bytes(data)
    return path


def _padded(gateway: Gateway, instance: StoredInstance, workdir: Path) -> Path:
    """A copy of a deflated object whose stream has odd length, with the NUL byte PS3.5 A.5 appends to it.

    The file meta group has even length, so an odd file is an odd data set: some writers leave it unpadded
    (pydicom's image_dfl.dcm), it is stored as received, and DCMTK peers refuse the odd PDV fragment and
    abort the association. The inflated data set is the same."""
    source = _object_file(gateway, instance, workdir)
    path = workdir / f"{instance.sop_instance_uid}.padded.dcm"
    try:
        with source.open("rb") as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)  # streamed: held in memory a chunk at a time
            dst.write(b"\x00")
    finally:
        if source.parent == workdir:
            source.unlink(missing_ok=True)
    return path


def _object_file(gateway: Gateway, instance: StoredInstance, workdir: Path) -> Path:
    """The stored object as a file: its own file in a local store, else streamed into `workdir`."""
    store = gateway.store
    if isinstance(store, LocalBlobStore):
        return store.root.joinpath(*validate_key(instance.storage_key).split("/"))
    path = workdir / f"{instance.sop_instance_uid}.dcm"
    gateway.run(_download(gateway, instance.storage_key, path))
    return path


async def _download(gateway: Gateway, key: str, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        async for chunk in gateway.store.stream(key):
            await asyncio.to_thread(_write_all, fd, chunk)  # a 1 MiB chunk; the disk write off the loop
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
