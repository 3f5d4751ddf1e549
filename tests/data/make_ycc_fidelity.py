"""Make the colour JPEG test files of test_transcode_fidelity and their expected pixels, with DCMTK.

    .venv/bin/python tests/data/make_ycc_fidelity.py     (needs dcmcjpeg and dcmdjpeg on PATH)

The image (64 x 32 RGB) has sharp saturated colour edges, where chroma upsampling decides the result. It is
written as a native Secondary Capture with fixed UIDs, then compressed to JPEG Baseline by two encoders:

- ycc422_dcmtk.dcm: DCMTK's dcmcjpeg (IJG libjpeg), 4:2:2, YBR_FULL_422, as modalities and DCMTK write it;
- ycc420_pillow.dcm: Pillow (libjpeg-turbo), 4:2:0 chroma in a YBR_FULL_422 instance, as many JPEG
  producers write it (the instance's attributes cannot tell 4:2:0 from 4:2:2; the codestream does).

The expected pixels of each are DCMTK's: dcmdjpeg's decode (YCbCr to RGB), saved as lossless PNG
(`*.dcmdjpeg.png`). Both encoders are deterministic, so running this again reproduces the files.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

HERE = Path(__file__).parent
ROWS, COLUMNS = 32, 64
UID_ROOT = "2.25.21508230166735436219128376290846"


def pattern() -> np.ndarray:
    """Two-pixel red/blue stripes (chroma changing faster than 4:2:2 keeps), a green/magenta checkerboard,
    and a smooth gradient for the parts where every decoder agrees."""
    x = np.arange(COLUMNS)
    y = np.arange(ROWS)[:, None]
    img = np.zeros((ROWS, COLUMNS, 3), np.uint8)
    stripes = (x // 2) % 2 == 1
    img[:12, :, 0] = np.where(stripes, 255, 0)
    img[:12, :, 2] = np.where(stripes, 0, 255)
    checker = ((x // 3) + (y // 3)) % 2 == 1
    img[12:24] = np.where(checker[12:24, :, None], [0, 220, 40], [230, 20, 200])
    img[24:, :, 0] = x * 4
    img[24:, :, 1] = 255 - x * 4
    img[24:, :, 2] = 128
    return img


def native_instance(img: np.ndarray, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.{number}"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}.3.{number}"
    ds.StudyInstanceUID = f"{UID_ROOT}.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}.2.{number}"
    ds.PatientName = "Fidelity^Colour"
    ds.PatientID = "YCC-FIDELITY"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = img.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    return ds


def dcmtk_encoded(ds: Dataset, work: Path) -> bytes:
    native, out = work / "native.dcm", work / "jpeg.dcm"
    ds.save_as(native, enforce_file_format=True)
    # baseline, quality 90, YCbCr 4:2:2 (YBR_FULL_422), same SOP Instance UID
    subprocess.run(["dcmcjpeg", "+eb", "+q", "90", "+cy", "+s2", "+un", native, out], check=True)
    return out.read_bytes()


def pillow_encoded(ds: Dataset, img: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=90, subsampling=2)  # 4:2:0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dcmtk_decoded(path: Path, work: Path) -> np.ndarray:
    """dcmdjpeg's pixels: it converts YCbCr to RGB and says RGB."""
    out = work / "decoded.dcm"
    subprocess.run(["dcmdjpeg", path, out], check=True)
    ds = pydicom.dcmread(out)
    assert ds.PhotometricInterpretation == "RGB", ds.PhotometricInterpretation
    return ds.pixel_array


def main() -> None:
    img = pattern()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {
            "ycc422_dcmtk.dcm": dcmtk_encoded(native_instance(img, 1), work),
            "ycc420_pillow.dcm": pillow_encoded(native_instance(img, 2), img),
        }
        for name, data in files.items():
            path = HERE / name
            path.write_bytes(data)
            Image.fromarray(dcmtk_decoded(path, work)).save(path.with_suffix(".dcmdjpeg.png"), optimize=True)
            print(name, len(data), "bytes")


if __name__ == "__main__":
    main()
