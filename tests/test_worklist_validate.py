"""Request data set checks on their own: whatever JSON arrives, the answer is a data set or a DatasetError."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.ups_synthetic import code, performed, workitem
from worklist.requirements import BY_KEY, TABLE
from worklist.states import State
from worklist.validate import DatasetError, final_state_missing, parse_dataset, prepare_create, prepare_update

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
keys = st.sampled_from(["00741000", "00404025", "00100010", "00404005", "0040A370", "00080100", "zz"])
vrs = st.sampled_from(["CS", "SQ", "PN", "DT", "UI", "LO", "US", "XX"])
elements = st.fixed_dictionaries({"vr": vrs}, optional={"Value": json_values, "InlineBinary": json_values})
datasets = st.dictionaries(keys, elements | json_values, max_size=5)


@given(body=st.one_of(datasets, st.lists(datasets, max_size=2), json_values))
def test_any_json_is_a_data_set_or_a_clear_error(body: object) -> None:
    try:
        ds = parse_dataset(orjson.dumps(body))
    except DatasetError as exc:
        assert str(exc)
        return
    assert isinstance(ds, dict)
    for prepare in (lambda: prepare_create(ds, "1.2.3"), lambda: prepare_update(ds, workitem())):
        try:
            prepare()
        except DatasetError as exc:
            assert str(exc)


@pytest.mark.parametrize(
    ("element", "kept"),
    [
        ({"vr": "SQ", "Value": None, "InlineBinary": None}, {"vr": "SQ"}),  # nulls: an empty element
        ({"vr": "OB", "InlineBinary": "AAAA"}, {"vr": "OB", "InlineBinary": "AAAA"}),
        ({"vr": "SQ", "InlineBinary": "AAAA"}, "InlineBinary is for binary VRs"),
        ({"vr": "OB", "InlineBinary": 5}, "must be base64 text"),
        ({"vr": "OB", "InlineBinary": "!!"}, "must be base64 text"),
    ],
)
def test_inline_binary_and_null_values(element: dict, kept: dict | str) -> None:
    """A null Value or InlineBinary is an empty element; InlineBinary is base64 of a binary VR. A null with
    an InlineBinary key crashed the requirement checks with TypeError (found by hypothesis, seed 222)."""
    key = "00404025" if element["vr"] == "SQ" else "00420011"
    if isinstance(kept, str):
        with pytest.raises(DatasetError, match=kept):
            parse_dataset(orjson.dumps({key: element}))
        return
    ds = parse_dataset(orjson.dumps({key: element}))
    assert ds == {key: kept}
    with pytest.raises(DatasetError, match="ProcedureStepState"):  # checked, not crashed
        prepare_create(ds, "1.2.3")


def test_requirement_table_names_dictionary_attributes() -> None:
    # every keyword resolved to a tag (the table would not import otherwise) and nothing was lost
    assert len(BY_KEY) == len(TABLE)
    assert BY_KEY["00741000"].create == "1" and BY_KEY["00741000"].update == "-"


def test_final_state_requirements() -> None:
    _, created, _ = prepare_create(parse_dataset(orjson.dumps(workitem())), "1.2.3")
    assert final_state_missing(created, State.CANCELED) == []
    assert final_state_missing(created, State.COMPLETED) == [
        "UnifiedProcedureStepPerformedProcedureSequence (0074,1216)"
    ]
    done = prepare_update(performed(), created)
    assert final_state_missing(done, State.COMPLETED) == []
    item = performed()["00741216"]["Value"][0]
    del item["00404051"]
    partial = prepare_update({"00741216": {"vr": "SQ", "Value": [item]}}, created)
    assert final_state_missing(partial, State.COMPLETED) == [
        "UnifiedProcedureStepPerformedProcedureSequence (0074,1216) item 1: "
        "PerformedProcedureStepEndDateTime (0040,4051)"
    ]


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"00741000": {"vr": "CS", "Value": ["COMPLETED"]}}, "use Change Workitem State"),
        ({"00081195": {"vr": "UI", "Value": ["1.2.3"]}}, "goes in the query"),
        ({"00741204": {"vr": "LO"}}, "may not be emptied"),
        ({"00404025": {"vr": "SQ", "Value": [{**code("X", "x"), "00080104": {"vr": "LO"}}]}}, "Code Meaning"),
        ({}, "holds no attributes"),
    ],
)
def test_update_refusals(update: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        prepare_update(update, workitem())
