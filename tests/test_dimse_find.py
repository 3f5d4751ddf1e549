"""C-FIND SCP (Patient Root, Study Root): the QIDO compiler's matching over DIMSE, hierarchical rules,
refusals, C-CANCEL, and DCMTK findscu as a third-party peer."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

from bench.synthetic import StudySpec, make_instance, make_study, multipart_body, to_bytes
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive, start_dimse_archive

# --- the fixed data set ------------------------------------------------------------------------------------


def spec(seed: int, **fields: str) -> StudySpec:
    made = make_study(random.Random(seed), series_count=2, modalities=["CT", "MR"])
    return dataclasses.replace(made, referring="Welby^Marcus", **fields)


SPECS = [
    spec(1, patient_id="P1", patient_name="Doe^John", study_date="20200101", study_time="083000",
         accession="ACC1", description="HEAD ROUTINE"),
    spec(2, patient_id="P1", patient_name="Doe^John", study_date="20210615", study_time="140000",
         accession="ACC2", description="CHEST W/O CONTRAST"),
    spec(3, patient_id="P2", patient_name="Müller^Zoë", study_date="20220301", study_time="101500",
         accession="ACC3", description="KNEE LEFT"),
    spec(4, patient_id="P3", patient_name="Smith^Anna", study_date="20191231", study_time="235959",
         accession="ACC4", description="HEAD ROUTINE"),
]  # fmt: skip
INSTANCES_PER_SERIES = 2


def instances(specs: list[StudySpec], per_series: int = INSTANCES_PER_SERIES) -> Iterator[Dataset]:
    for s in specs:
        for series in range(len(s.series)):
            for n in range(per_series):
                series_uid = s.series[series][0]
                ds = make_instance(s, series, n + 1, rows=8, columns=8, sop_uid=f"{series_uid}.{n + 1}")
                if s.patient_id == "P3":
                    ds.ProcedureCodeSequence = [code("P3-CODE", "Procedure of P3")]
                yield ds


def code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99TEST", meaning
    return item


def stow(archive: DimseArchive, datasets: list[Dataset]) -> None:
    body, content_type = multipart_body([to_bytes(ds) for ds in datasets])
    response = httpx.post(f"{archive.http.url}/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


@pytest.fixture
def loaded(open_dimse_archive: DimseArchive) -> DimseArchive:
    stow(open_dimse_archive, list(instances(SPECS)))
    return open_dimse_archive


# --- the peer's side ---------------------------------------------------------------------------------------


def associate(archive: DimseArchive, calling: str = "SCANNER"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(PATIENT_ROOT)
    ae.add_requested_context(STUDY_ROOT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(*archive.address, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    return assoc


def identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(
    archive: DimseArchive, query: Dataset, model: str = STUDY_ROOT, calling: str = "SCANNER"
) -> tuple[list[int], list[Dataset], Dataset]:
    """Pending statuses, their identifiers, and the final status dataset."""
    assoc = associate(archive, calling)
    try:
        statuses, found = [], []
        for status, ds in assoc.send_c_find(query, model):
            assert status is not None, "no response"
            if status.Status in (0xFF00, 0xFF01):
                statuses.append(status.Status)
                found.append(ds)
            else:
                return statuses, found, status
        raise AssertionError("no final status")
    finally:
        assoc.release()


def uids(found: list[Dataset], keyword: str) -> set[str]:
    return {str(getattr(ds, keyword)) for ds in found}


def study_uids(*indexes: int) -> set[str]:
    return {SPECS[i].study_uid for i in indexes}


# --- levels and matching ----------------------------------------------------------------------------------


def test_study_level_exact_results_and_keys(loaded: DimseArchive) -> None:
    query = identifier(
        "STUDY", PatientID="P1", StudyInstanceUID="", PatientName="", StudyDate="", AccessionNumber="",
        ModalitiesInStudy="", NumberOfStudyRelatedInstances="", RetrieveAETitle="", InstanceAvailability="",
        ReferringPhysicianName="", StudyComments="",
    )  # fmt: skip
    statuses, found, final = c_find(loaded, query)
    assert final.Status == 0 and set(statuses) == {0xFF00}
    by_uid = {ds.StudyInstanceUID: ds for ds in found}
    assert set(by_uid) == study_uids(0, 1)
    ds = by_uid[SPECS[0].study_uid]
    assert [e.keyword for e in ds] == [
        "StudyDate", "AccessionNumber", "QueryRetrieveLevel", "RetrieveAETitle", "InstanceAvailability",
        "ModalitiesInStudy", "ReferringPhysicianName", "PatientName", "PatientID", "StudyInstanceUID",
        "NumberOfStudyRelatedInstances", "StudyComments",
    ]  # fmt: skip
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.StudyDate == "20200101" and ds.AccessionNumber == "ACC1" and ds.PatientName == "Doe^John"
    assert ds.RetrieveAETitle == ARCHIVE_AE and ds.InstanceAvailability == "ONLINE"
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert ds.NumberOfStudyRelatedInstances == 4
    assert ds.StudyComments == ""  # requested, not in the data: present, zero-length
    assert "SpecificCharacterSet" not in ds  # ASCII only


def test_wildcards_ranges_lists_and_person_names(loaded: DimseArchive) -> None:
    def found(**keys: object) -> set[str]:
        _, results, final = c_find(loaded, identifier("STUDY", **{"StudyInstanceUID": "", **keys}))
        assert final.Status == 0, final
        return uids(results, "StudyInstanceUID")

    assert found(PatientID="P*") == study_uids(0, 1, 2, 3)
    assert found(PatientID="P?") == study_uids(0, 1, 2, 3)
    assert found(StudyDescription="HEAD*") == study_uids(0, 3)
    assert found(StudyDate="20200101-20211231") == study_uids(0, 1)
    assert found(StudyDate="-20200101") == study_uids(0, 3)
    assert found(StudyDate="20220101-") == study_uids(2)
    assert found(StudyDate="20200101", StudyTime="0800-0900") == study_uids(0)
    assert found(StudyInstanceUID=[SPECS[1].study_uid, SPECS[3].study_uid]) == study_uids(1, 3)
    assert found(AccessionNumber="ACC1\\ACC3") == study_uids(0, 2)
    assert found(PatientName="Doe^John") == study_uids(0, 1)
    assert found(PatientName="doe^j*") == study_uids(0, 1)  # literal PN matching is case-insensitive
    assert found(PatientName="Müller^*") == study_uids(2)
    with_mr = {i for i, s in enumerate(SPECS) if any(m == "MR" for _, m, _ in s.series)}
    assert found(ModalitiesInStudy="MR") == study_uids(*with_mr)
    assert found(ModalitiesInStudy="CT\\MR") == study_uids(0, 1, 2, 3)
    assert found(PatientID="NOBODY") == set()


def test_non_ascii_values_come_back_in_utf8(loaded: DimseArchive) -> None:
    query = identifier("STUDY", PatientName="", PatientID="P2", SpecificCharacterSet="ISO_IR 192")
    _, found, final = c_find(loaded, query)
    assert final.Status == 0 and len(found) == 1
    assert found[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(found[0].PatientName) == "Müller^Zoë"


def test_latin1_request_is_decoded_before_matching(loaded: DimseArchive) -> None:
    query = identifier("STUDY", SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Zoë", PatientID="")
    _, found, final = c_find(loaded, query)
    assert final.Status == 0 and uids(found, "PatientID") == {"P2"}
    query = identifier("STUDY", SpecificCharacterSet="ISO_IR 100", PatientName="Mueller^*", PatientID="")
    assert c_find(loaded, query)[1] == []


def test_series_and_image_levels_in_study_root(loaded: DimseArchive) -> None:
    s = SPECS[0]
    query = identifier(
        "SERIES",
        StudyInstanceUID=s.study_uid,
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
        NumberOfSeriesRelatedInstances="",
    )
    statuses, found, final = c_find(loaded, query)
    assert final.Status == 0 and statuses == [0xFF00, 0xFF00]
    assert [(ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber) for ds in found] == [
        (uid, modality, number) for uid, modality, number in s.series
    ]
    assert all(ds.StudyInstanceUID == s.study_uid and ds.NumberOfSeriesRelatedInstances == 2 for ds in found)
    assert [e.keyword for e in found[0]] == [
        "QueryRetrieveLevel", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ]  # fmt: skip
    _, found, _ = c_find(
        loaded, identifier("SERIES", StudyInstanceUID=s.study_uid, Modality="MR", SeriesInstanceUID="")
    )
    assert uids(found, "SeriesInstanceUID") == {u for u, m, _ in s.series if m == "MR"}

    series_uid = s.series[1][0]
    query = identifier(
        "IMAGE",
        StudyInstanceUID=s.study_uid,
        SeriesInstanceUID=series_uid,
        SOPInstanceUID="",
        InstanceNumber="",
        SOPClassUID="",
        Rows=None,
    )
    _, found, final = c_find(loaded, query)
    assert final.Status == 0
    assert [ds.InstanceNumber for ds in found] == [1, 2]
    expected = {ds.SOPInstanceUID for ds in instances([s]) if ds.SeriesInstanceUID == series_uid}
    assert uids(found, "SOPInstanceUID") == expected
    assert all(ds.Rows == 8 and ds.SeriesInstanceUID == series_uid for ds in found)
    _, found, _ = c_find(
        loaded,
        identifier(
            "IMAGE",
            StudyInstanceUID=s.study_uid,
            SeriesInstanceUID=series_uid,
            InstanceNumber="2",
            SOPInstanceUID="",
        ),
    )
    assert len(found) == 1 and found[0].InstanceNumber == 2


def test_patient_root_levels(loaded: DimseArchive) -> None:
    query = identifier(
        "PATIENT",
        PatientID="",
        PatientName="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
        StudyDate="",
    )
    _, found, final = c_find(loaded, query, PATIENT_ROOT)
    assert final.Status == 0
    by_id = {ds.PatientID: ds for ds in found}
    assert sorted(by_id) == ["P1", "P2", "P3"]
    p1 = by_id["P1"]
    assert p1.PatientName == "Doe^John" and p1.StudyDate == ""  # not a patient attribute: zero-length
    assert (p1.NumberOfPatientRelatedStudies, p1.NumberOfPatientRelatedSeries,
            p1.NumberOfPatientRelatedInstances) == (2, 4, 8)  # fmt: skip
    assert by_id["P2"].NumberOfPatientRelatedStudies == 1
    assert by_id["P2"].SpecificCharacterSet == "ISO_IR 192" and "SpecificCharacterSet" not in p1
    _, found, _ = c_find(loaded, identifier("PATIENT", PatientName="Doe*", PatientID=""), PATIENT_ROOT)
    assert uids(found, "PatientID") == {"P1"}

    _, found, final = c_find(
        loaded,
        identifier("STUDY", PatientID="P1", StudyInstanceUID="", StudyDate="20210101-20211231"),
        PATIENT_ROOT,
    )
    assert final.Status == 0 and uids(found, "StudyInstanceUID") == study_uids(1)
    s = SPECS[2]
    _, found, _ = c_find(
        loaded,
        identifier("SERIES", PatientID="P2", StudyInstanceUID=s.study_uid, SeriesInstanceUID=""),
        PATIENT_ROOT,
    )
    assert uids(found, "SeriesInstanceUID") == {u for u, _, _ in s.series}
    # the patient must be the study's: another PatientID matches nothing
    _, found, _ = c_find(
        loaded,
        identifier("SERIES", PatientID="P1", StudyInstanceUID=s.study_uid, SeriesInstanceUID=""),
        PATIENT_ROOT,
    )
    assert found == []
    _, found, _ = c_find(
        loaded,
        identifier(
            "IMAGE",
            PatientID="P2",
            StudyInstanceUID=s.study_uid,
            SeriesInstanceUID=s.series[0][0],
            SOPInstanceUID="",
        ),
        PATIENT_ROOT,
    )
    assert len(found) == INSTANCES_PER_SERIES


def test_sequence_keys_are_returned_not_matched(loaded: DimseArchive) -> None:
    item = Dataset()
    item.CodeValue = ""
    item.CodingSchemeVersion = ""
    query = identifier(
        "STUDY", PatientID="P*", StudyInstanceUID="", ReferencedStudySequence=[], ProcedureCodeSequence=[item]
    )
    statuses, found, final = c_find(loaded, query)
    assert final.Status == 0 and set(statuses) == {0xFF00} and len(found) == 4
    p3 = next(ds for ds in found if ds.StudyInstanceUID == SPECS[3].study_uid)
    # each returned item holds the request item's keys only, zero-length where the stored item lacks one
    assert [[(e.keyword, e.value) for e in i] for i in p3.ProcedureCodeSequence] == [
        [("CodeValue", "P3-CODE"), ("CodingSchemeVersion", "")]
    ]
    assert len(p3.ReferencedStudySequence) == 0  # requested, not in the data: zero-length
    assert all(len(ds.ProcedureCodeSequence) == 0 for ds in found if ds is not p3)
    # an empty request sequence returns the stored items whole
    query.ProcedureCodeSequence = []
    _, found, _ = c_find(loaded, query)
    p3 = next(ds for ds in found if ds.StudyInstanceUID == SPECS[3].study_uid)
    assert p3.ProcedureCodeSequence == [code("P3-CODE", "Procedure of P3")]
    item.CodeValue = "XYZ"  # a value in a sequence item is not matched: a warning says so
    query.ProcedureCodeSequence = [item]
    statuses, found, final = c_find(loaded, query)
    assert final.Status == 0 and set(statuses) == {0xFF01} and len(found) == 4


def test_unsupported_optional_key_is_not_matched_and_warned(loaded: DimseArchive) -> None:
    """PatientAge has no index: its value is not matched (all of P1's studies), the responses say 0xFF01."""
    query = identifier("STUDY", PatientID="P1", StudyInstanceUID="", PatientAge="099Y")
    statuses, found, final = c_find(loaded, query)
    assert final.Status == 0 and statuses == [0xFF01, 0xFF01]
    assert uids(found, "StudyInstanceUID") == study_uids(0, 1)
    assert {ds.PatientAge for ds in found} == {"045Y"}  # the entity's own value
    # a private element, even sent in implicit VR (UN), is a key like any other: returned, not matched
    query = identifier("STUDY", PatientID="P2", StudyInstanceUID="")
    query.add_new(0x00090010, "LO", "SOME CREATOR")
    query.add_new(0x00091001, "UN", b"AB")
    statuses, found, final = c_find(loaded, query)
    assert final.Status == 0 and statuses == [0xFF01]
    assert found[0][0x00090010].value == "" and found[0][0x00091001].value in (b"", None)


# --- extended query tags -------------------------------------------------------------------------------


def test_extended_query_tag_as_a_key(loaded: DimseArchive) -> None:
    # the synthetic data share one ProtocolName per study description; make it a query key
    with httpx.Client(base_url=loaded.http.url) as client:
        response = client.post("/extendedquerytags", json=[{"Path": "ProtocolName", "Level": "Study"}])
        assert response.status_code == 202, response.text
        href = response.json()["href"]
        for _ in range(300):
            operation = client.get(href)
            if operation.status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert operation.json()["status"] == "succeeded", operation.text
    statuses, found, final = c_find(loaded, identifier("STUDY", StudyInstanceUID="", ProtocolName="HEAD*"))
    assert final.Status == 0 and set(statuses) == {0xFF00}
    assert uids(found, "StudyInstanceUID") == study_uids(0, 3)
    s = SPECS[2]
    _, found, _ = c_find(
        loaded,
        identifier("SERIES", StudyInstanceUID=s.study_uid, SeriesInstanceUID="", ProtocolName="KNEE LEFT"),
    )
    assert uids(found, "SeriesInstanceUID") == {u for u, _, _ in s.series}
    assert {ds.ProtocolName for ds in found} == {"KNEE LEFT"}


# --- refusals ------------------------------------------------------------------------------------------


_STUDY, _SERIES, _DATE, _SOP = 0x0020000D, 0x0020000E, 0x00080020, 0x00080018
_LEVEL, _PATIENT = 0x00080052, 0x00100020
REFUSED = [  # (model, identifier, offending element, error comment)
    (STUDY_ROOT, identifier("SERIES", SeriesInstanceUID=""), _STUDY, "StudyInstanceUID is required"),
    (STUDY_ROOT, identifier("SERIES", StudyInstanceUID="1.2.3\\1.2.4"), _STUDY, "StudyInstanceUID must be"),
    (STUDY_ROOT, identifier("SERIES", StudyInstanceUID="1.2.*"), _STUDY, "StudyInstanceUID must be"),
    (STUDY_ROOT, identifier("IMAGE", StudyInstanceUID="1.2.3"), _SERIES, "SeriesInstanceUID is required"),
    (STUDY_ROOT, identifier("PATIENT", PatientID=""), _LEVEL, "QueryRetrieveLevel 'PATIENT'"),
    (STUDY_ROOT, identifier("WHATEVER"), _LEVEL, "QueryRetrieveLevel 'WHATEVER'"),
    (PATIENT_ROOT, identifier("STUDY", StudyInstanceUID=""), _PATIENT, "PatientID is required"),
    (PATIENT_ROOT, identifier("STUDY", PatientID="P*"), _PATIENT, "PatientID must be a single"),
    (PATIENT_ROOT, identifier("PATIENT", StudyDate="2020"), _DATE, "StudyDate is not a key of the PAT"),
    (STUDY_ROOT, identifier("STUDY", StudyDate="2020"), _DATE, "00080020: '2020' is not a date"),
    (STUDY_ROOT, identifier("STUDY", SOPInstanceUID="1.2.3"), _SOP, "00080018: not a matching key"),
]


def test_malformed_identifiers_are_refused(open_dimse_archive: DimseArchive) -> None:
    """0xA900 (Identifier does not match SOP class), the reason as ErrorComment and the Offending Element."""
    for model, query, offending, comment in REFUSED:
        statuses, _, final = c_find(open_dimse_archive, query, model)
        assert (statuses, final.Status, final.OffendingElement) == ([], 0xA900, offending), query
        assert final.ErrorComment.startswith(comment), final.ErrorComment


def test_missing_query_retrieve_level_is_refused(open_dimse_archive: DimseArchive) -> None:
    query = Dataset()
    query.PatientID = "P1"
    _, _, final = c_find(open_dimse_archive, query)
    assert final.Status == 0xA900 and final.ErrorComment.startswith("QueryRetrieveLevel is missing")
    assert final.OffendingElement == 0x00080052


def test_an_error_comment_is_one_value(open_dimse_archive: DimseArchive) -> None:
    """Error Comment is LO, VM 1: a backslash from the request's value (here a multi-valued level) would
    split it into two values, and a peer reading one saw "QueryRetrieveLevel 'STUDY"."""
    _, _, final = c_find(open_dimse_archive, identifier("STUDY\\SERIES"))
    assert final.Status == 0xA900
    assert final["ErrorComment"].VM == 1
    assert final.ErrorComment.startswith("QueryRetrieveLevel 'STUDY/SERIES' is not one of")


async def test_ae_without_find_is_refused_and_every_find_audited(dimse_archive: DimseArchive) -> None:
    await dimse_archive.register("MODALITY", services=["store"])
    await dimse_archive.register("VIEWER", services=["find"])
    query = identifier("STUDY", StudyInstanceUID="")
    statuses, _, final = await asyncio.to_thread(c_find, dimse_archive, query, STUDY_ROOT, "MODALITY")
    assert (statuses, final.Status) == ([], 0x0124)
    uid = "1.2.826.0.1.3680043.10.1234.7.7"
    query = identifier("SERIES", StudyInstanceUID=uid, SeriesInstanceUID="")
    statuses, _, final = await asyncio.to_thread(c_find, dimse_archive, query, STUDY_ROOT, "VIEWER")
    assert (statuses, final.Status) == ([], 0)
    conn = await asyncpg.connect(dimse_archive.http.database_url)
    try:
        for _ in range(50):
            rows = await conn.fetch(
                "SELECT * FROM audit_event WHERE action = 'dimse' AND path = 'C-FIND' ORDER BY event_id"
            )
            if len(rows) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert [(r["subject"], r["status"], r["action_code"]) for r in rows] == [
        ("ae:MODALITY", 0x0124, "R"),
        ("ae:VIEWER", 0, "R"),
    ]
    assert rows[1]["detail"] == "SERIES: 0 matches" and rows[1]["study_uid"] == uid


# --- C-CANCEL ---------------------------------------------------------------------------------------------


def test_cancel_ends_with_fe00(database_url: str, tmp_path: Path) -> None:
    thread, archive = start_dimse_archive(database_url, tmp_path, insecure_open=True)
    try:
        thread.config.app.state.dimse.gateway.find_page_size = 5  # many small pages
        many = make_study(random.Random(9), series_count=1)
        stow(archive, [make_instance(many, 0, n + 1, rows=8, columns=8) for n in range(150)])
        assoc = associate(archive)
        try:
            query = identifier(
                "IMAGE",
                StudyInstanceUID=many.study_uid,
                SeriesInstanceUID=many.series[0][0],
                SOPInstanceUID="",
            )
            responses = assoc.send_c_find(query, STUDY_ROOT, msg_id=7)
            pending = 0
            for status, _ in responses:
                if status.Status != 0xFF00:
                    break
                pending += 1
                if pending == 1:
                    assoc.send_c_cancel(7, query_model=STUDY_ROOT)
            assert status.Status == 0xFE00
            assert 1 <= pending < 150
            # the association goes on
            _, found, final = _find_on(assoc, identifier("STUDY", StudyInstanceUID=many.study_uid))
            assert final.Status == 0 and len(found) == 1
        finally:
            assoc.release()
    finally:
        thread.stop()


def _find_on(assoc, query: Dataset) -> tuple[list[int], list[Dataset], Dataset]:
    statuses, found = [], []
    for status, ds in assoc.send_c_find(query, STUDY_ROOT):
        if status.Status in (0xFF00, 0xFF01):
            statuses.append(status.Status)
            found.append(ds)
        else:
            return statuses, found, status
    raise AssertionError("no final status")


# --- C-FIND and QIDO agree ------------------------------------------------------------------------------

_VOCABULARY = {
    "PatientID": ["P1", "P2", "P3", "P*", "P?", "X*"],
    "PatientName": ["Doe^John", "doe*", "Müller^Zoë", "S*", "*a*"],
    "StudyDate": ["20200101", "20200101-20211231", "-20200101", "20220101-", "20191231-20200101"],
    "StudyTime": ["0800-1200", "-1000", "1400-"],
    "AccessionNumber": ["ACC1", "ACC?", "ACC1\\ACC4", "ACC3"],
    "StudyDescription": ["HEAD*", "KNEE LEFT", "*CONTRAST"],
    "ModalitiesInStudy": ["CT", "MR", "CT\\US"],
    "StudyInstanceUID": [SPECS[0].study_uid, f"{SPECS[1].study_uid}\\{SPECS[2].study_uid}"],
}


_SERIES_VOCABULARY = {
    "Modality": ["CT", "MR", "C*", "CT\\MR"],
    "SeriesNumber": ["1", "2", "1\\2"],
    "SeriesDescription": ["HEAD*", "*SERIES 2", "KNEE LEFT SERIES 1"],
    "PatientName": ["doe*", "*a*"],
    "StudyDate": ["20200101-20211231", "-20200101"],
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.dictionaries(st.sampled_from(sorted(_VOCABULARY)), st.integers(0, 9), max_size=3),
    series_keys=st.dictionaries(st.sampled_from(sorted(_SERIES_VOCABULARY)), st.integers(0, 9), max_size=2),
    series_of=st.none() | st.integers(0, len(SPECS) - 1),
)
def test_c_find_matches_what_qido_answers(
    loaded: DimseArchive, keys: dict[str, int], series_keys: dict[str, int], series_of: int | None
) -> None:
    """The same keys give the same UIDs at /studies and at STUDY level, at /studies/{uid}/series and at
    SERIES level."""
    if series_of is None:
        pairs = {k: _VOCABULARY[k][n % len(_VOCABULARY[k])] for k, n in keys.items()}
        query = identifier("STUDY", SpecificCharacterSet="ISO_IR 192", StudyInstanceUID="")
        url, unique = f"{loaded.http.url}/studies", "StudyInstanceUID"
    else:
        pairs = {k: _SERIES_VOCABULARY[k][n % len(_SERIES_VOCABULARY[k])] for k, n in series_keys.items()}
        study = SPECS[series_of].study_uid
        query = identifier("SERIES", SpecificCharacterSet="ISO_IR 192", StudyInstanceUID=study)
        query.SeriesInstanceUID = ""
        url, unique = f"{loaded.http.url}/studies/{study}/series", "SeriesInstanceUID"
    for keyword, value in pairs.items():
        setattr(query, keyword, value)
    _, found, final = c_find(loaded, query)
    assert final.Status == 0, final
    answer = httpx.get(url, params=[*pairs.items(), ("limit", "1000")])
    assert answer.status_code in (200, 204), answer.text
    tag = "0020000D" if unique == "StudyInstanceUID" else "0020000E"
    expected = {r[tag]["Value"][0] for r in answer.json()} if answer.content else set()
    assert uids(found, unique) == expected


# --- DCMTK findscu --------------------------------------------------------------------------------------


def test_dcmtk_findscu(loaded: DimseArchive, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    command = [
        "findscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=P1", "-k", "StudyInstanceUID",
        "-k", "StudyDate", "-k", "PatientName", "-aet", "SCANNER", "-aec", ARCHIVE_AE, "-X", "-od", str(out),
        *map(str, loaded.address),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    files = sorted(out.iterdir())
    found = [pydicom.dcmread(f) for f in files]
    assert {(ds.StudyInstanceUID, ds.StudyDate, str(ds.PatientName)) for ds in found} == {
        (SPECS[0].study_uid, "20200101", "Doe^John"),
        (SPECS[1].study_uid, "20210615", "Doe^John"),
    }
    # and the image level of one series, in the Patient Root model
    s = SPECS[1]
    for f in files:
        f.unlink()
    command = [
        "findscu", "-P", "-k", "QueryRetrieveLevel=IMAGE", "-k", "PatientID=P1", "-k",
        f"StudyInstanceUID={s.study_uid}", "-k", f"SeriesInstanceUID={s.series[0][0]}",
        "-k", "SOPInstanceUID", "-aet", "SCANNER", "-aec", ARCHIVE_AE, "-X", "-od", str(out),
        *map(str, loaded.address),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = [pydicom.dcmread(f) for f in sorted(out.iterdir())]
    expected = {ds.SOPInstanceUID for ds in instances([s]) if ds.SeriesInstanceUID == s.series[0][0]}
    assert {ds.SOPInstanceUID for ds in found} == expected
