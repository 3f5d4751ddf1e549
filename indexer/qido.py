"""QIDO-RS search (PS3.18 8.3.4, 10.6) over the index, with PS3.4 C.2.2.2 attribute matching.

Three steps, kept apart so each can be tested on its own and the HTTP layer stays thin:

* `parse_query` turns the query pairs of a request into a `QidoQuery` (validated filters, return keys,
  paging) or raises `QueryError` naming the offending parameter;
* `_compile` turns a `QidoQuery` into one SQL statement with every user value passed as a $n parameter,
  shaped so that the schema's indexes apply (equality, `= ANY`, ranges, prefix ranges on COLLATE "C"
  columns, `&&` on the GIN-indexed modalities array);
* `search` runs it and builds DICOM JSON results from the stored members (migration 0010: each attribute's
  JSON text, cut from the level's `attrs` blob or, for instances, from the default result's attributes
  of the `metadata`; for instance-level extended query tags, their elements in ext_element, migration
  0013) spliced with the computed attributes and RetrieveURL, in tag order; it parses the blobs only for
  keys the members lack (includefield, private or study/series-level extended query tags) or rows
  without members.

Choices where the standard leaves room (the tests pin each of them):

* Lists: `\\` separates values for every attribute (multiple value matching: any value may match); `,`
  also separates values of UI, CS and IS attributes, whose values cannot contain a comma (PS3.18 lists UIDs
  that way). Trailing spaces of values are padding and dropped (leading ones too for UI, CS, DA, TM, IS).
* A value made only of `*` is universal matching, like an empty value: it matches entities without a value
  too, which `LIKE '%'` would not. Wildcards are not allowed in UI, DA, TM and IS values (400).
* TM values denote the interval they cover at their precision: `10` is 10:00:00-10:59:59.999999, `1030` is
  10:30:00-10:30:59.999999, `103000.5` is 10:30:00.5-10:30:00.599999. A single value matches every time in
  its interval; a range runs from the start of its lower bound's interval to the end of its upper bound's
  (so `-10` is up to 10:59:59.999999). DA/TM ranges whose lower end is after the upper end are rejected
  (400) rather than silently matching nothing; there is no wrap-around midnight. StudyDate and StudyTime
  are matched independently (combined datetime matching needs C-FIND extended negotiation).
* PN literal matching (exact and wildcard) compares the case-folded Alphabetic group (a value whose
  Alphabetic group is empty is a 400); fuzzymatching=true requires every word of the query (accents and
  case folded, wildcards removed) to be a prefix of some component of any group of the stored name. It is
  answered by a GIN index over all prefixes of the name components (migration 0002).
* At /studies, `Modality` means "has a series of that modality" (matched on ModalitiesInStudy).
* limit: 1..max_limit; larger values are clamped to max_limit (clients ask for "everything" with huge
  limits; a short page is not an error), zero/negative/non-numeric values are a 400. offset >= 0.
* Results are ordered by creation: studies by study_key; series by study, SeriesNumber (missing last),
  creation; instances by series creation, InstanceNumber (missing last), creation. New data sorts after
  old data, so paging with offset stays stable while the archive grows.
* Returned attributes: the defaults of PS3.18 Table 10.6.3-3/-4/-5 (with those of the levels above when
  the path does not fix them), every matching key and every includefield attribute. Attributes the entity
  does not have are left out rather than returned empty. Series results also carry StudyInstanceUID and
  instance results StudyInstanceUID and SeriesInstanceUID (the unique keys of the levels above, as in
  hierarchical C-FIND). InstanceAvailability is always ONLINE. An includefield attribute that belongs to a
  lower level than the result's comes from the latest stored instance of the study/series (as dcm4chee).
* Sequence paths (`00400275.00401001`) are rejected (400): no sequence matching yet.
* A UID in the path and a contradicting UID matching key are ANDed (empty result), not an error.
* Extended query tags (indexer.extended_tags) are matching keys like the standard ones once Ready and
  Enabled (otherwise 400), at their level and below: strings with wildcards, UIs, PN (literal and fuzzy),
  DA/TM/DT single values and ranges (DT at its precision, like TM), integers and floats by equality. Each is
  an EXISTS over its typed value table (migration 0005), i.e. a semijoin on the level's row key. Queries
  naming a tag that has indexing errors report it in `QidoQuery.erroneous` (the HTTP layer's
  `erroneous-dicom-attributes` header).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import orjson

from dicomcore.dicomjson import BULK_PATH_PREFIX
from dicomcore.tags import UnknownAttributeError, did_you_mean, parse_tag, tag_hex
from dicomcore.uids import is_valid_uid
from indexer.attributes import (
    ATTRIBUTES,
    BY_TAG,
    Attribute,
    Level,
    Match,
    fold_case,
    name_words,
    parse_da,
    parse_tm,
)
from indexer.extended_tags import ExtendedTag
from indexer.extended_values import INT_RANGE, dt_bounds, float32
from indexer.levels import COMMON, SERIES_LEVEL, STUDY_LEVEL


class QueryError(ValueError):
    """A query the archive cannot run; the message names the parameter (the HTTP layer answers 400)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


class _All(enum.Enum):
    ALL = "all"


ALL: Literal[_All.ALL] = _All.ALL
"""`QidoQuery.include` value for includefield=all."""

Include = frozenset[int] | Literal[_All.ALL]

# --- parsed match terms: what one value of a value list asks for -------------------------------------


@dataclass(frozen=True, slots=True)
class Exact:
    """Single value matching (UIDs, strings, case-folded PN, integers, floats)."""

    value: str | int | float


