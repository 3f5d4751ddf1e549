"""Synthetic DICOM data for tests and benchmarks: CT-like instances with controllable identity.

Realistic enough to exercise the archive as a scanner would (a ~40 KB CT slice with the usual patient,
study, series, equipment and image attributes), deterministic for a given seed.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ROOT = "1.2.826.0.1.3680043.10.1234."  # a test root; UIDs under it are made up

FAMILY = ["Smith", "Müller", "García", "Nguyen", "O'Brien", "Kowalski", "Rossi", "Dubois", "Yamada", "Öztürk"]
GIVEN = ["John", "Anna", "José", "Mei", "Lars", "Zoë", "Omar", "Chloé", "Ivan", "Aiko"]
MODALITIES = ["CT", "MR", "CR", "US", "PT", "DX"]
DESCRIPTIONS = ["CHEST W/O CONTRAST", "HEAD ROUTINE", "ABDOMEN PELVIS", "KNEE LEFT", "BRAIN MRI", "SPINE"]


def uid(rng: random.Random) -> str:
    return ROOT + ".".join(str(rng.randint(1, 10**9)) for _ in range(3))


@dataclass
class StudySpec:
    """The identity of one synthetic study; series and instances are generated under it."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    description: str
    referring: str
    series: list[tuple[str, str, int]] = field(default_factory=list)  # (series uid, modality, number)


def make_study(
    rng: random.Random, *, series_count: int = 2, modalities: list[str] | None = None
) -> StudySpec:
    family, given = rng.choice(FAMILY), rng.choice(GIVEN)
    spec = StudySpec(
        patient_id=f"PID{rng.randint(0, 99999):05d}",
        patient_name=f"{family}^{given}",
        birth_date=f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        sex=rng.choice(["M", "F", "O"]),
        study_uid=uid(rng),
        study_date=f"{rng.randint(2000, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        study_time=f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}",
        accession=f"ACC{rng.randint(0, 10**7):07d}",
        description=rng.choice(DESCRIPTIONS),
        referring=f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
    )
    for n in range(series_count):
        modality = (modalities or MODALITIES)[rng.randrange(len(modalities or MODALITIES))]
        spec.series.append((uid(rng), modality, n + 1))
    return spec


def make_instance(
    spec: StudySpec,
    series_index: int,
    instance_number: int,
    *,
    rng: random.Random | None = None,
    rows: int = 128,
    columns: int = 128,
    sop_uid: str | None = None,
) -> Dataset:
    """One CT-like slice (rows x columns x 16 bit; 128x128 gives ~40 KB on disk)."""
    rng = rng or random.Random(instance_number)
    series_uid, modality, series_number = spec.series[series_index]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE if modality != "MR" else MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid(prefix=None)
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.ContentDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.SeriesTime = spec.study_time
    ds.ContentTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.Modality = modality
    ds.Manufacturer = "Synthetic Medical"
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = spec.referring
    ds.StationName = "SCANNER1"
    ds.StudyDescription = spec.description
    ds.SeriesDescription = f"{spec.description} SERIES {series_number}"
    ds.ManufacturerModelName = "Synth 9000"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.PatientAge = "045Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DeviceSerialNumber = "SN-0001"
    ds.SoftwareVersions = "1.0"
    ds.ProtocolName = spec.description
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = spec.accession[-6:]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-125.0, -125.0, float(-instance_number * 1.25)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = spec.study_uid + ".1"
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{-instance_number * 1.25:.2f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    pixels = np.random.default_rng(rng.randint(0, 2**32 - 1)).integers(
        0, 4096, size=(rows, columns), dtype=np.uint16
    )
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = ROOT + "1"
    ds.file_meta = meta
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """A PS3.10 file (preamble, DICM, file meta) of the dataset."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart_body(files: list[bytes], boundary: str = "dicomweb-test-boundary") -> tuple[bytes, str]:
    """A STOW-RS request body and its Content-Type."""
    chunks = []
    for data in files:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


_SOP_PLACEHOLDER = ROOT + "9.1000000000000"


def instance_variants(
    spec: StudySpec, series_index: int, count: int, *, start: int = 0, rows: int = 128, columns: int = 128
) -> list[bytes]:
    """`count` distinct instances of one series, fast: one encoded template whose SOP Instance UID (a
    fixed-length placeholder) is overwritten in place, so no re-encoding happens per instance."""
    template = to_bytes(
        make_instance(spec, series_index, 1, sop_uid=_SOP_PLACEHOLDER, rows=rows, columns=columns)
    )
    placeholder = _SOP_PLACEHOLDER.encode()
    assert template.count(placeholder) == 2  # file meta and dataset
    out = []
    for n in range(start, start + count):
        value = f"{ROOT}9.1{n:012d}".encode()
        out.append(template.replace(placeholder, value))
    return out
