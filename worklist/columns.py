"""The typed columns of ups_workitem, derived from a work item's DICOM JSON on every write.

They serve the searches worklist clients poll with (migration 0008); everything else is matched on the
jsonb data set. Normalisation is indexer.attributes' (fold_case, name_words), so that PN matching here and
in QIDO agree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from indexer.attributes import fold_case, name_words, pn_all_groups, pn_alphabetic
from indexer.extended_values import dt_bounds
from worklist.requirements import CODE_VALUE
from worklist.validate import first, values

COLUMNS = (
    "priority",
    "procedure_step_label",
    "worklist_label",
    "input_readiness_state",
    "scheduled_start",
    "expected_completion",
    "patient_id",
    "patient_name_ci",
    "patient_name_words",
    "station_names",
    "station",
)


def _text(ds: dict[str, Any], key: str) -> str | None:
    v = first(ds, key)
    return None if v is None else str(v)


def parse_dt(text: str | None) -> dt.datetime | None:
    """A DT value as the naive date-time it names (its start, at its precision; offsets not applied)."""
    if not text:
        return None
    bounds = dt_bounds(text)
    return bounds[0] if bounds else None


def columns(ds: dict[str, Any]) -> dict[str, Any]:
    name = first(ds, "00100010")
    alphabetic = pn_alphabetic(name)
    stations = [
        str(v) for item in values(ds, "00404025") if isinstance(item, dict) for v in values(item, CODE_VALUE)
    ]
    return {
        "priority": _text(ds, "00741200"),
        "procedure_step_label": _text(ds, "00741204"),
        "worklist_label": _text(ds, "00741202"),
        "input_readiness_state": _text(ds, "00404041"),
        "scheduled_start": parse_dt(_text(ds, "00404005")),
        "expected_completion": parse_dt(_text(ds, "00404011")),
        "patient_id": _text(ds, "00100020"),
        "patient_name_ci": fold_case(alphabetic) if alphabetic is not None else None,
        "patient_name_words": name_words(pn_all_groups(name)) if name else [],
        "station_names": stations,
        "station": stations[0] if len(stations) == 1 else None,
    }
