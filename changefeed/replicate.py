"""Keep a second archive (a standby, another region) in step with this one by tailing its change feed.

`Replicator` is a `ChangeFeedConsumer` handler. For each batch it works out every touched instance's last
action and applies it to the target over DICOMweb: a created or updated instance is read from the source
with WADO-RS (as stored, `transfer-syntax=*`) and stored on the target with STOW-RS into the same
partition; a deleted one is deleted there. The consumer saves its checkpoint only after the handler
returns, so delivery is at least once, and applying is idempotent:

* STOW of an instance the target already holds answers 45070. The target's copy is then compared with the
  source's; equal means applied already (a replayed batch), different means the source changed it (an
  update, or a delete and re-store): the target's copy is deleted and the source's stored again.
* DELETE of an instance the target does not hold answers 404: applied already.
* A create whose instance the source no longer holds (404, or the entry's State is `deleted`) is skipped:
  its delete comes later in the feed.

Collapsing a batch to each instance's last action is safe because the target only has to end up as the
source is; intermediate states inside one batch are never observable afterwards.

Lag is how long after the source committed an entry (its Timestamp) the target had it applied. The status
file (JSON) and the metrics file (Prometheus text format, for node_exporter's textfile collector) are
rewritten after every batch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from changefeed.consumer import ChangeFeedError, Entry

log = logging.getLogger(__name__)

DEFAULT_PARTITION = "Microsoft.Default"
ALREADY_STORED = 45070
DICOM_AS_STORED = "application/dicom; transfer-syntax=*"
_VERSIONED = re.compile(r"/v\d+$")


class ReplicationError(Exception):
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
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "lag_seconds": round(self.last_lag_seconds, 3),
            "last_applied": self.last_applied,
            "copied": self.copied,
            "already_present": self.already_present,
            "replaced": self.replaced,
            "deleted": self.deleted,
            "skipped": self.skipped,
        }

    def prometheus(self) -> str:
        lines = [
            "# HELP dicomweb_replication_lag_seconds Source commit to target apply, of the last batch.",
            "# TYPE dicomweb_replication_lag_seconds gauge",
            f"dicomweb_replication_lag_seconds {self.last_lag_seconds:.3f}",
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
        chunks: list[list[InstanceRef]] = []
        for partition in dict.fromkeys(ref.partition for ref in copies):
            mine = [ref for ref in copies if ref.partition == partition]
            chunks += [mine[i : i + self.stow_batch] for i in range(0, len(mine), self.stow_batch)]
        limit = asyncio.Semaphore(self.parallel)

        async def bounded(work: Any) -> None:
            async with limit:
                await work

        async with asyncio.TaskGroup() as group:
            for ref in deletes:
                group.create_task(bounded(self._delete(ref)))
            for chunk in chunks:
                group.create_task(bounded(self._copy(chunk)))
        self._applied(entries)

    def _applied(self, entries: list[Entry]) -> None:
        now = time.time()
        lags = [now - t for e in entries if (t := _timestamp(e)) is not None]
        self.status.lags.extend(lags)
        self.status.last_lag_seconds = max(lags, default=0.0)
        self.status.position = int(entries[-1]["Sequence"])
        self.status.last_applied = dt.datetime.fromtimestamp(now, dt.UTC).isoformat()
        if self.status_file is not None:
            _write_atomically(self.status_file, orjson.dumps(self.status.as_json()).decode() + "\n")
        if self.metrics_file is not None:
            _write_atomically(self.metrics_file, self.status.prometheus())

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
        if not objects:
            return
        duplicates = await self._stow(refs[0].partition_root(), list(objects.values()))
        self.status.copied += len(objects) - len(duplicates)
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
            raise ReplicationError(f"the target refused instances: {'; '.join(refused)}")
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


def _expect(response: httpx.Response, *statuses: int) -> None:
    if response.status_code in statuses:
        return
    request = response.request
    message = f"{request.method} {request.url}: HTTP {response.status_code}: {response.text[:300]}"
    if response.status_code in (401, 403):  # stops the consumer: retrying will not help
        raise ChangeFeedError(f"{message} (a reader's token on the source, a writer's on the target)")
    raise ReplicationError(message)
