"""Request data sets of UPS-RS checked against the DICOM JSON model (PS3.18 F.2) and Table CC.2.5-3.

Every failure is a `DatasetError` whose message names the attribute (by keyword and tag) and what is wrong;
the HTTP layer answers 400 with it. Nothing here touches storage, so a rejected request changes nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import re
from typing import Any

import orjson

from dicomcore.dicomjson import BINARY_VRS
from dicomcore.tags import dictionary_vr, keyword
from dicomcore.uids import is_valid_uid
from indexer.attributes import parse_da, parse_tm
from indexer.extended_values import MAX_LENGTH, dt_bounds
from worklist.requirements import (
    BY_KEY,
    CODE_MEANING,
    CODE_VALUE,
    CODING_SCHEME,
    ENUMERATED,
    LONG_CODE_VALUE,
    UPS_PUSH_SOP_CLASS,
    URN_CODE_VALUE,
    KeyedReq,
)
from worklist.states import State

SOP_CLASS_UID = "00080016"
SOP_INSTANCE_UID = "00080018"
TRANSACTION_UID = "00081195"
PROCEDURE_STEP_STATE = "00741000"
MODIFICATION_DATETIME = "00404010"
WORKLIST_LABEL = "00741202"
DEFAULT_WORKLIST_LABEL = "DICOMWEB"

_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV "
    "".split()
)
_KEY = re.compile(r"[0-9A-Fa-f]{8}")


class DatasetError(ValueError):
    """A request data set that cannot be accepted; the message says which attribute and why."""


@functools.cache
def name(key: str) -> str:
    """How messages name an attribute: keyword and tag."""
    return f"{keyword(int(key, 16))} ({key[:4]},{key[4:]})"


@functools.cache
def _allowed_vrs(key: str) -> frozenset[str] | None:
    known = dictionary_vr(int(key, 16))
    if known is None or known == "UN":
        return None
    return frozenset(known.replace(" or ", " ").split())


def parse_dataset(body: bytes, *, optional: bool = False) -> dict[str, Any]:
    """The one data set of a request body: a DICOM JSON object, or an array holding exactly one."""
    if not body.strip():
        if optional:
            return {}
        raise DatasetError("the request has no payload: a DICOM JSON data set is required")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DatasetError(f"the payload is not JSON: {exc}") from exc
    if isinstance(value, list):
        if len(value) != 1:
            raise DatasetError(f"the payload must hold exactly one data set, not {len(value)}")
        value = value[0]
    if not isinstance(value, dict):
        raise DatasetError("the payload must be a DICOM JSON object (PS3.18 F.2)")
    return check_dataset(value)


def check_dataset(obj: dict[str, Any]) -> dict[str, Any]:
    """A DICOM JSON data set built elsewhere (an HL7 order) checked as a request body is: tags, VRs,
    values."""
    return _dataset(obj, "")


def _dataset(obj: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, element in obj.items():
        if not _KEY.fullmatch(raw_key):
            raise DatasetError(f"{where}{raw_key!r} is not an attribute tag (8 hex digits)")
        key = raw_key.upper()
        label = where + name(key)  # cached: building messages up front costs nothing per request
        if not isinstance(element, dict) or not isinstance(element.get("vr"), str):
            raise DatasetError(f"{label}: an element needs an object with a 'vr'")
        vr = element["vr"]
        if vr not in _VRS:
            raise DatasetError(f"{label}: {vr!r} is not a VR")
        allowed = _allowed_vrs(key)
        if allowed is not None and vr not in allowed:
            raise DatasetError(f"{label}: VR {vr} where the dictionary says {' or '.join(sorted(allowed))}")
        if "BulkDataURI" in element:
            raise DatasetError(f"{label}: work items take no bulk data; send the value inline")
        values = element.get("Value")
        if values is None:
            out[key] = _inline_binary(label, vr, element.get("InlineBinary"))
            continue
        if not isinstance(values, list):
            raise DatasetError(f"{label}: 'Value' must be an array")
        if vr == "SQ":
            items = []
            for n, item in enumerate(values):
                if not isinstance(item, dict):
                    raise DatasetError(f"{label}: item {n + 1} is not an object")
                items.append(_dataset(item, f"{label} item {n + 1}: "))
            out[key] = {"vr": vr, "Value": items} if items else {"vr": vr}
            continue
        for v in values:
            _check_value(label, vr, v)
        out[key] = {"vr": vr, "Value": values} if values else {"vr": vr}
    return out


def _inline_binary(label: str, vr: str, inline: Any) -> dict[str, Any]:
    """An element without a Value array: empty, or a binary value sent inline as base64 (PS3.18 F.2.7)."""
    if inline is None:
        return {"vr": vr}
    if vr not in BINARY_VRS:
        raise DatasetError(f"{label}: InlineBinary is for binary VRs (OB, OW, UN, ...), not {vr}")
    try:
        base64.b64decode(inline, validate=True)
    except (TypeError, ValueError):
        raise DatasetError(f"{label}: InlineBinary must be base64 text") from None
    return {"vr": vr, "InlineBinary": inline}


def _check_value(label: str, vr: str, v: Any) -> None:
    if v is None:
        return
    if vr == "PN":
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise DatasetError(f"{label}: a PN value is an object of component groups (PS3.18 F.2.2)")
        return
    if vr in ("DS", "FD", "FL", "IS", "SL", "SS", "SV", "UL", "US", "UV"):
        if not isinstance(v, (int, float, str)) or isinstance(v, bool):
            raise DatasetError(f"{label}: {v!r} is not a number")
        return
    if not isinstance(v, str):
        raise DatasetError(f"{label}: {v!r} is not a string")
    limit = MAX_LENGTH.get(vr)
    if limit is not None and len(v) > limit:  # the Modality Worklist would hand it on as invalid DICOM
        raise DatasetError(f"{label}: {v[:80]!r} is longer than {vr} allows ({limit} characters)")
    if vr == "UI" and not is_valid_uid(v):
        raise DatasetError(f"{label}: {v!r} is not a valid UID")
    if vr == "DA" and parse_da(v) is None:
        raise DatasetError(f"{label}: {v!r} is not a date (YYYYMMDD)")
    if vr == "TM" and parse_tm(v) is None:
        raise DatasetError(f"{label}: {v!r} is not a time (HHMMSS.FFFFFF)")
    if vr == "DT" and dt_bounds(v) is None:
        raise DatasetError(f"{label}: {v!r} is not a date-time (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")


def values(ds: dict[str, Any], key: str) -> list[Any]:
    """The element's values; none for an absent element or one without a Value array ("Value": null)."""
    element = ds.get(key)
    value = element.get("Value") if isinstance(element, dict) else None
    return value if isinstance(value, list) else []


