"""The UPS-RS Notification Connection (PS3.18 8.10.4/8.10.5): `/ws/subscribers/{aetitle}` at a service root.

Event reports queued for the subscriber (worklist.events, an outbox written with each committed change)
are sent in sequence order as text messages of DICOM JSON. Each carries its per-subscriber sequence twice:
Message ID (0000,0110), which wraps at 65535, and our private element (0077,1001) UV under creator
"DICOMWEB ARCHIVE UPS" (0077,0010), which does not.

Exactly once across reconnects, our extension: the client acknowledges with a text message
`{"ack": N}` (everything up to N), and a new connection resumes after the last acknowledged sequence, or
after `?after=N` when the client keeps its own record. Events queue while nobody is connected, within a
bound (worklist.retention); where unacknowledged events were dropped, the client gets one gap notice
(worklist.events.gap_notice) naming them, then the events that follow.

Any process sharing the database may hold the connection: commits NOTIFY the worklist channel, which one
LISTEN connection per process turns into a wake-up of its senders (changefeed.notify.FeedNotifier on its
own channel); senders also re-read every RECHECK seconds, so a lost notification costs latency only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from changefeed.notify import RECHECK, FeedNotifier
from dicomweb.auth import still_allowed
from dicomweb.context import context, partition_key
from dicomweb.errors import HTTPProblem
from worklist import subscriptions
from worklist.events import gap_notice, read_after

log = logging.getLogger(__name__)

MAX_SEQUENCE = 2**63 - 1  # sequences are PostgreSQL bigints: a larger one failed in the database


def _ae_title(text: str) -> str | None:
    ok = 1 <= len(text) <= 16 and "\\" not in text and text.isprintable() and text.strip() and text.isascii()
    return text if ok else None


async def subscriber_channel(ws: WebSocket) -> None:
    ae = _ae_title(ws.path_params["aetitle"])
    await ws.accept()
    if ae is None:
        await ws.close(code=1008, reason="not an AE title (1-16 printable ASCII characters)")
        return
    try:
        key = await partition_key(ws)  # type: ignore[arg-type]  # needs only .app and .path_params
    except HTTPProblem as exc:
        await ws.close(code=1008, reason=exc.message[:120])
        return
    pool = context(ws).pool  # type: ignore[arg-type]
    after_text = ws.query_params.get("after")
    if after_text is not None and not (
        after_text.isascii() and after_text.isdigit() and int(after_text) <= MAX_SEQUENCE
    ):
        await ws.close(code=1008, reason="after must be a sequence number")
        return
    acked, dropped = await subscriptions.position(pool, key, ae) or (0, 0)
    # events up to `acked` are gone because the client acknowledged them: nothing to tell
    cursor = max(int(after_text), acked) if after_text is not None else acked
    notifier: FeedNotifier = ws.app.state.worklist_notifier
    reader = asyncio.create_task(_read_acks(ws, pool, key, ae))
    try:
        if cursor < dropped:
            await ws.send_text(gap_notice(cursor + 1, dropped).decode())
            cursor = dropped
        while not reader.done():
            if not await still_allowed(ws.scope):  # revoked or expired since the connection was admitted
                await ws.close(code=1008, reason="the credential was revoked or has expired")
                break
            wake = notifier.next_change()
            batch = await read_after(pool, key, ae, cursor)
            if batch and batch[0].sequence > cursor + 1:  # dropped while we were sending
                await ws.send_text(gap_notice(cursor + 1, batch[0].sequence - 1).decode())
            for event in batch:
                await ws.send_text(event.payload.decode())
                cursor = event.sequence
            if not batch:
                await asyncio.wait({wake, reader}, timeout=RECHECK, return_when=asyncio.FIRST_COMPLETED)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client went away; what it did not acknowledge is sent again next time
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def _read_acks(ws: WebSocket, pool, key: int, ae: str) -> None:  # type: ignore[no-untyped-def]
    """Client messages: `{"ack": N}`; anything else closes the connection with 1003."""
    while True:
        try:
            text = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        try:
            message = orjson.loads(text)
            sequence = message["ack"]
            if (
                not isinstance(sequence, int)
                or isinstance(sequence, bool)
                or not 0 <= sequence <= MAX_SEQUENCE
            ):
                raise ValueError(sequence)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            await ws.close(code=1003, reason='send {"ack": <sequence>} only')
            return
        await subscriptions.ack(pool, key, ae, sequence)
