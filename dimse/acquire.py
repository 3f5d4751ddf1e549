"""The `acquire` operation: pull studies from a registered DIMSE peer (a PACS) into a partition.

Steps (indexer/operations.py): the first finds the studies (C-FIND, Study Root, STUDY level, with the
request's keys) unless the request listed them, and keeps their UIDs in the checkpoint; then one step per
study. A study's step lists what the source holds (C-FIND at SERIES, then IMAGE level), leaves out the
instances the partition holds already, and retrieves the rest:

* C-MOVE to the archive's own AE title: the source sends the objects to the archive's listener, where they
  are stored (dimse/storescp.py) in the partition of the AE they come from, the source's registered
  partition (which the request must therefore name; see `check_source`);
* C-GET: the objects come back on the archive's own association and go through the same ingest.

Counts come from the index, not from the source's sub-operation counts: after the retrieval, an instance
the partition holds now is stored, one it still lacks is a failure. A source that is unreachable or drops
the association is retried with back-off (dimse/retrying.py): the step starts the study again, and what
arrived before the failure is not fetched again. pynetdicom is blocking: each association runs in a worker
thread, which hands ingest work back to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association

from archive.ingest import FailureReason, Ingestor
from dicomcore.uids import is_valid_uid
from dimse import retrying, scu
from dimse.aes import AeError, RegisteredAe, Service, get_ae
from dimse.storescp import OUT_OF_RESOURCES, SUCCESS, response
from indexer.lookup import held_instances
from indexer.operations import Operation, Step
from storage.base import BlobStore

log = logging.getLogger(__name__)
T = TypeVar("T")

ACQUIRE = "acquire"
METHODS = ("C-MOVE", "C-GET")
MAX_ERRORS = 100  # failure details kept in the operation's results
MOVE_PARALLEL = 4  # C-MOVE requests in flight at once for a study (see _move_split)
MOVE_SPLIT_MIN = 32  # studies missing fewer instances are moved by one request
# The next study's listing is made while a study is retrieved (see _list_ahead); kept at most this long
# (a step retried later lists again) and for this many studies of all operations at once.
LIST_AHEAD_FRESH = 60.0
LIST_AHEAD_MAX = 16
_START: dict[str, Any] = {
    "studies": None, "index": 0, "studiesDone": 0, "instancesStored": 0, "instancesSkipped": 0,
    "failures": 0, "bytes": 0, "errors": [], **retrying.RETRY_FIELDS,
}  # fmt: skip
_PROGRESS = ("studiesDone", "studiesTotal", "instancesStored", "instancesSkipped", "failures", "bytes")


class AcquireError(ValueError):
    """A request the archive cannot carry out as asked (400 at the HTTP layer; a failed operation later)."""


@dataclass(frozen=True, slots=True)
class ScuSettings:
    """What the SCU side needs from the server's settings (dicomweb builds it: dimse never imports it)."""

    ae_title: str  # the archive's own AE title: calling AE, and the C-MOVE destination
    insecure_open: bool = False  # the listener takes any AE into default_partition
    default_partition: str = "Microsoft.Default"
    timeouts: scu.Timeouts = field(default_factory=scu.Timeouts)


def connectable(ae: RegisteredAe) -> scu.Peer:
    """Where the archive connects to a registered AE; AcquireError when it has no address and port."""
    try:
        host, port = ae.address()
    except AeError as exc:
        raise AcquireError(str(exc)) from exc
    return scu.Peer(ae.ae_title, host, port)


def check_source(
    source: RegisteredAe | None, title: str, method: str, partition: str, settings: ScuSettings
) -> scu.Peer:
    """Whether `source` can be acquired from into `partition` by `method`; where to connect."""
    if source is None:
        raise AcquireError(f"source {title!r} is not a registered AE")
    peer = connectable(source)
    if method == "C-MOVE":
        # C-MOVE results arrive on the listener as C-STOREs from the source, stored where the source's
        # registration says (--insecure-open: the default partition)
        landing = settings.default_partition if settings.insecure_open else source.partition
        if landing != partition:
            raise AcquireError(
                f"C-MOVE from {source.ae_title} stores into partition {landing!r} (the partition the AE is "
                f"registered with), not {partition!r}: acquire under that partition or use C-GET"
            )
        if not settings.insecure_open and not source.may(Service.STORE):
            raise AcquireError(
                f"C-MOVE needs {source.ae_title} registered with the 'store' service: it sends the "
                "objects to the archive by C-STORE"
            )
    return peer


