"""The body of POST /export: Azure's request shape plus a `deidentification` block, validated into the
parameters an export operation keeps (plain JSON, so any process can resume it).

    {"source": {"type": "identifiers", "settings": {"values": ["study[/series[/instance]]", ...]}}
             | {"type": "query", "settings": {"query": "StudyDate=2020&ModalitiesInStudy=CT"}},
     "destination": {"type": "s3", "settings": {"bucket": "b", "prefix": "p"}}
                  | {"type": "directory", "settings": {"path": "cohort-a"}}
                  | {"type": "partition", "settings": {"name": "research"}},
     "deidentification": {"project": "cohort-a", "options": ["retainLongModifiedDates", ...],
                          "pixelRules": [{"manufacturer": ..., "rectangles": [[x, y, w, h]]}]}}

A query source is resolved to study identifiers when the export is created: the cohort is what matched then.
De-identification is required: this archive never exports identified data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deid.mapping import valid_project
from deid.profile import Options, ProfileError, pixel_rules_from_json
from dicomcore.uids import is_valid_uid
from indexer.lookup import valid_partition_name

MAX_IDENTIFIERS = 100_000
# S3's rules for bucket names (general purpose buckets), which MinIO and SeaweedFS follow too
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ExportRequestError(ValueError):
    """The request body is not a valid export request; the message says why (400)."""


@dataclass(frozen=True, slots=True)
class ExportRequest:
    identifiers: list[str] | None  # None: a query, resolved by the caller
    query: str | None
    destination: dict[str, Any]  # {"type", "settings"} validated
    project: str
    options: list[str]  # snake_case option names
    pixel_rules: list[dict[str, Any]]


def _field(obj: dict[str, Any], name: str) -> Any:
    """Azure matches property names case-insensitively."""
    for key, value in obj.items():
        if key.lower() == name.lower():
            return value
    return None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ExportRequestError(f"{what} must be a JSON object")
    return value


def parse_export_request(body: Any) -> ExportRequest:
    body = _object(body, "the request body")
    source = _object(_field(body, "source"), "source")
    source_type = str(_field(source, "type") or "").lower()
    source_settings = _object(_field(source, "settings"), "source.settings")
    identifiers: list[str] | None = None
    query: str | None = None
    if source_type == "identifiers":
        values = _field(source_settings, "values")
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ExportRequestError("source.settings.values must be a non-empty list of identifiers")
        identifiers = normalize_identifiers(values)
    elif source_type == "query":
        query = _field(source_settings, "query")
        if not isinstance(query, str):
            raise ExportRequestError("source.settings.query must be a QIDO-RS query string")
        query = query.lstrip("?")
    else:
        raise ExportRequestError("source.type must be 'identifiers' or 'query'")
    destination = parse_destination(_object(_field(body, "destination"), "destination"))
    deid = _field(body, "deidentification")
    if deid is None:
        raise ExportRequestError("deidentification is required: this archive exports de-identified data only")
    deid = _object(deid, "deidentification")
    project = _field(deid, "project")
    if not isinstance(project, str) or not valid_project(project):
        raise ExportRequestError("deidentification.project must be 1-64 letters, digits, '_', '.', '-'")
    raw_options = _field(deid, "options") or []
    if not isinstance(raw_options, list) or not all(isinstance(o, str) for o in raw_options):
        raise ExportRequestError("deidentification.options must be a list of option names")
    raw_rules = _field(deid, "pixelRules") or []
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise ExportRequestError("deidentification.pixelRules must be a list of objects")
    try:
        options = Options.from_names(raw_options)
        pixel_rules_from_json(raw_rules)
    except ProfileError as exc:
        raise ExportRequestError(str(exc)) from exc
    return ExportRequest(identifiers, query, destination, project, options.enabled, raw_rules)


def normalize_identifiers(values: list[str]) -> list[str]:
    """Valid, de-duplicated identifiers; those inside another one (a series of a listed study) are dropped,
    so no instance is exported twice."""
    if len(values) > MAX_IDENTIFIERS:
        raise ExportRequestError(f"at most {MAX_IDENTIFIERS} identifiers per export")
    parsed: list[tuple[str, ...]] = []
    for value in values:
        parts = tuple(value.strip().strip("/").split("/"))
        if not 1 <= len(parts) <= 3 or not all(is_valid_uid(p) for p in parts):
            raise ExportRequestError(f"{value!r} is not study[/series[/instance]] of valid UIDs")
        parsed.append(parts)
    unique = sorted(set(parsed), key=len)
    kept: list[tuple[str, ...]] = []
    covered: set[tuple[str, ...]] = set()
    for parts in unique:
        if any(parts[:n] in covered for n in range(1, len(parts))):
            continue
        covered.add(parts)
        kept.append(parts)
    order: dict[tuple[str, ...], int] = {}
    for i, p in enumerate(parsed):
        order.setdefault(p, i)  # first occurrence: the request's order
    kept.sort(key=lambda p: order[p])
    return ["/".join(p) for p in kept]


def parse_destination(destination: dict[str, Any]) -> dict[str, Any]:
    kind = str(_field(destination, "type") or "").lower()
    settings = _object(_field(destination, "settings"), "destination.settings")
    if kind == "s3":
        bucket = _field(settings, "bucket")
        prefix = _field(settings, "prefix") or ""
        if not isinstance(bucket, str) or not bucket or not isinstance(prefix, str):
            raise ExportRequestError("an s3 destination needs settings.bucket (and optionally prefix)")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ExportRequestError(
                f"{bucket!r} is not an S3 bucket name: 3-63 lowercase letters, digits, '.' and '-', "
                "beginning and ending with a letter or digit"
            )
        if prefix.strip("/") and not _relative_path(prefix.strip("/")):
            raise ExportRequestError(
                "settings.prefix must be a relative key prefix: '/'-separated names, none empty, '.' or '..'"
            )
        return {"type": "s3", "settings": {"bucket": bucket, "prefix": prefix.strip("/")}}
    if kind == "directory":
        path = _field(settings, "path")
        if not isinstance(path, str) or not _relative_path(path):
            raise ExportRequestError(
                "a directory destination needs settings.path, relative to the server's export directory"
            )
        return {"type": "directory", "settings": {"path": path.strip("/")}}
    if kind == "partition":
        name = _field(settings, "name")
        if not isinstance(name, str) or not valid_partition_name(name):
            raise ExportRequestError(
                "a partition destination needs settings.name (1-64 letters, digits, _.-; not '.' or '..')"
            )
        return {"type": "partition", "settings": {"name": name}}
    raise ExportRequestError("destination.type must be 's3', 'directory' or 'partition'")


def _relative_path(path: str) -> bool:
    """'/'-separated names, none empty, '.' or '..', each at most 255 bytes (a file name's limit), 1024 in
    all (an S3 key's)."""
    parts = path.strip("/").split("/")
    return (
        not path.startswith("/")
        and "\\" not in path
        and "\x00" not in path
        and len(path.encode()) <= 1024
        and all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts)
    )
