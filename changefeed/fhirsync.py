"""FHIR ImagingStudy sync: a change feed consumer that keeps a FHIR server's ImagingStudy resources in step.

For each batch the consumer hands over, every study the batch touches is rebuilt from the archive's
*current* state (QIDO-RS study, series and instance searches) and written to the FHIR server by id
(`PUT ImagingStudy/<id>`; see `changefeed.fhir` for the ids and the mapping). A study the archive no longer
holds has its ImagingStudy deleted. Rebuilding instead of applying each event as a patch makes the sync
idempotent: a replayed batch (the consumer's at-least-once window), events out of date by the time they are
read, or a resource edited by hand all converge on what the archive holds. A rebuild whose result equals
the stored resource is not written again, so replays do not pile up FHIR versions. The cost is a few QIDO
requests per touched study per batch, with several events of one study in a batch coalesced into one rebuild
and up to `concurrency` studies rebuilt at once.

The subject is the Patient found by identifier (configured system + Patient ID). An existing Patient is
used as it is (the FHIR server's record is usually the authoritative one); one is created, by a PUT to a
deterministic id so that a retried create cannot make two, only when none exists.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from changefeed.consumer import DownstreamError, Entry
from changefeed.fhir import (
    DEFAULT_PATIENT_SYSTEM,
    PATIENT_ID,
    STUDY_UID,
    StudySnapshot,
    endpoint_resource,
    imaging_study_id,
    imaging_study_resource,
    patient_id,
    patient_identifier,
    patient_resource,
    same_content,
)

log = logging.getLogger(__name__)

DEFAULT_PARTITION = "Microsoft.Default"
FHIR_JSON = "application/fhir+json"
_FEED_ROOT = re.compile(r"^(?P<base>.*)/v1(?P<partition>/partitions/[^/]+)?/?$")


class FhirError(DownstreamError):
    """The FHIR server refused a request (the consumer retries the batch with backoff)."""


def dicomweb_root_for(feed_root: str) -> str:
    """The v2 DICOMweb root beside a v1 change feed root (`.../v1[/partitions/x]` -> `.../v2[...]`)."""
    m = _FEED_ROOT.match(feed_root)
    if not m:
        raise ValueError(f"cannot derive the DICOMweb root from {feed_root!r}; give it explicitly")
    return f"{m['base']}/v2{m['partition'] or ''}"


class ArchiveReader:
    """Reads one study's current state from the archive over QIDO-RS (paged, so never one huge response)."""

    def __init__(self, client: httpx.AsyncClient, page_size: int = 1000) -> None:
        self.client = client
        self.page_size = page_size

    async def snapshot(self, root: str, study_uid: str) -> StudySnapshot | None:
        """The study's study, series and instance results; None when the archive holds none of it."""
        studies = [
            s async for s in self._search(f"{root}/studies", StudyInstanceUID=study_uid, includefield="all")
        ]
        if not studies:
            return None
        series = [
            s
            async for s in self._search(
                f"{root}/studies/{study_uid}/series", includefield="0008103E,00080021,00080031"
            )
        ]
        instances = [i async for i in self._search(f"{root}/studies/{study_uid}/instances")]
        return StudySnapshot(studies[0], series, instances)

    async def _search(self, url: str, **params: str) -> AsyncIterator[dict]:
        offset = 0
        while True:
            query = {**params, "limit": str(self.page_size), "offset": str(offset)}
            response = await self.client.get(url, params=query, headers={"Accept": "application/dicom+json"})
            if response.status_code == 204:  # some servers answer "no match" so
                return
            response.raise_for_status()
            page = response.json()
            for item in page:
                yield item
            # the archive marks every page but the last with Warning 299 (conformance.md)
            if not page or "additional results" not in response.headers.get("Warning", ""):
                return
            offset += len(page)


