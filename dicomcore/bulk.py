"""Bulk data values that are not served as a byte range of the stored object (nested in sequences, in a
deflated object, or words in a big endian one): found by parsing the object, which these rare cases afford."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomcore.uids import EXPLICIT_VR_BIG_ENDIAN


def bulk_value(data: bytes, path: str) -> bytes:
    """The value bytes at a BulkDataURI path ("00540016/0/00181072") of the PS3.10 object `data`.
    Raises KeyError when the path names nothing, ValueError when the object cannot be parsed."""
    try:
        ds: Dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"stored object cannot be parsed: {exc}") from exc
    parts = path.strip("/").split("/")
    node: Dataset = ds
    for i in range(0, len(parts) - 1, 2):
        element = node.get(int(parts[i], 16))
        if element is None or element.VR != "SQ" or not parts[i + 1].isdigit():
            raise KeyError(path)
        items = element.value
        index = int(parts[i + 1])
        if index >= len(items):
            raise KeyError(path)
        node = items[index]
    element = node.get(int(parts[-1], 16))
    if element is None or element.value is None:
        raise KeyError(path)
    value = element.value if isinstance(element.value, bytes) else bytes(element.value)
    width = _WORD_WIDTHS.get(element.VR)
    if width and ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_BIG_ENDIAN and len(value) % width == 0:
        # PS3.18 bulk data is little endian (Table 8.7.3-4): swap the words of a big endian object
        value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return value


_WORD_WIDTHS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
