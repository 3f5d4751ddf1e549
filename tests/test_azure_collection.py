"""Azure's own request collections, end to end: the requests of Microsoft's Postman collections
(Conformance-as-Postman and data-partition-feature, in microsoft/dicom-server docs/resources) in their
order, and the examples of Azure's how-to guides, against a running archive, with the status codes,
headers and JSON shapes Azure's documentation promises.

The sample files the collections name (red-triangle.dcm, green-square.dcm, blue-circle.dcm, visus case1)
are made here with pydicom, carrying the UIDs the requests use.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import uuid

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.fixtures.server import RunningArchive

# Azure's docs/dcms samples: one study, the red triangle and green square in one series
AZ_STUDY = "1.2.826.0.1.3680043.8.498.13230779778012324449356534479549187420"
AZ_SERIES = "1.2.826.0.1.3680043.8.498.45787841905473114233124723359129632652"
RED_TRIANGLE = "1.2.826.0.1.3680043.8.498.47359123102728459884412887463296905395"
GREEN_SQUARE = "1.2.826.0.1.3680043.8.498.12714725698140337137334606354172323212"
# Conformance-as-Postman's variables
STUDY1 = "1.2.276.0.50.192168001099.7810872.14547392.270"
SERIES1 = "1.2.276.0.50.192168001099.7810872.14547392.458"
INSTANCE1 = "1.2.276.0.50.192168001099.7810872.14547392.467"
STUDY2 = "1.2.276.0.50.192168001099.9140875.14547392.277"
INSTANCE2 = "1.2.276.0.50.192168001099.9140875.14547392.276"

DICOM_JSON = {"Accept": "application/dicom+json"}
ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def sample(study: str, series: str, sop: str, number: int = 1, *, patient_id: str = "ID1") -> bytes:
    """A small RGB secondary capture like Azure's samples (8-bit, 32x32)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop
    ds.StudyDate, ds.StudyTime = "20200922", "120000"
    ds.Modality = "OT"
    ds.PatientName, ds.PatientID, ds.PatientSex = "Anony Mous", patient_id, "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24, number % 3] = 255
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(files: list[bytes], boundary: str = "ABCD1234") -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n" for f in files
    )
    return body + f"--{boundary}--\r\n".encode()


def failure_reasons(body: dict) -> list[int]:
    return [item["00081197"]["Value"][0] for item in body.get("00081198", {}).get("Value", [])]