class FhirClient:
    """The few FHIR RESTful interactions the sync needs (read, update by id, delete, search)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.base = base_url.rstrip("/")

    async def read(self, resource_type: str, id_: str) -> dict[str, Any] | None:
        response = await self.client.get(f"{self.base}/{resource_type}/{id_}", headers={"Accept": FHIR_JSON})
        if response.status_code in (404, 410):
            return None
        self._check(response)
        return response.json()

    async def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base}/{resource['resourceType']}/{resource['id']}"
        response = await self.client.put(
            url, json=resource, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        )
        self._check(response)
        return response.json() if response.content else resource

    async def delete(self, resource_type: str, id_: str) -> bool:
        """True if the resource existed (404 and 410 count as deleted already)."""
        response = await self.client.delete(f"{self.base}/{resource_type}/{id_}")
        if response.status_code in (404, 410):
            return False
        self._check(response)
        return True

    async def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        response = await self.client.get(
            f"{self.base}/{resource_type}", params=params, headers={"Accept": FHIR_JSON}
        )
        self._check(response)
        return [e["resource"] for e in response.json().get("entry", []) if "resource" in e]

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code >= 300:
            raise FhirError(
                f"{response.request.method} {response.request.url}: HTTP {response.status_code}: "
                f"{response.text[:500]}"
            )


class FhirSync:
    """The change feed handler: `await sync(entries)` brings the touched studies' resources up to date.

    `dicomweb_root` is the v2 root the feed belongs to (`http://host/v2` or `.../v2/partitions/x`); entries
    of other partitions (read from an unpartitioned feed) are looked up under `/partitions/{name}`.
    """

    def __init__(
        self,
        archive: ArchiveReader,
        fhir: FhirClient,
        dicomweb_root: str,
        *,
        patient_system: str = DEFAULT_PATIENT_SYSTEM,
        concurrency: int = 4,
    ) -> None:
        self.archive = archive
        self.concurrency = concurrency
        self.fhir = fhir
        self.dicomweb_root = dicomweb_root.rstrip("/")
        self.patient_system = patient_system
        self._endpoints: set[str] = set()  # Endpoints written by this process
        self.stats = {"updated": 0, "unchanged": 0, "deleted": 0}

    async def __call__(self, entries: list[Entry]) -> None:
        studies: dict[tuple[str, str], None] = {}  # ordered set: first appearance in the batch
        for entry in entries:
            studies[(self._root_for(entry.get("PartitionName")), entry["StudyInstanceUid"])] = None
        # Studies are independent, so a few are rebuilt at once. Two studies of one new patient may both
        # create it: the PUT goes to the same deterministic id, so the second write is harmless.
        limit = asyncio.Semaphore(self.concurrency)

        async def one(root: str, study_uid: str) -> None:
            async with limit:
                await self.sync_study(root, study_uid)

        async with asyncio.TaskGroup() as group:
            for root, study_uid in studies:
                group.create_task(one(root, study_uid))

    def _root_for(self, partition: str | None) -> str:
        if "/partitions/" in self.dicomweb_root or not partition or partition == DEFAULT_PARTITION:
            return self.dicomweb_root
        return f"{self.dicomweb_root}/partitions/{partition}"

    async def sync_study(self, root: str, study_uid: str) -> None:
        snapshot = await self.archive.snapshot(root, study_uid)
        if snapshot is None or not snapshot.instances:
            if await self.fhir.delete("ImagingStudy", imaging_study_id(root, study_uid)):
                self.stats["deleted"] += 1
                log.info("fhir: study %s is gone; ImagingStudy deleted", study_uid)
            return
        await self._ensure_endpoint(root)
        patient = await self._patient(snapshot.study)
        resource = imaging_study_resource(snapshot, wado_root=root, patient_reference=patient)
        stored = await self.fhir.read("ImagingStudy", resource["id"])
        if same_content(stored, resource):
            self.stats["unchanged"] += 1
            return
        await self.fhir.update(resource)
        self.stats["updated"] += 1
        log.info("fhir: ImagingStudy/%s for study %s written", resource["id"], study_uid)

    async def _ensure_endpoint(self, root: str) -> None:
        if root in self._endpoints:
            return
        endpoint = endpoint_resource(root)
        if not same_content(await self.fhir.read("Endpoint", endpoint["id"]), endpoint):
            await self.fhir.update(endpoint)
        self._endpoints.add(root)

    async def _patient(self, study: dict) -> str:
        """`Patient/<id>` of the study's patient: found by identifier, or created."""
        identifier = patient_identifier(study, self.patient_system)
        if identifier is None:
            # FHIR requires a subject; a study without a Patient ID gets a patient of its own
            study_uid = str(study[STUDY_UID]["Value"][0])
            identifier = {"use": "temp", "system": self.patient_system, "value": f"no-patient-id:{study_uid}"}
            study = {k: v for k, v in study.items() if k != PATIENT_ID}
        token = f"{identifier['system']}|{identifier['value']}"
        found = await self.fhir.search("Patient", identifier=token)
        if found:
            if len(found) > 1:
                log.warning("fhir: %d Patients have identifier %s; using the first", len(found), token)
            return f"Patient/{found[0]['id']}"
        new_id = patient_id(identifier["system"], identifier["value"])
        await self.fhir.update(patient_resource(study, new_id, identifier))
        return f"Patient/{new_id}"
