"""Extended query tags (Azure DICOM service's API): their definitions, validation and life cycle.

A tag is added with status Adding together with a re-index operation (indexer.reindex) that fills its
values for what is already stored; new instances get values at once (indexer.extended_values, called by
indexer.writes). When the re-index finishes the tag is Ready and QIDO can match it. Values that do not fit
the VR are recorded as errors and make the tag's QueryStatus Disabled until a PATCH enables it again.

Tags are global: one definition serves every data partition, as in Azure.

Adding or deleting a tag takes INGEST_LOCK exclusively, which every index write takes shared (see
indexer.writes). So when a tag is added, every instance is either committed before (its key is at most the
bound recorded with the operation, and the re-index fills it) or indexed after, by a write that sees the
tag and fills it itself: none is missed and none is filled twice.

A tag the index already keeps natively (a standard matching key of indexer.attributes, e.g.
ManufacturerModelName, which Azure does not index natively) is accepted as Azure accepts any tag, so that
clients written for Azure work unchanged: it is Ready at once and holds no values. QIDO matches it through
its native column (indexer.qido takes standard keys first), writes and the re-index skip it, and deleting it
removes only its definition. It may be defined at its native level or below (a series attribute at Series
or Instance level), where the native key matches.

A DELETE only marks the tag Deleting (under the same lock, so no write can still be adding its values once
it has committed) and queues a deleteExtendedQueryTag operation (indexer.tag_deletion) that removes the
values in batches and then the tag. From that commit on, QIDO refuses the tag (it is not Ready) and new
writes skip it (indexing_tags), so a tag with a million values never blocks stores for long.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from dicomcore.tags import dictionary_vr, did_you_mean, keyword, parse_tag, tag_hex
from indexer.attributes import BY_TAG, Level
from indexer.operations import Operation, cancel_operation, create_operation

SUPPORTED_VRS = frozenset("AE AS CS DA DS DT FD FL IS LO PN SH SL SS TM UI UL US".split())
MAX_TAGS = 128
_SUPPORTED_LIST = ", ".join(sorted(SUPPORTED_VRS))
REINDEX = "reindex"
DELETE_TAG = "deleteExtendedQueryTag"  # Azure's operation type name

# value table of each VR (migration 0005)
FAMILY = {
    **dict.fromkeys(("AE", "AS", "CS", "LO", "SH", "UI"), "ext_string"),
    **dict.fromkeys(("IS", "SL", "SS", "UL", "US"), "ext_long"),
    **dict.fromkeys(("DS", "FD", "FL"), "ext_double"),
    "DA": "ext_date",
    "TM": "ext_time",
    "DT": "ext_datetime",
    "PN": "ext_person_name",
}
TABLES = tuple(dict.fromkeys(FAMILY.values()))

# Taken shared by every index write and exclusively by tag additions and deletions (see module docstring).
INGEST_LOCK = 0x44434D57_45585447 & 0x7FFFFFFFFFFFFFFF

LEVEL_NAMES = {Level.STUDY: "Study", Level.SERIES: "Series", Level.INSTANCE: "Instance"}
_LEVELS = {name.lower(): level for level, name in LEVEL_NAMES.items()}
_LEVEL_OF_NAME = {name: level for level, name in LEVEL_NAMES.items()}
_RANK = {level: rank for rank, level in enumerate(LEVEL_NAMES)}  # Study 0, Series 1, Instance 2


class TagError(ValueError):
    """A request the tag API refuses: status (400, 404, 409) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ExtendedTag:
    tag_key: int
    path: str  # GGGGEEEE
    vr: str
    private_creator: str | None
    level: Level
    status: str  # Adding, Ready, Deleting
    query_status: str  # Enabled, Disabled
    error_count: int  # exact in the API; 0/1 (has errors) where loaded for QIDO and STOW
    operation_id: uuid.UUID | None

    @property
    def tag(self) -> int:
        return int(self.path, 16)

    @property
    def keyword(self) -> str:
        """The dictionary keyword of a standard tag, the path of a private one (for messages, headers)."""
        return self.path if self.private_creator else keyword(self.tag)

    @property
    def table(self) -> str:
        return FAMILY[self.vr]

    @property
    def native(self) -> bool:
        """Whether the index keeps the attribute natively (a standard matching key): no values of its own."""
        return self.private_creator is None and self.tag in BY_TAG


