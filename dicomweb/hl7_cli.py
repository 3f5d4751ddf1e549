"""`dicomweb hl7 messages|show|replay`: the received HL7 messages (hl7_message) and the replay of one.

A replay runs the stored message through the same handling as the MLLP listener and keeps the outcome as a
new row (`replay_of` names the original): for a message refused because the archive was down, or whose
patient's studies arrived after it. Bulk update operations it queues are started by a server's operation
runner (within its poll interval, 2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any


async def _run(dsn: str, args: argparse.Namespace) -> int:
    import asyncpg
    import orjson

    from access.audit import AuditLog
    from hl7 import journal
    from hl7.message import HL7Error, codec_for
    from hl7.service import Hl7Service

    async with asyncpg.create_pool(dsn, min_size=1, max_size=2) as pool:
        if args.hl7_command == "messages":
            print("id\treceived\tpeer\ttype\tcontrol id\tack\tdetail")
            for e in await journal.entries(pool, failed=args.failed, limit=args.limit):
                print(f"{e.message_id}\t{e.received_at.isoformat(timespec='seconds')}\t{e.peer or '-'}\t"
                      f"{e.message_type or '-'}\t{e.control_id or '-'}\t{e.ack_code}"
                      f"{f' {e.error_code}' if e.error_code else ''}\t{e.detail or ''}")  # fmt: skip
            return 0
        entry = await journal.get(pool, args.message_id)
        if entry is None:
            print(f"error: no HL7 message {args.message_id}", file=sys.stderr)
            return 1
        if args.hl7_command == "show":
            try:  # as the listener read it (MSH-18)
                codec = codec_for(entry.raw)
            except HL7Error:
                codec = "utf-8"
            sys.stdout.write(entry.raw.decode(codec, "replace").replace("\r", "\n"))
            print(f"-- {entry.ack_code} {entry.error_code or ''} {entry.detail or ''}")
            if entry.result:
                print(f"-- {orjson.dumps(entry.result).decode()}")
            return 0
        audit = AuditLog(pool)  # a replay changes the archive as the message did: audited as it was
        service = Hl7Service(pool, entry.partition_name or args.partition, audit_log=audit)
        handled = await service.handle(entry.raw, "replay", replay_of=entry.message_id)
        await audit.flush()
        print(f"message {entry.message_id} replayed as {handled.message_id}: {handled.code} {handled.detail}")
        return 0 if handled.code == "AA" else 1


def _hl7_cmd(args: argparse.Namespace) -> int:
    from dicomweb.cli import _migrate, _settings, database

    settings = _settings(args)
    args.partition = settings.hl7_partition
    with database(settings) as dsn:
        asyncio.run(_migrate(dsn))
        return asyncio.run(_run(dsn, args))


def _message_id(text: str) -> int:
    """A message's id: a bigint (a larger number was asyncpg's error, as a traceback)."""
    if not text.isdigit() or not 1 <= int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"is a message id (a whole number from 1), not {text!r}")
    return int(text)


def add_hl7_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    from dicomweb.cli import _at_least_one

    hl7 = sub.add_parser("hl7", help="received HL7 v2 messages: list, show, replay")
    commands = hl7.add_subparsers(dest="hl7_command", required=True)
    listing = commands.add_parser("messages", help="the latest messages, newest first")
    add_common(listing)
    listing.add_argument("--failed", action="store_true", help="only AE/AR ones no replay has accepted since")
    listing.add_argument("--limit", type=_at_least_one, default=100, help="at most this many (100)")
    show = commands.add_parser("show", help="one message as received, and its outcome")
    add_common(show)
    show.add_argument("message_id", type=_message_id)
    replay = commands.add_parser("replay", help="handle a stored message again (kept as a new message)")
    add_common(replay)
    replay.add_argument("message_id", type=_message_id)
    for p in (listing, show, replay):
        p.set_defaults(func=_hl7_cmd)