def parse_request(body: object) -> dict[str, Any]:
    """The operation parameters of a POST /acquire body (without the partition)."""
    if not isinstance(body, dict):
        raise AcquireError("the body must be a JSON object")
    unknown = sorted(set(body) - {"source", "query", "studies", "method", "maxAttempts"})
    if unknown:
        raise AcquireError(f"unknown fields {unknown}")
    source = body.get("source")
    if not isinstance(source, str) or not source.strip():
        raise AcquireError("source must name a registered AE")
    method = body.get("method", "C-MOVE")
    if method not in METHODS:
        raise AcquireError(f"method must be one of {', '.join(METHODS)}")
    query, studies = body.get("query"), body.get("studies")
    if (query is None) == (studies is None):
        raise AcquireError(
            "give either query (study matching keys) or studies (a list of Study Instance UIDs)"
        )
    if query is not None:
        if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
            raise AcquireError("query must be an object of study matching keys with string values")
        try:
            scu.identifier("STUDY", query)
        except (ValueError, TypeError, OverflowError) as exc:
            raise AcquireError(f"query: {exc}") from exc
    if studies is not None:
        if not isinstance(studies, list) or not studies or not all(isinstance(s, str) and is_valid_uid(s)
                                                                   for s in studies):  # fmt: skip
            raise AcquireError("studies must be a non-empty list of Study Instance UIDs")
        studies = list(dict.fromkeys(studies))
    attempts = body.get("maxAttempts", retrying.MAX_ATTEMPTS)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 50:
        raise AcquireError("maxAttempts must be an integer from 1 to 50")
    return {"source": source.strip(" "), "method": method, "query": query, "studies": studies,
            "maxAttempts": attempts}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Listed:
    """An instance the source holds."""

    series: str
    sop: str
    sop_class: str


def plan(listing: list[Listed], missing: list[Listed]) -> list[tuple[str, dict[str, Any]]]:
    """The retrieve requests for the missing instances: the whole study when nothing of it is held, a
    whole series when nothing of that is held, single instances otherwise (what a resumed study needs)."""
    if len(missing) == len(listing):
        return [("STUDY", {})]
    wanted: dict[str, list[Listed]] = {}
    for item in missing:
        wanted.setdefault(item.series, []).append(item)
    total: dict[str, int] = {}
    for item in listing:
        total[item.series] = total.get(item.series, 0) + 1
    requests: list[tuple[str, dict[str, Any]]] = []
    for series, items in wanted.items():
        if len(items) == total[series]:
            requests.append(("SERIES", {"SeriesInstanceUID": series}))
        else:
            requests.extend(("IMAGE", {"SeriesInstanceUID": series, "SOPInstanceUID": i.sop}) for i in items)
    return requests