@dataclass(frozen=True, slots=True)
class Wildcard:
    """Wild card matching: `*` any run of characters, `?` exactly one (pattern already case-folded for PN)."""

    pattern: str


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive DA, TM or DT range; an open end is None. A single DA value is a range with equal ends."""

    low: dt.date | dt.time | dt.datetime | None
    high: dt.date | dt.time | dt.datetime | None


@dataclass(frozen=True, slots=True)
class Words:
    """Fuzzy PN matching: every word must begin some component of the stored name."""

    words: tuple[str, ...]


Term = Exact | Wildcard | Range | Words


@dataclass(frozen=True, slots=True)
class ExtendedAttribute(Attribute):
    """An extended query tag as a matching key: `column` names its value table."""

    tag_key: int = 0
    private: bool = False  # found through its private creator (not kept in ext_element)


_EXTENDED_MATCH = {
    **dict.fromkeys(("AE", "AS", "CS", "LO", "SH"), Match.STRING),
    "UI": Match.UID,
    "PN": Match.PN,
    "DA": Match.DATE,
    "TM": Match.TIME,
    "DT": Match.TIME,  # ranges; bounds come from _datetime_bounds
    **dict.fromkeys(("IS", "SL", "SS", "UL", "US", "DS", "FD", "FL"), Match.INT),  # equality
}


def extended_attribute(tag: ExtendedTag) -> ExtendedAttribute:
    return ExtendedAttribute(
        tag.keyword,
        tag.tag,
        tag.vr,
        tag.level,
        tag.table,
        _EXTENDED_MATCH[tag.vr],
        tag_key=tag.tag_key,
        private=tag.private_creator is not None,
    )


@dataclass(frozen=True, slots=True)
class Filter:
    """One matching key with a non-universal value: the entity matches when any term matches."""

    param: str  # the name as the client gave it, for messages
    attribute: Attribute
    terms: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class QidoQuery:
    level: Level
    study_uid: str | None
    series_uid: str | None
    filters: tuple[Filter, ...]
    include: Include  # includefield tags, or ALL
    fuzzy: bool
    limit: int
    offset: int
    # tags of all matching keys, universal ones included: PS3.18 returns them with each result
    match_tags: frozenset[int] = field(default_factory=frozenset)
    # extended query tags among the matching keys that have indexing errors (results may be incomplete)
    erroneous: tuple[str, ...] = ()
    # instance-level public extended query tags among the matching keys, (GGGGEEEE, tag_key): their
    # members come from ext_element (migration 0013), not from the metadata
    elements: tuple[tuple[str, int], ...] = ()

    @property
    def scope(self) -> tuple[str | None, str | None]:
        return self.study_uid, self.series_uid


# --- return keys (PS3.18 Table 10.6.3-3, -4, -5) -------------------------------------------------------

RETRIEVE_URL = "00081190"
INSTANCE_AVAILABILITY = "00080056"
MODALITIES_IN_STUDY = "00080061"
STUDY_SERIES = "00201206"
STUDY_INSTANCES = "00201208"
SERIES_INSTANCES = "00201209"
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"

STUDY_DEFAULTS = frozenset(
    {
        "00080005", "00080020", "00080030", "00080050", INSTANCE_AVAILABILITY, MODALITIES_IN_STUDY,
        "00080090", "00080201", RETRIEVE_URL, "00100010", "00100020", "00100030", "00100040", STUDY_UID,
        "00200010", STUDY_SERIES, STUDY_INSTANCES,
    }
)  # fmt: skip
SERIES_DEFAULTS = frozenset(
    {
        "00080005", "00080060", "00080201", "0008103E", RETRIEVE_URL, SERIES_UID, "00200011",
        SERIES_INSTANCES, "00400244", "00400245", "00400275",
    }
)  # fmt: skip
INSTANCE_DEFAULTS = frozenset(
    {
        "00080005", "00080016", SOP_UID, INSTANCE_AVAILABILITY, "00080201", RETRIEVE_URL, "00200013",
        "00280010", "00280011", "00280100", "00280008", STUDY_UID, SERIES_UID,
    }
)  # fmt: skip

_COMPUTED_STUDY = frozenset({MODALITIES_IN_STUDY, STUDY_SERIES, STUDY_INSTANCES})
_COMPUTED = _COMPUTED_STUDY | {SERIES_INSTANCES, INSTANCE_AVAILABILITY, RETRIEVE_URL}

STORED_MEMBERS = (STUDY_DEFAULTS | SERIES_DEFAULTS | INSTANCE_DEFAULTS) - _COMPUTED
"""Members of an instance's default result kept pre-encoded in instance_qido (migration 0010: same list)."""
_STORED_ORDER = tuple(sorted(STORED_MEMBERS))
_MEMBER_SEPARATOR = b"\x01"  # compact JSON never holds a raw control character


def stored_members(attrs: Mapping[str, Any]) -> bytes | None:
    """instance_qido.members of an instance: its stored members' JSON texts in tag order, as migration 0010's
    qido_instance_members cuts them from the metadata. None when one holds a BulkDataURI (its absolute form
    depends on the request's URL), or when there is none: QIDO then reads the metadata."""
    parts = []
    for key in _STORED_ORDER:
        element = attrs.get(key)
        if element is not None:
            text = orjson.dumps(element)
            if b"BulkDataURI" in text:
                return None
            parts.append(b'"' + key.encode() + b'":' + text)
    return _MEMBER_SEPARATOR.join(parts) if parts else None


_RANK = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
_MODALITY = BY_TAG[0x00080060]
_MODALITIES_IN_STUDY = BY_TAG[0x00080061]
_RESERVED = ("includefield", "fuzzymatching", "limit", "offset")
MAX_OFFSET = 2**31 - 1  # an int column's range: PostgreSQL refuses a larger OFFSET parameter


def _tag_level(key: str) -> Level | None:
    """The level whose attrs blob holds an attribute (levels.py); None for SOP Common (every level)."""
    if key in COMMON:
        return None
    if key.startswith("0010") or key in STUDY_LEVEL:
        return Level.STUDY
    if key in SERIES_LEVEL:
        return Level.SERIES
    return Level.INSTANCE


# --- parsing ------------------------------------------------------------------------------------------


def parse_query(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    default_limit: int = 100,
    max_limit: int = 1000,
    extended: Mapping[int, ExtendedTag] | None = None,
) -> QidoQuery:
    """Validate the query pairs of a search at `level` within the path's scope; QueryError when malformed.

    `extended` holds the defined extended query tags by tag number (indexer.extended_tags.query_tags).
    """
    if series_uid is not None and (study_uid is None or level is not Level.INSTANCE):
        raise ValueError("a series scope needs a study scope and an instance-level search")
    if study_uid is not None and level is Level.STUDY:
        raise ValueError("a study-level search has no study scope")
    seen: set[str] = set()
    seen_tags: dict[int, str] = {}
    pending: list[tuple[str, Attribute, str]] = []
    match_tags: set[int] = set()
    erroneous: list[str] = []
    elements: list[tuple[str, int]] = []
    include: set[int] = set()
    include_all = False
    fuzzy_raw: tuple[str, str] | None = None
    limit, offset = min(default_limit, max_limit), 0
    for name, value in params:
        if "\x00" in value or "\x00" in name:
            raise QueryError(name.replace("\x00", "\\x00"), "NUL characters are not allowed")
        lowered = name.lower()
        if lowered in _RESERVED:
            if lowered == "includefield":
                for item in value.split(","):
                    item = item.strip()
                    if item.lower() == "all":
                        include_all = True
                    elif item:
                        include.add(_parse_attribute_id(name, item))
                continue
            if lowered in seen:
                raise QueryError(name, "given more than once")
            seen.add(lowered)
            if lowered == "fuzzymatching":
                fuzzy_raw = (name, value)
            elif lowered == "limit":
                limit = min(_parse_count(name, value, minimum=1), max_limit)
            else:
                offset = _parse_count(name, value, minimum=0)
                if offset > MAX_OFFSET:
                    raise QueryError(name, f"must be at most {MAX_OFFSET}")
            continue
        tag = _parse_attribute_id(name, name)
        if tag in seen_tags:
            raise QueryError(name, f"matching key given more than once (also as {seen_tags[tag]!r})")
        seen_tags[tag] = name
        attribute = _searchable(level, name, tag, extended or {})
        match_tags.add(attribute.tag)
        if isinstance(attribute, ExtendedAttribute):
            if extended and extended[tag].error_count:
                erroneous.append(extended[tag].keyword)
            if attribute.level is Level.INSTANCE and not attribute.private:
                elements.append((tag_hex(attribute.tag), attribute.tag_key))
        # fuzzymatching may come after the keys it affects: values are parsed once it is known
        pending.append((name, attribute, value))
    fuzzy = False
    if fuzzy_raw is not None:
        text = fuzzy_raw[1].strip().lower()
        if text not in ("true", "false"):
            raise QueryError(fuzzy_raw[0], "must be true or false")
        fuzzy = text == "true"
    parsed: list[Filter] = []
    for param, attribute, value in pending:
        terms = _parse_value(param, attribute, value, fuzzy)
        if terms is not None:
            parsed.append(Filter(param, attribute, terms))
    return QidoQuery(
        level=level,
        study_uid=study_uid,
        series_uid=series_uid,
        filters=tuple(parsed),
        include=ALL if include_all else frozenset(include),
        fuzzy=fuzzy,
        limit=limit,
        offset=offset,
        match_tags=frozenset(match_tags),
        erroneous=tuple(erroneous),
        elements=tuple(sorted(elements)),
    )


