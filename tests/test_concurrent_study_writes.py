"""Writers of one study at once: DELETEs of some of its instances while others are stored into it (what
`dicomweb replicate` does to a standby when a bulk update replaces a study, with 8 requests in flight, and
what two clients of one study do). Every request succeeds: PostgreSQL's deadlock between an index write and
a deletion in one study was a 272 failure (STOW) or a 500 (DELETE), so the replicator retried the batch for
ever."""

from __future__ import annotations

import asyncio
from io import BytesIO

import httpx
import pydicom

from tests.fixtures.server import RunningArchive
from tests.recovery_support import instances, stow


def _changed(data: bytes) -> bytes:
    ds = pydicom.dcmread(BytesIO(data))
    ds.PatientName = "Changed^Name"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def test_deleting_and_storing_into_one_study_at_once_never_fails(local_archive: RunningArchive) -> None:
    files = instances(21, 60)
    async with httpx.AsyncClient(timeout=120) as client:
        refs = await stow(client, local_archive.url, files)
        limit = asyncio.Semaphore(8)
        failures: list[str] = []

        async def replace(n: int) -> None:
            async with limit:
                url = f"{local_archive.url}{refs[n].path()}"
                deleted = await client.delete(url)
                if deleted.status_code != 204:
                    failures.append(f"DELETE {n}: {deleted.status_code} {deleted.text[:200]}")
                    return
                stored = await client.post(
                    f"{local_archive.url}/studies", content=_changed(files[n]),
                    headers={"Content-Type": "application/dicom"},
                )  # fmt: skip
                if stored.status_code != 200:
                    failures.append(f"STOW {n}: {stored.status_code} {stored.headers.get('warning')}")

        await asyncio.gather(*(replace(n) for n in range(len(files))))
        assert failures == []
        found = await client.get(
            f"{local_archive.url}/studies/{refs[0].study}/instances", params={"limit": 100}
        )
        assert len(found.json()) == len(files)
