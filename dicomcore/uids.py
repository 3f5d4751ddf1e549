"""UID syntax (PS3.5 9.1) and the UIDs the archive refers to by name."""

from __future__ import annotations

import re
import uuid

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid UID: dot-separated numbers without leading zeros, at most 64 chars."""
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def new_uid() -> str:
    """A new UID derived from a random UUID (PS3.5 B.2: the 2.25 root needs no registered organisation)."""
    return f"2.25.{uuid.uuid4().int}"
