"""The archive as a DIMSE client (SCU): associations to a registered AE, C-FIND, C-MOVE, C-GET.

Blocking pynetdicom code: callers run it in a worker thread (asyncio.to_thread) and hand any archive work
back to the event loop. Failures are sorted into two kinds, because the operations built on this module
(acquisition, $send) treat them differently: `PeerUnavailable` (no association, an abort, no response, a
refusal for lack of resources) is worth retrying later; `PeerRefused` (the peer answers, but says no for a
reason that a retry does not change, e.g. an unknown move destination) is not.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dimse import command_sets, file_meta, undecodable
from dimse.pacing import make_responsive

log = logging.getLogger(__name__)
# the archive's own associations encode command sets directly too, and a C-GET's objects arrive in files
# whose meta information is laid out directly
command_sets.install()
file_meta.install()
undecodable.install()

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# the transfer syntaxes a C-GET accepts objects in, each in a context of its own (see storage_contexts)
COMPRESSED = [
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
]  # fmt: skip
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255

# C-MOVE / C-GET statuses (PS3.4 Table C.4-2, C.4-3)
PENDING = (0xFF00, 0xFF01)
SUB_OPERATION_WARNING = 0xB000
MOVE_DESTINATION_UNKNOWN = 0xA801
OUT_OF_RESOURCES = (0xA701, 0xA702, 0xA700)


class PeerUnavailable(Exception):
    """The peer cannot be reached, or the association ended before the work did: retry later."""


class PeerRefused(Exception):
    """The peer refused the request for a reason a retry does not change."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Where to connect: the registered AE's title and address (dimse.aes.RegisteredAe.address())."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title} at {self.host}:{self.port}"


@dataclass(slots=True)
class Timeouts:
    acse: float = 30
    dimse: float = 600  # between two messages: a C-MOVE's pending responses come one per sub-operation
    network: float = 120
    connect: float = 10


def associate(
    calling: str,
    peer: Peer,
    contexts: Iterable[tuple[str, list[str]]],
    *,
    roles: Iterable[str] = (),
    handlers: list[tuple[Any, ...]] | None = None,
    timeouts: Timeouts | None = None,
) -> Association:
    """An established association to `peer`, or PeerUnavailable saying why not.

    `roles`: SOP classes whose SCP role the archive takes (C-GET's storage sub-operations)."""
    t = timeouts or Timeouts()
    ae = AE(ae_title=calling)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout, ae.connection_timeout = (
        t.acse, t.dimse, t.network, t.connect,
    )  # fmt: skip
    ae.maximum_pdu_size = 0
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    ext_neg = [build_role(uid, scp_role=True) for uid in dict.fromkeys(roles)]
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=ext_neg or None,
                             evt_handlers=handlers or [])  # fmt: skip
    except Exception as exc:  # socket errors surface as an unestablished association, others may not
        raise PeerUnavailable(f"cannot associate with {peer}: {exc}") from exc
    if assoc.is_established:
        no_delay(assoc)
        keep_reactor_off_queue(assoc)
        make_responsive(assoc)
        assoc.bind(evt.EVT_CONN_CLOSE, _wake_on_close)
        return assoc
    if assoc.is_rejected:
        raise PeerUnavailable(f"{peer} rejected the association (is the archive known to it as {calling}?)")
    raise PeerUnavailable(f"cannot associate with {peer}: no connection or no answer")


def no_delay(assoc: Association) -> None:
    """Turn Nagle's algorithm off: pynetdicom writes a message's command and data set as separate PDUs, and
    with Nagle on, the second waits for the peer's delayed ACK of the first (40 ms per message on Linux)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def release(assoc: Association) -> None:
    if assoc.is_established:
        try:
            assoc.release()
        except Exception:  # the peer went away: nothing to release
            assoc.abort()


def identifier(level: str, keys: dict[str, Any], returned: Iterable[str] = ()) -> Dataset:
    """A Study Root query identifier: matching keys (DICOM keywords or tags, as QIDO accepts them) and
    the attributes to return."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name in returned:
        setattr(ds, name, "")
    for key, value in keys.items():
        tag = query_tag(key)
        if tag is None:
            raise ValueError(f"{key!r} is neither a DICOM keyword nor a tag")
        vr = dictionary_VR(tag)
        if vr == "SQ":
            raise ValueError(f"{key!r} is a sequence: not a matching key here")
        ds.add_new(tag, vr, value)
    return ds


def query_tag(key: str) -> int | None:
    """The tag of a QIDO-style key (a keyword or 8 hex digits), None when unknown."""
    tag = tag_for_keyword(key)
    if tag is None and len(key) == 8:
        try:
            tag = int(Tag(key))
        except (ValueError, TypeError, OverflowError):
            return None
        try:
            dictionary_VR(tag)
        except KeyError:
            return None
    return tag


def keep_reactor_off_queue(assoc: Association) -> None:
    """Leave every incoming message of this association to the thread that sent the request.

    pynetdicom's reactor thread polls the message queue for requests from the peer, and its send_c_*()
    methods pause it by clearing an Event and waiting until the reactor says it is paused; but the reactor
    says so just before its wait() and unsays it just after, so a sender can see "paused" while the reactor
    is past the wait and about to poll. On loopback the response is there by then: the reactor takes it,
    drops it as "unexpected", and the sender waits for it until the DIMSE timeout. Measured here: 3 of 300
    C-FINDs to Orthanc lost a match, and one listing waited ten minutes for a swallowed final response.
    On the archive's own SCU associations the peer sends no requests that the reactor should serve (a
    C-GET's C-STOREs are handled by the C-GET's response loop, in the sender's thread), so the reactor's
    polls are simply answered with nothing; it still watches for release, abort and a dead connection.
    """
    get_msg = assoc.dimse.get_msg

    def guarded(block: bool = False) -> Any:
        if threading.current_thread() is assoc:
            return None, None
        return get_msg(block)

    assoc.dimse.get_msg = guarded  # type: ignore[method-assign]