@dataclass(frozen=True, slots=True)
class NewTag:
    path: str
    vr: str
    private_creator: str | None
    level: Level


def _tag(row: asyncpg.Record) -> ExtendedTag:
    return ExtendedTag(
        tag_key=row["tag_key"],
        path=row["path"],
        vr=row["vr"],
        private_creator=row["private_creator"],
        level=_LEVEL_OF_NAME[row["level"]],
        status=row["status"],
        query_status=row["query_status"],
        error_count=row["error_count"],
        operation_id=row["operation_id"],
    )


# --- validation -----------------------------------------------------------------------------------------

_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")


def parse_tag_path(text: str) -> int:
    """A tag path as the API takes it: GGGGEEEE or a dictionary keyword; sequences are refused (400)."""
    text = text.strip()
    if "." in text:
        raise TagError(400, f"tag path {text!r}: sequence paths (tags inside sequences) are not supported")
    if _HEX8.fullmatch(text):
        return int(text, 16)
    if not text.isidentifier():
        raise TagError(400, f"tag path {text!r} is malformed: use 8 hex digits (GGGGEEEE) or a keyword")
    try:
        return parse_tag(text)
    except ValueError:
        raise TagError(
            400, f"tag path {text!r} is not a DICOM keyword (nor GGGGEEEE){did_you_mean(text)}"
        ) from None


def _field(item: dict[str, Any], name: str) -> Any:
    """A field of a request object, matched case-insensitively (Azure's JSON binding is)."""
    found = [v for k, v in item.items() if isinstance(k, str) and k.lower() == name.lower()]
    return found[0] if found else None


def validate_new_tags(body: Any) -> list[NewTag]:
    """The tags a POST /extendedquerytags body asks for; TagError(400) naming the first problem."""
    if not isinstance(body, list) or not body:
        raise TagError(400, "the body must be a non-empty JSON array of {Path, VR, PrivateCreator, Level}")
    if len(body) > MAX_TAGS:
        raise TagError(
            400, f"at most {MAX_TAGS} extended query tags can be defined; the body has {len(body)}"
        )
    out: list[NewTag] = []
    seen: set[str] = set()
    for n, item in enumerate(body):
        if not isinstance(item, dict):
            raise TagError(400, f"item {n}: must be an object with Path, VR, PrivateCreator and Level")
        new = _validate_one(n, item)
        if new.path in seen:
            raise TagError(400, f"item {n}: tag {new.path} is given more than once")
        seen.add(new.path)
        out.append(new)
    return out