def first(ds: dict[str, Any], key: str) -> Any:
    vals = values(ds, key)
    return vals[0] if vals else None


def _has_value(ds: dict[str, Any], key: str) -> bool:
    return any(v not in (None, "", {}) for v in values(ds, key))


def _check_enumerated(ds: dict[str, Any]) -> None:
    for key, allowed in ENUMERATED.items():
        for v in values(ds, key):
            if v not in allowed:
                raise DatasetError(f"{name(key)}: {v!r} is not one of {', '.join(sorted(allowed))}")


def _check_items(ds: dict[str, Any], table: dict[str, KeyedReq], column: str, where: str) -> None:
    """Requirements of one column (create or update) for the attributes of ds and their items."""
    for key, req in table.items():
        kind = getattr(req, column)
        label = where + name(key)
        if kind == "1" and not _has_value(ds, key) and (column == "create" or key in ds):
            raise DatasetError(
                f"{label} is required with a value" + ("" if column == "create" else ", not empty")
            )
        if kind == "2" and column == "create" and key not in ds:
            raise DatasetError(f"{label} is required (it may be empty)")
        for n, item in enumerate(values(ds, key)):
            if not isinstance(item, dict):
                continue
            at = f"{label} item {n + 1}: "
            if req.code:
                _check_code(item, at)
            if req.items:
                _check_items(item, req.items, "create", at)


def _check_code(item: dict[str, Any], at: str) -> None:
    """Code Sequence Macro (PS3.3 Table 8.8-1)."""
    if not any(_has_value(item, k) for k in (CODE_VALUE, LONG_CODE_VALUE, URN_CODE_VALUE)):
        raise DatasetError(f"{at}a code needs a Code Value (0008,0100), Long Code Value or URN Code Value")
    if not _has_value(item, URN_CODE_VALUE) and not _has_value(item, CODING_SCHEME):
        raise DatasetError(f"{at}Coding Scheme Designator (0008,0102) is required with a value")
    if not _has_value(item, CODE_MEANING):
        raise DatasetError(f"{at}Code Meaning (0008,0104) is required with a value")


