"""A plain-Python QIDO-RS matcher over in-memory DICOM JSON, the oracle for indexer.qido's SQL.

Written from the rules of PS3.4 C.2.2.2 and PS3.18 8.3.4 as indexer.qido documents its choices, without
using its code, its attribute registry or SQL: dates compare as YYYYMMDD strings, times as zero-padded
HHMMSSFFFFFF strings, wildcards become regular expressions, and entity attributes come straight from the
stored instances (a study's or series' attributes are those of its most recently stored instance).
"""

from __future__ import annotations

import datetime as dt
import re
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
    level: str, params: list[tuple[str, str]], default_limit: int, max_limit: int
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
        keyword = BY_HEX.get(name.upper(), name)
        if keyword not in KEYS:
            raise ReferenceQueryError(name)
        hex_key, vr, key_level = KEYS[keyword]
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
    pieces = re.split(r"[\\,]", raw) if vr in ("UI", "CS", "IS") else raw.split("\\")
    out = []
    for piece in pieces:
        piece = piece.strip(" ") if vr in ("UI", "CS", "DA", "TM", "IS") else piece.rstrip(" ")
        if not piece:
            continue
        if set(piece) == {"*"}:
            return []
        out.append(piece)
    return out


def _validate(key: Key, fuzzy: bool) -> None:
    for value in key.values:
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
) -> list[str]:
    """UIDs of the matching entities of `level`, in the archive's documented order, paged."""
    keys, fuzzy, limit, offset = parse(level, params, default_limit, max_limit)
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