def _validate_one(n: int, item: dict[str, Any]) -> NewTag:
    path_raw, vr_raw = _field(item, "Path"), _field(item, "VR")
    creator, level_raw = _field(item, "PrivateCreator"), _field(item, "Level")
    where = f"item {n}"
    if not isinstance(path_raw, str) or not path_raw.strip():
        raise TagError(400, f"{where}: Path is required (GGGGEEEE or a keyword)")
    try:
        tag = parse_tag_path(path_raw)
    except TagError as exc:
        raise TagError(400, f"{where}: {exc.message}") from None
    path = tag_hex(tag)
    where = f"{where} ({path})"
    if not isinstance(level_raw, str) or level_raw.strip().lower() not in _LEVELS:
        raise TagError(400, f"{where}: Level is required and must be Study, Series or Instance")
    level = _LEVELS[level_raw.strip().lower()]
    if vr_raw is not None and not isinstance(vr_raw, str):
        raise TagError(400, f"{where}: VR must be a string")
    vr = vr_raw.strip().upper() if isinstance(vr_raw, str) and vr_raw.strip() else None
    if creator is not None and not isinstance(creator, str):
        raise TagError(400, f"{where}: PrivateCreator must be a string")
    creator = creator if creator else None
    group, element = tag >> 16, tag & 0xFFFF
    if vr is not None and not re.fullmatch(r"[A-Z]{2}", vr):
        raise TagError(400, f"{where}: {vr_raw!r} is not a VR")
    if vr is not None and vr not in _ALL_VRS:
        raise TagError(400, f"{where}: unknown VR {vr}")
    if vr == "SQ":
        raise TagError(400, f"{where}: sequences (VR SQ) cannot be extended query tags")
    if group % 2 == 1:  # private
        if group <= 0x0007 or group == 0xFFFF:
            raise TagError(400, f"{where}: group {group:04X} cannot hold private data elements")
        if element < 0x1000:
            raise TagError(
                400, f"{where}: a private creator or reserved element cannot be an extended query tag"
            )
        if creator is None:
            raise TagError(400, f"{where}: a private tag needs its PrivateCreator")
        if len(creator) > 64 or "\\" in creator or creator != creator.strip():
            raise TagError(400, f"{where}: PrivateCreator must be an LO value (1-64 characters, no '\\')")
        if vr is None:
            raise TagError(400, f"{where}: a private tag needs its VR")
    else:
        if creator is not None:
            raise TagError(400, f"{where}: PrivateCreator is only allowed for private tags")
        if group in (0x0000, 0x0002) or element == 0x0000:
            raise TagError(400, f"{where}: group length and file meta elements cannot be queried")
        known = dictionary_vr(tag)
        if known is None:
            raise TagError(400, f"{where}: not a tag of the DICOM dictionary (nor a private tag)")
        choices = [v.strip() for v in known.split(" or ")]
        if "SQ" in choices:
            raise TagError(400, f"{where}: {keyword(tag)} is a sequence; sequences cannot be queried")
        if not SUPPORTED_VRS.intersection(choices):
            raise TagError(400, f"{where}: VR {known} is not supported (use one of {_SUPPORTED_LIST})")
        if vr is None:
            if len(choices) > 1:
                raise TagError(400, f"{where}: the dictionary allows VR {known}; give the VR")
            vr = choices[0]
        elif vr not in choices:
            raise TagError(400, f"{where}: VR {vr} contradicts the dictionary's {known} for {keyword(tag)}")
    if vr not in SUPPORTED_VRS:
        raise TagError(400, f"{where}: VR {vr} is not supported (use one of {_SUPPORTED_LIST})")
    return NewTag(path, vr, creator, level)


_ALL_VRS = SUPPORTED_VRS | frozenset(
    "AT LT OB OD OF OL OV OW SQ ST SV UC UN UR UT UV".split()
)  # fmt: skip


# --- storage ----------------------------------------------------------------------------------------------

_SELECT = """SELECT t.tag_key, t.path, t.vr, t.private_creator, t.level, t.status, t.query_status,
                    t.operation_id, {errors} AS error_count
             FROM extended_query_tag t"""
_COUNTED = _SELECT.format(
    errors="(SELECT count(*) FROM extended_query_tag_error e WHERE e.tag_key = t.tag_key)::int"
)
_FLAGGED = _SELECT.format(
    errors="(EXISTS (SELECT FROM extended_query_tag_error e WHERE e.tag_key = t.tag_key))::int"
)


