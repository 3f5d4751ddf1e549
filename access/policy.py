"""Roles, route families and the table of which roles may use which family, per data partition.

Authorization happens before routing, from the method and path alone, so a decision can never depend on
whether the addressed study (or partition) exists: a 403 for an unknown study is the same as for a known one.
A path that matches no family known here is `UNKNOWN`, which only owners may reach (they then get the
router's 404): a route added later stays closed until it is put in this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

DEFAULT_PARTITION = "Microsoft.Default"  # the partition of the plain /vN roots (as in dicomweb.config)
# research partitions (filled by approved data requests): an all-partition grant does not reach them unless
# it is the owner's; only the researcher's own partition-scoped grant does
RESEARCH_PREFIX = "research-"


class Role(StrEnum):
    OWNER = "owner"
    WRITER = "writer"
    READER = "reader"
    WORKLIST = "worklist"
    RESEARCHER = "researcher"
    REVIEWER = "reviewer"
    AUDITOR = "auditor"


class Family(StrEnum):
    STOW = "stow"
    WADO = "wado"
    QIDO = "qido"
    DELETE = "delete"
    CHANGEFEED = "changefeed"
    EQT_READ = "extendedquerytags.read"
    EQT_WRITE = "extendedquerytags.write"
    OPERATIONS = "operations"
    # GET /vN/partitions/{p}/operations/{id}: an operation started in that partition (export, update,
    # acquisition), so that its owners and writers follow what they started (the plain route needs an
    # all-partition grant: it shows every partition's operations)
    PARTITION_OPERATIONS = "operations.partition"
    EXPORT = "export"
    UPDATE = "update"  # bulk update of stored studies (an operation)
    WORKITEMS = "workitems"
    AUDIT = "audit"
    METRICS = "metrics"
    TOKENS = "tokens"
    REIDENTIFY = "reidentify"
    REQUEST_SUBMIT = "datarequests.submit"
    REQUEST_READ = "datarequests.read"
    REQUEST_REVIEW = "datarequests.review"
    AES = "aes"  # registered DIMSE peers (/aes)
    ACQUIRE = "acquire"  # pulling studies from a DIMSE peer, sending studies to one (operations)
    DIMSE = "dimse"  # audit records of DIMSE associations and operations (no HTTP route)
    PARTITIONS = "partitions"  # GET /vN/partitions: the partitions the caller may use
    HL7 = "hl7"  # audit records of HL7 v2 messages received over MLLP (no HTTP route)
    SCRUB = "scrub"  # POST /scrub, GET /scrub/report (archive/scrub.py); also the scrub's audit records
    # a partition's retention policy (GET|PUT|DELETE /retention) and a study's legal hold (retention/)
    RETENTION = "retention"
    RETENTION_READ = "retention.read"  # GET /studies/{study}/retention: a study's hold, dates, restore window
    RESTORE = "restore"  # POST /studies/{study}/$restore: undo a delayed deletion within its window
    HEALTH = "health"
    PAGE = "page"
    UNKNOWN = "unknown"


OWN, WRI, REA, WL, RS, RV, AUD = (Role.OWNER, Role.WRITER, Role.READER, Role.WORKLIST, Role.RESEARCHER,
                                  Role.REVIEWER, Role.AUDITOR)  # fmt: skip

# Who may use each family. Researchers read images only in partitions they hold a partition-scoped grant
# for (see `allows`), which is how an approved data request's research partition becomes readable.
POLICY: dict[Family, frozenset[Role]] = {
    Family.STOW: frozenset({OWN, WRI}),
    Family.WADO: frozenset({OWN, REA, RS}),
    Family.QIDO: frozenset({OWN, REA, RS}),
    Family.DELETE: frozenset({OWN, WRI}),
    Family.CHANGEFEED: frozenset({OWN, REA}),
    Family.EQT_READ: frozenset({OWN, WRI, REA}),
    Family.EQT_WRITE: frozenset({OWN}),
    Family.OPERATIONS: frozenset({OWN, WRI, RV}),
    Family.PARTITION_OPERATIONS: frozenset({OWN, WRI, RV}),
    Family.EXPORT: frozenset({OWN}),
    Family.UPDATE: frozenset({OWN, WRI}),  # a correction of what writers store
    Family.WORKITEMS: frozenset({OWN, WL}),
    Family.AUDIT: frozenset({OWN, AUD}),
    Family.METRICS: frozenset({OWN, AUD}),
    Family.TOKENS: frozenset({OWN}),
    # the pseudonym -> original lookup: a deliberate act of an owner, audited like everything else
    Family.REIDENTIFY: frozenset({OWN}),
    Family.REQUEST_SUBMIT: frozenset({RS}),
    Family.REQUEST_READ: frozenset({OWN, RS, RV, AUD}),
    Family.REQUEST_REVIEW: frozenset({OWN, RV}),
    Family.AES: frozenset({OWN}),
    Family.ACQUIRE: frozenset({OWN, WRI}),
    Family.DIMSE: frozenset(),
    Family.HL7: frozenset(),
    Family.SCRUB: frozenset({OWN}),
    Family.RETENTION: frozenset({OWN}),
    Family.RETENTION_READ: frozenset({OWN, WRI, REA}),
    Family.RESTORE: frozenset({OWN, WRI}),  # those who may delete may undo it
    Family.UNKNOWN: frozenset({OWN}),
}
# open to anyone: probes carry no data, the request page is static HTML that calls the API with a token
OPEN_FAMILIES = frozenset({Family.HEALTH, Family.PAGE})
# families whose data lives in one partition: a grant must cover the partition in the URL
PARTITIONED = frozenset({Family.STOW, Family.WADO, Family.QIDO, Family.DELETE, Family.CHANGEFEED,
                         Family.WORKITEMS, Family.EXPORT, Family.ACQUIRE, Family.UPDATE, Family.RETENTION,
                         Family.RETENTION_READ, Family.RESTORE, Family.PARTITION_OPERATIONS})  # fmt: skip
# Listing partitions: every role that may use some partition; each caller sees only the partitions its
# grants reach (partition_visible), so the list discloses nothing the caller could not address anyway.
# (the families of a partition's data: following an operation started there does not make it listed)
LISTED = PARTITIONED - {Family.PARTITION_OPERATIONS}
POLICY[Family.PARTITIONS] = frozenset().union(*(POLICY[f] for f in LISTED))
# researchers' reads need a grant naming the partition; an all-partition researcher role reads nothing
NEEDS_NAMED_PARTITION = frozenset({Role.RESEARCHER})
# ATNA EventActionCode per family (C create, R read, U update, D delete, E execute)
ACTION_CODES: dict[Family, str] = {
    Family.STOW: "C", Family.DELETE: "D", Family.EQT_WRITE: "U", Family.EXPORT: "E", Family.UPDATE: "U",
    Family.REQUEST_SUBMIT: "C", Family.REQUEST_REVIEW: "U", Family.REIDENTIFY: "E", Family.ACQUIRE: "E",
    Family.SCRUB: "E", Family.RESTORE: "C",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Grant:
    """A role, in one partition (None: all), until `expires_at` (None: as long as its credential)."""

    role: Role
    partition: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """What a request addresses, as far as authorization and the audit log care."""

    family: Family
    partition: str | None = None
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    method: str = "GET"

    @property
    def action_code(self) -> str:
        if self.family in (Family.TOKENS, Family.AES, Family.RETENTION):
            return {"POST": "C", "PUT": "U", "DELETE": "D"}.get(self.method, "R")
        return ACTION_CODES.get(self.family, "R")


def allows(grants: tuple[Grant, ...] | list[Grant], target: Target, now: datetime) -> bool:
    """Whether any live grant admits the target."""
    if target.family in OPEN_FAMILIES:
        return True
    roles = POLICY[target.family]
    for grant in grants:
        if grant.role not in roles or (grant.expires_at is not None and grant.expires_at <= now):
            continue
        if target.family is Family.PARTITIONS:
            return True  # a partition-scoped grant too: the list shows each caller its own partitions
        if grant.role in NEEDS_NAMED_PARTITION and target.family in (Family.WADO, Family.QIDO):
            if grant.partition is not None and grant.partition == target.partition:
                return True
            continue
        if grant.partition is None:
            research = target.partition is not None and target.partition.startswith(RESEARCH_PREFIX)
            if not research or grant.role is Role.OWNER or target.family not in PARTITIONED:
                return True
        elif target.family in PARTITIONED and grant.partition == target.partition:
            return True
    return False


def partition_visible(grants: tuple[Grant, ...] | list[Grant], partition: str, now: datetime) -> bool:
    """Whether the grants admit some family in `partition` (what GET /vN/partitions lists for a caller).
    Researchers' grants must include their research grants (access.authn.research_grants)."""
    return any(allows(grants, Target(family, partition), now) for family in LISTED)


