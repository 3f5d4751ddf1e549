"""Keep a second archive (a standby, another region) in step with this one by tailing its change feed.

`Replicator` is a `ChangeFeedConsumer` handler. For each batch it works out every touched instance's last
action and applies it to the target over DICOMweb: a created or updated instance is read from the source
with WADO-RS (as stored, `transfer-syntax=*`) and stored on the target with STOW-RS into the same
partition; a deleted one is deleted there. Instances of one series that a batch mostly wants are read in
one series retrieve (its size from a QIDO of the study) and stored in one STOW. The consumer saves its
checkpoint only after the handler returns, so delivery is at least once, and applying is idempotent:

* STOW of an instance the target already holds answers 45070. The target's copy is then compared with the
  source's; equal means applied already (a replayed batch), different means the source changed it (an
  update, or a delete and re-store): the target's copy is deleted and the source's stored again.
* DELETE of an instance the target does not hold answers 404: applied already.
* A create whose instance the source no longer holds (404, or the entry's State is `deleted`) is skipped:
  its delete comes later in the feed.

Collapsing a batch to each instance's last action is safe because the target only has to end up as the
source is; intermediate states inside one batch are never observable afterwards.

Lag is how long after the source committed an entry (its Timestamp) the target had it applied; and
`caught_up_at` is the last time every entry the source's feed held had been applied, so `now - caught_up_at`
bounds the lag while the replicator is behind or stuck (source down, target refusing). The status file
(JSON) and the metrics file (Prometheus text format, for node_exporter's textfile collector) are
rewritten after every batch and whenever it catches up; `--metrics-port` serves the same, live.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import re
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import httpx
import orjson
from prometheus_client import CollectorRegistry, Metric, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from changefeed.consumer import ChangeFeedError, DownstreamError, Entry

log = logging.getLogger(__name__)

DEFAULT_PARTITION = "Microsoft.Default"
ALREADY_STORED = 45070
DICOM_AS_STORED = "application/dicom; transfer-syntax=*"
MULTIPART_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SERIES_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
WHOLE_SERIES_MAX = 64  # a series read whole holds at most this many instances (all in memory at once)
_BOUNDARY = re.compile(r'boundary="?([^";\s]+)"?', re.IGNORECASE)
_VERSIONED = re.compile(r"/v\d+$")
_WARNING_TEXT = re.compile(r'\d{3} \S+ "([^"]*)"')  # the text of each `299 dicomweb "..."`


class ReplicationError(DownstreamError):
    """The target refused an instance for a reason retrying cannot be expected to fix by itself."""


def service_base(url: str) -> str:
    """`http://host:port` from the archive's URL as given (`.../v2`, `.../v1` or the bare base)."""
    url = url.rstrip("/")
    return _VERSIONED.sub("", url)


@dataclass(frozen=True)
class InstanceRef:
    partition: str
    study: str
    series: str
    sop: str

    def path(self) -> str:
        prefix = "" if self.partition == DEFAULT_PARTITION else f"/partitions/{self.partition}"
        return f"{prefix}/studies/{self.study}/series/{self.series}/instances/{self.sop}"

    def partition_root(self) -> str:
        return "" if self.partition == DEFAULT_PARTITION else f"/partitions/{self.partition}"


