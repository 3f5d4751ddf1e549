"""Bulk update (Azure v2 `POST /studies/$bulkUpdate`): the request checks, the rewrite of stored objects,
and the operation end to end against a running archive on both stores: QIDO/WADO/metadata after, originals
with `msdicom-request-original`, change feed entries, extended query tags, DELETE of both versions, the
partitioned route, and a crash mid-operation followed by a resume that leaves no instance half-updated."""

from __future__ import annotations

import asyncio
import io
import random
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from archive.maintenance import sweep_orphans
from archive.update import UpdateHandler
from archive.update_request import UPDATE, parse_change_dataset, parse_update_request, update_params
from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from changefeed.fhir import DEFAULT_PATIENT_SYSTEM
from dicomcore import rewrite
from dicomcore.framing import read_file
from dicomcore.rewrite import RewriteError, apply_changes
from indexer.operations import OperationRunner, create_operation
from storage import LocalBlobStore
from storage.base import BlobStore
from tests.fixtures.fhir import RunningFhir
from tests.fixtures.server import RunningArchive
from tests.test_fhir_projection import Sync, make_files
from tests.test_fhir_projection import stow as fhir_stow

NEW_NAME = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Merged^Patient"}]}}
CHANGES = {
    **NEW_NAME,
    "00100020": {"vr": "LO", "Value": ["MRN-42"]},
    "00100021": {"vr": "LO", "Value": ["HOSPITAL-A"]},
    "00100030": {"vr": "DA", "Value": ["19700102"]},
    "00102180": {"vr": "SH", "Value": ["Pilot"]},  # absent from the stored objects: inserted
}


# ---------------------------------------------------------------------------------------------------------
# The request checks (shared with the HL7 listener)


def test_parse_update_request() -> None:
    body = {
        "studyInstanceUids": ["1.2.3", "1.2.4", "1.2.3"],
        "changeDataset": {"00100010": NEW_NAME["00100010"]},
    }
    request = parse_update_request(body)
    assert request.study_instance_uids == ["1.2.3", "1.2.4"]
    assert update_params("Microsoft.Default", request) == {
        "partition": "Microsoft.Default",
        "studyInstanceUids": ["1.2.3", "1.2.4"],
        "changeDataset": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Merged^Patient"}]}},
    }
    assert parse_change_dataset({"00080050": {"vr": "SH", "Value": ["A1"]}}) == {
        "00080050": {"vr": "SH", "Value": ["A1"]}
    }
    assert list(parse_change_dataset({"001021f0": {"vr": "LO", "Value": ["None"]}})) == ["001021F0"]
    assert parse_change_dataset({"00101030": {"vr": "DS", "Value": [72.5]}})["00101030"]["Value"] == [72.5]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"studyInstanceUids": ["1.2.3"]}, "changeDataset is required"),
        ({"studyInstanceUids": [], "changeDataset": NEW_NAME}, "non-empty array"),
        ({"studyInstanceUids": ["1.02.3"], "changeDataset": NEW_NAME}, "not a valid UID"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {}}, "at least one attribute"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": NEW_NAME, "extra": 1}, "unknown fields"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00080060": {"vr": "CS", "Value": ["MR"]}}},
         "Modality (0008,0060) cannot be updated"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"0020000D": {"vr": "UI", "Value": ["1.2"]}}},
         "StudyInstanceUID (0020,000D) cannot be updated"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"xyz": {}}}, "not an attribute tag"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100010": {"vr": "LO", "Value": ["A"]}}},
         "the VR is PN"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100010": {"vr": "PN"}}}, "value is required"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100010": {"vr": "PN", "Value": [None]}}},
         "value is required"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100030": {"vr": "DA", "Value": ["1970-1-2"]}}},
         "PatientBirthDate (0010,0030)"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100020": {"vr": "LO", "Value": ["a", "b"]}}},
         "takes one value"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100020": {"vr": "LO", "Value": ["x" * 65]}}},
         "PatientID (0010,0020)"),
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100010": {"vr": "PN", "Value": ["Doe^J"]}}},
         "a PN value is an object"),
        ({"studyInstanceUids": ["1.2.3"],
          "changeDataset": {"00100020": {"vr": "LO", "Value": ["x"], "BulkDataURI": "http://x"}}},
         "only 'vr' and 'Value'"),
        # HL7 updates come here without a JSON body (PID fields): a NUL is refused by the value check
        ({"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100020": {"vr": "LO", "Value": ["a\0b"]}}},
         "PatientID (0010,0020): a value must not contain a NUL character"),
        ({"studyInstanceUids": ["1.2.3"],
          "changeDataset": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe\0^J"}]}}},
         "PatientName (0010,0010): a value must not contain a NUL character"),
    ],
)  # fmt: skip
def test_refused_requests(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_update_request(body)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(["00100010", "00100020", "00100030", "00080050", "00080060", "0010", "zzzzzzzz"])


_elements = st.fixed_dictionaries(
    {"vr": st.sampled_from(["PN", "LO", "DA", "SH"])}, optional={"Value": _json}
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _elements, max_size=3) | _json)
def test_any_change_dataset_is_accepted_or_refused_with_a_reason(obj: Any) -> None:
    try:
        changes = parse_change_dataset(obj)
    except ValueError as exc:
        assert str(exc)
        return
    assert changes and all(element["Value"] for element in changes.values())
    # whatever is accepted can be written into a stored object
    data = to_bytes(make_instance(make_study(random.Random(3)), 0, 1))
    apply_changes(data, changes)