def split(missing: list[Listed], parts: int) -> list[tuple[str, dict[str, Any]]]:
    """About `parts` IMAGE-level requests of even size for the missing instances, each within one series
    (Study Root's hierarchical retrieve), naming them by a list of SOP Instance UIDs."""
    size = max(1, -(-len(missing) // parts))
    by_series: dict[str, list[str]] = {}
    for item in missing:
        by_series.setdefault(item.series, []).append(item.sop)
    return [
        ("IMAGE", {"SeriesInstanceUID": series, "SOPInstanceUID": sops[i : i + size]})
        for series, sops in by_series.items()
        for i in range(0, len(sops), size)
    ]


class _Associations:
    """The associations a step's worker thread has open, so that a cancelled step can abort them."""

    def __init__(self) -> None:
        self._open: list[Association] = []
        self._lock = threading.Lock()
        self.cancelled = False

    def add(self, assoc: Association) -> Association:
        with self._lock:
            self._open.append(assoc)
            if self.cancelled:
                scu.wake(assoc)
        return assoc

    def abort_all(self) -> None:
        with self._lock:
            self.cancelled = True
            for assoc in self._open:
                scu.wake(assoc)


async def in_thread(fn: Callable[[_Associations], T]) -> T:
    """Run blocking association work in a worker thread; a cancelled step aborts its associations."""
    assocs = _Associations()
    task = asyncio.ensure_future(asyncio.to_thread(fn, assocs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        assocs.abort_all()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)  # the aborted work ends at once; never hold a shutdown for long
        raise


class AcquireHandler:
    """The `acquire` operation type (params written by dicomweb.routes.acquire)."""

    def __init__(self, pool: asyncpg.Pool, store: BlobStore, settings: ScuSettings) -> None:
        self.pool = pool
        self.store = store
        self.settings = settings
        # listings made ahead, by operation and study: when started, and the listing
        self._ahead: dict[tuple[uuid.UUID, str], tuple[float, asyncio.Future[list[Listed]]]] = {}

    async def step(self, conn: asyncpg.Connection, op: Operation) -> Step:
        cp: dict[str, Any] = {**_START, **(op.checkpoint or {})}
        params = op.params
        if not await retrying.wait_for_retry(cp):
            return self._step(cp)
        peer = check_source(await get_ae(conn, params["source"]), params["source"], params["method"],
                            params["partitionName"], self.settings)  # fmt: skip
        try:
            if cp["studies"] is None:
                cp["studies"] = params["studies"] or await self._find_studies(peer, params["query"])
            elif cp["index"] < len(cp["studies"]):
                await self._study(conn, op, peer, cp)
        except (scu.PeerUnavailable, TimeoutError, OSError) as exc:
            log.warning("acquisition %s from %s: %s", op.id_hex, peer, exc)
            retrying.failed_attempt(cp, exc, int(params["maxAttempts"]))
            return self._step(cp)
        retrying.succeeded(cp)
        return self._step(cp, done=cp["index"] >= len(cp["studies"]))

    def _step(self, cp: dict[str, Any], *, done: bool = False) -> Step:
        total = len(cp["studies"]) if cp["studies"] is not None else None
        cp["studiesTotal"] = total
        results = {k: cp.get(k) for k in _PROGRESS}
        # the last failed attempt stays visible (an operation that had to retry says why); `attempt` is the
        # number of failed attempts in a row now
        results.update(errors=cp["errors"], lastError=cp["lastError"], attempt=cp["attempt"])
        percent = 100 * cp["index"] // total if total else 0
        return Step(cp, percent, done=done, results=results)

    async def _find_studies(self, peer: scu.Peer, query: dict[str, str]) -> list[str]:
        def work(assocs: _Associations) -> list[str]:
            assoc = assocs.add(self._associate(peer, [scu.QUERY_CONTEXTS["find"]]))
            try:
                found = scu.find(assoc, scu.identifier("STUDY", query, ["StudyInstanceUID"]))
            finally:
                scu.release(assoc)
            return list(dict.fromkeys(str(ds.StudyInstanceUID) for ds in found if ds.get("StudyInstanceUID")))

        return await in_thread(work)

    def _associate(self, peer: scu.Peer, contexts: list[tuple[str, list[str]]], **kw: Any) -> Association:
        return scu.associate(self.settings.ae_title, peer, contexts, timeouts=self.settings.timeouts, **kw)

    async def _study(
        self, conn: asyncpg.Connection, op: Operation, peer: scu.Peer, cp: dict[str, Any]
    ) -> None:
        """Retrieve one study's missing instances; counts into the checkpoint once the study is done.

        Counted from the index, so that an attempt cut short and its retry count each instance once: what
        the partition held of the source's listing before the operation began is skipped, what it holds
        now and did not then is stored (by this operation), what it still lacks failed."""
        partition, method = int(op.params["partition"]), op.params["method"]
        study = cp["studies"][cp["index"]]
        before = await held_instances(conn, partition, study)
        listing = await self._listing(op, peer, study)
        self._list_ahead(op, peer, cp)
        missing = [item for item in listing if item.sop not in before]
        reasons: dict[str, str] = {}
        if missing:
            requests = plan(listing, missing)
            if method == "C-MOVE":
                if len(missing) >= MOVE_SPLIT_MIN:
                    missing = await self._move_split(conn, peer, study, missing, partition)
                    requests = plan(listing, missing)
                if missing:
                    await in_thread(lambda assocs: self._move(assocs, peer, study, requests))
            else:
                loop = asyncio.get_running_loop()
                classes = list(dict.fromkeys(item.sop_class for item in missing if item.sop_class))
                reasons = await in_thread(
                    lambda assocs: self._get(assocs, peer, study, requests, classes, loop, partition)
                )
        after = await held_instances(self.pool, partition, study)
        failed = [item for item in listing if item.sop not in after]
        for item in listing:
            got = after.get(item.sop)
            if got is None:
                continue
            if got.created_at < op.created_at:
                cp["instancesSkipped"] += 1
            else:
                cp["instancesStored"] += 1
                cp["bytes"] += got.size
        cp["failures"] += len(failed)
        room = MAX_ERRORS - len(cp["errors"])
        unreceived = f"not received from {peer.ae_title}"
        cp["errors"].extend(
            f"{study}/{item.series}/{item.sop}: {reasons.get(item.sop) or unreceived}"
            for item in failed[:room]
        )
        cp["index"] += 1
        cp["studiesDone"] += 1

    async def _move_split(
        self, conn: asyncpg.Connection, peer: scu.Peer, study: str, missing: list[Listed], partition: int
    ) -> list[Listed]:
        """C-MOVE the missing instances in MOVE_PARALLEL requests at once; what is still missing after.

        The archive's listener commits each received object before it answers it, so one association
        carries about one instance per commit latency; several C-MOVEs in flight (the source opens an
        association for each) hide that latency. The requests name their instances by UID lists (PS3.4
        C.4.2.2.1), which not every source supports: whatever is still missing afterwards (a refusal, or
        nothing matched) is fetched by the plain requests of `plan`."""
        try:
            requests = split(missing, MOVE_PARALLEL)
            await in_thread(lambda assocs: self._move(assocs, peer, study, requests, MOVE_PARALLEL))
        except scu.PeerRefused as exc:
            log.info("C-MOVE by UID lists refused by %s (%s): moving series by series", peer, exc)
        now = await held_instances(conn, partition, study)
        return [item for item in missing if item.sop not in now]

    async def _listing(self, op: Operation, peer: scu.Peer, study: str) -> list[Listed]:
        """What the source holds of `study`: the listing made ahead while the previous study was retrieved
        when there is a fresh one that succeeded, otherwise one made now (whose failure is the step's)."""
        made = self._ahead.pop((op.id, study), None)
        if made is not None and time.monotonic() - made[0] < LIST_AHEAD_FRESH:
            with contextlib.suppress(Exception):
                return await made[1]
        return await in_thread(lambda assocs: self._list(assocs, peer, study))

    def _list_ahead(self, op: Operation, peer: scu.Peer, cp: dict[str, Any]) -> None:
        """Start listing the operation's next study, so that its step need not wait for the source's
        SERIES- and IMAGE-level C-FINDs (about a fifth of a 100-instance study's time from Orthanc)."""
        following = cp["index"] + 1
        if following >= len(cp["studies"]):
            return
        study = cp["studies"][following]
        while len(self._ahead) >= LIST_AHEAD_MAX:  # oldest first: a stopped operation's are never taken
            self._ahead.pop(next(iter(self._ahead)))[1].cancel()
        if (earlier := self._ahead.pop((op.id, study), None)) is not None:  # a retried step lists anew
            earlier[1].cancel()
        task = asyncio.ensure_future(in_thread(lambda assocs: self._list(assocs, peer, study)))
        task.add_done_callback(lambda f: f.cancelled() or f.exception())  # an unused failure is no error
        self._ahead[(op.id, study)] = (time.monotonic(), task)

    def _list(self, assocs: _Associations, peer: scu.Peer, study: str) -> list[Listed]:
        """What the source holds of a study: SERIES level, then IMAGE level per series (Study Root's
        hierarchical query: an IMAGE-level query names its series)."""
        assoc = assocs.add(self._associate(peer, [scu.QUERY_CONTEXTS["find"]]))
        try:
            listing: list[Listed] = []
            series = scu.find(assoc, scu.identifier("SERIES", {"StudyInstanceUID": study},
                                                    ["SeriesInstanceUID"]))  # fmt: skip
            for s in dict.fromkeys(str(ds.SeriesInstanceUID) for ds in series if ds.get("SeriesInstanceUID")):
                query = scu.identifier("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": s},
                                       ["SOPInstanceUID", "SOPClassUID"])  # fmt: skip
                for ds in scu.find(assoc, query):
                    if ds.get("SOPInstanceUID"):
                        listing.append(Listed(s, str(ds.SOPInstanceUID), str(ds.get("SOPClassUID", ""))))
            return listing
        finally:
            scu.release(assoc)

    def _move(
        self,
        assocs: _Associations,
        peer: scu.Peer,
        study: str,
        requests: list[tuple[str, dict[str, Any]]],
        parallel: int = 1,
    ) -> None:
        """The C-MOVE requests, `parallel` at a time, each on an association of its own."""
        pending = list(reversed(requests))
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                assoc = assocs.add(self._associate(peer, [scu.QUERY_CONTEXTS["move"]]))
                try:
                    while not errors:
                        with lock:
                            if not pending:
                                return
                            level, keys = pending.pop()
                        query = scu.identifier(level, {"StudyInstanceUID": study, **keys})
                        scu.move(assoc, self.settings.ae_title, query)
                finally:
                    scu.release(assoc)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, name=f"c-move-{n}") for n in range(min(parallel, len(pending)))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _get(
        self,
        assocs: _Associations,
        peer: scu.Peer,
        study: str,
        requests: list[tuple[str, dict[str, Any]]],
        classes: list[str],
        loop: asyncio.AbstractEventLoop,
        partition: int,
    ) -> dict[str, str]:
        """C-GET on associations that take the study's SOP classes (several when they do not fit one);
        the reasons of objects that arrived but were not stored, by SOP Instance UID.

        Received objects are queued into one ingest (archive/ingest.py) that stores and indexes them in
        groups, as a STOW request's parts are, and each sub-operation is answered once its object is
        queued, not once it is committed: the archive is the requester here, and it counts what the index
        holds after the retrieval (a crash before the commit leaves the instance missing, and the
        resumed operation fetches it again). One commit per object, as the listener's C-STORE must do,
        would cap the rate at one commit latency per instance."""
        ingestor = Ingestor(self.pool, self.store, partition)

        def on_store(event: evt.Event) -> Dataset:
            return self._on_store(event, loop, ingestor)

        try:
            for group in scu.per_association(classes):
                contexts = [scu.QUERY_CONTEXTS["get"], *scu.storage_contexts(group)]
                assoc = assocs.add(
                    self._associate(peer, contexts, roles=group, handlers=scu.on_store(on_store))
                )
                try:
                    for level, keys in requests:
                        scu.get(assoc, scu.identifier(level, {"StudyInstanceUID": study, **keys}))
                finally:
                    scu.release(assoc)
        finally:
            outcomes = asyncio.run_coroutine_threadsafe(ingestor.finish(), loop).result()
        return {
            o.sop_instance_uid: o.message or str(o.failure)
            for o in outcomes
            if o.failure not in (None, FailureReason.ALREADY_STORED) and o.sop_instance_uid
        }

    def _on_store(self, event: evt.Event, loop: asyncio.AbstractEventLoop, ingestor: Ingestor) -> Dataset:
        """A C-GET sub-operation: the object joins the study's ingest (see _get)."""
        request = event.request
        expect = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        try:
            fp = _received_file(event)
            work = ingestor.add(fp, expect=expect)  # returns once queued; waits while groups are in flight
            asyncio.run_coroutine_threadsafe(work, loop).result(self.settings.timeouts.dimse)
        except Exception as exc:
            log.warning("C-GET sub-operation %s not stored: %s", expect[1], exc)
            return response(OUT_OF_RESOURCES, f"{exc.__class__.__name__}: {exc}")
        return response(SUCCESS)


def _received_file(event: evt.Event) -> BinaryIO:
    """The received object as a PS3.10 file (pynetdicom spools it when chunked receive is on)."""
    try:
        return open(event.dataset_path, "rb")  # the ingestor closes it
    except (AttributeError, ValueError, OSError):
        fp = tempfile.TemporaryFile()
        fp.write(event.encoded_dataset(include_meta=True))
        fp.seek(0)
        return fp  # type: ignore[return-value]
