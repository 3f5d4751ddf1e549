"""Search Workitems (PS3.18 11.9) and Filtered Worklist Subscription filters: QIDO matching (PS3.4 C.2.2.2)
over work items, compiled to SQL with every user value passed as a $n parameter.

* Matching keys name attributes by keyword or tag, and attributes inside sequences by dotted paths
  (`ScheduledStationNameCodeSequence.CodeValue=CT1`). Keys that share a sequence are matched within one
  item of it (sequence matching, C.2.2.2.6): `...Sequence.CodeValue=X&...Sequence.CodingSchemeDesignator=Y`
  needs an item with both.
* Values: UIDs by list (`\\` or `,`); DA, TM and DT single values and ranges (`a-b`, `-b`, `a-`), a value
  covering the interval of its precision (as in indexer.qido); PN case-insensitive on the Alphabetic group,
  with wildcards, and `fuzzymatching=true` (word prefixes) on PatientName; other strings exactly, by
  backslash list, or with `*`/`?` wildcards; numbers exactly. An empty value or `*` matches everything
  (universal matching: the attribute is then just a return key).
* The attributes worklist clients poll on have typed, indexed columns (migration 0008): state, station
  code values, scheduled start, expected completion, labels, priority, readiness, patient. Everything
  else is matched on the jsonb data set. State, station and scheduled start are read from the item's
  ups_queue row (migration 0015), which carries the indexes with the state. A query for one station code
  value (the poll of a modality or an AI worker) reads items with that single station in order from a
  btree and stops after the page, merged with the few items that list several stations (GIN); its cost
  does not grow with the worklist.
* Results are ordered by ScheduledProcedureStepStartDateTime (missing last), then creation, and carry the
  whole work item (every return key of Table CC.2.5-3 the item has, which includes any includefield one)
  except the Transaction UID, which is never stored in it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg

from dicomcore.tags import UnknownAttributeError, dictionary_vr, parse_tag, tag_hex
from dicomcore.uids import is_valid_uid
from indexer.attributes import fold_case, name_words, parse_da, parse_tm
from indexer.extended_values import dt_bounds
from indexer.qido import MAX_OFFSET
from worklist.states import State


class SearchError(ValueError):
    """A query that cannot run; the message names the parameter (400)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")


@dataclass(frozen=True, slots=True)
class Filter:
    param: str
    path: tuple[str, ...]  # DICOM JSON keys, outermost first
    vr: str
    value: str


@dataclass
class Search:
    filters: list[Filter] = field(default_factory=list)
    limit: int = 100
    offset: int = 0
    fuzzy: bool = False
    more_possible: bool = True


_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_STATE, _STATION_SEQ, _CODE_VALUE = "00741000", "00404025", "00080100"
_TEXT_COLUMNS = {
    "00741204": "procedure_step_label",
    "00741202": "worklist_label",
    "00741200": "priority",
    "00404041": "input_readiness_state",
    "00100020": "patient_id",
    "00080018": "sop_instance_uid",
}
_START = "00404005"
_DT_COLUMNS = {_START: "scheduled_start", "00404011": "expected_completion"}


def attribute_path(param: str) -> tuple[tuple[str, ...], str]:
    """(keys, VR of the last) for `Keyword`, `GGGGEEEE` or a dotted path through sequences."""
    keys = []
    vr = ""
    parts = param.split(".")
    for n, part in enumerate(parts):
        try:
            tag = parse_tag(part)
        except UnknownAttributeError as exc:
            raise SearchError(param, str(exc)) from exc
        vr = (dictionary_vr(tag) or "UN").split(" or ")[0]
        if n < len(parts) - 1 and vr != "SQ":
            raise SearchError(param, f"{part} is not a sequence, so nothing can follow it")
        keys.append(tag_hex(tag))
    return tuple(keys), vr