# ---------------------------------------------------------------------------------------------------------
# The rewrite of a stored object


def _instance(syntax: str, *, charset: str | None = "ISO_IR 192") -> tuple[bytes, pydicom.Dataset]:
    ds = make_instance(make_study(random.Random(5)), 0, 1, rows=16, columns=16)
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == JPEGBaseline8Bit:
        ds.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9", b"\xff\xd8 frame two\xff\xd9"])
        ds.NumberOfFrames = 2
    data = to_bytes(ds)
    return data, pydicom.dcmread(io.BytesIO(data))


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
     JPEGBaseline8Bit],
)  # fmt: skip
def test_rewrite_changes_only_the_listed_attributes(syntax: str) -> None:
    data, before = _instance(syntax)
    new = apply_changes(data, parse_change_dataset(CHANGES))
    after = pydicom.dcmread(io.BytesIO(new))
    assert after.file_meta.TransferSyntaxUID == syntax
    assert after.PixelData == before.PixelData  # byte-equal, encapsulated fragments included
    assert str(after.PatientName) == "Merged^Patient" and after.PatientID == "MRN-42"
    assert after.IssuerOfPatientID == "HOSPITAL-A" and after.PatientBirthDate == "19700102"
    assert after.Occupation == "Pilot"
    changed = {int(k, 16) for k in CHANGES}
    assert [e.tag for e in after if e.tag not in changed] == [e.tag for e in before if e.tag not in changed]
    for elem in before:
        if elem.tag not in changed:
            assert after[elem.tag].value == elem.value, elem
    if syntax != DeflatedExplicitVRLittleEndian:  # spliced: the bytes after the changes are the same bytes
        pixel_tag = b"\x7f\xe0\x00\x10" if syntax == ExplicitVRBigEndian else b"\xe0\x7f\x10\x00"
        pixel_offset = data.rindex(pixel_tag)
        assert new.endswith(data[pixel_offset:])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_where_elements_lie_agrees_with_pydicom(syntax: str) -> None:
    """The edits found from dicomcore.framing's element positions are those pydicom's element generator
    gives (the fallback), with sequences of undefined length around the changed elements."""
    ds = make_instance(make_study(random.Random(6)), 0, 1, rows=8, columns=8)
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "1", "DCM"
    ds.OtherPatientIDsSequence = pydicom.Sequence([item])  # (0010,1002), between changed elements
    ds.ProcedureCodeSequence = pydicom.Sequence([item])  # (0008,1032), after StudyDescription
    ds.file_meta.TransferSyntaxUID = syntax
    data = to_bytes(ds)
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    tags = sorted([*(int(k, 16) for k in CHANGES), 0x00081030, 0x00101001, 0x00102299])
    framed = rewrite._edits(read_file(data, rewrite.DEFER_SIZE), tags, implicit, len(data))
    spans = rewrite._generated_spans(data, implicit, little)
    assert framed == rewrite._edits_from_spans(spans, tags, len(data))