@dataclass
class ReplicationStatus:
    """What the replicator has done; `lags` keeps the most recent per-entry lags (seconds)."""

    position: int = 0
    copied: int = 0
    already_present: int = 0
    replaced: int = 0
    deleted: int = 0
    skipped: int = 0
    last_lag_seconds: float = 0.0
    last_applied: str | None = None
    caught_up_at: float | None = None  # time.time() when it last had applied all the source's feed held
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    started_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "lag_seconds": round(self.last_lag_seconds, 3),
            "last_applied": self.last_applied,
            "behind_seconds": round(self.behind(), 3),
            "copied": self.copied,
            "already_present": self.already_present,
            "replaced": self.replaced,
            "deleted": self.deleted,
            "skipped": self.skipped,
        }

    def behind(self, now: float | None = None) -> float:
        """Seconds since the replicator last had everything applied (since start, if it never had)."""
        since = self.caught_up_at if self.caught_up_at is not None else self.started_at
        return max(0.0, (time.time() if now is None else now) - since)

    def prometheus(self) -> str:
        lines = [
            "# HELP dicomweb_replication_lag_seconds Source commit to target apply, of the last batch.",
            "# TYPE dicomweb_replication_lag_seconds gauge",
            f"dicomweb_replication_lag_seconds {self.last_lag_seconds:.3f}",
            "# HELP dicomweb_replication_behind_seconds Since every entry of the source's feed was last "
            "applied (as of this rendering).",
            "# TYPE dicomweb_replication_behind_seconds gauge",
            f"dicomweb_replication_behind_seconds {self.behind():.3f}",
            "# HELP dicomweb_replication_caught_up_timestamp_seconds When every entry of the source's feed "
            "was last applied (alert on time() minus this).",
            "# TYPE dicomweb_replication_caught_up_timestamp_seconds gauge",
            f"dicomweb_replication_caught_up_timestamp_seconds {self.caught_up_at or 0:.3f}",
            "# HELP dicomweb_replication_sequence Last source change feed sequence applied to the target.",
            "# TYPE dicomweb_replication_sequence gauge",
            f"dicomweb_replication_sequence {self.position}",
            "# HELP dicomweb_replication_applied_total Entries applied to the target, by outcome.",
            "# TYPE dicomweb_replication_applied_total counter",
        ]
        for outcome in ("copied", "already_present", "replaced", "deleted", "skipped"):
            count = getattr(self, outcome)
            lines.append(f'dicomweb_replication_applied_total{{outcome="{outcome}"}} {count}')
        return "\n".join(lines) + "\n"