async def add_tags(conn: asyncpg.Connection, new: list[NewTag]) -> tuple[Operation, list[ExtendedTag]]:
    """Define the tags and their re-index operation, in the caller's transaction: status Adding, or Ready
    for tags the index keeps natively (which the operation leaves alone).

    TagError 409 when a tag is already defined, 400 beyond MAX_TAGS or for a native key at a level above
    its own (its native column cannot match there).
    """
    native: set[str] = set()
    for t in new:
        standard = BY_TAG.get(int(t.path, 16))
        if standard is None:
            continue
        if _RANK[t.level] < _RANK[standard.level]:
            allowed = " or ".join(
                LEVEL_NAMES[lvl] for lvl in LEVEL_NAMES if _RANK[lvl] >= _RANK[standard.level]
            )
            raise TagError(
                400,
                f"{t.path} ({standard.keyword}) is indexed natively at {LEVEL_NAMES[standard.level]} level,"
                f" so it cannot be a {LEVEL_NAMES[t.level]}-level tag: use Level {allowed}",
            )
        native.add(t.path)
    await conn.execute("SELECT pg_advisory_xact_lock($1)", INGEST_LOCK)
    existing = {
        r["path"]: r["status"] for r in await conn.fetch("SELECT path, status FROM extended_query_tag")
    }
    deleting = sorted(t.path for t in new if existing.get(t.path) == "Deleting")
    if deleting:
        raise TagError(
            409,
            f"extended query tag(s) still being deleted: {', '.join(deleting)};"
            " add them again once the deletion has finished (GET the tag until it is 404)",
        )
    taken = sorted(t.path for t in new if t.path in existing)
    if taken:
        raise TagError(409, f"extended query tag(s) already defined: {', '.join(taken)}")
    if len(existing) + len(new) > MAX_TAGS:
        raise TagError(
            400, f"at most {MAX_TAGS} extended query tags can be defined ({len(existing)} exist already)"
        )
    # Bounds: every row up to these keys is committed and was indexed without the new tags (the lock
    # waited for writes in flight); every later row will be indexed by a write that sees them.
    bounds = await conn.fetchrow(
        """SELECT coalesce((SELECT max(study_key) FROM study), 0) AS study,
                  coalesce((SELECT max(series_key) FROM series), 0) AS series,
                  coalesce((SELECT max(instance_key) FROM instance), 0) AS instance"""
    )
    keys = []
    for t in new:
        keys.append(
            await conn.fetchval(
                """INSERT INTO extended_query_tag (path, vr, private_creator, level, status)
                   VALUES ($1, $2, $3, $4, $5) RETURNING tag_key""",
                t.path,
                t.vr,
                t.private_creator,
                LEVEL_NAMES[t.level],
                "Ready" if t.path in native else "Adding",
            )
        )
    op = await create_operation(
        conn,
        REINDEX,
        {
            "tags": [key for key, t in zip(keys, new, strict=True) if t.path not in native],
            "bounds": {"Study": bounds["study"], "Series": bounds["series"], "Instance": bounds["instance"]},
        },
        [f"extendedquerytags/{t.path}" for t in new],
    )
    await conn.execute(
        "UPDATE extended_query_tag SET operation_id = $1 WHERE tag_key = ANY($2::int[])", op.id, keys
    )
    tags = [_tag(r) for r in await conn.fetch(_COUNTED + " WHERE t.tag_key = ANY($1::int[])", keys)]
    return op, tags


async def list_tags(conn: asyncpg.Connection, limit: int, offset: int) -> list[ExtendedTag]:
    rows = await conn.fetch(_COUNTED + " ORDER BY t.tag_key LIMIT $1 OFFSET $2", limit, offset)
    return [_tag(r) for r in rows]


async def get_tag(conn: asyncpg.Connection, tag: int) -> ExtendedTag | None:
    row = await conn.fetchrow(_COUNTED + " WHERE t.path = $1", tag_hex(tag))
    return _tag(row) if row is not None else None


async def query_tags(conn: asyncpg.Connection) -> dict[int, ExtendedTag]:
    """All tags by tag number, error_count only telling whether there are errors (cheap: QIDO, STOW)."""
    return {(t := _tag(r)).tag: t for r in await conn.fetch(_FLAGGED)}


async def indexing_tags(conn: asyncpg.Connection) -> list[ExtendedTag]:
    """The tags new instances get values for: Adding and Ready, except those kept natively."""
    rows = await conn.fetch(_FLAGGED + " WHERE t.status IN ('Adding', 'Ready') ORDER BY t.tag_key")
    return [tag for r in rows if not (tag := _tag(r)).native]


async def set_query_status(conn: asyncpg.Connection, tag: int, status: str) -> ExtendedTag | None:
    """Enable or disable matching on a tag; None when it does not exist, TagError 409 while Deleting."""
    updated = await conn.fetchrow(
        """UPDATE extended_query_tag SET query_status = $2, updated_at = now()
           WHERE path = $1 RETURNING tag_key, status = 'Deleting' AS deleting""",
        tag_hex(tag),
        status,
    )
    if updated is not None and updated["deleting"]:
        raise TagError(409, f"extended query tag {tag_hex(tag)} is being deleted")
    return None if updated is None else await get_tag(conn, tag)