def wake(assoc: Association) -> None:
    """Abort an association and wake a thread waiting for its next message (pynetdicom's abort does not:
    the waiter would sleep until the DIMSE timeout)."""
    assoc.abort()
    _wake_waiter(assoc)


def _wake_on_close(event: evt.Event) -> None:
    """The connection closed (the peer went away, or the association ended): a thread waiting for a
    response gets pynetdicom's "no response" at once, and a release gets an A-P-ABORT.

    pynetdicom would leave the first waiting on the message queue until the DIMSE timeout, and an
    acquisition whose source died mid-retrieval stalled that long before it retried. The second: the
    closed connection's one A-P-ABORT goes to whichever thread reads it first, and pynetdicom's reactor
    may take it just as a release begins (the association still looked established); the release then
    waited the whole ACSE timeout, 30 s, for an answer nobody would send (tests/test_dimse_scu.py)."""
    _wake_waiter(event.assoc)
    with contextlib.suppress(Exception):
        event.assoc.dul.to_user_queue.put(A_P_ABORT())


def _wake_waiter(assoc: Association) -> None:
    """An empty message on the association's queue: whoever waits for one gets pynetdicom's "no response"."""
    with contextlib.suppress(Exception):
        assoc.dimse.msg_queue.put((None, None))


def find(assoc: Association, query: Dataset) -> list[Dataset]:
    """Every match of a Study Root C-FIND."""
    matches: list[Dataset] = []
    for status, found in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = _status(assoc, status, "C-FIND")
        if code in PENDING:
            if found is not None:
                matches.append(found)
            continue
        if code != 0:
            raise _failure(assoc, "C-FIND", status)
    return matches


@dataclass(slots=True)
class RetrieveCounts:
    """The final response's sub-operation counts of a C-MOVE or C-GET."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int = 0
    failed_uids: list[str] = field(default_factory=list)


def move(assoc: Association, destination: str, query: Dataset) -> RetrieveCounts:
    """A Study Root C-MOVE of `query` to `destination` (an AE title the peer knows)."""
    return _retrieve(assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove),
                     assoc, "C-MOVE")  # fmt: skip


def get(assoc: Association, query: Dataset) -> RetrieveCounts:
    """A Study Root C-GET: objects come back as C-STORE requests on this association (its handlers)."""
    return _retrieve(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), assoc, "C-GET")


def _retrieve(
    responses: Iterator[tuple[Dataset, Dataset | None]], assoc: Association, what: str
) -> RetrieveCounts:
    counts = RetrieveCounts()
    for status, found in responses:
        code = _status(assoc, status, what)
        if code in PENDING:
            continue
        counts.status = code
        counts.completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        counts.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        counts.warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
        if found is not None and "FailedSOPInstanceUIDList" in found:
            value = found.FailedSOPInstanceUIDList
            counts.failed_uids = [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
        if code not in (0x0000, SUB_OPERATION_WARNING):
            raise _failure(assoc, what, status)
    return counts


def _status(assoc: Association, status: Dataset, what: str) -> int:
    if not status or "Status" not in status:
        state = "aborted" if assoc.is_aborted else "timed out" if assoc.is_established else "ended"
        raise PeerUnavailable(f"{what}: no response from {assoc.acceptor.ae_title} (association {state})")
    return int(status.Status)


def _failure(assoc: Association, what: str, status: Dataset) -> Exception:
    code = int(status.Status)
    comment = status.get("ErrorComment")
    text = f"{what} refused by {assoc.acceptor.ae_title}: status 0x{code:04X}" + (f" ({comment})" if comment
                                                                                   else "")  # fmt: skip
    if code in OUT_OF_RESOURCES or code == 0xFE00:  # the peer is busy, or the operation was cancelled
        return PeerUnavailable(text)
    if code == MOVE_DESTINATION_UNKNOWN:
        return PeerRefused(f"{text}: the peer does not know the archive as a move destination")
    return PeerRefused(text)


def storage_contexts(sop_classes: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Contexts that take objects of these classes in the transfer syntax they are stored in: one context
    for the uncompressed syntaxes and one per compressed syntax, since the sender needs an accepted context
    for the object's own syntax (the archive stores objects as sent, never transcoding them)."""
    contexts: list[tuple[str, list[str]]] = []
    for uid in dict.fromkeys(sop_classes):
        contexts.append((uid, list(UNCOMPRESSED)))
        contexts.extend((uid, [syntax]) for syntax in COMPRESSED)
    return contexts


def per_association(sop_classes: list[str]) -> list[list[str]]:
    """SOP classes split so that each group's storage contexts (and one query context) fit one association."""
    per = (MAX_CONTEXTS - 1) // (1 + len(COMPRESSED))
    return [sop_classes[i : i + per] for i in range(0, len(sop_classes), per)] or [[]]


def on_store(handle: Callable[[evt.Event], Dataset | int]) -> list[tuple[Any, ...]]:
    """The handlers of a C-GET association: `handle` answers each C-STORE sub-operation."""
    return [(evt.EVT_C_STORE, handle)]


QUERY_CONTEXTS = {
    "find": (StudyRootQueryRetrieveInformationModelFind, list(UNCOMPRESSED)),
    "move": (StudyRootQueryRetrieveInformationModelMove, list(UNCOMPRESSED)),
    "get": (StudyRootQueryRetrieveInformationModelGet, list(UNCOMPRESSED)),
}