def test_rewrite_character_sets() -> None:
    umlaut = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]}}
    data, _ = _instance(ExplicitVRLittleEndian, charset=None)  # default repertoire: becomes UTF-8
    after = pydicom.dcmread(io.BytesIO(apply_changes(data, umlaut)))
    assert str(after.PatientName) == "Müller^Jürgen" and after.SpecificCharacterSet == "ISO_IR 192"
    data, _ = _instance(ExplicitVRLittleEndian, charset="ISO_IR 100")  # Latin-1 holds it
    after = pydicom.dcmread(io.BytesIO(apply_changes(data, umlaut)))
    assert str(after.PatientName) == "Müller^Jürgen" and after.SpecificCharacterSet == "ISO_IR 100"
    cyrillic = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Иванов"}]}}
    with pytest.raises(RewriteError, match="cannot be encoded in the object's character set ISO_IR 100"):
        apply_changes(data, cyrillic)
    with pytest.raises(RewriteError):
        apply_changes(b"not dicom at all" * 20, umlaut)


# ---------------------------------------------------------------------------------------------------------
# End to end


def _study_files(seed: int, series: int, per_series: int) -> tuple[str, list[bytes]]:
    spec = make_study(random.Random(seed), series_count=series)
    files = [
        to_bytes(make_instance(spec, s, n + 1, rows=32, columns=32))
        for s in range(series)
        for n in range(per_series)
    ]
    return spec.study_uid, files


