"""C-FIND matches built already encoded (dimse.raw_identifiers) must be byte for byte what pydicom's encoding
of the same response identifier gives, in both little-endian encodings, whatever the values."""

from __future__ import annotations

import pynetdicom.service_class
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode as pydicom_encode

import dimse.server  # noqa: F401  (installs the encoder hook as the listener does)
from dicomcore.tags import tag_hex
from dimse.identifiers import STUDY_ROOT, FindRequest, read_identifier, response_identifier
from dimse.raw_identifiers import EncodedIdentifier

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on the random values

# requested keys: (keyword, VR) of every kind the fast path handles, and some it leaves to pydicom
KEYS = {
    "StudyDate": "DA", "StudyTime": "TM", "AccessionNumber": "SH", "ModalitiesInStudy": "CS",
    "ReferringPhysicianName": "PN", "PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA",
    "PatientSex": "CS", "StudyID": "SH", "StudyInstanceUID": "UI", "StudyDescription": "LO",
    "NumberOfStudyRelatedSeries": "IS", "NumberOfStudyRelatedInstances": "IS", "RetrieveAETitle": "AE",
    "InstanceAvailability": "CS", "AdditionalPatientHistory": "LT", "InstitutionAddress": "ST",
}  # fmt: skip
TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters="\\", exclude_categories=("Cs", "Cc")), max_size=20
)
ASCII = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"), max_size=16)


def element(vr: str) -> st.SearchStrategy[dict]:
    if vr == "PN":
        group = st.fixed_dictionaries(
            {}, optional={"Alphabetic": TEXT, "Ideographic": TEXT, "Phonetic": TEXT}
        )
        values = st.lists(st.one_of(group, st.none()), min_size=0, max_size=3)
    elif vr == "IS":
        values = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3)
    elif vr in ("DA", "TM", "CS", "UI", "AE"):
        values = st.lists(st.one_of(ASCII, st.none()), max_size=3)
    else:
        values = st.lists(st.one_of(TEXT, st.none()), max_size=3)
    return st.builds(lambda v: {"vr": vr, "Value": v} if v else {"vr": vr}, values)


results = st.fixed_dictionaries(
    {}, optional={tag_hex(tag_for_keyword(k)): element(vr) for k, vr in KEYS.items()}
)


def request(keys: list[str]) -> FindRequest:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in keys:
        setattr(ds, keyword, "")
    return read_identifier(STUDY_ROOT, ds, {})


def both(req: FindRequest, result: dict, implicit: bool) -> tuple[bytes | None, bytes | None, Dataset]:
    reference = pydicom_encode(response_identifier(req, result, "DICOMWEB"), implicit, True)
    fast = response_identifier(req, result, "DICOMWEB", implicit=implicit)
    return pynetdicom.service_class.encode(fast, implicit, True), reference, fast


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.sampled_from(sorted(KEYS)), min_size=1, unique=True),
    result=results,
    implicit=st.booleans(),
)
def test_the_same_bytes_as_pydicom(keys: list[str], result: dict, implicit: bool) -> None:
    got, expected, fast = both(request(keys), result, implicit)
    # a PN group holding "=" (never so in stored metadata, which splits groups at it) is pydicom's to encode
    assert isinstance(fast, EncodedIdentifier) or "=" in repr(result)
    assert got == expected
    # its elements are the identifier too: pydicom encodes them in the other forms as it encodes its own
    reference = response_identifier(request(keys), result, "DICOMWEB")
    for other, little in ((not implicit, True), (False, False)):
        assert pydicom_encode(fast, other, little) == pydicom_encode(reference, other, little)
    assert [(e.tag, e.VR) for e in fast] == [(e.tag, e.VR) for e in reference]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientWeight", {"vr": "DS", "Value": [70.5]}),  # decimal strings: pydicom formats them
        ("OtherPatientIDsSequence", {"vr": "SQ", "Value": [{"00100020": {"vr": "LO", "Value": ["X"]}}]}),
        ("NumberOfStudyRelatedInstances", {"vr": "IS", "Value": ["12"]}),  # IS given as a string
        ("ReferringPhysicianName", {"vr": "PN", "Value": [{"Alphabetic": "="}]}),  # pydicom writes it empty
    ],
)
def test_other_values_take_pydicoms_path(keyword: str, value: dict) -> None:
    req = request(["StudyInstanceUID", keyword])
    result = {tag_hex(tag_for_keyword(keyword)): value, "0020000D": {"vr": "UI", "Value": ["1.2.3"]}}
    got, expected, fast = both(req, result, implicit=False)
    assert not isinstance(fast, EncodedIdentifier)
    assert got == expected


def test_other_contexts_are_encoded_by_pydicom() -> None:
    """An identifier built for one encoding and sent in another (big endian, deflated, the other VR form)."""
    req = request(["PatientName", "StudyDate"])
    result = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^B"}]}}
    fast = response_identifier(req, result, "X", implicit=False)
    assert isinstance(fast, EncodedIdentifier)
    reference = response_identifier(req, result, "X")
    for implicit, little, deflated in ((False, False, False), (False, True, True), (True, True, False)):
        sent = pynetdicom.service_class.encode(fast, implicit, little, deflated)
        assert sent == pydicom_encode(reference, implicit, little, deflated)
