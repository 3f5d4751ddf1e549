"""`dicomweb token create|list|revoke` and `dicomweb audit export`: operators' access commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from access.policy import Role


def _token_cmd(args: argparse.Namespace) -> int:
    from access import commands
    from access.tokens import TokenError
    from dicomweb.cli import _settings, database

    with database(_settings(args), existing=True) as dsn:
        if args.token_command == "create":
            try:
                text, stored = asyncio.run(
                    commands.create_token(
                        dsn, args.role, partition=args.partition, name=args.name, expires=args.expires
                    )
                )
            except TokenError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            scope = stored.partition or "all partitions"
            expiry = stored.expires_at.isoformat() if stored.expires_at else "never"
            print(f"created token {stored.token_id} ({stored.name}): {stored.role} in {scope}, "
                  f"expires {expiry}", file=sys.stderr)  # fmt: skip
            print("it is shown only this once; send it as 'Authorization: Bearer <token>':", file=sys.stderr)
            print(text)
        elif args.token_command == "list":
            print("id\tname\trole\tpartition\tcreated\texpires\trevoked")
            for t in asyncio.run(commands.list_tokens(dsn)):
                print("\t".join([
                    t.token_id, t.name, t.role.value, t.partition or "*", t.created_at.isoformat(),
                    t.expires_at.isoformat() if t.expires_at else "-",
                    t.revoked_at.isoformat() if t.revoked_at else "-",
                ]))  # fmt: skip
        else:
            if not asyncio.run(commands.revoke_token(dsn, args.token)):
                print(f"error: no active token with id or name {args.token!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.token}")
    return 0


def _audit_cmd(args: argparse.Namespace) -> int:
    from access import commands
    from dicomweb.cli import _settings, database
    from dicomweb.errors import HTTPProblem
    from dicomweb.routes.access import audit_query

    params = {k: v for k, v in (("subject", args.subject), ("from", args.start), ("to", args.end),
                                ("action", args.action)) if v is not None}  # fmt: skip
    try:
        q = audit_query(params, export=True)
    except HTTPProblem as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    with database(_settings(args), existing=True) as dsn:
        count = asyncio.run(commands.export_audit(dsn, q, sys.stdout.buffer))
    print(f"exported {count} audit records", file=sys.stderr)
    return 0


def _audit_verify_cmd(args: argparse.Namespace) -> int:
    """Exit 0 when the chain holds (its head printed, to be kept elsewhere), 1 naming the first broken
    record."""
    from access import commands
    from dicomweb.cli import _settings, database

    with database(_settings(args), existing=True) as dsn:
        verdict = asyncio.run(commands.verify_audit(dsn))
    before = f" ({verdict.before_chain} records from before the chain began)" if verdict.before_chain else ""
    if not verdict.intact:
        print(f"audit chain broken at record {verdict.broken_id}: {verdict.reason}; "
              f"{verdict.records} records before it verify{before}", file=sys.stderr)  # fmt: skip
        return 1
    head = f"head: record {verdict.head_id} {verdict.head_hash.hex()}" if verdict.head_hash else "no records"
    print(f"audit chain intact: {verdict.records} records{before}; {head}")
    return 0


def add_access_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    token = sub.add_parser("token", help="API tokens for machines and operators: create, list, revoke")
    commands = token.add_subparsers(dest="token_command", required=True)
    create = commands.add_parser("create", help="create a token and print it (only this once)")
    add_common(create)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--partition", help="limit the role to this data partition (default: all)")
    create.add_argument("--name", help="a name to recognise it by in listings and the audit log")
    create.add_argument("--expires", help="30d, 12h, 90m or an ISO date-time (default: never)")
    listing = commands.add_parser("list", help="list tokens (never their secrets)")
    add_common(listing)
    revoke = commands.add_parser("revoke", help="revoke a token by id or name; takes effect at once")
    add_common(revoke)
    revoke.add_argument("token", help="token id or name")
    for p in (create, listing, revoke):
        p.set_defaults(func=_token_cmd)
    audit = sub.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    export = audit_commands.add_parser("export", help="print audit records as JSON lines")
    add_common(export)
    export.add_argument("--subject")
    export.add_argument("--from", dest="start", help="ISO date-time (inclusive)")
    export.add_argument("--to", dest="end", help="ISO date-time (exclusive)")
    export.add_argument("--action", help="route family, e.g. wado, stow, audit")
    export.set_defaults(func=_audit_cmd)
    verify = audit_commands.add_parser(
        "verify", help="recompute the audit log's hash chain; exit 1 naming the first broken record"
    )
    add_common(verify)
    verify.set_defaults(func=_audit_verify_cmd)
