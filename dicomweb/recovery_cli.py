"""`dicomweb backup`, `dicomweb restore` (archive/backup.py) and `dicomweb replicate`
(changefeed/replicate.py): argument parsing only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


def _on_archive(
    settings: Any, work: Callable[[str, Any], Awaitable[Any]], *, attach: bool = False, existing: bool = False
) -> Any:
    """Run `work(dsn, store)` on the configured (or embedded) database and blob store; None after printing
    the error when a BackupError, or a directory that cannot be made or read, stops it. `existing`: the
    archive must be there (a backup), as `dicomweb.cli.database` checks."""
    from archive.backup import BackupError
    from dicomweb.cli import blob_store, database

    async def run(dsn: str) -> Any:
        store = blob_store(settings)
        try:
            return await work(dsn, store)
        finally:
            await store.close()

    try:
        with database(settings, attach=attach, existing=existing) as dsn:
            return asyncio.run(run(dsn))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        # the backup directory (or the one restored from) cannot be made or read: not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return None


def _progress(verb: str) -> Callable[[int, int], None]:
    return lambda done, total: print(f"{verb} {done}/{total} objects", file=sys.stderr, flush=True)


def _backup_cmd(args: argparse.Namespace) -> int:
    from archive.backup import backup
    from dicomweb.cli import _settings

    summary = _on_archive(
        _settings(args),
        lambda dsn, store: backup(
            dsn, store, args.dest, concurrency=args.concurrency, progress=_progress("copied")
        ),
        attach=True,  # a running `dicomweb serve` owns the embedded PostgreSQL: use it
        existing=True,
    )
    if summary is None:
        return 1
    print(
        f"backup in {args.dest}: change feed sequence {summary.changefeed_sequence}, "
        f"{summary.objects} objects, {summary.bytes} bytes"
    )
    return 0


def _restore_cmd(args: argparse.Namespace) -> int:
    from archive.backup import BackupError, check_backup, read_manifest, read_object_list, restore
    from dicomweb.cli import _settings

    settings = _settings(args)
    try:  # refuse an incomplete or damaged backup before starting a database for it
        check_backup(args.source, read_manifest(args.source), read_object_list(args.source))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if settings.storage_url is None:
        (settings.data_dir / "blobs").mkdir(parents=True, exist_ok=True)
    summary = _on_archive(
        settings,
        lambda dsn, store: restore(
            args.source, dsn, store, concurrency=args.concurrency, progress=_progress("restored")
        ),
    )
    if summary is None:
        return 1
    print(
        f"restored {summary.objects} objects ({summary.bytes} bytes, every digest checked) and the index "
        f"at change feed sequence {summary.changefeed_sequence}"
    )
    print(
        "the restored archive has the backed-up archive's tokens, AE registrations and audit log: the "
        "owner-token of the archive that was backed up works on it"
        + ("" if settings.database_url else f" (copy that file to {settings.data_dir / 'owner-token'})")
    )
    return 0


def _replicate_cmd(args: argparse.Namespace) -> int:
    from changefeed.checkpoint import CheckpointError
    from changefeed.commands import replicate
    from changefeed.consumer import ChangeFeedError, CheckpointAheadError
    from changefeed.replicate import service_base
    from dicomweb.cli import _token

    if service_base(args.source).lower() == service_base(args.target).lower():
        # it ran, reading the feed and finding each instance "already present" on itself
        print(f"error: --source and --target are the same archive ({args.source})", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        status = asyncio.run(
            replicate(
                args.source, args.target, checkpoint=args.checkpoint, follow=args.follow,
                batch_size=args.batch_size, parallel=args.parallel,
                source_token=_token(args.source_token_file, "DICOMWEB_TOKEN"),
                target_token=_token(args.target_token_file, "DICOMWEB_TARGET_TOKEN"),
                status_file=args.status_file, metrics_file=args.metrics_file, metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
            )
        )  # fmt: skip
    except CheckpointAheadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ChangeFeedError, CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(
        f"replicated up to sequence {status.position}: {status.copied} copied, {status.already_present} "
        f"already present, {status.replaced} replaced, {status.deleted} deleted, {status.skipped} skipped"
    )
    return 0


def add_recovery_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    # a count; a feed page size; a root URL; a port to listen on
    from dicomweb.cli import _at_least_one, _feed_limit, _http_url, _listen_port

    backup = sub.add_parser("backup", help="a consistent backup of the archive, also while it runs")
    backup.add_argument("dest", type=Path, help="a new directory for the backup")
    add_common(backup)
    backup.add_argument("--concurrency", type=int, default=8, help="objects copied at once (8)")
    backup.set_defaults(func=_backup_cmd)
    restore = sub.add_parser("restore", help="bring an archive up from a backup (empty database and store)")
    restore.add_argument("source", type=Path, help="the backup directory")
    add_common(restore)
    restore.add_argument("--concurrency", type=int, default=8, help="objects copied at once (8)")
    restore.set_defaults(func=_restore_cmd)
    rep = sub.add_parser("replicate", help="keep a standby archive in step through the change feed")
    rep.add_argument(
        "--source", type=_http_url, required=True, help="the source archive, http://host:port/v2"
    )
    rep.add_argument(
        "--target", type=_http_url, required=True, help="the standby archive, http://host:port/v2"
    )
    rep.add_argument("--source-token-file", type=Path, help="a reader's token on the source (DICOMWEB_TOKEN)")
    rep.add_argument(
        "--target-token-file", type=Path, help="a writer's token on the target (DICOMWEB_TARGET_TOKEN)"
    )
    rep.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="resume from FILE (or postgresql://.../db#name)"
    )
    rep.add_argument(
        "--follow", action="store_true", help="keep following the feed (else stop when caught up)"
    )
    rep.add_argument(
        "--batch-size", type=_feed_limit, default=500, help="change feed entries per batch, 1..10000 (500)"
    )
    rep.add_argument(
        "--parallel", type=_at_least_one, default=8, help="reads and stores in flight at once (8)"
    )
    rep.add_argument(
        "--status-file", type=Path, help="JSON status (position, lag) rewritten after each batch"
    )
    rep.add_argument("--metrics-file", type=Path, help="Prometheus text file (lag gauges) for node_exporter")
    rep.add_argument(
        "--metrics-port", type=_listen_port, help="serve the lag gauges for Prometheus on this port"
    )
    rep.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (127.0.0.1)")
    rep.set_defaults(func=_replicate_cmd)
