"""The FHIR ImagingStudy projection: pure mapping functions, and the sync driven by the real change feed
against a FHIR server the tests start (which validates every resource written with fhir.resources)."""

from __future__ import annotations

import random
import uuid
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from bench.synthetic import StudySpec, make_instance, make_study, multipart_body, to_bytes
from changefeed.checkpoint import MemoryCheckpoint
from changefeed.consumer import ChangeFeedConsumer
from changefeed.fhir import (
    DEFAULT_PATIENT_SYSTEM,
    StudySnapshot,
    fhir_datetime,
    human_name,
    imaging_study_resource,
)
from changefeed.fhirsync import ArchiveReader, FhirClient, FhirSync, dicomweb_root_for
from tests.fixtures.fhir import RunningFhir
from tests.fixtures.server import RunningArchive

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SEX = {"M": "male", "F": "female", "O": "other"}


# --- pure functions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "time", "tz", "expected"),
    [
        ("20240102", "101112", "+0100", "2024-01-02T10:11:12+01:00"),
        ("20240102", "101112.250", "-0530", "2024-01-02T10:11:12.25+05:30".replace("+", "-")),
        ("20240102", "1011", "+0000", "2024-01-02T10:11:00+00:00"),
        ("20240102", "101112", None, "2024-01-02"),  # no zone: a time would need one, so the date alone
        ("20240102", None, "+0100", "2024-01-02"),
        ("20240102", "garbage", "+0100", "2024-01-02"),
        ("2024.01.02", None, None, "2024-01-02"),
        ("20241302", "101112", "+0100", None),
        (None, "101112", "+0100", None),
    ],
)
def test_fhir_datetime(date: str | None, time: str | None, tz: str | None, expected: str | None) -> None:
    assert fhir_datetime(date, time, tz) == expected


@given(
    st.dates(),
    st.times(),
    st.integers(min_value=-12 * 60, max_value=14 * 60).map(lambda m: m - m % 15),
    st.booleans(),
)
def test_fhir_datetime_is_always_valid_fhir(date, time, offset_minutes: int, with_zone: bool) -> None:
    sign = "-" if offset_minutes < 0 else "+"
    tz = f"{sign}{abs(offset_minutes) // 60:02d}{abs(offset_minutes) % 60:02d}" if with_zone else None
    value = fhir_datetime(f"{date.year:04d}{date.month:02d}{date.day:02d}", time.strftime("%H%M%S.%f"), tz)
    assert value is not None and value.startswith(date.isoformat())
    subject = {"reference": "Patient/x"}
    ImagingStudy.model_validate(
        {"resourceType": "ImagingStudy", "status": "available", "subject": subject, "started": value}
    )


UIDS = st.lists(st.integers(1, 10**6), min_size=1, max_size=6, unique=True).map(
    lambda ns: [f"1.2.840.99.{n}" for n in ns]
)
NUMBERS = st.one_of(st.none(), st.integers(-5, 2000), st.sampled_from(["", " 7", "x"]))


def _element(vr: str, value: object) -> dict:
    return {"vr": vr} if value is None else {"vr": vr, "Value": [value]}


@st.composite
def snapshots(draw: st.DrawFn) -> StudySnapshot:
    series_uids = draw(UIDS)
    series = [
        {
            "0020000E": _element("UI", uid),
            "00080060": _element("CS", draw(st.sampled_from([None, "CT", "MR", "SEG"]))),
            "00200011": _element("IS", draw(NUMBERS)),
        }
        for uid in series_uids
        if draw(st.booleans()) or uid == series_uids[0]  # some series only known from their instances
    ]
    instances = []
    for n, sop in enumerate(draw(st.lists(st.integers(1, 10**9), max_size=30, unique=True))):
        instances.append(
            {
                "0020000E": _element("UI", draw(st.sampled_from(series_uids))),
                "00080018": _element("UI", f"1.2.840.98.{sop}"),
                "00080016": _element("UI", "1.2.840.10008.5.1.4.1.1.2"),
                "00200013": _element("IS", draw(NUMBERS) if n % 2 else n),
                "00080060": _element("CS", "OT"),
            }
        )
    study = {
        "0020000D": _element("UI", "1.2.840.97.1"),
        "00080020": _element("DA", draw(st.sampled_from([None, "20240102", "bad"]))),
    }
    return StudySnapshot(study, series, instances)