def names_extended_tags(params: Sequence[tuple[str, str]]) -> bool:
    """Whether some matching key is not a standard one (so extended query tag definitions are needed);
    standard searches then skip loading them."""
    for name, _ in params:
        if name.lower() in _RESERVED:
            continue
        try:
            if parse_tag(name) not in BY_TAG:
                return True
        except UnknownAttributeError:
            continue
    return False


def _parse_attribute_id(param: str, text: str) -> int:
    if "." in text:
        raise QueryError(param, f"sequence attribute paths ({text!r}) are not supported")
    try:
        return parse_tag(text)
    except UnknownAttributeError:
        if param == text:
            raise QueryError(
                param,
                "unknown query parameter: not a DICOM keyword or GGGGEEEE tag, nor includefield, "
                f"fuzzymatching, limit or offset{did_you_mean(text)}",
            ) from None
        raise QueryError(
            param, f"unknown attribute {text!r}: not a DICOM keyword or GGGGEEEE tag{did_you_mean(text)}"
        ) from None


def _searchable(level: Level, param: str, tag: int, extended: Mapping[int, ExtendedTag]) -> Attribute:
    attribute = BY_TAG.get(tag)
    if attribute is None and tag in extended:
        ext = extended[tag]
        if ext.status != "Ready":
            raise QueryError(
                param, f"extended query tag {ext.path} is not ready for queries (status {ext.status})"
            )
        if ext.query_status != "Enabled":
            raise QueryError(
                param,
                f"extended query tag {ext.path} is disabled (QueryStatus Disabled after indexing errors;"
                " PATCH its QueryStatus to Enabled to query it anyway)",
            )
        attribute = extended_attribute(ext)
    if level is Level.STUDY and attribute is _MODALITY:
        return _MODALITIES_IN_STUDY  # "studies with a series of this modality", a common client habit
    if attribute is None or _RANK[attribute.level] > _RANK[level]:
        searchable = ", ".join(a.keyword for a in ATTRIBUTES if _RANK[a.level] <= _RANK[level])
        raise QueryError(
            param,
            f"not a matching key of {level.value} searches (use one of: {searchable},"
            f" or an extended query tag of this level or above)",
        )
    return attribute


def _parse_count(param: str, value: str, *, minimum: int) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise QueryError(param, f"{value!r} is not a non-negative integer")
    number = int(text)
    if number < minimum:
        raise QueryError(param, f"must be at least {minimum}")
    return number


def _split(attribute: Attribute, raw: str) -> list[str]:
    """The values of a value list; `,` separates only where a value cannot contain one (UI, CS, IS)."""
    if attribute.vr in ("UI", "CS", "IS", "SL", "SS", "UL", "US"):
        return re.split(r"[\\,]", raw)
    return raw.split("\\")


def _parse_value(param: str, attribute: Attribute, raw: str, fuzzy: bool) -> tuple[Term, ...] | None:
    """The terms of one matching key, or None for universal matching."""
    values = []
    for item in _split(attribute, raw):
        # trailing spaces are padding (PS3.5 6.2); CS leading spaces too
        item = item.strip() if attribute.vr in _LEADING_PAD else item.rstrip(" ")
        if not item:
            continue
        if item.strip("*") == "":
            return None  # '*' matches everything, entities without a value included
        values.append(item)
    if not values:
        return None
    terms: list[Term] = []
    for item in values:
        term = _parse_item(param, attribute, item, fuzzy)
        if term is None:
            return None
        terms.append(term)
    return tuple(dict.fromkeys(terms))


_LEADING_PAD = frozenset("CS UI DA TM IS AE AS DS DT FD FL SL SS UL US".split())


def _parse_item(param: str, attribute: Attribute, item: str, fuzzy: bool) -> Term | None:
    if isinstance(attribute, ExtendedAttribute):
        if attribute.vr == "DT":
            return _parse_range(param, item, _datetime_bounds)
        if attribute.vr in ("DS", "FD", "FL"):
            return Exact(_parse_float(param, attribute.vr, item))
        if attribute.vr in INT_RANGE:
            if re.fullmatch(r"[+-]?[0-9]+", item) is None:
                raise QueryError(param, f"{item!r} is not an integer ({attribute.vr})")
            low, high = INT_RANGE[attribute.vr]
            if not low <= int(item) <= high:
                raise QueryError(param, f"{item!r} is out of the range of {attribute.vr}")
            return Exact(int(item))
    match attribute.match:
        case Match.UID:
            if not is_valid_uid(item):
                raise QueryError(param, f"{item!r} is not a valid UID")
            return Exact(item)
        case Match.STRING | Match.MULTI:
            return Wildcard(item) if _has_wildcard(item) else Exact(item)
        case Match.PN:
            if fuzzy:
                words = tuple(dict.fromkeys(name_words(item.replace("*", "").replace("?", ""))))
                return Words(words) if words else None
            alphabetic = item.split("=", 1)[0]
            if not alphabetic:
                raise QueryError(
                    param, "only the alphabetic name group can be matched (or use fuzzymatching=true)"
                )
            folded = fold_case(alphabetic)
            return Wildcard(folded) if _has_wildcard(folded) else Exact(folded)
        case Match.INT:
            if re.fullmatch(r"[+-]?[0-9]+", item) is None:
                raise QueryError(param, f"{item!r} is not an integer (IS)")
            number = int(item)
            if not -(2**31) <= number < 2**31:
                raise QueryError(param, f"{item!r} is out of the IS range")
            return Exact(number)
        case Match.DATE:
            return _parse_range(param, item, _date_bounds)
        case Match.TIME:
            return _parse_range(param, item, _time_bounds)
    raise AssertionError(attribute.match)  # pragma: no cover


def _parse_float(param: str, vr: str, item: str) -> float:
    if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", item) is None:
        raise QueryError(param, f"{item!r} is not a number ({vr})")
    value = float(item)
    if value in (float("inf"), float("-inf")):
        raise QueryError(param, f"{item!r} is out of the range of {vr}")
    return float32(value) if vr == "FL" else value


def _datetime_bounds(param: str, text: str) -> tuple[dt.datetime, dt.datetime]:
    bounds = dt_bounds(text) if "-" not in text and "+" not in text else None
    if bounds is None:
        raise QueryError(param, f"{text!r} is not a date-time (YYYY[MM[DD[HH[MM[SS[.F]]]]]]) or range")
    return bounds


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def _parse_range(param: str, item: str, bounds: Any) -> Range:
    if "-" not in item:
        low, high = bounds(param, item)
        return Range(low, high)
    first, _, second = item.partition("-")
    first, second = first.strip(), second.strip()
    if not first and not second:
        raise QueryError(param, f"{item!r}: a range needs at least one end")
    low = bounds(param, first)[0] if first else None
    high = bounds(param, second)[1] if second else None
    if low is not None and high is not None and low > high:
        raise QueryError(param, f"{item!r}: the range ends before it starts")
    return Range(low, high)


