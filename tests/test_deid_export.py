"""De-identified export end to end: POST /export against a running archive, the operation's progress,
outputs in a local directory, an S3 bucket and a research partition, and a crash (runner canceled
mid-export) followed by a resume that neither duplicates nor misses an instance."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pydicom
import pytest
from pydicom.sequence import Sequence

from bench.synthetic import multipart_body
from deid import export as deid_export
from deid import mapping
from deid.export import ExportHandler, ExportSettings
from deid.keys import ProjectKeys
from indexer.operations import OperationRunner
from storage import LocalBlobStore
from tests.deid_data import Canaries, base_instance, leaked, nested, to_file, uids_in
from tests.fixtures.s3 import S3Server, make_s3_store
from tests.fixtures.server import RunningArchive

STUDIES, SERIES, PER_SERIES = 2, 2, 4


@dataclasses.dataclass
class Cohort:
    files: list[bytes]
    canaries: Canaries
    studies: list[str]
    series: list[tuple[str, str]]
    burned_in: str  # study/series/sop of the ultrasound without BurnedInAnnotation


def make_cohort(seed: int = 11) -> Cohort:
    canaries = Canaries(random.Random(seed))
    files, studies, series_list = [], [], []
    for s in range(STUDIES):
        study = canaries.uid()
        studies.append(study)
        patient = canaries.text()
        for _ in range(SERIES):
            series = canaries.uid()
            series_list.append((study, series))
            previous = None
            for _ in range(PER_SERIES):
                sop = canaries.uid()
                ds = base_instance(canaries, study=study, series=series, sop=sop, patient=patient)
                ds.StudyDate = f"2021030{s + 1}"
                ds.StudyDescription = canaries.text()
                ds.InstitutionName = canaries.text()
                ds.add_new(0x00090010, "LO", canaries.text())
                ds.add_new(0x00091001, "LO", canaries.text())
                ds.RadiopharmaceuticalInformationSequence = Sequence([nested(canaries, 3)])
                if previous is not None:
                    ref = pydicom.Dataset()
                    ref.ReferencedSOPClassUID = ds.SOPClassUID
                    ref.ReferencedSOPInstanceUID = previous
                    ds.ReferencedImageSequence = Sequence([ref])
                previous = sop
                files.append(to_file(ds, canaries))
    # one ultrasound without BurnedInAnnotation: skipped, with its reason in the errors log
    study, series = series_list[0]
    sop = canaries.uid()
    us = base_instance(canaries, study=study, series=series, sop=sop, patient="US")
    us.Modality = "US"
    us.StudyDate = "20210301"  # study attributes come from the latest stored instance
    files.append(to_file(us, canaries))
    return Cohort(files, canaries, studies, series_list, f"{study}/{series}/{sop}")


async def stow(url: str, files: list[bytes], partition_root: str | None = None) -> None:
    body, content_type = multipart_body(files)
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{partition_root or url}/studies", content=body, headers={"Content-Type": content_type}
        )
    assert response.status_code == 200, response.text


async def post_export(url: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{url}/export", content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )


async def wait_done(url: str, op_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            response = await client.get(f"{url}/operations/{op_id}")
            body = response.json()
            if response.status_code == 200:
                return body
            assert response.status_code == 202
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.2)


def request_body(cohort: Cohort, destination: dict[str, Any], project: str = "cohort-a") -> dict[str, Any]:
    study0 = cohort.studies[0]
    return {
        "source": {"type": "identifiers", "settings": {"values": [
            study0, f"{study0}/{cohort.series[0][1]}",  # inside the study: dropped, exported once
            cohort.series[2][0] + "/" + cohort.series[2][1], cohort.series[3][0] + "/" + cohort.series[3][1],
            "1.2.3.4.5.6.7",  # not stored: failed, logged
        ]}},
        "destination": destination,
        "deidentification": {"project": project, "options": ["retainLongModifiedDates", "cleanDescriptors"]},
    }  # fmt: skip


EXPECTED = STUDIES * SERIES * PER_SERIES  # the ultrasound is skipped


def directory(path: str) -> dict[str, Any]:
    return {"type": "directory", "settings": {"path": path}}


def counts(done: dict[str, Any]) -> tuple[int, int, int]:
    return done["results"]["exported"], done["results"]["skipped"], done["results"]["failed"]


def check_outputs(cohort: Cohort, outputs: dict[str, bytes]) -> set[str]:
    """Every output valid, free of canaries and original UIDs, references resolving; the SOP UIDs."""
    assert len(outputs) == EXPECTED
    originals = set().union(*(uids_in(f) for f in cohort.files)) - {"1.2.840.10008.5.1.4.1.1.2",
                                                                    "1.2.840.10008.1.2.1"}  # fmt: skip
    sops = set()
    for key, data in outputs.items():
        assert leaked(cohort.canaries.made, data) == []
        assert uids_in(data) & originals == set()
        ds = pydicom.dcmread(io.BytesIO(data))
        assert key.endswith(f"results/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        sops.add(str(ds.SOPInstanceUID))
    for data in outputs.values():
        ds = pydicom.dcmread(io.BytesIO(data))
        for item in ds.get("ReferencedImageSequence") or []:
            assert item.ReferencedSOPInstanceUID in sops
    return sops


def read_dir(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.dcm")}


async def test_export_to_a_directory(local_archive: RunningArchive, tmp_path: Path) -> None:
    cohort = make_cohort()
    await stow(local_archive.url, cohort.files)
    response = await post_export(
        local_archive.url, request_body(cohort, {"type": "directory", "settings": {"path": "a"}})
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["href"] == f"{local_archive.url}/operations/{body['id']}"
    done = await wait_done(local_archive.url, body["id"])
    assert done["status"] == "succeeded" and done["percentComplete"] == 100
    assert done["type"] == "export"
    results = done["results"]
    assert (results["exported"], results["skipped"], results["failed"]) == (EXPECTED, 1, 1)
    root = tmp_path / "exports" / "a"
    outputs = read_dir(root / body["id"])
    sops = check_outputs(cohort, outputs)
    errors_log = (root / body["id"] / "errors.log").read_bytes()
    lines = [orjson.loads(line) for line in errors_log.splitlines()]
    assert results["errorHref"] == f"a/{body['id']}/errors.log"
    assert any("modality US without BurnedInAnnotation" in line["Error"] for line in lines)
    # the log beside the data names instances by de-identified UIDs only
    assert uids_in(errors_log) & set().union(*(uids_in(f) for f in cohort.files)) == set()
    # the mapping table holds each pseudonym once, with its original
    conn = await asyncpg.connect(local_archive.database_url)
    try:
        rows = await conn.fetch("SELECT kind, count(*) FROM deid_mapping GROUP BY kind ORDER BY kind")
        assert {r[0]: r[1] for r in rows} == {"instance": EXPECTED, "patient": 2, "series": 4, "study": 2}
        secret = bytes(await conn.fetchval("SELECT secret FROM deid_project WHERE project = 'cohort-a'"))
        first = pydicom.dcmread(io.BytesIO(cohort.files[0]))
        pseudonym = ProjectKeys("cohort-a", secret).patient_pseudonym(str(first.PatientID), "")
        found = await mapping.reidentify(conn, "cohort-a", "patient", pseudonym)
        assert found is not None and found.original == first.PatientID
        assert await mapping.reidentify(conn, "cohort-b", "patient", pseudonym) is None
        keys = ProjectKeys("cohort-a", secret)
        expected = [("/".join(map(keys.uid, cohort.burned_in.split("/"))), "skipped"),
                    (keys.uid("1.2.3.4.5.6.7"), "failed")]  # fmt: skip
        assert sorted((line["Identifier"], line["Kind"]) for line in lines) == sorted(expected)
    finally:
        await conn.close()
    assert {ProjectKeys("cohort-a", secret).uid(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID)
            for f in cohort.files[:-1]} == sops  # fmt: skip
    # same project again: identical UIDs; another project: none in common
    again = (
        await post_export(
            local_archive.url, request_body(cohort, {"type": "directory", "settings": {"path": "b"}})
        )
    ).json()
    other = (
        await post_export(
            local_archive.url,
            request_body(cohort, {"type": "directory", "settings": {"path": "c"}}, "cohort-b"),
        )
    ).json()
    await wait_done(local_archive.url, again["id"])
    await wait_done(local_archive.url, other["id"])
    again_out = read_dir(tmp_path / "exports" / "b" / again["id"])
    assert sorted(again_out) == sorted(outputs) and again_out == outputs
    other_sops = check_outputs(cohort, read_dir(tmp_path / "exports" / "c" / other["id"]))
    assert other_sops.isdisjoint(sops)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"source": {"type": "identifiers", "settings": {"values": ["1.2"]}},
          "destination": {"type": "directory", "settings": {"path": "x"}}}, "deidentification is required"),
        ({"source": {"type": "identifiers", "settings": {"values": ["1.2"]}},
          "destination": {"type": "directory", "settings": {"path": "../x"}},
          "deidentification": {"project": "p"}}, "relative to the server's export directory"),
        ({"source": {"type": "identifiers", "settings": {"values": ["1.02"]}},
          "destination": {"type": "directory", "settings": {"path": "x"}},
          "deidentification": {"project": "p"}}, "is not study[/series[/instance]]"),
        ({"source": {"type": "identifiers", "settings": {"values": ["1.2"]}},
          "destination": {"type": "directory", "settings": {"path": "x"}},
          "deidentification": {"project": "p",
                               "options": ["retainLongFullDates", "retainLongModifiedDates"]}},
         "exclude each other"),
        ({"source": {"type": "query", "settings": {"query": "PatientID=nobody"}},
          "destination": {"type": "directory", "settings": {"path": "x"}},
          "deidentification": {"project": "p"}}, "matches no study"),
        ({"source": {"type": "identifiers", "settings": {"values": ["1.2"]}},
          "destination": {"type": "partition", "settings": {"name": "Microsoft.Default"}},
          "deidentification": {"project": "p"}}, "must not be the source partition"),
        # bucket names and prefixes S3 (or the store) refuses were accepted with 202, and the operation
        # then failed its steps with a traceback each (ParamValidationError, ValueError)
        *[({"source": {"type": "identifiers", "settings": {"values": ["1.2"]}},
            "destination": {"type": "s3", "settings": {"bucket": bucket, "prefix": prefix}},
            "deidentification": {"project": "p"}}, message)
          for bucket, prefix, message in [
              ("../x", "", "is not an S3 bucket name"), ("UPPER", "", "is not an S3 bucket name"),
              ("ab", "", "is not an S3 bucket name"), ("a" * 64, "", "is not an S3 bucket name"),
              ("-ab", "", "is not an S3 bucket name"), ("a..b", "", "is not an S3 bucket name"),
              ("research", "../x", "settings.prefix"), ("research", "a/./b", "settings.prefix"),
              ("research", "a//b", "settings.prefix"), ("research", "a\\b", "settings.prefix"),
              ("research", "p" * 256, "settings.prefix")]],
        # a name longer than a file system allows was accepted, then each retry failed with a traceback
        *[({"source": {"type": "identifiers", "settings": {"values": ["1.2"]}},
            "destination": {"type": "directory", "settings": {"path": path}},
            "deidentification": {"project": "p"}}, "relative to the server's export directory")
          for path in ["a" * 256, "/".join(["a" * 200] * 6)]],
    ],
)  # fmt: skip
async def test_bad_export_requests(local_archive: RunningArchive, body: dict[str, Any], message: str) -> None:
    response = await post_export(local_archive.url, body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


async def test_export_by_query_to_a_research_partition(local_archive: RunningArchive) -> None:
    cohort = make_cohort(12)
    await stow(local_archive.url, cohort.files)
    study_date = "20210301"  # the first study only
    body = {
        "source": {"type": "query", "settings": {"query": f"StudyDate={study_date}"}},
        "destination": {"type": "partition", "settings": {"name": "research"}},
        "deidentification": {"project": "cohort-q"},
    }
    response = await post_export(local_archive.url, body)
    assert response.status_code == 202, response.text
    done = await wait_done(local_archive.url, response.json()["id"])
    per_study = SERIES * PER_SERIES
    assert (done["results"]["exported"], done["results"]["skipped"]) == (per_study, 1)
    research = f"{local_archive.base}/v2/partitions/research"
    async with httpx.AsyncClient(timeout=30) as client:
        studies = (await client.get(f"{research}/studies")).json()
        assert len(studies) == 1
        study = studies[0]["0020000D"]["Value"][0]
        assert study.startswith("2.25.") and study != cohort.studies[0]
        instances = (await client.get(f"{research}/instances")).json()
        assert len(instances) == per_study
        feed = (await client.get(f"{local_archive.base}/v1/partitions/research/changefeed?limit=100")).json()
        assert len(feed) == per_study
        sop = instances[0]["00080018"]["Value"][0]
        series = instances[0]["0020000E"]["Value"][0]
        accept = {"Accept": 'multipart/related; type="application/dicom"'}
        got = await client.get(f"{research}/studies/{study}/series/{series}/instances/{sop}", headers=accept)
        assert got.status_code == 200
        assert leaked(cohort.canaries.made, got.content) == []


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


async def progress(pool: asyncpg.Pool, op_id: str) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT status, checkpoint FROM operation WHERE operation_id = $1", uuid.UUID(op_id)
    )
    return {"status": row["status"], **(orjson.loads(row["checkpoint"]) if row["checkpoint"] else {})}


async def until_exported(pool: asyncpg.Pool, op_id: str, count: int) -> None:
    """Poll the operation's committed checkpoint (another task's progress; no event to wait on)."""
    async with asyncio.timeout(60):
        while (await progress(pool, op_id)).get("exported", 0) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_crash_mid_export_and_resume_to_a_partition(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    cohort = make_cohort(13)
    await stow(quiet_archive.url, cohort.files)
    body = request_body(cohort, {"type": "partition", "settings": {"name": "research"}})
    op_id = (await post_export(quiet_archive.url, body)).json()["id"]
    store = LocalBlobStore(tmp_path / "blobs")
    settings = ExportSettings(tmp_path / "exports", workers=0)
    first = OperationRunner(pool, {"export": ExportHandler(pool, store, settings, batch=3)}, lease_seconds=5)
    first.start()
    await until_exported(pool, op_id, 6)
    await first.stop()  # the crash: the running step is canceled and rolled back
    state = await progress(pool, op_id)
    assert state["status"] == "running" and 6 <= state["exported"] < EXPECTED
    second = OperationRunner(pool, {"export": ExportHandler(pool, store, settings, batch=5)}, lease_seconds=5)
    second.start()
    try:
        done = await wait_done(quiet_archive.url, op_id)
    finally:
        await second.stop()
    assert (done["results"]["exported"], done["results"]["skipped"], done["results"]["failed"]) == (
        EXPECTED,
        1,
        1,
    )
    research = await pool.fetchval("SELECT partition_key FROM partition WHERE name = 'research'")
    assert await pool.fetchval("SELECT count(*) FROM instance WHERE partition_key = $1", research) == EXPECTED
    assert (
        await pool.fetchval("SELECT count(*) FROM changefeed WHERE partition_key = $1", research) == EXPECTED
    )
    assert await pool.fetchval("SELECT count(*) FROM deid_mapping WHERE kind = 'instance'") == EXPECTED
    errors = await pool.fetch("SELECT identifier, kind FROM deid_export_error ORDER BY identifier")
    assert sorted((r[0], r[1]) for r in errors) == sorted(
        [(cohort.burned_in, "skipped"), ("1.2.3.4.5.6.7", "failed")]
    )
    outputs = {}
    for row in await pool.fetch("SELECT storage_key FROM instance WHERE partition_key = $1", research):
        data = await store.read(row[0])
        ds = pydicom.dcmread(io.BytesIO(data))
        outputs[f"results/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = data
    check_outputs(cohort, outputs)
    await store.close()


async def test_export_to_s3_with_a_crash(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path, s3_server: S3Server, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    cohort = make_cohort(14)
    await stow(quiet_archive.url, cohort.files)
    prefix = f"export-{uuid.uuid4().hex}"
    body = request_body(cohort, {"type": "s3", "settings": {"bucket": s3_bucket, "prefix": prefix}})
    op_id = (await post_export(quiet_archive.url, body)).json()["id"]
    store = LocalBlobStore(tmp_path / "blobs")
    settings = ExportSettings(tmp_path / "exports", s3_server.endpoint_url, s3_server.region, workers=2)
    first = OperationRunner(pool, {"export": ExportHandler(pool, store, settings, batch=4)}, lease_seconds=5)
    first.start()
    await until_exported(pool, op_id, 4)
    await first.stop()
    second = OperationRunner(pool, {"export": ExportHandler(pool, store, settings)}, lease_seconds=5)
    second.start()
    try:
        done = await wait_done(quiet_archive.url, op_id)
    finally:
        await second.stop()
    assert (done["results"]["exported"], done["results"]["skipped"], done["results"]["failed"]) == (
        EXPECTED,
        1,
        1,
    )
    assert done["results"]["errorHref"] == f"s3://{s3_bucket}/{prefix}/{op_id}/errors.log"
    bucket = make_s3_store(s3_server, s3_bucket, prefix)
    try:
        keys = [info.key async for info in bucket.list(f"{op_id}/")]
        outputs = {key: await bucket.read(key) for key in keys if key.endswith(".dcm")}
        assert sorted(keys) == sorted([*outputs, f"{op_id}/errors.log"])
        check_outputs(cohort, outputs)
    finally:
        await bucket.close()
        await store.close()


async def test_export_from_either_archive_store(archive: RunningArchive, tmp_path: Path) -> None:
    """The archive's own store local or S3: objects are read by the parent and handed to the workers."""
    cohort = make_cohort(15)
    await stow(archive.url, cohort.files)
    body = {
        "source": {"type": "identifiers", "settings": {"values": [cohort.studies[1]]}},
        "destination": directory("e"),
        "deidentification": {"project": "cohort-e", "options": ["retainLongModifiedDates"]},
    }
    response = await post_export(archive.url, body)
    assert response.status_code == 202, response.text
    done = await wait_done(archive.url, response.json()["id"])
    assert counts(done) == (SERIES * PER_SERIES, 0, 0)
    outputs = read_dir(tmp_path / "exports" / "e" / response.json()["id"])
    assert len(outputs) == SERIES * PER_SERIES
    for data in outputs.values():
        assert leaked(cohort.canaries.made, data) == []
        assert pydicom.dcmread(io.BytesIO(data)).PatientIdentityRemoved == "YES"


