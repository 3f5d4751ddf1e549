"""PS3.15 Table E.1-1 (and the safe private attributes of Table E.3.10-1) as generated data.

deid/data/ps3.15-e1-1.json is written by scripts/generate_deid_table.py from pinned PyPI packages that
carry the standard's tables (sources and edition are recorded in the file); it is never edited by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

# CID 7050 (PS3.16) codes of the profile and its options, and this module's names for the options.
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: dict[str, tuple[str, str]] = {
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_long_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_long_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
}
CLEAN_PIXEL_DATA = ("113101", "Clean Pixel Data Option")
ACTION_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})


@dataclass(frozen=True, slots=True)
class Row:
    """One row of Table E.1-1: a tag pattern ('(0010,0010)', '(60xx,3000)'), its Basic Profile action and
    the action of each option that names it."""

    tag: str
    name: str
    basic: str
    options: dict[str, str]

    @property
    def value_mask(self) -> tuple[int, int]:
        """The tag as (value, mask); 'x' digits are wildcards (mask 0)."""
        digits = self.tag.strip("()").replace(",", "")
        value = int(digits.replace("x", "0"), 16)
        mask = int("".join("0" if c == "x" else "F" for c in digits), 16)
        return value, mask


@dataclass(frozen=True, slots=True)
class SafePrivate:
    group: int
    element: int  # low byte within the private block
    creator: str
    name: str


@dataclass(frozen=True, slots=True)
class Table:
    edition: str
    sources: dict[str, str]
    rows: tuple[Row, ...]
    safe_private: tuple[SafePrivate, ...]

    def row(self, tag: str) -> Row:
        """The row of a tag pattern such as '(0010,0010)'."""
        for row in self.rows:
            if row.tag == tag:
                return row
        raise KeyError(tag)


@cache
def load() -> Table:
    raw = json.loads(resources.files("deid").joinpath("data/ps3.15-e1-1.json").read_text("utf-8"))
    rows = tuple(Row(r["tag"], r["name"], r["basic"], dict(r["options"])) for r in raw["rows"])
    safe = tuple(
        SafePrivate(int(s["group"], 16), int(s["element"], 16), s["creator"], s["name"])
        for s in raw["safe_private"]
    )
    return Table(raw["edition"], dict(raw["sources"]), rows, safe)