_SEG = r"([^/]+)"
_ROOT = re.compile(r"/v[12](?:/partitions/([^/]*))?(/.*)?")
_WADO_TAIL = r"(?:|/metadata|/rendered|/thumbnail|/bulkdata/.+|/frames/[^/]+(?:/rendered|/thumbnail)?)"
_STUDY = re.compile(rf"/studies/{_SEG}(?:/series/{_SEG}(?:/instances/{_SEG})?)?{_WADO_TAIL}")
_SEND = re.compile(rf"/studies/{_SEG}/\$send")
_STUDY_RETENTION = re.compile(rf"/studies/{_SEG}/(legalhold|retention|\$restore)")
_STUDY_SEARCH = re.compile(rf"/studies/{_SEG}(?:/series/{_SEG})?/(series|instances)")


def _retention_target(method: str, partition: str, study: str, what: str) -> Target:
    """/studies/{study}/legalhold (PUT, DELETE), /retention (GET), /$restore (POST)."""
    allowed = {"legalhold": ("PUT", "DELETE"), "retention": ("GET",), "$restore": ("POST",)}[what]
    family = {"legalhold": Family.RETENTION, "retention": Family.RETENTION_READ, "$restore": Family.RESTORE}
    return Target(family[what] if method in allowed else Family.UNKNOWN, partition, study, method=method)


