"""Synthetic instances full of canaries for the de-identification tests (engine, CLI and export).

A canary is a unique random string put into an attribute that must not survive de-identification. The
leak check looks for every 8-character piece of every canary, case-insensitively, in the output bytes.
"""

from __future__ import annotations

import io
import random
import re
import string

import pydicom
from pydicom.datadict import get_entry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from deid.table import Row, load

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
ROOT = "1.2.826.0.1.3680043.10.1234.77."
PIECE = 8
# lengths of the text VRs a canary must fit (PS3.5 6.2)
MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UT": 10240,
              "UC": 10240, "UR": 1024}  # fmt: skip
TEXT_VRS = frozenset(MAX_LENGTH)


class Canaries:
    """Makes canaries and remembers them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.made: list[str] = []
        self._uid = 0

    def text(self, vr: str = "LO") -> str:
        core = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(12))
        self.made.append(core)
        if vr == "CS":
            return core.upper()[:16]
        if vr == "PN":
            other = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(12))
            self.made.append(other)
            return f"{core.title()}^{other.title()}"
        if vr == "UR":
            return f"http://{core}.example/"
        return core

    def uid(self) -> str:
        self._uid += 1
        return f"{ROOT}{self.rng.randint(1, 10**6)}.{self._uid}"


def value_for(vr: str, canaries: Canaries) -> object:
    """A valid value of the VR; text VRs carry a canary."""
    if vr in TEXT_VRS:
        return canaries.text(vr)
    return {
        "DA": "20200314",
        "TM": "101112",
        "DT": "20200314101112",
        "AS": "045Y",
        "IS": "7",
        "DS": "1.5",
        "UI": canaries.uid(),
        "US": 7,
        "SS": 7,
        "UL": 7,
        "SL": 7,
        "FL": 1.5,
        "FD": 1.5,
        "OB": canaries.text().encode(),
        "OW": canaries.text().encode(),
        "UN": canaries.text().encode(),
    }.get(vr)


def exact_rows() -> list[Row]:
    """Rows naming one data set attribute the dictionary knows (not file meta or command groups)."""
    rows = []
    for row in load().rows:
        value, mask = row.value_mask
        if mask != 0xFFFFFFFF or value >> 16 in (0x0000, 0x0002) or value >= 0xFFFA0000:
            continue
        try:
            get_entry(value)
        except KeyError:
            continue
        rows.append(row)
    return rows


def dictionary_vr(tag: int) -> str:
    vr = get_entry(tag)[0]
    return {"US or SS": "US", "OB or OW": "OB", "US or OW": "US", "US or SS or OW": "US"}.get(vr, vr)


def add_attribute(ds: Dataset, tag: int, canaries: Canaries, depth: int = 0) -> None:
    vr = dictionary_vr(tag)
    if vr == "SQ":
        item = Dataset()
        item.InstitutionName = canaries.text()
        item.TextValue = canaries.text("UT")
        if depth < 2:
            add_attribute(item, 0x00400260, canaries, depth + 1)  # PerformedProtocolCodeSequence (kept)
        ds.add_new(tag, "SQ", Sequence([item]))
        return
    value = value_for(vr, canaries)
    if value is not None:
        ds.add_new(tag, vr, value)


def base_instance(canaries: Canaries, *, study: str, series: str, sop: str, patient: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = series + ".9"
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.PatientName = canaries.text("PN")
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00" * 32
    return ds


def nested(canaries: Canaries, levels: int) -> Dataset:
    """An item with a kept sequence three deep, canaries (and a private block) at every level."""
    item = Dataset()
    item.PersonName = canaries.text("PN")
    item.ContentCreatorName = canaries.text("PN")
    item.add_new(0x00291010, "LO", canaries.text())
    item.add_new(0x00290010, "LO", canaries.text())
    if levels > 1:
        item.RadiopharmaceuticalInformationSequence = Sequence([nested(canaries, levels - 1)])
    return item


def to_file(ds: Dataset, canaries: Canaries, *, implicit: bool = False) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    )
    meta.ImplementationClassUID = ROOT + "1"
    meta.SourceApplicationEntityTitle = canaries.text("AE")
    meta.PrivateInformationCreatorUID = canaries.uid()
    meta.PrivateInformation = canaries.text().encode()
    ds.file_meta = meta
    ds.preamble = canaries.text().encode().ljust(128, b"\x00")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def pieces(canary: str) -> set[str]:
    core = re.sub(r"[^a-z]", "", canary.lower())
    return {core[i : i + PIECE] for i in range(0, max(1, len(core) - PIECE + 1))}


def leaked(canaries: list[str], output: bytes) -> list[str]:
    """Canaries any 8-character piece of which appears in the output, in any case."""
    text = output.decode("latin-1").lower()
    return [c for c in canaries if any(p in text for p in pieces(c))]


UID_RE = re.compile(rb"[0-9]+(?:\.[0-9]+){3,}")


def uids_in(data: bytes) -> set[str]:
    return {m.decode() for m in UID_RE.findall(data)}
