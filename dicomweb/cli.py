"""The `dicomweb` command: serve, migrate, sweep, scrub, changefeed (tail, fhir-sync), deidentify, backup,
restore, replicate, retention."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dicomweb.config import Settings
from dicomweb.server_options import UVICORN_OPTIONS

if TYPE_CHECKING:
    from storage.base import BlobStore

log = logging.getLogger("dicomweb")
DEFAULT_DIMSE_PORT = 11112


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="embedded default's data directory (./dicomweb-data)")
    parser.add_argument("--database-url", help="external PostgreSQL (DICOMWEB_DATABASE_URL)")
    parser.add_argument("--storage-url", help="file:///path or s3://bucket/prefix (DICOMWEB_STORAGE_URL)")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (DICOMWEB_S3_ENDPOINT_URL)")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        data_dir=args.data_dir,
        database_url=args.database_url,
        storage_url=args.storage_url,
        s3_endpoint_url=args.s3_endpoint_url,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        workers=getattr(args, "workers", None),
        log_level=getattr(args, "log_level", None),
        insecure_open=getattr(args, "insecure_open", None) or None,
        dimse_port=getattr(args, "dimse_port", None),
        dimse_ae_title=getattr(args, "dimse_ae_title", None),
        hl7_port=getattr(args, "hl7_port", None),
        hl7_partition=getattr(args, "hl7_partition", None),
    )


@contextmanager
def database(settings: Settings, *, attach: bool = True, existing: bool = False) -> Iterator[str]:
    """The configured PostgreSQL, or the embedded one in the data directory for as long as needed.

    `attach`: use the embedded server a running `dicomweb serve` owns, if there is one, so that commands
    (scrub, sweep, tokens, backup ...) work on a live archive as they do on a stopped one; `serve` itself
    must own the server and passes False.
    `existing`: the command works on an archive that must be there (sweep, scrub, audit, tokens, backup):
    a data directory or database without one exits 1 saying so. A mistyped --data-dir got a new cluster
    and an UndefinedTableError traceback."""
    if settings.database_url:
        if existing:
            _require_archive(
                settings.database_url, "check --database-url (`dicomweb migrate` prepares a new one)"
            )
        yield settings.database_url
        return
    from indexer.embedded import EmbeddedPostgres

    cluster = settings.data_dir.resolve() / "postgres"
    if existing and not cluster.is_dir():
        raise SystemExit(
            f"error: {settings.data_dir} holds no archive: check --data-dir (`dicomweb serve` or "
            "`dicomweb migrate` makes one)"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(cluster, max_connections=settings.database_connections())
    if attach and (running := server.running_dsn()) is not None:
        log.info("using the embedded PostgreSQL of the running archive in %s", settings.data_dir)
        yield running
        return
    log.info("starting the embedded PostgreSQL in %s", settings.data_dir / "postgres")
    dsn = server.start()
    try:
        if existing:
            _require_archive(dsn, "check --data-dir (`dicomweb serve` or `dicomweb migrate` makes one)")
        yield dsn
    finally:
        server.stop()


def _require_archive(dsn: str, hint: str) -> None:
    """Exit 1 unless the database holds the archive's schema."""
    import asyncpg

    async def has_schema() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            return bool(await conn.fetchval("SELECT to_regclass('instance') IS NOT NULL"))
        finally:
            await conn.close()

    if not asyncio.run(has_schema()):
        raise SystemExit(f"error: the database holds no archive (no dicomweb tables): {hint}")