def _date_bounds(param: str, text: str) -> tuple[dt.date, dt.date]:
    value = parse_da(text) if re.fullmatch(r"[0-9]{8}", text) else None
    if value is None:
        raise QueryError(param, f"{text!r} is not a date (YYYYMMDD) or date range")
    return value, value


_TM_QUERY = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")


def _time_bounds(param: str, text: str) -> tuple[dt.time, dt.time]:
    """First and last instant of the interval a TM value denotes at its precision."""
    m = _TM_QUERY.fullmatch(text)
    low = parse_tm(text) if m else None
    if m is None or low is None:
        raise QueryError(param, f"{text!r} is not a time (HH[MM[SS[.F]]]) or time range")
    _, mm, ss, frac = m.groups()
    if mm is None:
        return low, low.replace(minute=59, second=59, microsecond=999_999)
    if ss is None:
        return low, low.replace(second=59, microsecond=999_999)
    if frac is None:
        return low, low.replace(microsecond=999_999)
    return low, low.replace(microsecond=low.microsecond + 10 ** (6 - len(frac)) - 1)


# --- SQL compilation --------------------------------------------------------------------------------------

_ALIAS = {Level.STUDY: "st", Level.SERIES: "se", Level.INSTANCE: "i"}


class _Args:
    """Positional parameters of one statement: user values only ever reach SQL through here."""

    def __init__(self, first: object) -> None:
        self.values: list[object] = [first]

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _successor(prefix: str) -> str | None:
    """The smallest string above every string that starts with prefix (code point = C collation order)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code == 0xD800:
            code = 0xE000  # surrogates cannot be stored
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _wildcard_sql(column: str, pattern: str, args: _Args) -> str:
    """Wild card matching as LIKE, led by a prefix range so a btree on a COLLATE "C" column applies.

    The range is explicit rather than left to the planner, which derives it from LIKE only for constants:
    generic plans of prepared statements (asyncpg) would lose the index.
    """
    cut = min((i for i in (pattern.find("*"), pattern.find("?")) if i >= 0), default=len(pattern))
    prefix, rest = pattern[:cut], pattern[cut:]
    conditions = []
    if prefix:
        conditions.append(f"{column} >= {args.add(prefix)}")
        upper = _successor(prefix)
        if upper is not None:
            conditions.append(f"{column} < {args.add(upper)}")
    if not prefix or rest.strip("*"):
        like = "".join("%" if c == "*" else "_" if c == "?" else _like_escape(c) for c in pattern)
        conditions.append(f"{column} LIKE {args.add(like)}")
    return " AND ".join(conditions)


_ROW_KEY = {Level.STUDY: "study_key", Level.SERIES: "series_key", Level.INSTANCE: "instance_key"}
_ARRAY_TYPE = {"ext_long": "int8[]", "ext_double": "float8[]"}


def _terms_sql(f: Filter, args: _Args, column: str) -> str:
    """The OR of a matching key's terms on `column`, exact values folded into one `= ANY` (`&&` for
    multi-valued columns)."""
    attribute = f.attribute
    extended = isinstance(attribute, ExtendedAttribute)
    multi = attribute.match is Match.MULTI and not extended
    # every prefix of every name component (generated columns, GIN-indexed: migrations 0002 and 0005)
    prefixes = column.removesuffix("_ci") + "_prefixes"
    parts: list[str] = []
    exact = [t.value for t in f.terms if isinstance(t, Exact)]
    if multi and exact:
        parts.append(f"{column} && {args.add(exact)}::text[]")
    elif len(exact) == 1:
        parts.append(f"{column} = {args.add(exact[0])}")
    elif exact:
        if extended:
            cast = _ARRAY_TYPE.get(attribute.column, "text[]")
        else:
            cast = "int[]" if attribute.match is Match.INT else "text[]"
        parts.append(f"{column} = ANY({args.add(exact)}::{cast})")
    for t in f.terms:
        if isinstance(t, Wildcard) and multi:
            cond = _wildcard_sql("m.v", t.pattern, args)
            parts.append(f"EXISTS (SELECT FROM unnest({column}) AS m(v) WHERE {cond})")
        elif isinstance(t, Wildcard):
            parts.append(_wildcard_sql(column, t.pattern, args))
        elif isinstance(t, Range):
            parts.append(_range_sql(column, t, args))
        elif isinstance(t, Words):
            # each query word is a prefix of some component: the stored prefixes contain them all
            parts.append(f"{prefixes} @> {args.add(list(t.words))}::text[]")
    if len(parts) == 1:
        return parts[0]
    return "(" + " OR ".join(f"({p})" for p in parts) + ")"


def _value_column(attribute: ExtendedAttribute, alias: str = "x") -> str:
    return f"{alias}.value_ci" if attribute.vr == "PN" else f"{alias}.value"


def _filter_sql(f: Filter, args: _Args, rows: Mapping[Level, str] | None = None) -> str:
    """One matching key as a SQL condition.

    An extended query tag is a semijoin: EXISTS a value row of the tag for the level's row that matches.
    The value tables' match indexes find the matching rows; (row_key, tag_key) checks a given row (the
    planner picks whichever the estimates favour). `rows` overrides the level rows' key expressions
    (default: the key columns of the st, se and i aliases)."""
    attribute = f.attribute
    if not isinstance(attribute, ExtendedAttribute):
        return _terms_sql(f, args, f"{_ALIAS[attribute.level]}.{attribute.column}")
    row = (rows or {}).get(attribute.level) or f"{_ALIAS[attribute.level]}.{_ROW_KEY[attribute.level]}"
    return (
        f"EXISTS (SELECT FROM {attribute.column} x WHERE x.tag_key = {args.add(attribute.tag_key)}"
        f" AND x.row_key = {row} AND {_terms_sql(f, args, _value_column(attribute))})"
    )


def _range_sql(column: str, r: Range, args: _Args) -> str:
    if r.low is not None and r.low == r.high:
        return f"{column} = {args.add(r.low)}"
    if r.low is not None and r.high is not None:
        return f"{column} BETWEEN {args.add(r.low)} AND {args.add(r.high)}"
    if r.low is not None:
        return f"{column} >= {args.add(r.low)}"
    return f"{column} <= {args.add(r.high)}"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What each result returns, decided once per request."""

    keys: frozenset[str]  # default, matching and includefield keys, from whichever source holds them
    ordered: tuple[str, ...]  # the same, sorted: results list attributes in tag order
    computed: frozenset[str]  # the keys whose values come from the row's columns, not from a blob
    all_own: bool  # includefield=all: every attribute of the result's level as well
    extra: frozenset[str]  # includefield keys below the level: read from a representative instance
    study_attrs: bool  # series level: some key lives in the study's attrs blob
    # the stored members (instance_qido, or the level's `members` column) a result takes, as their quoted
    # tags; None when it must parse blobs (includefield=all, or keys from a representative instance).
    # Instance level: `from_metadata` are its other keys, which only the metadata holds.
    members: frozenset[bytes] | None = None
    all_members: bool = False
    from_metadata: tuple[str, ...] = ()
    elements: tuple[tuple[str, int], ...] = ()  # instance level: members read from ext_element


