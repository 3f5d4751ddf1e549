"""Values of extended query tags: taken from an instance's DICOM JSON, checked against the tag's VR and
written to the typed value tables of migration 0005. Used by index writes (new instances) and by the
re-index (instances already stored), so that both store exactly the same values.

* Every value of a multi-valued attribute is stored (any of them may match, PS3.4 C.2.2.2.5 style).
* A value that does not fit the VR (a malformed date, an integer out of range, a string too long, binary
  data where text is expected) is an error for that instance and tag; its other values are not stored.
* Private tags are found through their creator: the element is (gggg,BBee) where (gggg,00BB) holds the
  PrivateCreator, whatever block the tag's path names (blocks are assigned per instance).
* The elements of instance-level public tags are also kept whole (ext_element, migration 0013): QIDO returns
  them as matching keys without parsing the metadata.
* Values of instance-level tags carry their instance's partition, study and page sort key (migration 0014),
  copied from the instance row as they are inserted: QIDO cuts pages from the value index alone.
* FL values are compared as float32 (the query value is rounded the same way), DS/FD as float64. DT values
  are stored as their first instant, ignoring a UTC offset (as StudyDate/StudyTime are).
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from dicomcore.uids import is_valid_uid
from indexer.attributes import Level, fold_case, name_words, parse_da, parse_tm, pn_all_groups, pn_alphabetic
from indexer.extended_tags import FAMILY, ExtendedTag

MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "LO": 64, "SH": 16, "UI": 64}  # characters (PS3.5 6.2)
INT_RANGE = {
    "IS": (-(2**31), 2**31 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "US": (0, 2**16 - 1),
}
_AS = re.compile(r"[0-9]{3}[DWMY]")
_INT = re.compile(r"[+-]?[0-9]+")
_TM = re.compile(r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?")
_SQL_TYPE = {
    "ext_string": "text",
    "ext_long": "int8",
    "ext_double": "float8",
    "ext_date": "date",
    "ext_time": "time",
    "ext_datetime": "timestamp",
}


ELEMENTS = "ext_element"
"""Collected.rows key of the JSON members of instance-level tags' elements (migration 0013)."""


class BadValue(ValueError):
    """A stored value that does not fit the tag's VR; the message says why (shown in the tag's errors)."""


def float32(value: float) -> float:
    """The float32 nearest to value, as a Python float (FL values and queries on them)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


_DT = re.compile(
    r"([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?)?)?)?"
    r"([+-][0-9]{4})?"
)


def dt_bounds(text: str) -> tuple[dt.datetime, dt.datetime] | None:
    """First and last instant of the interval a DT value denotes at its precision; None when malformed."""
    m = _DT.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, _offset = m.groups()
    try:
        low = dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            min(int(second or 0), 59),  # a leap second counts as the last second of its minute
            int((frac or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    nxt: dt.datetime | None = None
    try:
        if month is None:
            nxt = dt.datetime(low.year + 1, 1, 1)
        elif day is None:
            nxt = dt.datetime(low.year + low.month // 12, low.month % 12 + 1, 1)
        else:
            units = [
                dt.timedelta(days=1),
                dt.timedelta(hours=1),
                dt.timedelta(minutes=1),
                dt.timedelta(seconds=1),
            ]
            given = [hour, minute, second, frac].index(None) if frac is None else 4
            step = units[given] if given < 4 else dt.timedelta(microseconds=10 ** (6 - len(frac or "")))
            nxt = low + step
    except (OverflowError, ValueError):
        nxt = None  # the interval runs to the end of year 9999
    high = dt.datetime.max if nxt is None else nxt - dt.timedelta(microseconds=1)
    return low, high


def convert(vr: str, value: Any) -> Any:
    """The column value of one DICOM JSON value for the VR's table; BadValue when it does not fit."""
    table = FAMILY[vr]
    if table == "ext_person_name":
        if not isinstance(value, dict | str):
            raise BadValue(f"{value!r} is not a person name")
        alphabetic = pn_alphabetic(value)
        text = pn_all_groups(value)
        if "\x00" in text:
            raise BadValue(f"{text!r} holds a NUL character")
        return text, fold_case(alphabetic) if alphabetic is not None else None, " ".join(name_words(text))
    if table == "ext_long":
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            value = int(value.strip())
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadValue(f"{value!r} is not an integer ({vr})")
        low, high = INT_RANGE[vr]
        if not low <= value <= high:
            raise BadValue(f"{value} is out of the range of {vr} ({low} to {high})")
        return value
    if table == "ext_double":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadValue(f"{value!r} is not a finite number ({vr})")
        return float32(float(value)) if vr == "FL" else float(value)
    if not isinstance(value, str):
        raise BadValue(f"{value!r} is not a {vr} string")
    if "\x00" in value:  # no text VR allows it, and PostgreSQL text cannot hold it
        raise BadValue(f"{value!r} holds a NUL character")
    if table == "ext_date":
        date = parse_da(value) if re.fullmatch(r"[0-9]{8}", value.strip()) else None
        if date is None:
            raise BadValue(f"{value!r} is not a valid DA (YYYYMMDD)")
        return date
    if table == "ext_time":
        time = parse_tm(value)
        if time is None or not re.fullmatch(
            r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?", value.strip()
        ):
            raise BadValue(f"{value!r} is not a valid TM (HH[MM[SS[.F]]])")
        return time
    if table == "ext_datetime":
        bounds = dt_bounds(value)
        if bounds is None:
            raise BadValue(f"{value!r} is not a valid DT (YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX])")
        return bounds[0]
    limit = MAX_LENGTH[vr]
    if len(value) > limit:
        raise BadValue(f"{value!r} is longer than {vr} allows ({limit} characters)")
    if vr == "UI" and not is_valid_uid(value):
        raise BadValue(f"{value!r} is not a valid UID")
    if vr == "AS" and not _AS.fullmatch(value):
        raise BadValue(f"{value!r} is not a valid AS (nnnD, nnnW, nnnM or nnnY)")
    return value