@given(snapshots(), st.randoms(use_true_random=False))
def test_projection_is_valid_complete_and_independent_of_input_order(snapshot: StudySnapshot, rnd) -> None:
    resource = imaging_study_resource(snapshot, wado_root="http://a/v2", patient_reference="Patient/p")
    ImagingStudy.model_validate(resource)
    projected = {(s["uid"], i["uid"]) for s in resource.get("series", []) for i in s["instance"]}
    assert projected == {(i["0020000E"]["Value"][0], i["00080018"]["Value"][0]) for i in snapshot.instances}
    assert resource["numberOfInstances"] == len(snapshot.instances)
    assert resource["numberOfSeries"] == len({uid for uid, _ in projected})
    assert all(s["numberOfInstances"] == len(s["instance"]) for s in resource.get("series", []))
    # QIDO pages in another order (or a replay) project to the same JSON, so the sync skips the PUT
    shuffled = StudySnapshot(snapshot.study, list(snapshot.series), list(snapshot.instances))
    rnd.shuffle(shuffled.series)
    rnd.shuffle(shuffled.instances)
    assert (
        imaging_study_resource(shuffled, wado_root="http://a/v2", patient_reference="Patient/p") == resource
    )


def test_human_name() -> None:
    assert human_name({"Alphabetic": "Doe^John^Q^Dr^III"}) == {
        "use": "usual",
        "text": "Dr John Q Doe III",
        "family": "Doe",
        "given": ["John", "Q"],
        "prefix": ["Dr"],
        "suffix": ["III"],
    }
    assert human_name({"Alphabetic": "Doe"}) == {"use": "usual", "text": "Doe", "family": "Doe"}
    assert human_name({"Ideographic": "山田^太郎"}) is None
    assert human_name(None) is None


def test_dicomweb_root_for() -> None:
    assert dicomweb_root_for("http://h:8080/v1") == "http://h:8080/v2"
    assert (
        dicomweb_root_for("http://h/pacs/v1/partitions/research/") == "http://h/pacs/v2/partitions/research"
    )
    with pytest.raises(ValueError, match="give it explicitly"):
        dicomweb_root_for("http://h/changes")


# --- the sync against a real archive and a FHIR server ------------------------------------------------------


def make_files(
    spec: StudySpec, series_index: int, numbers: list[int], tz: str | None = None
) -> list[Dataset]:
    rng = random.Random(series_index * 1000 + numbers[0])
    datasets = []
    for n in numbers:
        ds = make_instance(spec, series_index, n, rng=rng)
        if tz:
            ds.TimezoneOffsetFromUTC = tz
        datasets.append(ds)
    return datasets


async def stow(archive: RunningArchive, datasets: list[Dataset]) -> None:
    body, content_type = multipart_body([to_bytes(ds) for ds in datasets])
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{archive.url}/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