def _plan(query: QidoQuery) -> _Plan:
    level = query.level
    keys: set[str] = set()
    if level is Level.STUDY:
        keys |= STUDY_DEFAULTS
    elif level is Level.SERIES:
        keys |= SERIES_DEFAULTS
        if query.study_uid is None:
            keys |= STUDY_DEFAULTS
    else:
        keys |= INSTANCE_DEFAULTS
        if query.series_uid is None:
            keys |= SERIES_DEFAULTS
        if query.study_uid is None:
            keys |= STUDY_DEFAULTS
    keys |= {tag_hex(t) for t in query.match_tags}
    explicit = set() if query.include is ALL else {tag_hex(t) for t in query.include}
    keys |= explicit
    extra: set[str] = set()
    if level is not Level.INSTANCE:
        # includefield keys, and matching keys of extended query tags not kept in the level's attrs blob
        for key in (explicit | {tag_hex(t) for t in query.match_tags}) - _COMPUTED:
            owner = _tag_level(key)
            if owner is not None and _RANK[owner] > _RANK[level]:
                extra.add(key)
    computed = keys & _COMPUTED
    if level is Level.STUDY:
        computed.discard(SERIES_INSTANCES)
    if level is Level.SERIES:
        # the unique key of the level above, as in hierarchical C-FIND responses; a column of the row
        keys.add(STUDY_UID)
        computed.add(STUDY_UID)
    study_attrs = level is Level.SERIES and any(_tag_level(k) is Level.STUDY for k in keys - computed)
    members = None
    stored = keys - computed
    elements = query.elements if level is Level.INSTANCE and query.include is not ALL else ()
    if stored - STORED_MEMBERS - {k for k, _ in elements}:
        elements = ()  # the metadata is read anyway: take the extended tags' elements from it too
    if level is Level.INSTANCE and query.include is not ALL:
        members = frozenset(f'"{k}"'.encode() for k in stored & STORED_MEMBERS)
    elif level is not Level.INSTANCE and query.include is not ALL and not extra:
        members = frozenset(f'"{k}"'.encode() for k in stored)
    return _Plan(
        keys=frozenset(keys),
        ordered=tuple(sorted(keys)),
        computed=frozenset(computed),
        all_own=query.include is ALL,
        extra=frozenset(extra),
        study_attrs=study_attrs,
        members=members,
        all_members=level is Level.INSTANCE and members is not None and STORED_MEMBERS <= stored,
        from_metadata=(
            tuple(sorted(stored - STORED_MEMBERS - {k for k, _ in elements}))
            if level is Level.INSTANCE and members
            else ()
        ),
        elements=elements,
    )


_STUDY_COLUMNS = "st.study_key, st.study_instance_uid, st.modalities, st.series_count, st.instance_count"
_INSTANCE_SELECT = (
    f"{_STUDY_COLUMNS}, se.series_key, se.series_instance_uid, se.instance_count AS series_instances,"
    " i.sop_instance_uid"
)
# a scalar subquery rather than a join: one fewer relation for the planner (measured: a LEFT JOIN cost
# ~1 ms more PostgreSQL CPU per search, most of it planning)
_MEMBERS = "(SELECT q.members FROM instance_qido q WHERE q.instance_key = {0}.instance_key) AS members"


def _level_select(level: Level, plan: _Plan) -> str:
    """Columns of a study or series result: the stored members, and the attrs blobs only for rows that
    have no members (then _result parses the blobs)."""
    study = level is Level.STUDY or plan.study_attrs
    blobs = (["st"] if study else []) + (["se"] if level is Level.SERIES else [])
    names = {"st": "study", "se": "series"}
    if plan.members is None:
        return ", ".join(f"{a}.attrs AS {names[a]}_attrs" for a in blobs)
    missing = " OR ".join(f"{a}.members IS NULL" for a in blobs)
    return ", ".join(
        f"{a}.members AS {names[a]}_members, CASE WHEN {missing} THEN {a}.attrs END AS {names[a]}_attrs"
        for a in blobs
    )


def _instance_select(plan: _Plan, alias: str = "i") -> str:
    """Columns of an instance result: the stored members, and the metadata when they do not suffice (keys
    outside them). Rows without stored members get their metadata from _missing_metadata.

    alias "p": the page of _compile_instance_page, without the instance row (its SOP Instance UID comes
    from the members, see _with_sop_uids)."""
    if plan.members is None:
        return f"{_INSTANCE_SELECT}, i.metadata"
    if plan.from_metadata:
        return f"{_INSTANCE_SELECT}, {_MEMBERS.format('i')}, i.metadata"
    # tag keys are integers from the definitions, not user input
    elements = "".join(
        f", (SELECT e.member FROM ext_element e WHERE e.tag_key = {int(tag_key)}"
        f" AND e.row_key = {alias}.instance_key) AS ext_{n}"
        for n, (_, tag_key) in enumerate(plan.elements)
    )
    columns = _INSTANCE_SELECT.removesuffix(", i.sop_instance_uid") if alias == "p" else _INSTANCE_SELECT
    return f"{columns}, {_MEMBERS.format(alias)}{elements}, {alias}.instance_key"


def _compile(query: QidoQuery, partition_key: int, plan: _Plan) -> tuple[str, list[object]]:
    """One SELECT for the page (limit + 1 rows, to tell whether more follow)."""
    level = query.level
    if level is Level.INSTANCE and any(isinstance(f.attribute, ExtendedAttribute) for f in query.filters):
        return _compile_instance_page(query, partition_key, plan)
    if level is Level.STUDY and _study_page_applies(query):
        return _compile_study_page(query, partition_key, plan)
    args = _Args(partition_key)
    # every joined table is constrained: the (partition_key, column) indexes then apply to all of them
    where = [f"{_ALIAS[lvl]}.partition_key = $1" for lvl in Level if _RANK[lvl] <= _RANK[level]]
    if query.study_uid is not None:
        where.append(f"st.study_instance_uid = {args.add(query.study_uid)}")
    if query.series_uid is not None:
        where.append(f"se.series_instance_uid = {args.add(query.series_uid)}")
    where.extend(_filter_sql(f, args) for f in query.filters)
    study_cols = _STUDY_COLUMNS
    if level is Level.STUDY:
        select = f"{study_cols}, {_level_select(level, plan)}"
        source = "study st"
        order = "st.study_key"
    elif level is Level.SERIES:
        select = (
            f"{study_cols}, se.series_key, se.series_instance_uid, se.instance_count AS series_instances,"
            f" {_level_select(level, plan)}"
        )
        source = "series se JOIN study st ON st.study_key = se.study_key"
        order = "se.study_key, se.series_number, se.series_key"
    else:
        select = _instance_select(plan)
        source = (
            "instance i JOIN series se ON se.series_key = i.series_key"
            " JOIN study st ON st.study_key = i.study_key"
        )
        order = "i.series_key, i.instance_number, i.instance_key"
    sql = (
        f"SELECT {select} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order}"
        f" LIMIT {args.add(query.limit + 1)} OFFSET {args.add(query.offset)}"
    )
    return sql, args.values


_STUDY_PAGE_COLUMNS = frozenset({"study_date", "modalities"})