@pytest.fixture
async def client(local_archive: RunningArchive):
    async with httpx.AsyncClient(base_url=local_archive.base, timeout=60) as c:
        yield c


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_conformance_collection_in_order(client: httpx.AsyncClient, version: str) -> None:
    """Conformance-as-Postman, request by request."""
    base = f"/{version}"
    case1 = sample(STUDY1, SERIES1, INSTANCE1)
    case2 = sample(STUDY2, "1.2.276.0.50.192168001099.9140875.14547392.278", INSTANCE2, patient_id="ID2")
    # Store-instances-using-multipart/related: "multipart/related;boundary=ABCD1234", no type parameter
    r = await client.post(
        f"{base}/studies",
        content=multipart([case1]),
        headers={**DICOM_JSON, "Content-Type": "multipart/related;boundary=ABCD1234"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    (stored,) = r.json()["00081199"]["Value"]
    assert stored["00081190"]["Value"] == [
        f"{client.base_url}{base}/studies/{STUDY1}/series/{SERIES1}/instances/{INSTANCE1}"
    ]
    # Store-single-instance
    r = await client.post(
        f"{base}/studies", content=case2, headers={**DICOM_JSON, "Content-Type": "application/dicom"}
    )
    assert r.status_code == 200
    # Store-instances-for-a-specific-study: the same instance again (45070), another study's (43265)
    for file, reason in ((case1, 45070), (case2, 43265)):
        r = await client.post(
            f"{base}/studies/{STUDY1}",
            content=multipart([file]),
            headers={
                **DICOM_JSON,
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=ABCD1234',
            },
        )
        assert r.status_code == 409 and failure_reasons(r.json()) == [reason]
    study, series, instance = (
        f"{base}/studies/{STUDY1}",
        f"{base}/studies/{STUDY1}/series/{SERIES1}",
        f"{base}/studies/{STUDY1}/series/{SERIES1}/instances/{INSTANCE1}",
    )
    for path, accept in (
        (study, ANY_SYNTAX),
        (f"{study}/metadata", "application/dicom+json"),
        (series, ANY_SYNTAX),
        (f"{series}/metadata", "application/dicom+json"),
        (instance, "application/dicom; transfer-syntax=*"),
        (f"{instance}/metadata", "application/dicom+json"),
        (
            f"{instance}/frames/1",
            'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1',
        ),
    ):
        r = await client.get(path, headers={"Accept": accept})
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"].split(";")[0] == accept.split(";")[0]
    r = await client.get(f"{study}/metadata", headers=DICOM_JSON)
    assert SERIES1 in r.text  # the collection's own test
    r = await client.get(instance, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert r.content == case1
    for path in (
        f"{base}/studies?StudyInstanceUID={STUDY1}",
        f"{base}/series?SeriesInstanceUID={SERIES1}",
        f"{study}/series?SeriesInstanceUID={SERIES1}",
        f"{base}/instances?SOPInstanceUID={INSTANCE1}",
        f"{study}/instances?SOPInstanceUID={INSTANCE1}",
        f"{series}/instances?SOPInstanceUID={INSTANCE1}",
    ):
        r = await client.get(path, headers=DICOM_JSON)
        assert r.status_code == 200 and len(r.json()) == 1, path
    # Delete instance, then its (now empty) series and study: 204, 404, 404
    assert (await client.delete(instance)).status_code == 204
    assert (await client.delete(series)).status_code == 404
    assert (await client.delete(study)).status_code == 404
    assert (await client.delete(f"{base}/studies/{STUDY2}")).status_code == 204


# data-partition-feature's work item, with the three values this archive refuses made valid (a UID
# component with leading zeros, a CS value of 17 characters, an empty code item): see docs/conformance.md
WORKITEM = {
    "00081080": {"vr": "LO", "Value": ["Admitting Diagnoses Description"]},
    "00081084": {"vr": "SQ"},
    "00081195": {"vr": "UI"},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Last^First"}]},
    "00100020": {"vr": "LO", "Value": ["11111"]},
    "00100021": {"vr": "LO"},
    "00100024": {"vr": "SQ"},
    "00100030": {"vr": "DA", "Value": ["20000101"]},
    "00100040": {"vr": "CS", "Value": ["F"]},
    "00101002": {"vr": "SQ"},
    "00104000": {"vr": "LT", "Value": ["Patient Comments"]},
    "00321033": {"vr": "LO", "Value": ["123"]},
    "00380010": {"vr": "LO", "Value": ["11111"]},
    "00380014": {"vr": "SQ", "Value": [{}]},
    "00400400": {"vr": "LT"},
    "00401001": {"vr": "SH", "Value": ["123"]},
    "00404005": {"vr": "DT", "Value": ["20211202115531.193"]},
    "00404010": {"vr": "DT", "Value": ["20211202115531.193"]},
    "00404018": {
        "vr": "SQ",
        "Value": [
            {
                "00080100": {"vr": "SH", "Value": ["ABC123"]},
                "00080102": {"vr": "SH", "Value": ["123ABC"]},
                "00080103": {"vr": "SH", "Value": ["1.0"]},
                "00080104": {"vr": "LO", "Value": ["Requested procedure"]},
            }
        ],
    },
    "00404021": {"vr": "SQ"},
    "00404025": {
        "vr": "SQ",
        "Value": [
            {
                "00080100": {"vr": "SH", "Value": ["ABC_123"]},
                "00080102": {"vr": "SH", "Value": ["123ABC"]},
                "00080104": {"vr": "LO", "Value": ["Station name"]},
            },
            {
                "00080100": {"vr": "SH", "Value": ["DEF_456"]},
                "00080102": {"vr": "SH", "Value": ["123ABC"]},
                "00080104": {"vr": "LO", "Value": ["Station name"]},
            },
        ],
    },
    "00404026": {
        "vr": "SQ",
        "Value": [
            {
                "00080100": {"vr": "SH", "Value": ["ABC"]},
                "00080102": {"vr": "SH", "Value": ["AAA"]},
                "00080104": {"vr": "LO", "Value": ["Station class"]},
            },
            {
                "00080100": {"vr": "SH", "Value": ["ABC"]},
                "00080102": {"vr": "SH", "Value": ["AAA"]},
                "00080104": {"vr": "LO", "Value": ["Station class"]},
            },
        ],
    },
    "00404027": {
        "vr": "SQ",
        "Value": [
            {
                "00080100": {"vr": "SH", "Value": ["ABC_1"]},
                "00080102": {"vr": "SH", "Value": ["DEF"]},
                "00080104": {"vr": "LO", "Value": ["Geographic location"]},
            },
            {
                "00080100": {"vr": "SH", "Value": ["ABC_2"]},
                "00080102": {"vr": "SH", "Value": ["DEF"]},
                "00080104": {"vr": "LO", "Value": ["Geographic location"]},
            },
        ],
    },
    "00404041": {"vr": "CS", "Value": ["READY"]},
    "0040A370": {
        "vr": "SQ",
        "Value": [
            {
                "00080050": {"vr": "SH", "Value": ["1234567"]},
                "00080051": {"vr": "SQ"},
                "00080090": {"vr": "PN", "Value": [{"Alphabetic": "Last^First^^Dr"}]},
                "0020000D": {"vr": "UI", "Value": ["2.25.0"]},
                "00321060": {"vr": "LO", "Value": ["Requested procedure description"]},
                "00321064": {
                    "vr": "SQ",
                    "Value": [
                        {
                            "00080100": {"vr": "SH", "Value": ["GHI123"]},
                            "00080102": {"vr": "SH", "Value": ["789JKL"]},
                            "00080104": {"vr": "LO", "Value": ["Requested procedure"]},
                        }
                    ],
                },
                "00400026": {"vr": "SQ"},
                "00400027": {"vr": "SQ"},
                "00401001": {"vr": "SH", "Value": ["123"]},
                "00401400": {"vr": "LT", "Value": ["Requested Cataract surgery procedure comments"]},
            }
        ],
    },
    "00741000": {"vr": "CS", "Value": ["SCHEDULED"]},
    "00741002": {"vr": "SQ"},
    "00741200": {"vr": "CS", "Value": ["MEDIUM"]},
    "00741202": {"vr": "LO", "Value": ["WORKLIST"]},
    "00741204": {"vr": "LO", "Value": ["Scheduled procedure step description"]},
    "00741210": {"vr": "SQ"},
    "00741216": {"vr": "SQ"},
    "0040e020": {"vr": "CS", "Value": ["DICOM"]},
    "00081199": {
        "vr": "SQ",
        "Value": [
            {"00081150": {"vr": "UI", "Value": ["2.5.0"]}, "00081155": {"vr": "UI", "Value": ["2.5.1000000"]}}
        ],
    },
}
UPDATE = {
    "00741202": {"vr": "LO", "Value": ["New Worklist Label"]},
    "0040e020": {"vr": "CS", "Value": ["DICOM"]},
    "00081199": {
        "vr": "SQ",
        "Value": [
            {"00081150": {"vr": "UI", "Value": ["2.5.0"]}, "00081155": {"vr": "UI", "Value": ["2.5.1000000"]}}
        ],
    },
}
DICOM_JSON_BODY = {"Content-Type": "application/dicom+json"}


@pytest.mark.parametrize(("version", "partition"), [("v1", "Microsoft.Default"), ("v2", "Partition1")])
async def test_partition_collection_in_order(client: httpx.AsyncClient, version: str, partition: str) -> None:
    """data-partition-feature, request by request, then the claim and update it leaves out."""
    base = f"/{version}"
    root = f"{base}/partitions/{partition}"
    red = sample(AZ_STUDY, AZ_SERIES, RED_TRIANGLE)
    r = await client.post(
        f"{root}/studies", content=red, headers={**DICOM_JSON, "Content-Type": "application/dicom"}
    )
    assert r.status_code == 200
    assert r.json()["00081190"]["Value"] == [f"{client.base_url}{root}/studies/{AZ_STUDY}"]
    names = [p["partitionName"] for p in (await client.get(f"{base}/partitions")).json()]
    assert partition in names
    assert (await client.get(f"{root}/studies/{AZ_STUDY}", headers={"Accept": ANY_SYNTAX})).status_code == 200
    r = await client.get(f"{root}/studies?StudyInstanceUID={AZ_STUDY}", headers=DICOM_JSON)
    assert r.status_code == 200 and len(r.json()) == 1
    assert (await client.delete(f"{root}/studies/{AZ_STUDY}")).status_code == 204

    # Create-workitem at ?{uid}: 201, Location and Content-Location name it (Azure's conformance statement)
    headers = {**DICOM_JSON, **DICOM_JSON_BODY}
    r = await client.post(
        f"{root}/workitems?1.2.3.{version[1]}", content=json.dumps([WORKITEM]), headers=headers
    )
    assert r.status_code == 201, r.text
    item_url = f"{client.base_url}{root}/workitems/1.2.3.{version[1]}"
    assert r.headers["location"] == item_url
    assert r.headers["content-location"] == item_url
    # Search-for-workitems sends its body with the GET; it is ignored
    r = await client.request(
        "GET", f"{root}/workitems?PatientName=Last^First", content=json.dumps([WORKITEM]), headers=headers
    )
    assert r.status_code == 200 and len(r.json()) == 1
    # Request-cancellation of a SCHEDULED item: 202; it is then CANCELED, so the rest are refused
    cancel = [
        {
            "00741238": {"vr": "LT", "Value": ["This Workitem should be cancelled."]},
            "0074100A": {"vr": "UR", "Value": ["https://microsoft.com"]},
            "0074100C": {"vr": "LO", "Value": ["Microsoft"]},
        }
    ]
    item = f"{root}/workitems/1.2.3.{version[1]}"
    r = await client.post(f"{item}/cancelrequest", content=json.dumps(cancel), headers=DICOM_JSON_BODY)
    assert r.status_code == 202
    claim = [
        {"00741000": {"vr": "CS", "Value": ["IN PROGRESS"]}, "00081195": {"vr": "UI", "Value": ["1.2.3"]}}
    ]
    r = await client.put(f"{item}/state", content=json.dumps(claim), headers=DICOM_JSON_BODY)
    assert r.status_code == 409
    for target in (item, f"{item}?1.2.3"):
        r = await client.post(target, content=json.dumps([UPDATE]), headers=DICOM_JSON_BODY)
        assert r.status_code == 409
    r = await client.get(item, headers=DICOM_JSON)
    assert r.status_code == 200
    assert r.json()[0]["00741000"]["Value"] == ["CANCELED"]

    # the same without the cancellation: claimed, updated with the Transaction UID, retrieved
    second = f"{root}/workitems/1.2.4.{version[1]}"
    r = await client.post(
        f"{root}/workitems?1.2.4.{version[1]}", content=json.dumps([WORKITEM]), headers=headers
    )
    assert r.status_code == 201
    assert (
        await client.put(f"{second}/state", content=json.dumps(claim), headers=DICOM_JSON_BODY)
    ).status_code == 200
    r = await client.post(second, content=json.dumps([UPDATE]), headers=DICOM_JSON_BODY)
    assert r.status_code == 409  # claimed: the Transaction UID is required
    r = await client.post(f"{second}?1.2.3", content=json.dumps([UPDATE]), headers=DICOM_JSON_BODY)
    assert r.status_code == 200
    r = await client.get(second, headers=DICOM_JSON)
    assert r.json()[0]["00741202"]["Value"] == ["New Worklist Label"]
    assert "00081195" not in r.json()[0]


async def wait_operation(client: httpx.AsyncClient, href: str) -> dict:
    for _ in range(300):
        r = await client.get(href)
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202
        await asyncio.sleep(0.1)
    raise AssertionError(f"operation {href} did not finish")


async def test_extended_query_tags_how_to(client: httpx.AsyncClient) -> None:
    """The examples of Azure's extended query tag guide: the three tag definitions, the 202 with the
    operation's reference and Location, the operation as Azure shows it, QIDO on the tags."""
    red = sample(AZ_STUDY, AZ_SERIES, RED_TRIANGLE)
    assert (
        await client.post("/v2/studies", content=red, headers={"Content-Type": "application/dicom"})
    ).is_success
    tags = [
        {"Path": "04011001", "VR": "SS", "PrivateCreator": "MicrosoftPC", "Level": "Instance"},
        {"Path": "ManufacturerModelName", "VR": "LO", "Level": "Series"},
        {"Path": "00100040", "Level": "Study"},
    ]
    r = await client.post("/v2/extendedquerytags", json=tags)
    assert r.status_code == 202
    ref = r.json()
    assert set(ref) == {"id", "href"}
    assert ref["href"] == f"{client.base_url}/v2/operations/{ref['id']}"
    assert r.headers["location"] == ref["href"]
    op = await wait_operation(client, ref["href"])
    assert op["operationId"] == op["id"] == ref["id"]
    assert op["type"] == "reindex" and op["percentComplete"] == 100
    assert sorted(op["resources"]) == sorted(
        f"{client.base_url}/v2/extendedquerytags/{p}" for p in ("04011001", "00081090", "00100040")
    )
    r = await client.get("/v2/extendedquerytags/ManufacturerModelName")
    assert r.json() == {
        "path": "00081090",
        "vr": "LO",
        "level": "Series",
        "status": "Ready",
        "queryStatus": "Enabled",
    }
    r = await client.get(
        "/v2/instances?00081090=Microsoft&PatientName=Anony&fuzzyMatching=true", headers=DICOM_JSON
    )
    assert r.status_code == 200 and r.json() == []
    r = await client.get(
        "/v2/instances?PatientSex=F&PatientName=Anony&fuzzyMatching=true", headers=DICOM_JSON
    )
    assert [i["00080018"]["Value"] for i in r.json()] == [[RED_TRIANGLE]]


async def test_a_store_with_no_instances_is_204(client: httpx.AsyncClient) -> None:
    """Azure's conformance statement: 204 when no content was provided in the store request (a multipart
    body with its closing boundary and no part), under both versions, with or without a study."""
    for path in ("/v1/studies", f"/v2/studies/{STUDY1}", "/v2/partitions/Microsoft.Default/studies"):
        r = await client.post(
            path,
            content=b"--ABCD1234--\r\n",
            headers={
                **DICOM_JSON,
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=ABCD1234',
            },
        )
        assert (r.status_code, r.content) == (204, b""), path
    # a body that is not multipart at all is still malformed
    r = await client.post(
        "/v2/studies", content=b"", headers={"Content-Type": "multipart/related; boundary=ABCD1234"}
    )
    assert r.status_code == 400
    assert (await client.get("/v2/studies")).json() == []


async def test_an_unfinished_operation_points_to_itself(quiet_archive: RunningArchive) -> None:
    """Azure's GET /operations/{id} answers 202 with a Location (the operation's own URL) while it has not
    finished, so that a generic long-running-operation poller keeps polling; 200 without one after."""
    async with httpx.AsyncClient(base_url=quiet_archive.base, timeout=60) as client:
        r = await client.post("/v1/extendedquerytags", json=[{"Path": "PatientAge", "Level": "Study"}])
        assert r.status_code == 202
        href = r.json()["href"]
        dashed = href.rsplit("/", 1)[0] + "/" + str(uuid.UUID(r.json()["id"]))
        for url in (href, dashed):
            r = await client.get(url)
            assert r.status_code == 202 and r.json()["status"] == "notStarted"
            assert r.headers["location"] == href


def raw_post(base: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """POST with the path sent exactly as given (httpx and browsers remove dot segments first)."""
    url = httpx.URL(base)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_dot_segment_partition_names_are_refused(client: httpx.AsyncClient) -> None:
    """Azure's partition names allow '.', so '.' and '..' would pass the character rule; but they are URL
    dot segments: every client resolves .../partitions/../studies/{uid} (the RetrieveURL such a partition's
    STOW would answer) to the default partition's study. They are refused; '...' is an ordinary name."""
    red = sample(AZ_STUDY, AZ_SERIES, RED_TRIANGLE)
    base = str(client.base_url)
    for name in (".", ".."):
        status, body = await asyncio.to_thread(
            raw_post, base, f"/v2/partitions/{name}/studies", red, "application/dicom"
        )
        assert status == 400, body
        assert b"invalid partition name" in body
    names = [p["partitionName"] for p in (await client.get("/v2/partitions")).json()]
    assert "." not in names and ".." not in names
    r = await client.post(
        "/v2/partitions/.../studies", content=red, headers={"Content-Type": "application/dicom"}
    )
    assert r.status_code == 200
    # the same rule for an export into a partition
    r = await client.post(
        "/v2/export",
        json={
            "source": {"type": "identifiers", "settings": {"values": [AZ_STUDY]}},
            "destination": {"type": "partition", "settings": {"name": ".."}},
            "deidentification": {"project": "p"},
        },
    )
    assert r.status_code == 400, r.text


async def test_azure_health_check_route(client: httpx.AsyncClient) -> None:
    """Azure's Health Check API: GET /health/check, {overallStatus, details: [{name, status, description}]},
    200 when healthy (the same checks as /health/ready)."""
    r = await client.get("/health/check")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["overallStatus"] == "Healthy"
    assert [(d["name"], d["status"]) for d in body["details"]] == [
        ("DatabaseHealthCheck", "Healthy"),
        ("BlobStoreHealthCheck", "Healthy"),
    ]
    assert all(d["description"] for d in body["details"])


async def test_bulk_update_field_names_match_case_insensitively(client: httpx.AsyncClient) -> None:
    """Azure matches request property names case-insensitively (as export and extended query tags do
    here): a $bulkUpdate body in PascalCase is the same request; a field given twice is ambiguous."""
    red = sample(AZ_STUDY, AZ_SERIES, RED_TRIANGLE)
    assert (
        await client.post("/v2/studies", content=red, headers={"Content-Type": "application/dicom"})
    ).is_success
    change = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "New^Name"}]}}
    r = await client.post(
        "/v2/studies/$bulkUpdate", json={"StudyInstanceUids": [AZ_STUDY], "ChangeDataset": change}
    )
    assert r.status_code == 202, r.text
    op = await wait_operation(client, r.json()["href"])
    assert op["status"] == "succeeded" and op["results"]["instanceUpdated"] == 1
    r = await client.get(f"/v2/studies?StudyInstanceUID={AZ_STUDY}", headers=DICOM_JSON)
    assert r.json()[0]["00100010"]["Value"] == [{"Alphabetic": "New^Name"}]
    r = await client.post(
        "/v2/studies/$bulkUpdate",
        json={"studyInstanceUids": [AZ_STUDY], "StudyInstanceUIDs": [AZ_STUDY], "changeDataset": change},
    )
    assert r.status_code == 400 and "twice" in r.json()["error"]["message"]