def _count(param: str, raw: str, minimum: int, maximum: int | None = None) -> int:
    if not re.fullmatch(r"[0-9]+", raw.strip()):
        raise SearchError(param, f"{raw!r} is not a non-negative integer")
    value = int(raw)
    if value < minimum:
        raise SearchError(param, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SearchError(param, f"must be at most {maximum}")
    return value


def parse_search(pairs: Iterable[tuple[str, str]], *, default_limit: int, max_limit: int) -> Search:
    search = Search(limit=default_limit)
    seen: set[str] = set()
    for param, raw in pairs:
        lowered = param.lower()
        if lowered in _CONTROL:
            if lowered in seen and lowered != "includefield":
                raise SearchError(param, "given more than once")
            seen.add(lowered)
            if lowered == "limit":
                search.limit = min(_count(param, raw, 1), max_limit)
            elif lowered == "offset":
                # as QIDO's offset: a larger one PostgreSQL would refuse (a 500); a large limit is clamped
                search.offset = _count(param, raw, 0, MAX_OFFSET)
            elif lowered == "fuzzymatching":
                if raw not in ("true", "false"):
                    raise SearchError(param, "must be true or false")
                search.fuzzy = raw == "true"
            else:
                for item in raw.split(","):
                    if item.strip() and item.strip() != "all":
                        attribute_path(item.strip())
            continue
        search.filters.append(parse_filter(param, raw))
    return search


def parse_filter(param: str, raw: str) -> Filter:
    if "\x00" in raw or "\x00" in param:  # as QIDO's: PostgreSQL text cannot hold it (a 500)
        raise SearchError(param.replace("\x00", "\\x00"), "NUL characters are not allowed")
    path, vr = attribute_path(param)
    value = raw.strip() if vr != "PN" else raw.rstrip()
    if vr == "SQ" and value:
        raise SearchError(param, "a sequence matches through its attributes (Sequence.Attribute=value)")
    return Filter(param, path, vr, value)


def parse_filter_list(text: str) -> list[Filter]:
    """The `filter` parameter of a Filtered Worklist Subscription: `attribute=value[,attribute=value]`."""
    filters = []
    for part in text.split(","):
        attr, eq, value = part.partition("=")
        if not eq or not attr.strip():
            raise SearchError("filter", f"{part!r} is not attribute=value")
        filters.append(parse_filter(attr.strip(), value))
    if not filters:
        raise SearchError("filter", "needs at least one attribute=value")
    return filters


# --- SQL ---------------------------------------------------------------------------------------------------


class Args:
    """Positional parameters of one statement: user values only reach SQL through here."""

    def __init__(self, values: Sequence[object] = ()) -> None:
        self.values: list[object] = list(values)

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _universal(value: str) -> bool:
    return value == "" or set(value) == {"*"}


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _wild(value: str) -> bool:
    return "*" in value or "?" in value


def _split(f: Filter) -> list[str]:
    sep = r"[\\,]" if f.vr in ("UI", "CS", "IS") else r"\\"
    items = [v.strip() for v in re.split(sep, f.value)]
    if any(not v for v in items):
        raise SearchError(f.param, "an empty value in a list")
    return items


def _range(f: Filter, parse, item: str) -> tuple[object | None, object | None]:  # type: ignore[no-untyped-def]
    if "-" in item and not (f.vr == "DT" and re.search(r"[0-9]-[0-9]{4}$", item) and item.count("-") == 1):
        low_text, _, high_text = item.partition("-")
        if not low_text and not high_text:
            raise SearchError(f.param, f"{item!r}: a range needs at least one end")
        low = parse(f, low_text)[0] if low_text else None
        high = parse(f, high_text)[1] if high_text else None
        if low is not None and high is not None and low > high:
            raise SearchError(f.param, f"{item!r}: the range ends before it starts")
        return low, high
    return parse(f, item)


def _dt(f: Filter, text: str) -> tuple[dt.datetime, dt.datetime]:
    bounds = dt_bounds(text)
    if bounds is None:
        raise SearchError(f.param, f"{text!r} is not a date-time (YYYY[MM[DD[HH[MM[SS[.F]]]]]]) or range")
    return bounds


def _da(f: Filter, text: str) -> tuple[str, str]:
    if not re.fullmatch(r"[0-9]{8}", text) or parse_da(text) is None:
        raise SearchError(f.param, f"{text!r} is not a date (YYYYMMDD) or date range")
    return text, text


def _tm(f: Filter, text: str) -> tuple[str, str]:
    if not re.fullmatch(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?", text) or parse_tm(text) is None:
        raise SearchError(f.param, f"{text!r} is not a time (HH[MM[SS[.F]]]) or time range")
    digits = text.replace(".", "")
    return digits.ljust(12, "0"), digits.ljust(12, "9")


def _bounded(expr: str, low: object | None, high: object | None, args: Args, cast: str = "") -> str:
    parts = []
    if low is not None:
        parts.append(f"{expr} >= {args.add(low)}{cast}")
    if high is not None:
        parts.append(f"{expr} <= {args.add(high)}{cast}")
    return " AND ".join(parts) or "TRUE"


def _column_sql(f: Filter, args: Args, fuzzy: bool, queue: str) -> str | None:
    """The condition on a typed column, when the key has one; state and scheduled start on alias `queue`."""
    if len(f.path) == 2 and f.path == (_STATION_SEQ, _CODE_VALUE) and not _wild(f.value):
        return f"w.station_names && {args.add(_split(f))}::text[]"
    if len(f.path) != 1:
        return None
    key = f.path[0]
    if key == _STATE:
        states = []
        for item in _split(f):
            state = State.from_code(item)
            if state is None:
                raise SearchError(f.param, f"{item!r} is not a Procedure Step State")
            states.append(int(state))
        # literals (from the enum, never user text): lets the planner use the partial index of live items
        return f"{queue}.state IN ({', '.join(str(s) for s in sorted(set(states)))})"
    if key in _DT_COLUMNS:
        column = (queue if key == _START else "w") + "." + _DT_COLUMNS[key]
        ors = [_bounded(column, *_range(f, _dt, item), args) for item in _split(f)]
        return "(" + " OR ".join(ors) + ")"
    if key == "00100010":
        if fuzzy:
            words = name_words(f.value.replace("*", " ").replace("?", " "))
            return (
                " AND ".join(
                    f"EXISTS (SELECT 1 FROM unnest(w.patient_name_words) n "
                    f"WHERE n LIKE {args.add(_like(w) + '%')})"
                    for w in words
                )
                or "TRUE"
            )
        value = fold_case(f.value.split("=", 1)[0])
        if _wild(value):
            return f"w.patient_name_ci LIKE {args.add(_like(value))}"
        return f"w.patient_name_ci = {args.add(value)}"
    if key in _TEXT_COLUMNS:
        column = "w." + _TEXT_COLUMNS[key]
        if _wild(f.value):
            return f"{column} LIKE {args.add(_like(f.value))}"
        values = _split(f)
        if f.vr == "UI" and not all(is_valid_uid(v) for v in values):
            raise SearchError(f.param, "not a UID or list of UIDs")
        return f"{column} = ANY({args.add(values)}::text[])"
    return None


def _leaf_sql(element: str, f: Filter, args: Args) -> str:
    """Any value of the attribute `element` (a jsonb expression) matches."""
    if f.vr == "PN":
        value = f.value.split("=", 1)[0].lower()
        op = f"LIKE {args.add(_like(value))}" if _wild(value) else f"= {args.add(value)}"
        return (
            f"EXISTS (SELECT 1 FROM jsonb_array_elements({element}->'Value') v "
            f"WHERE lower(rtrim(v->>'Alphabetic', '^ ')) {op})"
        )
    expr = "v"
    if f.vr == "DA":
        conds = [_bounded(expr, *_range(f, _da, item), args) for item in _split(f)]
    elif f.vr == "TM":
        expr = "rpad(replace(replace(v, ':', ''), '.', ''), 12, '0')"
        conds = [_bounded(expr, *_range(f, _tm, item), args) for item in _split(f)]
    elif f.vr == "DT":
        expr = "rpad(left(v, 14), 14, '0')"
        conds = []
        for item in _split(f):
            low, high = _range(f, _dt, item)
            conds.append(
                _bounded(
                    expr,
                    low.strftime("%Y%m%d%H%M%S") if low else None,  # type: ignore[union-attr]
                    high.strftime("%Y%m%d%H%M%S") if high else None,  # type: ignore[union-attr]
                    args,
                )
            )
    elif f.vr in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"):
        try:
            numbers = [float(v) for v in _split(f)]
        except ValueError as exc:
            raise SearchError(f.param, f"{f.value!r} is not a number") from exc
        expr = "(CASE WHEN v ~ '^\\s*[-+]?[0-9]*\\.?[0-9]+([eE][-+]?[0-9]+)?\\s*$' THEN v::float8 END)"
        conds = [f"{expr} = ANY({args.add(numbers)}::float8[])"]
    elif _wild(f.value):
        conds = [f"v LIKE {args.add(_like(f.value))}"]
    else:
        values = _split(f)
        if f.vr == "UI" and not all(is_valid_uid(v) for v in values):
            raise SearchError(f.param, "not a UID or list of UIDs")
        conds = [f"v = ANY({args.add(values)}::text[])"]
    where = " OR ".join(f"({c})" for c in conds)
    return f"EXISTS (SELECT 1 FROM jsonb_array_elements_text({element}->'Value') v WHERE {where})"


def _group_sql(base: str, filters: list[tuple[tuple[str, ...], Filter]], args: Args, depth: int) -> list[str]:
    conds: list[str] = []
    nested: dict[str, list[tuple[tuple[str, ...], Filter]]] = {}
    for rest, f in filters:
        if _universal(f.value):
            continue
        if len(rest) == 1:
            conds.append(_leaf_sql(f"{base}->'{rest[0]}'", f, args))
        else:
            nested.setdefault(rest[0], []).append((rest[1:], f))
    for key, group in nested.items():
        alias = f"i{depth}"
        inner = _group_sql(alias, group, args, depth + 1) or ["TRUE"]
        conds.append(
            f"EXISTS (SELECT 1 FROM jsonb_array_elements({base}->'{key}'->'Value') {alias} "
            f"WHERE {' AND '.join(inner)})"
        )
    return conds


def where_sql(filters: Sequence[Filter], args: Args, fuzzy: bool = False, queue: str = "w") -> str:
    """The conditions of `filters` on the work item aliased `w`, ANDed. State and scheduled start are read
    from alias `queue`: `w` itself, or its ups_queue row (migration 0015), whose indexes serve them."""
    conds: list[str] = []
    generic: list[tuple[tuple[str, ...], Filter]] = []
    for f in filters:
        if _universal(f.value):
            continue
        column = _column_sql(f, args, fuzzy, queue)
        if column is not None:
            conds.append(column)
        # a sequence key whose sequence other keys name too is matched within one item, the column only
        # narrowing the candidates first
        shared = len(f.path) > 1 and any(g is not f and g.path[0] == f.path[0] for g in filters)
        if column is None or shared:
            generic.append((f.path, f))
    conds.extend(_group_sql("w.attrs", generic, args, 0))
    return " AND ".join(conds) or "TRUE"


@dataclass
class Page:
    results: list[bytes]  # each a work item's DICOM JSON
    more: bool


def _one_station(query: Search) -> tuple[str, list[Filter]] | None:
    """(station, the other filters) when the query asks for one station code value and nothing else about
    the station sequence: the shape worklist clients poll with, which has its own plan (see search)."""
    station = [f for f in query.filters if f.path == (_STATION_SEQ, _CODE_VALUE) and not _universal(f.value)]
    if len(station) != 1 or _wild(station[0].value) or "\\" in station[0].value:
        return None
    rest = [f for f in query.filters if f is not station[0]]
    if any(f.path[0] == _STATION_SEQ and not _universal(f.value) for f in rest):
        return None
    return station[0].value, rest


def _keys_from(where: str) -> str:
    """The FROM list of a keys query: the queue row, joined to the work item only when `where` reads it."""
    join = " JOIN ups_workitem w ON w.workitem_key = q.workitem_key" if "w." in where else ""
    return "ups_queue q" + join


async def search(conn: asyncpg.Connection | asyncpg.Pool, partition_key: int, query: Search) -> Page:
    args = Args([partition_key])
    order = "ORDER BY q.scheduled_start NULLS LAST, q.workitem_key"
    one = _one_station(query)
    if one is None:
        where = where_sql(query.filters, args, query.fuzzy, "q")
        keys = (
            f"SELECT q.workitem_key, q.scheduled_start FROM {_keys_from(where)} "
            f"WHERE q.partition_key = $1 AND {where} {order} "
            f"OFFSET {args.add(query.offset)} LIMIT {args.add(query.limit + 1)}"
        )
    else:
        # Items with that one station come in order from the (partition, state, station, start) btree of
        # ups_queue and the scan stops after the page; items listing several stations come from its GIN
        # index. Each branch yields at most offset + limit + 1 rows, merged in order.
        station, rest = one
        first = where_sql(rest, args, query.fuzzy, "q")
        first_station = args.add(station)
        second = where_sql(rest, args, query.fuzzy, "q")
        second_station = args.add([station])
        enough = args.add(query.offset + query.limit + 1)
        keys = (
            f"SELECT workitem_key, scheduled_start FROM ("
            f"(SELECT q.workitem_key, q.scheduled_start FROM {_keys_from(first)} WHERE q.partition_key = $1 "
            f"AND q.station = {first_station} AND {first} {order} LIMIT {enough}) UNION ALL "
            f"(SELECT q.workitem_key, q.scheduled_start FROM {_keys_from(second)} WHERE q.partition_key = $1 "
            f"AND q.station IS NULL AND q.station_names && {second_station}::text[] AND {second} "
            f"{order} LIMIT {enough})) q {order} "
            f"OFFSET {args.add(query.offset)} LIMIT {args.add(query.limit + 1)}"
        )
    # keys first, documents after: only the rows of the page are read whole
    sql = (
        f"SELECT d.body FROM ({keys}) k JOIN ups_workitem d ON d.workitem_key = k.workitem_key "
        f"ORDER BY k.scheduled_start NULLS LAST, k.workitem_key"
    )
    rows = await conn.fetch(sql, *args.values)
    return Page([r[0] for r in rows[: query.limit]], len(rows) > query.limit)
