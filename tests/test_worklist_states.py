"""Hypothesis-generated request sequences against a model of the UPS state machine (PS3.4 Table CC.1.1-2),
driven over HTTP: every response and the state the server reports afterwards must be what the table says.
"""

from __future__ import annotations

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomcore.uids import new_uid
from tests.fixtures.server import RunningArchive
from tests.worklist_data import performed, ups_archive, workitem
from worklist.states import State, Status, change_state, request_cancel

__all__ = ["ups_archive"]

JSON = {"Content-Type": "application/dicom+json"}

# Table CC.1.1-2, columns SCHEDULED, IN PROGRESS, COMPLETED, CANCELED, for a request with the correct
# Transaction UID and with a wrong one; "ok" performs the change, "ok?" when the final state requirements
# are met (else C304). Written out from the standard independently of worklist.states.
TABLE = {
    ("IN PROGRESS", True): ("ok", "C302", "C300", "C300"),
    ("IN PROGRESS", False): ("ok", "C301", "C301", "C301"),  # a SCHEDULED item has no owner yet
    ("COMPLETED", True): ("C310", "ok?", "B306", "C300"),
    ("COMPLETED", False): ("C310", "C301", "C301", "C301"),
    ("CANCELED", True): ("C310", "ok?", "C300", "B304"),
    ("CANCELED", False): ("C310", "C301", "C301", "C301"),
    ("SCHEDULED", True): ("C303", "C303", "C303", "C303"),
    ("SCHEDULED", False): ("C303", "C303", "C303", "C303"),
}
CANCEL_REQUEST = ("CANCELED", "ok", "C311", "B304")  # SCHEDULED: canceled by the archive; IN PROGRESS: asked
COLUMN = {"SCHEDULED": 0, "IN PROGRESS": 1, "COMPLETED": 2, "CANCELED": 3}

operations = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["IN PROGRESS", "COMPLETED", "CANCELED", "SCHEDULED"]), st.booleans()),
        st.tuples(st.just("cancelrequest"), st.just(False)),
        st.tuples(st.just("fill"), st.booleans()),
    ),
    min_size=1,
    max_size=10,
)


class Model:
    def __init__(self) -> None:
        self.state = "SCHEDULED"
        self.owner: str | None = None
        self.filled = False

    def expect(self, op: str, correct: bool) -> str:
        column = COLUMN[self.state]
        if op == "cancelrequest":
            result = CANCEL_REQUEST[column]
            if result == "CANCELED":
                self.state = "CANCELED"
                return "ok"
            return result
        if op == "fill":  # an update: SCHEDULED takes it from anyone, IN PROGRESS from the owner only
            if self.state == "SCHEDULED" or (self.state == "IN PROGRESS" and correct):
                self.filled = True
                return "ok"
            return "C300" if self.state in ("COMPLETED", "CANCELED") else "C301"
        result = TABLE[(op, correct)][column]
        if result == "ok?":
            result = "ok" if self.filled or op == "CANCELED" else "C304"
        if result == "ok":
            self.state = op
        return result


def http_status(op: str, result: str) -> int:
    if result.startswith("C"):
        return 409
    return 202 if op == "cancelrequest" else 200


@pytest.fixture
def http(ups_archive: RunningArchive):
    with httpx.Client(base_url=ups_archive.url, timeout=30) as c:
        yield c


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_transition_sequences_follow_the_table(http: httpx.Client, ops: list[tuple[str, bool]]) -> None:
    uid = new_uid()
    assert http.post(f"/workitems?{uid}", content=orjson.dumps(workitem()), headers=JSON).status_code == 201
    model = Model()
    for op, correct in ops:
        before_state = model.state
        tuid = model.owner if correct and model.owner else new_uid()
        expected = model.expect(op, correct and model.owner is not None)
        if op == "cancelrequest":
            response = http.post(f"/workitems/{uid}/cancelrequest")
        elif op == "fill":
            response = http.post(f"/workitems/{uid}?{tuid}", content=orjson.dumps(performed()), headers=JSON)
        else:
            body = {"00741000": {"vr": "CS", "Value": [op]}, "00081195": {"vr": "UI", "Value": [tuid]}}
            response = http.put(f"/workitems/{uid}/state", content=orjson.dumps(body), headers=JSON)
        assert response.status_code == http_status(op, expected), (
            before_state,
            op,
            correct,
            expected,
            response.text,
        )
        if expected in ("B304", "B306"):
            assert "already in the requested state" in response.headers["warning"]
        if op == "IN PROGRESS" and expected == "ok":
            model.owner = tuid
        if expected.startswith("C") and op != "fill":
            assert f"({expected})" in response.json()["error"]["message"]
        item = http.get(f"/workitems/{uid}").json()[0]
        assert item["00741000"]["Value"] == [model.state]


@given(
    current=st.sampled_from(list(State)),
    requested=st.sampled_from(list(State)),
    owner=st.sampled_from([None, "1.2.3"]),
    given_tuid=st.sampled_from(["1.2.3", "1.2.4"]),
    met=st.booleans(),
)
def test_state_function_agrees_with_the_table(
    current: State, requested: State, owner: str | None, given_tuid: str, met: bool
) -> None:
    """worklist.states on its own, for every combination (owners only exist past SCHEDULED)."""
    if current is State.SCHEDULED:
        owner = None
    correct = owner is not None and given_tuid == owner
    model = Model()
    model.state, model.owner, model.filled = current.code, owner, met
    expected = model.expect(requested.code, correct)
    outcome = change_state(current, owner, requested, given_tuid, met or requested is State.CANCELED)
    assert outcome.status.value == ("0000" if expected == "ok" else expected)
    if expected == "ok":
        assert outcome.new_state is requested


def test_request_cancel_function() -> None:
    assert request_cancel(State.SCHEDULED).new_state is State.CANCELED
    assert request_cancel(State.IN_PROGRESS).cancel_requested
    assert request_cancel(State.COMPLETED).status is Status.ALREADY_COMPLETED_CANCEL
    assert request_cancel(State.CANCELED).status is Status.ALREADY_CANCELED