async def delete_tag(conn: asyncpg.Connection, tag: int) -> Operation | None:
    """Mark a tag Deleting and queue the operation that removes it (indexer.tag_deletion), in the caller's
    transaction; None when the tag does not exist, TagError 409 while its deletion is under way.

    A re-index still running for the tag drops it from its work, and is canceled when no tag is left. Locks
    are taken in the order a re-index step takes them (operation row, then tag row), so the two cannot
    deadlock. The operation row lock waits for a running step to commit; INGEST_LOCK comes after it, so
    stores wait only for this short transaction, not for the step.
    """
    path = tag_hex(tag)
    first = await conn.fetchrow("SELECT status, operation_id FROM extended_query_tag WHERE path = $1", path)
    operation_id = first["operation_id"] if first is not None else None
    previous = None
    if first is not None and first["status"] == "Deleting":
        await _refuse_while_deleting(conn, path, operation_id)
    elif operation_id is not None:
        previous = await conn.fetchrow(
            "SELECT type, status, params FROM operation WHERE operation_id = $1 FOR UPDATE", operation_id
        )
    await conn.execute("SELECT pg_advisory_xact_lock($1)", INGEST_LOCK)
    # FOR NO KEY UPDATE: stores insert error rows (a foreign key share lock) without waiting for us
    row = await conn.fetchrow(
        "SELECT tag_key, vr, status, operation_id FROM extended_query_tag WHERE path = $1 FOR NO KEY UPDATE",
        path,
    )
    if row is None:
        return None
    tag_key = row["tag_key"]
    if row["operation_id"] != operation_id:  # another DELETE (or DELETE and POST) between our reads
        await _refuse_while_deleting(conn, path, row["operation_id"])
        raise TagError(409, f"extended query tag {path} changed while it was being deleted; try again")
    # a tag still Deleting here had its deletion fail or canceled (_refuse_while_deleting): it is queued again
    if (
        previous is not None
        and previous["type"] == REINDEX
        and previous["status"] in ("notStarted", "running")
    ):
        params = orjson.loads(previous["params"])
        params["tags"] = [k for k in params.get("tags", []) if k != tag_key]
        if params["tags"]:
            await conn.execute(
                "UPDATE operation SET params = $2::jsonb WHERE operation_id = $1",
                operation_id,
                orjson.dumps(params).decode(),
            )
        else:
            await cancel_operation(conn, operation_id, "its extended query tags were deleted")
    op = await create_operation(
        conn,
        DELETE_TAG,
        {"tag": tag_key, "path": path, "table": FAMILY[row["vr"]]},
        [f"extendedquerytags/{path}"],
    )
    await conn.execute(
        """UPDATE extended_query_tag SET status = 'Deleting', operation_id = $2, updated_at = now()
           WHERE tag_key = $1""",
        tag_key,
        op.id,
    )
    return op


async def _refuse_while_deleting(conn: asyncpg.Connection, path: str, operation_id: uuid.UUID | None) -> None:
    """TagError 409 when the tag's deletion operation is still to run; no lock, so no wait for its step."""
    running = await conn.fetchval(
        "SELECT status IN ('notStarted', 'running') FROM operation WHERE operation_id = $1", operation_id
    )
    if running:
        raise TagError(409, f"extended query tag {path} is being deleted already")


async def list_errors(
    conn: asyncpg.Connection, tag_key: int, limit: int, offset: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT e.study_instance_uid, e.series_instance_uid, e.sop_instance_uid, e.message, e.created_at,
                  p.name AS partition_name
           FROM extended_query_tag_error e JOIN partition p USING (partition_key)
           WHERE e.tag_key = $1 ORDER BY e.created_at, e.instance_key LIMIT $2 OFFSET $3""",
        tag_key,
        limit,
        offset,
    )