def _study_page_applies(query: QidoQuery) -> bool:
    """Whether the page's keys come from the covering index study_page (migration 0010): every filter runs
    on it (StudyDate, ModalitiesInStudy), or there is none."""
    return all(
        not isinstance(f.attribute, ExtendedAttribute) and f.attribute.column in _STUDY_PAGE_COLUMNS
        for f in query.filters
    )


def _compile_study_page(query: QidoQuery, partition_key: int, plan: _Plan) -> tuple[str, list[object]]:
    """Study search on StudyDate / ModalitiesInStudy only (or none): the page's keys first, then its rows.

    The keys come from an index-only scan of study_page in study_key order, filtered on the index tuples, so
    the scan stops after the page; only the page's rows are read whole. Reading whole rows in study_key
    order until 101 match read ~10,000 of them for ModalitiesInStudy=MR and a one-year range.
    """
    args = _Args(partition_key)
    where = ["st.partition_key = $1", *(_filter_sql(f, args) for f in query.filters)]
    sql = (
        "WITH page AS MATERIALIZED (SELECT st.study_key FROM study st"
        f" WHERE {' AND '.join(where)} ORDER BY st.study_key"
        f" LIMIT {args.add(query.limit + 1)} OFFSET {args.add(query.offset)})"
        f" SELECT {_STUDY_COLUMNS}, {_level_select(Level.STUDY, plan)} FROM page p JOIN study st"
        " ON st.study_key = p.study_key ORDER BY p.study_key"
    )
    return sql, args.values


def _compile_instance_page(query: QidoQuery, partition_key: int, plan: _Plan) -> tuple[str, list[object]]:
    """Instance search with extended query tags: the page's keys first, then its rows.

    An extended tag can match thousands of instances, and all of them must be ordered before the page is
    cut. The page's keys come from the value index of an instance-level tag alone (_driven_page_keys), or,
    when only study/series-level tags are named, from the covering index instance_page (migration 0005);
    only the page's 101 rows are then read. Fetching every candidate's row first costs one random heap
    read each (10x slower at 3,000).
    """
    args = _Args(partition_key)
    driver = _driver(query)
    keys = _page_keys(query, args) if driver is None else _driven_page_keys(query, driver, args)
    cut = f"LIMIT {args.add(query.limit + 1)} OFFSET {args.add(query.offset)}"
    page = f"WITH page AS MATERIALIZED ({keys} {cut})"
    order = " ORDER BY p.series_key, p.instance_number, p.instance_key"
    if plan.members is not None and not plan.from_metadata:
        # every column but the SOP Instance UID is in the page, the level rows and the stored members: one
        # random heap read fewer per result (the instance rows are wide, and a page's are far apart)
        return (
            f"{page} SELECT {_instance_select(plan, 'p')} FROM page p"
            " JOIN series se ON se.series_key = p.series_key JOIN study st ON st.study_key = p.study_key"
            f"{order}",
            args.values,
        )
    sql = (
        f"{page} SELECT {_instance_select(plan)} FROM page p"
        " JOIN instance i ON i.instance_key = p.instance_key"
        f" JOIN series se ON se.series_key = i.series_key JOIN study st ON st.study_key = i.study_key{order}"
    )
    return sql, args.values


def _driver(query: QidoQuery) -> Filter | None:
    """The instance-level extended tag whose value rows drive the page: one matched by a single value if
    any (its index scan returns the rows in page order), else the first."""
    candidates = [
        f
        for f in query.filters
        if isinstance(f.attribute, ExtendedAttribute) and f.attribute.level is Level.INSTANCE
    ]
    single = [f for f in candidates if len(f.terms) == 1 and isinstance(f.terms[0], Exact)]
    return (single or candidates or [None])[0]


def _scope_joins(
    query: QidoQuery, levels: set[Level], series: str, study: str
) -> tuple[list[str], list[str]]:
    """Joins of the series/study rows that filters or the path's UIDs need, with their conditions."""
    if query.study_uid is not None:
        levels.add(Level.STUDY)
    if query.series_uid is not None:
        levels.add(Level.SERIES)
    joins, where = [], []
    if Level.SERIES in levels:
        joins.append(f"JOIN series se ON se.series_key = {series}")
        where.append("se.partition_key = $1")
    if Level.STUDY in levels:
        joins.append(f"JOIN study st ON st.study_key = {study}")
        where.append("st.partition_key = $1")
    return joins, where


def _scope_where(query: QidoQuery, args: _Args) -> list[str]:
    where = []
    if query.study_uid is not None:
        where.append(f"st.study_instance_uid = {args.add(query.study_uid)}")
    if query.series_uid is not None:
        where.append(f"se.series_instance_uid = {args.add(query.series_uid)}")
    return where


def _page_keys(query: QidoQuery, args: _Args) -> str:
    """The page's keys from instance_page, every filter a condition on the instance or its level rows."""
    joins, where = _scope_joins(
        query, {f.attribute.level for f in query.filters}, "i.series_key", "i.study_key"
    )
    where = ["i.partition_key = $1", *where, *_scope_where(query, args)]
    where.extend(_filter_sql(f, args) for f in query.filters)
    return (
        "SELECT i.instance_key, i.study_key, i.series_key, i.instance_number"
        f" FROM instance i {' '.join(joins)} WHERE {' AND '.join(where)}"
        " ORDER BY i.series_key, i.instance_number, i.instance_key"
    )


def _driven_page_keys(query: QidoQuery, driver: Filter, args: _Args) -> str:
    """The page's keys from the driver's value rows, which carry the instance's sort key, partition and
    study (migration 0014): its match index (tag_key, value, series_key, instance_number, row_key)
    INCLUDE (partition_key, study_key) gives a single value's rows in page order (the scan stops after the
    page) and a range's as index-only tuples for a top-N sort, without probing the instances. Other keys
    are conditions on the value row's level keys (alias v: the semijoins of _filter_sql use x); the
    instance row is joined only for standard instance-level keys."""
    attribute = driver.attribute
    assert isinstance(attribute, ExtendedAttribute)
    others = [f for f in query.filters if f is not driver]
    standard = {f.attribute.level for f in others if not isinstance(f.attribute, ExtendedAttribute)}
    joins, where = _scope_joins(query, set(standard), "v.series_key", "v.study_key")
    if Level.INSTANCE in standard:
        joins.insert(0, "JOIN instance i ON i.instance_key = v.row_key")
    where = [
        f"v.tag_key = {args.add(attribute.tag_key)}",
        _terms_sql(driver, args, _value_column(attribute, "v")),
        "v.partition_key = $1",  # NULL in rows of study/series-level tags
        *where,
        *_scope_where(query, args),
    ]
    rows = {Level.INSTANCE: "v.row_key", Level.SERIES: "v.series_key", Level.STUDY: "v.study_key"}
    where.extend(_filter_sql(f, args, rows) for f in others)
    # one value row per instance, unless several values of one instance can match
    distinct = "" if len(driver.terms) == 1 and isinstance(driver.terms[0], Exact) else "DISTINCT "
    return (
        f"SELECT {distinct}v.row_key AS instance_key, v.study_key, v.series_key, v.instance_number"
        f" FROM {attribute.column} v {' '.join(joins)} WHERE {' AND '.join(where)}"
        " ORDER BY v.series_key, v.instance_number, v.row_key"
    )


