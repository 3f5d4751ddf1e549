"""What `dicomweb changefeed tail`, `dicomweb changefeed fhir-sync` and `dicomweb replicate` do (the CLI only
parses arguments)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import asyncpg
import httpx
import orjson

from changefeed.checkpoint import CheckpointStore, FileCheckpoint, MemoryCheckpoint, PostgresCheckpoint
from changefeed.consumer import ChangeFeedConsumer, ChangeFeedError, Entry
from changefeed.fhir import DEFAULT_PATIENT_SYSTEM
from changefeed.fhirsync import ArchiveReader, FhirClient, FhirSync, dicomweb_root_for
from changefeed.replicate import ReplicationStatus, Replicator, serve_metrics, service_base

log = logging.getLogger(__name__)

DEFAULT_FEED_URL = "http://127.0.0.1:8080/v1"


class OutputClosed(ChangeFeedError):
    """The reader of our output went away (`tail | head`): stop without advancing the checkpoint."""


@contextlib.asynccontextmanager
async def open_checkpoint(spec: str, default_name: str) -> AsyncIterator[CheckpointStore]:
    """A checkpoint from its command-line form: a file path, or `postgresql://.../db#name` for a row in that
    database's `changefeed_checkpoint` table (name defaults to the command's)."""
    if not spec.startswith(("postgresql://", "postgres://")):
        yield FileCheckpoint(Path(spec))
        return
    dsn, _, name = spec.partition("#")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        yield PostgresCheckpoint(pool, name or default_name)
    finally:
        await pool.close()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _start_at(url: str, start: str | None, token: str | None) -> MemoryCheckpoint:
    if start is None:
        return MemoryCheckpoint(0)
    if start == "latest":
        async with httpx.AsyncClient(timeout=30, headers=bearer(token)) as client:
            response = await client.get(f"{url.rstrip('/')}/changefeed/latest")
            if response.status_code != 200:
                raise ChangeFeedError(
                    f"GET {response.url}: HTTP {response.status_code}: {response.text[:300]}"
                )
            return MemoryCheckpoint(int(response.json().get("Sequence", 0)))
    return MemoryCheckpoint(int(start))


async def tail(
    url: str,
    out: BinaryIO,
    *,
    start: str | None = None,
    checkpoint: str | None = None,
    follow: bool = False,
    limit: int = 100,
    metadata: bool = True,
    wait: int = 30,
    token: str | None = None,
) -> None:
    """Print entries after the start (a sequence, `latest`, or the checkpoint file's) as JSON lines.

    With a checkpoint file it is advanced after each batch is written and flushed, so a script that
    restarts `tail` gets every entry at least once (the last batch again if it was killed in between).
    """

    async def write(entries: list[Entry]) -> None:
        try:
            out.write(b"".join(orjson.dumps(e) + b"\n" for e in entries))
            out.flush()
        except BrokenPipeError as exc:
            raise OutputClosed("output closed") from exc

    async with contextlib.AsyncExitStack() as stack:
        if checkpoint is not None:
            store: CheckpointStore = await stack.enter_async_context(open_checkpoint(checkpoint, "tail"))
        else:
            store = await _start_at(url, start, token)
        consumer = ChangeFeedConsumer(
            url, store, write, batch_size=limit, include_metadata=metadata, wait=wait if follow else 0,
            token=token,
        )  # fmt: skip
        await consumer.run(follow=follow)


async def fhir_sync(
    url: str,
    fhir_url: str,
    *,
    checkpoint: str | None = None,
    dicomweb_url: str | None = None,
    patient_system: str = DEFAULT_PATIENT_SYSTEM,
    follow: bool = True,
    batch_size: int = 100,
    wait: int = 30,
    token: str | None = None,
    fhir_token: str | None = None,
) -> dict[str, int]:
    """Project the archive's studies into FHIR ImagingStudy resources as the change feed reports changes.

    Without a checkpoint file it starts from the beginning of the feed each time; that is correct (each
    study is rebuilt from the archive's current state, and unchanged resources are not rewritten) but reads
    the whole feed again.
    """
    root = dicomweb_url or dicomweb_root_for(url)
    async with (
        httpx.AsyncClient(timeout=60, headers=bearer(token)) as archive_client,
        httpx.AsyncClient(timeout=60, headers=bearer(fhir_token)) as fhir_client,
        contextlib.AsyncExitStack() as stack,
    ):
        sync = FhirSync(
            ArchiveReader(archive_client),
            FhirClient(fhir_client, fhir_url),
            root,
            patient_system=patient_system,
        )
        if checkpoint is not None:
            store: CheckpointStore = await stack.enter_async_context(open_checkpoint(checkpoint, "fhir-sync"))
        else:
            store = MemoryCheckpoint(0)
        consumer = ChangeFeedConsumer(
            url, store, sync, batch_size=batch_size, include_metadata=False, wait=wait if follow else 0,
            client=archive_client,
        )  # fmt: skip
        await consumer.run(follow=follow)
    return sync.stats


async def replicate(
    source_url: str,
    target_url: str,
    *,
    checkpoint: str,
    follow: bool = True,
    batch_size: int = 500,
    parallel: int = 8,
    wait: int = 30,
    source_token: str | None = None,
    target_token: str | None = None,
    status_file: Path | None = None,
    metrics_file: Path | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    replicator_ready: Callable[[Replicator], None] | None = None,
) -> ReplicationStatus:
    """Apply the source archive's change feed to the target archive (changefeed/replicate.py), resuming
    after the checkpoint (a file, or `postgresql://.../db#name`); returns what was done."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60, read=wait + 60), headers=bearer(source_token)) as source,
        httpx.AsyncClient(timeout=120, headers=bearer(target_token)) as target,
        open_checkpoint(checkpoint, "replicate") as store,
    ):
        replicator = Replicator(
            source,
            source_url,
            target,
            target_url,
            parallel=parallel,
            status_file=status_file,
            metrics_file=metrics_file,
        )
        # where it resumes is what it has applied: not 0 until the next batch (a restart on a quiet feed)
        replicator.status.position = await store.load()
        if replicator_ready is not None:
            replicator_ready(replicator)
        consumer = ChangeFeedConsumer(
            f"{service_base(source_url)}/v1", store, replicator, batch_size=batch_size,
            include_metadata=False, wait=wait if follow else 0, client=source, caught_up=replicator.caught_up,
        )  # fmt: skip
        metrics = (
            None if metrics_port is None else serve_metrics(replicator.status, metrics_port, metrics_host)
        )
        try:
            await consumer.run(follow=follow)
        finally:
            if metrics is not None:
                await asyncio.to_thread(metrics.shutdown)
                metrics.server_close()
    return replicator.status
