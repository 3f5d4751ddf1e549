"""`dicomweb ae add|list|remove`: the registered DIMSE peers from the command line (as /aes does)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from dimse.aes import SERVICES


async def _run(dsn: str, args: argparse.Namespace) -> int:
    import asyncpg

    from dimse.aes import AeError, delete_ae, list_aes, parse_ae, put_ae

    conn = await asyncpg.connect(dsn)
    try:
        if args.ae_command == "add":
            body: dict[str, Any] = {"aeTitle": args.ae_title, "host": args.host, "port": args.port,
                                    "partition": args.partition, "description": args.description}  # fmt: skip
            if args.services is not None:  # "" is no service (C-ECHO only), as "services": [] over HTTP
                body["services"] = [s.strip() for s in args.services.split(",") if s.strip()]
            try:
                ae = parse_ae({k: v for k, v in body.items() if v is not None})
            except AeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            stored, created = await put_ae(conn, ae)
            print(f"{'registered' if created else 'updated'} AE {stored.ae_title}: host {stored.host}, "
                  f"port {stored.port or '-'}, partition {stored.partition}, "
                  f"services {','.join(stored.services) or '-'}")  # fmt: skip
        elif args.ae_command == "list":
            print("aeTitle\thost\tport\tpartition\tservices")
            for ae in await list_aes(conn):
                print(f"{ae.ae_title}\t{ae.host}\t{ae.port or '-'}\t{ae.partition}\t{','.join(ae.services)}")
        else:
            if not await delete_ae(conn, args.ae_title):
                print(f"error: no AE {args.ae_title!r} is registered", file=sys.stderr)
                return 1
            print(f"removed AE {args.ae_title}")
    finally:
        await conn.close()
    return 0


def _ae_cmd(args: argparse.Namespace) -> int:
    from dicomweb.cli import _migrate, _settings, database

    with database(_settings(args)) as dsn:
        asyncio.run(_migrate(dsn))  # the registry's table, on a data directory that was never served
        return asyncio.run(_run(dsn, args))


def add_ae_command(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    ae = sub.add_parser("ae", help="DICOM peers (modalities, PACS) allowed to associate: add, list, remove")
    commands = ae.add_subparsers(dest="ae_command", required=True)
    add = commands.add_parser("add", help="register an AE, or replace its registration")
    add_common(add)
    add.add_argument("ae_title", help="the peer's (calling) AE title")
    add.add_argument(
        "--host", required=True, help="address, network (CIDR), host name or '*' it connects from"
    )
    add.add_argument("--port", type=int, help="its own DICOM port (C-MOVE destination, acquisition source)")
    add.add_argument("--partition", help="data partition its objects go to and come from (Microsoft.Default)")
    add.add_argument("--services", help=f"comma-separated, of {','.join(SERVICES)} (default: all)")
    add.add_argument("--description")
    listing = commands.add_parser("list", help="list the registered AEs")
    add_common(listing)
    remove = commands.add_parser("remove", help="remove an AE: its associations are refused from then on")
    add_common(remove)
    remove.add_argument("ae_title")
    for p in (add, listing, remove):
        p.set_defaults(func=_ae_cmd)
