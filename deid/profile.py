"""The Basic Application Level Confidentiality Profile and its options, resolved into one action per tag.

Resolution of a row of Table E.1-1, in order:
1. an enabled option that says K keeps the attribute; else one that says C cleans it (the options only
   ever retain or clean what the basic profile would remove or replace);
2. otherwise the Basic Profile's code. Combined codes mean "the first, unless the IOD needs the attribute
   present"; without per-IOD tables we choose the variant that keeps the attribute present and carries no
   original information: X/Z -> Z, X/D -> D, X/Z/D -> Z, Z/D -> Z, and X/Z/U* -> U (the sequence stays and
   the UIDs in it are remapped, so image references keep resolving within the export).

PatientID and PatientName carry the project's pseudonym rather than an empty value (Z allows a dummy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from deid.table import BASIC_PROFILE, CLEAN_PIXEL_DATA, OPTION_CODES, Table, load
from dicomcore.deidentify import PixelRule, Plan

COMBINED = {"Z/D": "Z", "X/Z": "Z", "X/D": "D", "X/Z/D": "Z", "X/Z/U*": "U"}


class ProfileError(ValueError):
    """Options that cannot be combined or are unknown."""


@dataclass(frozen=True, slots=True)
class Options:
    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False

    def __post_init__(self) -> None:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            raise ProfileError("the Full Dates and Modified Dates options exclude each other")

    @property
    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Options:
        """Options from their names (snake_case, or the camelCase the export API uses)."""
        known = {f.name: f.name for f in fields(cls)}
        known.update({option_api_name(name): name for name in list(known)})
        chosen = {}
        for name in names:
            if name not in known:
                raise ProfileError(
                    f"unknown de-identification option {name!r}; known: {sorted(OPTION_CODES)}"
                )
            chosen[known[name]] = True
        return cls(**chosen)


def option_api_name(name: str) -> str:
    """An option's name as the HTTP APIs write it: camelCase (retain_long_modified_dates ->
    retainLongModifiedDates)."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def resolve_row(basic: str, options: Mapping[str, str], enabled: Iterable[str]) -> str:
    """The single action (X, Z, D, K, C, U) of one table row under the enabled options."""
    chosen = [options[name] for name in enabled if name in options]
    if "K" in chosen:
        return "K"
    if "C" in chosen:
        return "C"
    return COMBINED.get(basic, basic)


def build_plan(options: Options, pixel_rules: Iterable[PixelRule] = (), table: Table | None = None) -> Plan:
    table = table or load()
    enabled = options.enabled
    actions: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for row in table.rows:
        action = resolve_row(row.basic, row.options, enabled)
        value, mask = row.value_mask
        if mask == 0xFFFFFFFF:
            actions[value] = action
        else:
            masked.append((value, mask, action))
    codes = [BASIC_PROFILE] + [OPTION_CODES[name] for name in enabled]
    method = [f"PS3.15 {table.edition} Basic Application Confidentiality Profile"]
    method += [OPTION_CODES[name][1] for name in enabled]
    if options.retain_long_modified_dates:
        temporal = "MODIFIED"
    elif options.retain_long_full_dates:
        temporal = "UNMODIFIED"
    else:
        temporal = "REMOVED"
    return Plan(
        actions=actions,
        masked=tuple(masked),
        safe_private=frozenset((s.group, s.creator.strip().lower(), s.element) for s in table.safe_private),
        retain_safe_private=options.retain_safe_private,
        shift_dates=options.retain_long_modified_dates,
        keep_uids=options.retain_uids,
        codes=tuple(codes),
        method=tuple(method),
        temporal=temporal,
        pixel_rules=tuple(pixel_rules),
        clean_pixel_code=CLEAN_PIXEL_DATA,
    )


_RULE_FIELDS = frozenset({"manufacturer", "model", "rows", "columns", "rectangles"})


def pixel_rules_from_json(items: Iterable[Mapping[str, object]]) -> list[PixelRule]:
    """Pixel-cleaning rules as configured: [{"manufacturer", "model", "rows", "columns",
    "rectangles": [[x, y, width, height], ...]}]; the match fields are optional."""
    rules = []
    for item in items:
        # an ignored field would widen the rule to every device (fail closed: refuse what is not known)
        unknown = sorted(set(item) - _RULE_FIELDS)
        if unknown:
            raise ProfileError(
                f"unknown pixel-cleaning rule field {unknown[0]!r}: use {', '.join(sorted(_RULE_FIELDS))}"
            )
        rects = item.get("rectangles")
        if not isinstance(rects, list) or not rects:
            raise ProfileError("a pixel-cleaning rule needs a non-empty 'rectangles' list")
        rectangles = []
        for rect in rects:
            if not (isinstance(rect, list) and len(rect) == 4 and all(_count(v) for v in rect)):
                raise ProfileError(
                    f"rectangle {rect!r} is not [x, y, width, height] of non-negative integers"
                )
            rectangles.append((rect[0], rect[1], rect[2], rect[3]))
        rules.append(
            PixelRule(
                rectangles=tuple(rectangles),
                manufacturer=_optional(item, "manufacturer", str),
                model=_optional(item, "model", str),
                rows=_optional_count(item, "rows"),
                columns=_optional_count(item, "columns"),
            )
        )
    return rules


def _count(value: object) -> bool:
    """A non-negative JSON integer (true and false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional_count(item: Mapping[str, object], key: str) -> int | None:
    value = item.get(key)
    if value is not None and not _count(value):
        raise ProfileError(f"pixel-cleaning rule field {key!r} must be a non-negative integer")
    return value  # type: ignore[return-value]


def _optional(item: Mapping[str, object], key: str, kind: type) -> object:
    value = item.get(key)
    if value is not None and not isinstance(value, kind):
        raise ProfileError(f"pixel-cleaning rule field {key!r} must be a {kind.__name__}")
    return value