async def delete(archive: RunningArchive, path: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.delete(f"{archive.url}/studies/{path}")
    assert r.status_code == 204, r.text


def study_id(root: str, study_uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{root}|{study_uid}"))


def iso(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def expected_patient(spec: StudySpec, id_: str) -> dict[str, Any]:
    family, given_name = spec.patient_name.split("^")
    return {
        "resourceType": "Patient",
        "id": id_,
        "identifier": [{"use": "usual", "system": DEFAULT_PATIENT_SYSTEM, "value": spec.patient_id}],
        "name": [{"use": "usual", "text": f"{given_name} {family}", "family": family, "given": [given_name]}],
        "gender": SEX[spec.sex],
        "birthDate": iso(spec.birth_date),
    }


def expected_study(
    spec: StudySpec, root: str, patient: str, series: dict[int, list[Dataset]], started: str | None = None
) -> dict[str, Any]:
    """The ImagingStudy the mapping in changefeed/fhir.py's docstring gives, written out independently."""
    series_json = []
    for index in sorted(series, key=lambda i: spec.series[i][2]):
        uid, modality, number = spec.series[index]
        datasets = sorted(series[index], key=lambda ds: int(ds.InstanceNumber))
        series_json.append(
            {
                "uid": uid,
                "number": number,
                "modality": {"system": DCM, "code": modality},
                "description": f"{spec.description} SERIES {number}",
                "numberOfInstances": len(datasets),
                "started": started or iso(spec.study_date),
                "instance": [
                    {
                        "uid": ds.SOPInstanceUID,
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{ds.SOPClassUID}"},
                        "number": int(ds.InstanceNumber),
                    }
                    for ds in datasets
                ],
            }
        )
    endpoint = str(uuid.uuid5(uuid.NAMESPACE_URL, root))
    return {
        "resourceType": "ImagingStudy",
        "id": study_id(root, spec.study_uid),
        "identifier": [
            {"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{spec.study_uid}"},
            {
                "use": "usual",
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": spec.accession,
            },
        ],
        "status": "available",
        "modality": [{"system": DCM, "code": m} for m in sorted({spec.series[i][1] for i in series})],
        "subject": {"reference": patient},
        "started": started or iso(spec.study_date),
        "endpoint": [{"reference": f"Endpoint/{endpoint}"}],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(v) for v in series.values()),
        "description": spec.description,
        "series": series_json,
    }


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


class Sync:
    """The sync as `dicomweb changefeed fhir-sync --once` runs it, with its checkpoint kept between runs."""

    def __init__(self, archive: RunningArchive, fhir: RunningFhir) -> None:
        self.feed = f"{archive.base}/v1"
        self.root = archive.url
        self.fhir = fhir
        self.checkpoint = MemoryCheckpoint()

    async def run(self, checkpoint: MemoryCheckpoint | None = None) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=30) as client:
            sync = FhirSync(ArchiveReader(client), FhirClient(client, self.fhir.url), self.root)
            consumer = ChangeFeedConsumer(
                self.feed, checkpoint or self.checkpoint, sync, include_metadata=False, batch_size=3
            )
            await consumer.run(follow=False)
        return sync.stats


async def test_study_lifecycle_in_fhir(local_archive: RunningArchive, fhir_server: RunningFhir) -> None:
    spec = make_study(random.Random(21), series_count=2, modalities=["CT", "MR"])
    store, root = fhir_server.store, local_archive.url
    sync = Sync(local_archive, fhir_server)
    series0 = make_files(spec, 0, [2, 1])
    await stow(local_archive, series0)
    assert await sync.run() == {"updated": 1, "unchanged": 0, "deleted": 0}

    endpoint_id = str(uuid.uuid5(uuid.NAMESPACE_URL, root))
    assert [without_meta(e) for e in store.of_type("Endpoint")] == [
        {
            "resourceType": "Endpoint",
            "id": endpoint_id,
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "name": "DICOMweb WADO-RS",
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": root,
        }
    ]
    patient_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"Patient|{DEFAULT_PATIENT_SYSTEM}|{spec.patient_id}"))
    assert [without_meta(p) for p in store.of_type("Patient")] == [expected_patient(spec, patient_id)]
    patient = f"Patient/{patient_id}"
    (study,) = store.of_type("ImagingStudy")
    assert without_meta(study) == expected_study(spec, root, patient, {0: series0})
    assert study["meta"]["versionId"] == "1"

    # a new series
    series1 = make_files(spec, 1, [1])
    await stow(local_archive, series1)
    assert await sync.run() == {"updated": 1, "unchanged": 0, "deleted": 0}
    (study,) = store.of_type("ImagingStudy")
    assert without_meta(study) == expected_study(spec, root, patient, {0: series0, 1: series1})
    assert study["meta"]["versionId"] == "2"

    # replaying the whole feed changes nothing and writes nothing (the at-least-once window is harmless)
    puts = store.writes("ImagingStudy")
    assert await sync.run(MemoryCheckpoint(0)) == {"updated": 0, "unchanged": 1, "deleted": 0}
    assert (
        store.writes("ImagingStudy") == puts
        and store.writes("Patient") == 1
        and store.writes("Endpoint") == 1
    )

    # an instance deleted, then a whole series
    gone = next(ds for ds in series0 if ds.InstanceNumber == 2)
    await delete(
        local_archive, f"{spec.study_uid}/series/{spec.series[0][0]}/instances/{gone.SOPInstanceUID}"
    )
    await sync.run()
    kept = [ds for ds in series0 if ds is not gone]
    assert without_meta(store.of_type("ImagingStudy")[0]) == expected_study(
        spec, root, patient, {0: kept, 1: series1}
    )
    await delete(local_archive, f"{spec.study_uid}/series/{spec.series[1][0]}")
    await sync.run()
    assert without_meta(store.of_type("ImagingStudy")[0]) == expected_study(spec, root, patient, {0: kept})

    # the study deleted: its ImagingStudy goes, the Patient and the Endpoint stay
    await delete(local_archive, spec.study_uid)
    assert await sync.run() == {"updated": 0, "unchanged": 0, "deleted": 1}
    assert store.of_type("ImagingStudy") == []
    assert len(store.of_type("Patient")) == 1 and len(store.of_type("Endpoint")) == 1
    # and a replay from the start converges on the same state (deletes are idempotent)
    assert await sync.run(MemoryCheckpoint(0)) == {"updated": 0, "unchanged": 0, "deleted": 0}
    assert store.of_type("ImagingStudy") == []


