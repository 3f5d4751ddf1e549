"""Sending an N-EVENT-REPORT to a peer: on its association while that is open, else on one the archive opens.

PS3.4 J.3.3 lets the SCP report on the association of the request or on another one; peers that release
right after the N-ACTION response expect the second. pynetdicom sends requests from an acceptor through
`Association.send_n_event_report`, which pauses the association's reactor (after the request being served
has had its response) and waits for the peer's answer; reports for one association are sent one at a time.

A new association is opened to the peer's registered host and port (the address the request came from when
the registration names a network or `*`), proposing the SOP class with SCP/SCU Role Selection (the archive
as SCP), and retried with back-off: 1, 2, 4, 8 s. The report is held in memory meanwhile; if the process
stops first it is lost, and the peer asks again after its own timeout (J.3.2: a new N-ACTION, possibly
with the same Transaction UID, is answered afresh).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_RELEASE

from dimse import scu
from dimse.gateway import Gateway, Peer

log = logging.getLogger(__name__)

BACKOFF = (1.0, 2.0, 4.0, 8.0)  # waits between the attempts on new associations (five attempts)
# how long to wait for the peer's answer on its own association: a peer that released meanwhile never
# answers, and its release waits for this report to end
SAME_ASSOCIATION_TIMEOUT = 15.0
TIMEOUTS = scu.Timeouts(acse=30, dimse=30, network=60, connect=10)
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

_locks = threading.Lock()


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None  # the peer's response status; None when no peer answered
    how: str  # how it was sent, or why not, for the audit record


def deliver(
    assoc: Association, gateway: Gateway, peer: Peer, sop_class: str, instance: str, event_type: int,
    info: Dataset,
) -> Outcome:  # fmt: skip
    """Send the report on `assoc` if it is still open, else on new associations until one succeeds."""
    status = _on_same(assoc, sop_class, instance, event_type, info)
    if status is not None:
        return Outcome(status, "sent on the request's association")
    try:
        target = _target(peer)
    except ValueError as exc:
        return Outcome(None, f"not delivered: the request's association has ended and {exc}")
    error = ""
    for attempt, wait in enumerate((*BACKOFF, None), start=1):
        try:
            status = _on_new(gateway.ae_title, target, sop_class, instance, event_type, info)
            return Outcome(status, f"sent on a new association to {target} (attempt {attempt})")
        except scu.PeerUnavailable as exc:
            error = str(exc)
            log.info("N-EVENT-REPORT to %s, attempt %d: %s", target, attempt, exc)
        if wait is not None:
            time.sleep(wait)
    return Outcome(None, f"not delivered after {len(BACKOFF) + 1} attempts: {error}")


def _report_state(assoc: Association) -> tuple[threading.Lock, itertools.count]:
    """The per-association lock (one report at a time) and Message ID counter."""
    with _locks:
        state = getattr(assoc, "archive_reports", None)
        if state is None:
            state = assoc.archive_reports = (threading.Lock(), itertools.count(1))  # type: ignore[attr-defined]
        return state


def _release_requested(assoc: Association) -> bool:
    pending = assoc.dul.peek_next_pdu()
    return isinstance(pending, A_RELEASE) and pending.result is None


def _on_same(assoc: Association, sop_class: str, instance: str, event_type: int, info: Dataset) -> int | None:
    lock, ids = _report_state(assoc)
    with lock:
        if not assoc.is_established or assoc.is_released or _release_requested(assoc):
            return None
        saved = assoc.dimse_timeout
        assoc.dimse_timeout = SAME_ASSOCIATION_TIMEOUT
        try:
            status, _ = assoc.send_n_event_report(
                info, event_type, sop_class, instance, msg_id=(next(ids) - 1) % 65535 + 1
            )
        except Exception as exc:  # the association ended between the check and the send
            log.info("N-EVENT-REPORT on the request's association failed: %s", exc)
            return None
        finally:
            assoc.dimse_timeout = saved
    return int(status.Status) if "Status" in status else None


def _target(peer: Peer) -> scu.Peer:
    """Where to open the new association: the registered host and port."""
    if peer.ae.port is None:
        raise ValueError(f"AE {peer.ae.ae_title} has no registered port")
    host = peer.ae.host
    if host == "*" or "/" in host:
        host = peer.address  # a network registration: where the request came from
    try:
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            host = str(address.ipv4_mapped)
    except ValueError:
        pass  # a host name
    return scu.Peer(peer.ae.ae_title, host, peer.ae.port)


def _on_new(
    calling: str, target: scu.Peer, sop_class: str, instance: str, event_type: int, info: Dataset
) -> int:
    assoc = scu.associate(calling, target, [(sop_class, UNCOMPRESSED)], roles=[sop_class], timeouts=TIMEOUTS)
    try:
        status, _ = assoc.send_n_event_report(info, event_type, sop_class, instance, msg_id=1)
    except Exception as exc:
        raise scu.PeerUnavailable(f"{target}: {exc}") from exc
    finally:
        scu.release(assoc)
    if "Status" not in status:
        raise scu.PeerUnavailable(f"{target} did not answer the N-EVENT-REPORT")
    return int(status.Status)