_REPRESENTATIVE = {
    # the latest stored instance of each study/series: one statement per page, index (…_key, instance_key)
    Level.STUDY: "study_key",
    Level.SERIES: "series_key",
}


async def _representatives(
    conn: asyncpg.Connection, level: Level, keys: list[int]
) -> dict[int, tuple[str, str, str, bytes]]:
    column = _REPRESENTATIVE[level]
    rows = await conn.fetch(
        f"""SELECT r.k, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.metadata
            FROM unnest($1::bigint[]) AS r(k)
            CROSS JOIN LATERAL (SELECT x.study_key, x.series_key, x.sop_instance_uid, x.metadata
                                FROM instance x WHERE x.{column} = r.k
                                ORDER BY x.instance_key DESC LIMIT 1) AS i
            JOIN series se ON se.series_key = i.series_key
            JOIN study st ON st.study_key = i.study_key""",
        keys,
    )
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


# --- execution and result shaping ----------------------------------------------------------------------


@dataclass(slots=True)
class QidoPage:
    results: list[Any]  # DICOM JSON objects: dicts, or orjson.Fragment when asked for encoded results
    more: bool  # further matches follow this page (PS3.18: the server may warn "there are more results")


async def search(conn: asyncpg.Connection, partition_key: int, query: QidoQuery, base_url: str) -> list[dict]:
    """The page of matches as DICOM JSON objects (ready for orjson), in the documented order."""
    return (await search_page(conn, partition_key, query, base_url)).results


async def search_page(
    conn: asyncpg.Connection, partition_key: int, query: QidoQuery, base_url: str, *, encoded: bool = False
) -> QidoPage:
    """Like search, and tells whether more matches follow the page.

    encoded=True: results built from stored members are orjson.Fragments (JSON text, for orjson.dumps)
    rather than dicts, so the HTTP layer serialises them without parsing them first.
    """
    plan = _plan(query)
    sql, args = _compile(query, partition_key, plan)
    if conn.is_in_transaction():
        rows, reps = await _fetch(conn, query, plan, sql, args)
    else:
        # one snapshot for the page and its representative instances
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows, reps = await _fetch(conn, query, plan, sql, args)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    base = base_url.rstrip("/")
    if plan.members is None:
        return QidoPage([_result(query.level, plan, row, reps, base) for row in rows], more)
    wrap = orjson.Fragment if encoded else orjson.loads
    level = query.level
    if level is Level.INSTANCE:
        stored = [not _needs_metadata(plan, row) for row in rows]
    else:
        column = "study_members" if level is Level.STUDY else "series_members"
        stored = [
            row[column] is not None and (not plan.study_attrs or row["study_members"] is not None)
            for row in rows
        ]
    results = [
        wrap(_stored(plan, row, base) if level is Level.INSTANCE else _stored_level(level, plan, row, base))
        if ok
        else _result(level, plan, row, reps, base)
        for row, ok in zip(rows, stored, strict=True)
    ]
    return QidoPage(results, more)


async def matching_study_uids(
    conn: asyncpg.Connection, partition_key: int, query: QidoQuery, cap: int
) -> list[str]:
    """The Study Instance UID of every study a study-level query matches (its limit and offset ignored), in
    study_key order, at most `cap` of them: a research cohort in one statement, on the same conditions as a
    page. Paging a cohort of 16,000 studies 1,000 at a time with OFFSET re-read every earlier page and built
    each result's JSON only to take its UID (docs/performance.md, "Cohort extraction at scale")."""
    if query.level is not Level.STUDY:
        raise ValueError("a cohort is a study-level query")
    args = _Args(partition_key)
    where = ["st.partition_key = $1", *(_filter_sql(f, args) for f in query.filters)]
    sql = (
        f"SELECT st.study_instance_uid FROM study st WHERE {' AND '.join(where)}"
        f" ORDER BY st.study_key LIMIT {args.add(cap)}"
    )
    if conn.is_in_transaction():
        await conn.execute(statement_settings(query))
        rows = await conn.fetch(sql, *args.values)
    else:
        async with conn.transaction(readonly=True):  # SET LOCAL lasts for this statement only
            await conn.execute(statement_settings(query))
            rows = await conn.fetch(sql, *args.values)
    return [row[0] for row in rows]


def statement_settings(query: QidoQuery) -> str:
    """The SET LOCAL statements a search's statement runs under (in its transaction)."""
    settings = "SET LOCAL plan_cache_mode = force_custom_plan"
    if query.level is Level.INSTANCE and _driver(query) is not None:
        # A page driven by a value index reads a few thousand index tuples at most; starting parallel
        # workers took ~8 ms of a 12 ms range + PatientName page (measured: 3 ms without them).
        settings += "; SET LOCAL max_parallel_workers_per_gather = 0"
    return settings


async def _fetch(
    conn: asyncpg.Connection, query: QidoQuery, plan: _Plan, sql: str, args: list[object]
) -> tuple[list[asyncpg.Record], dict[int, tuple[str, str, str, bytes]]]:
    # Plans must see the values. asyncpg caches prepared statements, and after a few executions
    # PostgreSQL may switch to a generic plan, which cannot tell a one-day StudyDate range from a
    # ten-year one or a rare name prefix from a common one (measured: 1 ms vs 14 ms on 100,000 studies).
    await conn.execute(statement_settings(query))
    rows: list[Any] = await conn.fetch(sql, *args)
    if query.level is Level.INSTANCE and plan.members is not None and not plan.from_metadata:
        rows = await _missing_metadata(conn, plan, rows)
    reps: dict[int, tuple[str, str, str, bytes]] = {}
    if plan.extra and rows:
        key_column = "study_key" if query.level is Level.STUDY else "series_key"
        keys = [row[key_column] for row in rows[: query.limit]]
        reps = await _representatives(conn, query.level, keys)
    return rows, reps


def _needs_metadata(plan: _Plan, row: Any) -> bool:
    """Whether an instance result must be built from the metadata: no stored members (not backfilled, or a
    BulkDataURI among them), or an element of an extended tag holds a BulkDataURI (its absolute form
    depends on the request's URL)."""
    if row["members"] is None:
        return True
    for n in range(len(plan.elements)):
        member = row[f"ext_{n}"]
        if member is not None and b"BulkDataURI" in member:
            return True
    return False


async def _missing_metadata(conn: asyncpg.Connection, plan: _Plan, rows: list[Any]) -> list[Any]:
    """Rows that need their metadata (_needs_metadata) with it, and every row with its SOP Instance UID."""
    if rows and "sop_instance_uid" not in rows[0].keys():
        rows = _with_sop_uids(rows)
    missing = [
        row["instance_key"] for row in rows if row["sop_instance_uid"] is None or _needs_metadata(plan, row)
    ]
    if not missing:
        return rows
    found = {
        r["instance_key"]: r
        for r in await conn.fetch(
            "SELECT instance_key, sop_instance_uid, metadata FROM instance WHERE instance_key = ANY($1)",
            missing,
        )
    }
    # a row missing here was deleted after the page was read (its value rows can outlive it briefly: a
    # re-index batch may insert them as the instance goes)
    return [
        {**row, "metadata": f["metadata"], "sop_instance_uid": f["sop_instance_uid"]}
        if (f := found.get(row["instance_key"])) is not None
        else row
        for row in rows
        if row["instance_key"] in found or not (row["sop_instance_uid"] is None or _needs_metadata(plan, row))
    ]


