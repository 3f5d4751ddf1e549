"""Micro benchmark of DICOM JSON encoding: CPU µs per read_file / encode_dataset / parse_instance call.

Run: .venv/bin/python -m bench.bench_dicomjson [--number N]

Measures pydicom's CT_small.dcm (258 elements, explicit VR little endian), a synthetic CT header of about
100 elements (explicit and implicit VR little endian, big endian), and the 50 instances of one series as
bench.stow_ingest sends them (bench/synthetic.py, only the SOP Instance UID differs): the ingest path's
per-instance cost. encode_dataset is timed on a freshly read dataset each call (reading is excluded), since
converting elements mutates the dataset and a second encode of the same dataset would be unrepresentatively
cheap. parse_instance is timed on the Dataset path (framing + dicomjson) and on the direct one
(dicomcore.directjson), warm (values repeat, as in a series) and cold (its value cache emptied each call).
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bench.synthetic import instance_variants, make_study
from dicomcore import directjson, parse
from dicomcore.dicomjson import BulkRef, encode_dataset
from dicomcore.framing import read_file
from dicomcore.parse import DEFER_SIZE, parse_instance

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
ROOT = "1.2.826.0.1.3680043.10.1234."


def synthetic_ct(transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A CT slice header of ~100 attributes as a scanner writes it (with a few sequences), 64x64 pixels."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = "20240102"
    ds.InstanceCreationTime = "101112.123"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ROOT + "3.4.5.6"
    for name in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{name}Date", "20240102")
        setattr(ds, f"{name}Time", "101112.123456")
    ds.AccessionNumber = "ACC0001234"
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic Medical"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "1 Main Street"
    ds.ReferringPhysicianName = "Müller^Anna"
    ds.StationName = "CT01"
    ds.StudyDescription = "CHEST W/O CONTRAST"
    ds.SeriesDescription = "AXIAL 1.25 STANDARD"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.OperatorsName = ["Smith^John", "Doe^Jane"]
    ds.ManufacturerModelName = "Synth 9000"
    proc = Dataset()
    proc.CodeValue = "CTCHEST"
    proc.CodingSchemeDesignator = "99LOCAL"
    proc.CodeMeaning = "CT Chest"
    ds.ProcedureCodeSequence = [proc]
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = ROOT + "9.9"
    ds.ReferencedPerformedProcedureStepSequence = [ref]
    ds.PatientName = "García^José"
    ds.PatientID = "PID00042"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.PatientAge = "054Y"
    ds.PatientSize = "1.80"
    ds.PatientWeight = "80"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "SN-0001"
    ds.SoftwareVersions = ["1.0", "build 42"]
    ds.ProtocolName = "CHEST ROUTINE"
    ds.ReconstructionDiameter = "350"
    ds.DistanceSourceToDetector = "949.075012"
    ds.DistanceSourceToPatient = "541"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "300"
    ds.Exposure = "150"
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = "36000"
    ds.FocalSpots = "0.7"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40
    ds.TableSpeed = 78.75
    ds.TableFeedPerRotation = 39.375
    ds.SpiralPitchFactor = 0.984375
    ds.CTDIvol = 8.43
    ds.StudyInstanceUID = ROOT + "1.2"
    ds.SeriesInstanceUID = ROOT + "1.2.3"
    ds.StudyID = "1234"
    ds.SeriesNumber = "3"
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = "57"
    ds.ImagePositionPatient = ["-175.0", "-175.0", "-71.25"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = ROOT + "1.2.4"
    ds.PositionReferenceIndicator = "SN"
    ds.SliceLocation = "-71.25"
    ds.ImageComments = "synthetic"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 64
    ds.Columns = 64
    ds.PixelSpacing = ["0.683594", "0.683594"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SmallestImagePixelValue = -1024
    ds.LargestImagePixelValue = 3071
    ds.WindowCenter = ["40", "400"]
    ds.WindowWidth = ["400", "1500"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    ds.LossyImageCompression = "00"
    ds.RequestingPhysician = "Nguyen^Mei"
    ds.RequestedProcedureDescription = "CT CHEST"
    ds.PerformedProcedureStepStartDate = "20240102"
    ds.PerformedProcedureStepStartTime = "100000"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedProcedureStepDescription = "CT CHEST"
    req = Dataset()
    req.RequestedProcedureID = "RP1"
    req.ScheduledProcedureStepID = "SPS1"
    req.AccessionNumber = "ACC0001234"
    ds.RequestAttributesSequence = [req]
    block = ds.private_block(0x0009, "SYNTH_PRIVATE", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "DS", "1.5")
    block.add_new(0x03, "OB", bytes(range(200)) * 2)  # private binary over the inline limit: bulk data
    ds.PixelData = np.arange(64 * 64, dtype=np.int16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def per_call_us(fn: Callable[[], object], number: int) -> float:
    """Best-of-5 mean CPU µs per call (process time and the minimum filter out noise from other processes)."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, (time.process_time() - start) / number)
    return best * 1e6


def encode_us(data: bytes, number: int) -> float:
    """µs per encode_dataset call, each on a freshly read dataset (the read is not timed)."""
    datasets = [pydicom.dcmread(io.BytesIO(data), defer_size=DEFER_SIZE) for _ in range(number * 5 + 1)]
    it = iter(datasets)

    def encode() -> None:
        bulk: list[BulkRef] = []
        encode_dataset(next(it), bulk)

    return per_call_us(encode, number)


def cycle_us(
    fn: Callable[[bytes], object], datas: list[bytes], number: int, before: Callable[[], object]
) -> float:
    """µs per fn(data) over datas in turn (a series' instances), `before` run untimed... almost: it is
    cheap (clearing a cache) and timed with the call, which makes the cold figure slightly pessimistic."""
    it = iter(datas * (number * 5 // len(datas) + 2))

    def call() -> None:
        before()
        fn(next(it))

    return per_call_us(call, number)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=200, help="calls per timing round")
    args = parser.parse_args()
    spec = make_study(random.Random(7), series_count=1, modalities=["CT"])
    cases = {
        "CT_small.dcm": [CT_SMALL.read_bytes()],
        "synthetic CT explicit LE": [synthetic_ct(ExplicitVRLittleEndian)],
        "synthetic CT implicit LE": [synthetic_ct(ImplicitVRLittleEndian)],
        "synthetic CT explicit BE": [synthetic_ct(ExplicitVRBigEndian)],
        "STOW bench series (50)": instance_variants(spec, 0, 50),
    }
    print(
        f"{'case':26} {'elements':>8} {'read_file':>9} {'encode':>7} {'parse, Dataset path':>20} "
        f"{'parse, direct':>14} {'direct, cold':>13}   (µs per call)"
    )
    nothing: Callable[[], object] = lambda: None  # noqa: E731
    for name, datas in cases.items():
        count = len(read_file(datas[0], DEFER_SIZE)._dict)
        read = per_call_us(lambda d=datas[0]: read_file(d, DEFER_SIZE), args.number)
        encode = encode_us(datas[0], args.number)
        parse.DIRECT = False
        dataset_path = cycle_us(parse_instance, datas, args.number, nothing)
        parse.DIRECT = True
        direct = cycle_us(parse_instance, datas, args.number, nothing)
        cold = cycle_us(parse_instance, datas, args.number, directjson.clear_caches)
        print(
            f"{name:26} {count:8d} {read:9.1f} {encode:7.1f} {dataset_path:20.1f} {direct:14.1f} {cold:13.1f}"
        )


if __name__ == "__main__":
    main()