def now_dt() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S.%f+0000")


def prepare_create(ds: dict[str, Any], uid_param: str | None) -> tuple[str, dict[str, Any], bool]:
    """(workitem UID, data set to store, modified) for Create Workitem (PS3.18 11.4, N-CREATE column).

    The UID comes from the query parameter or the data set's SOP Instance UID (both: they must agree); the
    caller generates one when neither has it. SOP Class UID and the modification date-time are the archive's.
    """
    modified = False
    given = first(ds, SOP_INSTANCE_UID)
    if uid_param is not None and given is not None and given != uid_param:
        raise DatasetError(
            f"{name(SOP_INSTANCE_UID)} {given!r} differs from the workitem parameter {uid_param!r}"
        )
    uid = uid_param or given
    if _has_value(ds, TRANSACTION_UID):
        raise DatasetError(f"{name(TRANSACTION_UID)} must be empty in a new work item: nobody owns it yet")
    state = first(ds, PROCEDURE_STEP_STATE)
    if state != State.SCHEDULED.code:
        raise DatasetError(
            f"{name(PROCEDURE_STEP_STATE)} must be SCHEDULED in a new work item, not {state!r}"
        )
    _check_enumerated(ds)
    _check_items(ds, BY_KEY, "create", "")
    if first(ds, SOP_CLASS_UID) not in (None, UPS_PUSH_SOP_CLASS):
        modified = True
    if _has_value(ds, MODIFICATION_DATETIME):
        modified = True
    out = dict(ds)
    out.pop(TRANSACTION_UID, None)
    out[SOP_CLASS_UID] = {"vr": "UI", "Value": [UPS_PUSH_SOP_CLASS]}
    if uid is not None:
        out[SOP_INSTANCE_UID] = {"vr": "UI", "Value": [uid]}
    out[MODIFICATION_DATETIME] = {"vr": "DT", "Value": [now_dt()]}
    if not _has_value(out, WORKLIST_LABEL):
        out[WORKLIST_LABEL] = {"vr": "LO", "Value": [DEFAULT_WORKLIST_LABEL]}
    return uid or "", out, modified


def prepare_update(ds: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The work item after Update Workitem (N-SET): each attribute sent replaces the stored one whole."""
    if not ds:
        raise DatasetError("the update holds no attributes")
    for key in ds:
        req = BY_KEY.get(key)
        if req is not None and req.update == "-":
            why = "use Change Workitem State" if key == PROCEDURE_STEP_STATE else "it is set by the archive"
            if key == TRANSACTION_UID:
                why = "the Transaction UID goes in the query"
            raise DatasetError(f"{name(key)} may not be updated: {why}")
    _check_enumerated(ds)
    for key in ds:
        req = BY_KEY.get(key)
        if req is None:
            continue
        if req.update == "1" or req.create == "1":
            if not _has_value(ds, key):
                raise DatasetError(f"{name(key)} may not be emptied")
        _check_items({key: ds[key]}, {key: req}, "update", "")
    out = dict(current)
    out.update(ds)
    out[MODIFICATION_DATETIME] = {"vr": "DT", "Value": [now_dt()]}
    return out


def final_state_missing(ds: dict[str, Any], target: State) -> list[str]:
    """Attributes the final state requirements (CC.2.5.1.1) still miss before `target`."""
    return _missing(ds, BY_KEY, target, "")


def _missing(ds: dict[str, Any], table: dict[str, KeyedReq], target: State, where: str) -> list[str]:
    out = []
    for key, req in table.items():
        needed = req.final == "R" or (req.final == "P" and target is State.COMPLETED)
        if needed:
            present = _has_value(ds, key) if (req.create == "1" or req.final == "P") else key in ds
            if req.final == "P" and req.items:
                present = key in ds and bool(values(ds, key))
            if not present:
                out.append(where + name(key))
                continue
        if req.items and target is State.COMPLETED:
            for n, item in enumerate(values(ds, key)):
                if isinstance(item, dict):
                    out.extend(_missing(item, req.items, target, f"{where}{name(key)} item {n + 1}: "))
    return out