_SOP_MEMBER = b'"' + SOP_UID.encode() + b'":'


def _with_sop_uids(rows: list[Any]) -> list[dict]:
    """Rows of a page read without the instance rows, with the SOP Instance UID of their stored members
    (None when they have none: _missing_metadata reads it then)."""
    out = []
    for row in rows:
        uid = None
        if row["members"] is not None:
            # a top-level member starts the members or follows a separator (nested items hold the tag too)
            padded = _MEMBER_SEPARATOR + row["members"]
            start = padded.find(_MEMBER_SEPARATOR + _SOP_MEMBER)
            if start >= 0:
                start += len(_MEMBER_SEPARATOR + _SOP_MEMBER)
                end = padded.find(_MEMBER_SEPARATOR, start)
                element = orjson.loads(padded[start : None if end < 0 else end])
                value = element.get("Value") if isinstance(element, dict) else None
                uid = value[0] if value and isinstance(value[0], str) else None
        out.append({**row, "sop_instance_uid": uid})
    return out


def _computed(key: str, row: asyncpg.Record, url: str) -> dict:
    """An attribute whose value is a column of the row (counters, modalities, UIDs) or derived (URL)."""
    if key == RETRIEVE_URL:
        return {"vr": "UR", "Value": [url]}
    if key == MODALITIES_IN_STUDY:
        modalities = list(row["modalities"])
        return {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
    if key == STUDY_SERIES:
        return {"vr": "IS", "Value": [row["series_count"]]}
    if key == STUDY_INSTANCES:
        return {"vr": "IS", "Value": [row["instance_count"]]}
    if key == SERIES_INSTANCES:
        return {"vr": "IS", "Value": [row["series_instances"]]}
    if key == INSTANCE_AVAILABILITY:
        return {"vr": "CS", "Value": ["ONLINE"]}
    if key == STUDY_UID:
        return {"vr": "UI", "Value": [row["study_instance_uid"]]}
    raise AssertionError(key)


def _absolute_bulk(element: Any, prefix: str) -> Any:
    """A copy of a DICOM JSON element whose relative BulkDataURIs (stored form) are absolute."""
    if not isinstance(element, dict):
        return element
    uri = element.get("BulkDataURI")
    if isinstance(uri, str) and uri.startswith(BULK_PATH_PREFIX):
        return {**element, "BulkDataURI": prefix + uri}
    values = element.get("Value")
    if element.get("vr") == "SQ" and values:
        items = [
            {k: _absolute_bulk(v, prefix) for k, v in item.items()} if isinstance(item, dict) else item
            for item in values
        ]
        return {**element, "Value": items}
    return element


def _instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def _member(key: str, element: Any) -> bytes:
    return b'"' + key.encode() + b'":' + orjson.dumps(element)


def _stored(plan: _Plan, row: asyncpg.Record, base: str) -> bytes:
    """An instance result as JSON text: its stored members, the computed ones and any others from the
    metadata, in tag order (every member starts with its quoted tag, so sorting the texts sorts by tag)."""
    url = _instance_url(base, row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"])
    parts = row["members"].split(_MEMBER_SEPARATOR)
    if not plan.all_members:
        parts = [m for m in parts if m[:10] in plan.members]  # type: ignore[operator]
    parts.extend(_member(key, _computed(key, row, url)) for key in plan.computed)
    for n in range(len(plan.elements)):
        member = row[f"ext_{n}"]
        if member is not None:
            parts.append(member)
    if plan.from_metadata:
        blob = row["metadata"]
        attrs = orjson.loads(blob)
        prefix = url + "/" if b"BulkDataURI" in blob else None
        for key in plan.from_metadata:
            element = attrs.get(key)
            if element is not None:
                plain = prefix is None or ("BulkDataURI" not in element and element.get("vr") != "SQ")
                parts.append(_member(key, element if plain else _absolute_bulk(element, prefix)))
    parts.sort()
    return b"{" + b",".join(parts) + b"}"


def _stored_level(level: Level, plan: _Plan, row: asyncpg.Record, base: str) -> bytes:
    """A study or series result as JSON text: the wanted members of the level's stored members (a series
    result's study attributes from the study's), the computed ones, in tag order (as _stored)."""
    study_uid = row["study_instance_uid"]
    if level is Level.STUDY:
        url = f"{base}/studies/{study_uid}"
        blobs = [row["study_members"]]
    else:
        url = f"{base}/studies/{study_uid}/series/{row['series_instance_uid']}"
        blobs = [row["series_members"], row["study_members"]] if plan.study_attrs else [row["series_members"]]
    wanted = set(plan.members)  # type: ignore[arg-type]
    parts = []
    for blob in blobs:
        for member in blob.split(_MEMBER_SEPARATOR):
            if member[:10] in wanted:
                wanted.discard(member[:10])  # the level's own value first, as _result
                parts.append(member)
    parts.extend(_member(key, _computed(key, row, url)) for key in plan.computed)
    parts.sort()
    return b"{" + b",".join(parts) + b"}"


def _result(
    level: Level,
    plan: _Plan,
    row: asyncpg.Record,
    reps: dict[int, tuple[str, str, str, bytes]],
    base: str,
) -> dict:
    """One result: each key from the first source that has it (level blob, study blob, representative)."""
    study_uid = row["study_instance_uid"]
    # (attributes, prefix for their relative BulkDataURIs or None)
    sources: list[tuple[dict, str | None]] = []
    rep = None
    if level is Level.STUDY:
        url = f"{base}/studies/{study_uid}"
        own = orjson.loads(row["study_attrs"])
        sources.append((own, None))
        rep = reps.get(row["study_key"])
    elif level is Level.SERIES:
        url = f"{base}/studies/{study_uid}/series/{row['series_instance_uid']}"
        own = orjson.loads(row["series_attrs"])
        sources.append((own, None))
        if plan.study_attrs:
            sources.append((orjson.loads(row["study_attrs"]), None))
        rep = reps.get(row["series_key"])
    else:
        url = _instance_url(base, study_uid, row["series_instance_uid"], row["sop_instance_uid"])
        blob = row["metadata"]
        own = orjson.loads(blob)
        sources.append((own, url + "/" if b"BulkDataURI" in blob else None))
    if rep is not None:
        prefix = _instance_url(base, *rep[:3]) + "/" if b"BulkDataURI" in rep[3] else None
        sources.append((orjson.loads(rep[3]), prefix))
    keys: Iterable[str] = plan.ordered
    if plan.all_own:
        own_keys = (
            own.keys()
            if level is not Level.INSTANCE
            else (k for k in own if _tag_level(k) in (None, Level.INSTANCE))
        )
        keys = sorted(plan.keys.union(own_keys))
    out: dict[str, Any] = {}
    for key in keys:
        if key in plan.computed:
            out[key] = _computed(key, row, url)
            continue
        for attrs, bulk_prefix in sources:
            element = attrs.get(key)
            if element is not None:
                # only bulk data references and sequences (which may hold them) need rewriting
                plain = bulk_prefix is None or ("BulkDataURI" not in element and element.get("vr") != "SQ")
                out[key] = element if plain else _absolute_bulk(element, bulk_prefix)
                break
    return out