async def test_a_store_that_stores_nothing_names_no_study_url(client: httpx.AsyncClient) -> None:
    """Azure's Store response carries the study's RetrieveURL only when at least one instance was stored:
    a 409 for POST /studies/{study} must not point at a study that does not exist."""
    red = sample(AZ_STUDY, AZ_SERIES, RED_TRIANGLE)
    r = await client.post("/v2/studies/1.2.3", content=red, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 409 and failure_reasons(r.json()) == [43265]
    assert "00081190" not in r.json()
    assert (await client.get("/v2/studies/1.2.3/metadata")).status_code == 404
    # one stored, one refused: 202 and the URL of the study
    green = sample(AZ_STUDY, AZ_SERIES, GREEN_SQUARE, 2)
    other = sample(STUDY2, "1.2.276.0.50.192168001099.9140875.14547392.278", INSTANCE2)
    r = await client.post(
        f"/v2/studies/{AZ_STUDY}",
        content=multipart([green, other]),
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=ABCD1234'},
    )
    assert r.status_code == 202 and failure_reasons(r.json()) == [43265]
    assert r.json()["00081190"]["Value"] == [f"{client.base_url}/v2/studies/{AZ_STUDY}"]
    # the same instance again: nothing stored (45070), so no study URL either
    r = await client.post(
        f"/v2/studies/{AZ_STUDY}", content=green, headers={"Content-Type": "application/dicom"}
    )
    assert r.status_code == 409 and failure_reasons(r.json()) == [45070]
    assert "00081190" not in r.json()


async def test_a_keyword_in_the_wrong_case_gets_a_hint(client: httpx.AsyncClient) -> None:
    """Azure's guides write PatientId (extended query tag paths, the worklist search example). Keywords are
    case-sensitive here, so these stay 400, but the reason names the keyword meant."""
    hint = "did you mean 'PatientID'?"
    for path in (
        "/v2/studies?PatientId=ID1",
        "/v2/studies?includefield=PatientId",
        "/v2/extendedquerytags/PatientId",
        "/v2/workitems?PatientId=K123&0040A370.00080050=1423JS&includefield=00404005&limit=5&offset=0",
    ):
        r = await client.get(path)
        assert r.status_code == 400 and hint in r.json()["error"]["message"], (path, r.text)
    r = await client.get("/v2/studies?PatientIdentity=1")
    assert r.status_code == 400 and "did you mean" not in r.json()["error"]["message"]
