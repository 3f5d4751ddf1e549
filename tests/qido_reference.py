"""A plain-Python QIDO-RS matcher over in-memory DICOM JSON, the oracle for indexer.qido's SQL.

Written from the rules of PS3.4 C.2.2.2 and PS3.18 8.3.4 as indexer.qido documents its choices, without
using its code, its attribute registry or SQL: dates compare as YYYYMMDD strings, times as zero-padded
HHMMSSFFFFFF strings, wildcards become regular expressions, and entity attributes come straight from the
stored instances (a study's or series' attributes are those of its most recently stored instance).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from typing import Any


class ReferenceQueryError(ValueError):
    """The reference considers the query invalid (the archive must answer 400 too)."""


# keyword -> (DICOM JSON key, VR, level) of the matching keys (PS3.18 Table 10.6.1-5 and the extras)
KEYS: dict[str, tuple[str, str, str]] = {
    "StudyInstanceUID": ("0020000D", "UI", "study"),
    "PatientID": ("00100020", "LO", "study"),
    "PatientName": ("00100010", "PN", "study"),
    "PatientBirthDate": ("00100030", "DA", "study"),
    "PatientSex": ("00100040", "CS", "study"),
    "StudyDate": ("00080020", "DA", "study"),
    "StudyTime": ("00080030", "TM", "study"),
    "AccessionNumber": ("00080050", "SH", "study"),
    "ReferringPhysicianName": ("00080090", "PN", "study"),
    "StudyID": ("00200010", "SH", "study"),
    "StudyDescription": ("00081030", "LO", "study"),
    "ModalitiesInStudy": ("00080061", "CS", "study"),
    "SeriesInstanceUID": ("0020000E", "UI", "series"),
    "Modality": ("00080060", "CS", "series"),
    "SeriesNumber": ("00200011", "IS", "series"),
    "SeriesDescription": ("0008103E", "LO", "series"),
    "PerformedProcedureStepStartDate": ("00400244", "DA", "series"),
    "PerformedProcedureStepStartTime": ("00400245", "TM", "series"),
    "ManufacturerModelName": ("00081090", "LO", "series"),
    "SOPInstanceUID": ("00080018", "UI", "instance"),
    "SOPClassUID": ("00080016", "UI", "instance"),
    "InstanceNumber": ("00200013", "IS", "instance"),
}
BY_HEX = {hex_key: keyword for keyword, (hex_key, _, _) in KEYS.items()}
DEPTH = {"study": 0, "series": 1, "instance": 2}
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


@dataclass
class Entity:
    """A study, series or instance: its attributes (latest instance's) and what orders it."""

    uid: str
    attrs: dict
    first_seen: int
    study: Entity | None = None
    series: Entity | None = None
    children: list[Entity] = field(default_factory=list)
    modalities: set[str] = field(default_factory=set)
    instance_count: int = 0


def build(instances: list[dict]) -> tuple[list[Entity], list[Entity], list[Entity]]:
    """Studies, series and instances of the archive the instances (in storage order) make up."""
    studies: dict[str, Entity] = {}
    series: dict[str, Entity] = {}
    result_instances: list[Entity] = []
    for n, attrs in enumerate(instances):
        st_uid, se_uid, sop_uid = (first(attrs, k) for k in ("0020000D", "0020000E", "00080018"))
        study = studies.get(st_uid)
        if study is None:
            study = studies[st_uid] = Entity(st_uid, attrs, n)
        study.attrs = attrs
        study.instance_count += 1
        se = series.get(se_uid)
        if se is None:
            se = series[se_uid] = Entity(se_uid, attrs, n, study=study)
            study.children.append(se)
        se.attrs = attrs
        se.instance_count += 1
        inst = Entity(sop_uid, attrs, n, study=study, series=se)
        se.children.append(inst)
        result_instances.append(inst)
    for study in studies.values():
        study.modalities = {m for se in study.children if (m := first(se.attrs, "00080060"))}
    return list(studies.values()), list(series.values()), result_instances


def first(attrs: dict, key: str) -> Any:
    values = (attrs.get(key) or {}).get("Value") or []
    return values[0] if values else None


# --- value interpretation --------------------------------------------------------------------------


def valid_date(text: str) -> bool:
    if not re.fullmatch(r"[0-9]{8}", text):
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def stored_date(value: Any) -> str | None:
    return value if isinstance(value, str) and valid_date(value) else None


_TM = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")


def time_bounds(text: str) -> tuple[str, str] | None:
    """The first and last instant a TM value covers, as 12-digit strings; None when malformed."""
    m = _TM.fullmatch(text)
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        return None
    if ss == "60":  # a leap second (PS3.5 TM allows it) counts as the last second of its minute
        ss = "59"
    low = hh + (mm or "00") + (ss or "00") + (frac or "").ljust(6, "0")
    high = hh + (mm or "59") + (ss or "59") + (frac or "").ljust(6, "9")
    return low, high


def stored_time(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    bounds = time_bounds(value)
    return bounds[0] if bounds else None


def stored_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def casefold_name(text: str) -> str:
    # PS3.5 6.2: trailing empty name components (and padding) do not change the name
    while text.endswith(("^", " ")):
        text = text[:-1]
    return text.casefold()


def words_of(text: str) -> list[str]:
    folded = "".join(
        c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c)
    )
    return [w for w in re.split(r"[\^=\s,]+", folded) if w]


def wildcard_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL
    )


