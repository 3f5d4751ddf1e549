"""`dicomweb retention show|set|clear`: a partition's retention policy from the command line (as
/retention does), against an external database or the embedded one while the server is stopped. A change
is an audit record like the route's, with subject `cli:<login>`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from dicomweb.config import DEFAULT_PARTITION


async def _audit(dsn: str, partition: str, method: str, detail: str) -> None:
    import asyncpg

    from access.audit import AuditLog, system_event

    event = system_event(
        "retention", method, "/retention", 200, 0, detail, datetime.now(UTC), partition=partition
    )
    event = dataclasses.replace(event, subject=f"cli:{getpass.getuser()}", auth="cli", action_code="U")
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        log = AuditLog(pool)
        log.record(event)
        await log.flush()


async def _run(dsn: str, args: argparse.Namespace) -> int:
    import asyncpg

    from access.tokens import valid_partition_name
    from indexer.lookup import partition_key
    from retention.policy import PolicyError, clear_policy, get_policy, parse_policy, set_policy

    if not valid_partition_name(args.partition):  # the routes' 400; the table's CHECK raised a traceback
        print(
            f"error: invalid partition name {args.partition!r}: use 1-64 letters, digits, '_', '.', '-'",
            file=sys.stderr,
        )
        return 2
    body: dict[str, Any] = {}
    if args.retention_command == "set":
        body = {"minimumRetentionDays": args.minimum_days, "expireAfterDays": args.expire_after_days,
                "deleteDelayDays": args.delete_delay_days}  # fmt: skip
        try:
            policy = parse_policy(body)
        except PolicyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    conn = await asyncpg.connect(dsn)
    try:
        key = await partition_key(conn, args.partition, create=args.retention_command == "set")
        if key is None:
            print(f"error: partition {args.partition!r} does not exist", file=sys.stderr)
            return 1
        if args.retention_command == "show":
            print(orjson.dumps((await get_policy(conn, key)).as_json()).decode())
            return 0
        if args.retention_command == "set":
            await set_policy(conn, key, policy)
            detail = "retention policy set: " + orjson.dumps(policy.as_json()).decode()
            method = "PUT"
        elif await clear_policy(conn, key):
            detail, method = "retention policy removed", "DELETE"
        else:
            print(f"error: partition {args.partition!r} has no retention policy", file=sys.stderr)
            return 1
    finally:
        await conn.close()
    await _audit(dsn, args.partition, method, detail)
    print(detail)
    return 0


def _retention_cmd(args: argparse.Namespace) -> int:
    from dicomweb.cli import _migrate, _settings, database

    with database(_settings(args)) as dsn:
        asyncio.run(_migrate(dsn))
        return asyncio.run(_run(dsn, args))


def add_retention_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    retention = sub.add_parser("retention", help="a partition's retention policy: show, set, clear")
    commands = retention.add_subparsers(dest="retention_command", required=True)
    show = commands.add_parser("show", help="print the policy as JSON (as GET /retention)")
    change = commands.add_parser("set", help="replace the policy (as PUT /retention; unset fields: none)")
    change.add_argument("--minimum-days", type=int, help="refuse deletion of studies younger than this")
    change.add_argument("--expire-after-days", type=int, help="delete studies this old (the sweep)")
    change.add_argument("--delete-delay-days", type=int, default=0, help="restore window of a deletion")
    clear = commands.add_parser("clear", help="remove the policy (no minimum, no expiry, no delay)")
    for p in (show, change, clear):
        add_common(p)
        p.add_argument("--partition", default=DEFAULT_PARTITION, help=f"data partition ({DEFAULT_PARTITION})")
        p.set_defaults(func=_retention_cmd)