async def _stow(client: httpx.AsyncClient, root: str, files: list[bytes]) -> None:
    body, content_type = multipart_body(files)
    response = await client.post(f"{root}/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


async def _bulk_update(client: httpx.AsyncClient, root: str, body: Any) -> httpx.Response:
    return await client.post(f"{root}/studies/$bulkUpdate", content=orjson.dumps(body),
                             headers={"Content-Type": "application/json"})  # fmt: skip


async def _wait(client: httpx.AsyncClient, href: str) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while True:
            response = await client.get(href)
            if response.status_code == 200:
                return response.json()
            assert response.status_code == 202, response.text
            await asyncio.sleep(0.1)


def _name(attrs: dict[str, Any]) -> str:
    return attrs["00100010"]["Value"][0]["Alphabetic"]


async def _feed(client: httpx.AsyncClient, base: str) -> list[dict[str, Any]]:
    return (
        await client.get(f"{base}/v1/changefeed", params={"limit": 1000, "includemetadata": "false"})
    ).json()


async def test_bulk_update_end_to_end(archive: RunningArchive) -> None:
    study_a, files_a = _study_files(21, 2, 3)
    study_b, files_b = _study_files(22, 1, 2)
    untouched, files_c = _study_files(23, 1, 1)
    async with httpx.AsyncClient(timeout=60) as client:
        # an extended query tag on an attribute the update inserts
        tag = await client.post(
            f"{archive.url}/extendedquerytags", json=[{"Path": "00102180", "VR": "SH", "Level": "Study"}]
        )
        assert tag.status_code == 202, tag.text
        assert (await _wait(client, tag.json()["href"]))["status"] == "succeeded"
        await _stow(client, archive.url, files_a + files_b + files_c)
        etag = (await client.get(f"{archive.url}/studies/{study_a}/metadata")).headers["etag"]
        creates = await _feed(client, archive.base)

        response = await _bulk_update(
            client, archive.url, {"studyInstanceUids": [study_a, study_b], "changeDataset": CHANGES}
        )
        assert response.status_code == 202, response.text
        reference = response.json()
        assert set(reference) == {"id", "href"} and len(reference["id"]) == 32
        assert (
            reference["href"] == f"{archive.url}/operations/{reference['id']}" == response.headers["location"]
        )
        done = await _wait(client, reference["href"])
        assert done["type"] == UPDATE and done["status"] == "succeeded" and done["percentComplete"] == 100
        assert done["results"] == {"studyUpdated": 2, "studyFailed": 0, "instanceUpdated": 8}
        assert done["resources"] == [f"{archive.url}/studies/{study_a}", f"{archive.url}/studies/{study_b}"]

        # QIDO: the new values at every level, the untouched study as it was
        studies = (await client.get(f"{archive.url}/studies", params={"PatientID": "MRN-42"})).json()
        assert sorted(s["0020000D"]["Value"][0] for s in studies) == sorted([study_a, study_b])
        assert all(_name(s) == "Merged^Patient" for s in studies)
        assert all(
            s["00201208"]["Value"] == [6 if s["0020000D"]["Value"][0] == study_a else 2] for s in studies
        )
        by_name = (await client.get(f"{archive.url}/instances", params={"PatientName": "Merged*"})).json()
        assert len(by_name) == 8
        occupation = (await client.get(f"{archive.url}/studies", params={"Occupation": "Pilot"})).json()
        assert sorted(s["0020000D"]["Value"][0] for s in occupation) == sorted([study_a, study_b])
        other = (await client.get(f"{archive.url}/studies", params={"StudyInstanceUID": untouched})).json()
        assert _name(other[0]) != "Merged^Patient"

        # WADO metadata and objects: new values; pixel data byte-equal; originals byte for byte
        metadata = (await client.get(f"{archive.url}/studies/{study_a}/metadata")).json()
        assert len(metadata) == 6 and {_name(m) for m in metadata} == {"Merged^Patient"}
        assert {m["00102180"]["Value"][0] for m in metadata} == {"Pilot"}
        assert (await client.get(f"{archive.url}/studies/{study_a}/metadata")).headers["etag"] != etag
        original_header = {"msdicom-request-original": "true"}
        originals = (
            await client.get(f"{archive.url}/studies/{study_a}/metadata", headers=original_header)
        ).json()
        assert {_name(m) for m in originals} == {str(pydicom.dcmread(io.BytesIO(files_a[0])).PatientName)}
        assert all("00102180" not in m for m in originals)
        by_sop = {str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID): f for f in files_a}
        for entry in metadata[:2]:
            series, sop = entry["0020000E"]["Value"][0], entry["00080018"]["Value"][0]
            url = f"{archive.url}/studies/{study_a}/series/{series}/instances/{sop}"
            accept = {"Accept": "application/dicom; transfer-syntax=*"}
            current = (await client.get(url, headers=accept)).content
            stored = pydicom.dcmread(io.BytesIO(current))
            before = pydicom.dcmread(io.BytesIO(by_sop[sop]))
            assert str(stored.PatientName) == "Merged^Patient" and stored.IssuerOfPatientID == "HOSPITAL-A"
            assert stored.PixelData == before.PixelData
            assert stored.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
            original = await client.get(url, headers={**accept, **original_header})
            assert original.content == by_sop[sop]
            one = await client.get(f"{url}/metadata", headers=original_header)
            assert _name(one.json()[0]) == str(before.PatientName)

        # change feed: one update per instance, in sequence order after the creates; creates now replaced
        feed = await _feed(client, archive.base)
        updates = feed[len(creates) :]
        assert [e["Action"] for e in updates] == ["update"] * 8
        assert [e["Sequence"] for e in updates] == list(range(len(creates) + 1, len(creates) + 9))
        assert {e["SopInstanceUid"] for e in updates} == {
            str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID) for f in files_a + files_b
        }
        assert all(e["State"] == "current" for e in updates)
        states = {e["SopInstanceUid"]: e["State"] for e in feed[: len(creates)]}
        assert (
            sorted(states.values()).count("replaced") == 8 and sorted(states.values()).count("current") == 1
        )
        with_metadata = (
            await client.get(f"{archive.base}/v2/changefeed", params={"includemetadata": "true"})
        ).json()
        assert {_name(e["Metadata"]) for e in with_metadata if e["Action"] == "update"} == {"Merged^Patient"}

        # a second update keeps the first version as the original and drops the intermediate one
        second = await _bulk_update(client, archive.url, {"studyInstanceUids": [study_b], "changeDataset": {
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Second^Name"}]}}})  # fmt: skip
        assert (await _wait(client, second.json()["href"]))["results"]["instanceUpdated"] == 2
        names = {_name(m) for m in (await client.get(f"{archive.url}/studies/{study_b}/metadata")).json()}
        assert names == {"Second^Name"}
        first_b = str(pydicom.dcmread(io.BytesIO(files_b[0])).PatientName)
        originals_b = (
            await client.get(f"{archive.url}/studies/{study_b}/metadata", headers=original_header)
        ).json()
        assert {_name(m) for m in originals_b} == {first_b}

        # DELETE removes both versions: rows, originals and, by the background queue, every object
        keys = await _object_keys(archive.database_url, study_a)
        assert len(keys) == 12  # six current, six originals
        assert (await client.delete(f"{archive.url}/studies/{study_a}")).status_code == 204
        assert (
            await client.get(f"{archive.url}/studies/{study_a}/metadata", headers=original_header)
        ).status_code == 404
        async with asyncio.timeout(30):
            while any([await archive.store.exists(key) for key in keys]):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        conn = await asyncpg.connect(archive.database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM instance_original") == 2  # study B's
        finally:
            await conn.close()


async def _object_keys(database_url: str, study: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT i.storage_key, o.storage_key FROM instance i JOIN study s ON s.study_key = i.study_key
               LEFT JOIN instance_original o
                   ON o.partition_key = i.partition_key AND o.sop_instance_uid = i.sop_instance_uid
               WHERE s.study_instance_uid = $1""",
            study,
        )
    finally:
        await conn.close()
    return [key for row in rows for key in row if key is not None]


async def test_requests_refused_and_unknown_studies(local_archive: RunningArchive) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        url = local_archive.url
        refused = await _bulk_update(client, url, {"studyInstanceUids": ["1.2.3"], "changeDataset": {
            "00080060": {"vr": "CS", "Value": ["MR"]}}})  # fmt: skip
        assert refused.status_code == 400
        assert "Modality (0008,0060) cannot be updated" in refused.json()["error"]["message"]
        # a NUL in a value: no DICOM text holds one, and the operation's parameters (jsonb) cannot: a 500
        nul = await _bulk_update(client, url, {"studyInstanceUids": ["1.2.3"], "changeDataset": {
            "00100020": {"vr": "LO", "Value": ["a\u0000b"]}}})  # fmt: skip
        assert (nul.status_code, nul.json()["error"]["message"]) == (
            400,
            "the body holds a NUL character (\\u0000) in a string, which nothing here can store",
        )
        malformed = await client.post(f"{url}/studies/$bulkUpdate", content=b"{not json",
                                      headers={"Content-Type": "application/json"})  # fmt: skip
        assert malformed.status_code == 400
        wrong_type = await client.post(
            f"{url}/studies/$bulkUpdate", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert wrong_type.status_code == 415
        v1 = await _bulk_update(
            client, f"{local_archive.base}/v1", {"studyInstanceUids": ["1.2.3"], "changeDataset": NEW_NAME}
        )
        assert v1.status_code == 404 and "v2" in v1.json()["error"]["message"]
        partition = await _bulk_update(
            client, f"{url}/partitions/nowhere", {"studyInstanceUids": ["1.2.3"], "changeDataset": NEW_NAME}
        )
        assert partition.status_code == 404
        # a study that does not exist: accepted and nothing to update, as in Azure (no 400)
        body = orjson.dumps({"studyInstanceUids": ["1.2.3"], "changeDataset": NEW_NAME})
        unknown = await client.post(f"{url}/studies/$bulkUpdate", content=body)
        assert unknown.status_code == 202  # without a Content-Type, as Azure accepts
        done = await _wait(client, unknown.json()["href"])
        assert done["status"] == "succeeded"
        assert done["results"] == {"studyUpdated": 1, "studyFailed": 0, "instanceUpdated": 0}


async def test_partitioned_route(local_archive: RunningArchive) -> None:
    study, files = _study_files(31, 1, 2)
    async with httpx.AsyncClient(timeout=60) as client:
        part = f"{local_archive.url}/partitions/clinic-b"
        await _stow(client, part, files)
        await _stow(client, local_archive.url, files)  # the same study in the default partition
        response = await _bulk_update(client, part, {"studyInstanceUids": [study], "changeDataset": NEW_NAME})
        assert response.status_code == 202
        assert response.json()["href"] == f"{part}/operations/{response.json()['id']}"
        done = await _wait(client, response.json()["href"])
        assert done["results"]["instanceUpdated"] == 2
        assert {_name(m) for m in (await client.get(f"{part}/studies/{study}/metadata")).json()} == {
            "Merged^Patient"
        }
        default = (await client.get(f"{local_archive.url}/studies/{study}/metadata")).json()
        assert "Merged^Patient" not in {_name(m) for m in default}


async def test_a_failed_instance_fails_its_study(local_archive: RunningArchive) -> None:
    study, files = _study_files(41, 1, 2)
    good, good_files = _study_files(42, 1, 1)
    async with httpx.AsyncClient(timeout=60) as client:
        await _stow(client, local_archive.url, files + good_files)
        # one object of the study is lost from the store (a fault no request can cause)
        conn = await asyncpg.connect(local_archive.database_url)
        try:
            key = await conn.fetchval(
                """SELECT i.storage_key FROM instance i JOIN study s USING (study_key)
                   WHERE s.study_instance_uid = $1 ORDER BY i.sop_instance_uid LIMIT 1""",
                study,
            )
        finally:
            await conn.close()
        await local_archive.store.delete(key)
        response = await _bulk_update(
            client, local_archive.url, {"studyInstanceUids": [study, good], "changeDataset": NEW_NAME}
        )
        done = await _wait(client, response.json()["href"])
    assert done["status"] == "failed"
    assert done["results"]["studyUpdated"] == 1 and done["results"]["studyFailed"] == 1
    assert done["results"]["instanceUpdated"] == 2
    assert (
        len(done["results"]["errors"]) == 1 and "the stored object is missing" in done["results"]["errors"][0]
    )


# ---------------------------------------------------------------------------------------------------------
# A crash mid-operation


class _StallingStore(LocalBlobStore):
    """Blocks make_durable of the second step until released: the step is then under way, its new objects
    written, nothing of it committed."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls = 0
        self.stalled = asyncio.Event()

    async def make_durable(self, keys: list[str]) -> None:
        self.calls += 1
        if self.calls == 2:
            self.stalled.set()
            await asyncio.Event().wait()  # until cancelled
        await super().make_durable(keys)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


async def _versions(pool: asyncpg.Pool) -> dict[str, tuple[str, bool]]:
    """SOP UID -> (name in the index metadata, whether an original is kept) of every instance."""
    rows = await pool.fetch(
        """SELECT i.sop_instance_uid, i.metadata, o.storage_key IS NOT NULL AS kept FROM instance i
           LEFT JOIN instance_original o USING (partition_key, sop_instance_uid)"""
    )
    return {r[0]: (_name(orjson.loads(r[1])), r[2]) for r in rows}


async def test_crash_mid_operation_and_resume(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    study, files = _study_files(51, 2, 4)
    async with httpx.AsyncClient(timeout=60) as client:
        await _stow(client, quiet_archive.url, files)
    async with pool.acquire() as conn:  # queued as the HL7 listener queues it
        request = parse_update_request({"studyInstanceUids": [study], "changeDataset": NEW_NAME})
        op = await create_operation(conn, UPDATE, update_params("Microsoft.Default", request), [])
    stalling = _StallingStore(tmp_path / "blobs")
    first = OperationRunner(pool, {UPDATE: UpdateHandler(stalling, batch=3)}, lease_seconds=5)
    first.start()
    async with asyncio.timeout(30):
        await stalling.stalled.wait()
    await first.stop()  # the crash: the second step is cancelled after writing its objects
    versions = await _versions(pool)
    updated = [sop for sop, (name, kept) in versions.items() if name == "Merged^Patient"]
    assert len(updated) == 3  # exactly the first step's batch; each one all new (and its original kept) ...
    assert all(versions[sop][1] for sop in updated)
    assert all(not kept for sop, (name, kept) in versions.items() if sop not in updated)  # ... or all old
    assert await pool.fetchval("SELECT count(*) FROM changefeed WHERE action = 1") == 3
    state = await pool.fetchrow("SELECT status, checkpoint FROM operation WHERE operation_id = $1", op.id)
    assert state["status"] == "running" and orjson.loads(state["checkpoint"])["instanceUpdated"] == 3
    # the cancelled step's objects are referenced by nothing: the sweeper removes exactly those
    orphans = await sweep_orphans(pool, stalling, grace=timedelta(0))
    assert orphans == 3

    second = OperationRunner(
        pool, {UPDATE: UpdateHandler(LocalBlobStore(tmp_path / "blobs"), batch=3)}, lease_seconds=5
    )
    second.start()
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            done = await _wait(client, f"{quiet_archive.url}/operations/{op.id_hex}")
    finally:
        await second.stop()
    assert done["status"] == "succeeded" and done["results"]["instanceUpdated"] == 8
    versions = await _versions(pool)
    assert len(versions) == 8 and all(v == ("Merged^Patient", True) for v in versions.values())
    updates = await pool.fetch("SELECT sop_instance_uid FROM changefeed WHERE action = 1 ORDER BY sequence")
    assert sorted(r[0] for r in updates) == sorted(versions)  # one update entry per instance
    assert await sweep_orphans(pool, stalling, grace=timedelta(0)) == 0


async def test_updates_of_one_study_apply_in_queue_order(
    pool: asyncpg.Pool, quiet_archive: RunningArchive, tmp_path: Path
) -> None:
    study, files = _study_files(61, 1, 3)
    async with httpx.AsyncClient(timeout=60) as client:
        await _stow(client, quiet_archive.url, files)
    ops = []
    async with pool.acquire() as conn:
        for name in ("First^Name", "Second^Name"):
            request = parse_update_request({"studyInstanceUids": [study], "changeDataset": {
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]}}})  # fmt: skip
            ops.append(await create_operation(conn, UPDATE, update_params("Microsoft.Default", request), []))
    # the newer one is run first (by a second worker): it waits for the older one, which then runs
    store: BlobStore = LocalBlobStore(tmp_path / "blobs")
    runner = OperationRunner(pool, {UPDATE: UpdateHandler(store, batch=2)}, lease_seconds=5)
    await pool.execute(
        "UPDATE operation SET leased_until = now() + interval '1 hour' WHERE operation_id = $1", ops[0].id
    )
    runner.start()
    await asyncio.sleep(1.5)
    assert (
        await pool.fetchval("SELECT status FROM operation WHERE operation_id = $1", ops[1].id) != "succeeded"
    )
    assert {name for name, _ in (await _versions(pool)).values()} != {"Second^Name"}
    await pool.execute("UPDATE operation SET leased_until = NULL WHERE operation_id = $1", ops[0].id)
    runner.poke()
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            for op in ops:
                assert (await _wait(client, f"{quiet_archive.url}/operations/{op.id_hex}"))[
                    "status"
                ] == "succeeded"
    finally:
        await runner.stop()
    assert {name for name, _ in (await _versions(pool)).values()} == {"Second^Name"}


async def test_fhir_projection_follows_the_update(
    local_archive: RunningArchive, fhir_server: RunningFhir
) -> None:
    spec = make_study(random.Random(71), series_count=1)
    series0 = make_files(spec, 0, [1, 2])
    await fhir_stow(local_archive, series0)
    sync = Sync(local_archive, fhir_server)
    assert await sync.run() == {"updated": 1, "unchanged": 0, "deleted": 0}
    changes = {
        "00100020": {"vr": "LO", "Value": ["MRN-77"]},
        "00080050": {"vr": "SH", "Value": ["ACC-NEW"]},
        "00081030": {"vr": "LO", "Value": ["CT CHEST CORRECTED"]},
    }
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"studyInstanceUids": [spec.study_uid], "changeDataset": changes}
        response = await _bulk_update(client, local_archive.url, body)
        assert (await _wait(client, response.json()["href"]))["status"] == "succeeded"
    assert await sync.run() == {"updated": 1, "unchanged": 0, "deleted": 0}  # two update entries, one rebuild
    (study,) = fhir_server.store.of_type("ImagingStudy")
    assert study["identifier"][1]["value"] == "ACC-NEW" and study["description"] == "CT CHEST CORRECTED"
    patient_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"Patient|{DEFAULT_PATIENT_SYSTEM}|MRN-77"))
    assert study["subject"] == {"reference": f"Patient/{patient_id}"}
    assert [len(s["instance"]) for s in study["series"]] == [2]