def string_matches(query: str, stored: str | None) -> bool:
    if stored is None:
        return False
    if "*" in query or "?" in query:
        return wildcard_regex(query).fullmatch(stored) is not None
    return query == stored


# --- the query ---------------------------------------------------------------------------------------


@dataclass
class Key:
    keyword: str
    hex_key: str
    vr: str
    level: str
    values: list[str]  # empty: universal


def parse(
    level: str,
    params: list[tuple[str, str]],
    default_limit: int,
    max_limit: int,
    extended: dict[str, tuple[str, str, str]] | None = None,
) -> tuple[list[Key], bool, int, int]:
    keys: list[Key] = []
    seen: set[str] = set()
    specials: set[str] = set()
    fuzzy, limit, offset = False, min(default_limit, max_limit), 0
    for name, value in params:
        low = name.lower()
        if low == "includefield":
            continue
        if low in ("fuzzymatching", "limit", "offset"):
            if low in specials:
                raise ReferenceQueryError(name)
            specials.add(low)
            if low == "fuzzymatching":
                if value.strip().lower() not in ("true", "false"):
                    raise ReferenceQueryError(name)
                fuzzy = value.strip().lower() == "true"
            else:
                text = value.strip()
                if not text.isdigit() or (low == "limit" and int(text) < 1):
                    raise ReferenceQueryError(name)
                if low == "limit":
                    limit = min(int(text), max_limit)
                else:
                    offset = int(text)
            continue
        keys_here = {**KEYS, **(extended or {})}
        by_hex = {**BY_HEX, **{h: k for k, (h, _, _) in (extended or {}).items()}}
        keyword = by_hex.get(name.upper(), name)
        if keyword not in keys_here:
            raise ReferenceQueryError(name)
        hex_key, vr, key_level = keys_here[keyword]
        if level == "study" and keyword == "Modality":
            keyword, (hex_key, vr, key_level) = "ModalitiesInStudy", KEYS["ModalitiesInStudy"]
            hex_key = "00080060"  # for the repeat check only: Modality and ModalitiesInStudy may both come
        if DEPTH[key_level] > DEPTH[level]:
            raise ReferenceQueryError(name)
        if hex_key in seen:
            raise ReferenceQueryError(name)
        seen.add(hex_key)
        keys.append(Key(keyword, hex_key, vr, key_level, _values(name, vr, value)))
    for key in keys:
        _validate(key, fuzzy)
    return keys, fuzzy, limit, offset


def _values(name: str, vr: str, raw: str) -> list[str]:
    pieces = re.split(r"[\\,]", raw) if vr in ("UI", "CS", "IS", "SL", "SS", "UL", "US") else raw.split("\\")
    out = []
    for piece in pieces:
        piece = piece.strip(" ") if vr in _STRIPPED else piece.rstrip(" ")
        if not piece:
            continue
        if set(piece) == {"*"}:
            return []
        out.append(piece)
    return out


_STRIPPED = ("UI", "CS", "DA", "TM", "IS", "AE", "AS", "DS", "DT", "FD", "FL", "SL", "SS", "UL", "US")


def _validate(key: Key, fuzzy: bool) -> None:
    for value in key.values:
        if key.vr in EXT_INT_RANGE:
            low, high = EXT_INT_RANGE[key.vr]
            if key.vr != "IS" and not (re.fullmatch(r"[+-]?[0-9]+", value) and low <= int(value) <= high):
                raise ReferenceQueryError(key.keyword)
        if key.vr in ("DS", "FD", "FL"):
            if not re.fullmatch(r"[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?", value):
                raise ReferenceQueryError(key.keyword)
            if math.isinf(float(value)):
                raise ReferenceQueryError(key.keyword)
        if key.vr == "DT":
            low, high = _dt_range(key, value)
            if low is not None and high is not None and low > high:
                raise ReferenceQueryError(key.keyword)
        if key.vr == "UI" and not (len(value) <= 64 and _UID.fullmatch(value)):
            raise ReferenceQueryError(key.keyword)
        if key.vr == "IS" and not (re.fullmatch(r"[+-]?[0-9]+", value) and -(2**31) <= int(value) < 2**31):
            raise ReferenceQueryError(key.keyword)
        if key.vr == "PN" and not fuzzy and value.split("=")[0] == "":
            raise ReferenceQueryError(key.keyword)
        if key.vr in ("DA", "TM"):
            low, high = _range(key, value)
            if low is not None and high is not None and low > high:
                raise ReferenceQueryError(key.keyword)


