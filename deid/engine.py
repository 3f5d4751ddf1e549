"""One project's de-identifier: a resolved plan plus the project's keys, applied to PS3.10 objects.

Picklable, so a process pool can run it on both cores (pydicom holds the GIL; threads would not scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from deid.keys import ProjectKeys
from dicomcore.deidentify import Deidentified, Plan, Skipped, deidentify

__all__ = ["Deidentified", "Deidentifier", "Skipped"]


@dataclass(frozen=True, slots=True)
class Deidentifier:
    plan: Plan
    keys: ProjectKeys

    def __call__(self, source: bytes | BinaryIO) -> Deidentified:
        """The de-identified object; raises Skipped (with the reason) when it must not be exported."""
        return deidentify(source, self.plan, self.keys)


def output_key(result: Deidentified) -> str:
    """Where an exported instance goes below the operation's prefix: results/{study}/{series}/{sop}.dcm."""
    return f"results/{result.new.study}/{result.new.series}/{result.new.sop}.dcm"
