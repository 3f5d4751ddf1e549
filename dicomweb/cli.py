"""The `dicomweb` command: serve, migrate, sweep."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from dicomweb.config import Settings

log = logging.getLogger("dicomweb")


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
    )


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured PostgreSQL, or the embedded one in the data directory for as long as needed."""
    if settings.database_url:
        yield settings.database_url
        return
    from indexer.embedded import EmbeddedPostgres

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(settings.data_dir.resolve() / "postgres")
    log.info("starting the embedded PostgreSQL in %s", settings.data_dir / "postgres")
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(args)
    with database(settings) as dsn:
        # Run migrations once before workers start, so they never race at first start.
        asyncio.run(_migrate(dsn))
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
        # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would kill
        # the process before the embedded PostgreSQL is stopped below. Exit through Python instead.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        metrics_dir = None
        if settings.workers > 1:
            # each worker writes its counters here, so /metrics on any worker reports all of them
            metrics_dir = tempfile.mkdtemp(prefix="dicomweb-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            uvicorn.run(
                "dicomweb.app:app_from_env",
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=settings.workers if settings.workers > 1 else None,
                log_level=settings.log_level,
                access_log=False,
            )
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


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


async def _ensure_bucket(settings: Settings) -> None:
    from storage import open_store
    from storage.s3 import S3BlobStore

    store = open_store(
        settings.resolved_storage_url(),
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
    )
    try:
        assert isinstance(store, S3BlobStore)
        await store.ensure_bucket()
    finally:
        await store.close()


def _sweep_cmd(args: argparse.Namespace) -> int:
    import asyncpg

    from archive.maintenance import drain_deletions, sweep_orphans
    from storage import open_store

    settings = _settings(args)

    async def run(dsn: str) -> tuple[int, int]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        store = open_store(
            settings.resolved_storage_url(),
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
        )
        try:
            deleted = await drain_deletions(pool, store)
            orphans = await sweep_orphans(pool, store, grace=timedelta(minutes=args.grace_minutes))
            return deleted, orphans
        finally:
            await store.close()
            await pool.close()

    with database(settings) as dsn:
        deleted, orphans = asyncio.run(run(dsn))
    print(f"deleted {deleted} queued objects, removed {orphans} unreferenced objects")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomweb", description="DICOMweb research archive")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the archive (embedded default without configuration)")
    _add_common(serve)
    serve.add_argument("--host", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (8080)")
    serve.add_argument("--workers", type=int, help="worker processes (1)")
    serve.add_argument("--log-level", help="uvicorn log level (info)")
    serve.set_defaults(func=_serve)
    mig = sub.add_parser("migrate", help="apply database migrations and exit")
    _add_common(mig)
    mig.set_defaults(func=_migrate_cmd)
    sweep = sub.add_parser("sweep", help="delete queued objects and objects the index does not reference")
    _add_common(sweep)
    sweep.add_argument("--grace-minutes", type=float, default=60.0, help="spare objects younger than this")
    sweep.set_defaults(func=_sweep_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