def _range(key: Key, value: str) -> tuple[str | None, str | None]:
    def bounds(text: str) -> tuple[str, str]:
        if key.vr == "DA":
            if not valid_date(text):
                raise ReferenceQueryError(key.keyword)
            return text, text
        found = time_bounds(text)
        if found is None:
            raise ReferenceQueryError(key.keyword)
        return found

    if "-" in value:
        a, b = (part.strip() for part in value.split("-", 1))
        if not a and not b:
            raise ReferenceQueryError(key.keyword)
        return (bounds(a)[0] if a else None), (bounds(b)[1] if b else None)
    return bounds(value)


def _key_matches(key: Key, entity: Entity, fuzzy: bool) -> bool:
    if not key.values:
        return True
    if key.keyword not in KEYS:
        return _extended_matches(key, entity, fuzzy)
    if key.keyword == "ModalitiesInStudy":
        return any(string_matches(v, m) for v in key.values for m in entity.modalities)
    stored = first(entity.attrs, key.hex_key)
    for value in key.values:
        if key.vr == "UI":
            ok = stored == value
        elif key.vr == "PN":
            if fuzzy:
                wanted = words_of(value.replace("*", "").replace("?", ""))
                if not wanted:
                    return True
                groups = (
                    "=".join(stored.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic"))
                    if (isinstance(stored, dict))
                    else ""
                )
                have = words_of(groups)
                ok = all(any(h.startswith(w) for h in have) for w in wanted)
            else:
                alphabetic = stored.get("Alphabetic") if isinstance(stored, dict) else None
                ok = alphabetic is not None and string_matches(
                    casefold_name(value.split("=")[0]), casefold_name(alphabetic)
                )
        elif key.vr == "DA":
            date = stored_date(stored)
            low, high = _range(key, value)
            ok = date is not None and (low is None or low <= date) and (high is None or date <= high)
        elif key.vr == "TM":
            time = stored_time(stored)
            low, high = _range(key, value)
            ok = time is not None and (low is None or low <= time) and (high is None or time <= high)
        elif key.vr == "IS":
            ok = stored_int(stored) == int(value) if stored is not None else False
        else:
            ok = string_matches(value, None if stored is None else str(stored))
        if ok:
            return True
    return False


def search(
    instances: list[dict],
    level: str,
    params: list[tuple[str, str]],
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    default_limit: int = 100,
    max_limit: int = 1000,
    extended: dict[str, tuple[str, str, str]] | None = None,
) -> list[str]:
    """UIDs of the matching entities of `level`, in the archive's documented order, paged.

    `extended`: extended query tags (Ready, Enabled) as keyword -> (hex key, VR, level), like KEYS.
    """
    keys, fuzzy, limit, offset = parse(level, params, default_limit, max_limit, extended)
    studies, series, instances_ = build(instances)
    candidates: list[Entity]
    if level == "study":
        candidates = list(studies)
    elif level == "series":
        candidates = sorted(
            series,
            key=lambda s: (s.study.first_seen, _number_key(first(s.attrs, "00200011")), s.first_seen),
        )
    else:
        candidates = sorted(
            instances_,
            key=lambda i: (i.series.first_seen, _number_key(first(i.attrs, "00200013")), i.first_seen),
        )
    matched = []
    for entity in candidates:
        study = entity if level == "study" else entity.study
        se = entity if level == "series" else entity.series
        if study_uid is not None and study.uid != study_uid:
            continue
        if series_uid is not None and se.uid != series_uid:
            continue
        if all(
            _key_matches(k, {"study": study, "series": se, "instance": entity}[k.level], fuzzy) for k in keys
        ):
            matched.append(entity.uid)
    return matched[offset : offset + limit]


def _number_key(value: Any) -> tuple[int, int]:
    number = stored_int(value) if value is not None else None
    return (1, 0) if number is None else (0, number)


# --- extended query tags ----------------------------------------------------------------------------------
# Every value of the attribute is indexed when all of them fit the VR; an attribute with a value that does
# not fit is not indexed at all for that entity (it is an indexing error), so it never matches.

EXT_INT_RANGE = {
    "IS": (-(2**31), 2**31 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "US": (0, 2**16 - 1),
}
_EXT_MAX = {"AE": 16, "AS": 4, "CS": 16, "LO": 64, "SH": 16, "UI": 64}
_DT_RE = re.compile(r"([0-9]{4})((?:[0-9]{2}){0,5})(?:[.]([0-9]{1,6}))?([+-][0-9]{4})?")


def _f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def dt_bounds(text: str) -> tuple[str, str] | None:
    """First and last instant of a DT value as 20-digit strings YYYYMMDDHHMMSSFFFFFF; None when malformed."""
    m = _DT_RE.fullmatch(text)
    if not m or (m.group(3) is not None and len(m.group(2)) != 10):
        return None
    year, rest, frac = m.group(1), m.group(2), m.group(3)
    parts = [rest[i : i + 2] for i in range(0, len(rest), 2)]
    if len(parts) >= 5 and parts[4] == "60":  # a leap second: the last second of its minute
        parts[4] = "59"
    low = year + "".join(parts + ["01", "01", "00", "00", "00"][len(parts) :]) + (frac or "").ljust(6, "0")
    try:
        dt.datetime(int(year), int(low[4:6]), int(low[6:8]), int(low[8:10]), int(low[10:12]), int(low[12:14]))
    except ValueError:
        return None
    if not parts:
        high = year + "1231"
    elif len(parts) == 1:
        month = int(parts[0])
        days = (
            (dt.date(int(year) + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
            if (int(year) < 9999 or month < 12)
            else 31
        )
        high = year + parts[0] + f"{days:02d}"
    else:
        high = year + "".join(parts)
    high = high + "235959"[len(high) - 8 :] + (frac or "").ljust(6, "9")
    return low, high


def _ext_stored(vr: str, value: Any) -> Any:
    """The comparable form of one stored value, or raise ValueError when it does not fit the VR."""
    if vr in _EXT_MAX:
        if not isinstance(value, str) or len(value) > _EXT_MAX[vr]:
            raise ValueError(value)
        if vr == "UI" and not _UID.fullmatch(value):
            raise ValueError(value)
        if vr == "AS" and not re.fullmatch(r"[0-9]{3}[DWMY]", value):
            raise ValueError(value)
        return value
    if vr in EXT_INT_RANGE:
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(value)
        low, high = EXT_INT_RANGE[vr]
        if not low <= value <= high:
            raise ValueError(value)
        return value
    if vr in ("DS", "FD", "FL"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(value)
        return _f32(float(value)) if vr == "FL" else float(value)
    if vr == "DA":
        if not isinstance(value, str) or stored_date(value) is None:
            raise ValueError(value)
        return value
    if vr == "TM":
        if not isinstance(value, str) or stored_time(value) is None:
            raise ValueError(value)
        return stored_time(value)
    if vr == "DT":
        bounds = dt_bounds(value) if isinstance(value, str) else None
        if bounds is None:
            raise ValueError(value)
        return bounds[0]
    if vr == "PN":
        return value
    raise AssertionError(vr)


def _dt_range(key: Key, value: str) -> tuple[str | None, str | None]:
    def bounds(text: str) -> tuple[str, str]:
        found = dt_bounds(text) if "+" not in text else None
        if found is None:
            raise ReferenceQueryError(key.keyword)
        return found

    if "-" in value:
        a, b = (part.strip() for part in value.split("-", 1))
        if not a and not b:
            raise ReferenceQueryError(key.keyword)
        return (bounds(a)[0] if a else None), (bounds(b)[1] if b else None)
    return bounds(value)


def _extended_matches(key: Key, entity: Entity, fuzzy: bool) -> bool:
    raw = [v for v in (entity.attrs.get(key.hex_key) or {}).get("Value") or [] if v is not None and v != ""]
    try:
        stored = [_ext_stored(key.vr, v) for v in raw]
    except ValueError:
        return False
    for value in key.values:
        for have in stored:
            if key.vr == "PN":
                ok = _key_matches(
                    Key("PatientName", key.hex_key, "PN", key.level, [value]),
                    Entity("", {key.hex_key: {"vr": "PN", "Value": [have]}}, 0),
                    fuzzy,
                )
            elif key.vr in EXT_INT_RANGE:
                ok = have == int(value)
            elif key.vr in ("DS", "FD", "FL"):
                ok = have == (_f32(float(value)) if key.vr == "FL" else float(value))
            elif key.vr == "DA":
                low, high = _range(key, value)
                ok = (low is None or low <= have) and (high is None or have <= high)
            elif key.vr == "TM":
                low, high = _range(key, value)
                ok = (low is None or low <= have) and (high is None or have <= high)
            elif key.vr == "DT":
                low, high = _dt_range(key, value)
                ok = (low is None or low <= have) and (high is None or have <= high)
            elif key.vr == "UI":
                ok = have == value
            else:
                ok = string_matches(value, have)
            if ok:
                return True
    return False