class SteppedHandler(ExportHandler):
    """An export handler whose steps run only when the test lets them (one permit, one step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.permits = asyncio.Semaphore(0)

    async def step(self, conn: asyncpg.Connection, op: Any) -> Any:
        await self.permits.acquire()
        return await super().step(conn, op)


async def test_progress_figures_at_each_step(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    cohort = make_cohort(15)
    await stow(quiet_archive.url, cohort.files)
    body = request_body(cohort, directory("progress"))
    op_id = (await post_export(quiet_archive.url, body)).json()["id"]
    study0, series2, series3 = cohort.studies[0], cohort.series[2][1], cohort.series[3][1]
    stored: int = await pool.fetchval(
        """SELECT sum(i.size)::bigint FROM instance i JOIN study st USING (study_key)
           JOIN series se USING (series_key)
           WHERE st.study_instance_uid = $1 OR se.series_instance_uid = ANY($2::text[])""",
        study0,
        [series2, series3],
    )
    settings = ExportSettings(tmp_path / "exports", workers=0)
    handler = SteppedHandler(pool, LocalBlobStore(tmp_path / "blobs"), settings, batch=4)
    runner = OperationRunner(pool, {"export": handler})
    runner.start()
    seen: list[tuple[int, dict[str, Any]]] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            previous: dict[str, Any] = {}
            while not seen or seen[-1][0] == 202:
                handler.permits.release()
                async with asyncio.timeout(30):
                    while True:  # the step's commit: its results differ from the last ones
                        response = await client.get(f"{quiet_archive.url}/operations/{op_id}")
                        if response.json()["results"] != previous:
                            break
                        await asyncio.sleep(0.01)
                previous = response.json()["results"]
                seen.append((response.status_code, previous))
    finally:
        await runner.stop()
    # the first step counts the cohort; then four instances a step; the last writes the errors log
    total = EXPECTED + 1  # the skipped ultrasound; the identifier not stored has no instance
    assert seen[0] == (202, {"exported": 0, "skipped": 0, "failed": 0, "instancesTotal": total,
                             "instancesProcessed": 0, "bytesProcessed": 0, "instancesPerSecond": 0.0,
                             "bytesPerSecond": 0})  # fmt: skip
    processed = [r["instancesProcessed"] for _, r in seen]
    assert processed == sorted(processed) and len(set(processed)) >= (total + 3) // 4
    for status, results in seen[1:-1]:
        assert status == 202
        assert results["instancesProcessed"] == results["exported"] + results["skipped"] + results["failed"]
        assert 0 < results["bytesProcessed"] <= stored
        assert results["instancesPerSecond"] > 0 and results["bytesPerSecond"] > 0
        # one elapsed time behind both rates
        by_instances = results["instancesProcessed"] / results["instancesPerSecond"]
        by_bytes = results["bytesProcessed"] / results["bytesPerSecond"]
        assert by_bytes == pytest.approx(by_instances, rel=0.05, abs=0.01)
    status, final = seen[-1]
    assert status == 200
    assert (final["exported"], final["skipped"], final["failed"]) == (EXPECTED, 1, 1)
    assert final["instancesProcessed"] == EXPECTED + 2 and final["bytesProcessed"] == stored
    assert final["errorHref"].endswith(f"/{op_id}/errors.log")


def test_progress_rates() -> None:
    checkpoint = {"exported": 7, "skipped": 2, "failed": 1, "total": 40, "bytes": 5_000_000, "started": 100.0}
    assert deid_export.progress(checkpoint, now=104.0) == {
        "exported": 7, "skipped": 2, "failed": 1, "instancesTotal": 40, "instancesProcessed": 10,
        "bytesProcessed": 5_000_000, "instancesPerSecond": 2.5, "bytesPerSecond": 1_250_000,
    }  # fmt: skip
    assert deid_export.progress(checkpoint, now=100.0)["bytesPerSecond"] == 0  # no time has passed yet


@pytest.mark.parametrize("fault", ["no credentials", "no such bucket"])
async def test_an_unusable_s3_destination_fails_the_export_once_with_its_reason(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path, s3_server: S3Server, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: str,
) -> None:  # fmt: skip
    """A destination no retry can fix (the server has no S3 credentials, the bucket does not exist) ends the
    operation failed at its first step, its reason in the results, without a traceback per retry."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = s3_bucket
    if fault == "no such bucket":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        bucket = f"missing-{uuid.uuid4().hex[:12]}"
    cohort = make_cohort(16)
    await stow(quiet_archive.url, cohort.files)
    body = request_body(cohort, {"type": "s3", "settings": {"bucket": bucket, "prefix": "p"}})
    response = await post_export(quiet_archive.url, body)
    assert response.status_code == 202, response.text
    op_id = response.json()["id"]
    settings = ExportSettings(tmp_path / "exports", s3_server.endpoint_url, s3_server.region, workers=0)
    runner = OperationRunner(
        pool, {"export": ExportHandler(pool, LocalBlobStore(tmp_path / "blobs"), settings)}
    )
    caplog.set_level("INFO")
    try:
        assert await runner.run_once(uuid.UUID(op_id))
    finally:
        await runner.stop()
    row = await pool.fetchrow(
        "SELECT status, attempts, failures, results FROM operation WHERE operation_id = $1", uuid.UUID(op_id)
    )
    results = orjson.loads(row["results"])
    expected = (
        "the S3 destination has no credentials: the server has no AWS credentials configured"
        if fault == "no credentials"
        else f"the S3 destination's bucket {bucket!r} does not exist"
    )
    assert (row["status"], row["attempts"], row["failures"], results["error"]) == ("failed", 1, 0, expected)
    assert [r for r in caplog.records if r.exc_info] == []
    done = await wait_done(quiet_archive.url, op_id)
    assert done["status"] == "failed" and done["results"]["error"] == expected


@pytest.mark.parametrize("path", ["afile", "afile/sub"])
async def test_an_unusable_directory_destination_fails_the_export_once_with_its_reason(
    local_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:  # fmt: skip
    """A directory destination that cannot be created (a file is in its way) failed each retry with a
    traceback, and the operation's error named the server's own path; it now fails once, naming the
    request's path only."""
    (tmp_path / "exports").mkdir(exist_ok=True)
    (tmp_path / "exports" / "afile").write_bytes(b"not a directory")
    cohort = make_cohort(17)
    await stow(local_archive.url, cohort.files)
    response = await post_export(local_archive.url, request_body(cohort, directory(path)))
    assert response.status_code == 202, response.text
    done = await wait_done(local_archive.url, response.json()["id"])
    expected = f"the destination directory {path!r} cannot be written: Not a directory"
    assert (done["status"], done["results"]["error"]) == ("failed", expected)
    row = await pool.fetchrow(
        "SELECT attempts, failures FROM operation WHERE operation_id = $1", uuid.UUID(done["id"])
    )
    assert (row["attempts"], row["failures"]) == (1, 0)
    assert [r for r in caplog.records if r.exc_info] == []