async def test_existing_patient_is_used_and_shared(
    local_archive: RunningArchive, fhir_server: RunningFhir
) -> None:
    first = make_study(random.Random(31), series_count=1)
    second = make_study(random.Random(32), series_count=1)
    second.patient_id, second.patient_name = first.patient_id, first.patient_name
    async with httpx.AsyncClient() as client:
        existing = {
            "resourceType": "Patient",
            "id": "emr-4711",
            "identifier": [{"system": DEFAULT_PATIENT_SYSTEM, "value": first.patient_id}],
        }
        r = await client.put(f"{fhir_server.url}/Patient/emr-4711", json=existing)
        assert r.status_code == 201, r.text
    a, b = make_files(first, 0, [1], tz="+0200"), make_files(second, 0, [1])
    await stow(local_archive, a)
    await stow(local_archive, b)
    assert await Sync(local_archive, fhir_server).run() == {"updated": 2, "unchanged": 0, "deleted": 0}
    store = fhir_server.store
    assert [p["id"] for p in store.of_type("Patient")] == ["emr-4711"]  # found, used, not rewritten
    assert store.writes("Patient") == 1
    studies = {s["id"]: s for s in store.of_type("ImagingStudy")}
    started = (
        f"{iso(first.study_date)}T{first.study_time[:2]}:{first.study_time[2:4]}:{first.study_time[4:]}+02:00"
    )
    assert without_meta(studies[study_id(local_archive.url, first.study_uid)]) == (
        expected_study(first, local_archive.url, "Patient/emr-4711", {0: a}, started=started)
    )
    assert studies[study_id(local_archive.url, second.study_uid)]["subject"] == {
        "reference": "Patient/emr-4711"
    }


async def test_study_without_patient_id_gets_a_patient_of_its_own(fhir_server: RunningFhir) -> None:
    study = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Anon"}]},
    }
    async with httpx.AsyncClient() as client:
        sync = FhirSync(ArchiveReader(client), FhirClient(client, fhir_server.url), "http://archive/v2")
        reference = await sync._patient(study)
        assert await sync._patient(study) == reference  # found the second time
    (patient,) = fhir_server.store.of_type("Patient")
    assert reference == f"Patient/{patient['id']}"
    assert patient["identifier"] == [
        {"use": "temp", "system": DEFAULT_PATIENT_SYSTEM, "value": "no-patient-id:1.2.3.4"}
    ]
    assert patient["name"] == [{"use": "usual", "text": "Anon", "family": "Anon"}]


async def test_fhir_server_refuses_invalid_resources(fhir_server: RunningFhir) -> None:
    """The test server really validates: a sync bug would not go unnoticed."""
    async with httpx.AsyncClient() as client:
        bad = {"resourceType": "ImagingStudy", "id": "x", "status": "available"}  # no subject
        r = await client.put(f"{fhir_server.url}/ImagingStudy/x", json=bad)
        assert r.status_code == 400 and "subject" in r.text
        dangling = {**bad, "subject": {"reference": "Patient/nobody"}}
        r = await client.put(f"{fhir_server.url}/ImagingStudy/x", json=dangling)
        assert r.status_code == 400 and "Patient/nobody" in r.text
        tz_less = {**bad, "subject": {"display": "x"}, "started": "2024-01-02T10:11:12"}
        r = await client.put(f"{fhir_server.url}/ImagingStudy/x", json=tz_less)
        assert r.status_code == 400 and "started" in r.text


async def test_partitions_project_to_their_own_resources(
    local_archive: RunningArchive, fhir_server: RunningFhir
) -> None:
    """One study stored in two partitions: two ImagingStudy resources, each with its partition's Endpoint;
    reading the partition's own feed later finds its resource up to date."""
    spec = make_study(random.Random(41), series_count=1)
    datasets = make_files(spec, 0, [1])
    await stow(local_archive, datasets)
    body, content_type = multipart_body([to_bytes(ds) for ds in datasets])
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            f"{local_archive.url}/partitions/research/studies",
            content=body,
            headers={"Content-Type": content_type},
        )
        assert r.status_code == 200, r.text
    assert await Sync(local_archive, fhir_server).run() == {"updated": 2, "unchanged": 0, "deleted": 0}
    roots = [local_archive.url, f"{local_archive.url}/partitions/research"]
    studies = {s["id"]: s for s in fhir_server.store.of_type("ImagingStudy")}
    assert sorted(studies) == sorted(study_id(root, spec.study_uid) for root in roots)
    endpoints = {e["id"]: e["address"] for e in fhir_server.store.of_type("Endpoint")}
    for root in roots:
        (reference,) = studies[study_id(root, spec.study_uid)]["endpoint"]
        assert endpoints[reference["reference"].removeprefix("Endpoint/")] == root

    partition_sync = Sync(local_archive, fhir_server)
    partition_sync.feed = f"{local_archive.base}/v1/partitions/research"
    partition_sync.root = dicomweb_root_for(partition_sync.feed)
    assert await partition_sync.run() == {"updated": 0, "unchanged": 1, "deleted": 0}