def _service_target(method: str, partition: str, rest: str, named: bool = False) -> Target:
    """Classify a path below a service root (/vN or /vN/partitions/P: `named`)."""
    t = Target(Family.UNKNOWN, partition, method=method)
    if rest in ("/studies", "/series", "/instances"):
        if method == "POST" and rest == "/studies":
            return Target(Family.STOW, partition, method=method)
        return Target(Family.QIDO, partition, method=method) if method == "GET" else t
    if m := _STUDY_SEARCH.fullmatch(rest):
        if method != "GET" or (m.group(2) is not None and m.group(3) == "series"):
            return t
        return Target(Family.QIDO, partition, m.group(1), m.group(2), method=method)
    if m := _STUDY_RETENTION.fullmatch(rest):
        return _retention_target(method, partition, m.group(1), m.group(2))
    if rest == "/retention":
        family = Family.RETENTION if method in ("GET", "PUT", "DELETE") else Family.UNKNOWN
        return Target(family, partition, method=method)
    if rest == "/studies/$bulkUpdate":
        return Target(Family.UPDATE, partition, method=method) if method == "POST" else t
    if m := _STUDY.fullmatch(rest):
        study, series, instance = m.groups()
        plain = rest == "/studies/" + study + (f"/series/{series}" if series else "") + (
            f"/instances/{instance}" if instance else "")  # fmt: skip
        if method == "GET":
            return Target(Family.WADO, partition, study, series, instance, method)
        if plain and method == "DELETE":
            return Target(Family.DELETE, partition, study, series, instance, method)
        if plain and method == "POST" and series is None:
            return Target(Family.STOW, partition, study, method=method)
        return t
    if rest in ("/changefeed", "/changefeed/latest"):
        return Target(Family.CHANGEFEED, partition, method=method) if method == "GET" else t
    if rest == "/extendedquerytags" or rest.startswith("/extendedquerytags/"):
        family = Family.EQT_READ if method == "GET" else Family.EQT_WRITE
        return Target(family, None, method=method)
    if rest.startswith("/operations/"):
        if method != "GET":
            return t
        family = Family.PARTITION_OPERATIONS if named else Family.OPERATIONS
        return Target(family, partition if named else None, method=method)
    if rest == "/export":
        return Target(Family.EXPORT, partition, method=method) if method == "POST" else t
    if rest == "/acquire" and method == "POST":
        return Target(Family.ACQUIRE, partition, method=method)
    if (m := _SEND.fullmatch(rest)) and method == "POST":
        return Target(Family.ACQUIRE, partition, m.group(1), method=method)
    if rest == "/workitems" or rest.startswith(("/workitems/", "/ws/subscribers/")):
        return Target(Family.WORKITEMS, partition, method=method)
    return t


def classify(method: str, path: str) -> Target:
    """The route family, partition and UIDs of a request (path as the server received it, decoded)."""
    if method == "HEAD":  # the router answers HEAD wherever it answers GET
        return replace(classify("GET", path), method="HEAD")
    if path in ("/health/live", "/health/ready", "/health/check"):
        return Target(Family.HEALTH, method=method)
    if path == "/metrics":
        return Target(Family.METRICS, method=method)
    if path == "/audit":
        return Target(Family.AUDIT, method=method) if method == "GET" else Target(Family.UNKNOWN)
    if path == "/tokens" or (path.startswith("/tokens/") and path.count("/") == 2):
        return Target(Family.TOKENS, method=method)
    if path == "/scrub" or path == "/scrub/report":
        allowed = (method == "POST") if path == "/scrub" else (method == "GET")
        return Target(Family.SCRUB if allowed else Family.UNKNOWN, method=method)
    if path == "/aes" or (path.startswith("/aes/") and path.count("/") == 2):
        return Target(Family.AES, method=method)
    if path.startswith("/reidentify/"):
        shape_ok = method == "GET" and path.count("/") == 4
        return Target(Family.REIDENTIFY if shape_ok else Family.UNKNOWN, method=method)
    if path in ("/datarequests/page", "/datarequests/page.js"):
        return Target(Family.PAGE, method=method)
    if path == "/datarequests":
        family = Family.REQUEST_SUBMIT if method == "POST" else Family.REQUEST_READ
        return Target(family, method=method)
    if path.startswith("/datarequests/"):
        tail = path.removeprefix("/datarequests/").split("/")
        if len(tail) == 1 and method == "GET":
            return Target(Family.REQUEST_READ, method=method)
        if len(tail) == 2 and method == "POST" and tail[1] in ("approve", "reject", "revoke"):
            return Target(Family.REQUEST_REVIEW, method=method)
        return Target(Family.UNKNOWN, method=method)
    if path in ("/v1/partitions", "/v2/partitions"):
        return Target(Family.PARTITIONS if method == "GET" else Family.UNKNOWN, method=method)
    m = _ROOT.fullmatch(path)
    if m is None:
        return Target(Family.UNKNOWN, method=method)
    partition = DEFAULT_PARTITION if m.group(1) is None else m.group(1)
    return _service_target(method, partition, m.group(2) or "", m.group(1) is not None)