class StatusCollector:
    """A prometheus_client collector over a ReplicationStatus, rendered at each scrape (`--metrics-port`),
    so that `dicomweb_replication_behind_seconds` grows while the replicator is stuck."""

    def __init__(self, status: ReplicationStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from text_string_to_metric_families(self.status.prometheus())


def serve_metrics(status: ReplicationStatus, port: int, host: str = "127.0.0.1") -> WSGIServer:
    """Serve the status as Prometheus metrics on host:port (a thread); `.shutdown()` stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    server, _ = start_http_server(port, host, registry=registry)
    return server


def _write_atomically(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
    os.replace(tmp, path)


def _timestamp(entry: Entry) -> float | None:
    value = entry.get("Timestamp")
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def stow_body(files: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request body of whole PS3.10 objects and its Content-Type (a random boundary, so it
    cannot occur inside the objects except by a 2^-128 chance)."""
    boundary = f"replica-{uuid.uuid4().hex}"
    chunks = []
    for data in files:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def split_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """SOP Instance UID -> object, of each part of this archive's WADO-RS multipart/related answer (the
    last segment of each part's Content-Location names the instance). dicomweb/multipart.py parses
    streaming request bodies in the HTTP package, which this one may not import; an answer held whole in
    memory is cut at its delimiters, which a random 128-bit boundary keeps out of the objects."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise ReplicationError(f"a WADO-RS answer without a multipart boundary: {content_type!r}")
    delimiter = b"\r\n--" + match.group(1).encode()
    parts: dict[str, bytes] = {}
    for piece in (b"\r\n" + body).split(delimiter)[1:]:
        if piece.startswith(b"--"):
            return parts  # the closing delimiter
        head, _, data = piece.partition(b"\r\n\r\n")
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-location":
                parts[value.strip().rsplit("/", 1)[-1]] = data
    raise ReplicationError("a WADO-RS answer cut short (no closing delimiter)")


class Replicator:
    """The change feed handler: `await replicator(entries)` applies a batch of the source's feed to the
    target. `source` and `target` are the archives' URLs (`http://host:port[/v2]`); the clients carry each
    side's credential (a reader's on the source, a writer's on the target)."""

    def __init__(
        self,
        source: httpx.AsyncClient,
        source_url: str,
        target: httpx.AsyncClient,
        target_url: str,
        *,
        stow_batch: int = 16,
        parallel: int = 4,
        status_file: Path | None = None,
        metrics_file: Path | None = None,
    ) -> None:
        self.source, self.target = source, target
        self.source_root = f"{service_base(source_url)}/v2"
        self.target_root = f"{service_base(target_url)}/v2"
        self.stow_batch = stow_batch
        self.parallel = parallel
        self.status = ReplicationStatus()
        self.status_file, self.metrics_file = status_file, metrics_file

    async def __call__(self, entries: list[Entry]) -> None:
        last: dict[InstanceRef, Entry] = {}
        for entry in entries:
            ref = InstanceRef(
                entry.get("PartitionName") or DEFAULT_PARTITION,
                entry["StudyInstanceUid"],
                entry["SeriesInstanceUid"],
                entry["SopInstanceUid"],
            )
            last.pop(ref, None)  # re-insert: dict order is then the order of each instance's last entry
            last[ref] = entry
        deletes = [ref for ref, e in last.items() if e["Action"] == "delete"]
        copies = [ref for ref, e in last.items() if e["Action"] != "delete" and e.get("State") != "deleted"]
        self.status.skipped += len(last) - len(deletes) - len(copies)
        studies: dict[tuple[str, str], list[InstanceRef]] = {}
        for ref in copies:
            studies.setdefault((ref.partition, ref.study), []).append(ref)
        limit = asyncio.Semaphore(self.parallel)
        # a failure ends the batch as an exception group, which the consumer reads (a ChangeFeedError in it
        # stops the consumer, anything else is retried with the group's errors named)
        async with asyncio.TaskGroup() as group:
            for ref in deletes:
                group.create_task(_bounded(limit, functools.partial(self._delete, ref)))
            for refs in studies.values():
                group.create_task(self._copy_study(refs, group, limit))
        self._applied(entries)

    async def _copy_study(
        self,
        refs: list[InstanceRef],
        group: asyncio.TaskGroup,
        limit: asyncio.Semaphore,
    ) -> None:
        """Copy a study's instances of this batch: a series whose instances this batch mostly wants is
        read in one WADO-RS request (a QIDO of the study's series first tells their sizes); the rest one
        request per instance. One request per instance cost the source and this process about 1 ms of CPU
        each, which held replication under the ingest rate it follows (docs/performance.md)."""
        series: dict[str, list[InstanceRef]] = {}
        for ref in refs:
            series.setdefault(ref.series, []).append(ref)
        sizes: dict[str, int] = {}
        if len(refs) > 1:
            async with limit:
                sizes = await self._series_sizes(refs[0])
        singles: list[InstanceRef] = []
        for uid, wanted in series.items():
            size = sizes.get(uid)
            if len(wanted) > 1 and size is not None and size <= min(WHOLE_SERIES_MAX, 2 * len(wanted)):
                group.create_task(_bounded(limit, functools.partial(self._copy_series, wanted)))
            else:
                singles += wanted
        for i in range(0, len(singles), self.stow_batch):
            batch = singles[i : i + self.stow_batch]
            group.create_task(_bounded(limit, functools.partial(self._copy, batch)))

    async def _series_sizes(self, ref: InstanceRef) -> dict[str, int]:
        """Series Instance UID -> its number of instances on the source, for each series of `ref`'s study."""
        url = f"{self.source_root}{ref.partition_root()}/studies/{ref.study}/series"
        response = await self.source.get(url, params={"includefield": SERIES_INSTANCES})
        found: dict[str, int] = {}
        if response.status_code in (204, 404):
            return found  # the study is gone: every instance is read alone, and skipped
        _expect(response, 200)
        for item in response.json():
            uid = item.get("0020000E", {}).get("Value", [None])[0]
            count = item.get(SERIES_INSTANCES, {}).get("Value", [None])[0]
            if isinstance(uid, str) and isinstance(count, int):
                found[uid] = count
        return found

    async def _copy_series(self, refs: list[InstanceRef]) -> None:
        """Read the series of `refs` whole from the source; store the instances of it that are wanted."""
        first = refs[0]
        url = f"{self.source_root}{first.partition_root()}/studies/{first.study}/series/{first.series}"
        response = await self.source.get(url, headers={"Accept": MULTIPART_AS_STORED})
        if response.status_code == 404:
            self.status.skipped += len(refs)
            return
        _expect(response, 200)
        held = split_multipart(response.content, response.headers.get("content-type", ""))
        await self._store([ref for ref in refs if ref.sop in held], held)
        self.status.skipped += sum(1 for ref in refs if ref.sop not in held)

    def caught_up(self, as_of: float) -> None:
        """The consumer's hook: everything the source's feed held at `as_of` is applied."""
        self.status.caught_up_at = as_of
        self._write_status()

    def _write_status(self) -> None:
        if self.status_file is not None:
            _write_atomically(self.status_file, orjson.dumps(self.status.as_json()).decode() + "\n")
        if self.metrics_file is not None:
            _write_atomically(self.metrics_file, self.status.prometheus())

    def _applied(self, entries: list[Entry]) -> None:
        now = time.time()
        lags = [now - t for e in entries if (t := _timestamp(e)) is not None]
        self.status.lags.extend(lags)
        self.status.last_lag_seconds = max(lags, default=0.0)
        self.status.position = int(entries[-1]["Sequence"])
        self.status.last_applied = dt.datetime.fromtimestamp(now, dt.UTC).isoformat()
        self._write_status()

    async def _delete(self, ref: InstanceRef) -> None:
        response = await self.target.delete(f"{self.target_root}{ref.path()}")
        if response.status_code == 404:
            return  # never copied, or deleted by an earlier delivery of this entry
        _expect(response, 200, 202, 204)
        self.status.deleted += 1

    async def _read_source(self, ref: InstanceRef) -> bytes | None:
        url = f"{self.source_root}{ref.path()}"
        response = await self.source.get(url, headers={"Accept": DICOM_AS_STORED})
        if response.status_code == 404:
            return None  # deleted since the entry was written; its delete entry follows
        _expect(response, 200)
        return response.content

    async def _copy(self, refs: list[InstanceRef]) -> None:
        found = await asyncio.gather(*(self._read_source(ref) for ref in refs))
        objects = {ref.sop: data for ref, data in zip(refs, found, strict=True) if data is not None}
        self.status.skipped += len(refs) - len(objects)
        await self._store([ref for ref in refs if ref.sop in objects], objects)

    async def _store(self, refs: list[InstanceRef], objects: dict[str, bytes]) -> None:
        """STOW `objects` of `refs` (all of one partition) on the target; reconcile those it already held."""
        if not refs:
            return
        duplicates = await self._stow(refs[0].partition_root(), [objects[ref.sop] for ref in refs])
        self.status.copied += len(refs) - len(duplicates)
        for ref in refs:
            if ref.sop in duplicates:
                await self._reconcile(ref, objects[ref.sop])

    async def _stow(self, partition_root: str, files: list[bytes]) -> set[str]:
        """Store on the target; the SOP Instance UIDs it already held (45070)."""
        body, content_type = stow_body(files)
        response = await self.target.post(
            f"{self.target_root}{partition_root}/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        )
        if response.status_code == 200:
            return set()
        if response.status_code not in (202, 409):
            _expect(response, 200)
        duplicates, refused = set(), []
        for item in response.json().get("00081198", {}).get("Value", []):
            sop = item.get("00081155", {}).get("Value", [None])[0]
            reason = item.get("00081197", {}).get("Value", [None])[0]
            if reason == ALREADY_STORED:
                duplicates.add(sop)
            else:
                refused.append(f"{sop}: failure reason {reason}")
        if refused:
            # the reasons in words are in the Warning header (not per instance): 272 alone says nothing
            said = "; ".join(_WARNING_TEXT.findall(response.headers.get("warning", "")))
            raise ReplicationError(
                f"the target refused instances: {'; '.join(refused)}" + (f" ({said})" if said else "")
            )
        return duplicates

    async def _reconcile(self, ref: InstanceRef, data: bytes) -> None:
        """The target already holds this instance: nothing to do if it is the same object, else replace it."""
        url = f"{self.target_root}{ref.path()}"
        response = await self.target.get(url, headers={"Accept": DICOM_AS_STORED})
        if response.status_code == 200 and response.content == data:
            self.status.already_present += 1
            return
        if response.status_code != 404:
            _expect(response, 200)
            _expect(await self.target.delete(url), 200, 202, 204, 404)
        if await self._stow(ref.partition_root(), [data]):
            raise ReplicationError(f"{ref.sop}: still 'already stored' on the target after deleting it")
        self.status.replaced += 1


async def _bounded(limit: asyncio.Semaphore, work: Callable[[], Awaitable[None]]) -> None:
    """`work()` once a slot is free; made only then, so that a batch that fails leaves no coroutine that
    was never awaited (each was a RuntimeWarning on the operator's terminal)."""
    async with limit:
        await work()


def _expect(response: httpx.Response, *statuses: int) -> None:
    if response.status_code in statuses:
        return
    request = response.request
    message = f"{request.method} {request.url}: HTTP {response.status_code}: {response.text[:300]}"
    if response.status_code in (401, 403):  # stops the consumer: retrying will not help
        raise ChangeFeedError(f"{message} (a reader's token on the source, a writer's on the target)")
    raise ReplicationError(message)