def _serve(args: argparse.Namespace) -> int:
    import asyncpg
    import uvicorn

    settings = _settings(args)
    if settings.operation_lease_seconds < 1:
        print("error: DICOMWEB_OPERATION_LEASE_SECONDS must be at least 1", file=sys.stderr)
        return 2
    if (problem := _unusable(settings)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if settings.dimse_port is None:
        settings = replace(settings, dimse_port=DEFAULT_DIMSE_PORT)
    if (taken := _port_taken(settings)) is not None:
        print(f"error: {taken}", file=sys.stderr)
        return 1
    workers = settings.worker_count()
    settings = replace(settings, workers=workers)
    if (unusable := _store_unusable(settings, object_lock=settings.s3_object_lock_days > 0)) is not None:
        print(f"error: {unusable}", file=sys.stderr)
        return 1
    with database(settings, attach=False) as dsn:
        # Run migrations once before workers start, so they never race at first start.
        try:
            asyncio.run(_migrate(dsn))
        except (
            OSError,
            asyncpg.PostgresError,
            asyncpg.ClientConfigurationError,
        ) as exc:  # refused, auth, URL
            print(f"error: cannot use the database: {exc}", file=sys.stderr)
            return 1
        if not settings.database_url:
            _owner_token(dsn, settings)
        if settings.storage_url is None:
            (settings.data_dir / "blobs").mkdir(parents=True, exist_ok=True)
        os.environ.update(settings.to_env())
        os.environ["DICOMWEB_DATABASE_URL"] = dsn
        os.environ["DICOMWEB_STORAGE_URL"] = settings.resolved_storage_url()
        print(
            f"DICOMweb archive on http://{settings.host}:{settings.port}/v2 "
            f"(database: {'embedded' if not settings.database_url else 'external'}, "
            f"storage: {settings.resolved_storage_url()})",
            flush=True,
        )
        if settings.dimse_port:
            print(f"DIMSE: AE title {settings.dimse_ae_title} on {settings.host}:{settings.dimse_port} "
                  "(register peers with 'dicomweb ae add' or POST /aes)", flush=True)  # fmt: skip
        if settings.hl7_port:
            print(f"HL7 (MLLP): {settings.host}:{settings.hl7_port}, partition {settings.hl7_partition}",
                  flush=True)  # fmt: skip
        # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would kill
        # the process before the embedded PostgreSQL is stopped below. Exit through Python instead.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        metrics_dir = None
        if workers > 1:
            # each worker writes its counters here, so /metrics on any worker reports all of them
            metrics_dir = tempfile.mkdtemp(prefix="dicomweb-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            if workers == 1:  # exits 3 (SystemExit) when the app cannot start
                from dicomweb.supervisor import SUPERVISOR_PID_ENV

                os.environ.pop(SUPERVISOR_PID_ENV, None)  # this process is no supervised worker
                uvicorn.run("dicomweb.app:app_from_env", factory=True, host=settings.host,
                            port=settings.port, log_level=settings.log_level, **UVICORN_OPTIONS)  # fmt: skip
                return 0
            return _supervise(settings, workers)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)


def _port_taken(settings: Settings) -> str | None:
    """Whether another process listens on the DIMSE or HL7 port already.

    Those listeners bind with SO_REUSEPORT so that every worker of this server shares the port, and so would
    a second archive on the machine started with the same port (11112 unless told otherwise): the kernel
    then split associations and messages between two archives without a word. A socket bound here without
    SO_REUSEPORT cannot share the port with anyone, so binding it tells; it is closed before the workers
    bind theirs."""
    import errno
    import socket

    for flag, port in (("--dimse-port", settings.dimse_port), ("--hl7-port", settings.hl7_port)):
        if not port:
            continue
        try:
            infos = socket.getaddrinfo(settings.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError:
            continue  # an unusable host: the HTTP listener's own error says so
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left is no listener
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    continue
                return (
                    f"{flag} {port} on {settings.host} is in use by another process (another archive?); "
                    f"choose another port, or 0 to turn that listener off"
                )
    return None


def _unusable(settings: Settings) -> str | None:
    """Why these serve settings cannot work, checked before anything starts: a port out of range was a
    traceback (or a worker that died at start), a negative worker count a server that accepted
    connections and never answered, an invalid AE title or HL7 partition a listener no peer could use."""
    from access.service import parse_networks
    from dimse.aes import AeError, check_ae_title
    from indexer.lookup import valid_partition_name

    for flag, port in (
        ("--port (DICOMWEB_PORT)", settings.port),
        ("--dimse-port (DICOMWEB_DIMSE_PORT)", settings.dimse_port),
        ("--hl7-port (DICOMWEB_HL7_PORT)", settings.hl7_port),
    ):
        if port is not None and not 0 <= port <= 65535:
            return f"{flag} must be within 0..65535, not {port}"
    if settings.workers is not None and settings.workers < 0:
        return f"--workers (DICOMWEB_WORKERS) must be at least 1 (0: one per core), not {settings.workers}"
    try:
        check_ae_title(settings.dimse_ae_title, "--dimse-ae-title (DICOMWEB_DIMSE_AE_TITLE)")
    except AeError as exc:
        return str(exc)
    if not valid_partition_name(settings.hl7_partition):
        return (
            f"--hl7-partition (DICOMWEB_HL7_PARTITION) {settings.hl7_partition!r} is not a partition name: "
            "1-64 letters, digits, '_', '.', '-'"
        )
    for variable, networks in (
        ("DICOMWEB_HL7_ALLOWED_HOSTS", settings.hl7_allowed_hosts if settings.hl7_port else None),
        ("DICOMWEB_TRUSTED_PROXIES", settings.trusted_proxies),
    ):
        if networks and networks.strip() != "*":
            try:
                parse_networks(networks)
            except ValueError as exc:  # each worker died at start with a traceback
                return f"{variable}: {exc}; list addresses and networks (CIDR), comma-separated"
    return None


def _supervise(settings: Settings, workers: int) -> int:
    """Run `workers` server processes; 0 after a stop by signal, 3 when a worker died before it was ready
    (dicomweb/supervisor.py: uvicorn's own supervisor would exit 0 or respawn it for ever)."""
    import uvicorn

    from dicomweb.supervisor import READY_DIR_ENV, SUPERVISOR_PID_ENV, WorkerSupervisor

    config = uvicorn.Config("dicomweb.app:app_from_env", factory=True, host=settings.host,
                            port=settings.port, workers=workers, log_level=settings.log_level,
                            **UVICORN_OPTIONS)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dicomweb-ready-") as ready_dir:
        os.environ[READY_DIR_ENV] = ready_dir  # inherited by the spawned workers
        os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
        supervisor = WorkerSupervisor(config, [config.bind_socket()], Path(ready_dir))
        supervisor.run()
    if supervisor.failure is not None:
        print(f"error: {supervisor.failure}", file=sys.stderr, flush=True)
        return 3
    return 0


def _owner_token(dsn: str, settings: Settings) -> None:
    """The embedded default's first start creates an owner token in a 0600 file; its path, never the
    token, is printed."""
    from access.commands import bootstrap_owner_token

    path = bootstrap_owner_token(dsn, settings.data_dir)
    if settings.insecure_open:
        print("WARNING: --insecure-open: every route is open to anyone who can connect", flush=True)
    elif path is not None:
        print(f"owner API token in {path} (send it as 'Authorization: Bearer <token>')", flush=True)
    else:
        print(
            "no owner-token file, and the database already has an owner token (the file was removed, or "
            "the archive was restored from a backup, whose tokens are the backed-up archive's); create "
            "tokens with 'dicomweb token create'",
            flush=True,
        )


async def _migrate(dsn: str) -> list[str]:
    import asyncpg

    from indexer.migrate import migrate

    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def _migrate_cmd(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with database(settings) as dsn:
        applied = asyncio.run(_migrate(dsn))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    if settings.storage_url and settings.storage_url.startswith("s3://"):
        # a fresh deployment's one preparation step: the bucket too (a no-op when it exists)
        asyncio.run(_ensure_bucket(settings))
        print(f"bucket ready: {settings.storage_url}")
    return 0


def blob_store(settings: Settings) -> BlobStore:
    """The configured blob store (the embedded default's directory otherwise), for commands."""
    from storage import open_store

    return open_store(
        settings.resolved_storage_url(),
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
        s3_object_lock_days=settings.s3_object_lock_days,
    )


async def _ensure_bucket(settings: Settings) -> None:
    from storage.s3 import S3BlobStore

    store = blob_store(settings)
    try:
        assert isinstance(store, S3BlobStore)
        await store.ensure_bucket()
    finally:
        await store.close()


def _store_unusable(settings: Settings, *, object_lock: bool = False) -> str | None:
    """Why the configured S3 bucket cannot be used (missing, credentials refused, endpoint unreachable, or,
    with `object_lock`, without the Object Lock a retention needs), checked once before anything starts: a
    server started on it answered every STOW 409, the sweep died with a traceback. Each worker checks the
    Object Lock too (dicomweb/app.py), but only after all of them have logged the same failure. None when it
    can be used, or when the store is a directory."""
    from storage.s3 import S3BlobStore, StoreUnusableError

    if not settings.resolved_storage_url().startswith("s3://"):
        return None  # a directory: nothing to reach (and opening the store would create it)

    async def check() -> None:
        store = blob_store(settings)
        try:
            if isinstance(store, S3BlobStore):
                await store.check_bucket()
                if object_lock:
                    await store.check_object_lock()
        finally:
            await store.close()

    try:
        asyncio.run(check())
    except StoreUnusableError as exc:
        return f"cannot use the store {settings.resolved_storage_url()}: {exc}"
    except RuntimeError as exc:  # check_object_lock's refusal, which says it all
        return str(exc)
    return None


def _sweep_cmd(args: argparse.Namespace) -> int:
    import asyncpg

    from archive.maintenance import drain_deletions, sweep_orphans

    settings = _settings(args)
    if (unusable := _store_unusable(settings)) is not None:
        print(f"error: {unusable}", file=sys.stderr)
        return 1

    async def run(dsn: str) -> tuple[int, int]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        store = blob_store(settings)
        try:
            deleted = await drain_deletions(pool, store)
            orphans = await sweep_orphans(pool, store, grace=timedelta(minutes=args.grace_minutes))
            return deleted, orphans
        finally:
            await store.close()
            await pool.close()

    with database(settings, existing=True) as dsn:
        deleted, orphans = asyncio.run(run(dsn))
    print(f"deleted {deleted} queued objects, removed {orphans} unreferenced objects")
    return 0


def _scrub_cmd(args: argparse.Namespace) -> int:
    """Run a scrub in the foreground as an operation of its own (resumable: `--resume ID`, by this command
    or by any server process once this one is gone); exit 1 when objects are missing or altered."""
    import asyncpg

    from access.audit import AuditLog
    from archive.scrub import ALTERED, MISSING, SCRUB, ScrubHandler, findings, scrub_params
    from dicomweb.routes.scrub import audit_reporters
    from indexer.operations import (
        FINISHED,
        OperationRunner,
        create_operation,
        get_operation,
        parse_operation_id,
    )
    from indexer.sessions import server_settings

    settings = _settings(args)
    resume = None
    if args.resume is not None and (resume := parse_operation_id(args.resume)) is None:
        print(f"error: {args.resume!r} is not an operation id", file=sys.stderr)
        return 2

    async def run(dsn: str) -> int:
        # its steps hold the operation row as a server's do (indexer/sessions.py)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, server_settings=server_settings())
        store = blob_store(settings)
        audit = AuditLog(pool)
        try:
            report, summary = audit_reporters(audit)
            runner = OperationRunner(pool, {SCRUB: ScrubHandler(store, report=report, summary=summary)})
            async with pool.acquire() as conn:
                if resume is not None:
                    op = await get_operation(conn, resume)
                    if op is None or op.type != SCRUB:
                        print(f"error: no scrub operation {args.resume}", file=sys.stderr)
                        return 2
                else:
                    params = scrub_params(args.rate_mb, timedelta(minutes=args.grace_minutes))
                    op = await create_operation(conn, SCRUB, params, [])
            print(f"scrub {op.id_hex}", file=sys.stderr, flush=True)
            while op.status not in FINISHED:
                # waits while another process holds it (or a failed step's backoff runs)
                if not await runner.run_once(op.id):
                    await asyncio.sleep(1.0)
                async with pool.acquire() as conn:
                    op = await get_operation(conn, op.id) or op
            await audit.flush()
            async with pool.acquire() as conn:
                rows = await findings(conn, op.id, 2**31 - 1)
        finally:
            await store.close()
            await pool.close()
        for row in rows:
            uids = "/".join(filter(None, (row["study_instance_uid"], row["series_instance_uid"],
                                          row["sop_instance_uid"])))  # fmt: skip
            print(f"{row['kind']}\t{row['storage_key']}\t{uids or '-'}")
        r = op.results
        print(
            f"scrub {op.id_hex} {op.status}: {r.get('checkedObjects', 0)} objects "
            f"({r.get('checkedBytes', 0)} bytes) checked, {r.get('listedObjects', 0)} listed; "
            f"{r.get(MISSING, 0)} missing, {r.get(ALTERED, 0)} altered, "
            f"{r.get('unreferenced', 0)} unreferenced",
            file=sys.stderr,
        )
        if op.status != "succeeded":
            print(f"error: the scrub did not finish: {r.get('error') or r.get('reason')}", file=sys.stderr)
            return 2
        return 1 if r.get(MISSING) or r.get(ALTERED) else 0

    with database(settings, existing=True) as dsn:
        return asyncio.run(run(dsn))


def _changefeed_cmd(args: argparse.Namespace) -> int:
    from changefeed import commands
    from changefeed.checkpoint import CheckpointError
    from changefeed.consumer import ChangeFeedError, CheckpointAheadError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request on stderr
    try:
        token = _token(args.token_file, "DICOMWEB_TOKEN")
        if args.changefeed_command == "tail":
            if args.start is not None and args.start != "latest" and not args.start.isdigit():
                print(f"--from takes a sequence number or 'latest', not {args.start!r}", file=sys.stderr)
                return 2
            asyncio.run(
                commands.tail(
                    args.url, sys.stdout.buffer, start=args.start, checkpoint=args.checkpoint,
                    follow=args.follow, limit=args.limit, metadata=not args.no_metadata, token=token,
                )
            )  # fmt: skip
        else:
            stats = asyncio.run(
                commands.fhir_sync(
                    args.url, args.fhir_url, checkpoint=args.checkpoint, dicomweb_url=args.dicomweb_url,
                    patient_system=args.patient_system, follow=not args.once, token=token,
                    fhir_token=_token(args.fhir_token_file, "DICOMWEB_FHIR_TOKEN"),
                )
            )  # fmt: skip
            print(f"ImagingStudy: {stats['updated']} written, {stats['unchanged']} unchanged, "
                  f"{stats['deleted']} deleted")  # fmt: skip
    except commands.OutputClosed:
        # the reader went away (`| head`): exit quietly, and let the flush at exit find nowhere to fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CheckpointAheadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ChangeFeedError, CheckpointError, OSError) as exc:  # OSError: checkpoint file or database
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _token(path: Path | None, variable: str) -> str | None:
    """A bearer token from a file (as the embedded default writes its owner token) or the environment;
    never from the command line, where other users could read it."""
    if path is not None:
        return path.read_text(encoding="utf-8").strip() or None
    return os.environ.get(variable) or None


def _http_url(text: str) -> str:
    """An archive's or FHIR server's root: http(s)://host[:port]/path. Anything else was retried for ever
    (an error that says the URL has no scheme is not one that passes)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host")
    return text


def _amount(ceiling: float) -> Callable[[str], float]:
    """A finite, non-negative number up to `ceiling` (minutes, MB/s): 'nan' and 'inf' were tracebacks
    (or, for a rate, no limit at all), and a negative grace would spare nothing being written."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not 0 <= number <= ceiling:  # also False for nan
            raise argparse.ArgumentTypeError(f"must be a number from 0 to {ceiling:.0f}, not {text!r}")
        return number

    return parse


_GRACE_MINUTES = _amount(100 * 365 * 24 * 60)  # a century


def _at_least_one(text: str) -> int:
    """A count of 1 and up (a limit, things in flight): 0 or a negative one was PostgreSQL's error as a
    traceback, or a semaphore that waited for ever."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _listen_port(text: str) -> int:
    """A port to listen on: out of range was bind()'s OverflowError as a traceback, and 0 a random port
    that nobody could scrape."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port within 1..65535, not {text!r}")
    return int(text)


def _feed_limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"must be within 1..10000, not {text!r}")
    return int(text)


def _add_changefeed(sub: argparse._SubParsersAction) -> None:
    from changefeed.commands import DEFAULT_FEED_URL
    from changefeed.fhir import DEFAULT_PATIENT_SYSTEM

    checkpoint_help = "resume from FILE (or postgresql://.../db#name) and advance it"
    token_help = "bearer token for the archive, a reader's (DICOMWEB_TOKEN)"
    feed = sub.add_parser("changefeed", help="read the change feed: tail it, or sync it to FHIR")
    commands = feed.add_subparsers(dest="changefeed_command", required=True)
    tail = commands.add_parser("tail", help="print change feed entries as JSON lines")
    tail.add_argument(
        "--url",
        type=_http_url,
        default=DEFAULT_FEED_URL,
        help=f"v1 root or partition root ({DEFAULT_FEED_URL})",
    )
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", metavar="SEQ", help="print entries after SEQ (or 'latest')")
    start.add_argument("--checkpoint", metavar="FILE", help=checkpoint_help)
    tail.add_argument("--follow", action="store_true", help="keep waiting for new entries (long-poll)")
    tail.add_argument(
        "--limit", type=_feed_limit, default=100, metavar="N", help="entries per request, 1..10000 (100)"
    )
    tail.add_argument("--no-metadata", action="store_true", help="leave out each entry's DICOM JSON")
    tail.add_argument("--token-file", type=Path, metavar="FILE", help=token_help)
    tail.set_defaults(func=_changefeed_cmd)
    fhir = commands.add_parser("fhir-sync", help="keep FHIR ImagingStudy resources in step with the archive")
    fhir.add_argument(
        "--fhir-url", type=_http_url, required=True, help="FHIR R4 server base, e.g. http://fhir:8080/fhir"
    )
    fhir.add_argument(
        "--url", type=_http_url, default=DEFAULT_FEED_URL, help=f"change feed root ({DEFAULT_FEED_URL})"
    )
    fhir.add_argument("--checkpoint", metavar="FILE", help=checkpoint_help)
    fhir.add_argument(
        "--dicomweb-url", type=_http_url, help="v2 root for QIDO and the Endpoint (derived from --url)"
    )
    fhir.add_argument("--patient-system", default=DEFAULT_PATIENT_SYSTEM, help="Patient.identifier system")
    fhir.add_argument("--once", action="store_true", help="stop when caught up instead of following")
    fhir.add_argument("--token-file", type=Path, metavar="FILE", help=token_help)
    fhir.add_argument(
        "--fhir-token-file",
        type=Path,
        metavar="FILE",
        help="bearer token for the FHIR server (DICOMWEB_FHIR_TOKEN)",
    )
    fhir.set_defaults(func=_changefeed_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomweb", description="DICOMweb research archive")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the archive (embedded default without configuration)")
    _add_common(serve)
    serve.add_argument("--host", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (8080)")
    serve.add_argument("--workers", type=int, help="worker processes (one per core)")
    serve.add_argument("--log-level", help="uvicorn log level (info)")
    serve.add_argument(
        "--insecure-open", action="store_true", help="no authentication on any route: local play only"
    )
    serve.add_argument(
        "--dimse-port", type=int, help=f"DICOM (DIMSE) listener port ({DEFAULT_DIMSE_PORT}; 0: off)"
    )
    serve.add_argument("--dimse-ae-title", help="the archive's AE title (DICOMWEB)")
    serve.add_argument("--hl7-port", type=int, help="HL7 v2 (MLLP) listener port (off unless set)")
    serve.add_argument("--hl7-partition", help="partition HL7 messages update and order into (the default)")
    serve.set_defaults(func=_serve)
    mig = sub.add_parser("migrate", help="apply database migrations and exit")
    _add_common(mig)
    mig.set_defaults(func=_migrate_cmd)
    sweep = sub.add_parser("sweep", help="delete queued objects and objects the index does not reference")
    _add_common(sweep)
    sweep.add_argument(
        "--grace-minutes", type=_GRACE_MINUTES, default=60.0, help="spare objects younger than this"
    )
    sweep.set_defaults(func=_sweep_cmd)
    scrub = sub.add_parser(
        "scrub",
        help="re-read every stored object: report missing, altered (SHA-256) and unreferenced ones; "
        "exit 1 when any is missing or altered",
    )
    _add_common(scrub)
    scrub.add_argument(
        "--rate-mb", type=_amount(1e6), default=0.0, help="read at most this many MB/s (0: no limit)"
    )
    scrub.add_argument(
        "--grace-minutes",
        type=_GRACE_MINUTES,
        default=60.0,
        help="unreferenced objects younger than this are spared",
    )
    scrub.add_argument("--resume", metavar="ID", help="go on with an interrupted scrub operation")
    scrub.set_defaults(func=_scrub_cmd)
    _add_changefeed(sub)
    from dicomweb.access_cli import add_access_commands

    add_access_commands(sub, _add_common)
    from dicomweb.ae_cli import add_ae_command

    add_ae_command(sub, _add_common)  # registered DIMSE peers (dimse/aes.py)
    from dicomweb.hl7_cli import add_hl7_command

    add_hl7_command(sub, _add_common)  # received HL7 messages, replay (hl7/journal.py)
    from deid.files import add_deidentify_command

    add_deidentify_command(sub)  # de-identification of files on disk (deid/files.py)
    from dicomweb.recovery_cli import add_recovery_commands

    add_recovery_commands(sub, _add_common)  # backup, restore (archive/backup.py), replicate
    from dicomweb.retention_cli import add_retention_command

    add_retention_command(sub, _add_common)  # retention policies (retention/policy.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    import socket

    import asyncpg

    from indexer.embedded import EmbeddedPostgresError

    # the database of --database-url / DICOMWEB_DATABASE_URL cannot be used: a bad URL, nothing listening,
    # an unknown host, refused credentials, no such database
    unreachable = (
        asyncpg.ClientConfigurationError, asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
        ConnectionError, socket.gaierror, TimeoutError,
    )  # fmt: skip
    try:
        return int(args.func(args) or 0)
    except EmbeddedPostgresError as exc:  # a data directory that cannot be used: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except unreachable as exc:
        print(f"error: cannot use the database: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
