"""A project's keys: UIDs, patient pseudonyms and date shifts derived from one secret with HMAC-SHA256.

Derivation, not lookup: the same original gives the same result in every job, process and machine of one
project, with no shared state, and an unrelated result in another project (another secret). Without the
secret nothing can be mapped back; the mapping table (deid.mapping) records originals for authorised
re-identification.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SECRET_BYTES = 32
# Dates move back by 1 to MAX_SHIFT_DAYS days, one offset per patient, so intervals survive.
MAX_SHIFT_DAYS = 3650


@dataclass(frozen=True, slots=True)
class ProjectKeys:
    project: str
    secret: bytes

    def _mac(self, purpose: bytes, *parts: str) -> bytes:
        message = purpose + b"\x00" + b"\x00".join(p.encode("utf-8") for p in parts)
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """'2.25.' + a 128-bit integer (PS3.5 B.2's UUID-derived form; at most 44 characters)."""
        return "2.25." + str(int.from_bytes(self._mac(b"uid", original)[:16], "big"))

    def patient_pseudonym(self, patient_id: str, issuer: str) -> str:
        """The patient's virtual ID in this project: 16 base32 characters."""
        digest = self._mac(b"patient", issuer, patient_id)
        return base64.b32encode(digest[:10]).decode("ascii")

    def date_shift_days(self, patient_id: str, issuer: str) -> int:
        """A negative whole number of days, the same for every instance of the patient."""
        digest = self._mac(b"date-shift", issuer, patient_id)
        return -(1 + int.from_bytes(digest[:4], "big") % MAX_SHIFT_DAYS)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def read_secret_file(path: Path, *, create: bool = False) -> bytes:
    """A project secret kept in a file (hex); created (mode 0600) when asked and missing."""
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fp:
            fp.write(new_secret().hex() + "\n")
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = text.encode("utf-8")
    if len(secret) < 16:
        raise ValueError(f"secret in {path} is too short: use at least 16 bytes (32 hex digits)")
    return secret