def element_key(attrs: dict, tag: ExtendedTag) -> str | None:
    """The DICOM JSON key holding the tag's value in this instance (private tags: via their creator)."""
    if tag.private_creator is None:
        return tag.path
    group, low = tag.path[:4], tag.path[6:]
    for key, element in attrs.items():
        if key.startswith(group) and key[4:6] == "00" and isinstance(element, dict):
            block = int(key[6:], 16)
            if 0x10 <= block <= 0xFF and (element.get("Value") or [None])[0] == tag.private_creator:
                return f"{group}{block:02X}{low}"
    return None


def values_of(attrs: dict, tag: ExtendedTag) -> list[Any]:
    """The column values of the tag in an instance's DICOM JSON ([] when absent or empty); BadValue."""
    key = element_key(attrs, tag)
    element = attrs.get(key) if key is not None else None
    if not isinstance(element, dict):
        return []
    if "InlineBinary" in element or "BulkDataURI" in element:
        raise BadValue(f"the value is binary data (VR {element.get('vr')}), not {tag.vr}")
    if element.get("vr") == "SQ":
        raise BadValue(f"the attribute is a sequence, not {tag.vr}")
    return [convert(tag.vr, v) for v in element.get("Value") or () if v is not None and v != ""]


def needle(tag: ExtendedTag) -> bytes:
    """Bytes that every stored metadata blob holding the tag contains (skips parsing the others)."""
    if tag.private_creator is not None:
        return orjson.dumps(tag.private_creator)
    return b'"' + tag.path.encode() + b'":'


@dataclass(slots=True)
class Source:
    """Where values come from: the level row they belong to, the instance that supplies them."""

    row_key: int
    instance_key: int | None  # None: the supplying instance is not indexed (no error can be recorded)
    attrs: dict | bytes  # DICOM JSON, or the stored orjson blob (parsed only when a tag may be in it)


@dataclass(slots=True)
class Collected:
    # table -> (tag_key, row_key, value...); ELEMENTS -> (tag_key, instance_key, member)
    rows: dict[str, list[tuple]] = field(default_factory=dict)
    errors: dict[tuple[int, int], str] = field(default_factory=dict)  # (tag_key, instance_key) -> message
    count: int = 0  # sources looked at


def collect(
    tags: Sequence[ExtendedTag], sources: Iterable[Source], into: Collected | None = None
) -> Collected:
    """Values (and errors) of the tags for the sources; CPU only (callers may run it in a thread)."""
    out = into or Collected()
    needles = [(tag, needle(tag)) for tag in tags]
    for source in sources:
        out.count += 1
        attrs = source.attrs
        blob = attrs if isinstance(attrs, bytes) else None
        parsed: dict | None = None if blob is not None else attrs  # type: ignore[assignment]
        for tag, pin in needles:
            if blob is not None:
                if pin not in blob:
                    continue
                if parsed is None:
                    parsed = orjson.loads(blob)
            if tag.level is Level.INSTANCE and tag.private_creator is None:
                element = parsed.get(tag.path)  # type: ignore[union-attr]
                if element is not None:  # the matching key's member in QIDO results (migration 0013)
                    member = b'"' + tag.path.encode() + b'":' + orjson.dumps(element)
                    out.rows.setdefault(ELEMENTS, []).append((tag.tag_key, source.row_key, member))
            try:
                values = values_of(parsed, tag)  # type: ignore[arg-type]
            except BadValue as exc:
                if source.instance_key is not None:
                    out.errors[(tag.tag_key, source.instance_key)] = f"{tag.path}: {exc}"
                continue
            if not values:
                continue
            rows = out.rows.setdefault(tag.table, [])
            for value in dict.fromkeys(values):
                if isinstance(value, tuple):
                    rows.append((tag.tag_key, source.row_key, *value))
                else:
                    rows.append((tag.tag_key, source.row_key, value))
    return out


