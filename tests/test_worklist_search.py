"""Search Workitems (PS3.18 11.9): QIDO matching rules over work items, against a real server."""

from __future__ import annotations

import datetime as dt

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomcore.uids import new_uid
from tests.fixtures.server import RunningArchive
from tests.worklist_data import code, ups_archive, workitem

__all__ = ["ups_archive"]

JSON = {"Content-Type": "application/dicom+json"}


def uids(response: httpx.Response) -> list[str]:
    if response.status_code == 204:
        return []
    assert response.status_code in (200, 206), response.text
    return [item["00080018"]["Value"][0] for item in response.json()]


@pytest.fixture
def http(ups_archive: RunningArchive):
    with httpx.Client(base_url=ups_archive.url, timeout=30) as c:
        yield c


def create(http: httpx.Client, ds: dict) -> str:
    uid = new_uid()
    response = http.post(f"/workitems?{uid}", content=orjson.dumps(ds), headers=JSON)
    assert response.status_code == 201, response.text
    return uid


def test_matching_rules(http: httpx.Client) -> None:
    a = create(
        http, workitem(station="CT1", start="20261123080000", patient_name="Müller^Hans", label="Lung AI")
    )
    b = create(
        http, workitem(station="CT2", start="20261123120000", patient_name="Doe^Jane", label="Liver AI")
    )
    c = create(http, workitem(station=None, start="20261124080000", patient_id="PAT-9", label="Report"))
    # d: station code CT1 in another coding scheme, in the same item as a CT2 meaning
    ds = workitem(station=None, start="20261125080000")
    ds["00404025"] = {"vr": "SQ", "Value": [code("CT1", "other", "OTHER"), code("CT2", "Station CT2")]}
    d = create(http, ds)

    def find(**params: str) -> list[str]:
        return uids(http.get("/workitems", params=params))

    assert find() == [a, b, c, d]  # ordered by scheduled start
    assert find(ProcedureStepState="SCHEDULED") == [a, b, c, d]
    assert find(ProcedureStepState="IN PROGRESS") == []
    # sequence matching: both keys must match within one item
    assert find(**{"ScheduledStationNameCodeSequence.CodeValue": "CT1"}) == [a, d]
    # one-station items and several-station items are merged in order, page by page
    station_ct1 = {"ScheduledStationNameCodeSequence.CodeValue": "CT1", "ProcedureStepState": "SCHEDULED"}
    assert find(**station_ct1, limit="1") == [a]
    assert find(**station_ct1, limit="1", offset="1") == [d]
    assert find(**station_ct1, limit="1", offset="2") == []
    assert find(**{"ScheduledStationNameCodeSequence.CodeValue": "CT2"}) == [b, d]
    assert find(
        **{
            "ScheduledStationNameCodeSequence.CodeValue": "CT1",
            "ScheduledStationNameCodeSequence.CodingSchemeDesignator": "99LOCAL",
        }
    ) == [a]
    assert find(**{"00404025.00080104": "Station CT*"}) == [a, b, d]
    assert find(**{"ScheduledStationNameCodeSequence.CodeValue": "CT1\\CT2"}) == [a, b, d]
    # date-time ranges and single values at their precision
    assert find(ScheduledProcedureStepStartDateTime="20261123") == [a, b]
    assert find(ScheduledProcedureStepStartDateTime="20261123100000-20261124") == [b, c]
    assert find(ScheduledProcedureStepStartDateTime="-202611231159") == [a]
    assert find(ScheduledProcedureStepStartDateTime="20261125-") == [d]
    # strings, wildcards, person names (case-insensitive), fuzzy
    assert find(ProcedureStepLabel="L*AI") == [a, b]
    assert find(ProcedureStepLabel="lung ai") == []
    assert find(PatientName="müller^hans") == [a]
    assert find(PatientName="DOE*") == [b, c, d]
    assert find(PatientName="hans", fuzzymatching="true") == [a]
    assert find(PatientName="mull", fuzzymatching="true") == [a]
    assert find(PatientID="PAT-9") == [c]
    assert find(PatientBirthDate="19600101-19750101") == [a, b, c, d]
    assert find(PatientBirthDate="19800101-") == []
    assert find(ScheduledWorkitemCodeSequence="") == [a, b, c, d]  # universal: a return key only
    assert find(SOPInstanceUID=f"{b},{c}") == [b, c]


