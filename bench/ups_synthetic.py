"""Work item data sets (DICOM JSON, PS3.18 F.2) for the worklist benchmark and the UPS-RS tests."""

from __future__ import annotations

from typing import Any


def code(value: str, meaning: str, scheme: str = "99LOCAL") -> dict[str, Any]:
    return {
        "00080100": {"vr": "SH", "Value": [value]},
        "00080102": {"vr": "SH", "Value": [scheme]},
        "00080104": {"vr": "LO", "Value": [meaning]},
    }


def workitem(
    *,
    label: str = "CT chest AI triage",
    station: str | None = "CT1",
    start: str = "20261123090000",
    patient_id: str = "PAT-1",
    patient_name: str = "Doe^Jane",
    priority: str = "MEDIUM",
    readiness: str = "READY",
) -> dict[str, Any]:
    """A work item that meets every N-CREATE requirement of Table CC.2.5-3."""
    stations = [code(station, f"Station {station}")] if station else []
    return {
        "00741000": {"vr": "CS", "Value": ["SCHEDULED"]},
        "00741200": {"vr": "CS", "Value": [priority]},
        "00741204": {"vr": "LO", "Value": [label]},
        "00404005": {"vr": "DT", "Value": [start]},
        "00404041": {"vr": "CS", "Value": [readiness]},
        "00404025": {"vr": "SQ", "Value": stations} if stations else {"vr": "SQ"},
        "00404026": {"vr": "SQ"},
        "00404027": {"vr": "SQ"},
        "00404018": {"vr": "SQ", "Value": [code("AI-TRIAGE", "AI triage")]},
        "00400400": {"vr": "LT"},
        "00404021": {"vr": "SQ"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": patient_name}]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00100021": {"vr": "LO"},
        "00100024": {"vr": "SQ"},
        "00100030": {"vr": "DA", "Value": ["19700101"]},
        "00100040": {"vr": "CS", "Value": ["F"]},
        "00380010": {"vr": "LO"},
        "00380014": {"vr": "SQ"},
        "00081080": {"vr": "LO"},
        "00081084": {"vr": "SQ"},
        "0040A370": {"vr": "SQ"},
        "00741216": {"vr": "SQ"},
    }


def performed(start: str = "20261123091000", end: str = "20261123091500") -> dict[str, Any]:
    """What a performer sets before COMPLETED (final state requirements, CC.2.5.1.1)."""
    return {
        "00741216": {
            "vr": "SQ",
            "Value": [
                {
                    "00404050": {"vr": "DT", "Value": [start]},
                    "00404051": {"vr": "DT", "Value": [end]},
                    "00404028": {"vr": "SQ", "Value": [code("AI1", "AI worker 1")]},
                    "00404033": {"vr": "SQ"},
                }
            ],
        }
    }