# Rows of instance-level tags carry their instance's partition and page sort key (migration 0014): QIDO pages
# come from the value index alone. Study/series-level rows get NULLs (the join finds no Instance tag).
_PAGE_KEYS = """i.partition_key, i.study_key, i.series_key, i.instance_number
    FROM {source}
    LEFT JOIN extended_query_tag g ON g.tag_key = u.t AND g.level = 'Instance'
    LEFT JOIN instance i ON i.instance_key = u.r AND g.tag_key IS NOT NULL"""
_KEY_COLUMNS = "partition_key, study_key, series_key, instance_number"


async def insert_values(conn: asyncpg.Connection, rows: dict[str, list[tuple]]) -> None:
    """One INSERT per value table (unnest of column arrays), and one for the elements."""
    for table, values in rows.items():
        if not values:
            continue
        columns = [list(c) for c in zip(*values, strict=True)]
        if table == ELEMENTS:  # a re-run batch (resumed re-index, migration 0013's backfill) replaces them
            await conn.execute(
                """INSERT INTO ext_element (tag_key, row_key, member)
                   SELECT * FROM unnest($1::int[], $2::bigint[], $3::bytea[])
                   ON CONFLICT (tag_key, row_key) DO UPDATE SET member = EXCLUDED.member""",
                *columns,
            )
        elif table == "ext_person_name":
            source = "unnest($1::int[], $2::bigint[], $3::text[], $4::text[], $5::text[]) AS u(t, r, v, c, w)"
            await conn.execute(
                f"""INSERT INTO ext_person_name
                        (tag_key, row_key, value, value_ci, value_words, {_KEY_COLUMNS})
                    SELECT u.t, u.r, u.v, u.c, string_to_array(u.w, ' '),
                           {_PAGE_KEYS.format(source=source)}""",
                *columns,
            )
        else:
            source = f"unnest($1::int[], $2::bigint[], $3::{_SQL_TYPE[table]}[]) AS u(t, r, v)"
            await conn.execute(
                f"""INSERT INTO {table} (tag_key, row_key, value, {_KEY_COLUMNS})
                    SELECT u.t, u.r, u.v, {_PAGE_KEYS.format(source=source)}""",
                *columns,
            )


async def delete_values(conn: asyncpg.Connection, tags: Sequence[ExtendedTag], row_keys: list[int]) -> None:
    """Remove the tags' values of these rows (before replacing them: study and series level)."""
    by_table: dict[str, list[int]] = {}
    for tag in tags:
        by_table.setdefault(tag.table, []).append(tag.tag_key)
    for table, tag_keys in by_table.items():
        await conn.execute(
            f"DELETE FROM {table} WHERE row_key = ANY($1::bigint[]) AND tag_key = ANY($2::int[])",
            row_keys,
            tag_keys,
        )


async def insert_errors(conn: asyncpg.Connection, errors: dict[tuple[int, int], str]) -> list[int]:
    """Record errors with the instance's UIDs; returns the tags that got errors."""
    if not errors:
        return []
    tag_keys, instance_keys = zip(*errors, strict=True)
    await conn.execute(
        """INSERT INTO extended_query_tag_error (tag_key, instance_key, partition_key, study_instance_uid,
               series_instance_uid, sop_instance_uid, message)
           SELECT u.t, i.instance_key, i.partition_key, st.study_instance_uid, se.series_instance_uid,
                  i.sop_instance_uid, u.m
           FROM unnest($1::int[], $2::bigint[], $3::text[]) AS u(t, k, m)
           JOIN instance i ON i.instance_key = u.k
           JOIN series se ON se.series_key = i.series_key
           JOIN study st ON st.study_key = i.study_key
           ON CONFLICT (tag_key, instance_key)
           DO UPDATE SET message = EXCLUDED.message, created_at = now()""",
        list(tag_keys),
        list(instance_keys),
        list(errors.values()),
    )
    return sorted(set(tag_keys))