def test_paging_and_empty_results(http: httpx.Client) -> None:
    made = [create(http, workitem(start=f"2026112{n}090000")) for n in range(5)]
    response = http.get("/workitems", params={"limit": "2"})
    assert response.status_code == 206
    assert response.headers["warning"] == '299 dicomweb "There are additional results that can be requested"'
    assert uids(response) == made[:2]
    response = http.get("/workitems", params={"limit": "2", "offset": "4"})
    assert response.status_code == 200 and uids(response) == made[4:]
    response = http.get("/workitems", params={"PatientID": "nobody"})
    assert response.status_code == 204 and response.content == b""
    response = http.get("/workitems", params={"includefield": "ProcedureStepLabel,00404005"})
    assert response.status_code == 200
    item = response.json()[0]
    assert "00081195" not in item and item["00741204"]["Value"] == ["CT chest AI triage"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"NoSuchAttribute": "x"}, "NoSuchAttribute"),
        ({"PatientName.FamilyName": "x"}, "not a sequence"),
        ({"ScheduledStationNameCodeSequence": "x"}, "matches through its attributes"),
        ({"ScheduledProcedureStepStartDateTime": "2026-13-01"}, "date-time"),
        ({"ScheduledProcedureStepStartDateTime": "20261124-20261123"}, "ends before it starts"),
        ({"ProcedureStepState": "DONE"}, "Procedure Step State"),
        ({"limit": "0"}, "at least 1"),
        ({"offset": "-1"}, "non-negative"),
        ({"fuzzymatching": "yes"}, "true or false"),
        ({"includefield": "Nonsense"}, "Nonsense"),
        ({"SOPInstanceUID": "1.02"}, "UID"),
        # both were a 500: PostgreSQL refuses a NUL in text, and an offset beyond bigint
        ({"PatientName": "a\x00"}, "PatientName: NUL characters are not allowed"),
        ({"offset": "99999999999999999999"}, "offset: must be at most 2147483647"),
        ({"ScheduledStationNameCodeSequence.CodeValue": "\x00"}, "NUL characters"),
    ],
)
def test_bad_queries_are_400(http: httpx.Client, params: dict[str, str], message: str) -> None:
    response = http.get("/workitems", params=params)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_a_huge_limit_is_clamped(http: httpx.Client) -> None:
    """As in QIDO: a limit above the maximum is clamped, not refused (only offset has a ceiling)."""
    assert http.get("/workitems", params={"limit": "99999999999"}).status_code in (200, 204)


_populated: dict[str, list[tuple[str, dt.datetime]]] = {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    low=st.one_of(st.none(), st.datetimes(dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 3))),
    high=st.one_of(st.none(), st.datetimes(dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 3))),
    precision=st.sampled_from([8, 10, 12, 14]),
)
def test_date_time_ranges_match_like_the_standard_says(
    http: httpx.Client, low: dt.datetime | None, high: dt.datetime | None, precision: int
) -> None:
    """A range a-b matches from the beginning of a's interval to the end of b's (at their precision)."""
    key = str(http.base_url)
    if key not in _populated:
        starts = [dt.datetime(2026, 1, 1) + dt.timedelta(minutes=97 * n) for n in range(30)]
        _populated[key] = [(create(http, workitem(start=s.strftime("%Y%m%d%H%M%S"))), s) for s in starts]
    if low is None and high is None:
        return
    text_low = low.strftime("%Y%m%d%H%M%S")[:precision] if low else ""
    text_high = high.strftime("%Y%m%d%H%M%S")[:precision] if high else ""
    fmt = "%Y%m%d%H%M%S"[: {8: 6, 10: 8, 12: 10, 14: 12}[precision]]
    lo = dt.datetime.strptime(text_low, fmt) if low else None
    hi_start = dt.datetime.strptime(text_high, fmt) if high else None
    step = {
        8: dt.timedelta(days=1),
        10: dt.timedelta(hours=1),
        12: dt.timedelta(minutes=1),
        14: dt.timedelta(seconds=1),
    }
    hi = hi_start + step[precision] if hi_start else None
    response = http.get(
        "/workitems",
        params={"ScheduledProcedureStepStartDateTime": f"{text_low}-{text_high}", "limit": "1000"},
    )
    if lo is not None and hi is not None and lo >= hi:
        assert response.status_code == 400
        return
    expected = [uid for uid, s in _populated[key] if (lo is None or s >= lo) and (hi is None or s < hi)]
    assert uids(response) == expected
