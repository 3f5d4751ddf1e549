"""One HL7 message in, one ACK out: parse, dispatch by message type, commit the change with the message's
row, answer. The MLLP listener (hl7/server.py) and the replay command call the same `handle`.

ACK codes as HL7 v2.5 section 2.9 defines them (original mode):
* AA: the change is committed (for ADT: the bulk update operation is queued durably; docs/hl7.md);
* AE: the message was read but its content cannot be applied (a required field is missing, a value is
  not valid, the order is unknown); nothing was changed;
* AR: the message was not accepted: no readable MSH, an unsupported message type, event, version or
  processing ID, or a failure of the archive unrelated to the content (the database is down), after which
  the sender may send the same message again.
Every message is kept in hl7_message with its outcome, whatever it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from access.audit import AuditEvent, AuditLog
from hl7 import adt, journal, orders
from hl7.handling import Outcome, Target
from hl7.message import (
    AA,
    APPLICATION_INTERNAL_ERROR,
    AR,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    Header,
    HL7Error,
    Received,
    ack,
    codec_for,
    header_of,
    parse,
)
from indexer.lookup import partition_key as lookup_partition_key

log = logging.getLogger(__name__)

Handler = Callable[[asyncpg.Connection, Received, Target], Awaitable[Outcome]]

# the segments the handlers of each message type read (the rest of a message is kept in the log, not parsed)
_ORDER_SEGMENTS = frozenset({"PID", "PV1", "ORC", "OBR", "TQ1", "IPC", "ZDS"})
READ = {"ADT": frozenset({"PID", "MRG"}), "ORM": _ORDER_SEGMENTS, "OMI": _ORDER_SEGMENTS}


def segments_read(header: Header) -> frozenset[str] | None:
    return READ.get(header.message_code.upper())


# message code -> trigger event -> handler
HANDLERS: dict[str, dict[str, Handler]] = {
    "ADT": {"A08": adt.update_patient, "A31": adt.update_patient, "A40": adt.merge_patients},
    "ORM": {"O01": orders.place_orders},
    "OMI": {"O23": orders.place_orders},
}


@dataclass(frozen=True, slots=True)
class Handled:
    ack: bytes  # the ACK, encoded like the message
    code: str  # AA, AE, AR
    message_id: int | None  # its hl7_message row; None when even that could not be written
    detail: str


@dataclass
class Hl7Service:
    pool: asyncpg.Pool
    partition: str  # where every message's changes go (DICOMWEB_HL7_PARTITION; docs/hl7.md)
    poke_operations: Callable[[], None] | None = None  # wakes the process's operation runner
    audit_log: AuditLog | None = None
    application: str = "DICOMWEB"  # MSH-3 of our ACKs
    _partition_key: int | None = field(default=None, init=False)

    async def _key(self, conn: asyncpg.Connection, create: bool) -> int | None:
        """The partition's key (kept once it exists: partitions are never renamed or re-keyed); a key this
        transaction creates is kept only after it commits."""
        if self._partition_key is not None:
            return self._partition_key
        key = await lookup_partition_key(conn, self.partition, create=create)
        if not create:
            self._partition_key = key
        return key

    async def handle(self, raw: bytes, peer: str | None, *, replay_of: int | None = None) -> Handled:
        started = time.perf_counter()
        header: Header | None = None
        try:
            # hl7apy takes milliseconds to parse a message: off the event loop, as other CPU work is
            received = await asyncio.to_thread(parse, raw, segments_read)
            header = received.header
            handler = _handler(header)
            async with self.pool.acquire() as conn, conn.transaction():

                async def create() -> int:
                    key = await self._key(conn, create=True)
                    assert key is not None
                    return key

                target = Target(self.partition, await self._key(conn, create=False), create)
                outcome = await handler(conn, received, target)
                message_id = await journal.record(
                    conn, raw=raw, peer=peer, header=header, partition=self.partition, ack_code=AA,
                    detail=outcome.detail, result=outcome.result, replay_of=replay_of,
                )  # fmt: skip
            self._partition_key = target.key
            if outcome.operations and self.poke_operations is not None:
                self.poke_operations()
            text = ack(header, AA, text=outcome.detail, application=self.application)
            done = Handled(self._encode(text, raw), AA, message_id, outcome.detail)
            self._audit(header, peer, done, 0, started)
            return done
        except HL7Error as exc:
            error = exc
        except Exception as exc:  # the database is down, or a bug: the sender may try again later (AR)
            log.exception("HL7 message from %s failed", peer)
            error = HL7Error(
                AR, APPLICATION_INTERNAL_ERROR, f"the archive could not process the message: {exc}"
            )
        return await self.refuse(raw, peer, error, header=header, replay_of=replay_of, started=started)

    async def refuse(
        self,
        raw: bytes,
        peer: str | None,
        error: HL7Error,
        *,
        header: Header | None = None,
        replay_of: int | None = None,
        started: float | None = None,
    ) -> Handled:
        """Keep a message that changes nothing, and answer it with AE or AR."""
        started = time.perf_counter() if started is None else started
        header = header or header_of(raw)
        message_id: int | None = None
        try:
            message_id = await journal.record(
                self.pool, raw=raw, peer=peer, header=header, partition=self.partition, ack_code=error.ack,
                error_code=error.code, detail=error.text, replay_of=replay_of,
            )  # fmt: skip
        except Exception:
            log.exception("HL7 message from %s could not be recorded", peer)
        text = ack(header, error.ack, error=error, application=self.application)
        done = Handled(self._encode(text, raw), error.ack, message_id, error.text)
        self._audit(header, peer, done, error.code, started)
        return done

    @staticmethod
    def _encode(text: str, raw: bytes) -> bytes:
        """The ACK in the message's character set (UTF-8 when that cannot be told)."""
        try:
            codec = codec_for(raw)
        except HL7Error:
            codec = "utf-8"
        return text.encode(codec, "replace")

    def audit_connection(self, peer: str | None, detail: str) -> None:
        """The audit record of a connection refused before any message (its sender is not allowed)."""
        self._audit(None, peer, Handled(b"", AR, None, detail), 0, time.perf_counter(), path="connect")

    def _audit(
        self,
        header: Header | None,
        peer: str | None,
        done: Handled,
        code: int,
        started: float,
        path: str | None = None,
    ) -> None:
        """One audit record per message, as an HTTP request or a DIMSE operation gets one (docs/security.md):
        method HL7, the message type as the path, the HL7 error code (0: accepted) as the status."""
        if self.audit_log is None:
            return
        sender = f"{header.sending_application}@{header.sending_facility}" if header else "?"
        self.audit_log.record(
            AuditEvent(
                event_time=datetime.now(UTC),
                subject=f"hl7:{sender}"[:200],
                auth="hl7",
                token_id=None,
                token_name=None,
                roles=[],
                client_address=peer,
                user_agent=f"MSH-10 {header.control_id}"[:200] if header else None,
                method="HL7",
                path=path or (header.message_type if header and header.message_code else "?")[:200],
                query=None,
                action="hl7",  # access.policy.Family.HL7
                action_code="E",
                partition_name=self.partition,
                study_uid=None,
                series_uid=None,
                instance_uid=None,
                status=code,
                outcome=0 if done.code == AA else 8 if code == APPLICATION_INTERNAL_ERROR else 4,
                detail=(f"{done.code} #{done.message_id}: {done.detail}")[:2048],
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )


def _handler(header: Header) -> Handler:
    events = HANDLERS.get(header.message_code.upper())
    if events is None:
        raise HL7Error(
            AR,
            UNSUPPORTED_MESSAGE_TYPE,
            f"message type {header.message_code} is not ADT, ORM or OMI",
            "MSH^1^9",
        )
    handler = events.get(header.trigger_event.upper())
    if handler is None:
        supported = ", ".join(f"{header.message_code}^{event}" for event in events)
        raise HL7Error(
            AR, UNSUPPORTED_EVENT_CODE, f"{header.message_type} is not handled (only {supported})", "MSH^1^9"
        )
    return handler
